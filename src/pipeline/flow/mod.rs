//! Flow-matching transformer pipelines (Stable Diffusion 3/3.5, FLUX.1), as diffusers'
//! `StableDiffusion3Pipeline` and `FluxPipeline` run them through Optimum's ONNX Runtime
//! pipelines: text → conditioning → the transformer, stepped by
//! `FlowMatchEulerDiscreteScheduler` → VAE → image.
//!
//! The loop here is the families' common part; what differs lives behind [`Denoiser`],
//! one file per family ([`sd3`], [`flux`]): which text encoders make the conditioning,
//! how the scheduler is set for an image size, and one guided prediction (the
//! transformer's inputs, latent packing, classifier-free or embedded guidance). A new
//! family is one more implementation; the loop does not change.
//!
//! Text to image, in process ([`TransformerPipeline::generate`]); the daemon, requests and
//! image-to-image come on top of it.
//!
//! The denoising loop allocates nothing per step: once per generation, after the
//! conditioning, [`Denoiser::prepare`] makes the transformer's buffers for the latents'
//! shape (`io`: for an all-f32 graph its inputs and outputs bound once with an
//! `IoBinding`, the conditioning moved into tensors without a copy), and each step
//! refills them in place; [`Denoiser::predict`] hands back a view of the prediction for
//! the scheduler. Graphs with other element types keep converting their inputs per run.

pub mod edit;
pub mod flux;
mod io;
pub mod sd3;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayView4, ArrayViewD, IxDyn};
use ort::session::RunOptions;
use serde_json::Value;

use std::time::Instant;

use super::components::{VaeDecoder, VaeEncoder};
use super::image::{self, GeneratedImage};
use super::preprocess;
use super::{Generation, PipelineError, ProgressFn, StageTimings};
use crate::model::ModelError;
use crate::request::ResolvedRequest;
use crate::rng::{NoiseSource, TorchGenerator};
use crate::runtime::Runtime;
use crate::runtime::tensorrt::{Component, SessionShapes};
use crate::scheduler::flow_match::FLOW_EULER;
use crate::scheduler::flow_match::{FlowMatchEuler, FlowPipeline};

/// Latent channels of SD3's and FLUX's VAE.
pub const LATENT_CHANNELS: usize = 16;

/// What one text-to-image request of a flow model says.
#[derive(Debug, Clone)]
pub struct FlowParams {
    /// The prompt (every text encoder gets it).
    pub prompt: String,
    /// The negative prompt (SD3 with guidance); `None`: the empty prompt.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// SD3: the classifier-free guidance scale (> 1 runs the unconditional batch). FLUX
    /// dev-style models: the guidance embedding's value. FLUX schnell-style: unused.
    pub guidance_scale: f64,
    /// The torch CPU generator's seed.
    pub seed: u64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images from the prompt.
    pub num_images: usize,
    /// T5 tokens (the `max_sequence_length` of the pipelines).
    pub max_sequence_length: usize,
    /// FLUX: with a negative prompt and a value above 1, diffusers' true classifier-free
    /// guidance (two transformer runs a step); 1 otherwise.
    pub true_cfg_scale: f64,
    /// Image-to-image or inpainting (SD3).
    pub edit: Option<edit::FlowEdit>,
}

