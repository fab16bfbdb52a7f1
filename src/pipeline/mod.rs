//! Text-to-image: tokenizer → text encoder(s) → denoise loop (scheduler + UNet with
//! classifier-free guidance) → VAE decoder → pixels, in the order and arithmetic of
//! diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` as Optimum runs them.

mod a1111;
mod a1111_steps;
mod arena;
mod arrays;
pub mod components;
pub mod controlnet;
mod denoise_loop;
pub mod flow;
mod guidance;
pub mod image;
mod latents;
pub mod preprocess;
pub mod preview;
mod text;
mod text_cache;
pub mod unet;
mod unet_device;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array4, s};
use ort::session::RunOptions;

pub use crate::request::{GenerateParams, Limits};
pub use image::GeneratedImage;

use crate::lora::{Applied, Overrides};
use crate::model::{ModelBundle, ModelError, PipelineKind};
use crate::request::{self, ModelDefaults, ModelRef, RequestError, ResolvedRequest};
use crate::runtime::tensorrt::{Component, SessionShapes};
use crate::runtime::{Runtime, RuntimeError};
use crate::scheduler::{self, Scheduler, SchedulerError};
use crate::tokenizer::{ClipTokenizer, TokenizerError};
use arrays::shape_err;
use components::{AddedCond, TextEncoder, Unet, VaeDecoder, VaeEncoder};
use denoise_loop::Start;
use guidance::Guidance;
use latents::{BatchNoise, draw_latents};
use text::TextConditioning;

/// Errors from loading a pipeline or generating with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A request parameter is invalid; the message says which and why, and starts with
    /// the key in quotes as every `InvalidArgument` does (`'prompt': ...`).
    #[error("'{param}': {message}")]
    InvalidArgument {
        /// The parameter's name (as the CLI and D-Bus call it).
        param: &'static str,
        /// Why.
        message: String,
    },
    /// The request was refused by the resolve step.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The model folder is missing, malformed or has the wrong graphs.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// ONNX Runtime could not load a session.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The scheduler rejected its configuration or the step count.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// A LoRA file could not be applied to the model (boxed: it names files and keys).
    #[error(transparent)]
    Lora(Box<crate::lora::LoraError>),
    /// A session run failed.
    #[error("{component}: inference failed: {message}")]
    Inference {
        /// The component folder (`unet`, ...).
        component: String,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The job was cancelled between steps.
    #[error("cancelled")]
    Cancelled,
    /// The generation stopped between steps for more urgent work that cannot be held in
    /// memory beside it; its jobs go back to the queue and start again.
    #[error("preempted: put back in the queue")]
    Preempted,
    /// A stage produced NaN or infinite values: the result would be garbage (a black or
    /// flat image), so the job stops instead.
    #[error("{stage}{}: produced non-finite values (NaN or infinity); the job was stopped", step.map(|(i, n)| format!(" step {i} of {n}")).unwrap_or_default())]
    NonFinite {
        /// `denoise` or `vae`.
        stage: &'static str,
        /// The denoising step (1-based) and the step count, for `denoise`.
        step: Option<(usize, usize)>,
    },
    /// Encoding or writing an image failed.
    #[error("image: {0}")]
    Image(String),
}

/// Time spent in each stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct StageTimings {
    /// Tokenizer and text encoder(s).
    pub text_encoder: Duration,
    /// UNet session runs, all steps.
    pub unet: Duration,
    /// Everything else in the denoise loop: CFG arithmetic, scheduler steps, noise.
    pub scheduler: Duration,
    /// VAE decoder run.
    pub vae: Duration,
    /// Pixel conversion.
    pub postprocess: Duration,
    /// Number of UNet runs.
    pub unet_calls: usize,
    /// ControlNet session runs, all steps.
    pub controlnet: Duration,
}

impl StageTimings {
    /// Logs the stage times at debug level (the job result carries them too).
    fn log(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            text_encoder_ms = ms(self.text_encoder),
            unet_ms = ms(self.unet),
            unet_calls = self.unet_calls,
            controlnet_ms = ms(self.controlnet),
            scheduler_ms = ms(self.scheduler),
            vae_ms = ms(self.vae),
            postprocess_ms = ms(self.postprocess),
            "stage timings"
        );
    }
}

