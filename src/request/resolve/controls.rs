//! The ControlNet part of the resolve step: each of a request's `controls` checked against
//! the model folder (its ControlNets, its UNet's residual inputs) and the limits, with
//! defaults filled in. Every refusal names `controls[i].FIELD`.

use super::{
    GenerateRequest, ImageInput, Limits, ModelBundle, RequestError, ResolvedRequest, short_float,
};
use crate::prompt_syntax::PromptSyntax;
use crate::request::MAX_CONTROLS;

/// How to get a folder whose UNet takes ControlNet residuals.
const HOW_TO_EXPORT: &str = "export the model with scripts/export-model SRC OUT --controlnet \
     CN_SRC[=NAME] (or add one to an exported folder with scripts/export-model \
     --add-controlnet CN_SRC[=NAME] OUT)";

/// One ControlNet of a resolved request: the model folder has it and its UNet takes
/// ControlNet residuals.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    /// The ControlNet's folder name under the model's `controlnet/`.
    pub controlnet: String,
    /// The control image as sent (its header was read; it is decoded when the job runs).
    pub image: ImageInput,
    /// What its residuals are multiplied by, in [0, 2].
    pub scale: f64,
    /// The fraction of the steps before which it is off, in [0, 1).
    pub start: f64,
    /// The fraction of the steps after which it is off, in (start, 1].
    pub end: f64,
}

impl ResolvedRequest {
    /// The batch key's ControlNet part: 0 without ControlNets; else a hash of each one's
    /// name, scale, step range and control image, and guess mode.
    pub(super) fn controls_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        if self.controls.is_empty() {
            return 0;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for c in &self.controls {
            (
                &c.controlnet,
                c.scale.to_bits(),
                c.start.to_bits(),
                c.end.to_bits(),
                c.image.sha256_hex(),
            )
                .hash(&mut h);
        }
        self.control_guess_mode.hash(&mut h);
        h.finish() | 1
    }
}

/// The request's ControlNets, checked, in request order (empty: none).
pub(super) fn resolve_controls(
    req: &GenerateRequest,
    model_name: &str,
    bundle: &ModelBundle,
    limits: &Limits,
    inpaint: bool,
) -> Result<Vec<Control>, RequestError> {
    let Some(controls) = req.controls.as_deref().filter(|c| !c.is_empty()) else {
        return Ok(Vec::new());
    };
    let invalid = |message: String| RequestError::Invalid {
        key: "controls",
        message,
    };
    if bundle.kind.is_flow() {
        return Err(invalid(format!(
            "model '{model_name}' is a transformer model ({}); ControlNets run on the UNet \
             models (SD1.x, SD2.x, SDXL)",
            bundle.kind.name()
        )));
    }
    if controls.len() > MAX_CONTROLS {
        return Err(invalid(format!(
            "{} ControlNets is above the limit of {MAX_CONTROLS}",
            controls.len()
        )));
    }
    if inpaint {
        return Err(invalid(
            "inpainting with a ControlNet is not supported; use text to image or image to \
             image (init_image without mask_image)"
                .into(),
        ));
    }
    if req.prompt_syntax == Some(PromptSyntax::A1111) {
        return Err(invalid(
            "ControlNets run with prompt_syntax 'diffusers' only (webui's separate \
             conditional and unconditional UNet runs have no ControlNet reference here)"
                .into(),
        ));
    }
    let mut out = Vec::with_capacity(controls.len());
    for (index, c) in controls.iter().enumerate() {
        let err = |field: &'static str, message: String| RequestError::Control {
            index,
            field,
            message,
        };
        let name = c.controlnet.as_deref().ok_or_else(|| {
            err(
                "controlnet",
                "missing: name one of the model's ControlNets".into(),
            )
        })?;
        if bundle.unet_residuals == 0 {
            return Err(err(
                "controlnet",
                format!(
                    "model '{model_name}' has a UNet without ControlNet inputs; {HOW_TO_EXPORT}"
                ),
            ));
        }
        if !bundle.controlnets.iter().any(|k| k.name == name) {
            let known = if bundle.controlnets.is_empty() {
                "it has none".to_string()
            } else {
                let names: Vec<&str> = bundle.controlnets.iter().map(|k| k.name.as_str()).collect();
                format!("it has: {}", names.join(", "))
            };
            return Err(err(
                "controlnet",
                format!(
                    "model '{model_name}' has no ControlNet '{}' ({known}); {HOW_TO_EXPORT}",
                    crate::wire::error::echo(name)
                ),
            ));
        }
        let image = c
            .image
            .clone()
            .ok_or_else(|| err("image", "missing: the control image (PNG or JPEG)".into()))?;
        if image.bytes().len() > limits.max_image_bytes {
            return Err(err(
                "image",
                format!(
                    "{} bytes is above the limit of {}",
                    image.bytes().len(),
                    limits.max_image_bytes
                ),
            ));
        }
        let (w, h) = image.dimensions().map_err(|e| err("image", e))?;
        let (w, h) = (w as usize, h as usize);
        if w > limits.max_width || h > limits.max_height {
            return Err(err(
                "image",
                format!(
                    "{w}x{h} is above the limit of {}x{}",
                    limits.max_width, limits.max_height
                ),
            ));
        }
        if w.saturating_mul(h) > limits.max_pixels {
            return Err(err(
                "image",
                format!("{w}x{h} is above the limit of {} pixels", limits.max_pixels),
            ));
        }
        let fraction = |field: &'static str, v: Option<f64>, default: f64, range: (f64, f64)| {
            let v = v.unwrap_or(default);
            if v.is_finite() && v >= range.0 && v <= range.1 {
                Ok(v)
            } else {
                Err(err(
                    field,
                    format!(
                        "{} is not between {} and {}",
                        short_float(v),
                        short_float(range.0),
                        short_float(range.1)
                    ),
                ))
            }
        };
        let scale = fraction("scale", c.scale, 1.0, (0.0, 2.0))?;
        let start = fraction("start", c.start, 0.0, (0.0, 1.0))?;
        let end = fraction("end", c.end, 1.0, (0.0, 1.0))?;
        if start >= end {
            return Err(err(
                "end",
                format!(
                    "{} is not after start {} (the ControlNet runs from start to end, fractions of the steps)",
                    short_float(end),
                    short_float(start)
                ),
            ));
        }
        out.push(Control {
            controlnet: name.to_string(),
            image,
            scale,
            start,
            end,
        });
    }
    Ok(out)
}

impl Control {
    /// Whether this ControlNet runs at step `i` of `n` (diffusers' `controlnet_keep`: off
    /// when `i / n < start` or `(i + 1) / n > end`), with `i` counted from the first step
    /// that runs (image to image starts later in the schedule and counts only its own).
    pub fn active_at(&self, i: usize, n: usize) -> bool {
        let n = n as f64;
        !((i as f64) / n < self.start || (i as f64 + 1.0) / n > self.end)
    }
}
