//! Unit tests of the attention parser, chunking and weighting (webui's rules).

use super::*;
use ndarray::Array2;

#[track_caller]
fn check(text: &str, expected: &[(&str, f64)]) {
    let got: Vec<(String, f64)> = (parse_attention(text).unwrap().into_iter())
        .map(|s| (s.text, s.weight))
        .collect();
    let want: Vec<(String, f64)> = (expected.iter())
        .map(|&(t, w)| (t.to_string(), w))
        .collect();
    assert_eq!(got, want, "{text:?}");
}

#[test]
fn parses_webuis_doctest_examples() {
    check("normal text", &[("normal text", 1.0)]);
    let important = [("an ", 1.0), ("important", 1.1), (" word", 1.0)];
    check("an (important) word", &important);
    check("(unbalanced", &[("unbalanced", 1.1)]);
    check("\\(literal\\]", &[("(literal]", 1.0)]);
    check("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]);
    let nested = [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ];
    let text = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).";
    check(text, &nested);
}

#[test]
fn parses_weights_escapes_and_unmatched_brackets() {
    let square = [("a ", 1.0), ("red", 1.0 / 1.1), (" car", 1.0)];
    check("a [red] car", &square);
    let spaced = [("a ", 1.0), ("red ", 1.3), (" b", 1.0), ("c", 0.5)];
    check("a (red : 1.3 ) b(c:+.5)", &spaced);
    check("(d:2.)", &[("d", 2.0)]);
    // A lone backslash is an empty piece; `\\` is one backslash.
    check("a \\ b \\\\", &[("a  b \\", 1.0)]);
    // Unmatched closers, a weight with no group open and a bare colon are text.
    check("a ) b ] :1.2) c: d", &[("a ) b ] :1.2) c: d", 1.0)]);
    // Still-open groups close at the end: round ones first, then square ones.
    let open = [("a ", 1.0), ("b ", 1.0 / 1.1), ("c", 1.0 / 1.1 * 1.1)];
    check("a [b (c", &open);
    check("", &[("", 1.0)]);
    check("()[](:1.5)", &[("", 1.0)]);
}

#[test]
fn break_is_a_segment_only_as_a_word_outside_groups() {
    let split = [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)];
    check("a cat \t BREAK  a dog", &split);
    let words = [
        ("xBREAK BREAKy BREAK_z ,", 1.0),
        ("BREAK", -1.0),
        (", b", 1.0),
    ];
    check("xBREAK BREAKy BREAK_z ,BREAK, b", &words);
    let grouped = parse_attention("(a BREAK b)").unwrap();
    assert_eq!(grouped[1].text, "BREAK");
    assert!(!grouped[1].is_break(), "{grouped:?}");
    // Weight 0 makes -0.0 and 0.0, which are equal: everything merges.
    check("(a BREAK b:0)", &[("aBREAKb", 0.0)]);
}

#[test]
fn a_weight_that_is_no_number_is_an_error_naming_it() {
    let err = parse_attention("a (b:1.2.3) c").unwrap_err();
    assert!(err.to_string().contains("'1.2.3'"), "{err}");
    assert!(parse_attention("(b:.)").is_err());
    assert!(parse_attention("b:1.2.3)").is_ok(), "no group open: text");
}

#[test]
fn syntax_names_round_trip() {
    for syntax in PromptSyntax::ALL {
        assert_eq!(syntax.to_string().parse::<PromptSyntax>(), Ok(syntax));
    }
    assert_eq!(PromptSyntax::default(), PromptSyntax::Diffusers);
    let err = "A1111x".parse::<PromptSyntax>().unwrap_err().to_string();
    assert!(
        err.contains("'A1111x'") && err.contains("diffusers, a1111"),
        "{err}"
    );
}

const CAT: i64 = 10;
const DOG: i64 = 20;
const COMMA: i64 = 267;

/// One id per whitespace-separated word; `,` is its own word.
fn fake_tokenize(text: &str) -> Result<Vec<i64>, String> {
    let spaced = text.replace(',', " , ");
    let id = |w: &str| match w {
        "cat" => CAT,
        "dog" => DOG,
        "," => COMMA,
        _ => 99,
    };
    Ok(spaced.split_whitespace().map(id).collect())
}

fn chunks(text: &str, pad: i64) -> Vec<Chunk> {
    let spec = ChunkSpec::new(49406, 49407, pad, Some(COMMA));
    chunk_segments(&parse_attention(text).unwrap(), &spec, fake_tokenize).unwrap()
}

fn text_ids(chunk: &Chunk) -> Vec<i64> {
    let end = chunk.ids[1..].iter().position(|&id| id == 49407).unwrap();
    chunk.ids[1..=end].to_vec()
}

fn cats_comma_dogs(cats: usize, dogs: usize) -> String {
    let (cats, dogs) = (vec!["cat"; cats].join(" "), vec!["dog"; dogs].join(" "));
    format!("{cats}, {dogs}")
}

