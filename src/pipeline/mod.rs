//! Text-to-image: tokenizer → text encoder(s) → denoise loop (scheduler + UNet with
//! classifier-free guidance) → VAE decoder → pixels, in the order and arithmetic of
//! diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` as Optimum runs them.

pub mod components;
pub mod image;
mod params;

use std::path::Path;
use std::time::{Duration, Instant};

use ndarray::{Array2, Array3, Array4, ArrayD, Axis, IxDyn, Zip, concatenate, s};

pub use image::GeneratedImage;
pub use params::{GenerateParams, Limits};

use crate::model::{ModelBundle, ModelError, PipelineKind};
use crate::rng::{self, NoiseSource, RngKind};
use crate::runtime::{Runtime, RuntimeError};
use crate::scheduler::{self, Scheduler, SchedulerError};
use crate::tokenizer::{ClipTokenizer, TokenizerError};
use components::{AddedCond, TextEncoder, Unet, VaeDecoder};

/// Errors from loading a pipeline or generating with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A request parameter is invalid; the message says which and why.
    #[error("invalid {param}: {message}")]
    InvalidArgument {
        /// The parameter's name (as the CLI and D-Bus call it).
        param: &'static str,
        /// Why.
        message: String,
    },
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
}

/// What the denoise loop reports after each step; returning `false` cancels.
pub type ProgressFn<'a> = dyn FnMut(usize, usize) -> bool + Send + 'a;

/// A loaded text-to-image pipeline: sessions stay open between generations.
pub struct Pipeline {
    bundle: ModelBundle,
    tokenizers: Vec<ClipTokenizer>,
    encoders: Vec<TextEncoder>,
    unet: Unet,
    vae: VaeDecoder,
    ort_version: String,
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
        let bundle = ModelBundle::open(dir)?;
        let sdxl = bundle.kind == PipelineKind::StableDiffusionXl;
        let tokenizers = bundle
            .tokenizer_dirs()
            .iter()
            .map(|d| ClipTokenizer::from_dir(d))
            .collect::<Result<Vec<_>, _>>()?;
        let encoders = bundle
            .text_encoders()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pooled = (sdxl && i == 1).then_some("text_embeds");
                TextEncoder::load(runtime, &bundle.onnx(c), sdxl, pooled)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unet = Unet::load(runtime, &bundle.onnx("unet"), sdxl)?;
        let vae = VaeDecoder::load(runtime, &bundle.onnx("vae_decoder"))?;
        Ok(Pipeline {
            bundle,
            tokenizers,
            encoders,
            unet,
            vae,
            ort_version: runtime.version().to_string(),
        })
    }

    /// The bundle this pipeline runs.
    pub fn bundle(&self) -> &ModelBundle {
        &self.bundle
    }

    /// The ONNX Runtime version, for PNG metadata.
    pub fn ort_version(&self) -> &str {
        &self.ort_version
    }

    /// Resolves the scheduler name: the request's, else the model folder's own.
    pub fn scheduler_name(&self, requested: Option<&str>) -> Result<&'static str, PipelineError> {
        match requested {
            Some(name) => scheduler::NAMES
                .iter()
                .copied()
                .find(|n| *n == name)
                .ok_or_else(|| SchedulerError::Unknown(name.to_string()).into()),
            None => self
                .bundle
                .default_scheduler
                .ok_or_else(|| PipelineError::InvalidArgument {
                    param: "scheduler",
                    message: "the model folder's scheduler is not one diffusiond knows; name one"
                        .into(),
                }),
        }
    }

    /// Generates `params.num_images` images.
    pub fn generate(
        &mut self,
        params: &GenerateParams,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Generation, PipelineError> {
        params.validate_shape(self.bundle.vae_scale_factor)?;
        let name = self.scheduler_name(params.scheduler.as_deref())?;
        let mut sched = scheduler::create(name, &self.bundle.scheduler_config, params.steps)?;
        let mut timings = StageTimings::default();

        let t0 = Instant::now();
        let cond = self.encode_prompts(params)?;
        timings.text_encoder = t0.elapsed();

        let (mut latents, mut noise) = self.initial_latents(params, sched.as_ref())?;
        self.denoise(
            params,
            &cond,
            sched.as_mut(),
            &mut latents,
            noise.as_mut(),
            &mut timings,
            progress,
        )?;

        let t0 = Instant::now();
        let decoded = self.decode(latents)?;
        timings.vae = t0.elapsed();
        let t0 = Instant::now();
        let images = image::postprocess(decoded.view());
        timings.postprocess = t0.elapsed();
        Ok(Generation {
            images,
            scheduler: name,
            timesteps: sched.timesteps().to_vec(),
            timings,
        })
    }

    /// Initial latents and the noise stream for stochastic steps.
    ///
    /// * torch: `torch.randn(shape, generator)`; the same generator feeds later steps.
    /// * numpy: `RandomState(seed).randn(shape)`; step noise from a torch generator with the
    ///   same seed (diffusers' ONNX pipeline leaves it undefined; this makes it reproducible).
    /// * given latents (`--latents`) replace the draw, as diffusers' `latents=` does.
    ///
    /// All are then multiplied by the scheduler's `init_noise_sigma` in f32.
    fn initial_latents(
        &self,
        params: &GenerateParams,
        sched: &dyn Scheduler,
    ) -> Result<(Array4<f32>, Box<dyn NoiseSource>), PipelineError> {
        let f = self.bundle.vae_scale_factor;
        let shape = (params.num_images, 4, params.height / f, params.width / f);
        let invalid = |message: String| PipelineError::InvalidArgument {
            param: "seed",
            message,
        };
        let mut latents = match &params.latents {
            Some(given) => given.clone().into_shape_with_order(shape).map_err(|_| {
                PipelineError::InvalidArgument {
                    param: "latents",
                    message: format!("expected shape {shape:?}, got {:?}", given.shape()),
                }
            })?,
            None => {
                let mut l = Array4::<f32>::zeros(shape);
                let mut first = rng::noise_source(params.rng, params.seed)
                    .map_err(|e| invalid(e.to_string()))?;
                first.fill_randn(l.as_slice_mut().unwrap_or(&mut []));
                if params.rng == RngKind::Torch {
                    let sigma = sched.init_noise_sigma();
                    l.mapv_inplace(|x| x * sigma);
                    return Ok((l, first));
                }
                l
            }
        };
        let sigma = sched.init_noise_sigma();
        latents.mapv_inplace(|x| x * sigma);
        let noise =
            rng::noise_source(RngKind::Torch, params.seed).map_err(|e| invalid(e.to_string()))?;
        Ok((latents, noise))
    }
}

