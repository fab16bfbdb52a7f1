//! Tests of [`WeightMap`] on the committed fixture graphs, against the modules their
//! `config.json` says they have.

use std::path::Path;

use serde_json::Value;

use super::*;
use crate::lora::onnx_graph::{Graph, Initializer, Node, TensorData, data_type};

fn load(dir: &str) -> (WeightMap, Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx").join(dir);
    let graph = Graph::open(&root.join("model.onnx")).unwrap();
    let config = std::fs::read_to_string(root.join("config.json")).unwrap();
    (
        WeightMap::from_graph(&graph),
        serde_json::from_str(&config).unwrap(),
    )
}

fn per_block(config: &Value, key: &str, blocks: usize) -> Vec<usize> {
    match &config[key] {
        Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as usize).collect(),
        v => vec![v.as_u64().unwrap() as usize; blocks],
    }
}

/// (module, torch shape, is a Linear) for every LoRA-able layer a UNet config implies.
fn expected_unet(c: &Value) -> Vec<(String, Vec<i64>, bool)> {
    let ch: Vec<i64> = c["block_out_channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let n = ch.len();
    let lpb = c["layers_per_block"].as_u64().unwrap() as usize;
    let cross = c["cross_attention_dim"].as_i64().unwrap();
    let linear_proj = c["use_linear_projection"].as_bool().unwrap();
    let tlpb = per_block(c, "transformer_layers_per_block", n);
    let types = |k: &str| -> Vec<bool> {
        c[k].as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().contains("CrossAttn"))
            .collect()
    };
    let (down_attn, up_attn) = (types("down_block_types"), types("up_block_types"));
    let ted = ch[0] * 4;
    let mut out = vec![
        ("time_embedding.linear_1".into(), vec![ted, ch[0]], true),
        ("time_embedding.linear_2".into(), vec![ted, ted], true),
    ];
    if c["addition_embed_type"] == "text_time" {
        let proj = c["projection_class_embeddings_input_dim"].as_i64().unwrap();
        out.push(("add_embedding.linear_1".into(), vec![ted, proj], true));
        out.push(("add_embedding.linear_2".into(), vec![ted, ted], true));
    }
    let resnet = |out: &mut Vec<_>, p: String, cin: i64, cout: i64| {
        out.push((format!("{p}.conv1"), vec![cout, cin, 3, 3], false));
        out.push((format!("{p}.conv2"), vec![cout, cout, 3, 3], false));
    };
    let attention = |out: &mut Vec<(String, Vec<i64>, bool)>, p: String, c: i64, layers: usize| {
        let proj = if linear_proj {
            vec![c, c]
        } else {
            vec![c, c, 1, 1]
        };
        out.push((format!("{p}.proj_in"), proj.clone(), linear_proj));
        out.push((format!("{p}.proj_out"), proj, linear_proj));
        for t in 0..layers {
            let b = format!("{p}.transformer_blocks.{t}");
            for (m, shape) in [
                ("attn1.to_q", vec![c, c]),
                ("attn1.to_k", vec![c, c]),
                ("attn1.to_v", vec![c, c]),
                ("attn1.to_out.0", vec![c, c]),
                ("attn2.to_q", vec![c, c]),
                ("attn2.to_k", vec![c, cross]),
                ("attn2.to_v", vec![c, cross]),
                ("attn2.to_out.0", vec![c, c]),
                ("ff.net.0.proj", vec![8 * c, c]),
                ("ff.net.2", vec![c, 4 * c]),
            ] {
                out.push((format!("{b}.{m}"), shape, true));
            }
        }
    };
    for b in 0..n {
        let cin = if b == 0 { ch[0] } else { ch[b - 1] };
        for l in 0..lpb {
            let rin = if l == 0 { cin } else { ch[b] };
            resnet(&mut out, format!("down_blocks.{b}.resnets.{l}"), rin, ch[b]);
            if down_attn[b] {
                attention(
                    &mut out,
                    format!("down_blocks.{b}.attentions.{l}"),
                    ch[b],
                    tlpb[b],
                );
            }
        }
    }
    let last = ch[n - 1];
    resnet(&mut out, "mid_block.resnets.0".into(), last, last);
    resnet(&mut out, "mid_block.resnets.1".into(), last, last);
    attention(&mut out, "mid_block.attentions.0".into(), last, tlpb[n - 1]);
    let rev: Vec<i64> = ch.iter().rev().copied().collect();
    for i in 0..n {
        let prev = if i == 0 { rev[0] } else { rev[i - 1] };
        for j in 0..=lpb {
            let skip = if j == lpb {
                rev[(i + 1).min(n - 1)]
            } else {
                rev[i]
            };
            let rin = if j == 0 { prev } else { rev[i] } + skip;
            resnet(&mut out, format!("up_blocks.{i}.resnets.{j}"), rin, rev[i]);
            if up_attn[i] {
                let layers = tlpb[n - 1 - i];
                attention(
                    &mut out,
                    format!("up_blocks.{i}.attentions.{j}"),
                    rev[i],
                    layers,
                );
            }
        }
    }
    out
}