impl FlowParams {
    /// A resolved request's parameters (its model's default sequence length when it has
    /// none; FLUX's true classifier-free guidance is not a request key). An edit's images
    /// are decoded here: the init image resized to the request's size (Lanczos, as
    /// diffusers' image processor), the mask binarized and taken at every `vae_factor`-th
    /// pixel (nearest), as the SD3 inpainting pipeline does.
    pub fn from_request(
        r: &ResolvedRequest,
        vae_factor: usize,
    ) -> Result<FlowParams, PipelineError> {
        let decode = |param: &'static str, bytes: &[u8]| {
            preprocess::decode_rgb(bytes)
                .map_err(|message| PipelineError::InvalidArgument { param, message })
        };
        let edit = match &r.edit {
            None => None,
            Some(e) => {
                let init = decode("init_image", e.init.bytes())?;
                let mask = match &e.mask {
                    Some(m) => {
                        let rgb = decode("mask_image", m.bytes())?;
                        let pixels = preprocess::mask_pixels(&rgb, r.width, r.height);
                        Some(preprocess::latent_mask(&pixels, vae_factor))
                    }
                    None => None,
                };
                Some(edit::FlowEdit {
                    init: preprocess::init_tensor(&init, r.width, r.height),
                    mask,
                    strength: e.strength,
                })
            }
        };
        Ok(FlowParams {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            steps: r.steps,
            guidance_scale: r.guidance_scale,
            seed: r.seed,
            width: r.width,
            height: r.height,
            num_images: r.num_images,
            max_sequence_length: r.max_sequence_length.unwrap_or(256),
            true_cfg_scale: 1.0,
            edit,
        })
    }
}

/// One flow family's model parts around the shared loop.
pub trait Denoiser: Send {
    /// Encodes the request's prompts; kept for the steps that follow.
    fn condition(&mut self, p: &FlowParams) -> Result<(), PipelineError>;

    /// Which pipeline's scheduler setup the family follows (FLUX's explicit sigmas and
    /// `mu`).
    fn pipeline(&self) -> FlowPipeline;

    /// Makes a generation's buffers for latents `dims` `[n, 16, h, w]`, after
    /// [`Denoiser::condition`]: the transformer's inputs and outputs (bound once for an
    /// all-f32 graph, with the conditioning) and the prediction's buffer. The steps refill
    /// them.
    fn prepare(&mut self, dims: [usize; 4]) -> Result<(), PipelineError>;

    /// The guided velocity at timestep `t` (`sigma · 1000`) for `latents`
    /// `[n, 16, h, w]` (the prepared shape), in the same layout: a view of the
    /// generation's buffers, valid until the next call.
    fn predict(
        &mut self,
        latents: &Array4<f32>,
        t: f32,
        run_options: &RunOptions,
    ) -> Result<ArrayView4<'_, f32>, PipelineError>;

    /// Test hook: `true` runs all-f32 graphs with their inputs converted per run too, as
    /// other graphs run (from the next [`Denoiser::prepare`]).
    #[doc(hidden)]
    fn force_converted(&mut self, converted: bool);
}

/// A loaded flow model: its family's [`Denoiser`], scheduler config and VAE decoder.
pub struct TransformerPipeline {
    dir: PathBuf,
    denoiser: Box<dyn Denoiser>,
    scheduler_config: Value,
    vae: VaeDecoder,
    vae_encoder: Option<VaeEncoder>,
    vae_scaling_factor: f32,
    vae_shift_factor: f32,
    vae_scale_factor: usize,
    timesteps: Vec<f64>,
    timings: StageTimings,
}

/// Reads a JSON file of the model folder.
pub(crate) fn read_json(path: &Path) -> Result<Value, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Malformed {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| {
        ModelError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
        .into()
    })
}

/// The shapes a component's session is told of (TensorRT profiles; unused otherwise).
pub(crate) fn shapes(component: Component, tokens: usize) -> SessionShapes {
    SessionShapes {
        component,
        native_size: 1024,
        size_multiple: 16,
        vae_scale_factor: 8,
        tokens,
        unet_in_channels: LATENT_CHANNELS,
        time_cond_proj_dim: None,
    }
}

