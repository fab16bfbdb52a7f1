//! Where the denoise loop starts: drawn noise (text to image), or the VAE-encoded init
//! image noised to the first timestep the strength picks (image to image, inpainting),
//! with every draw taken from the request's own generator in diffusers' order:
//!
//! * text to image: the latents, then the scheduler's noise;
//! * image to image: the encoder sample, the noise, then the scheduler's noise;
//! * 4-channel inpainting: the encoder sample, the noise, a masked-image encoder sample
//!   that diffusers draws although it never uses it, then the scheduler's noise;
//! * 9-channel inpainting: the encoder sample only when strength < 1, the noise, the
//!   masked-image encoder sample, then the scheduler's noise.

use ndarray::{Array4, ArrayViewMut4, Axis, s};
use ort::session::RunOptions;

use super::components::{LATENT_CHANNELS, VaeEncoder};
use super::{PipelineError, preprocess, shape_err};
use crate::request::{Edit, ResolvedRequest};
use crate::rng::{self, NoiseSource, RngKind};
use crate::scheduler::Scheduler;

/// diffusers' `get_timesteps`: the index of the first timestep run for `steps` steps at
/// `strength` (`t_start * order`, with `t_start = steps - min(int(steps * strength), steps)`).
pub fn begin_index(steps: usize, strength: f64, order: usize) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    (steps - init) * order
}

/// Fills one request's block of latents (unscaled) and returns its step-noise stream.
pub(super) fn draw_latents(
    p: &ResolvedRequest,
    block: &mut ArrayViewMut4<'_, f32>,
) -> Result<Box<dyn NoiseSource>, PipelineError> {
    let torch = || torch_source(p.seed);
    if let Some(given) = &p.latents {
        // The resolve step checked the shape.
        block.assign(
            &given
                .view()
                .into_dimensionality::<ndarray::Ix4>()
                .map_err(shape_err)?,
        );
        return torch();
    }
    let mut source = rng::noise_source(p.rng, p.seed).map_err(|e| seed_err(e.to_string()))?;
    fill(source.as_mut(), block);
    match p.rng {
        RngKind::Torch => Ok(source),
        RngKind::Numpy => torch(),
    }
}

fn seed_err(message: String) -> PipelineError {
    PipelineError::InvalidArgument {
        param: "seed",
        message,
    }
}

fn torch_source(seed: u64) -> Result<Box<dyn NoiseSource>, PipelineError> {
    rng::noise_source(RngKind::Torch, seed).map_err(|e| seed_err(e.to_string()))
}

/// One `randn(block.shape)` into `block`.
fn fill(source: &mut dyn NoiseSource, block: &mut ArrayViewMut4<'_, f32>) {
    match block.as_slice_mut() {
        Some(slice) => source.fill_randn(slice),
        None => {
            let buf = source.randn(block.len());
            block.iter_mut().zip(buf).for_each(|(d, v)| *d = v);
        }
    }
}

/// Step noise for a batch: each request's rows come from its own generator, exactly as
/// one `randn(rows.shape)` call would when it runs alone.
pub(super) struct BatchNoise {
    pub(super) parts: Vec<(Box<dyn NoiseSource>, usize)>,
}

impl NoiseSource for BatchNoise {
    fn fill_randn(&mut self, out: &mut [f32]) {
        let mut rest = out;
        for (source, len) in &mut self.parts {
            let (mine, tail) = rest.split_at_mut((*len).min(rest.len()));
            source.fill_randn(mine);
            rest = tail;
        }
    }
}

/// What inpainting needs in the loop, stacked over the batch's images.
pub(super) struct Inpaint {
    /// The latent mask `[N, 1, h, w]` (1 = repaint).
    pub mask: Array4<f32>,
    /// 9-channel UNets: the masked image's latents `[N, 4, h, w]`.
    pub masked_latents: Option<Array4<f32>>,
    /// 4-channel UNets: the clean image latents and the noise they are re-noised with
    /// after each step, `[N, 4, h, w]` each.
    pub blend: Option<(Array4<f32>, Array4<f32>)>,
}