impl From<crate::lora::LoraError> for PipelineError {
    fn from(e: crate::lora::LoraError) -> Self {
        PipelineError::Lora(Box::new(e))
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The images, `num_images` of them.
    pub images: Vec<GeneratedImage>,
    /// The scheduler actually used.
    pub scheduler: &'static str,
    /// The timesteps the UNet saw.
    pub timesteps: Vec<f64>,
    /// Per-stage timings.
    pub timings: StageTimings,
    /// The LoRA files merged into the weights that made it (PNG `Lora hashes`).
    pub loras: Vec<Applied>,
}

/// What the denoise loop reports after each step; returning `false` cancels.
pub type ProgressFn<'a> = dyn FnMut(usize, usize) -> bool + Send + 'a;

/// Called between two steps of every generation (after its progress): may run other
/// generations on the same pipeline, and returns whether it did (the suspended
/// generation then restores what they changed: the UNet's bound buffers and guidance
/// embedding), or [`PipelineError::Preempted`] to stop this one and put it back.
pub type Interlude = dyn FnMut(&mut Pipeline) -> Result<bool, PipelineError> + Send;

/// A loaded text-to-image pipeline: sessions stay open between generations.
pub struct Pipeline {
    bundle: Arc<ModelBundle>,
    tokenizers: Vec<ClipTokenizer>,
    encoders: Vec<TextEncoder>,
    unet: Unet,
    vae: VaeDecoder,
    /// An fp32 VAE decoder for latents `vae` (fp16) turns into non-finite values.
    vae_fp32: Option<VaeDecoder>,
    /// The VAE encoder, when the folder has one (image-to-image and inpainting).
    vae_encoder: Option<VaeEncoder>,
    ort_version: String,
    /// Text-encoder outputs of recent prompts: a batch repeats prompts and negative
    /// prompts, and a text encoder's output depends on the text alone.
    text_cache: text_cache::TextCache,
    /// Run options that shrink the CPU arena after a large batch, after its first UNet
    /// step, and after a batch that stopped early ([`arena`]).
    arena: arena::ArenaOptions,
    /// Live previews ([`preview`]).
    preview: preview::Previewer,
    /// Work that may run between two steps ([`Interlude`]).
    interlude: Option<Box<Interlude>>,
    /// The LoRA files merged into this pipeline's weights (empty: the base model).
    loras: Vec<Applied>,
    /// The model folder's ControlNets (a ControlNet-ready UNet's), in name order.
    controlnets: Vec<controlnet::ControlNet>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("dir", &self.bundle.dir)
            .field("kind", &self.bundle.kind)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Opens a model folder and loads every session it needs.
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<Pipeline, PipelineError> {
        Pipeline::from_bundle(runtime, Arc::new(ModelBundle::open(dir)?))
    }

    /// Loads every session of an opened model folder.
    pub fn from_bundle(
        runtime: &Runtime,
        bundle: Arc<ModelBundle>,
    ) -> Result<Pipeline, PipelineError> {
        Pipeline::with_loras(runtime, bundle, &Overrides::none())
    }

