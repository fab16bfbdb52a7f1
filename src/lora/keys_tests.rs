//! Tests of LoRA key mapping: key lists for each format, SGM block numbers against three
//! UNet configs, and every SGM key of the tiny SDXL fixture resolving to a graph weight.

use std::path::Path;

use super::*;
use crate::lora::onnx_graph::Graph;
use crate::lora::targets::WeightMap;

fn mapper(config: &str) -> KeyMapper {
    let value: Value = serde_json::from_str(config).unwrap();
    KeyMapper::new(Some(UnetBlocks::from_config(&value).unwrap()))
}

fn tiny_sdxl() -> KeyMapper {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sdxl/unet/config.json");
    KeyMapper::new(Some(UnetBlocks::from_config_file(&path).unwrap()))
}

const SDXL: &str = r#"{"layers_per_block": 2,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}"#;
const SD15: &str = r#"{"layers_per_block": 2,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;

fn module(m: &KeyMapper, key: &str) -> (Component, String, Part) {
    let k = m.map(key).unwrap_or_else(|e| panic!("{e}"));
    (k.component, k.module, k.part)
}

#[test]
fn kohya_keys_with_diffusers_names() {
    let m = KeyMapper::default();
    let unet = |key: &str, path: &str, part: Part| {
        assert_eq!(
            module(&m, key),
            (Component::Unet, path.to_string(), part),
            "{key}"
        );
        assert_eq!(m.map(key).unwrap().format, KeyFormat::Kohya);
    };
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0";
    unet(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        &format!("{attn}.attn1.to_q"),
        Part::Down,
    );
    unet(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
        &format!("{attn}.attn1.to_q"),
        Part::Up,
    );
    unet(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        &format!("{attn}.attn1.to_q"),
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha",
        &format!("{attn}.attn2.to_out.0"),
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha",
        &format!("{attn}.ff.net.0.proj"),
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.alpha",
        &format!("{attn}.ff.net.2"),
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
        "down_blocks.0.attentions.0.proj_in",
        Part::Alpha,
    );
    unet(
        "lora_unet_up_blocks_1_attentions_2_proj_out.alpha",
        "up_blocks.1.attentions.2.proj_out",
        Part::Alpha,
    );
    unet(
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.alpha",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight",
        "down_blocks.1.resnets.0.conv1",
        Part::Down,
    );
    unet(
        "lora_unet_up_blocks_0_resnets_2_conv_shortcut.alpha",
        "up_blocks.0.resnets.2.conv_shortcut",
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj.alpha",
        "down_blocks.1.resnets.0.time_emb_proj",
        Part::Alpha,
    );
    unet(
        "lora_unet_down_blocks_0_downsamplers_0_conv.alpha",
        "down_blocks.0.downsamplers.0.conv",
        Part::Alpha,
    );
    unet(
        "lora_unet_up_blocks_0_upsamplers_0_conv.alpha",
        "up_blocks.0.upsamplers.0.conv",
        Part::Alpha,
    );
    unet(
        "lora_unet_time_embedding_linear_1.alpha",
        "time_embedding.linear_1",
        Part::Alpha,
    );
    unet(
        "lora_unet_add_embedding_linear_2.alpha",
        "add_embedding.linear_2",
        Part::Alpha,
    );
    unet("lora_unet_conv_in.alpha", "conv_in", Part::Alpha);
}

#[test]
fn kohya_text_encoder_keys() {
    let m = KeyMapper::default();
    let layer = "text_model.encoder.layers.0";
    for (key, component, path) in [
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            Component::TextEncoder,
            format!("{layer}.self_attn.q_proj"),
        ),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight",
            Component::TextEncoder,
            format!("{layer}.self_attn.out_proj"),
        ),
        (
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            Component::TextEncoder,
            format!("{layer}.mlp.fc1"),
        ),
        (
            "lora_te2_text_model_encoder_layers_0_mlp_fc2.lora_up.weight",
            Component::TextEncoder2,
            format!("{layer}.mlp.fc2"),
        ),
        (
            "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight",
            Component::TextEncoder2,
            format!("{layer}.self_attn.v_proj"),
        ),
        (
            "lora_te2_text_projection.lora_up.weight",
            Component::TextEncoder2,
            "text_projection".to_string(),
        ),
    ] {
        assert_eq!(m.map(key).unwrap().component, component, "{key}");
        assert_eq!(m.map(key).unwrap().module, path, "{key}");
    }
}