impl TransformerPipeline {
    /// Loads an Optimum export of a `StableDiffusion3Pipeline` or `FluxPipeline` folder.
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<TransformerPipeline, PipelineError> {
        let index = read_json(&dir.join("model_index.json"))?;
        let class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim_start_matches("ORT");
        let denoiser: Box<dyn Denoiser> = if class.starts_with("StableDiffusion3") {
            Box::new(sd3::Sd3::load(runtime, dir)?)
        } else if class.starts_with("Flux") {
            Box::new(flux::Flux::load(runtime, dir)?)
        } else {
            return Err(ModelError::UnsupportedPipeline {
                path: dir.join("model_index.json"),
                class: class.to_string(),
            }
            .into());
        };
        let scheduler_config = read_json(&dir.join("scheduler/scheduler_config.json"))?;
        let vae_config = read_json(&dir.join("vae_decoder/config.json"))?;
        let factor = |key: &str, default: f64| {
            vae_config
                .get(key)
                .and_then(Value::as_f64)
                .unwrap_or(default) as f32
        };
        let blocks = vae_config
            .get("block_out_channels")
            .and_then(Value::as_array)
            .map_or(4, Vec::len);
        let vae = VaeDecoder::load(
            runtime,
            &dir.join("vae_decoder/model.onnx"),
            &shapes(Component::VaeDecoder, 77),
        )?;
        let encoder_path = dir.join("vae_encoder/model.onnx");
        let vae_encoder = if encoder_path.is_file() {
            Some(VaeEncoder::load(
                runtime,
                &encoder_path,
                &shapes(Component::VaeEncoder, 77),
            )?)
        } else {
            None
        };
        Ok(TransformerPipeline {
            dir: dir.to_path_buf(),
            denoiser,
            scheduler_config,
            vae,
            vae_encoder,
            vae_scaling_factor: factor("scaling_factor", 1.0),
            vae_shift_factor: factor("shift_factor", 0.0),
            vae_scale_factor: 1 << blocks.saturating_sub(1),
            timesteps: Vec::new(),
            timings: StageTimings::default(),
        })
    }

    /// The model folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Test hook: `true` runs the transformer with its inputs converted per run, as graphs
    /// that are not all-f32 run, instead of on bound buffers.
    #[doc(hidden)]
    pub fn force_converted(&mut self, converted: bool) {
        self.denoiser.force_converted(converted);
    }

    /// The timesteps the transformer saw in the last generation (`sigma · 1000`).
    pub fn last_timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Generates `p.num_images` images from the prompt.
    pub fn generate(&mut self, p: &FlowParams) -> Result<Vec<GeneratedImage>, PipelineError> {
        let run_options = RunOptions::new().map_err(|e| PipelineError::Inference {
            component: "runtime".into(),
            message: e.to_string(),
        })?;
        self.generate_with(p, &run_options, &mut |_, _| true)
    }

