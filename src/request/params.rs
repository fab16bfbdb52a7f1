//! [`GenerateParams`]: a request with every value written out, as library callers (tests,
//! benchmarks, examples) build it. It is resolved like any other request.

use ndarray::ArrayD;

use super::{GenerateRequest, ImageInput};
use crate::rng::RngKind;

/// Everything one text-to-image request says, every value given.
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
    /// Image-to-image / inpainting: the image to start from (its size, rounded down to
    /// the VAE factor, replaces `width` and `height`).
    pub init_image: Option<ImageInput>,
    /// Inpainting: the mask (white = repaint).
    pub mask_image: Option<ImageInput>,
    /// Image-to-image / inpainting strength; `None` is diffusers' default for the mode.
    pub strength: Option<f64>,
    /// How the prompt text is read.
    pub prompt_syntax: crate::prompt_syntax::PromptSyntax,
    /// `a1111` syntax: webui's "Pad prompt/negative prompt" option.
    pub a1111_pad_cond_uncond: bool,
    /// Send a preview every this many steps (and after the last) to the pipeline's preview
    /// sink; 0: none.
    pub preview_every: usize,
    /// How previews are decoded.
    pub preview_method: super::PreviewMethod,
    /// ControlNets that steer the generation (`controls`).
    pub controls: Vec<super::ControlInput>,
    /// diffusers' `guess_mode` for the ControlNets.
    pub control_guess_mode: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: None,
            steps: super::defaults::STEPS as usize,
            guidance_scale: super::defaults::GUIDANCE_SCALE,
            guidance_rescale: super::defaults::GUIDANCE_RESCALE,
            scheduler: None,
            seed: 0,
            rng: RngKind::Torch,
            latents: None,
            width: 512,
            height: 512,
            num_images: 1,
            init_image: None,
            mask_image: None,
            strength: None,
            prompt_syntax: Default::default(),
            a1111_pad_cond_uncond: false,
            preview_every: 0,
            preview_method: Default::default(),
            controls: Vec::new(),
            control_guess_mode: false,
        }
    }
}

/// A count as a request key: values past `u32` saturate, and the limits refuse them.
fn count(v: usize) -> Option<u32> {
    Some(u32::try_from(v).unwrap_or(u32::MAX))
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

    /// The same request as keys (every key set but the model and priority); the latents
    /// travel separately.
    pub fn to_request(&self) -> GenerateRequest {
        let edit = self.init_image.is_some();
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            model: None,
            width: if edit { None } else { count(self.width) },
            height: if edit { None } else { count(self.height) },
            steps: count(self.steps),
            guidance_scale: Some(self.guidance_scale),
            guidance_rescale: Some(self.guidance_rescale),
            seed: Some(self.seed),
            rng: Some(self.rng),
            scheduler: self.scheduler.clone(),
            num_images: count(self.num_images),
            priority: None,
            init_image: self.init_image.clone(),
            mask_image: self.mask_image.clone(),
            strength: self.strength,
            prompt_syntax: Some(self.prompt_syntax),
            a1111_pad_cond_uncond: Some(self.a1111_pad_cond_uncond),
            preview_every: count(self.preview_every),
            preview_method: Some(self.preview_method),
            keep_alive: None,
            loras: None,
            max_sequence_length: None,
            controls: (!self.controls.is_empty()).then(|| self.controls.clone()),
            control_guess_mode: self.control_guess_mode.then_some(true),
        }
    }
}
