//! Classifier-free guidance of a batch: each request keeps its own scale and rescale, row
//! by row, as diffusers applies them to one request.

use ndarray::{ArrayD, Axis, Zip};

use crate::request::ResolvedRequest;

/// Per-row guidance settings of a batch (each request keeps its own scale).
pub(super) struct Guidance {
    pub(super) cfg: bool,
    /// Per image row, as requested (f64).
    scale: Vec<f64>,
    rescale: Vec<f32>,
}

impl Guidance {
    pub(super) fn for_batch(batch: &[&ResolvedRequest]) -> Guidance {
        let rows = |f: fn(&ResolvedRequest) -> f64| -> Vec<f64> {
            batch
                .iter()
                .flat_map(|p| std::iter::repeat_n(f(p), p.num_images))
                .collect()
        };
        Guidance {
            cfg: batch[0].do_cfg(),
            scale: rows(|p| p.guidance_scale),
            rescale: rows(|p| p.guidance_rescale)
                .into_iter()
                .map(|r| r as f32)
                .collect(),
        }
    }
}

impl Guidance {
    /// The guidance scale of image row `row`.
    pub(super) fn scale(&self, row: usize) -> f64 {
        self.scale[row]
    }

    /// The guidance rescale of image row `row`.
    pub(super) fn rescale(&self, row: usize) -> f32 {
        self.rescale[row]
    }
}

/// Classifier-free guidance, into `out` (`[N,...]`), row by row with each row's scale:
/// `uncond + g * (text - uncond)`, then diffusers' `rescale_noise_cfg` when `rescale > 0`.
pub(super) fn guide(
    unet_out: ndarray::ArrayViewD<'_, f32>,
    guidance: &Guidance,
    out: &mut ArrayD<f32>,
) {
    let n = out.len_of(Axis(0));
    let uncond = unet_out.slice_axis(Axis(0), (..n).into());
    let text = unet_out.slice_axis(Axis(0), (n..).into());
    let rows = out
        .axis_iter_mut(Axis(0))
        .zip(uncond.axis_iter(Axis(0)))
        .zip(text.axis_iter(Axis(0)));
    for (row, ((mut o, u), t)) in rows.enumerate() {
        let g = guidance.scale[row] as f32;
        Zip::from(&mut o)
            .and(&u)
            .and(&t)
            .for_each(|o, &u, &t| *o = u + g * (t - u));
        let rescale = guidance.rescale[row];
        if rescale > 0.0 {
            rescale_row(o, t, rescale);
        }
    }
}

/// diffusers' `rescale_noise_cfg` of one row: the guided prediction `o` rescaled towards
/// the conditional one's (`text`) standard deviation by `rescale`.
pub(super) fn rescale_row(
    mut o: ndarray::ArrayViewMutD<'_, f32>,
    text: ndarray::ArrayViewD<'_, f32>,
    rescale: f32,
) {
    let factor = std_unbiased(text.iter()) / std_unbiased(o.iter());
    o.mapv_inplace(|x| rescale * (x * factor) + (1.0 - rescale) * x);
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

/// The guidance embedding of an LCM-distilled UNet (`timestep_cond`), one row per image:
/// diffusers' `get_guidance_scale_embedding(w = guidance_scale - 1, dim)` in float32:
/// `w * 1000` times `exp(arange(dim/2) * -(ln 10000 / (dim/2 - 1)))`, then the sines
/// followed by the cosines (a zero column appended when `dim` is odd).
pub(super) fn guidance_embedding(batch: &[&ResolvedRequest], dim: usize) -> ArrayD<f32> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|k| (k as f32 * -step).exp()).collect();
    let rows: Vec<f32> = batch
        .iter()
        .flat_map(|p| std::iter::repeat_n((p.guidance_scale - 1.0) as f32 * 1000.0, p.num_images))
        .collect();
    let mut out = ArrayD::<f32>::zeros(ndarray::IxDyn(&[rows.len(), dim]));
    for (mut row, &w) in out.axis_iter_mut(Axis(0)).zip(&rows) {
        for (k, &f) in freqs.iter().enumerate() {
            let x = w * f;
            row[k] = x.sin();
            row[half + k] = x.cos();
        }
    }
    out
}
