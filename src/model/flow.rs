//! What a transformer (flow-matching) model folder says of itself: Stable Diffusion 3/3.5
//! and FLUX.1 as Optimum exports them (`transformer/` in place of `unet/`; SD3's T5 in
//! `text_encoder_3/`, FLUX's in `text_encoder_2/`), read from `transformer/config.json`.

use std::path::Path;

use serde::Deserialize;

use super::memory::{MemoryProfile, VaeShape};
use super::{ModelError, PipelineKind, read_json};

/// Image side of the pipelines' default sample size (diffusers' `default_sample_size` 128
/// latent cells, when the transformer config has no `sample_size`), in latent cells.
const DEFAULT_SAMPLE_SIZE: usize = 128;

/// Latent channels of SD3's and FLUX's VAE.
pub const LATENT_CHANNELS: usize = 16;

/// The T5 sequence length a request gets by default (`max_sequence_length`): 256 for SD3
/// and schnell-style FLUX (what FLUX.1-schnell was distilled with), 512 for a dev-style
/// FLUX model (`guidance_embeds`).
pub fn default_sequence_length(kind: PipelineKind, guidance_embeds: bool) -> usize {
    match kind {
        PipelineKind::Flux if guidance_embeds => 512,
        _ => 256,
    }
}

/// The longest T5 sequence the pipelines accept (they raise above it).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

#[derive(Debug, Deserialize)]
struct TransformerConfig {
    #[serde(default)]
    sample_size: Option<usize>,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    num_attention_heads: Option<u64>,
    #[serde(default)]
    attention_head_dim: Option<u64>,
    #[serde(default)]
    pos_embed_max_size: Option<usize>,
    #[serde(default)]
    guidance_embeds: Option<bool>,
}

/// A transformer model's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFacts {
    /// FLUX dev-style: the transformer takes the guidance scale as an embedding.
    pub guidance_embeds: bool,
    /// SD3: whether the folder has its T5 encoder (`text_encoder_3/`).
    pub has_t5: bool,
    /// The default `max_sequence_length`.
    pub max_sequence_length: usize,
    /// The largest image side the transformer's position embedding covers (SD3's
    /// `pos_embed_max_size`), in pixels.
    pub max_side: Option<usize>,
}

/// What [`super::ModelBundle::open`] takes from a transformer folder: its facts, default
/// size and size multiple, and its memory figures.
pub(super) struct FlowShape {
    pub facts: FlowFacts,
    pub default_size: usize,
    pub size_multiple: usize,
    pub memory: MemoryProfile,
}

/// The component folders of a transformer model, text encoders first.
pub fn components(kind: PipelineKind, dir: &Path) -> Vec<&'static str> {
    let mut c = match kind {
        PipelineKind::Flux => vec!["text_encoder", "text_encoder_2"],
        _ => vec!["text_encoder", "text_encoder_2"],
    };
    if kind == PipelineKind::Sd3 && dir.join("text_encoder_3/model.onnx").is_file() {
        c.push("text_encoder_3");
    }
    c.extend(["transformer", "vae_decoder"]);
    c
}

/// Reads `transformer/config.json` of a folder of `kind` with a VAE of `vae_factor`.
pub(super) fn read(
    dir: &Path,
    kind: PipelineKind,
    vae: &VaeShape,
    vae_factor: usize,
) -> Result<FlowShape, ModelError> {
    let path = dir.join("transformer/config.json");
    let config: TransformerConfig = read_json(&path)?;
    let patch = config.patch_size.unwrap_or(2).max(1);
    // FLUX packs 2x2 latent cells into a token outside its (patch 1) transformer.
    let packing = if kind == PipelineKind::Flux { 2 } else { patch };
    let sample = config.sample_size.unwrap_or(DEFAULT_SAMPLE_SIZE);
    let default_size = sample * vae_factor;
    let heads = config.num_attention_heads.unwrap_or(24);
    let inner = heads * config.attention_head_dim.unwrap_or(64);
    let guidance_embeds = config.guidance_embeds.unwrap_or(false);
    let components = components(kind, dir);
    let weights = super::memory::weights_on_disk(dir, &components);
    let memory = MemoryProfile::transformer(inner, heads, packing as u64, vae, vae_factor, weights);
    Ok(FlowShape {
        facts: FlowFacts {
            guidance_embeds,
            has_t5: kind == PipelineKind::Flux || dir.join("text_encoder_3/model.onnx").is_file(),
            max_sequence_length: default_sequence_length(kind, guidance_embeds),
            max_side: config.pos_embed_max_size.map(|p| p * patch * vae_factor),
        },
        default_size,
        size_multiple: vae_factor * packing,
        memory,
    })
}
