//! A generation request, from what a caller says to what runs.
//!
//! * [`GenerateRequest`]: the keys a caller sends, every one optional but the prompt.
//!   D-Bus (`wire::keys`), `diffusionctl` flags and, later, batch manifests fill it in.
//! * [`resolve`]: the one place where defaults are filled in, values are checked against
//!   the model and the [`Limits`], and the scheduler name is resolved.
//! * [`ResolvedRequest`]: every value present and checked, no sentinels. The pipeline and
//!   the job engine take only these, and check nothing again.
//!
//! [`GenerateParams`] is the library's explicit form (every value given, as tests and
//! benchmarks write it); [`crate::pipeline::Pipeline::generate`] resolves it the same way.

mod image;
pub mod infotext;
mod keep_alive;
mod limits;
mod params;
mod resolve;

pub use image::{ImageInput, header_dimensions};
pub use infotext::{Provenance, Receipt};
pub use keep_alive::KeepAlive;
pub use limits::{DEFAULT_MAX_GUIDANCE_SCALE, Limits, MAX_CONTROLS};
pub use params::GenerateParams;
pub use resolve::{
    Control, Edit, LORA_SET, Mode, ModelRef, ResolvedRequest, gib as resolve_gib, random_seed,
    resolve, short_float,
};

use crate::rng::RngKind;

/// Defaults for keys a request leaves out (the model's own size and scheduler are
/// defaults too; they come from the model folder).
pub mod defaults {
    /// Denoising steps.
    pub const STEPS: u32 = 20;
    /// Classifier-free guidance scale.
    pub const GUIDANCE_SCALE: f64 = 7.5;
    /// diffusers' `guidance_rescale` (off).
    pub const GUIDANCE_RESCALE: f64 = 0.0;
    /// Images per request.
    pub const NUM_IMAGES: u32 = 1;
    /// Queue priority.
    pub const PRIORITY: i32 = 0;
    /// Image-to-image strength (diffusers' `StableDiffusionImg2ImgPipeline` default).
    pub const IMG2IMG_STRENGTH: f64 = 0.8;
    /// Image-to-image strength on SDXL (`StableDiffusionXLImg2ImgPipeline`'s default).
    pub const SDXL_IMG2IMG_STRENGTH: f64 = 0.3;
    /// Inpainting strength (`StableDiffusionInpaintPipeline`'s default).
    pub const INPAINT_STRENGTH: f64 = 1.0;
    /// Image-to-image and inpainting strength on SD3 (diffusers' SD3 pipelines).
    pub const SD3_EDIT_STRENGTH: f64 = 0.6;
}

