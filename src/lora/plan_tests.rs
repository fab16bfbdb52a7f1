//! Tests of the alpha rules and of the refusals a plan makes, on small files written here
//! against the tiny SD 1.5 fixture.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

/// Writes a safetensors file with these (key, shape, value) tensors and metadata.
fn write(
    dir: &Path,
    name: &str,
    tensors: &[(&str, Vec<usize>, f32)],
    meta: serde_json::Value,
) -> PathBuf {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (key, shape, value) in tensors {
        let n: usize = shape.iter().product();
        let begin = data.len();
        for _ in 0..n {
            data.extend_from_slice(&value.to_le_bytes());
        }
        header.insert(
            key.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    header.insert("__metadata__".into(), meta);
    let json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

const Q: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
const FC1: &str = "lora_te_text_model_encoder_layers_0_mlp_fc1";
const PQ: &str = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
const PFC1: &str = "text_encoder.text_model.encoder.layers.0.mlp.fc1";

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sd15")
}

/// The alphas the plan of one file gives, or its error.
fn alphas(path: &Path) -> Result<Vec<f64>, String> {
    let spec = LoraSpec::from_path(path, 1.0);
    plan(&model(), &[spec])
        .map(|p| p.files[0].alphas.clone())
        .map_err(|e| e.to_string())
}

#[test]
fn alphas_follow_kohya_and_diffusers_where_they_agree() {
    let dir = tempfile::tempdir().unwrap();
    // kohya: each layer's own alpha.
    let f = write(
        dir.path(),
        "alphas.safetensors",
        &[
            (&format!("{Q}.lora_down.weight"), vec![4, 32], 0.1),
            (&format!("{Q}.lora_up.weight"), vec![32, 4], 0.1),
            (&format!("{Q}.alpha"), vec![], 2.0),
            (&format!("{FC1}.lora_down.weight"), vec![2, 32], 0.1),
            (&format!("{FC1}.lora_up.weight"), vec![64, 2], 0.1),
            (&format!("{FC1}.alpha"), vec![], 8.0),
        ],
        json!({}),
    );
    let mut a = alphas(&f).unwrap();
    a.sort_by(f64::total_cmp);
    assert_eq!(a, [2.0, 8.0]);
    // No alpha and one rank: alpha = rank.
    let f = write(
        dir.path(),
        "peft.safetensors",
        &[
            (&format!("{PQ}.lora_A.weight"), vec![4, 32], 0.1),
            (&format!("{PQ}.lora_B.weight"), vec![32, 4], 0.1),
            (&format!("{PFC1}.lora_A.weight"), vec![4, 32], 0.1),
            (&format!("{PFC1}.lora_B.weight"), vec![64, 4], 0.1),
        ],
        json!({}),
    );
    assert_eq!(alphas(&f).unwrap(), [4.0, 4.0]);
    // diffusers' saved adapter metadata.
    let meta = json!({"lora_adapter_metadata": json!({
        "text_encoder.r": 4, "text_encoder.lora_alpha": 16,
        "text_encoder.rank_pattern": {}, "text_encoder.alpha_pattern": {}
    }).to_string()});
    let f = write(
        dir.path(),
        "meta.safetensors",
        &[
            (&format!("{PQ}.lora_A.weight"), vec![4, 32], 0.1),
            (&format!("{PQ}.lora_B.weight"), vec![32, 4], 0.1),
        ],
        meta,
    );
    assert_eq!(alphas(&f).unwrap(), [16.0]);
}

#[test]
fn alphas_diffusers_would_guess_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            write(
                dir.path(),
                "some-alphas.safetensors",
                &[
                    (&format!("{Q}.lora_down.weight"), vec![4, 32], 0.1),
                    (&format!("{Q}.lora_up.weight"), vec![32, 4], 0.1),
                    (&format!("{Q}.alpha"), vec![], 2.0),
                    (&format!("{FC1}.lora_down.weight"), vec![4, 32], 0.1),
                    (&format!("{FC1}.lora_up.weight"), vec![64, 4], 0.1),
                ],
                json!({}),
            ),
            "some layers have an alpha and text_model.encoder.layers.0.mlp.fc1 has none",
        ),
        (
            write(
                dir.path(),
                "ranks.safetensors",
                &[
                    (&format!("{PQ}.lora_A.weight"), vec![4, 32], 0.1),
                    (&format!("{PQ}.lora_B.weight"), vec![32, 4], 0.1),
                    (&format!("{PFC1}.lora_A.weight"), vec![2, 32], 0.1),
                    (&format!("{PFC1}.lora_B.weight"), vec![64, 2], 0.1),
                ],
                json!({}),
            ),
            "PEFT layers of ranks {2, 4} without alphas",
        ),
        (
            write(
                dir.path(),
                "pattern.safetensors",
                &[
                    (&format!("{PQ}.lora_A.weight"), vec![4, 32], 0.1),
                    (&format!("{PQ}.lora_B.weight"), vec![32, 4], 0.1),
                ],
                json!({"lora_adapter_metadata": json!({
                    "text_encoder.r": 4, "text_encoder.lora_alpha": 4,
                    "text_encoder.rank_pattern": {"q_proj": 8}
                }).to_string()}),
            ),
            "per-module rank or alpha patterns",
        ),
    ];
    for (path, want) in cases {
        let err = alphas(&path).unwrap_err();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(want), "{err} should say {want}");
    }
}

#[test]
fn keys_that_miss_the_model_or_its_components_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let missing = write(
        dir.path(),
        "missing.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_attentions_7_proj_in.lora_down.weight",
                vec![4, 32],
                0.1,
            ),
            (
                "lora_unet_down_blocks_0_attentions_7_proj_in.lora_up.weight",
                vec![32, 4],
                0.1,
            ),
        ],
        json!({}),
    );
    let err = alphas(&missing).unwrap_err();
    assert!(
        err.contains("key lora_unet_down_blocks_0_attentions_7_proj_in.lora_down.weight names down_blocks.0.attentions.7.proj_in in unet"),
        "{err}"
    );
    let te2 = write(
        dir.path(),
        "te2.safetensors",
        &[
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                vec![4, 32],
                0.1,
            ),
            (
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                vec![64, 4],
                0.1,
            ),
        ],
        json!({}),
    );
    let err = alphas(&te2).unwrap_err();
    assert!(
        err.contains("has layers for text_encoder_2, which the model"),
        "{err}"
    );
    let empty = write(dir.path(), "empty.safetensors", &[], json!({}));
    assert!(alphas(&empty).unwrap_err().contains("holds no LoRA layers"));
    // A file whose second tensor is a LyCORIS one: nothing of it is used.
    let loha = write(
        dir.path(),
        "loha.safetensors",
        &[(&format!("{Q}.hada_w1_a"), vec![4, 32], 0.1)],
        json!({}),
    );
    let err = alphas(&loha).unwrap_err();
    assert!(err.contains("LoHa"), "{err}");
}