/// Text conditioning for the UNet, already laid out as the UNet batch wants it.
struct Conditioning {
    /// `[2N or N, 77, D]`: uncond rows first when CFG is on.
    hidden: ArrayD<f32>,
    /// SDXL: pooled embeddings `[2N or N, P]` and time ids `[2N or N, 6]`.
    added: Option<(ArrayD<f32>, ArrayD<f32>)>,
}

impl Pipeline {
    /// Encodes prompt and negative prompt as diffusers' `encode_prompt` does, and repeats
    /// each for `num_images` (uncond block first, then cond).
    fn encode_prompts(&mut self, params: &GenerateParams) -> Result<Conditioning, PipelineError> {
        let cfg = params.do_cfg();
        let (cond, cond_pooled) = self.encode_text(&params.prompt)?;
        let negative = params.negative_prompt.as_deref().unwrap_or("");
        let zero_uncond = self.bundle.kind == PipelineKind::StableDiffusionXl
            && self.bundle.force_zeros_for_empty_prompt
            && params.negative_prompt.is_none();
        let uncond = if !cfg {
            None
        } else if zero_uncond {
            Some((
                Array3::zeros(cond.raw_dim()),
                cond_pooled.as_ref().map(|p| Array2::zeros(p.raw_dim())),
            ))
        } else {
            Some(self.encode_text(negative)?)
        };
        let n = params.num_images;
        let repeat3 = |a: &Array3<f32>| repeat_rows(a.view().into_dyn(), n);
        let repeat2 = |a: &Array2<f32>| repeat_rows(a.view().into_dyn(), n);
        let mut hidden = repeat3(&cond);
        let mut pooled = cond_pooled.as_ref().map(repeat2);
        if let Some((u, up)) = &uncond {
            hidden =
                concatenate(Axis(0), &[repeat3(u).view(), hidden.view()]).map_err(shape_err)?;
            if let (Some(p), Some(up)) = (&pooled, up) {
                pooled =
                    Some(concatenate(Axis(0), &[repeat2(up).view(), p.view()]).map_err(shape_err)?);
            }
        }
        let added = pooled.map(|p| {
            let rows = p.len_of(Axis(0));
            let (h, w) = (params.height as f32, params.width as f32);
            let ids = Array2::from_shape_fn((rows, 6), |(_, j)| [h, w, 0.0, 0.0, h, w][j]);
            (p, ids.into_dyn())
        });
        Ok(Conditioning { hidden, added })
    }

    /// One prompt through every tokenizer and text encoder; SDXL concatenates the two
    /// encoders' hidden states and takes the pooled output of the second.
    fn encode_text(
        &mut self,
        text: &str,
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), PipelineError> {
        let mut hiddens = Vec::new();
        let mut pooled = None;
        for (tok, enc) in self.tokenizers.iter().zip(self.encoders.iter_mut()) {
            let ids = tok.encode(text)?;
            let (h, p) = enc.encode(&[ids])?;
            hiddens.push(h);
            pooled = p.or(pooled);
        }
        let views: Vec<_> = hiddens.iter().map(|h| h.view()).collect();
        let hidden = concatenate(Axis(2), &views).map_err(shape_err)?;
        Ok((hidden, pooled))
    }

