//! Live previews of a generation (request keys `preview_every`, `preview_method`): after
//! the steps a request asks for, the predicted clean image of its first image, decoded
//! cheaply and handed to the pipeline's preview sink as a small PNG.
//!
//! What a preview shows is x0, the clean latents the scheduler predicts from the latents
//! the UNet saw and its guided output ([`Scheduler::pred_original_sample`]), never the
//! noisy latents. Two decoders:
//!
//! * `latent2rgb`: ComfyUI's Latent2RGB previewer, a fixed linear map from the 4 latent
//!   channels to RGB per model family ([`LatentFormat`]), at latent resolution.
//! * `taesd`: the model's tiny VAE decoder (diffusers' `AutoencoderTiny`, exported with the
//!   Optimum VAE decoder's names `latent_sample` → `sample`, output in [-1, 1] as
//!   `AutoencoderTiny.decode` returns it). Its latents are diffusers' latents as they are,
//!   divided by the `scaling_factor` of its own `config.json` (1.0 for `AutoencoderTiny`),
//!   never by the VAE's.
//!
//! Either way the pixels go through ComfyUI's `preview_to_image` (`((x + 1) / 2)` clamped
//! to [0, 1], times 255, truncated to bytes), are downscaled to at most [`MAX_SIDE`] pixels
//! on the long side, and are encoded as a PNG with fast compression. A preview that fails
//! is logged and skipped: it never fails the job.

use std::path::Path;

use image::ImageEncoder;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use ndarray::{ArrayViewD, Axis, IxDyn};
use ort::session::RunOptions;

use super::PipelineError;
use super::components::VaeDecoder;
use crate::model::{ModelBundle, PipelineKind};
use crate::request::{PreviewMethod, ResolvedRequest};
use crate::runtime::Runtime;
use crate::runtime::tensorrt::{Component, SessionShapes};
use crate::scheduler::Scheduler;

/// Receives one preview: the index of the request in the batch, the step done (1-based)
/// and the PNG. It must not block: a sink that cannot take it drops it.
pub type PreviewSink = Box<dyn FnMut(usize, usize, Vec<u8>) + Send>;

/// One preview waiting to be sent: the job's caller (its unique bus name), the step and
/// the PNG.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The connection that created the job: the only one the preview goes to.
    pub destination: String,
    /// The step done (1-based).
    pub step: u32,
    /// The PNG.
    pub png: Vec<u8>,
}

/// The latest unsent preview of each job, between the worker that makes them and the task
/// that sends them: one slot per job, so a preview that comes before the last one was sent
/// replaces it (previews are dropped, never queued, and never hold up a step).
#[derive(Debug, Default)]
pub struct PreviewHub {
    slots: std::sync::Mutex<std::collections::HashMap<u64, Pending>>,
    wake: tokio::sync::Notify,
    /// Previews replaced before they were sent (for tests and logs).
    replaced: std::sync::atomic::AtomicU64,
}

impl PreviewHub {
    /// Puts job `job`'s newest preview in its slot (replacing an unsent one) and wakes the
    /// sender. Never blocks for longer than a map insert.
    pub fn offer(&self, job: u64, pending: Pending) {
        let old = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job, pending);
        if old.is_some() {
            self.replaced
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    /// Takes every waiting preview.
    pub fn take(&self) -> Vec<(u64, Pending)> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect()
    }

    /// Waits until a preview is offered (returns at once when one was offered since the
    /// last wait).
    pub async fn offered(&self) {
        self.wake.notified().await;
    }

    /// Previews replaced by a newer one before they were sent.
    pub fn replaced(&self) -> u64 {
        self.replaced.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The longest side of a preview PNG, in pixels.
pub const MAX_SIDE: u32 = 256;

/// One request of a batch that wants previews.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Want {
    /// Its index in the batch (what the sink is told).
    request: usize,
    /// The latent row of its first image.
    row: usize,
    /// A preview every this many steps (≥ 1), and after the last.
    every: usize,
    /// How it is decoded.
    method: PreviewMethod,
}

/// Which requests of a batch want previews, and where their first image's row is.
#[derive(Debug, Default)]
pub(super) struct Plan {
    wants: Vec<Want>,
}

impl Plan {
    /// The plan of a batch (nothing to do when no request asks for previews).
    pub(super) fn for_batch(batch: &[&ResolvedRequest]) -> Plan {
        let mut row = 0;
        let mut wants = Vec::new();
        for (request, r) in batch.iter().enumerate() {
            if r.preview_every > 0 && r.num_images > 0 {
                wants.push(Want {
                    request,
                    row,
                    every: r.preview_every,
                    method: r.preview_method,
                });
            }
            row += r.num_images;
        }
        Plan { wants }
    }

