//! What happens to a predicted `x0`: `clip_sample` clamping and dynamic thresholding
//! (`_threshold_sample`).

use ndarray::{ArrayViewMutD, Axis};

use crate::scheduler::config::ResolvedConfig;

/// `torch.quantile(x, q)` on float32 data (linear interpolation), sorting `x` in place.
fn quantile_f32(x: &mut [f32], q: f32) -> f32 {
    x.sort_by(f32::total_cmp);
    let rank = q * (x.len() - 1) as f32;
    let below = rank as usize;
    let above = (below + 1).min(x.len() - 1);
    let weight = rank - below as f32;
    let (lo, hi) = (x[below], x[above]);
    // torch.lerp
    if weight < 0.5 {
        lo + weight * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - weight)
    }
}

/// Dynamic thresholding (`_threshold_sample`, Imagen): per batch item, clamps
/// `sample` to `±s` and divides by `s`, where `s` is the `ratio` quantile of `|sample|`
/// clamped to `[1, max_value]`. `scratch` is reused between calls.
pub fn threshold_sample(
    mut sample: ArrayViewMutD<'_, f32>,
    ratio: f64,
    max_value: f64,
    scratch: &mut Vec<f32>,
) {
    if sample.ndim() == 0 {
        return;
    }
    for mut item in sample.axis_iter_mut(Axis(0)) {
        scratch.clear();
        scratch.extend(item.iter().map(|v| v.abs()));
        if scratch.is_empty() {
            continue;
        }
        let s = quantile_f32(scratch, ratio as f32)
            .max(1.0)
            .min(max_value as f32);
        item.mapv_inplace(|v| v.max(-s).min(s) / s);
    }
}

/// What DDIM, DDPM and LCM do to the predicted `x0`: dynamic thresholding wins over
/// `clip_sample`, as in diffusers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum X0Clip {
    /// Leave it.
    None,
    /// `clip_sample`: clamp to `[-range, range]`.
    Clip(f64),
    /// `thresholding`: `_threshold_sample` with `dynamic_thresholding_ratio`, `sample_max_value`.
    Threshold {
        /// `dynamic_thresholding_ratio`.
        ratio: f64,
        /// `sample_max_value`.
        max_value: f64,
    },
}

impl X0Clip {
    /// Reads `thresholding` / `clip_sample` from the config.
    pub fn from_config(cfg: &ResolvedConfig) -> Self {
        if cfg.thresholding {
            Self::Threshold {
                ratio: cfg.dynamic_thresholding_ratio,
                max_value: cfg.sample_max_value,
            }
        } else if cfg.clip_sample {
            Self::Clip(cfg.clip_sample_range)
        } else {
            Self::None
        }
    }

    /// Applies it to `x0` in place; `scratch` is reused by thresholding.
    pub fn apply(self, x0: ArrayViewMutD<'_, f32>, scratch: &mut Vec<f32>) {
        match self {
            Self::None => {}
            Self::Clip(range) => clip_sample(x0, range),
            Self::Threshold { ratio, max_value } => threshold_sample(x0, ratio, max_value, scratch),
        }
    }
}

/// Clamps every element to `[-range, range]` (`clip_sample`).
pub fn clip_sample(mut sample: ArrayViewMutD<'_, f32>, range: f64) {
    let r = range as f32;
    sample.mapv_inplace(|v| v.max(-r).min(r));
}
