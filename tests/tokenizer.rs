//! CLIP tokenizer parity with transformers' `CLIPTokenizerFast`, on the corpus in
//! tests/golden/tokenizer/cases.json (unicode, punctuation, empty and over-long prompts),
//! both from `tokenizer.json` and rebuilt from `vocab.json` + `merges.txt` alone; and the
//! special tokens of each fixture tokenizer (tests/golden/tokenizer/specials.json).

use std::path::{Path, PathBuf};

use diffusiond::tokenizer::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    tokenizer_dir: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    id: usize,
    text: String,
    input_ids: Vec<i64>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(root().join("tests/golden/tokenizer/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A copy of a tokenizer folder with only the slow tokenizer's files, as an export
/// without tokenizer.json has.
fn slow_copy(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn check_all(tokenizer: &ClipTokenizer, golden: &Golden) {
    assert!(golden.cases.len() >= 30);
    for case in &golden.cases {
        let ids = tokenizer.encode(&case.text).unwrap();
        assert_eq!(ids, case.input_ids, "case {} {:?}", case.id, case.text);
    }
}

#[test]
fn fast_tokenizer_json_matches_clip_tokenizer_fast() {
    let g = golden();
    let tok = ClipTokenizer::from_dir(&root().join(&g.tokenizer_dir)).unwrap();
    assert_eq!(tok.max_length(), 77);
    check_all(&tok, &g);
}

#[test]
fn vocab_and_merges_alone_match_clip_tokenizer_fast() {
    let g = golden();
    let src: PathBuf = root().join(&g.tokenizer_dir);
    let dir = slow_copy(&src);
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    check_all(&tok, &g);
}

#[test]
fn over_long_prompt_is_cut_to_77_with_end_token() {
    let g = golden();
    let tok = ClipTokenizer::from_dir(&root().join(&g.tokenizer_dir)).unwrap();
    let long = "a photo of a cat ".repeat(40);
    let ids = tok.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(tok.untruncated_len(&long).unwrap() > 77);
}

#[test]
fn missing_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[derive(Deserialize)]
struct Specials {
    cases: Vec<SpecialCase>,
}

#[derive(Deserialize)]
struct SpecialCase {
    tokenizer_dir: String,
    text: String,
    fast: Vec<i64>,
    slow: Vec<i64>,
}

/// Special tokens in prompts (`!`, the pad token of SD2.x and SDXL's second tokenizer, is
/// id 0 there) give transformers' ids: onnx/golden_tokenizer_specials.py wrote them, from
/// each fixture tokenizer as exported (tokenizer.json) and from its slow files alone; and a
/// tokenizer.json stripped of those added tokens gives the same ids.
#[test]
fn special_tokens_in_prompts_match_transformers_with_and_without_tokenizer_json() {
    let text =
        std::fs::read_to_string(root().join("tests/golden/tokenizer/specials.json")).unwrap();
    let golden: Specials = serde_json::from_str(&text).unwrap();
    assert!(golden.cases.len() >= 30);
    assert!(golden.cases.iter().any(|c| c.fast.contains(&0)));
    let mut checked = 0;
    for dir in [
        "tiny-sd15/tokenizer",
        "tiny-sd2-v/tokenizer",
        "tiny-sdxl/tokenizer",
        "tiny-sdxl/tokenizer_2",
    ] {
        let src = root().join("onnx").join(dir);
        let fast = ClipTokenizer::from_dir(&src).unwrap();
        let slow_dir = slow_copy(&src);
        let slow = ClipTokenizer::from_dir(slow_dir.path()).unwrap();
        // A tokenizer.json whose added tokens lack the configured ones: transformers adds
        // them (checked with CLIPTokenizerFast), and so must we.
        let bare_dir = slow_copy(&src);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
                .unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"].as_str().is_some_and(|c| c.starts_with("<|")));
        std::fs::write(bare_dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let bare = ClipTokenizer::from_dir(bare_dir.path()).unwrap();
        for case in golden
            .cases
            .iter()
            .filter(|c| c.tokenizer_dir == format!("onnx/{dir}"))
        {
            assert_eq!(
                fast.encode(&case.text).unwrap(),
                case.fast,
                "{dir} fast {:?}",
                case.text
            );
            assert_eq!(
                slow.encode(&case.text).unwrap(),
                case.slow,
                "{dir} slow {:?}",
                case.text
            );
            assert_eq!(
                bare.encode(&case.text).unwrap(),
                case.fast,
                "{dir} tokenizer.json without its added tokens {:?}",
                case.text
            );
            checked += 1;
        }
    }
    assert_eq!(checked, golden.cases.len());
}
