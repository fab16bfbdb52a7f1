//! LoRA tensor names → (component, diffusers module path, which tensor).
//!
//! Two families of names are read:
//! - kohya/sd-scripts: `lora_unet_<flattened path>.lora_down.weight` / `.lora_up.weight` /
//!   `.alpha`, `lora_te_…` (`lora_te1_…`, `lora_te2_…` for SDXL's two text encoders). The
//!   path has its dots flattened to underscores, so it is split into tokens and the
//!   underscored names of diffusers and of the original (SGM/LDM) code (`to_q`,
//!   `transformer_blocks`, `in_layers`, …) are joined back. Files for SDXL name UNet blocks
//!   the SGM way (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_…`): those are
//!   mapped to diffusers' `down_blocks`/`mid_block`/`up_blocks` from the model's own
//!   config ([`UnetBlocks`]), the way diffusers' `_maybe_map_sgm_blocks_to_diffusers` does,
//!   except that an up block without attention has its upsampler at inner index 1.
//! - PEFT/diffusers: `unet.<path>.lora_A.weight` / `.lora_B.weight`, the older
//!   `.lora.down.weight`, `.lora_linear_layer.down.weight` and
//!   `.processor.to_q_lora.down.weight` forms, under `unet.`, `text_encoder.` or
//!   `text_encoder_2.`.
//!
//! LyCORIS types (LoHa, LoKr, …) and DoRA are recognised and refused by name.

use std::path::Path;

use serde_json::Value;

