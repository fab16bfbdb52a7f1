//! Sigma schedules of the sigma-based classes: interpolated, Karras and exponential
//! sigmas, `_sigma_to_t`, and the Euler family's input scaling and initial noise sigma.

use super::numeric::{log_f32, np_interp, np_linspace};
use crate::scheduler::SchedulerError;
use crate::scheduler::config::{ResolvedConfig, TimestepSpacing};

/// `np.log(train_sigmas)` in float32.
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| log_f32(s)).collect()
}

/// `np.interp(timesteps, np.arange(len(sigmas)), sigmas)` for float32 timesteps.
pub fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| np_interp(f64::from(t), train_sigmas))
        .collect()
}

/// How a sigma-based class spaces its sigmas (`use_karras_sigmas` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// Training sigmas interpolated at the spaced timesteps.
    Interpolated,
    /// Karras et al. (2022), rho = 7.
    Karras,
    /// Log-uniform between sigma_max and sigma_min.
    Exponential,
}

impl SigmaSpacing {
    /// Reads `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`.
    /// Beta sigmas (`scipy.stats.beta.ppf`) are not supported.
    pub fn from_config(cfg: &ResolvedConfig) -> Result<Self, SchedulerError> {
        let invalid = |message: &str| SchedulerError::InvalidConfig {
            scheduler: cfg.class.class_name(),
            message: message.to_owned(),
        };
        let flags = [
            cfg.use_karras_sigmas,
            cfg.use_exponential_sigmas,
            cfg.use_beta_sigmas,
        ];
        if flags.iter().filter(|&&f| f).count() > 1 {
            return Err(invalid(
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used",
            ));
        }
        if cfg.use_beta_sigmas {
            return Err(invalid("use_beta_sigmas is not supported"));
        }
        Ok(if cfg.use_karras_sigmas {
            Self::Karras
        } else if cfg.use_exponential_sigmas {
            Self::Exponential
        } else {
            Self::Interpolated
        })
    }

    /// Converts the interpolated sigmas (descending, float64) to this spacing with `n`
    /// entries; `sigma_min`/`sigma_max` default to the last/first input sigma.
    pub fn convert(
        self,
        in_sigmas: Vec<f64>,
        sigma_min: Option<f64>,
        sigma_max: Option<f64>,
        n: usize,
    ) -> Vec<f64> {
        let lo = sigma_min.unwrap_or_else(|| in_sigmas.last().copied().unwrap_or(0.0));
        let hi = sigma_max.unwrap_or_else(|| in_sigmas.first().copied().unwrap_or(0.0));
        match self {
            Self::Interpolated => in_sigmas,
            Self::Karras => karras_sigmas(lo, hi, n),
            Self::Exponential => exponential_sigmas(lo, hi, n),
        }
    }
}

/// `sigma / sqrt(sigma^2 + 1)` scaling divisor of the Euler family, in float32:
/// `(sigma**2 + 1) ** 0.5`.
pub fn input_scale_divisor(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// The sigma-based schedulers' `scale_model_input`: divides `sample` in place by
/// `(sigma**2 + 1) ** 0.5` for the step's sigma (a step past the end is left as is).
pub fn scale_by_sigma(
    mut sample: ndarray::ArrayViewMutD<'_, f32>,
    sigmas: &[f32],
    step_index: usize,
) {
    if let Some(&sigma) = sigmas.get(step_index) {
        let d = input_scale_divisor(sigma);
        sample.mapv_inplace(|x| x / d);
    }
}

/// The Euler family's `(max_sigma**2 + 1) ** 0.5` (leading) or `max_sigma`
/// (linspace/trailing), in float32.
pub fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// Karras et al. (2022) sigmas: `(max^(1/7) + ramp * (min^(1/7) - max^(1/7))) ** 7`
/// with `ramp = np.linspace(0, 1, n)`, in float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// Exponential sigmas: `np.exp(np.linspace(ln(max), ln(min), n))`, in float64.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `_sigma_to_t(sigma, log_sigmas)`: the fractional training timestep of `sigma`,
/// interpolating linearly in log-sigma between neighbouring training sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax(cumsum(dists >= 0)) = index of the last entry with log_sigmas[i] <= log_sigma
    // (0 when there is none), clipped to n - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - f64::from(ls) >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}