fn expected_clip(c: &Value, projection: bool) -> Vec<(String, Vec<i64>, bool)> {
    let h = c["hidden_size"].as_i64().unwrap();
    let inter = c["intermediate_size"].as_i64().unwrap();
    let mut out = Vec::new();
    for l in 0..c["num_hidden_layers"].as_u64().unwrap() {
        let p = format!("text_model.encoder.layers.{l}");
        for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((format!("{p}.self_attn.{m}"), vec![h, h], true));
        }
        out.push((format!("{p}.mlp.fc1"), vec![inter, h], true));
        out.push((format!("{p}.mlp.fc2"), vec![h, inter], true));
    }
    if projection {
        let proj = c["projection_dim"].as_i64().unwrap();
        out.push(("text_projection".into(), vec![proj, h], true));
    }
    out
}

/// Every expected module is mapped with the expected torch shape and layout; returns
/// how many there were.
fn check(map: &WeightMap, expected: &[(String, Vec<i64>, bool)]) -> usize {
    for (module, shape, linear) in expected {
        let w = map.get(module).unwrap_or_else(|e| {
            panic!(
                "{module}: {e}; mapped: {:?}",
                map.iter().map(|w| &w.module).collect::<Vec<_>>()
            )
        });
        assert_eq!(&w.torch_shape(), shape, "{module} ({})", w.initializer);
        assert_eq!(w.data_type, data_type::FLOAT, "{module}");
        assert!(
            matches!(w.data, TensorData::Raw { .. }),
            "{module}: {:?}",
            w.data
        );
        if *linear && w.op_type == "MatMul" {
            assert_eq!(w.layout, Layout::Transposed, "{module}");
            assert!(
                w.initializer.starts_with("onnx::MatMul"),
                "{module}: {}",
                w.initializer
            );
        } else if *linear {
            assert_eq!(
                (w.op_type.as_str(), w.layout),
                ("Gemm", Layout::AsTorch),
                "{module}"
            );
            assert_eq!(w.initializer, format!("{module}.weight"));
        } else {
            assert_eq!(
                (w.op_type.as_str(), w.layout),
                ("Conv", Layout::AsTorch),
                "{module}"
            );
            assert_eq!(w.initializer, format!("{module}.weight"));
        }
    }
    expected.len()
}