/// An error mapping a LoRA key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key belongs to a kind of adapter other than plain LoRA.
    #[error("LoRA key {key}: {kind} is not supported, only plain LoRA (and LoCon) is")]
    Unsupported {
        /// The key.
        key: String,
        /// What it is, e.g. `LoHa (LyCORIS)`.
        kind: &'static str,
    },
    /// The key has no form this module knows.
    #[error("LoRA key {key}: not a kohya or PEFT/diffusers LoRA key")]
    Unknown {
        /// The key.
        key: String,
    },
    /// An SGM-named UNet key (`input_blocks_…`) with no UNet config to map it by.
    #[error(
        "LoRA key {key}: names UNet blocks the SGM way, and no UNet config was given to map them"
    )]
    SgmWithoutConfig {
        /// The key.
        key: String,
    },
    /// An SGM-named UNet key whose block does not exist in this UNet.
    #[error("LoRA key {key}: {what}")]
    SgmBlock {
        /// The key.
        key: String,
        /// What does not fit the UNet's config.
        what: String,
    },
    /// The UNet config could not be read.
    #[error("{path}: {what}")]
    Config {
        /// The config file (or `config` when read from a value).
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// The model a LoRA key applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The UNet (`lora_unet_`, `unet.`).
    Unet,
    /// The (first) text encoder (`lora_te_`, `lora_te1_`, `text_encoder.`).
    TextEncoder,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`).
    TextEncoder2,
}

impl Component {
    /// The model folder's subfolder holding this component's graph.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Which tensor of a LoRA layer a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// A, `lora_down`: [rank, in] (or [rank, in, kh, kw] for a conv).
    Down,
    /// B, `lora_up`: [out, rank] (or [out, rank, 1, 1]).
    Up,
    /// The scalar alpha (scale = alpha / rank).
    Alpha,
}

/// The naming convention a key follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// kohya/sd-scripts (`lora_unet_…`).
    Kohya,
    /// PEFT/diffusers (`unet.….lora_A.weight`).
    Peft,
}

/// A LoRA key, mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraKey {
    /// The model it applies to.
    pub component: Component,
    /// The diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    /// Which tensor it holds.
    pub part: Part,
    /// Its naming convention.
    pub format: KeyFormat,
}

/// What a UNet config says about its blocks, for mapping SGM block numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetBlocks {
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Whether each down block has attentions.
    pub down_attention: Vec<bool>,
    /// Whether each up block has attentions.
    pub up_attention: Vec<bool>,
}

impl UnetBlocks {
    /// Reads `layers_per_block`, `down_block_types` and `up_block_types` of a diffusers
    /// UNet `config.json`.
    pub fn from_config_file(path: &Path) -> Result<UnetBlocks, KeyError> {
        let error = |what: String| KeyError::Config {
            path: path.display().to_string(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
        UnetBlocks::from_config(&value).map_err(|e| match e {
            KeyError::Config { what, .. } => error(what),
            other => other,
        })
    }

    /// As [`UnetBlocks::from_config_file`], from the parsed config.
    pub fn from_config(config: &Value) -> Result<UnetBlocks, KeyError> {
        let error = |what: String| KeyError::Config {
            path: "config".into(),
            what,
        };
        let layers_per_block = config["layers_per_block"]
            .as_u64()
            .ok_or_else(|| error("layers_per_block is not a number".into()))?
            as usize;
        let attention = |key: &str| -> Result<Vec<bool>, KeyError> {
            let types = config[key]
                .as_array()
                .ok_or_else(|| error(format!("{key} is not a list")))?;
            types
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(|t| t.contains("Attn"))
                        .ok_or_else(|| error(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let blocks = UnetBlocks {
            layers_per_block,
            down_attention: attention("down_block_types")?,
            up_attention: attention("up_block_types")?,
        };
        if blocks.down_attention.is_empty()
            || blocks.down_attention.len() != blocks.up_attention.len()
        {
            return Err(error(
                "down_block_types and up_block_types differ in length".into(),
            ));
        }
        Ok(blocks)
    }
}

/// Maps LoRA keys to modules; holds the UNet config SGM-named keys need.
#[derive(Debug, Clone, Default)]
pub struct KeyMapper {
    unet: Option<UnetBlocks>,
}

/// What adapter other than plain LoRA a key belongs to, judged by its dot-separated
/// components (`….hada_w1_a`, `….lokr_w1`, `….dora_scale`, …).
fn unsupported_kind(key: &str) -> Option<&'static str> {
    key.split('.').find_map(|part| {
        Some(match part {
            p if p.starts_with("hada_") => "LoHa (LyCORIS)",
            p if p.starts_with("lokr_") => "LoKr (LyCORIS)",
            p if p.starts_with("oft_") => "OFT",
            "dora_scale" | "lora_magnitude_vector" => "DoRA",
            "lora_mid" => "LoCon with a CP-decomposed (Tucker) middle weight",
            "on_input" => "(IA)³",
            "diff" | "diff_b" => "a full weight difference (LyCORIS full)",
            "w_norm" | "b_norm" => "norm tuning (LyCORIS)",
            p if p.starts_with("lora_embedding_") => "an embedding LoRA",
            _ => return None,
        })
    })
}

/// Underscored names, as token sequences, longest first where they overlap.
const COMPOUNDS: &[&[&str]] = &[
    &["time", "emb", "proj"],
    &["down", "blocks"],
    &["up", "blocks"],
    &["mid", "block"],
    &["transformer", "blocks"],
    &["to", "q"],
    &["to", "k"],
    &["to", "v"],
    &["to", "out"],
    &["proj", "in"],
    &["proj", "out"],
    &["conv", "shortcut"],
    &["conv", "in"],
    &["conv", "out"],
    &["time", "embedding"],
    &["add", "embedding"],
    &["linear", "1"],
    &["linear", "2"],
    &["text", "model"],
    &["text", "projection"],
    &["self", "attn"],
    &["q", "proj"],
    &["k", "proj"],
    &["v", "proj"],
    &["out", "proj"],
    &["input", "blocks"],
    &["middle", "block"],
    &["output", "blocks"],
    &["in", "layers"],
    &["out", "layers"],
    &["emb", "layers"],
    &["skip", "connection"],
    &["time", "embed"],
    &["label", "emb"],
];

/// `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` →
/// [`down_blocks`, `0`, `attentions`, …, `attn1`, `to_q`].
fn unflatten(flat: &str) -> Vec<String> {
    let tokens: Vec<&str> = flat.split('_').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let len = COMPOUNDS
            .iter()
            .find(|c| tokens[i..].starts_with(c))
            .map_or(1, |c| c.len());
        out.push(tokens[i..i + len].join("_"));
        i += len;
    }
    out
}

impl KeyMapper {
    /// A mapper; `unet` is needed only for SGM-named UNet keys.
    pub fn new(unet: Option<UnetBlocks>) -> KeyMapper {
        KeyMapper { unet }
    }

    /// Maps one key of a LoRA file.
    pub fn map(&self, key: &str) -> Result<LoraKey, KeyError> {
        if let Some(kind) = unsupported_kind(key) {
            return Err(KeyError::Unsupported {
                key: key.to_string(),
                kind,
            });
        }
        let unknown = || KeyError::Unknown {
            key: key.to_string(),
        };
        if key.starts_with("lora_") {
            self.map_kohya(key).ok_or_else(unknown)?
        } else {
            map_peft(key).ok_or_else(unknown)
        }
    }

    fn map_kohya(&self, key: &str) -> Option<Result<LoraKey, KeyError>> {
        let (name, suffix) = key.split_once('.')?;
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            _ => return None,
        };
        let (component, flat) = [
            ("lora_unet_", Component::Unet),
            ("lora_te_", Component::TextEncoder),
            ("lora_te1_", Component::TextEncoder),
            ("lora_te2_", Component::TextEncoder2),
        ]
        .iter()
        .find_map(|(prefix, c)| name.strip_prefix(prefix).map(|rest| (*c, rest)))?;
        if flat.is_empty() {
            return None;
        }
        let segments = unflatten(flat);
        let sgm = [
            "input_blocks",
            "middle_block",
            "output_blocks",
            "time_embed",
            "label_emb",
            "out",
        ];
        let module = if component == Component::Unet && sgm.contains(&segments[0].as_str()) {
            let Some(blocks) = &self.unet else {
                return Some(Err(KeyError::SgmWithoutConfig {
                    key: key.to_string(),
                }));
            };
            match sgm_to_diffusers(&segments, blocks) {
                Ok(module) => module,
                Err(what) => {
                    return Some(Err(KeyError::SgmBlock {
                        key: key.to_string(),
                        what,
                    }));
                }
            }
        } else {
            segments.join(".")
        };
        Some(Ok(LoraKey {
            component,
            module,
            part,
            format: KeyFormat::Kohya,
        }))
    }
}

fn map_peft(key: &str) -> Option<LoraKey> {
    let (component, rest) = [
        ("unet.", Component::Unet),
        ("text_encoder_2.", Component::TextEncoder2),
        ("text_encoder.", Component::TextEncoder),
    ]
    .iter()
    .find_map(|(prefix, c)| key.strip_prefix(prefix).map(|rest| (*c, rest)))?;
    const SUFFIXES: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".down.weight", Part::Down),
        (".up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    let (module, part) = SUFFIXES
        .iter()
        .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|m| (m, *part)))?;
    let module = match module.strip_suffix("_lora") {
        // The attention-processor form: `attn1.processor.to_q_lora.down.weight`.
        Some(m) => {
            let (parent, leaf) = m.rsplit_once(".processor.")?;
            let leaf = match leaf {
                "to_q" | "to_k" | "to_v" => leaf,
                "to_out" => "to_out.0",
                _ => return None,
            };
            format!("{parent}.{leaf}")
        }
        // `.down.weight` alone belongs only to the processor form.
        None if rest.ends_with(".down.weight") || rest.ends_with(".up.weight") => {
            let infixed = [".lora.", ".lora_linear_layer."];
            if !infixed.iter().any(|i| rest.contains(i)) {
                return None;
            }
            module.to_string()
        }
        None => module.to_string(),
    };
    if module.is_empty() || module.split('.').any(str::is_empty) {
        return None;
    }
    Some(LoraKey {
        component,
        module,
        part,
        format: KeyFormat::Peft,
    })
}

/// The segments as string slices, for slice patterns.
fn tail(rest: &[String]) -> Vec<&str> {
    rest.iter().map(String::as_str).collect()
}

/// Maps SGM UNet segments (`input_blocks`, `4`, `1`, `transformer_blocks`, …) to a
/// diffusers module path, or says what does not fit the config.
fn sgm_to_diffusers(seg: &[String], blocks: &UnetBlocks) -> Result<String, String> {
    let number = |i: usize| -> Result<usize, String> {
        seg.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("expected a block number after {}", seg[..i].join("_")))
    };
    let n = blocks.down_attention.len();
    let lpb = blocks.layers_per_block;
    let join = |head: String, rest: &[String]| -> String {
        std::iter::once(head)
            .chain(rest.iter().cloned())
            .collect::<Vec<_>>()
            .join(".")
    };
    let resnet = |head: String, rest: &[String]| -> Result<String, String> {
        let inner = match rest.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["in_layers", "2"] => "conv1",
            ["out_layers", "3"] => "conv2",
            ["emb_layers", "1"] => "time_emb_proj",
            ["skip_connection"] => "conv_shortcut",
            _ => return Err(format!("{} is not a resnet layer", rest.join("_"))),
        };
        Ok(format!("{head}.{inner}"))
    };
    match seg[0].as_str() {
        "time_embed" | "label_emb" | "out" => {
            let module = match tail(seg)[..] {
                ["time_embed", "0"] => "time_embedding.linear_1",
                ["time_embed", "2"] => "time_embedding.linear_2",
                ["label_emb", "0", "0"] => "add_embedding.linear_1",
                ["label_emb", "0", "2"] => "add_embedding.linear_2",
                ["out", "2"] => "conv_out",
                _ => return Err(format!("{} is not a UNet layer", seg.join("_"))),
            };
            Ok(module.into())
        }
        "input_blocks" => {
            let (i, inner, rest) = (number(1)?, number(2)?, &seg[3.min(seg.len())..]);
            if i == 0 {
                return match (inner, rest.is_empty()) {
                    (0, true) => Ok("conv_in".into()),
                    _ => Err("input_blocks_0 holds only conv_in (input_blocks_0_0)".into()),
                };
            }
            // Each down block: layers_per_block layers, then a downsampler but in the last.
            let mut slot = i - 1;
            for b in 0..n {
                if slot < lpb {
                    let head = format!("down_blocks.{b}");
                    return match inner {
                        0 => resnet(format!("{head}.resnets.{slot}"), rest),
                        1 if blocks.down_attention[b] => {
                            Ok(join(format!("{head}.attentions.{slot}"), rest))
                        }
                        _ => Err(format!(
                            "down block {b} has no input_blocks_{i}_{inner} in this UNet's config"
                        )),
                    };
                }
                slot -= lpb;
                if b + 1 < n {
                    if slot == 0 {
                        return match (inner, &tail(rest)[..]) {
                            (0, ["op"]) => Ok(format!("down_blocks.{b}.downsamplers.0.conv")),
                            _ => Err(format!(
                                "input_blocks_{i} is down block {b}'s downsampler (input_blocks_{i}_0_op)"
                            )),
                        };
                    }
                    slot -= 1;
                }
            }
            Err(format!(
                "input_blocks_{i} does not exist: this UNet has {n} down blocks of {lpb} layers"
            ))
        }
        "middle_block" => {
            let (i, rest) = (number(1)?, &seg[2.min(seg.len())..]);
            match i {
                0 => resnet("mid_block.resnets.0".into(), rest),
                1 => Ok(join("mid_block.attentions.0".into(), rest)),
                2 => resnet("mid_block.resnets.1".into(), rest),
                _ => Err(format!("middle_block_{i} does not exist (0 to 2)")),
            }
        }
        _ => {
            let (i, inner, rest) = (number(1)?, number(2)?, &seg[3.min(seg.len())..]);
            let (b, l) = (i / (lpb + 1), i % (lpb + 1));
            if b >= n {
                return Err(format!(
                    "output_blocks_{i} does not exist: this UNet has {n} up blocks of {} layers",
                    lpb + 1
                ));
            }
            let head = format!("up_blocks.{b}");
            let has_upsampler = l == lpb && b + 1 < n;
            let attention = blocks.up_attention[b];
            match (inner, attention) {
                (0, _) => resnet(format!("{head}.resnets.{l}"), rest),
                (1, true) => Ok(join(format!("{head}.attentions.{l}"), rest)),
                (1, false) | (2, true) if has_upsampler && tail(rest)[..] == ["conv"] => {
                    Ok(format!("{head}.upsamplers.0.conv"))
                }
                _ => Err(format!(
                    "up block {b} has no output_blocks_{i}_{inner} in this UNet's config"
                )),
            }
        }
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