    /// Loads every session of an opened model folder with a LoRA set's merged weights
    /// ([`crate::lora::prepare`]) in place of the base weights they replace.
    pub fn with_loras(
        runtime: &Runtime,
        bundle: Arc<ModelBundle>,
        loras: &Overrides,
    ) -> Result<Pipeline, PipelineError> {
        let sdxl = bundle.kind == PipelineKind::StableDiffusionXl;
        let tokenizers = bundle
            .tokenizer_dirs()
            .iter()
            .map(|d| ClipTokenizer::from_dir(d))
            .collect::<Result<Vec<_>, _>>()?;
        // What each graph is fed, for TensorRT's optimization profiles.
        let tokens = tokenizers
            .iter()
            .map(ClipTokenizer::max_length)
            .max()
            .unwrap_or(77);
        let shapes = |c| SessionShapes::new(c, &bundle, tokens);
        let encoders = bundle
            .text_encoders()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pooled = (sdxl && i == 1).then_some("text_embeds");
                let s = shapes(Component::TextEncoder);
                let weights = loras.for_folder(c);
                TextEncoder::load(runtime, &bundle.onnx(c), sdxl, pooled, &s, weights)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unet = Unet::load(
            runtime,
            &bundle.onnx("unet"),
            sdxl,
            &shapes(Component::Unet),
            loras.for_folder("unet"),
            &bundle.residual_shapes,
        )?;
        let controlnets = bundle
            .controlnets
            .iter()
            .map(|c| controlnet::ControlNet::load(runtime, c, sdxl, bundle.unet_residuals))
            .collect::<Result<Vec<_>, _>>()?;
        let decoder = shapes(Component::VaeDecoder);
        let vae = VaeDecoder::load(runtime, &bundle.onnx("vae_decoder"), &decoder)?;
        let vae_fp32 = if bundle.has_vae_decoder_fp32 {
            Some(VaeDecoder::load(
                runtime,
                &bundle.onnx("vae_decoder_fp32"),
                &decoder,
            )?)
        } else {
            None
        };
        let vae_encoder = if bundle.has_vae_encoder {
            let s = shapes(Component::VaeEncoder);
            Some(VaeEncoder::load(runtime, &bundle.onnx("vae_encoder"), &s)?)
        } else {
            None
        };
        let preview = preview::Previewer::load(runtime, &bundle)?;
        Ok(Pipeline {
            bundle,
            tokenizers,
            encoders,
            unet,
            vae,
            vae_fp32,
            vae_encoder,
            ort_version: runtime.version().to_string(),
            text_cache: text_cache::TextCache::default(),
            arena: arena::ArenaOptions::new(runtime)?,
            preview,
            interlude: None,
            loras: loras.applied().to_vec(),
            controlnets,
        })
    }

    /// Test hook: the UNet, e.g. to force its buffers' placement
    /// ([`Unet::force_placement`]) or read what its device path did.
    #[doc(hidden)]
    pub fn unet_mut(&mut self) -> &mut Unet {
        &mut self.unet
    }

    /// Sets (or clears) the work that may run between two steps of the next generations.
    pub fn set_interlude(&mut self, interlude: Option<Box<Interlude>>) {
        self.interlude = interlude;
    }

    /// Between two steps: the interlude, if any, with this pipeline. `Ok(true)` when it
    /// ran a generation (the caller restores its UNet state).
    fn interlude(&mut self) -> Result<bool, PipelineError> {
        let Some(mut f) = self.interlude.take() else {
            return Ok(false);
        };
        let result = f(self);
        self.interlude = Some(f);
        result
    }

    /// Where the previews of the next generations go: `Some` stacks a sink on top of the
    /// current one, `None` takes the top one off (a generation that runs in an interlude
    /// sets its own and gives the suspended one's back); calls come in pairs.
    pub fn set_preview_sink(&mut self, sink: Option<preview::PreviewSink>) {
        self.preview.set_sink(sink);
    }

    /// The bundle this pipeline runs.
    pub fn bundle(&self) -> &ModelBundle {
        &self.bundle
    }

    /// The LoRA files merged into this pipeline's weights, in order (empty: none).
    pub fn loras(&self) -> &[Applied] {
        &self.loras
    }

    /// The ONNX Runtime version, for PNG metadata.
    pub fn ort_version(&self) -> &str {
        &self.ort_version
    }

    /// Resolves explicit parameters against this model, as any request is resolved
    /// (no daemon limits: the caller owns the machine).
    pub fn resolve(&self, params: &GenerateParams) -> Result<ResolvedRequest, PipelineError> {
        let name = self.bundle.dir.display().to_string();
        let model = ModelRef {
            name: &name,
            bundle: &self.bundle,
            defaults: &ModelDefaults::NONE,
            loras: crate::lora::LoraCatalog::none(),
        };
        let resolved = request::resolve(&params.to_request(), model, &Limits::unbounded(), || {
            params.seed
        })?;
        Ok(resolved.with_latents(params.latents.clone(), &self.bundle)?)
    }

