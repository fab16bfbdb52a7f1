//! [`resolve`]: defaults filled in, values checked against the model and the limits, the
//! scheduler name resolved. Pure: the model's facts come in as an opened
//! [`ModelBundle`], the random seed from the caller.

use ndarray::ArrayD;

use super::{GenerateRequest, ImageInput, Limits, ModelDefaults, RequestError, defaults};
use crate::lora::{LoraCatalog, LoraSpec};
use crate::model::ModelBundle;
use crate::prompt_syntax::{self, PromptSyntax};
use crate::rng::RngKind;
use crate::scheduler;
pub use controls::Control;
use edit::resolve_edit;

/// The model a request runs on: its configured name (or folder, in-process), its opened
/// bundle and its configured defaults.
#[derive(Debug, Clone, Copy)]
pub struct ModelRef<'a> {
    /// The name requests and results use.
    pub name: &'a str,
    /// The opened, checked folder.
    pub bundle: &'a ModelBundle,
    /// `[models.NAME]` defaults ([`ModelDefaults::NONE`] when there is no config).
    pub defaults: &'a ModelDefaults,
    /// The LoRA files requests may name ([`LoraCatalog::none`]: none).
    pub loras: &'a LoraCatalog,
}

/// What separates a model's name from its LoRA set in [`ResolvedRequest::model_key`].
pub const LORA_SET: &str = "+lora:";

/// A model's default size limit, as a multiple of its native size (`[models.NAME]`
/// `max_width`/`max_height` set it otherwise; the global `[limits]` cap it either way).
pub const NATIVE_SIZE_FACTOR: usize = 8;

