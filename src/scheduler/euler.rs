//! `euler` (diffusers' `EulerDiscreteScheduler`) and `euler-a`
//! (`EulerAncestralDiscreteScheduler`).
//!
//! The sigma schedule is built in float64 as numpy does and stored as float32; every
//! step is float32 elementwise arithmetic in torch's operation order. The UNet gets
//! float32 timesteps (fractional for `linspace` spacing).

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};

use super::common::{
    NoiseSchedule, SigmaSpacing, ZeroSnrTail, check_shapes, check_step_index, check_steps,
    draw_noise, euler_init_noise_sigma, interp_sigmas, log_f32, log_sigmas, scale_by_sigma,
    sigma_to_t, spaced_timesteps_f32, torch_linspace_f32, zip_update,
};
use super::config::{
    FinalSigmasType, InterpolationType, PredictionType, ResolvedConfig, TimestepType,
};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const EULER: &str = "euler";
const EULER_A: &str = "euler-a";

/// Builds `EulerDiscreteScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create_euler(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(EulerDiscrete::new(config, num_inference_steps)?))
}

/// Builds `EulerAncestralDiscreteScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create_euler_ancestral(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(EulerAncestral::new(config, num_inference_steps)?))
}

/// The denoised estimate `x0` of the Euler family for one element (float32, torch order).
#[derive(Debug, Clone, Copy)]
enum Denoise {
    /// `x - sigma * m`.
    Epsilon { sigma: f32 },
    /// `m * c_out + x / c_in` with `c_out = -sigma / sqrt(sigma^2 + 1)`, `c_in = sigma^2 + 1`.
    V { c_out: f32, c_in: f32 },
    /// `m`.
    Sample,
}

impl Denoise {
    fn new(prediction: PredictionType, sigma: f32) -> Self {
        match prediction {
            PredictionType::Epsilon => Self::Epsilon { sigma },
            PredictionType::VPrediction => {
                let c_in = sigma * sigma + 1.0;
                Self::V {
                    c_out: -sigma / c_in.sqrt(),
                    c_in,
                }
            }
            PredictionType::Sample => Self::Sample,
        }
    }

    #[inline]
    fn apply(self, x: f32, m: f32) -> f32 {
        match self {
            Self::Epsilon { sigma } => x - sigma * m,
            Self::V { c_out, c_in } => m * c_out + x / c_in,
            Self::Sample => m,
        }
    }
}

/// `EulerDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    /// `n + 1` sigmas (more for `log_linear` interpolation, as in diffusers).
    sigmas: Vec<f32>,
    prediction: PredictionType,
    init_noise_sigma: f32,
}

impl EulerDiscrete {
    /// `EulerDiscreteScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, EULER, n)?;
        let spacing = SigmaSpacing::from_config(cfg)?;
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Floor)?;
        let train_sigmas = schedule.train_sigmas();
        let log_train = log_sigmas(&train_sigmas);
        let mut timesteps = spaced_timesteps_f32(cfg, n);
        let mut sigmas: Vec<f64> = match cfg.interpolation_type {
            InterpolationType::Linear => interp_sigmas(&timesteps, &train_sigmas),
            // `torch.linspace(log(max), log(min), n + 1).exp()` in float32 (n + 1 values,
            // then the final sigma is appended too, exactly as diffusers does).
            InterpolationType::LogLinear => {
                let lo = train_sigmas.first().copied().unwrap_or(0.0);
                let hi = train_sigmas.last().copied().unwrap_or(0.0);
                torch_linspace_f32(f64::from(log_f32(hi)), f64::from(log_f32(lo)), n + 1)
                    .into_iter()
                    .map(|l| f64::from(l.exp()))
                    .collect()
            }
        };
        if spacing != SigmaSpacing::Interpolated {
            sigmas = spacing.convert(sigmas, cfg.sigma_min, cfg.sigma_max, n);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_train) as f32)
                .collect();
        }
        let last = match cfg.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(last);
        let continuous = cfg.timestep_type == TimestepType::Continuous
            && cfg.prediction_type == PredictionType::VPrediction;
        let timesteps: Vec<f64> = if continuous {
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| f64::from(0.25 * s.ln()))
                .collect()
        } else {
            timesteps.into_iter().map(f64::from).collect()
        };
        Ok(Self {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, cfg.timestep_spacing),
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, _begin: usize) {}

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        crate::scheduler::NoiseLevel::Sigma(self.sigmas[index.min(self.sigmas.len() - 1)])
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: ArrayViewMutD<'_, f32>, step_index: usize) {
        scale_by_sigma(sample, &self.sigmas, step_index);
    }

    /// Euler step without churn (`s_churn = 0`, the pipeline default): no noise is drawn.
    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(EULER, step_index, None, self.timesteps.len())?;
        check_shapes(EULER, step_index, &model_output, sample)?;
        let sigma = self.sigmas[step_index];
        let dt = self.sigmas[step_index + 1] - sigma;
        let denoise = Denoise::new(self.prediction, sigma);
        zip_update(sample, &model_output, |x, m| {
            let derivative = (x - denoise.apply(x, m)) / sigma;
            x + derivative * dt
        });
        Ok(())
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

/// `EulerAncestralDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    /// `n + 1` sigmas, the last one 0.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    init_noise_sigma: f32,
    noise: Vec<f32>,
}

impl EulerAncestral {
    /// `EulerAncestralDiscreteScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, EULER_A, n)?;
        if cfg.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::InvalidConfig {
                scheduler: EULER_A,
                message: "prediction_type \"sample\" is not implemented in diffusers".into(),
            });
        }
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Floor)?;
        let timesteps = spaced_timesteps_f32(cfg, n);
        let mut sigmas: Vec<f32> = interp_sigmas(&timesteps, &schedule.train_sigmas())
            .into_iter()
            .map(|s| s as f32)
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, cfg.timestep_spacing),
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            prediction: cfg.prediction_type,
            noise: Vec::new(),
        })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, _begin: usize) {}

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        crate::scheduler::NoiseLevel::Sigma(self.sigmas[index.min(self.sigmas.len() - 1)])
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: ArrayViewMutD<'_, f32>, step_index: usize) {
        scale_by_sigma(sample, &self.sigmas, step_index);
    }

    /// Draws one `randn(sample.shape)` every step (also the last, where it is scaled by 0).
    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(EULER_A, step_index, None, self.timesteps.len())?;
        check_shapes(EULER_A, step_index, &model_output, sample)?;
        let sigma_from = self.sigmas[step_index];
        let sigma_to = self.sigmas[step_index + 1];
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma_from;
        let denoise = Denoise::new(self.prediction, sigma_from);
        draw_noise(noise, &mut self.noise, sample.len());
        zip_update(sample, &model_output, |x, m| {
            let derivative = (x - denoise.apply(x, m)) / sigma_from;
            x + derivative * dt
        });
        // `prev_sample + noise * sigma_up`, in the sample's logical (C) order.
        for (x, &z) in sample.iter_mut().zip(&self.noise) {
            *x += z * sigma_up;
        }
        Ok(())
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check_all, check_refusals};

    #[test]
    fn euler_matches_diffusers() {
        check_all("euler", 1e-5);
        check_refusals("euler");
    }

    #[test]
    fn euler_ancestral_matches_diffusers() {
        check_all("euler-a", 1e-5);
        check_refusals("euler-a");
    }
}
