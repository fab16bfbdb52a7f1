//! Generation parameters, validated at the boundary.

use ndarray::ArrayD;

use super::PipelineError;
use crate::rng::RngKind;

/// Everything one text-to-image request says.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` is diffusers' default (empty prompt, or zeros on SDXL).
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 skips the unconditional pass.
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` (0 = off).
    pub guidance_rescale: f64,
    /// Scheduler name; `None` uses the model folder's own.
    pub scheduler: Option<String>,
    /// The seed.
    pub seed: u64,
    /// Which reference generator the seed means.
    pub rng: RngKind,
    /// Initial latents instead of drawing them (`[num_images, 4, h/8, w/8]`, unscaled).
    pub latents: Option<ArrayD<f32>>,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images to generate from the prompt.
    pub num_images: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: None,
            steps: 20,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            scheduler: None,
            seed: 0,
            rng: RngKind::Torch,
            latents: None,
            width: 512,
            height: 512,
            num_images: 1,
        }
    }
}

/// Upper bounds a daemon enforces on requests.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Widest image.
    pub max_width: usize,
    /// Tallest image.
    pub max_height: usize,
    /// Most pixels per image (width × height).
    pub max_pixels: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Most images per request.
    pub max_images: usize,
    /// Longest prompt, in bytes.
    pub max_prompt_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_width: 2048,
            max_height: 2048,
            max_pixels: 2048 * 2048,
            max_steps: 200,
            max_images: 16,
            max_prompt_bytes: 4096,
        }
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> PipelineError {
    PipelineError::InvalidArgument {
        param,
        message: message.into(),
    }
}

impl GenerateParams {
    /// Whether classifier-free guidance runs (diffusers: `guidance_scale > 1`).
    pub fn do_cfg(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// Requests with equal keys can share one UNet batch: same size, steps, scheduler,
    /// and guidance on or off.
    pub fn batch_key(&self) -> (usize, usize, usize, Option<String>, bool) {
        (
            self.width,
            self.height,
            self.steps,
            self.scheduler.clone(),
            self.do_cfg(),
        )
    }

    /// Checks values that no model accepts, and the size against the VAE's factor.
    pub fn validate_shape(&self, vae_scale_factor: usize) -> Result<(), PipelineError> {
        for (param, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % vae_scale_factor != 0 {
                return Err(invalid(
                    param,
                    format!("{v} is not a positive multiple of {vae_scale_factor}"),
                ));
            }
        }
        if self.steps == 0 {
            return Err(invalid("steps", "must be at least 1"));
        }
        if self.num_images == 0 {
            return Err(invalid("num_images", "must be at least 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(invalid(
                "guidance_scale",
                format!("{} is not finite", self.guidance_scale),
            ));
        }
        if !self.guidance_rescale.is_finite() || !(0.0..=1.0).contains(&self.guidance_rescale) {
            return Err(invalid(
                "guidance_rescale",
                format!("{} is not between 0 and 1", self.guidance_rescale),
            ));
        }
        Ok(())
    }

    /// Checks the request against a daemon's limits.
    pub fn check_limits(&self, limits: &Limits) -> Result<(), PipelineError> {
        let over = |param, v: usize, max: usize| {
            (v > max).then(|| invalid(param, format!("{v} is above the limit of {max}")))
        };
        let checks = [
            over("width", self.width, limits.max_width),
            over("height", self.height, limits.max_height),
            over("width*height", self.width * self.height, limits.max_pixels),
            over("steps", self.steps, limits.max_steps),
            over("num_images", self.num_images, limits.max_images),
            over("prompt", self.prompt.len(), limits.max_prompt_bytes),
            over(
                "negative_prompt",
                self.negative_prompt.as_ref().map_or(0, String::len),
                limits.max_prompt_bytes,
            ),
        ];
        match checks.into_iter().flatten().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The `parameters` text stored in PNGs.
    pub fn png_parameters(&self, scheduler: &str, model: &str, ort_version: &str) -> String {
        format!(
            "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Guidance rescale: {}, Seed: {}, RNG: {}, Size: {}x{}, Model: {}, ONNX Runtime: {}, diffusiond: {}",
            self.prompt,
            self.negative_prompt.as_deref().unwrap_or(""),
            self.steps,
            scheduler,
            self.guidance_scale,
            self.guidance_rescale,
            self.seed,
            self.rng,
            self.width,
            self.height,
            model,
            ort_version,
            crate::VERSION
        )
    }
}
