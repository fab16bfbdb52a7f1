//! The PNG `parameters` text (AUTOMATIC1111's "infotext"), both ways: [`format`] writes
//! it from a resolved request and where the image was made ([`Provenance`]); [`parse`]
//! reads it back into a [`Receipt`] whose request, run again, makes the same image
//! (`diffusionctl verify`). Pure: no file, no clock.
//!
//! Layout, as AUTOMATIC1111 writes it:
//!
//! ```text
//! PROMPT (any number of lines)
//! Negative prompt: NEGATIVE (any number of lines; the line is left out when there is none)
//! Steps: 20, Sampler: pndm, CFG scale: 7.5, ..., diffusiond: 0.1.0
//! ```
//!
//! The last line holds `Key: value` pairs separated by `, `. A value with a `,`, `:`, `"`,
//! a line break, or space at either end, or an empty one, is written as a JSON string
//! (as AUTOMATIC1111 quotes them). Each ControlNet of the request is one pair
//! `ControlNet I: "Module: none, Model: NAME, Weight: S, Guidance Start: A, Guidance End:
//! B"`, as the sd-webui-controlnet extension writes it (no preprocessor runs: `none`),
//! after `Model` as A1111 puts its extensions' keys before `Version`; the control images
//! are not recorded (the extension records none). Limit: a prompt with a line that starts with
//! `Negative prompt: ` cannot be told apart from a negative prompt (the first such line
//! starts the negative prompt).

use sha2::{Digest, Sha256};

use super::{ControlInput, GenerateRequest, Mode, ResolvedRequest, short_float};
use crate::prompt_syntax::PromptSyntax;
use crate::rng::RngKind;

/// Where and with what an image was made, beyond its request.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    /// ONNX Runtime's version (`ONNX Runtime`).
    pub ort_version: &'a str,
    /// The first 10 hex digits of the model hash (`Model hash`), when computed.
    pub model_hash: Option<&'a str>,
    /// The execution provider the UNet ran on (`Execution provider`: `cpu`, `cuda`,
    /// `tensorrt`).
    pub execution_provider: &'a str,
    /// The LoRA files merged into the weights (`Lora hashes`, as A1111 writes it).
    pub loras: &'a [crate::lora::Applied],
}

/// Why a `parameters` text cannot be read back. Each message names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InfotextError {
    /// No settings line (the text has a single line).
    #[error("no settings line (the last line, 'Steps: ..., Sampler: ...')")]
    NoSettings,
    /// The settings line does not split into `Key: value` pairs.
    #[error("the settings line cannot be read at '{at}'")]
    Syntax {
        /// The text from where reading stopped (cut short).
        at: String,
    },
    /// A key diffusiond always writes is missing.
    #[error("'{0}' is missing")]
    Missing(&'static str),
    /// A value does not parse.
    #[error("'{key}': '{value}' {message}")]
    Value {
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What was expected.
        message: String,
    },
}

/// What a `parameters` text says: the request to run again and what to check.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// The request: every key that decides the pixels (the model by the name it had;
    /// no init image or mask: the caller gives them again, checked against the hashes;
    /// its ControlNets without their control images, which the caller gives again).
    /// `width`/`height` are left out for image-to-image and inpainting, whose size comes
    /// from the init image.
    pub request: GenerateRequest,
    /// Text to image, image to image or inpainting.
    pub mode: Mode,
    /// The image's size.
    pub size: (u32, u32),
    /// The init image's hash (first 10 hex digits of its SHA-256).
    pub init_image_hash: Option<String>,
    /// The mask's hash.
    pub mask_hash: Option<String>,
    /// The hash of initial latents given instead of the seed's draw (`--latents`).
    pub latents_hash: Option<String>,
    /// The model hash (10 hex digits), when recorded.
    pub model_hash: Option<String>,
    /// `Lora hashes` as written (`name: hash, …`), when LoRAs were merged.
    pub lora_hashes: Option<String>,
    /// The model's name (the configured name, or the folder with `--local`).
    pub model: String,
    /// The execution provider, when recorded.
    pub execution_provider: Option<String>,
    /// The ONNX Runtime version, when recorded.
    pub onnx_runtime: Option<String>,
    /// The diffusiond version that made it.
    pub diffusiond: String,
    /// The image's index among the request's `num_images` (`Batch pos`).
    pub batch_pos: usize,
}

const NEGATIVE: &str = "Negative prompt: ";