#[test]
fn peft_and_diffusers_keys() {
    let m = KeyMapper::default();
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    for (key, component, path, part) in [
        (format!("unet.{q}.lora_A.weight"), Component::Unet, q.to_string(), Part::Down),
        (format!("unet.{q}.lora_B.weight"), Component::Unet, q.to_string(), Part::Up),
        (format!("unet.{q}.lora.down.weight"), Component::Unet, q.to_string(), Part::Down),
        (format!("unet.{q}.lora.up.weight"), Component::Unet, q.to_string(), Part::Up),
        (format!("unet.{q}.alpha"), Component::Unet, q.to_string(), Part::Alpha),
        (
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight".into(),
            Component::Unet,
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0".into(),
            Part::Down,
        ),
        (
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.up.weight".into(),
            Component::Unet,
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k".into(),
            Part::Up,
        ),
        (
            "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_linear_layer.down.weight".into(),
            Component::TextEncoder,
            "text_model.encoder.layers.1.self_attn.k_proj".into(),
            Part::Down,
        ),
        (
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight".into(),
            Component::TextEncoder2,
            "text_model.encoder.layers.0.mlp.fc1".into(),
            Part::Up,
        ),
        ("text_encoder_2.text_projection.lora_A.weight".into(), Component::TextEncoder2, "text_projection".into(), Part::Down),
    ] {
        let k = m.map(&key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((k.component, k.module, k.part, k.format), (component, path, part, KeyFormat::Peft), "{key}");
    }
}

#[test]
fn other_adapters_are_refused_by_name() {
    let m = KeyMapper::default();
    for (key, kind) in [
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            "LoHa (LyCORIS)",
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1",
            "LoKr (LyCORIS)",
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale",
            "DoRA",
        ),
        (
            "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector",
            "DoRA",
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight",
            "LoCon with a CP-decomposed (Tucker) middle weight",
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_conv1.diff",
            "a full weight difference (LyCORIS full)",
        ),
        ("lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks", "OFT"),
    ] {
        let err = m.map(key).unwrap_err();
        assert_eq!(
            err,
            KeyError::Unsupported {
                key: key.into(),
                kind
            },
            "{key}"
        );
        assert_eq!(
            err.to_string(),
            format!("LoRA key {key}: {kind} is not supported, only plain LoRA (and LoCon) is")
        );
    }
    for key in [
        "lora_unet_down_blocks_0_attentions_0_proj_in.weight",
        "lora_vae_decoder_conv_in.lora_down.weight",
        "lora_unet_.alpha",
        "model.diffusion_model.input_blocks.1.0.weight",
        "unet.down_blocks.0.attentions.0.proj_in.down.weight",
        "unet..lora_A.weight",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight",
    ] {
        let err = m.map(key).unwrap_err();
        assert_eq!(err, KeyError::Unknown { key: key.into() }, "{key}");
        assert!(err.to_string().contains(key));
    }
    let sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha";
    assert_eq!(
        m.map(sgm).unwrap_err(),
        KeyError::SgmWithoutConfig { key: sgm.into() }
    );
}

#[test]
fn sgm_blocks_map_by_the_full_size_sdxl_config() {
    let m = mapper(SDXL);
    for (sgm, diffusers) in [
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "input_blocks_5_1_proj_in",
            "down_blocks.1.attentions.1.proj_in",
        ),
        (
            "input_blocks_8_1_transformer_blocks_9_ff_net_2",
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        ),
        (
            "input_blocks_1_0_in_layers_2",
            "down_blocks.0.resnets.0.conv1",
        ),
        ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks_6_0_op", "down_blocks.1.downsamplers.0.conv"),
        (
            "input_blocks_7_0_skip_connection",
            "down_blocks.2.resnets.0.conv_shortcut",
        ),
        (
            "middle_block_0_emb_layers_1",
            "mid_block.resnets.0.time_emb_proj",
        ),
        (
            "middle_block_1_transformer_blocks_3_attn2_to_k",
            "mid_block.attentions.0.transformer_blocks.3.attn2.to_k",
        ),
        ("middle_block_2_out_layers_3", "mid_block.resnets.1.conv2"),
        (
            "output_blocks_0_1_transformer_blocks_0_attn2_to_v",
            "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        ),
        ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        (
            "output_blocks_5_1_proj_out",
            "up_blocks.1.attentions.2.proj_out",
        ),
        ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
        (
            "output_blocks_8_0_skip_connection",
            "up_blocks.2.resnets.2.conv_shortcut",
        ),
        ("time_embed_0", "time_embedding.linear_1"),
        ("label_emb_0_2", "add_embedding.linear_2"),
        ("out_2", "conv_out"),
    ] {
        let key = format!("lora_unet_{sgm}.lora_down.weight");
        assert_eq!(
            module(&m, &key),
            (Component::Unet, diffusers.to_string(), Part::Down),
            "{key}"
        );
    }
    for sgm in [
        "input_blocks_1_1_proj_in",
        "input_blocks_9_0_in_layers_2",
        "input_blocks_2_0_op",
        "output_blocks_9_0_in_layers_2",
        "output_blocks_8_1_conv",
        "output_blocks_6_1_proj_in",
        "middle_block_3_in_layers_2",
        "middle_block_0_norm",
        "input_blocks_x_1_proj_in",
    ] {
        let key = format!("lora_unet_{sgm}.alpha");
        let err = m.map(&key).unwrap_err();
        assert!(
            matches!(&err, KeyError::SgmBlock { key: k, .. } if *k == key),
            "{key}: {err:?}"
        );
    }
}

