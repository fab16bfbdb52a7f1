//! Unit tests of `schedule`: webui's doctests of `get_learned_conditioning_prompt_schedules`
//! (webui 1.10.1, `modules/prompt_parser.py`) and a few of `re_AND` / `re_weight`.

use super::*;

fn g(text: &str) -> Vec<(usize, String)> {
    schedule(text, 10)
        .unwrap()
        .into_iter()
        .map(|s| (s.end_at_step, s.text))
        .collect()
}

fn pairs(list: &[(usize, &str)]) -> Vec<(usize, String)> {
    list.iter().map(|(s, t)| (*s, t.to_string())).collect()
}

#[test]
fn webui_doctests() {
    assert_eq!(g("test"), pairs(&[(10, "test")]));
    assert_eq!(g("a [b:3]"), pairs(&[(3, "a "), (10, "a b")]));
    assert_eq!(g("a [b: 3]"), pairs(&[(3, "a "), (10, "a b")]));
    assert_eq!(g("a [[[b]]:2]"), pairs(&[(2, "a "), (10, "a [[b]]")]));
    assert_eq!(g("[(a:2):3]"), pairs(&[(3, ""), (10, "(a:2)")]));
    assert_eq!(
        g("a [b : c : 1] d"),
        pairs(&[(1, "a b  d"), (10, "a  c  d")])
    );
    assert_eq!(
        g("a[b:[c:d:2]:1]e"),
        pairs(&[(1, "abe"), (2, "ace"), (10, "ade")])
    );
    assert_eq!(g("a [unbalanced"), pairs(&[(10, "a [unbalanced")]));
    assert_eq!(g("a [b:.5] c"), pairs(&[(5, "a  c"), (10, "a b c")]));
    // The doctest expects an edit here, but webui 1.10.1 itself returns the text unparsed
    // (`|` outside an alternation).
    assert_eq!(g("a [{b|d{:.5] c"), pairs(&[(10, "a [{b|d{:.5] c")]));
    assert_eq!(
        g("((a][:b:c [d:3]"),
        pairs(&[(3, "((a][:b:c "), (10, "((a][:b:c d")])
    );
    let alt: Vec<_> = (1..=10)
        .map(|s| (s, if s % 2 == 1 { "a" } else { "(b:1.1)" }.to_string()))
        .collect();
    assert_eq!(g("[a|(b:1.1)]"), alt);
    let fe: Vec<_> = (1..=10)
        .map(|s| (s, if s % 2 == 1 { "female" } else { "male" }.to_string()))
        .collect();
    assert_eq!(g("[fe|]male"), fe);
    let fe4: Vec<_> = (1..=10)
        .map(|s| (s, if s % 4 == 1 { "female" } else { "male" }.to_string()))
        .collect();
    assert_eq!(g("[fe|||]male"), fe4);
}

#[test]
fn edits_with_odd_numbers() {
    assert_eq!(g("[a:b:1.e1]"), pairs(&[(10, "a")]));
    assert_eq!(g("[a:b:-1]"), pairs(&[(10, "b")]));
    assert_eq!(g("[a:b:1e1]"), pairs(&[(10, "a")]));
    assert_eq!(g("[a:b:+.5]"), pairs(&[(5, "a"), (10, "b")]));
    assert_eq!(g("[a:b:+3]"), pairs(&[(3, "a"), (10, "b")]));
    assert_eq!(g("[a:b:+1.e-1]"), pairs(&[(1, "a"), (10, "b")]));
    assert_eq!(g("[a:b:-.5e1]"), pairs(&[(10, "b")]));
    assert_eq!(g("[a:b:3.]"), pairs(&[(10, "a")]));
    // NUMBER is `3`, then `e` is no `]`: no edit.
    assert_eq!(g("[a:b:3e]"), pairs(&[(10, "[a:b:3e]")]));
    assert!(matches!(
        schedule("[a:1e400]", 10),
        Err(PromptSyntaxError::ScheduleStepOverflow { .. })
    ));
}

#[test]
fn ambiguous_brackets_are_refused() {
    assert!(matches!(
        schedule("a [cat:dog:0.5]]", 10),
        Err(PromptSyntaxError::AmbiguousSchedule { .. })
    ));
    let deep = format!("{}a{}", "[".repeat(1000), "]".repeat(1000));
    assert!(matches!(
        schedule(&deep, 10),
        Err(PromptSyntaxError::ScheduleTooDeep { .. })
    ));
}

#[test]
fn unparsable_text_is_kept() {
    assert_eq!(g("a|b"), pairs(&[(10, "a|b")]));
    assert_eq!(g("a\\"), pairs(&[(10, "a\\")]));
}

#[test]
fn entry_choice() {
    let s = schedule("a [b:c:3]", 10).unwrap();
    assert_eq!(entry_at(&s, 0), 0);
    assert_eq!(entry_at(&s, 3), 0);
    assert_eq!(entry_at(&s, 4), 1);
    assert_eq!(entry_at(&s, 11), 0);
}

fn parts(prompt: &str) -> Vec<(String, f64)> {
    split_and(prompt)
        .unwrap()
        .into_iter()
        .map(|c| (c.text, c.weight))
        .collect()
}

#[test]
fn and_and_weights() {
    let p = |list: &[(&str, f64)]| -> Vec<(String, f64)> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    };
    assert_eq!(
        parts("a cat AND a dog :1.2"),
        p(&[("a cat", 1.0), (" a dog", 1.2)])
    );
    assert_eq!(parts("a cat:1.2"), p(&[("a cat", 1.2)]));
    assert_eq!(parts("ANDROID AND"), p(&[("ANDROID", 1.0), ("", 1.0)]));
    assert_eq!(parts("a: :1"), p(&[("a:", 1.0)]));
    assert_eq!(parts("a :+.5"), p(&[("a", 0.5)]));
    assert_eq!(parts("a :1."), p(&[("a", 1.0)]));
    assert_eq!(parts("a :1e1"), p(&[("a :1e1", 1.0)]));
    assert!(split_and("éAND b").is_err());
    // A word character on the other side settles it.
    assert_eq!(parts("éANDROID"), p(&[("éANDROID", 1.0)]));
}