/// The VAE encoder's latent distribution sampled as diffusers'
/// `DiagonalGaussianDistribution.sample(generator)` does (`mean + exp(0.5 * clamp(logvar,
/// -30, 20)) * randn(mean.shape)`), times the VAE's scaling factor: `[1, 4, h, w]`.
fn encode_sample(
    encoder: &mut VaeEncoder,
    image: &Array4<f32>,
    source: &mut dyn NoiseSource,
    scaling: f32,
    run_options: &RunOptions,
) -> Result<Array4<f32>, PipelineError> {
    let params = encoder.encode(image.view().into_dyn(), run_options)?;
    let params: Array4<f32> = params.into_dimensionality().map_err(shape_err)?;
    let (_, _, h, w) = params.dim();
    let dim = (1, LATENT_CHANNELS, h, w);
    let mut out = Array4::<f32>::zeros(dim);
    let eps = source.randn(out.len());
    let eps = ndarray::ArrayView4::from_shape(dim, &eps).map_err(shape_err)?;
    let mean = params.slice(s![.., ..LATENT_CHANNELS, .., ..]);
    let logvar = params.slice(s![.., LATENT_CHANNELS.., .., ..]);
    ndarray::Zip::from(&mut out)
        .and(&mean)
        .and(&logvar)
        .and(&eps)
        .for_each(|o, &m, &lv, &e| {
            let std = (0.5 * lv.clamp(-30.0, 20.0)).exp();
            *o = scaling * (m + std * e);
        });
    Ok(out)
}

/// Starting latents `[N, 4, h, w]` of an image-to-image or inpainting batch (all with the
/// same mode and strength), the step noise, and the inpainting inputs.
pub(super) fn edit_latents(
    batch: &[&ResolvedRequest],
    encoder: &mut VaeEncoder,
    sched: &dyn Scheduler,
    begin: usize,
    bundle: &crate::model::ModelBundle,
    run_options: &RunOptions,
) -> Result<(Array4<f32>, BatchNoise, Option<Inpaint>), PipelineError> {
    let nine_channels = bundle.unet_in_channels == 9;
    let vae_scaling = bundle.vae_scaling_factor as f32;
    let factor = bundle.vae_scale_factor;
    let first = batch[0];
    let (h, w) = (first.height / factor, first.width / factor);
    let total: usize = batch.iter().map(|p| p.num_images).sum();
    let shape = (total, LATENT_CHANNELS, h, w);
    let mut latents = Array4::<f32>::zeros(shape);
    let mut noise = Array4::<f32>::zeros(shape);
    let mut image_latents = Array4::<f32>::zeros(shape);
    let inpaint = first.edit.as_ref().is_some_and(|e| e.mask.is_some());
    let mut mask = Array4::<f32>::zeros((total, 1, h, w));
    let mut masked = Array4::<f32>::zeros(shape);
    let mut parts = Vec::with_capacity(batch.len());
    let level = sched.noise_level(begin);
    let mut row = 0;
    for p in batch {
        let Some(edit) = &p.edit else {
            return Err(PipelineError::InvalidArgument {
                param: "init_image",
                message: "a text-to-image request in an image-to-image batch".into(),
            });
        };
        let rows = row..row + p.num_images;
        let mut source = torch_source(p.seed)?;
        let init = decode(edit, "init_image", |rgb| {
            preprocess::init_tensor(rgb, p.width, p.height)
        })?;
        let strength_max = edit.strength >= 1.0;
        // 9-channel inpainting at full strength starts from noise alone.
        if !(inpaint && nine_channels && strength_max) {
            let lat = encode_sample(encoder, &init, source.as_mut(), vae_scaling, run_options)?;
            image_latents
                .slice_mut(s![rows.clone(), .., .., ..])
                .assign(
                    &lat.broadcast((p.num_images, LATENT_CHANNELS, h, w))
                        .ok_or_else(|| {
                            shape_err(ndarray::ShapeError::from_kind(
                                ndarray::ErrorKind::IncompatibleShape,
                            ))
                        })?,
                );
        }
        fill(
            source.as_mut(),
            &mut noise.slice_mut(s![rows.clone(), .., .., ..]),
        );
        {
            let x = image_latents.slice(s![rows.clone(), .., .., ..]);
            let n = noise.slice(s![rows.clone(), .., .., ..]);
            let mut out = latents.slice_mut(s![rows.clone(), .., .., ..]);
            if inpaint && strength_max {
                // diffusers' inpainting at strength 1: pure noise times init_noise_sigma.
                let sigma = sched.init_noise_sigma();
                ndarray::Zip::from(&mut out)
                    .and(&n)
                    .for_each(|o, &v| *o = v * sigma);
            } else {
                let (xs, ns) = (x.to_owned(), n.to_owned());
                let mut flat = vec![0f32; xs.len()];
                level.add_noise(
                    xs.as_slice().unwrap_or(&[]),
                    ns.as_slice().unwrap_or(&[]),
                    &mut flat,
                );
                out.iter_mut().zip(flat).for_each(|(o, v)| *o = v);
            }
        }
        if let Some(mask_input) = &edit.mask {
            let pixels = decode_mask(mask_input, p.width, p.height)?;
            let latent_mask = preprocess::latent_mask(&pixels, factor);
            mask.slice_mut(s![rows.clone(), .., .., ..]).assign(
                &latent_mask
                    .broadcast((p.num_images, 1, h, w))
                    .ok_or_else(|| {
                        shape_err(ndarray::ShapeError::from_kind(
                            ndarray::ErrorKind::IncompatibleShape,
                        ))
                    })?,
            );
            if nine_channels {
                let masked_init = preprocess::masked_init(&init, &pixels);
                let lat = encode_sample(
                    encoder,
                    &masked_init,
                    source.as_mut(),
                    vae_scaling,
                    run_options,
                )?;
                masked.slice_mut(s![rows.clone(), .., .., ..]).assign(
                    &lat.broadcast((p.num_images, LATENT_CHANNELS, h, w))
                        .ok_or_else(|| {
                            shape_err(ndarray::ShapeError::from_kind(
                                ndarray::ErrorKind::IncompatibleShape,
                            ))
                        })?,
                );
            } else {
                // Drawn, never used: the encoder need not run for it.
                let _ = source.randn(LATENT_CHANNELS * h * w);
            }
        }
        let len = p.num_images * LATENT_CHANNELS * h * w;
        parts.push((source, len));
        row += p.num_images;
    }
    let inpaint = inpaint.then(|| Inpaint {
        mask,
        masked_latents: nine_channels.then_some(masked),
        blend: (!nine_channels).then_some((image_latents, noise)),
    });
    let _ = Axis(0);
    Ok((latents, BatchNoise { parts }, inpaint))
}