/// The key of ControlNet `i` is this and `i` (`ControlNet 0`).
const CONTROLNET: &str = "ControlNet ";

/// The key written when the ControlNets ran in diffusers' guess mode.
const GUESS_MODE: &str = "Control guess mode";

/// A ControlNet's value, as sd-webui-controlnet writes a unit (no preprocessor: `none`).
fn controlnet_value(c: &super::Control) -> String {
    format!(
        "Module: none, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}",
        c.controlnet,
        short_float(c.scale),
        short_float(c.start),
        short_float(c.end)
    )
}

/// The ControlNets a settings line records (`ControlNet 0`, `ControlNet 1`, … in order),
/// without their images; `None` when it records none.
fn read_controls(pairs: &[(String, String)]) -> Result<Option<Vec<ControlInput>>, InfotextError> {
    let bad = |value: &str, message: String| InfotextError::Value {
        key: "ControlNet",
        value: value.chars().take(40).collect(),
        message,
    };
    let mut found: Vec<(usize, &str)> = Vec::new();
    for (k, v) in pairs {
        let Some(index) = k.strip_prefix(CONTROLNET) else {
            continue;
        };
        let index: usize = index
            .parse()
            .map_err(|_| bad(k, "is not 'ControlNet N'".into()))?;
        found.push((index, v));
    }
    if found.is_empty() {
        return Ok(None);
    }
    found.sort_by_key(|(i, _)| *i);
    let mut controls = Vec::new();
    for (n, (index, value)) in found.into_iter().enumerate() {
        if index != n {
            return Err(bad(
                value,
                format!("is ControlNet {index}, but ControlNet {n} is missing"),
            ));
        }
        let fields: Vec<(&str, &str)> = value
            .split(", ")
            .filter_map(|f| f.split_once(": "))
            .collect();
        let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let number = |name: &str| -> Result<Option<f64>, InfotextError> {
            get(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(value, format!("has a {name} that is not a number")))
                })
                .transpose()
        };
        let model = get("Model").ok_or_else(|| bad(value, "names no Model".into()))?;
        controls.push(ControlInput {
            controlnet: Some(model.to_string()),
            image: None,
            scale: number("Weight")?,
            start: number("Guidance Start")?,
            end: number("Guidance End")?,
        });
    }
    Ok(Some(controls))
}

/// The `parameters` text of image `image` (0-based) of `r`.
pub fn format(r: &ResolvedRequest, p: &Provenance<'_>, image: usize) -> String {
    let mut pairs: Vec<(&str, String)> = vec![
        ("Steps", r.steps.to_string()),
        ("Sampler", r.scheduler.to_string()),
        ("CFG scale", short_float(r.guidance_scale)),
        ("Guidance rescale", short_float(r.guidance_rescale)),
        ("Seed", r.seed.to_string()),
        ("RNG", r.rng.to_string()),
        ("Size", format!("{}x{}", r.width, r.height)),
        ("Mode", r.mode().as_str().to_string()),
    ];
    if let Some(e) = &r.edit {
        pairs.push(("Denoising strength", short_float(e.strength)));
        pairs.push(("Init image hash", e.init.short_hash()));
        if let Some(m) = &e.mask {
            pairs.push(("Mask hash", m.short_hash()));
        }
    }
    if let Some(l) = &r.latents {
        pairs.push(("Latents hash", latents_hash(l)));
    }
    if r.num_images > 1 {
        pairs.push(("Batch size", r.num_images.to_string()));
        pairs.push(("Batch pos", image.to_string()));
    }
    pairs.push(("Prompt syntax", r.prompt_syntax.to_string()));
    if let Some(n) = r.max_sequence_length {
        pairs.push(("Max sequence length", n.to_string()));
    }
    if r.prompt_syntax == PromptSyntax::A1111 && r.a1111_pad_cond_uncond {
        // webui's own key for its "Pad prompt/negative prompt" option.
        pairs.push(("Pad conds", "True".to_string()));
    }
    if !r.lora_key.is_empty() {
        // The `loras` key (the prompt keeps its own <lora:...> tags, as A1111 writes it).
        let list: Vec<String> = r
            .lora_key
            .iter()
            .map(|(n, s)| format!("{n}: {}", short_float(*s)))
            .collect();
        pairs.push(("Loras", list.join(", ")));
    }
    if !p.loras.is_empty() {
        // A1111's key: each LoRA's name and its short ("addnet") hash.
        let list: Vec<String> = p
            .loras
            .iter()
            .map(|l| format!("{}: {}", l.name, l.hash))
            .collect();
        pairs.push(("Lora hashes", list.join(", ")));
    }
    if let Some(h) = p.model_hash {
        pairs.push(("Model hash", h.to_string()));
    }
    pairs.push(("Model", r.model.clone()));
    let controls: Vec<(String, String)> = r
        .controls
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("{CONTROLNET}{i}"), controlnet_value(c)))
        .collect();
    pairs.extend(controls.iter().map(|(k, v)| (k.as_str(), v.clone())));
    if r.control_guess_mode {
        // diffusers' guess_mode (not one of webui's control modes): diffusiond's own key.
        pairs.push((GUESS_MODE, "True".to_string()));
    }
    pairs.push(("ONNX Runtime", p.ort_version.to_string()));
    pairs.push(("Execution provider", p.execution_provider.to_string()));
    pairs.push(("diffusiond", crate::VERSION.to_string()));
    let settings: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect();
    let mut text = r.prompt.clone();
    if let Some(n) = &r.negative_prompt {
        text.push('\n');
        text.push_str(NEGATIVE);
        text.push_str(n);
    }
    text.push('\n');
    text.push_str(&settings.join(", "));
    text
}

