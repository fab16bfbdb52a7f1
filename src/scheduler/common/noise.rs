//! The training noise schedule: betas (linear, scaled linear, Glide cosine, trained),
//! the zero-terminal-SNR rescale and float32 `alphas_cumprod`.

use super::numeric::torch_linspace_f32;
use crate::scheduler::SchedulerError;
use crate::scheduler::config::{BetaSchedule, ResolvedConfig};

/// The Glide cosine schedule (`betas_for_alpha_bar(n)` with `max_beta = 0.999`),
/// computed in float64 and stored as float32.
pub fn betas_for_alpha_bar(num_diffusion_timesteps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    let n = num_diffusion_timesteps as f64;
    (0..num_diffusion_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(x, 0)` for float32 `x`: accumulates in double, stores float32.
pub fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr(betas)` (Algorithm 1 of arXiv:2305.08891), in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    if betas.is_empty() {
        return Vec::new();
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut bar_sqrt: Vec<f32> = torch_cumprod_f32(&alphas)
        .iter()
        .map(|a| a.sqrt())
        .collect();
    let first = bar_sqrt[0];
    let last = bar_sqrt[bar_sqrt.len() - 1];
    let scale = first / (first - last);
    for v in &mut bar_sqrt {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = bar_sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// A scheduler's training noise schedule: float32 `betas` and `alphas_cumprod`.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `self.betas`.
    pub betas: Vec<f32>,
    /// `self.alphas_cumprod`.
    pub alphas_cumprod: Vec<f32>,
}

/// How a class treats the last `alphas_cumprod` entry under `rescale_betas_zero_snr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroSnrTail {
    /// Leave it at 0 (DDIM, DDPM, LCM).
    Keep,
    /// Set it to `2**-24` so the first sigma is finite (Euler, Euler-a, DPM-Solver, UniPC).
    Floor,
}

impl NoiseSchedule {
    /// Builds betas and `alphas_cumprod` as the class's `__init__` does.
    ///
    /// `rescale_betas_zero_snr` is honoured only if the class takes it (the resolved
    /// config holds `false` otherwise).
    pub fn new(cfg: &ResolvedConfig, tail: ZeroSnrTail) -> Result<Self, SchedulerError> {
        let n = cfg.num_train_timesteps;
        let invalid = |message: String| SchedulerError::InvalidConfig {
            scheduler: cfg.class.class_name(),
            message,
        };
        if n < 2 {
            return Err(invalid(format!(
                "num_train_timesteps = {n} (need at least 2)"
            )));
        }
        let mut betas = match &cfg.trained_betas {
            Some(tb) if tb.len() != n => {
                return Err(invalid(format!(
                    "trained_betas has {} entries but num_train_timesteps = {n}",
                    tb.len()
                )));
            }
            Some(tb) => tb.iter().map(|&b| b as f32).collect(),
            None => match cfg.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n),
            },
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = torch_cumprod_f32(&alphas);
        if cfg.rescale_betas_zero_snr && tail == ZeroSnrTail::Floor {
            alphas_cumprod[n - 1] = 2f32.powi(-24);
        }
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// Refuses a schedule with a timestep outside `0..num_train_timesteps` (diffusers
    /// would fail with an index error in `step`).
    pub fn check_timesteps(
        &self,
        timesteps: &[i64],
        scheduler: &'static str,
    ) -> Result<(), SchedulerError> {
        let n = self.alphas_cumprod.len();
        match timesteps.iter().find(|&&t| t < 0 || t >= n as i64) {
            Some(&t) => Err(SchedulerError::InvalidSteps {
                scheduler,
                steps: timesteps.len(),
                message: format!("timestep {t} is outside the {n} training timesteps"),
            }),
            None => Ok(()),
        }
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, ascending in t.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// `alphas_cumprod[t]`, or an error when `t` is outside the training range.
    pub fn alpha_prod(&self, t: i64, scheduler: &'static str) -> Result<f32, SchedulerError> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| SchedulerError::InvalidConfig {
                scheduler,
                message: format!(
                    "timestep {t} is outside the {} training timesteps",
                    self.alphas_cumprod.len()
                ),
            })
    }
}

impl NoiseSchedule {
    /// The `add_noise` level at timestep index `index` of `ts`: from
    /// `alphas_cumprod[ts[index]]` (the timesteps were checked against the schedule when
    /// the scheduler was built; an index past the end takes the last timestep).
    pub fn noise_level(&self, ts: &[i64], index: usize) -> crate::scheduler::NoiseLevel {
        let t = ts.get(index).or(ts.last()).copied().unwrap_or(0);
        let last = self.alphas_cumprod.len().saturating_sub(1);
        let i = usize::try_from(t).unwrap_or(0).min(last);
        crate::scheduler::NoiseLevel::from_alpha_prod(self.alphas_cumprod[i])
    }
}