#[test]
fn tiny_sd15_unet_maps_every_lora_layer() {
    let (map, config) = load("tiny-sd15/unet");
    let n = check(&map, &expected_unet(&config));
    assert_eq!(n, 66);
    // Plus conv_in, conv_out, 8 time_emb_proj, 5 conv_shortcut, 1 downsampler, 1 upsampler.
    assert_eq!(map.len(), 66 + 17);
    assert_eq!(
        map.shared().count(),
        0,
        "{:?}",
        map.shared().collect::<Vec<_>>()
    );
    // Convolutions keep their torch names, attention Linears are pre-transposed MatMuls.
    let q = map
        .get("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        .unwrap();
    assert_eq!(q.initializer, "onnx::MatMul_1628");
    assert_eq!(
        q.node,
        "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul"
    );
    // The non-square layers show the transpose: ff.net.0.proj is [in, out] = [32, 256].
    let ff = map
        .get("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")
        .unwrap();
    assert_eq!(ff.dims, vec![32, 256]);
    assert_eq!(ff.torch_shape(), vec![256, 32]);
}

#[test]
fn tiny_sd15_text_encoder_maps_every_lora_layer() {
    let (map, config) = load("tiny-sd15/text_encoder");
    assert_eq!(check(&map, &expected_clip(&config, false)), 12);
    let q = map
        .get("text_model.encoder.layers.0.self_attn.q_proj")
        .unwrap();
    assert_eq!(
        q.node,
        "/text_model/encoder/layers.0/self_attn/q_proj/MatMul"
    );
    assert_eq!(
        map.get("text_model.encoder.layers.1.mlp.fc1").unwrap().dims,
        vec![32, 64]
    );
    assert_eq!(
        map.shared().count(),
        0,
        "{:?}",
        map.shared().collect::<Vec<_>>()
    );
}

#[test]
fn tiny_sdxl_unet_maps_every_lora_layer() {
    let (map, config) = load("tiny-sdxl/unet");
    let n = check(&map, &expected_unet(&config));
    assert_eq!(n, 68);
    assert_eq!(
        map.shared().count(),
        0,
        "{:?}",
        map.shared().collect::<Vec<_>>()
    );
    // use_linear_projection: proj_in is a MatMul here, a 1x1 Conv in SD 1.5.
    let p = map.get("down_blocks.1.attentions.0.proj_in").unwrap();
    assert_eq!(
        (p.op_type.as_str(), p.layout),
        ("MatMul", Layout::Transposed)
    );
    // Cross-attention width 48 ≠ inner width 64: to_k is stored [48, 64].
    let k = map
        .get("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
        .unwrap();
    assert_eq!(
        (k.dims.clone(), k.torch_shape()),
        (vec![48, 64], vec![64, 48])
    );
}

#[test]
fn tiny_sdxl_text_encoders_map_every_lora_layer() {
    let (map, config) = load("tiny-sdxl/text_encoder");
    assert_eq!(check(&map, &expected_clip(&config, false)), 12);
    let (map, config) = load("tiny-sdxl/text_encoder_2");
    assert_eq!(check(&map, &expected_clip(&config, true)), 13);
    assert_eq!(map.shared().count(), 0);
}

fn init(name: &str, dims: &[i64]) -> Initializer {
    Initializer {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        data: TensorData::Raw { offset: 0, len: 0 },
    }
}

fn node(name: &str, op: &str, inputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op_type: op.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: vec![format!("{name}_out")],
        int_attributes: Vec::new(),
    }
}

#[test]
fn a_shared_initializer_is_refused_naming_both_layers() {
    let mut gemm = node("/time_embedding/linear_1/Gemm", "Gemm", &["t", "w_t", "b"]);
    gemm.int_attributes.push(("transB".into(), 1));
    let graph = Graph {
        path: "model.onnx".into(),
        nodes: vec![
            node("/a/attn1/to_k/MatMul", "MatMul", &["x", "onnx::MatMul_7"]),
            node("/a/attn1/to_v/MatMul", "MatMul", &["x", "Identity_3_out"]),
            node("Identity_3", "Identity", &["onnx::MatMul_7"]),
            node("/a/attn1/to_q/MatMul", "MatMul", &["x", "onnx::MatMul_8"]),
            node("/b/Gemm", "Gemm", &["x", "w_g"]),
            gemm,
        ],
        initializers: vec![
            init("onnx::MatMul_7", &[16, 8]),
            init("onnx::MatMul_8", &[16, 8]),
            init("w_g", &[16, 8]),
            init("w_t", &[32, 16]),
            init("b", &[32]),
        ],
    };
    let map = WeightMap::from_graph(&graph);
    assert_eq!(map.len(), 5);
    let err = map.get("a.attn1.to_k").unwrap_err();
    assert_eq!(
        err.to_string(),
        "model.onnx: module a.attn1.to_k's weight onnx::MatMul_7 is shared with a.attn1.to_v: \
         the exporter merged identical tensors, and changing one would change all"
    );
    assert!(matches!(
        map.get("a.attn1.to_v"),
        Err(TargetError::Shared { .. })
    ));
    let shared: Vec<_> = map.shared().collect();
    assert_eq!(
        shared,
        vec![(
            "onnx::MatMul_7",
            &["a.attn1.to_k".to_string(), "a.attn1.to_v".to_string()][..]
        )]
    );
    let q = map.get("a.attn1.to_q").unwrap();
    assert_eq!(q.torch_shape(), vec![8, 16]);
    // Gemm without transB holds [in, out], with transB as torch does.
    assert_eq!(map.get("b").unwrap().layout, Layout::Transposed);
    assert_eq!(
        map.get("time_embedding.linear_1").unwrap().layout,
        Layout::AsTorch
    );
    assert!(matches!(map.get("c"), Err(TargetError::NotFound { .. })));
    assert_eq!(
        map.by_flat_name("a_attn1_to_q").unwrap().module,
        "a.attn1.to_q"
    );
}
