//! Tests of the safetensors header reader and layer grouping, on small files written here,
//! checked against the tiny SDXL UNet's weights.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;
use crate::lora::keys::UnetBlocks;
use crate::lora::onnx_graph::Graph;
use crate::lora::targets::WeightMap;

/// Writes a safetensors file of F32 zeros (alphas hold `rank`) with these tensors.
fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (key, shape) in tensors {
        let n: usize = shape.iter().product();
        let begin = data.len();
        for _ in 0..n {
            data.extend_from_slice(&4f32.to_le_bytes());
        }
        header.insert(
            key.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    header.insert(
        "__metadata__".into(),
        json!({"ss_network_dim": "4", "ss_base_model_version": "sdxl_base_v1-0"}),
    );
    let json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn sdxl() -> (KeyMapper, WeightMap) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sdxl/unet");
    let blocks = UnetBlocks::from_config_file(&root.join("config.json")).unwrap();
    let graph = Graph::open(&root.join("model.onnx")).unwrap();
    (KeyMapper::new(Some(blocks)), WeightMap::from_graph(&graph))
}

const TO_K: &str = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
const CONV: &str = "lora_unet_input_blocks_1_0_in_layers_2";
const TO_Q: &str = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";

#[test]
fn groups_kohya_and_peft_tensors_into_layers_that_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "mix.safetensors",
        &[
            (&format!("{TO_K}.lora_down.weight"), vec![4, 48]),
            (&format!("{TO_K}.lora_up.weight"), vec![64, 4]),
            (&format!("{TO_K}.alpha"), vec![]),
            (&format!("{CONV}.lora_down.weight"), vec![2, 32, 3, 3]),
            (&format!("{CONV}.lora_up.weight"), vec![32, 2, 1, 1]),
            (&format!("{TO_Q}.lora_A.weight"), vec![8, 64]),
            (&format!("{TO_Q}.lora_B.weight"), vec![64, 8]),
        ],
    );
    let header = Header::read(&path).unwrap();
    assert_eq!(header.tensors.len(), 7);
    assert_eq!(header.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    let up = &header.tensors[&format!("{TO_K}.lora_up.weight")];
    assert_eq!(
        (up.dtype.as_str(), up.bytes.1 - up.bytes.0),
        ("F32", 64 * 4 * 4)
    );
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[up.bytes.0 as usize..][..4], &4f32.to_le_bytes());

    let (mapper, weights) = sdxl();
    let layers = layers(&header, &mapper).unwrap();
    let summary: Vec<_> = layers
        .iter()
        .map(|l| {
            (
                l.module.as_str(),
                l.rank,
                l.alpha.is_some(),
                l.delta_shape(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "down_blocks.0.resnets.0.conv1",
                2,
                false,
                vec![32, 32, 3, 3]
            ),
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                8,
                false,
                vec![64, 64]
            ),
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                4,
                true,
                vec![64, 48]
            ),
        ]
    );
    for layer in &layers {
        layer
            .check_fits(weights.get(&layer.module).unwrap(), &path)
            .unwrap();
    }
    // The delta of attn2.to_k is [64, 48]; the graph stores the weight transposed, [48, 64].
    let k = weights.get(&layers[2].module).unwrap();
    assert_eq!(k.dims, vec![48, 64]);
    // A layer trained for another model does not fit: to_k's delta against to_q's weight.
    let q = weights.get(&layers[1].module).unwrap();
    let err = layers[2].check_fits(q, &path).unwrap_err().to_string();
    assert!(
        err.contains("layer down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k (unet)"),
        "{err}"
    );
    assert!(err.contains("the LoRA's delta is [64, 48]"), "{err}");
}

#[test]
fn bad_layers_are_refused_naming_the_file_and_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (mapper, _) = sdxl();
    let check = |name: &str, tensors: &[(&str, Vec<usize>)], expected: &str| {
        let path = write(dir.path(), name, tensors);
        let err = layers(&Header::read(&path).unwrap(), &mapper)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(expected), "{name}: {err}");
    };
    check(
        "no_up.safetensors",
        &[(&format!("{TO_K}.lora_down.weight"), vec![4, 48])],
        "no up (lora_up / lora_B) tensor",
    );
    check(
        "rank.safetensors",
        &[
            (&format!("{TO_K}.lora_down.weight"), vec![4, 48]),
            (&format!("{TO_K}.lora_up.weight"), vec![64, 8]),
        ],
        "disagree on the rank",
    );
    check(
        "alpha.safetensors",
        &[
            (&format!("{TO_K}.lora_down.weight"), vec![4, 48]),
            (&format!("{TO_K}.lora_up.weight"), vec![64, 4]),
            (&format!("{TO_K}.alpha"), vec![2]),
        ],
        "not a scalar",
    );
    check(
        "twice.safetensors",
        &[
            (
                "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
                vec![4, 48],
            ),
            (&format!("{TO_K}.lora_down.weight"), vec![4, 48]),
            (&format!("{TO_K}.lora_up.weight"), vec![64, 4]),
        ],
        "name the same tensor",
    );
    check(
        "loha.safetensors",
        &[(&format!("{TO_K}.hada_w1_a"), vec![4, 48])],
        "LoHa (LyCORIS) is not supported",
    );
    check(
        "vae.safetensors",
        &[("lora_vae_conv_in.lora_down.weight", vec![4, 4])],
        "lora_vae_conv_in.lora_down.weight",
    );
}

/// A header announcing 8 bytes for a tensor, followed by only 4.
fn short_tensor() -> Vec<u8> {
    let json = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.extend_from_slice(&[0; 4]);
    bytes
}

#[test]
fn malformed_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    for (bytes, expected) in [
        (vec![1, 2, 3], "too short for a header"),
        (
            vec![200, 0, 0, 0, 0, 0, 0, 0, b'{', b'}'],
            "invalid header length",
        ),
        (b"\x02\0\0\0\0\0\0\0[]".to_vec(), "invalid JSON in header"),
        (
            short_tensor(),
            "incomplete metadata, file not fully covered",
        ),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let err = Header::read(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: not a valid safetensors file", path.display())),
            "{err}"
        );
        assert!(err.contains(expected), "{err}");
    }
    let err = Header::read(&dir.path().join("missing.safetensors")).unwrap_err();
    assert!(matches!(err, FileError::Io { .. }));
}
