//! `ddpm`: diffusers' `DDPMScheduler` (ancestral sampling). One `randn` is drawn every
//! step whose timestep is above 0. The UNet gets integer timesteps (int64 in diffusers).

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::common::{
    NoiseSchedule, X0Clip, ZeroSnrTail, check_shapes, check_step_index, check_steps, draw_noise,
    spaced_timesteps_i64,
};
use super::config::{PredictionType, ResolvedConfig, VarianceType};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "ddpm";

/// Builds `DDPMScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(Ddpm::new(config, num_inference_steps)?))
}

/// How the added noise is scaled (the supported `variance_type`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    /// `fixed_small`: `clamp(var, 1e-20) ** 0.5`.
    Small,
    /// `fixed_small_log`: `exp(0.5 * log(clamp(var, 1e-20)))`.
    SmallLog,
    /// `fixed_large`: `current_beta_t ** 0.5`.
    Large,
}

/// The float32 scalars of one DDPM step.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    sqrt_alpha: f32,
    sqrt_beta: f32,
    /// `alpha_prod_t_prev ** 0.5 * current_beta_t / beta_prod_t`.
    x0_coeff: f32,
    /// `current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t`.
    sample_coeff: f32,
    /// The noise multiplier; `None` at t = 0 (no noise drawn).
    noise_std: Option<f32>,
}

/// `DDPMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Ddpm {
    timesteps: Vec<f64>,
    ts: Vec<i64>,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    variance: Variance,
    clip: X0Clip,
    x0: ArrayD<f32>,
    noise: Vec<f32>,
    scratch: Vec<f32>,
}

impl Ddpm {
    /// `DDPMScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, NAME, n)?;
        let variance = match cfg.variance_type {
            Some(VarianceType::FixedSmall) | None => Variance::Small,
            Some(VarianceType::FixedSmallLog) => Variance::SmallLog,
            Some(VarianceType::FixedLarge) => Variance::Large,
            Some(other) => {
                return Err(SchedulerError::InvalidConfig {
                    scheduler: NAME,
                    message: format!("variance_type {other:?} is not supported"),
                });
            }
        };
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Keep)?;
        let ts = spaced_timesteps_i64(cfg, n);
        schedule.check_timesteps(&ts, NAME)?;
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            schedule,
            prediction: cfg.prediction_type,
            variance,
            clip: X0Clip::from_config(cfg),
            x0: ArrayD::zeros(ndarray::IxDyn(&[0])),
            noise: Vec::new(),
            scratch: Vec::new(),
        })
    }

    fn coefficients(&self, step_index: usize) -> Result<Coefficients, SchedulerError> {
        let t = self.ts[step_index];
        let alpha = self.schedule.alpha_prod(t, NAME)?;
        let alpha_prev = match self.ts.get(step_index + 1) {
            Some(&prev_t) if prev_t >= 0 => self.schedule.alpha_prod(prev_t, NAME)?,
            _ => 1.0,
        };
        let beta = 1.0 - alpha;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let noise_std = (t > 0).then(|| {
            let variance = (beta_prev / beta * current_beta).max(1e-20);
            match self.variance {
                Variance::Small => variance.sqrt(),
                Variance::SmallLog => (0.5 * variance.ln()).exp(),
                Variance::Large => current_beta.sqrt(),
            }
        });
        Ok(Coefficients {
            sqrt_alpha: alpha.sqrt(),
            sqrt_beta: beta.sqrt(),
            x0_coeff: alpha_prev.sqrt() * current_beta / beta,
            sample_coeff: current_alpha.sqrt() * beta_prev / beta,
            noise_std,
        })
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, _begin: usize) {}

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        self.schedule.noise_level(&self.ts, index)
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(NAME, step_index, None, self.ts.len())?;
        check_shapes(NAME, step_index, &model_output, sample)?;
        let c = self.coefficients(step_index)?;
        let prediction = self.prediction;
        self.x0.clone_from(sample);
        Zip::from(&mut self.x0)
            .and(&model_output)
            .for_each(|x0, &m| {
                let x = *x0;
                *x0 = match prediction {
                    PredictionType::Epsilon => (x - c.sqrt_beta * m) / c.sqrt_alpha,
                    PredictionType::Sample => m,
                    PredictionType::VPrediction => c.sqrt_alpha * x - c.sqrt_beta * m,
                };
            });
        self.clip.apply(self.x0.view_mut(), &mut self.scratch);
        Zip::from(&mut *sample)
            .and(&self.x0)
            .for_each(|x, &x0| *x = c.x0_coeff * x0 + c.sample_coeff * *x);
        if let Some(std) = c.noise_std {
            draw_noise(noise, &mut self.noise, sample.len());
            for (x, &z) in sample.iter_mut().zip(&self.noise) {
                *x += std * z;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check_all, check_refusals};

    #[test]
    fn ddpm_matches_diffusers() {
        check_all("ddpm", 1e-5);
        check_refusals("ddpm");
    }
}