/// The first 10 hex digits of the SHA-256 over latents' shape (each dimension as a
/// little-endian u64) and values (little-endian f32).
pub fn latents_hash(latents: &ndarray::ArrayD<f32>) -> String {
    let mut h = Sha256::new();
    for d in latents.shape() {
        h.update((*d as u64).to_le_bytes());
    }
    for v in latents.iter() {
        h.update(v.to_le_bytes());
    }
    h.finalize()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A settings value as written: quoted as a JSON string when it would not read back.
fn quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v.trim() == v
        && !v.contains([',', ':', '"', '\n', '\r'])
        && !v.starts_with('"');
    if plain {
        v.to_string()
    } else {
        serde_json::Value::String(v.to_string()).to_string()
    }
}

/// The settings line split into `(key, value)` pairs, quoted values unquoted.
fn settings_pairs(line: &str) -> Result<Vec<(String, String)>, InfotextError> {
    let syntax = |rest: &str| InfotextError::Syntax {
        at: rest.chars().take(40).collect(),
    };
    let mut pairs = Vec::new();
    let mut rest = line.trim_end();
    while !rest.is_empty() {
        let (key, after) = rest.split_once(": ").ok_or_else(|| syntax(rest))?;
        if key.is_empty() || key.contains(',') {
            return Err(syntax(rest));
        }
        let (value, after) = if after.starts_with('"') {
            let end = json_string_end(after).ok_or_else(|| syntax(rest))?;
            let value: String = serde_json::from_str(&after[..end]).map_err(|_| syntax(rest))?;
            (value, &after[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.to_string(), value));
        rest = match after.strip_prefix(',') {
            Some(r) => r.strip_prefix(' ').unwrap_or(r),
            None if after.is_empty() => after,
            None => return Err(syntax(after)),
        };
    }
    Ok(pairs)
}

/// `name: value, name: value` as pairs (the `Loras` value).
fn name_values(v: &str) -> Option<Vec<(String, f64)>> {
    v.split(", ")
        .map(|item| {
            let (name, value) = item.rsplit_once(": ")?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The byte length of the JSON string at the start of `s` (quotes included).
fn json_string_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// Reads a `parameters` text back (the inverse of [`format`]).
pub fn parse(text: &str) -> Result<Receipt, InfotextError> {
    let (head, line) = text.rsplit_once('\n').ok_or(InfotextError::NoSettings)?;
    let (prompt, negative) = if let Some(at) = head.find(&format!("\n{NEGATIVE}")) {
        (
            head[..at].to_string(),
            Some(head[at + 1 + NEGATIVE.len()..].to_string()),
        )
    } else {
        (head.to_string(), None)
    };
    let pairs = settings_pairs(line)?;
    let get = |key: &'static str| -> Option<&str> {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let need = |key: &'static str| get(key).ok_or(InfotextError::Missing(key));
    fn value<T: std::str::FromStr>(
        key: &'static str,
        v: &str,
        what: &str,
    ) -> Result<T, InfotextError> {
        v.parse().map_err(|_| InfotextError::Value {
            key,
            value: v.chars().take(40).collect(),
            message: format!("is not {what}"),
        })
    }
    let diffusiond = need("diffusiond")?.to_string();
    let steps: u32 = value("Steps", need("Steps")?, "a step count")?;
    let scheduler = need("Sampler")?.to_string();
    let guidance: f64 = value("CFG scale", need("CFG scale")?, "a number")?;
    let rescale: f64 = match get("Guidance rescale") {
        Some(v) => value("Guidance rescale", v, "a number")?,
        None => 0.0,
    };
    let seed: u64 = value("Seed", need("Seed")?, "a seed")?;
    let rng: RngKind = match get("RNG") {
        Some(v) => value("RNG", v, "torch or numpy")?,
        None => RngKind::default(),
    };
    let size = need("Size")?;
    let (w, h) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .ok_or_else(|| InfotextError::Value {
            key: "Size",
            value: size.chars().take(40).collect(),
            message: "is not WIDTHxHEIGHT".into(),
        })?;
    let mode = match get("Mode").unwrap_or("txt2img") {
        "txt2img" => Mode::Txt2Img,
        "img2img" => Mode::Img2Img,
        "inpaint" => Mode::Inpaint,
        other => {
            return Err(InfotextError::Value {
                key: "Mode",
                value: other.chars().take(40).collect(),
                message: "is not txt2img, img2img or inpaint".into(),
            });
        }
    };
    let strength: Option<f64> = match get("Denoising strength") {
        Some(v) => Some(value("Denoising strength", v, "a number")?),
        None => None,
    };
    let batch_size: u32 = match get("Batch size") {
        Some(v) => value("Batch size", v, "an image count")?,
        None => 1,
    };
    let batch_pos: usize = match get("Batch pos") {
        Some(v) => value("Batch pos", v, "an image index")?,
        None => 0,
    };
    let prompt_syntax: PromptSyntax = match get("Prompt syntax") {
        Some(v) => value("Prompt syntax", v, "diffusers or a1111")?,
        None => PromptSyntax::default(),
    };
    let pad_conds = match get("Pad conds") {
        Some("True") => Some(true),
        Some("False") => Some(false),
        Some(v) => {
            return Err(InfotextError::Value {
                key: "Pad conds",
                value: v.chars().take(40).collect(),
                message: "is not True or False".into(),
            });
        }
        // Written only when true; an a1111 request without it did not pad.
        None => (prompt_syntax == PromptSyntax::A1111).then_some(false),
    };
    let loras = match get("Loras") {
        Some(v) => Some(name_values(v).ok_or_else(|| InfotextError::Value {
            key: "Loras",
            value: v.chars().take(40).collect(),
            message: "is not a list of 'name: scale'".into(),
        })?),
        None => None,
    };
    let max_sequence_length: Option<u32> = match get("Max sequence length") {
        Some(v) => Some(value("Max sequence length", v, "a token count")?),
        None => None,
    };
    let model = need("Model")?.to_string();
    let controls = read_controls(&pairs)?;
    let control_guess_mode = match get(GUESS_MODE) {
        None => None,
        Some("True") => Some(true),
        Some(v) => {
            return Err(InfotextError::Value {
                key: GUESS_MODE,
                value: v.chars().take(40).collect(),
                message: "is not True".into(),
            });
        }
    };
    let owned = |key| get(key).map(str::to_string);
    let edit = mode != Mode::Txt2Img;
    let request = GenerateRequest {
        prompt,
        negative_prompt: negative,
        model: Some(model.clone()),
        width: (!edit).then_some(w),
        height: (!edit).then_some(h),
        steps: Some(steps),
        guidance_scale: Some(guidance),
        guidance_rescale: Some(rescale),
        seed: Some(seed),
        rng: Some(rng),
        scheduler: Some(scheduler),
        num_images: Some(batch_size),
        strength,
        prompt_syntax: Some(prompt_syntax),
        a1111_pad_cond_uncond: pad_conds,
        loras,
        max_sequence_length,
        controls,
        control_guess_mode,
        ..GenerateRequest::default()
    };
    Ok(Receipt {
        request,
        mode,
        size: (w, h),
        init_image_hash: owned("Init image hash"),
        mask_hash: owned("Mask hash"),
        latents_hash: owned("Latents hash"),
        model_hash: owned("Model hash"),
        lora_hashes: owned("Lora hashes"),
        model,
        execution_provider: owned("Execution provider"),
        onnx_runtime: owned("ONNX Runtime"),
        diffusiond,
        batch_pos,
    })
}

#[cfg(test)]
#[path = "infotext_tests.rs"]
mod tests;