#[test]
fn empty_prompt_and_padding_chunks_hold_start_end_and_padding() {
    for text in ["", "   ", "()"] {
        let c = chunks(text, 49407);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids[..3], [49406, 49407, 49407]);
        assert_eq!(c[0].ids.len(), CHUNK_LEN);
        assert_eq!(c[0].weights, vec![1.0; CHUNK_LEN]);
    }
    let spec = ChunkSpec::new(49406, 49407, 0, Some(COMMA));
    let empty = Chunk::empty(&spec);
    assert_eq!(empty.ids[..4], [49406, 49407, 0, 0]);
    assert_eq!(chunks("", 0), vec![empty.clone()]);
    let mut padded = chunks("cat", 0);
    pad_chunks(&mut padded, 3, &spec);
    pad_chunks(&mut padded, 1, &spec);
    assert_eq!((padded.len(), &padded[2]), (3, &empty));
}

#[test]
fn long_prompts_fill_75_tokens_per_chunk_with_weights() {
    let text = format!("{} (dog dog:1.5)", ["cat"; 75].join(" "));
    let c = chunks(&text, 0);
    assert_eq!(c.len(), 2);
    assert_eq!(text_ids(&c[0]), vec![CAT; 75]);
    assert_eq!(c[0].ids[76], 49407);
    assert_eq!(text_ids(&c[1]), vec![DOG; 2]);
    assert_eq!(c[1].weights[..4], [1.0, 1.5, 1.5, 1.0]);
    assert_eq!(c[1].ids[3..5], [49407, 0], "pad after the first end token");
}

#[test]
fn overflow_moves_text_after_a_comma_at_most_20_tokens_back() {
    // The comma is token 56 (index 55): 75 - 55 = 20, moved.
    let c = chunks(&cats_comma_dogs(55, 30), 49407);
    assert_eq!(text_ids(&c[0]).len(), 56);
    assert_eq!(text_ids(&c[1]), vec![DOG; 30]);
    // Index 54: 21 back, no move.
    let c = chunks(&cats_comma_dogs(54, 30), 49407);
    assert_eq!(text_ids(&c[0]).len(), 75);
    assert_eq!(text_ids(&c[1]), vec![DOG; 10]);
    // The comma as 75th token: nothing to move, the chunk just ends.
    let c = chunks(&cats_comma_dogs(74, 5), 49407);
    assert_eq!(text_ids(&c[0]).len(), 75);
    assert_eq!(text_ids(&c[1]), vec![DOG; 5]);
    // A comma opening a chunk does not count for that chunk.
    let c = chunks(&cats_comma_dogs(75, 80), 49407);
    assert_eq!(text_ids(&c[1])[..2], [COMMA, DOG]);
    assert_eq!(text_ids(&c[1]).len(), 75);
    assert_eq!(text_ids(&c[2]), vec![DOG; 6]);
}

#[test]
fn break_closes_the_chunk_even_an_empty_one() {
    let c = chunks("cat BREAK dog", 49407);
    assert_eq!((text_ids(&c[0]), text_ids(&c[1])), (vec![CAT], vec![DOG]));
    assert_eq!(chunks("cat BREAK", 49407).len(), 1);
    let c = chunks("BREAK BREAK dog", 49407);
    assert_eq!(c.len(), 3);
    assert!(text_ids(&c[0]).is_empty() && text_ids(&c[1]).is_empty());
}

#[test]
fn weights_scale_rows_and_restore_the_mean() {
    let mut z = Array2::from_shape_fn((3, 2), |(i, j)| (i * 2 + j) as f32 + 1.0);
    let before = z.clone();
    apply_weights(z.view_mut(), &[1.0; 3]).unwrap();
    assert_eq!(z, before);
    apply_weights(z.view_mut(), &[1.0, 2.0, 0.5]).unwrap();
    // Values 1..6: mean 3.5; weighted [1 2 6 8 2.5 3]: mean 3.75; ratio 3.5 / 3.75.
    let r = 3.5f32 / 3.75f32;
    let expected = [1.0, 2.0, 6.0, 8.0, 2.5, 3.0].map(|x: f32| x * r);
    assert_eq!(z.iter().copied().collect::<Vec<_>>(), expected);
    let err = apply_weights(z.view_mut(), &[1.0; 2])
        .unwrap_err()
        .to_string();
    assert_eq!(err, "2 token weights for 3 rows of hidden states");
    let chunk = Chunk::empty(&ChunkSpec::new(49406, 49407, 49407, None));
    let mut zeros = Array2::<f32>::zeros((CHUNK_LEN * 2, 2));
    apply_chunk_weights(zeros.view_mut(), &[chunk.clone(), chunk.clone()]).unwrap();
    assert!(zeros.iter().all(|&x| x == 0.0), "all-1.0 weights: no 0 / 0");
    assert!(apply_chunk_weights(zeros.view_mut(), &[chunk]).is_err());
}