/// What a caller asks for. `None` means "the default": the model's native size, the
/// model's own scheduler, a random seed, [`defaults`] for the rest.
///
/// Adding a request key: a field here, one row in `wire::keys::KEYS`, and its default
/// and checks in [`resolve`] (docs/architecture.md).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The prompt (required on the wire; may be empty).
    pub prompt: String,
    /// The negative prompt; `None` is diffusers' default (empty prompt, or zeros on SDXL).
    pub negative_prompt: Option<String>,
    /// Configured model name (daemon); the default model when `None`.
    pub model: Option<String>,
    /// Width in pixels.
    pub width: Option<u32>,
    /// Height in pixels.
    pub height: Option<u32>,
    /// Denoising steps.
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; ≤ 1 skips the unconditional pass.
    pub guidance_scale: Option<f64>,
    /// diffusers' `guidance_rescale`, 0..1.
    pub guidance_rescale: Option<f64>,
    /// The seed.
    pub seed: Option<u64>,
    /// Which reference generator the seed means.
    pub rng: Option<RngKind>,
    /// Scheduler name (`crate::scheduler::NAMES`).
    pub scheduler: Option<String>,
    /// Images from the prompt.
    pub num_images: Option<u32>,
    /// Queue priority: higher runs first (daemon only).
    pub priority: Option<i32>,
    /// The image to start from (PNG or JPEG): image-to-image, or inpainting with a mask.
    pub init_image: Option<ImageInput>,
    /// White = repaint; with `init_image`, turns the job into inpainting.
    pub mask_image: Option<ImageInput>,
    /// How much of the init image is repainted, in (0, 1].
    pub strength: Option<f64>,
    /// How the prompt text is read (diffusers' plain text, or AUTOMATIC1111's syntax).
    pub prompt_syntax: Option<crate::prompt_syntax::PromptSyntax>,
    /// `prompt_syntax` `a1111`: webui's "Pad prompt/negative prompt" option (pad the
    /// shorter of the two with empty chunks and run one UNet batch) instead of webui's
    /// default (separate UNet runs when their lengths differ).
    pub a1111_pad_cond_uncond: Option<bool>,
    /// Send a preview of the first image every this many steps (and after the last);
    /// 0 (the default) sends none.
    pub preview_every: Option<u32>,
    /// How previews are decoded from the latents ([`PreviewMethod`]).
    pub preview_method: Option<PreviewMethod>,
    /// Seconds the model stays loaded after this job (-1: until unloaded; 0: unloaded
    /// after it); daemon only ([`KeepAlive`]).
    pub keep_alive: Option<f64>,
    /// LoRAs merged into the model's weights for this job: (name, scale) pairs. Names
    /// come from the model's LoRA folders (`ListLoras`), or with `--local` from the files
    /// given; `prompt_syntax` `a1111` adds the prompt's `<lora:NAME:SCALE>` tags.
    pub loras: Option<Vec<(String, f64)>>,
    /// T5 tokens of the text conditioning (SD3, FLUX): the pipelines'
    /// `max_sequence_length` (256 for SD3, 512 for FLUX by default; at most 512).
    pub max_sequence_length: Option<u32>,
    /// ControlNets that steer this job (`controls`), each with its control image; they
    /// need a model folder exported with them (`scripts/export-model --controlnet`).
    pub controls: Option<Vec<ControlInput>>,
    /// diffusers' `guess_mode` for the request's ControlNets: they see only the
    /// conditional half of the guidance batch, and their residuals are scaled from 0.1
    /// (first down block) to 1 (mid block). Default false.
    pub control_guess_mode: Option<bool>,
}

/// One ControlNet of a request (`controls[i]`), as the caller sent it: every field is
/// checked by [`resolve`], which names `controls[i].FIELD` when one is missing or wrong.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlInput {
    /// The ControlNet: a folder name under the model's `controlnet/` (required).
    pub controlnet: Option<String>,
    /// The control image (PNG or JPEG; an edge, depth or pose map made by the caller),
    /// used as given: no preprocessor runs (required).
    pub image: Option<ImageInput>,
    /// What its residuals are multiplied by (diffusers' `controlnet_conditioning_scale`);
    /// default 1.0, in [0, 2].
    pub scale: Option<f64>,
    /// The fraction of the steps before which it is off (`control_guidance_start`);
    /// default 0.
    pub start: Option<f64>,
    /// The fraction of the steps after which it is off (`control_guidance_end`); default 1.
    pub end: Option<f64>,
}

/// How a live preview is decoded from the predicted clean latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PreviewMethod {
    /// A fixed linear map from latent channels to RGB per model family (ComfyUI's
    /// Latent2RGB): almost free.
    #[default]
    Latent2Rgb,
    /// The model's tiny VAE decoder (`taesd_decoder/`, diffusers' `AutoencoderTiny`).
    Taesd,
}

impl PreviewMethod {
    /// Every method.
    pub const ALL: [PreviewMethod; 2] = [PreviewMethod::Latent2Rgb, PreviewMethod::Taesd];

    /// The name a request uses.
    pub fn name(self) -> &'static str {
        match self {
            PreviewMethod::Latent2Rgb => "latent2rgb",
            PreviewMethod::Taesd => "taesd",
        }
    }
}

impl std::fmt::Display for PreviewMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PreviewMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PreviewMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown preview method '{}' (accepted: latent2rgb, taesd)",
                    crate::wire::error::echo(s)
                )
            })
    }
}