    /// The denoise loop. The UNet input buffer is allocated once and refilled each step.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &mut self,
        params: &GenerateParams,
        cond: &Conditioning,
        sched: &mut dyn Scheduler,
        latents: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
        timings: &mut StageTimings,
        progress: &mut ProgressFn<'_>,
    ) -> Result<(), PipelineError> {
        let cfg = params.do_cfg();
        let n = params.num_images;
        let (_, c, h, w) = latents.dim();
        let mut unet_in = Array4::<f32>::zeros((if cfg { 2 * n } else { n }, c, h, w));
        let mut guided = ArrayD::<f32>::zeros(IxDyn(&[n, c, h, w]));
        let mut sample = std::mem::take(latents).into_dyn();
        let timesteps = sched.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let t0 = Instant::now();
            unet_in.slice_mut(s![..n, .., .., ..]).assign(&sample);
            if cfg {
                unet_in.slice_mut(s![n.., .., .., ..]).assign(&sample);
            }
            sched.scale_model_input(unet_in.view_mut().into_dyn(), i);
            let t1 = Instant::now();
            let added = cond.added.as_ref().map(|(te, ti)| AddedCond {
                text_embeds: te.view(),
                time_ids: ti.view(),
            });
            let out = self.unet.run(
                unet_in.view().into_dyn(),
                t,
                cond.hidden.view(),
                added.as_ref(),
            )?;
            let t2 = Instant::now();
            timings.unet += t2 - t1;
            timings.unet_calls += 1;
            let model_output = if cfg {
                guide(
                    &out,
                    n,
                    params.guidance_scale as f32,
                    params.guidance_rescale as f32,
                    &mut guided,
                );
                guided.view()
            } else {
                out.view()
            };
            sched.step(model_output, i, &mut sample, noise)?;
            timings.scheduler += (t1 - t0) + t2.elapsed();
            if !progress(i + 1, total) {
                return Err(PipelineError::Cancelled);
            }
        }
        *latents = sample.into_dimensionality().map_err(shape_err)?;
        Ok(())
    }

    /// `latents / scaling_factor (+ shift)` → VAE decoder.
    fn decode(&mut self, mut latents: Array4<f32>) -> Result<ArrayD<f32>, PipelineError> {
        let scale = self.bundle.vae_scaling_factor as f32;
        let shift = self.bundle.vae_shift_factor.unwrap_or(0.0) as f32;
        latents.mapv_inplace(|x| x / scale + shift);
        self.vae.decode(latents.view().into_dyn())
    }
}

/// Classifier-free guidance, into `out` (`[N,...]`):
/// `uncond + g * (text - uncond)`, then diffusers' `rescale_noise_cfg` when `rescale > 0`.
fn guide(unet_out: &ArrayD<f32>, n: usize, g: f32, rescale: f32, out: &mut ArrayD<f32>) {
    let uncond = unet_out.slice_axis(Axis(0), (..n).into());
    let text = unet_out.slice_axis(Axis(0), (n..).into());
    Zip::from(&mut *out)
        .and(&uncond)
        .and(&text)
        .for_each(|o, &u, &t| *o = u + g * (t - u));
    if rescale > 0.0 {
        for (mut cfg_row, text_row) in out.axis_iter_mut(Axis(0)).zip(text.axis_iter(Axis(0))) {
            let factor = std_unbiased(text_row.iter()) / std_unbiased(cfg_row.iter());
            cfg_row.mapv_inplace(|x| rescale * (x * factor) + (1.0 - rescale) * x);
        }
    }
}

/// `torch.std` over all elements (Bessel-corrected), accumulated in f64.
fn std_unbiased<'a>(values: impl Iterator<Item = &'a f32> + Clone) -> f32 {
    let (mut n, mut sum) = (0usize, 0f64);
    for &v in values.clone() {
        n += 1;
        sum += f64::from(v);
    }
    let mean = sum / n as f64;
    let ss: f64 = values.map(|&v| (f64::from(v) - mean).powi(2)).sum();
    (ss / (n.saturating_sub(1).max(1)) as f64).sqrt() as f32
}

/// Repeats each row of a batch `n` times, consecutively (`repeat_interleave`).
fn repeat_rows(a: ndarray::ArrayViewD<'_, f32>, n: usize) -> ArrayD<f32> {
    let views: Vec<_> = a
        .axis_iter(Axis(0))
        .flat_map(|row| std::iter::repeat_n(row.insert_axis(Axis(0)), n))
        .collect();
    concatenate(Axis(0), &views).unwrap_or_else(|_| a.to_owned())
}

fn shape_err(e: ndarray::ShapeError) -> PipelineError {
    PipelineError::Inference {
        component: "pipeline".into(),
        message: e.to_string(),
    }
}