#[test]
fn sgm_blocks_map_by_the_sd15_config() {
    // SD 1.5's first up block has no attention: its upsampler is inner index 1.
    let m = mapper(SD15);
    for (sgm, diffusers) in [
        ("output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv"),
        (
            "output_blocks_3_1_transformer_blocks_0_attn1_to_q",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
        (
            "output_blocks_11_1_proj_out",
            "up_blocks.3.attentions.2.proj_out",
        ),
        (
            "input_blocks_11_0_out_layers_3",
            "down_blocks.3.resnets.1.conv2",
        ),
        ("input_blocks_9_0_op", "down_blocks.2.downsamplers.0.conv"),
    ] {
        let key = format!("lora_unet_{sgm}.lora_up.weight");
        assert_eq!(module(&m, &key).1, diffusers, "{key}");
    }
    assert!(m.map("lora_unet_input_blocks_10_1_proj_in.alpha").is_err());
    assert!(m.map("lora_unet_output_blocks_11_2_conv.alpha").is_err());
}

#[test]
fn every_sgm_key_of_the_tiny_sdxl_unet_finds_its_weight() {
    let m = tiny_sdxl();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sdxl/unet/model.onnx");
    let weights = WeightMap::from_graph(&Graph::open(&path).unwrap());
    let t = "transformer_blocks_0";
    let keys = [
        ("input_blocks_0_0", "conv_in"),
        (
            "input_blocks_1_0_in_layers_2",
            "down_blocks.0.resnets.0.conv1",
        ),
        ("input_blocks_2_0_op", "down_blocks.0.downsamplers.0.conv"),
        (
            "input_blocks_3_0_skip_connection",
            "down_blocks.1.resnets.0.conv_shortcut",
        ),
        (
            "input_blocks_3_1_proj_in",
            "down_blocks.1.attentions.0.proj_in",
        ),
        (
            &format!("input_blocks_3_1_{t}_attn2_to_k"),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        ),
        (
            "middle_block_0_emb_layers_1",
            "mid_block.resnets.0.time_emb_proj",
        ),
        (
            &format!("middle_block_1_{t}_ff_net_0_proj"),
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        ),
        ("middle_block_2_out_layers_3", "mid_block.resnets.1.conv2"),
        (
            &format!("output_blocks_1_1_{t}_attn1_to_out_0"),
            "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
        ),
        ("output_blocks_1_2_conv", "up_blocks.0.upsamplers.0.conv"),
        (
            "output_blocks_3_0_out_layers_3",
            "up_blocks.1.resnets.1.conv2",
        ),
        (
            "output_blocks_3_0_skip_connection",
            "up_blocks.1.resnets.1.conv_shortcut",
        ),
        ("time_embed_2", "time_embedding.linear_2"),
        ("label_emb_0_0", "add_embedding.linear_1"),
        ("out_2", "conv_out"),
    ];
    for (sgm, diffusers) in keys {
        let key = format!("lora_unet_{sgm}.lora_down.weight");
        let mapped = module(&m, &key).1;
        assert_eq!(mapped, diffusers, "{key}");
        assert!(
            weights.get(&mapped).is_ok(),
            "{key}: {mapped} is not in the graph"
        );
    }
    // The last up block has no upsampler, the first down block no attention.
    assert!(m.map("lora_unet_output_blocks_3_1_conv.alpha").is_err());
    assert!(m.map("lora_unet_input_blocks_1_1_proj_in.alpha").is_err());
}