    /// Generates `params.num_images` images.
    pub fn generate(
        &mut self,
        params: &GenerateParams,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Generation, PipelineError> {
        let resolved = self.resolve(params)?;
        let run_options = RunOptions::new().map_err(|e| PipelineError::Inference {
            component: "runtime".into(),
            message: e.to_string(),
        })?;
        let mut out = self.run(&[&resolved], &run_options, progress)?;
        Ok(out.remove(0))
    }

    /// Resolves several explicit requests and runs them as one batch ([`Pipeline::run`]).
    pub fn generate_batch(
        &mut self,
        batch: &[&GenerateParams],
        run_options: &RunOptions,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        let resolved = batch
            .iter()
            .map(|p| self.resolve(p))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&ResolvedRequest> = resolved.iter().collect();
        self.run(&refs, run_options, progress)
    }

    /// Generates resolved requests in one UNet batch. They must share a batch key (same
    /// size, steps, scheduler and guidance on/off: [`ResolvedRequest::batch_key`]); each
    /// draws its own noise from its own seed, so its images are those it would get alone.
    /// `run_options` lets another thread stop a session run in flight. Nothing is checked
    /// here: the resolve step did that.
    pub fn run(
        &mut self,
        batch: &[&ResolvedRequest],
        run_options: &RunOptions,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        let Some(&first) = batch.first() else {
            return Ok(Vec::new());
        };
        debug_assert!(batch.iter().all(|p| p.batch_key() == first.batch_key()));
        let name = first.scheduler;
        let config = &self.bundle.scheduler_config;
        // diffusers' LCM image-to-image pipeline puts the strength into the LCM schedule and
        // runs every step; the others start later in the full schedule.
        let lcm_edit = first.guidance_embedding && first.edit.is_some();
        let mut sched = match &first.edit {
            Some(e) if lcm_edit => {
                scheduler::create_with_strength(name, config, first.steps, e.strength)?
            }
            _ => scheduler::create(name, config, first.steps)?,
        };
        let mut timings = StageTimings::default();
        // Stage spans: with RUST_LOG=diffusiond=debug each stage's duration is logged as it
        // closes (trace adds one span per step and per UNet run). Disabled spans cost an
        // atomic load.
        let _generate = tracing::info_span!(
            "generate",
            scheduler = name,
            steps = first.steps,
            width = first.width,
            height = first.height,
            requests = batch.len()
        )
        .entered();

        // Only a batch with a large working set hands its arena memory back afterwards;
        // small ones keep it for the next batch.
        let images: usize = batch.iter().map(|p| p.memory_images()).sum();
        let shrink_after =
            self.bundle
                .memory
                .working_set(first.width, first.height, images, first.do_cfg())
                > crate::model::memory::RELEASE_ABOVE;

        let t0 = Instant::now();
        let cond = tracing::debug_span!("text_encoder").in_scope(|| self.encode_prompts(batch))?;
        timings.text_encoder = t0.elapsed();

        let begin = match &first.edit {
            Some(e) if !lcm_edit => latents::begin_index(first.steps, e.strength, sched.order()),
            _ => 0,
        };
        let (mut latents, mut noise, inpaint) = match &first.edit {
            None => {
                let (l, n) = self.initial_latents(batch, sched.as_ref())?;
                (l, n, None)
            }
            Some(_) => {
                if !lcm_edit {
                    sched.set_begin_index(begin);
                }
                let encoder =
                    self.vae_encoder
                        .as_mut()
                        .ok_or_else(|| PipelineError::InvalidArgument {
                            param: "init_image",
                            message: "the model folder has no vae_encoder".into(),
                        })?;
                let t0 = Instant::now();
                let out = tracing::debug_span!("vae_encoder").in_scope(|| {
                    latents::edit_latents(
                        batch,
                        encoder,
                        sched.as_ref(),
                        begin,
                        &self.bundle,
                        self.arena.for_vae(shrink_after, run_options),
                    )
                })?;
                timings.vae += t0.elapsed();
                out
            }
        };
        let guidance = Guidance::for_batch(batch);
        let embedding = match (
            self.unet.takes_guidance_embedding(),
            self.bundle.time_cond_proj_dim,
        ) {
            (true, Some(dim)) => Some(guidance::guidance_embedding(batch, dim)),
            (true, None) => {
                return Err(PipelineError::Model(crate::model::ModelError::Signature {
                    path: self.bundle.onnx("unet"),
                    message: "the UNet takes 'timestep_cond' but unet/config.json has no time_cond_proj_dim".into(),
                }));
            }
            _ => None,
        };
        self.unet.set_guidance_embedding(embedding.clone());
        let previews = preview::Plan::for_batch(batch);
        let images: usize = batch.iter().map(|p| p.num_images).sum();
        let rows = if guidance.cfg { 2 * images } else { images };
        let controls = controlnet::Controls::prepare(
            &first.controls,
            &self.controlnets,
            (rows, guidance.cfg, first.control_guess_mode),
            (first.width, first.height),
        )?;
        if !controls.is_empty() && matches!(cond, TextConditioning::Scheduled(_)) {
            return Err(PipelineError::InvalidArgument {
                param: "controls",
                message: "ControlNets run with prompt_syntax 'diffusers' only".into(),
            });
        }
        let start = Start {
            begin,
            inpaint: inpaint.as_ref(),
            previews: &previews,
            embedding: embedding.as_ref(),
            controls: &controls,
        };
        tracing::debug_span!("denoise").in_scope(|| match cond {
            TextConditioning::Fixed(cond) => self.denoise(
                &cond,
                &guidance,
                sched.as_mut(),
                start,
                &mut latents,
                &mut noise,
                run_options,
                shrink_after,
                &mut timings,
                progress,
            ),
            TextConditioning::Scheduled(a1111) => {
                let (n, c, h, w) = latents.dim();
                let masked = start.masked();
                let unet_c = if masked.is_some() { 9 } else { c };
                let mut steps = a1111_steps::Steps::new(
                    a1111,
                    batch,
                    &guidance,
                    ([n, c, h, w], unet_c),
                    masked,
                )?;
                self.denoise_scheduled(
                    &mut steps,
                    &guidance,
                    sched.as_mut(),
                    start,
                    &mut latents,
                    &mut noise,
                    (run_options, shrink_after),
                    &mut timings,
                    progress,
                )
            }
        })?;

        let t0 = Instant::now();
        let decoded = tracing::debug_span!("vae")
            .in_scope(|| self.decode(latents, run_options, shrink_after))?;
        timings.vae += t0.elapsed();
        let t0 = Instant::now();
        let mut images = tracing::debug_span!("postprocess")
            .in_scope(|| image::postprocess(decoded.view()))
            .into_iter();
        timings.postprocess = t0.elapsed();
        timings.log();
        let timesteps = sched.timesteps()[begin..].to_vec();
        Ok(batch
            .iter()
            .map(|p| Generation {
                images: images.by_ref().take(p.num_images).collect(),
                scheduler: name,
                timesteps: timesteps.clone(),
                timings: timings.clone(),
                loras: self.loras.clone(),
            })
            .collect())
    }

    /// Initial latents of every request, stacked, and the noise stream for stochastic steps.
    ///
    /// * torch: `torch.randn(shape, generator)`; the same generator feeds later steps.
    /// * numpy: `RandomState(seed).randn(shape)`; step noise from a torch generator with the
    ///   same seed (diffusers' ONNX pipeline leaves it undefined; this makes it reproducible).
    /// * given latents (`--latents`) replace the draw, as diffusers' `latents=` does; step
    ///   noise then comes from a torch generator with the seed.
    ///
    /// All are multiplied by the scheduler's `init_noise_sigma` in f32.
    fn initial_latents(
        &self,
        batch: &[&ResolvedRequest],
        sched: &dyn Scheduler,
    ) -> Result<(Array4<f32>, BatchNoise), PipelineError> {
        let f = self.bundle.vae_scale_factor;
        let first = batch[0];
        let (h, w) = (first.height / f, first.width / f);
        let total: usize = batch.iter().map(|p| p.num_images).sum();
        let mut latents = Array4::<f32>::zeros((total, 4, h, w));
        let mut parts = Vec::with_capacity(batch.len());
        let mut row = 0;
        for p in batch {
            let mut block = latents.slice_mut(s![row..row + p.num_images, .., .., ..]);
            let noise = draw_latents(p, &mut block)?;
            parts.push((noise, block.len()));
            row += p.num_images;
        }
        let sigma = sched.init_noise_sigma();
        latents.mapv_inplace(|x| x * sigma);
        Ok((latents, BatchNoise { parts }))
    }
}
