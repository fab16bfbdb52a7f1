//! Image-to-image and inpainting for the transformer families, as diffusers'
//! `StableDiffusion3Img2ImgPipeline` and `StableDiffusion3InpaintPipeline` (16-channel
//! transformer) run them: the init image encoded and sampled from the VAE's latent
//! distribution with the request's generator (`(sample − shift) · scaling`), then the noise
//! drawn from the same generator; the start is `scale_noise(image_latents, t_start,
//! noise)` (pure noise for inpainting at strength 1); inpainting blends the image latents,
//! re-noised to the next timestep, back in outside the mask after every step (clean after
//! the last), and decodes without the VAE's shift factor, as diffusers' SD3 inpainting
//! pipeline does.

use ndarray::{Array4, s};
use ort::session::RunOptions;

use crate::pipeline::PipelineError;
use crate::pipeline::components::VaeEncoder;
use crate::rng::NoiseSource;
use crate::scheduler::flow_match::FlowMatchEuler;

/// An image-to-image or inpainting request's inputs.
#[derive(Debug, Clone)]
pub struct FlowEdit {
    /// The init image `[1, 3, H, W]` in [-1, 1].
    pub init: Array4<f32>,
    /// Inpainting: the latent mask `[1, 1, h, w]` (1: repaint).
    pub mask: Option<Array4<f32>>,
    /// The share of the schedule that runs, in (0, 1].
    pub strength: f64,
}

/// What the loop needs for inpainting: the mask, the clean image latents and the noise.
pub(super) struct Blend {
    mask: Array4<f32>,
    image: Array4<f32>,
    noise: Array4<f32>,
    scratch: Vec<f32>,
}

fn shape_err(e: ndarray::ShapeError) -> PipelineError {
    PipelineError::Inference {
        component: "vae_encoder".into(),
        message: e.to_string(),
    }
}

/// The starting latents `[n, c, h, w]` of an edit, and inpainting's blend. `sched` has its
/// timesteps and begin index set.
pub(super) fn start(
    edit: &FlowEdit,
    encoder: &mut VaeEncoder,
    generator: &mut dyn NoiseSource,
    (n, scaling, shift): (usize, f32, f32),
    sched: &FlowMatchEuler,
    begin: usize,
    run_options: &RunOptions,
) -> Result<(Array4<f32>, Option<Blend>), PipelineError> {
    let params: Array4<f32> = encoder
        .encode(edit.init.view().into_dyn(), run_options)?
        .into_dimensionality()
        .map_err(shape_err)?;
    let (_, c2, h, w) = params.dim();
    let c = c2 / 2;
    let mut sample = Array4::<f32>::zeros((1, c, h, w));
    let eps = generator.randn(sample.len());
    let eps = ndarray::ArrayView4::from_shape((1, c, h, w), &eps).map_err(shape_err)?;
    ndarray::Zip::from(&mut sample)
        .and(&params.slice(s![.., ..c, .., ..]))
        .and(&params.slice(s![.., c.., .., ..]))
        .and(&eps)
        .for_each(|o, &m, &lv, &e| {
            let std = (0.5 * lv.clamp(-30.0, 20.0)).exp();
            *o = (m + std * e - shift) * scaling;
        });
    let views: Vec<_> = (0..n).map(|_| sample.view()).collect();
    let image = ndarray::concatenate(ndarray::Axis(0), &views).map_err(shape_err)?;
    let mut noise = Array4::<f32>::zeros((n, c, h, w));
    generator.fill_randn(noise.as_slice_mut().expect("standard layout"));
    let mut latents = Array4::<f32>::zeros((n, c, h, w));
    if edit.mask.is_some() && edit.strength >= 1.0 {
        latents.assign(&noise);
    } else {
        let t = sched.timesteps()[begin];
        sched.scale_noise(
            image.as_slice().expect("standard layout"),
            t,
            noise.as_slice().expect("standard layout"),
            latents.as_slice_mut().expect("standard layout"),
        )?;
    }
    let blend = edit.mask.as_ref().map(|mask| Blend {
        mask: mask.clone(),
        image,
        noise,
        scratch: Vec::new(),
    });
    Ok((latents, blend))
}

impl Blend {
    /// After the step at `index` (not the last): outside the mask, the image latents
    /// noised to the next timestep: `(1 − m)·scale_noise(image, t[index + 1]) + m·latents`.
    pub(super) fn apply(
        &mut self,
        sched: &FlowMatchEuler,
        index: usize,
        last: bool,
        latents: &mut Array4<f32>,
    ) -> Result<(), PipelineError> {
        let proper: &[f32] = if last {
            self.image.as_slice().expect("standard layout")
        } else {
            self.scratch.resize(self.image.len(), 0.0);
            sched.scale_noise(
                self.image.as_slice().expect("standard layout"),
                sched.timesteps()[index + 1],
                self.noise.as_slice().expect("standard layout"),
                &mut self.scratch,
            )?;
            &self.scratch
        };
        let (n, c, h, w) = latents.dim();
        let plane = h * w;
        let mask = self.mask.as_slice().expect("standard layout");
        let out = latents.as_slice_mut().expect("standard layout");
        for b in 0..n {
            for ch in 0..c {
                let at = (b * c + ch) * plane;
                for p in 0..plane {
                    let m = mask[p];
                    out[at + p] = (1.0 - m) * proper[at + p] + m * out[at + p];
                }
            }
        }
        Ok(())
    }
}