fn decode<T>(
    edit: &Edit,
    param: &'static str,
    then: impl FnOnce(&ndarray::Array3<u8>) -> T,
) -> Result<T, PipelineError> {
    let rgb = preprocess::decode_rgb(edit.init.bytes())
        .map_err(|message| PipelineError::InvalidArgument { param, message })?;
    Ok(then(&rgb))
}

fn decode_mask(
    mask: &crate::request::ImageInput,
    width: usize,
    height: usize,
) -> Result<ndarray::Array2<f32>, PipelineError> {
    let rgb =
        preprocess::decode_rgb(mask.bytes()).map_err(|message| PipelineError::InvalidArgument {
            param: "mask_image",
            message,
        })?;
    Ok(preprocess::mask_pixels(&rgb, width, height))
}

/// 4-channel inpainting after step `index` (absolute): outside the mask, the clean image
/// latents noised to the next timestep (`index + 1`; not after the last step):
/// `latents = (1 - m) * add_noise(image_latents, noise, t[index + 1]) + m * latents`.
pub(super) fn blend(
    inpaint: &Inpaint,
    sched: &dyn Scheduler,
    index: usize,
    last: bool,
    latents: &mut ndarray::ArrayD<f32>,
    scratch: &mut Vec<f32>,
) {
    let Some((image, noise)) = &inpaint.blend else {
        return;
    };
    let (n, c, h, w) = image.dim();
    scratch.resize(image.len(), 0.0);
    match (image.as_slice(), noise.as_slice()) {
        (Some(x), Some(e)) if !last => sched.noise_level(index + 1).add_noise(x, e, scratch),
        _ => scratch
            .iter_mut()
            .zip(image.iter())
            .for_each(|(d, &v)| *d = v),
    }
    let Some(lat) = latents.as_slice_mut() else {
        return;
    };
    let plane = h * w;
    for (k, (l, &proper)) in lat.iter_mut().zip(scratch.iter()).enumerate() {
        let img = k / (c * plane);
        let pos = k % plane;
        let m = inpaint.mask[[img, 0, pos / w, pos % w]];
        *l = (1.0 - m) * proper + m * *l;
    }
    debug_assert_eq!(lat.len(), n * c * plane);
}