/// A model's own defaults for keys a request leaves out (`[models.NAME]` in the config):
/// they come after the request's values and before the built-in [`defaults`]; and its own
/// size limits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelDefaults {
    /// Denoising steps.
    pub steps: Option<u32>,
    /// Guidance scale.
    pub guidance_scale: Option<f64>,
    /// Scheduler name.
    pub scheduler: Option<String>,
    /// Width in pixels.
    pub width: Option<u32>,
    /// Height in pixels.
    pub height: Option<u32>,
    /// Widest image for this model (default: 8 × its native size).
    pub max_width: Option<u32>,
    /// Tallest image for this model (default: 8 × its native size).
    pub max_height: Option<u32>,
    /// `a1111_pad_cond_uncond` for requests that leave it out.
    pub a1111_pad_cond_uncond: Option<bool>,
    /// `preview_decoder`: the model's tiny VAE decoder folder for `taesd` previews,
    /// instead of the model folder's own `taesd_decoder/`.
    pub preview_decoder: Option<std::path::PathBuf>,
    /// The model's LoRA folders, in search order (`[models.NAME] loras`, then `[loras]
    /// path`).
    pub lora_dirs: Vec<std::path::PathBuf>,
}

impl ModelDefaults {
    /// No model defaults.
    pub const NONE: ModelDefaults = ModelDefaults {
        steps: None,
        guidance_scale: None,
        scheduler: None,
        width: None,
        height: None,
        max_width: None,
        max_height: None,
        a1111_pad_cond_uncond: None,
        preview_decoder: None,
        lora_dirs: Vec::new(),
    };

    /// The configured limit for `key` (`width` or `height`).
    pub fn max_side(&self, key: &str) -> Option<u32> {
        match key {
            "width" => self.max_width,
            _ => self.max_height,
        }
    }
}

/// Why a request was refused. Each message names the key or the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A value is out of range, or not one the model or scheduler takes.
    #[error("'{key}': {message}")]
    Invalid {
        /// The request key (as D-Bus and the CLI name it).
        key: &'static str,
        /// Why, and what would be accepted.
        message: String,
    },
    /// A LoRA name is not in the model's LoRA folders (as last scanned).
    #[error("'{key}': unknown LoRA '{name}' ({known})")]
    UnknownLora {
        /// `loras`, or `prompt` for a `<lora:...>` tag.
        key: &'static str,
        /// The name asked for (escaped and cut short).
        name: String,
        /// The known names, or why there are none.
        known: String,
    },
    /// A field of one of the request's ControlNets (`controls[index].field`) is missing
    /// or wrong.
    #[error("'controls[{index}].{field}': {message}")]
    Control {
        /// The ControlNet's place in `controls`.
        index: usize,
        /// The field (`controlnet`, `image`, `scale`, `start`, `end`).
        field: &'static str,
        /// Why, and what would be accepted.
        message: String,
    },
    /// The model name is not configured.
    #[error("unknown model '{name}' (configured: {known})")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// No model was named and there is no default.
    #[error("no model named and no default_model configured")]
    NoDefaultModel,
    /// The request's estimated peak memory is over the budget.
    #[error(
        "'width*height': {width}x{height} with {images} image(s) needs about {needed}, more than the memory budget of {budget}; {fits}"
    )]
    TooLarge {
        /// The size asked for.
        width: usize,
        /// The size asked for.
        height: usize,
        /// Images in the request.
        images: usize,
        /// The estimate, formatted.
        needed: String,
        /// The budget, formatted.
        budget: String,
        /// What would fit, in words.
        fits: String,
    },
    /// The model is configured but its folder could not be opened or checked.
    #[error("model '{name}': {message}")]
    ModelUnavailable {
        /// The model's name.
        name: String,
        /// Why (names the file).
        message: String,
    },
}

impl RequestError {
    pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> RequestError {
        RequestError::Invalid {
            key,
            message: message.into(),
        }
    }
}
