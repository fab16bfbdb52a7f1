//! AUTOMATIC1111 prompt editing, alternation and `AND` against webui's own results:
//! `tests/golden/a1111/schedules.json`, written by `onnx/golden_a1111_schedules.py` from
//! webui 1.10.1's `modules/prompt_parser.py` (`get_multicond_prompt_list`,
//! `get_learned_conditioning_prompt_schedules`). Every case must come out equal to webui's,
//! or, for the random strings only, be refused; a schedule webui does not give the same
//! way in every process (`null` in the golden) must be refused.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diffusiond::prompt_syntax::{PromptSyntaxError, Scheduled, entry_at, schedule, split_and};
use serde_json::Value;

fn golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/a1111/schedules.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn webui_schedule(v: &Value) -> Vec<Scheduled> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| Scheduled {
            end_at_step: e[0].as_u64().unwrap() as usize,
            text: e[1].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The refusal's kind, for the counts.
fn kind(e: &PromptSyntaxError) -> &'static str {
    match e {
        PromptSyntaxError::AmbiguousSchedule { .. } => "ambiguous",
        PromptSyntaxError::ScheduleTooDeep { .. } => "too deep",
        PromptSyntaxError::ScheduleStepOverflow { .. } => "step overflow",
        PromptSyntaxError::AndBoundary { .. } => "AND boundary",
        PromptSyntaxError::CompositeWeight { .. } => "weight digits",
        _ => "other",
    }
}

#[test]
fn schedules_match_webui() {
    let doc = golden();
    let cases = doc["cases"].as_array().unwrap();
    let mut mismatches = Vec::new();
    // (group, kind) -> count: refusals where webui has one answer.
    let mut refusals: BTreeMap<(String, &str), usize> = BTreeMap::new();
    let mut required_refusals = 0;
    let mut refused_examples = Vec::new();
    let mut by_group: BTreeMap<String, usize> = BTreeMap::new();
    for case in cases {
        let group = case["group"].as_str().unwrap().to_string();
        let prompt = case["prompt"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        *by_group.entry(group.clone()).or_default() += 1;
        if let Some(error) = case.get("error") {
            // webui raises (OverflowError for an infinite step): we must not answer.
            let ours = split_and(prompt).and_then(|parts| {
                parts
                    .iter()
                    .map(|p| schedule(&p.text, steps))
                    .collect::<Result<Vec<_>, _>>()
            });
            if ours.is_ok() {
                mismatches.push(format!("{prompt:?}: webui raises {error}, we answer"));
            }
            continue;
        }
        let parts = match split_and(prompt) {
            Ok(parts) => parts,
            Err(e) => {
                *refusals.entry((group, kind(&e))).or_default() += 1;
                continue;
            }
        };
        let webui_parts = case["parts"].as_array().unwrap();
        let same_parts = parts.len() == webui_parts.len()
            && parts.iter().zip(webui_parts).all(|(ours, theirs)| {
                ours.text == theirs["text"].as_str().unwrap()
                    && ours.weight == theirs["weight"].as_f64().unwrap()
            });
        if !same_parts {
            mismatches.push(format!(
                "{prompt:?}: parts {parts:?}, webui {webui_parts:?}"
            ));
            continue;
        }
        for (part, expected) in parts.iter().zip(case["schedules"].as_array().unwrap()) {
            let ours = schedule(&part.text, steps);
            match (ours, expected.is_null()) {
                (Err(_), true) => required_refusals += 1,
                (Ok(ours), true) => mismatches.push(format!(
                    "{:?} ({steps} steps): webui's result changes between runs, we answer {ours:?}",
                    part.text
                )),
                (Err(e), false) => {
                    if refused_examples.len() < 10 {
                        refused_examples.push(format!("{:?} ({steps} steps): {e}", part.text));
                    }
                    *refusals.entry((group.clone(), kind(&e))).or_default() += 1;
                }
                (Ok(ours), false) => {
                    let theirs = webui_schedule(expected);
                    if ours != theirs {
                        mismatches.push(format!(
                            "{:?} ({steps} steps): ours {ours:?}, webui {theirs:?}",
                            part.text
                        ));
                    }
                }
            }
        }
    }
    println!("cases by group: {by_group:?}");
    println!("refusals where webui has one answer: {refusals:?}");
    println!("refusals where webui's answer changes between runs: {required_refusals}");
    for example in &refused_examples {
        println!("refused: {example}");
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    for ((group, kind), count) in &refusals {
        assert_eq!(
            group, "random",
            "{count} {kind} refusals of {group} prompts"
        );
    }
    let random_refusals: usize = refusals.values().sum();
    let random = by_group.get("random").copied().unwrap_or(0);
    assert!(random >= 1000, "only {random} random cases");
    assert!(
        random_refusals * 20 < random,
        "{random_refusals} of {random} random prompts refused (5% at most)"
    );
}

#[test]
fn entry_choice_follows_reconstruct_cond_batch() {
    let s = schedule("a [b:c:0.5] [d|e]", 4).unwrap();
    assert_eq!(
        s.iter().map(|e| e.end_at_step).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // Sampling step 0 uses the first entry; step s the first with end_at_step >= s.
    assert_eq!(entry_at(&s, 0), 0);
    assert_eq!(entry_at(&s, 1), 0);
    assert_eq!(entry_at(&s, 2), 1);
    assert_eq!(entry_at(&s, 4), 3);
    // Past the last entry (hires fix runs on): the first, as webui does.
    assert_eq!(entry_at(&s, 5), 0);
}