    /// The requests due for a preview after `done` of `total` steps.
    fn due(&self, done: usize, total: usize) -> impl Iterator<Item = &Want> {
        self.wants
            .iter()
            .filter(move |w| done == total || done.is_multiple_of(w.every))
    }
}

/// ComfyUI's linear latent-to-RGB factors (`comfy/latent_formats.py`, classes `SD15` and
/// `SDXL`; `latent_preview.py`'s `Latent2RGBPreviewer` applies them as
/// `linear(x0.movedim(1, -1), factors.T, bias)`). SD 2.x uses SD1.5's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentFormat {
    /// `latent_rgb_factors`: one row of (R, G, B) weights per latent channel.
    pub factors: [[f32; 3]; 4],
    /// `latent_rgb_factors_bias` (zeros where ComfyUI has none).
    pub bias: [f32; 3],
}

impl LatentFormat {
    /// SD 1.x and 2.x (ComfyUI's `SD15`, no bias).
    pub const SD15: LatentFormat = LatentFormat {
        factors: [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        bias: [0.0, 0.0, 0.0],
    };

    /// SDXL (ComfyUI's `SDXL`, with its bias).
    pub const SDXL: LatentFormat = LatentFormat {
        factors: [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        bias: [0.1084, -0.0175, -0.0011],
    };

    /// The factors of a model family (the flow families have no previews: the resolve
    /// step refuses them, and SD1.5's factors stand in).
    pub fn for_kind(kind: PipelineKind) -> LatentFormat {
        match kind {
            PipelineKind::StableDiffusionXl => LatentFormat::SDXL,
            _ => LatentFormat::SD15,
        }
    }

    /// Clean latents `[4, h, w]` (row-major, channel first) → RGB bytes `h × w × 3`:
    /// the linear map, then [`to_byte`].
    pub fn to_rgb(&self, x0: &[f32], (h, w): (usize, usize), out: &mut Vec<u8>) {
        let plane = h * w;
        out.clear();
        out.reserve(plane * 3);
        let f = &self.factors;
        // One column of weights per output channel.
        let cols = [0, 1, 2].map(|c| [f[0][c], f[1][c], f[2][c], f[3][c]]);
        for p in 0..plane {
            let l = [x0[p], x0[plane + p], x0[2 * plane + p], x0[3 * plane + p]];
            for (col, b) in cols.iter().zip(self.bias) {
                out.push(to_byte(
                    b + l[0] * col[0] + l[1] * col[1] + l[2] * col[2] + l[3] * col[3],
                ));
            }
        }
    }
}

/// ComfyUI's `preview_to_image` for one value in [-1, 1]: `((x + 1) / 2).clamp(0, 1)`,
/// times 255, truncated as `.to(torch.uint8)` truncates.
pub fn to_byte(x: f32) -> u8 {
    (((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8
}

/// A tiny VAE decoder (`taesd_decoder/`): diffusers' `AutoencoderTiny` decoder.
pub struct TaesdDecoder {
    decoder: VaeDecoder,
    /// Its `config.json` `scaling_factor` (1.0 for `AutoencoderTiny`): latents are divided
    /// by it, as diffusers' pipelines divide by `vae.config.scaling_factor`.
    scaling_factor: f32,
    run_options: RunOptions,
}

impl std::fmt::Debug for TaesdDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaesdDecoder")
            .field("scaling_factor", &self.scaling_factor)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct TaesdConfig {
    #[serde(default = "one")]
    scaling_factor: f64,
}

fn one() -> f64 {
    1.0
}

impl TaesdDecoder {
    /// Loads `dir/model.onnx` (`latent_sample` → `sample`) and reads `dir/config.json`
    /// (missing: scaling factor 1, `AutoencoderTiny`'s).
    pub fn load(
        runtime: &Runtime,
        dir: &Path,
        bundle: &ModelBundle,
    ) -> Result<TaesdDecoder, PipelineError> {
        let config = dir.join("config.json");
        let scaling_factor = match std::fs::read(&config) {
            Ok(bytes) => {
                let c: TaesdConfig = serde_json::from_slice(&bytes).map_err(|e| {
                    PipelineError::Model(crate::model::ModelError::Malformed {
                        path: config.clone(),
                        message: e.to_string(),
                    })
                })?;
                c.scaling_factor as f32
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1.0,
            Err(e) => {
                return Err(PipelineError::Model(crate::model::ModelError::Malformed {
                    path: config,
                    message: e.to_string(),
                }));
            }
        };
        if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
            return Err(PipelineError::Model(crate::model::ModelError::Malformed {
                path: config,
                message: format!("scaling_factor {scaling_factor} is not a positive number"),
            }));
        }
        let shapes = SessionShapes::new(Component::VaeDecoder, bundle, 77);
        let decoder = VaeDecoder::load(runtime, &dir.join("model.onnx"), &shapes)?;
        let run_options = RunOptions::new().map_err(|e| PipelineError::Inference {
            component: "taesd_decoder".into(),
            message: e.to_string(),
        })?;
        Ok(TaesdDecoder {
            decoder,
            scaling_factor,
            run_options,
        })
    }

    /// Decodes diffusers' latents `[B, 4, h, w]` as `AutoencoderTiny.decode(latents /
    /// scaling_factor)` does: images `[B, 3, 8h, 8w]` in [-1, 1].
    pub fn decode(
        &mut self,
        latents: ArrayViewD<'_, f32>,
    ) -> Result<ndarray::ArrayD<f32>, PipelineError> {
        let input = if self.scaling_factor == 1.0 {
            latents.to_owned()
        } else {
            latents.mapv(|x| x / self.scaling_factor)
        };
        self.decoder.decode(input.view(), &self.run_options)
    }
}

/// The pipeline's preview state: the sinks and the decoders.
#[derive(Default)]
pub struct Previewer {
    /// The sinks set, innermost last: a batch run between two steps of another (an
    /// interlude) sets its own and takes it off after, so the outer batch's comes back.
    sinks: Vec<PreviewSink>,
    /// The model family's Latent2RGB factors.
    format: Option<LatentFormat>,
    /// The tiny VAE decoder, when the model has one.
    taesd: Option<TaesdDecoder>,
    /// x0 of one image, reused.
    x0: Vec<f32>,
    /// The row's latents and model output when they are not contiguous, reused.
    rows: (Vec<f32>, Vec<f32>),
    /// RGB bytes, reused.
    rgb: Vec<u8>,
    /// Whether a `taesd` request fell back to `latent2rgb` (logged once).
    warned: bool,
}

impl Previewer {
    /// The previewer of a model: its Latent2RGB factors, and its tiny VAE decoder loaded
    /// when the bundle has one ([`ModelBundle::preview_decoder`]).
    pub fn load(runtime: &Runtime, bundle: &ModelBundle) -> Result<Previewer, PipelineError> {
        let taesd = bundle
            .preview_decoder
            .as_deref()
            .map(|dir| TaesdDecoder::load(runtime, dir, bundle))
            .transpose()?;
        Ok(Previewer {
            format: Some(LatentFormat::for_kind(bundle.kind)),
            taesd,
            ..Previewer::default()
        })
    }

    /// `Some`: previews go to `sink` from now on; `None`: the sink set last is taken off,
    /// and the one set before it (if any) is used again. A caller sets one before a
    /// generation and takes it off after, so generations nested in another's steps
    /// (interludes) each keep their own.
    pub(super) fn set_sink(&mut self, sink: Option<PreviewSink>) {
        match sink {
            Some(sink) => self.sinks.push(sink),
            None => {
                self.sinks.pop();
            }
        }
    }

    /// Called after the model output of scheduler step `index` (`done` of `total` steps run),
    /// before the scheduler steps: `sample` is the latents the UNet saw (unscaled),
    /// `model_output` the guided prediction.
    pub(super) fn after_step(
        &mut self,
        plan: &Plan,
        sched: &dyn Scheduler,
        index: usize,
        (done, total): (usize, usize),
        sample: ArrayViewD<'_, f32>,
        model_output: ArrayViewD<'_, f32>,
    ) -> Result<(), PipelineError> {
        if self.sinks.is_empty() || plan.wants.is_empty() {
            return Ok(());
        }
        for want in plan.due(done, total) {
            match self.preview(want, sched, index, &sample, &model_output) {
                Ok(png) => {
                    if let Some(sink) = self.sinks.last_mut() {
                        sink(want.request, done, png);
                    }
                }
                Err(e) => tracing::warn!(error = %e, step = done, "preview skipped"),
            }
        }
        Ok(())
    }

    /// The PNG of one request's first image at this step.
    fn preview(
        &mut self,
        want: &Want,
        sched: &dyn Scheduler,
        index: usize,
        sample: &ArrayViewD<'_, f32>,
        model_output: &ArrayViewD<'_, f32>,
    ) -> Result<Vec<u8>, PipelineError> {
        let shape = sample.shape();
        if shape.len() != 4 || want.row >= shape[0] || model_output.shape() != shape {
            return Err(PipelineError::Image(format!(
                "preview: latents of shape {shape:?}, model output {:?}",
                model_output.shape()
            )));
        }
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        let x = sample.index_axis(Axis(0), want.row);
        let m = model_output.index_axis(Axis(0), want.row);
        let (xs, ms) = &mut self.rows;
        let x = match x.as_slice() {
            Some(s) => s,
            None => {
                xs.clear();
                xs.extend(x.iter());
                xs
            }
        };
        let m = match m.as_slice() {
            Some(s) => s,
            None => {
                ms.clear();
                ms.extend(m.iter());
                ms
            }
        };
        self.x0.resize(x.len(), 0.0);
        sched.pred_original_sample(index, x, m, &mut self.x0);
        let method = match want.method {
            PreviewMethod::Taesd if self.taesd.is_none() => {
                if !self.warned {
                    tracing::warn!(
                        "taesd preview asked for, but no tiny VAE decoder is loaded: latent2rgb instead"
                    );
                    self.warned = true;
                }
                PreviewMethod::Latent2Rgb
            }
            m => m,
        };
        let (rgb_w, rgb_h) = match (method, self.taesd.as_mut()) {
            (PreviewMethod::Taesd, Some(taesd)) => {
                let latents = ArrayViewD::from_shape(IxDyn(&[1, c, h, w]), &self.x0)
                    .map_err(|e| PipelineError::Image(e.to_string()))?;
                let decoded = taesd.decode(latents)?;
                let d = decoded.shape();
                if d.len() != 4 || d[1] != 3 {
                    return Err(PipelineError::Image(format!(
                        "taesd_decoder: output of shape {d:?}, expected [1, 3, H, W]"
                    )));
                }
                let (dh, dw) = (d[2], d[3]);
                let hwc = decoded.index_axis(Axis(0), 0).permuted_axes(vec![1, 2, 0]);
                self.rgb.clear();
                self.rgb.extend(hwc.iter().map(|&v| to_byte(v)));
                (dw, dh)
            }
            _ => {
                if c != 4 {
                    return Err(PipelineError::Image(format!(
                        "latent2rgb: {c} latent channels; it maps 4"
                    )));
                }
                let format = self.format.unwrap_or(LatentFormat::SD15);
                format.to_rgb(&self.x0, (h, w), &mut self.rgb);
                (w, h)
            }
        };
        encode_preview(&self.rgb, (rgb_w as u32, rgb_h as u32))
    }
}

/// RGB bytes → a PNG at most [`MAX_SIDE`] on its long side (downscaled with a triangle
/// filter), fast compression.
pub fn encode_preview(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>, PipelineError> {
    let err = |e: image::ImageError| PipelineError::Image(e.to_string());
    let long = w.max(h);
    let mut png = Vec::new();
    let encoder = PngEncoder::new_with_quality(&mut png, CompressionType::Fast, PngFilter::Sub);
    if long > MAX_SIDE {
        let scale = f64::from(MAX_SIDE) / f64::from(long);
        let nw = ((f64::from(w) * scale).round() as u32).max(1);
        let nh = ((f64::from(h) * scale).round() as u32).max(1);
        let img = image::RgbImage::from_raw(w, h, rgb.to_vec()).ok_or_else(|| {
            PipelineError::Image("preview: pixel buffer of the wrong size".into())
        })?;
        let small = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
        encoder
            .write_image(small.as_raw(), nw, nh, image::ExtendedColorType::Rgb8)
            .map_err(err)?;
    } else {
        encoder
            .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
            .map_err(err)?;
    }
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(num_images: usize, every: usize, method: PreviewMethod) -> ResolvedRequest {
        let mut bundle = crate::model::test_bundle();
        bundle.preview_decoder = Some("/test-model/taesd_decoder".into());
        let req = crate::request::GenerateRequest {
            prompt: "p".into(),
            steps: Some(4),
            num_images: Some(num_images as u32),
            preview_every: Some(every as u32),
            preview_method: Some(method),
            ..Default::default()
        };
        let model = crate::request::ModelRef {
            name: "m",
            bundle: &bundle,
            defaults: &crate::request::ModelDefaults::NONE,
            loras: crate::lora::LoraCatalog::none(),
        };
        crate::request::resolve(&req, model, &crate::request::Limits::default(), || 1).unwrap()
    }

    #[test]
    fn the_plan_names_each_requests_first_row_and_its_steps() {
        let a = request(2, 0, PreviewMethod::Latent2Rgb);
        let b = request(3, 2, PreviewMethod::Taesd);
        let c = request(1, 5, PreviewMethod::Latent2Rgb);
        let plan = Plan::for_batch(&[&a, &b, &c]);
        assert_eq!(
            plan.wants,
            vec![
                Want {
                    request: 1,
                    row: 2,
                    every: 2,
                    method: PreviewMethod::Taesd
                },
                Want {
                    request: 2,
                    row: 5,
                    every: 5,
                    method: PreviewMethod::Latent2Rgb
                },
            ]
        );
        let due = |done| plan.due(done, 4).map(|w| w.request).collect::<Vec<_>>();
        assert_eq!(due(1), Vec::<usize>::new());
        assert_eq!(due(2), vec![1]);
        assert_eq!(due(3), Vec::<usize>::new());
        // The last step always, every above the step count included.
        assert_eq!(due(4), vec![1, 2]);
        assert!(Plan::for_batch(&[&a]).wants.is_empty());
    }

    #[test]
    fn latent2rgb_is_comfyuis_linear_map() {
        // One pixel, channels (1, 0.5, -0.5, 0.25).
        let x0 = [1.0, 0.5, -0.5, 0.25];
        let mut out = Vec::new();
        LatentFormat::SD15.to_rgb(&x0, (1, 1), &mut out);
        let f = LatentFormat::SD15.factors;
        let want: Vec<u8> = (0..3)
            .map(|c| {
                let v = f[0][c] + 0.5 * f[1][c] - 0.5 * f[2][c] + 0.25 * f[3][c];
                (((v + 1.0) / 2.0) * 255.0) as u8
            })
            .collect();
        assert_eq!(out, want);
        LatentFormat::SDXL.to_rgb(&[0.0; 4], (1, 1), &mut out);
        let bias: Vec<u8> = LatentFormat::SDXL
            .bias
            .iter()
            .map(|&b| to_byte(b))
            .collect();
        assert_eq!(out, bias);
        assert_eq!((to_byte(-3.0), to_byte(3.0), to_byte(0.0)), (0, 255, 127));
    }

    #[test]
    fn the_hub_keeps_only_the_newest_preview_of_a_job() {
        let hub = PreviewHub::default();
        let p = |step| Pending {
            destination: ":1.5".into(),
            step,
            png: vec![step as u8],
        };
        hub.offer(7, p(1));
        hub.offer(7, p(2));
        hub.offer(8, p(1));
        let mut taken = hub.take();
        taken.sort_by_key(|(id, _)| *id);
        assert_eq!(taken, vec![(7, p(2)), (8, p(1))]);
        assert_eq!(hub.replaced(), 1);
        assert!(hub.take().is_empty());
    }

    #[test]
    fn previews_are_at_most_256_pixels_on_the_long_side() {
        let rgb = vec![128u8; 512 * 384 * 3];
        let png = encode_preview(&rgb, (512, 384)).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (256, 192));
        let png = encode_preview(&rgb[..64 * 32 * 3], (64, 32)).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (64, 32));
    }
}