/// A request with every value present and checked; build it with [`resolve`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ResolvedRequest {
    /// The model's name.
    pub model: String,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt; `None` is diffusers' default (empty prompt, or zeros on SDXL).
    pub negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of the model's VAE factor.
    pub width: usize,
    /// Image height in pixels, a multiple of the model's VAE factor.
    pub height: usize,
    /// Denoising steps, a count the scheduler accepts.
    pub steps: usize,
    /// Classifier-free guidance scale (finite); ≤ 1 skips the unconditional pass.
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale`, in 0..=1.
    pub guidance_rescale: f64,
    /// The scheduler, by its diffusiond name.
    pub scheduler: &'static str,
    /// The seed (below 2^32 for numpy).
    pub seed: u64,
    /// Which reference generator the seed means.
    pub rng: RngKind,
    /// Images from the prompt, at least 1.
    pub num_images: usize,
    /// Queue priority.
    pub priority: i32,
    /// Initial latents instead of drawing them (`[num_images, 4, h/f, w/f]`, unscaled).
    pub latents: Option<ArrayD<f32>>,
    /// Image-to-image or inpainting: the images and the strength.
    pub edit: Option<Edit>,
    /// An LCM-distilled UNet (`time_cond_proj_dim`): the guidance scale goes into its
    /// `timestep_cond` embedding, and there is no classifier-free guidance batch.
    pub guidance_embedding: bool,
    /// How the prompt and negative prompt are read.
    pub prompt_syntax: PromptSyntax,
    /// Most 75-token chunks an AUTOMATIC1111-syntax prompt may take (`limits.max_prompt_chunks`;
    /// counted when the job's text is tokenized).
    pub max_prompt_chunks: usize,
    /// `prompt_syntax` `a1111`: pad the shorter of the prompt and the negative prompt with
    /// empty chunks (webui's `pad_cond_uncond`); false: separate UNet runs when their
    /// lengths differ (webui's default).
    pub a1111_pad_cond_uncond: bool,
    /// `prompt_syntax` `a1111`: the prompt's `AND` parts (1 without `AND`); each is a UNet
    /// row per image.
    pub a1111_parts: usize,
    /// Send a preview of the first image every this many steps (and after the last); 0:
    /// none. May exceed `steps` (then only the last step's preview is sent).
    pub preview_every: usize,
    /// How previews are decoded (`taesd` only on a model with a tiny VAE decoder).
    pub preview_method: super::PreviewMethod,
    /// How long the model stays loaded after this job; `None`: `jobs.idle_unload_secs`.
    pub keep_alive: Option<super::KeepAlive>,
    /// The LoRAs merged into the model's weights, sorted by name (empty: the base model).
    pub loras: Vec<LoraSpec>,
    /// The `loras` key as given (the prompt's `<lora:…>` tags stay in the prompt).
    pub lora_key: Vec<(String, f64)>,
    /// The T5 sequence length of a flow model's request (`None` for the UNet families).
    pub max_sequence_length: Option<usize>,
    /// The ControlNets that steer it, in request order (empty: none).
    pub controls: Vec<Control>,
    /// diffusers' `guess_mode` for them (false without ControlNets).
    pub control_guess_mode: bool,
}

/// What an image-to-image or inpainting request starts from. The image's size (rounded
/// down to the VAE factor) is the request's `width` × `height`.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    /// The init image as sent (its header was read; it is decoded when the job runs).
    pub init: ImageInput,
    /// The mask (same size as the init image), for inpainting.
    pub mask: Option<ImageInput>,
    /// In (0, 1]: the share of the schedule that runs (`int(steps * strength)` steps).
    pub strength: f64,
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Text to image.
    Txt2Img,
    /// Image to image (`init_image`).
    Img2Img,
    /// Inpainting (`init_image` and `mask_image`).
    Inpaint,
}

impl Mode {
    /// The name PNG parameters and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
            Mode::Img2Img => "img2img",
            Mode::Inpaint => "inpaint",
        }
    }
}

/// What makes two requests share one UNet batch: size, steps, scheduler, guidance on/off,
/// mode, the strength's bits (it decides where the schedule starts), and for
/// AUTOMATIC1111 prompts a hash of the texts (their chunk count sets the length of the
/// text conditioning, which rows of one batch share), and a hash of the ControlNets (the
/// same ControlNets, scales, step ranges and control images, or none).
pub type BatchKey = (usize, usize, usize, &'static str, bool, Mode, u64, u64, u64);

impl ResolvedRequest {
    /// Whether classifier-free guidance runs (diffusers: `guidance_scale > 1`; never on an
    /// LCM-distilled UNet, which takes the scale as an embedding).
    pub fn do_cfg(&self) -> bool {
        !self.guidance_embedding && self.guidance_scale > 1.0
    }

    /// The images the memory estimate counts: each `AND` part beyond the first adds a UNet
    /// row per image, i.e. half an image of guided rows.
    pub fn memory_images(&self) -> usize {
        memory_images(self.num_images, self.a1111_parts, self.controls.len())
    }

    /// Requests with equal keys can share one UNet batch.
    pub fn batch_key(&self) -> BatchKey {
        (
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.do_cfg(),
            self.mode(),
            self.edit.as_ref().map_or(0, |e| e.strength.to_bits()),
            self.text_key(),
            self.controls_key(),
        )
    }

    /// 0 for diffusers' syntax; a hash of the prompt and negative prompt for a1111.
    fn text_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        match self.prompt_syntax {
            PromptSyntax::Diffusers => 0,
            PromptSyntax::A1111 => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (
                    &self.prompt,
                    &self.negative_prompt,
                    self.a1111_pad_cond_uncond,
                )
                    .hash(&mut h);
                h.finish() | 1
            }
        }
    }

    /// Text to image, image to image or inpainting.
    pub fn mode(&self) -> Mode {
        match &self.edit {
            None => Mode::Txt2Img,
            Some(Edit { mask: None, .. }) => Mode::Img2Img,
            Some(Edit { mask: Some(_), .. }) => Mode::Inpaint,
        }
    }

    /// Uses `latents` instead of the seed's draw; their shape must be
    /// `[num_images, 4, height/f, width/f]` for the model's VAE factor `f`.
    pub fn with_latents(
        mut self,
        latents: Option<ArrayD<f32>>,
        bundle: &ModelBundle,
    ) -> Result<ResolvedRequest, RequestError> {
        if latents.is_some() && self.edit.is_some() {
            return Err(RequestError::invalid(
                "latents",
                "image-to-image and inpainting start from the init image, not given latents",
            ));
        }
        if let Some(l) = &latents {
            let f = bundle.vae_scale_factor;
            let want = [self.num_images, 4, self.height / f, self.width / f];
            if l.shape() != want {
                return Err(RequestError::invalid(
                    "latents",
                    format!("expected shape {want:?}, got {:?}", l.shape()),
                ));
            }
        }
        self.latents = latents;
        Ok(self)
    }

    /// The request as keys, every one set (what the Job's `Request` property shows).
    pub fn to_request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            model: Some(self.model.clone()),
            width: u32::try_from(self.width).ok(),
            height: u32::try_from(self.height).ok(),
            steps: u32::try_from(self.steps).ok(),
            guidance_scale: Some(self.guidance_scale),
            guidance_rescale: Some(self.guidance_rescale),
            seed: Some(self.seed),
            rng: Some(self.rng),
            scheduler: Some(self.scheduler.to_string()),
            num_images: u32::try_from(self.num_images).ok(),
            priority: Some(self.priority),
            init_image: self.edit.as_ref().map(|e| e.init.clone()),
            mask_image: self.edit.as_ref().and_then(|e| e.mask.clone()),
            strength: self.edit.as_ref().map(|e| e.strength),
            prompt_syntax: Some(self.prompt_syntax),
            a1111_pad_cond_uncond: (self.prompt_syntax == PromptSyntax::A1111)
                .then_some(self.a1111_pad_cond_uncond),
            preview_every: u32::try_from(self.preview_every).ok(),
            preview_method: Some(self.preview_method),
            keep_alive: self.keep_alive.map(super::KeepAlive::as_secs),
            loras: (!self.lora_key.is_empty()).then(|| self.lora_key.clone()),
            max_sequence_length: self.max_sequence_length.and_then(|n| u32::try_from(n).ok()),
            controls: (!self.controls.is_empty()).then(|| {
                self.controls
                    .iter()
                    .map(|c| super::ControlInput {
                        controlnet: Some(c.controlnet.clone()),
                        image: Some(c.image.clone()),
                        scale: Some(c.scale),
                        start: Some(c.start),
                        end: Some(c.end),
                    })
                    .collect()
            }),
            control_guess_mode: self.control_guess_mode.then_some(true),
        }
    }

    /// The prompt as the text encoders read it (with `prompt_syntax` `a1111`, without
    /// its `<lora:…>` tags, as webui encodes it).
    pub fn text_prompt(&self) -> std::borrow::Cow<'_, str> {
        text_prompt(&self.prompt, self.prompt_syntax)
    }

    /// What a loaded model must be to run this request: the model's name, and with LoRAs
    /// the set (`tiny+lora:a=0.8,b=-1`). Jobs with one key share a loaded model and may
    /// batch together; another key is another set of sessions.
    pub fn model_key(&self) -> std::borrow::Cow<'_, str> {
        if self.loras.is_empty() {
            return self.model.as_str().into();
        }
        let set: Vec<String> = self
            .loras
            .iter()
            .map(|l| format!("{}={}", l.name, l.scale))
            .collect();
        format!("{}{LORA_SET}{}", self.model, set.join(",")).into()
    }

    /// The `parameters` text stored in image `image` (0-based) of this request's PNGs
    /// ([`super::infotext::format`]; [`super::infotext::parse`] reads it back).
    pub fn png_parameters(&self, provenance: &super::Provenance<'_>, image: usize) -> String {
        super::infotext::format(self, provenance, image)
    }
}

/// Bytes as people read them: `2.4 GiB`, `512 MiB`.
pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// A float as people write it: `7.5`, `5`, `0.25`, and `1e20` rather than twenty digits.
pub fn short_float(x: f64) -> String {
    let plain = format!("{x}");
    if plain.len() <= 12 {
        plain
    } else {
        format!("{x:e}")
    }
}

/// A seed from the clock and process id, for requests that give none.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 32)) & 0xffff_ffff
}

/// Fills in defaults and checks `req` against `model` and `limits`. A key the request leaves
/// out takes the model's configured default, else the folder's own (size, scheduler), else
/// the built-in one. `fresh_seed` is called only when the request has no seed. The one place requests are checked: the pipeline
/// and the engine take the result as it is.
pub fn resolve(
    req: &GenerateRequest,
    model: ModelRef<'_>,
    limits: &Limits,
    fresh_seed: impl FnOnce() -> u64,
) -> Result<ResolvedRequest, RequestError> {
    let bundle = model.bundle;
    let configured = model.defaults;
    fn invalid(key: &'static str, message: impl Into<String>) -> RequestError {
        RequestError::invalid(key, message)
    }
    let over = |key, v: usize, max: usize| -> Result<usize, RequestError> {
        if v > max {
            Err(invalid(key, format!("{v} is above the limit of {max}")))
        } else {
            Ok(v)
        }
    };
    let at_least_one = |key, v: u32| -> Result<usize, RequestError> {
        if v == 0 {
            Err(invalid(key, "must be at least 1"))
        } else {
            Ok(v as usize)
        }
    };

    over("prompt", req.prompt.len(), limits.max_prompt_bytes)?;
    if bundle.kind.is_flow() {
        flow::check(req, model.name, bundle.kind)?;
    }
    let max_sequence_length = flow::sequence_length(req, bundle)?;
    let prompt_syntax = req.prompt_syntax.unwrap_or_default();
    let (loras, lora_key) = loras::resolve(req, prompt_syntax, model.loras, limits)?;
    // What the text encoders see: webui removes extra-network tags first.
    let text = text_prompt(&req.prompt, prompt_syntax);
    let a1111_parts = match prompt_syntax {
        PromptSyntax::A1111 => a1111::parts(&text)?,
        PromptSyntax::Diffusers => 1,
    };
    if prompt_syntax == PromptSyntax::A1111 {
        // The weights must parse; the pipeline parses again when it encodes.
        prompt_syntax::parse_attention(&text).map_err(|e| invalid("prompt", e.to_string()))?;
        if let Some(n) = &req.negative_prompt {
            prompt_syntax::parse_attention(n)
                .map_err(|e| invalid("negative_prompt", e.to_string()))?;
        }
    }
    let negative_len = req.negative_prompt.as_ref().map_or(0, String::len);
    over("negative_prompt", negative_len, limits.max_prompt_bytes)?;

    let multiple = bundle.size_multiple;
    let side = |key, v: Option<u32>, max: usize| -> Result<usize, RequestError> {
        let v = match v {
            Some(v) => at_least_one(key, v)?,
            None => bundle.default_size,
        };
        // The model's own limit: configured, else a multiple of its native size.
        let model_max = configured
            .max_side(key)
            .map_or(
                bundle.default_size.saturating_mul(NATIVE_SIZE_FACTOR),
                |m| m as usize,
            )
            // SD3's position embedding covers this much and no more.
            .min(
                bundle
                    .flow
                    .as_ref()
                    .and_then(|f| f.max_side)
                    .unwrap_or(usize::MAX),
            );
        if v % multiple != 0 {
            let nearest = size::suggested_sizes(v, multiple, max.min(model_max));
            return Err(invalid(
                key,
                format!(
                    "{v} is not a multiple of {multiple}, which this model's VAE and UNet need (e.g. {nearest})"
                ),
            ));
        }
        over(key, v, max)?;
        if v > model_max {
            return Err(invalid(
                key,
                format!(
                    "{v} is above this model's limit of {model_max} ({NATIVE_SIZE_FACTOR} x its native {} unless [models.NAME] max_{key} says otherwise)",
                    bundle.default_size
                ),
            ));
        }
        Ok(v)
    };
    let edit = resolve_edit(req, bundle, limits)?;
    let (width, height) = match &edit {
        Some((_, (w, h))) => {
            // The init image's size, rounded as diffusers rounds it, under the same limits.
            let in_limits = |key, v: usize, max| {
                side(key, Some(v as u32), max).map_err(|e| {
                    invalid(
                        "init_image",
                        format!(
                            "its size rounded down to a multiple of {}, {w}x{h}: {e}",
                            bundle.vae_scale_factor
                        ),
                    )
                })
            };
            (
                in_limits("width", *w, limits.max_width)?,
                in_limits("height", *h, limits.max_height)?,
            )
        }
        None => (
            side("width", req.width.or(configured.width), limits.max_width)?,
            side(
                "height",
                req.height.or(configured.height),
                limits.max_height,
            )?,
        ),
    };
    let edit = edit.map(|(e, _)| e);
    let inpaint = edit.as_ref().is_some_and(|e| e.mask.is_some());
    let controls = controls::resolve_controls(req, model.name, bundle, limits, inpaint)?;
    if req.control_guess_mode == Some(true) && controls.is_empty() {
        return Err(invalid("control_guess_mode", "applies only with controls"));
    }
    let pixels = width.saturating_mul(height);
    over("width*height", pixels, limits.max_pixels)?;

    let steps = req.steps.or(configured.steps).unwrap_or(defaults::STEPS);
    let steps = at_least_one("steps", steps)?;
    let steps = over("steps", steps, limits.max_steps)?;
    let num_images = at_least_one("num_images", req.num_images.unwrap_or(defaults::NUM_IMAGES))?;
    let num_images = over("num_images", num_images, limits.max_images)?;

    let guidance_scale = req
        .guidance_scale
        .or(configured.guidance_scale)
        .unwrap_or(defaults::GUIDANCE_SCALE);
    if !guidance_scale.is_finite() {
        return Err(invalid(
            "guidance_scale",
            format!("{guidance_scale} is not finite"),
        ));
    }
    let max_guidance = limits.max_guidance_scale;
    if guidance_scale.abs() > max_guidance {
        return Err(invalid(
            "guidance_scale",
            format!(
                "{} is beyond the limit of {} (either sign; useful values are about 1 to 30)",
                short_float(guidance_scale),
                short_float(max_guidance)
            ),
        ));
    }
    let guidance_rescale = req.guidance_rescale.unwrap_or(defaults::GUIDANCE_RESCALE);
    if !guidance_rescale.is_finite() || !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(invalid(
            "guidance_rescale",
            format!("{guidance_rescale} is not between 0 and 1"),
        ));
    }

    let rng = req.rng.unwrap_or_default();
    let seed = match req.seed {
        Some(s) => s,
        None => fresh_seed(),
    };
    if rng == RngKind::Numpy && edit.is_some() {
        return Err(invalid(
            "rng",
            "image-to-image and inpainting draw from torch's generator, as diffusers does; use rng 'torch'",
        ));
    }
    if rng == RngKind::Numpy && seed > u64::from(u32::MAX) {
        return Err(invalid(
            "seed",
            format!("{seed} is above 2^32-1, the most numpy's RandomState takes"),
        ));
    }

    let requested = req.scheduler.as_deref().or(configured.scheduler.as_deref());
    let scheduler = match requested {
        _ if bundle.kind.is_flow() => flow::scheduler(requested, model.name)?,
        Some(name) if flow::is_flow_scheduler(name) => {
            return Err(flow::refuse_on_unet(name, model.name));
        }
        Some(name) => scheduler::NAMES
            .iter()
            .copied()
            .find(|n| *n == name)
            .ok_or_else(|| {
                invalid(
                    "scheduler",
                    scheduler::SchedulerError::Unknown(crate::wire::error::echo(name).into())
                        .to_string(),
                )
            })?,
        None => bundle.default_scheduler.ok_or_else(|| {
            invalid(
                "scheduler",
                "the model folder's scheduler is not one diffusiond knows; name one",
            )
        })?,
    };
    if let Some(budget) = limits.budget() {
        let cfg = guidance_scale > 1.0;
        let memory = &bundle.memory;
        let images = memory_images(num_images, a1111_parts, controls.len());
        let needed = memory.peak(width, height, images, cfg);
        if needed > budget {
            let fits = match memory.largest_square(budget, images, cfg, multiple) {
                Some(side) => format!(
                    "at most {side}x{side} fits for {num_images} image(s) (fewer images, or guidance at most 1, need less)"
                ),
                None if num_images > 1 => {
                    "no size fits for that many images; ask for fewer".to_string()
                }
                None => "no size fits: the model alone is near the budget".to_string(),
            };
            return Err(RequestError::TooLarge {
                width,
                height,
                images: num_images,
                needed: gib(needed),
                budget: gib(budget),
                fits,
            });
        }
    }
    // The scheduler's own rules decide which step counts it can run (the flow-matching
    // one runs any count from 1).
    if !bundle.kind.is_flow() {
        scheduler::check_steps(scheduler, &bundle.scheduler_config, steps)
            .map_err(|e| invalid("steps", e.to_string()))?;
    }
    let guidance_embedding = bundle.time_cond_proj_dim.is_some();
    if let (Some(e), true) = (&edit, guidance_embedding) {
        // diffusers' LCM image-to-image pipeline: the strength goes into the LCM schedule
        // and every step runs.
        if e.mask.is_some() {
            return Err(invalid(
                "mask_image",
                "LCM-distilled models have no inpainting pipeline in diffusers; use image-to-image",
            ));
        }
        if scheduler != "lcm" {
            return Err(invalid(
                "scheduler",
                format!(
                    "image-to-image on an LCM-distilled model runs with the lcm scheduler, not '{scheduler}'"
                ),
            ));
        }
        scheduler::create_with_strength(scheduler, &bundle.scheduler_config, steps, e.strength)
            .map_err(|err| invalid("strength", err.to_string()))?;
    } else if let Some(e) = &edit
        && !bundle.kind.is_flow()
    {
        // diffusers' get_timesteps: int(steps * strength) steps run; none is an error there.
        // (The SD3 pipelines run at least one step: steps - int(steps - steps * strength).)
        if (steps as f64 * e.strength) < 1.0 {
            return Err(invalid(
                "strength",
                format!(
                    "{} of {steps} steps runs no step (int(steps * strength) must be at least 1); raise steps or strength",
                    short_float(e.strength)
                ),
            ));
        }
    }

    let preview_method = req.preview_method.unwrap_or_default();
    if preview_method == super::PreviewMethod::Taesd && bundle.preview_decoder.is_none() {
        return Err(invalid(
            "preview_method",
            format!(
                "'taesd' needs a tiny VAE decoder, and model '{}' has none (add \
                 taesd_decoder/model.onnx to its folder or set [models.{}] \
                 preview_decoder); use 'latent2rgb'",
                model.name, model.name
            ),
        ));
    }
    let resolved = ResolvedRequest {
        model: model.name.to_string(),
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        width,
        height,
        steps,
        guidance_scale,
        guidance_rescale,
        scheduler,
        seed,
        rng,
        num_images,
        priority: req.priority.unwrap_or(defaults::PRIORITY),
        latents: None,
        edit,
        guidance_embedding,
        prompt_syntax,
        max_prompt_chunks: limits.max_prompt_chunks,
        a1111_pad_cond_uncond: req
            .a1111_pad_cond_uncond
            .or(configured.a1111_pad_cond_uncond)
            .unwrap_or(false),
        a1111_parts,
        preview_every: req.preview_every.unwrap_or(0) as usize,
        preview_method,
        keep_alive: req.keep_alive.map(super::KeepAlive::parse).transpose()?,
        loras,
        lora_key,
        max_sequence_length,
        control_guess_mode: req.control_guess_mode.unwrap_or(false),
        controls,
    };
    if prompt_syntax == PromptSyntax::A1111 {
        a1111::check(&resolved)?;
    }
    Ok(resolved)
}

/// The prompt as the text encoders read it: with `prompt_syntax` `a1111`, webui's
/// extra-network tags (`<lora:…>`) removed.
fn text_prompt(prompt: &str, syntax: PromptSyntax) -> std::borrow::Cow<'_, str> {
    match syntax {
        PromptSyntax::A1111 => prompt_syntax::extra_networks::strip(prompt).into(),
        PromptSyntax::Diffusers => prompt.into(),
    }
}

/// Images as the memory estimate counts them: `parts` `AND` parts run `parts + 1` UNet rows
/// per image with guidance, where one part runs 2; each ControlNet runs on the same rows
/// in a session of its own (its own arena, about a UNet's working set: docs/memory.md), so
/// it counts the images once more.
fn memory_images(images: usize, parts: usize, controls: usize) -> usize {
    images
        .saturating_mul(parts.max(1) + 1)
        .div_ceil(2)
        .saturating_mul(1 + controls)
}

mod a1111;
mod controls;
#[cfg(test)]
mod controls_tests;
mod edit;
mod flow;
mod loras;
mod size;
#[cfg(test)]
mod tests;
