//! T5 tokenizer parity with transformers' `T5TokenizerFast`, on the corpus in
//! tests/golden/tokenizer/t5_cases.json (written by onnx/make_t5_tokenizer.py for the
//! fixture onnx/t5-tokenizer): ids and attention mask padded and truncated to 256 and
//! 512 (and 77 for a few cases), the untruncated token count, and the text a cut removes.
//! Controls show the comparison catches near misses: another length, and a copy of the
//! tokenizer with one vocabulary score changed.

use std::collections::BTreeMap;
use std::path::Path;

use diffusiond::tokenizer::t5::T5Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    tokenizer_dir: String,
    pad_id: i64,
    eos_id: i64,
    unk_id: i64,
    sha256: BTreeMap<String, String>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    untruncated_ids: Vec<i64>,
    tokens: Vec<String>,
    padded: BTreeMap<String, Padded>,
}

#[derive(Deserialize)]
struct Padded {
    input_ids: Vec<i64>,
    attention_mask: Vec<i64>,
    removed_text: Option<String>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn golden() -> Golden {
    let text =
        std::fs::read_to_string(root().join("tests/golden/tokenizer/t5_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fixture(g: &Golden) -> T5Tokenizer {
    T5Tokenizer::from_dir(&root().join(&g.tokenizer_dir)).unwrap()
}

/// The goldens were written for the committed fixture files (a regenerated fixture
/// needs regenerated goldens: onnx/make_t5_tokenizer.py writes both).
#[test]
fn goldens_belong_to_the_fixture_files() {
    use sha2::{Digest, Sha256};
    let g = golden();
    assert_eq!(g.sha256.len(), 3);
    for (name, want) in &g.sha256 {
        let bytes = std::fs::read(root().join(&g.tokenizer_dir).join(name)).unwrap();
        let got: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&got, want, "{name}");
    }
}

#[test]
fn special_ids_match_transformers() {
    let g = golden();
    let t = fixture(&g);
    assert_eq!(t.pad_id(), g.pad_id);
    assert_eq!(t.eos_id(), g.eos_id);
    assert_eq!(t.unk_id(), Some(g.unk_id));
    assert_eq!(t.model_max_length(), Some(512));
}

#[test]
fn every_case_matches_t5_tokenizer_fast() {
    let g = golden();
    let t = fixture(&g);
    assert!(g.cases.len() >= 30);
    let mut checked = 0;
    for case in &g.cases {
        assert_eq!(
            t.count(&case.text).unwrap(),
            case.untruncated_ids.len(),
            "{} {:?}: untruncated length",
            case.name,
            case.text
        );
        for (len, want) in &case.padded {
            let len: usize = len.parse().unwrap();
            let (ids, mask) = t.encode(&case.text, len).unwrap();
            assert_eq!(
                ids, want.input_ids,
                "{} at {len}: ids {:?}",
                case.name, case.tokens
            );
            assert_eq!(mask, want.attention_mask, "{} at {len}: mask", case.name);
            assert_eq!(
                t.removed_text(&case.text, len).unwrap(),
                want.removed_text,
                "{} at {len}: removed text",
                case.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 2 * g.cases.len());
}

#[test]
fn goldens_cover_truncation_at_both_lengths() {
    let g = golden();
    let cut = |len: &str| {
        g.cases
            .iter()
            .filter(|c| c.padded.get(len).is_some_and(|p| p.removed_text.is_some()))
            .count()
    };
    assert!(
        cut("256") >= 3 && cut("512") >= 3,
        "too few over-long cases"
    );
    // A prompt exactly as long as the sequence is not cut.
    let exact = g.cases.iter().find(|c| c.name == "a_times_255").unwrap();
    assert_eq!(exact.untruncated_ids.len(), 256);
    assert!(exact.padded["256"].removed_text.is_none());
}

/// Control: the same prompt at a length one shorter differs from the golden (the cut and
/// the position of `</s>` are checked, not only a prefix).
#[test]
fn control_another_length_differs() {
    let g = golden();
    let t = fixture(&g);
    // 511 "a" and `</s>`: exactly 512 tokens, not cut at 512.
    let case = g.cases.iter().find(|c| c.name == "a_times_511").unwrap();
    let want = &case.padded["512"];
    let (ids, _) = t.encode(&case.text, 512).unwrap();
    assert_eq!(ids, want.input_ids);
    let (mut shorter, mut mask) = t.encode(&case.text, 511).unwrap();
    assert_eq!(shorter[510], g.eos_id);
    shorter.push(g.pad_id);
    mask.push(0);
    assert_ne!(shorter, want.input_ids);
    assert_ne!(mask, want.attention_mask);
    // 256 "a" and `</s>` at 256: cut, the last kept slot is `</s>`, not text.
    let case = g.cases.iter().find(|c| c.name == "a_times_256").unwrap();
    let (cut, mask) = t.encode(&case.text, 256).unwrap();
    assert_eq!(cut[255], g.eos_id);
    assert_eq!(cut, case.padded["256"].input_ids);
    assert!(mask.iter().all(|&m| m == 1));
    assert_ne!(&cut[..], &case.padded["512"].input_ids[..256]);
}

/// Control: a copy of the fixture whose vocabulary gives one piece a better score
/// tokenizes some golden prompt differently, and the comparison sees it.
#[test]
fn control_one_changed_vocab_score_is_caught() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let src = root().join(&g.tokenizer_dir);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("tokenizer.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // "a castle ..." tokenizes as "▁a", "▁", "castle", ...: make the piece "castle"
    // nearly impossible, so the Unigram model must split the word differently.
    let vocab = doc["model"]["vocab"].as_array_mut().unwrap();
    let index = vocab
        .iter()
        .position(|p| p[0] == "castle")
        .expect("fixture vocabulary has 'castle'");
    vocab[index][1] = serde_json::json!(-1000.0);
    std::fs::write(&path, doc.to_string()).unwrap();

    let changed = T5Tokenizer::from_dir(dir.path()).unwrap();
    let original = fixture(&g);
    let case = g.cases.iter().find(|c| c.name == "ascii").unwrap();
    let want = &case.padded["256"].input_ids;
    assert_eq!(&original.encode(&case.text, 256).unwrap().0, want);
    let (ids, _) = changed.encode(&case.text, 256).unwrap();
    assert_ne!(&ids, want, "a changed vocabulary score went unnoticed");
    let differing = g
        .cases
        .iter()
        .filter(|c| changed.encode(&c.text, 512).unwrap().0 != c.padded["512"].input_ids)
        .count();
    assert!(differing >= 1);
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let e = T5Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "[").unwrap();
    let e = T5Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
}