    /// Generates resolved requests one after the other (each its own transformer batch),
    /// with `run_options` (another thread may terminate a run) and `progress` after each
    /// step (false stops).
    pub fn run(
        &mut self,
        batch: &[&ResolvedRequest],
        run_options: &RunOptions,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        let steps: usize = batch.iter().map(|r| r.steps).sum();
        let mut done = 0;
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            let params = FlowParams::from_request(r, self.vae_scale_factor)?;
            let images =
                self.generate_with(&params, run_options, &mut |i, _| progress(done + i, steps))?;
            done += r.steps;
            out.push(Generation {
                images,
                scheduler: FLOW_EULER,
                timesteps: self.timesteps.clone(),
                timings: self.timings.clone(),
                loras: Vec::new(),
            });
        }
        Ok(out)
    }

    /// [`TransformerPipeline::generate`] with run options and a progress callback
    /// (step done, steps; false stops with [`PipelineError::Cancelled`]).
    pub fn generate_with(
        &mut self,
        p: &FlowParams,
        run_options: &RunOptions,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let multiple = self.vae_scale_factor * 2;
        if !p.width.is_multiple_of(multiple)
            || !p.height.is_multiple_of(multiple)
            || p.width == 0
            || p.height == 0
        {
            return Err(PipelineError::InvalidArgument {
                param: "width",
                message: format!(
                    "{}x{} is not a multiple of {multiple} (the VAE factor times the 2x2 patches)",
                    p.width, p.height
                ),
            });
        }
        let mut timings = StageTimings::default();
        let mut sched = FlowMatchEuler::from_config(&self.scheduler_config)?;
        sched.set_timesteps_for(self.denoiser.pipeline(), p.steps, p.height, p.width)?;
        let t0 = Instant::now();
        self.denoiser.condition(p)?;
        timings.text_encoder = t0.elapsed();
        let (h, w) = (
            p.height / self.vae_scale_factor,
            p.width / self.vae_scale_factor,
        );
        let mut generator = TorchGenerator::new(p.seed);
        let (begin, mut latents, mut blend) = match &p.edit {
            None => {
                // One draw for the whole batch, in diffusers' latent shape (before FLUX's
                // packing).
                let mut latents = Array4::<f32>::zeros((p.num_images, LATENT_CHANNELS, h, w));
                generator.fill_randn(latents.as_slice_mut().expect("standard layout"));
                (0, latents, None)
            }
            Some(e) => {
                let begin = sched.apply_strength(e.strength)?.begin_index;
                let encoder =
                    self.vae_encoder
                        .as_mut()
                        .ok_or_else(|| PipelineError::InvalidArgument {
                            param: "init_image",
                            message: "the model folder has no vae_encoder".into(),
                        })?;
                let t0 = Instant::now();
                let scale = (p.num_images, self.vae_scaling_factor, self.vae_shift_factor);
                let (latents, blend) = edit::start(
                    e,
                    encoder,
                    &mut generator,
                    scale,
                    &sched,
                    begin,
                    run_options,
                )?;
                timings.vae += t0.elapsed();
                (begin, latents, blend)
            }
        };
        let t0 = Instant::now();
        let (n, c, h, w) = latents.dim();
        self.denoiser.prepare([n, c, h, w])?;
        timings.unet += t0.elapsed();
        let timesteps: Vec<f32> = sched.timesteps().to_vec();
        let last = timesteps.len().saturating_sub(1);
        // Each step refills the buffers `prepare` made: nothing is allocated per step.
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let t0 = Instant::now();
            let velocity = self.denoiser.predict(&latents, t, run_options)?;
            let t1 = Instant::now();
            sched.step(
                velocity.as_slice().expect("standard layout"),
                latents.as_slice_mut().expect("standard layout"),
            )?;
            if let Some(b) = blend.as_mut() {
                b.apply(&sched, i, i == last, &mut latents)?;
            }
            timings.unet += t1 - t0;
            timings.unet_calls += 1;
            timings.scheduler += t1.elapsed();
            if !progress(i + 1 - begin, timesteps.len() - begin) {
                return Err(PipelineError::Cancelled);
            }
        }
        self.timesteps = timesteps[begin..].iter().map(|&t| f64::from(t)).collect();
        let t0 = Instant::now();
        // diffusers' SD3 inpainting pipeline decodes `latents / scaling_factor` without the
        // shift the other pipelines add back; the reference is followed.
        let inpaint = p.edit.as_ref().is_some_and(|e| e.mask.is_some());
        let shift = if inpaint { 0.0 } else { self.vae_shift_factor };
        let scale = self.vae_scaling_factor;
        latents.mapv_inplace(|x| x / scale + shift);
        let decoded = self.vae.decode(
            ArrayViewD::from_shape(
                IxDyn(latents.shape()),
                latents.as_slice().expect("standard"),
            )
            .map_err(|e| PipelineError::Inference {
                component: "vae_decoder".into(),
                message: e.to_string(),
            })?,
            run_options,
        )?;
        timings.vae = t0.elapsed();
        let t0 = Instant::now();
        let images = image::postprocess(decoded.view());
        timings.postprocess = t0.elapsed();
        self.timings = timings;
        Ok(images)
    }
}
