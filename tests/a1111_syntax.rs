//! AUTOMATIC1111 prompt syntax against webui's rules as `onnx/golden_a1111.py` computes
//! them (`tests/golden/a1111/`): parsed segments, per-segment token ids, chunk ids and
//! weights for the fixture tokenizers (and for open_clip's ids, which webui uses on
//! SDXL's second encoder), and the weighted hidden states of the tiny SD1.5 encoder.

use std::collections::HashMap;
use std::path::PathBuf;

use diffusiond::prompt_syntax::{
    Chunk, ChunkSpec, Segment, apply_chunk_weights, chunk_segments, parse_attention,
};
use diffusiond::tokenizer::ClipTokenizer;
use ndarray::{Array3, Axis};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden() -> Value {
    let path = root().join("tests/golden/a1111/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The parsed cases (those that are no parse error).
fn parsed_cases(doc: &Value) -> impl Iterator<Item = &Value> {
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("pieces").is_some())
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(int).collect()
}

fn spec(entry: &Value) -> ChunkSpec {
    let comma = (!entry["comma"].is_null()).then(|| int(&entry["comma"]));
    ChunkSpec::new(
        int(&entry["bos"]),
        int(&entry["eos"]),
        int(&entry["pad"]),
        comma,
    )
}

fn golden_chunks(entry: &Value) -> Vec<Chunk> {
    let chunks = entry["chunks"].as_array().unwrap();
    let chunk = |c: &Value| Chunk {
        ids: ints(&c["ids"]),
        weights: c["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap() as f32)
            .collect(),
    };
    chunks.iter().map(chunk).collect()
}

fn segments(case: &Value) -> Vec<Segment> {
    parse_attention(case["text"].as_str().unwrap()).unwrap()
}

/// Token ids of `text` without start/end/padding (transformers' `add_special_tokens=False`).
/// `ClipTokenizer` only encodes padded 77-id windows, so each whitespace-separated word is
/// encoded on its own and cut out between the start token and the first end token. CLIP's
/// pre-tokenizer never joins across whitespace, so this equals encoding the whole text.
fn raw_ids(tok: &ClipTokenizer, bos: i64, eos: i64, text: &str) -> Vec<i64> {
    let word_ids = |word: &str| {
        let ids = tok.encode(word).unwrap();
        assert_eq!(ids[0], bos, "{word}");
        let end = ids.iter().position(|&id| id == eos).unwrap();
        assert!(end + 1 < ids.len(), "{word}: may have been truncated");
        ids[1..end].to_vec()
    };
    text.split_whitespace().flat_map(word_ids).collect()
}

/// A tokenizer callback answering with the golden ids of each piece text.
fn golden_ids(case: &Value, entry: &Value) -> HashMap<String, Vec<i64>> {
    let texts = case["pieces"].as_array().unwrap().iter();
    let ids = entry["piece_ids"].as_array().unwrap().iter();
    texts
        .zip(ids)
        .map(|(p, ids)| (p["text"].as_str().unwrap().to_string(), ints(ids)))
        .collect()
}

#[test]
fn parses_like_webui() {
    let doc = golden();
    for case in doc["cases"].as_array().unwrap() {
        let (name, text) = (&case["name"], case["text"].as_str().unwrap());
        if let Some(weight) = case.get("error_weight") {
            let err = parse_attention(text).expect_err(text).to_string();
            assert!(err.contains(weight.as_str().unwrap()), "{name}: {err}");
            continue;
        }
        let got: Vec<(String, u64)> = parse_attention(text)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_iter()
            .map(|s| (s.text, s.weight.to_bits()))
            .collect();
        let want: Vec<(String, u64)> = (case["pieces"].as_array().unwrap().iter())
            .map(|p| {
                let bits = p["weight_bits"].as_u64().unwrap();
                (p["text"].as_str().unwrap().to_string(), bits)
            })
            .collect();
        assert_eq!(got, want, "{name}: {text:?}");
    }
}

#[test]
fn tokenizes_and_chunks_like_webui_with_the_fixture_tokenizers() {
    let doc = golden();
    let mut tokenizers: HashMap<String, ClipTokenizer> = HashMap::new();
    let mut checked = 0;
    for case in parsed_cases(&doc) {
        for key in ["sd15", "sdxl_2"] {
            let entry = &case["tokenizers"][key];
            let dir = entry["dir"].as_str().unwrap();
            let tok = tokenizers
                .entry(dir.to_string())
                .or_insert_with(|| ClipTokenizer::from_dir(&root().join(dir)).unwrap());
            let spec = spec(entry);
            let name = format!("{} / {key}", case["name"]);
            let segments = segments(case);
            for (segment, want) in segments.iter().zip(entry["piece_ids"].as_array().unwrap()) {
                if !segment.is_break() {
                    let got = raw_ids(tok, spec.bos, spec.eos, &segment.text);
                    assert_eq!(got, ints(want), "{name}: {:?}", segment.text);
                }
            }
            let tokenize = |t: &str| Ok::<_, ()>(raw_ids(tok, spec.bos, spec.eos, t));
            let chunks = chunk_segments(&segments, &spec, tokenize).unwrap();
            assert_eq!(chunks, golden_chunks(entry), "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 70, "only {checked} cases");
}

#[test]
fn chunks_open_clip_ids_like_webui() {
    let doc = golden();
    for case in parsed_cases(&doc) {
        let entry = &case["tokenizers"]["sdxl_2_openclip"];
        let ids = golden_ids(case, entry);
        let tokenize = |t: &str| ids.get(t).cloned().ok_or(t.to_string());
        let chunks = chunk_segments(&segments(case), &spec(entry), tokenize).unwrap();
        assert_eq!(chunks, golden_chunks(entry), "{}", case["name"]);
    }
}

#[test]
fn weighted_hidden_states_match_webuis_torch_arithmetic() {
    let doc = golden();
    let dir = root().join("tests/golden/a1111");
    for set in doc["embeddings"].as_array().unwrap() {
        let name = set["case"].as_str().unwrap();
        let case = parsed_cases(&doc).find(|c| c["name"] == name).unwrap();
        let entry = &case["tokenizers"][set["tokenizer"].as_str().unwrap()];
        let ids = golden_ids(case, entry);
        let tokenize = |t: &str| ids.get(t).cloned().ok_or(t.to_string());
        let chunks = chunk_segments(&segments(case), &spec(entry), tokenize).unwrap();
        let read = |key: &str| -> Array3<f32> {
            ndarray_npy::read_npy(dir.join(set[key].as_str().unwrap())).unwrap()
        };
        let (raw, want) = (read("raw"), read("weighted"));
        assert_eq!(raw.len_of(Axis(0)), chunks.len(), "{name}");
        let width = raw.len_of(Axis(2));
        let mut got = raw
            .into_shape_with_order((chunks.len() * 77, width))
            .unwrap();
        apply_chunk_weights(got.view_mut(), &chunks).unwrap();
        let want = want.index_axis(Axis(0), 0);
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(want.iter()) {
            worst = worst.max((g - w).abs() / w.abs().max(1e-3));
        }
        // Exact up to torch's f32 summation order in the two means (an ulp or two).
        assert!(worst < 1e-6, "{name}: relative difference {worst}");
    }
}
