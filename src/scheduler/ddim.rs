//! `ddim`: diffusers' `DDIMScheduler` with `eta = 0` (the pipeline default), so no
//! noise is drawn. The UNet gets integer timesteps (diffusers passes int64).

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::common::{
    NoiseSchedule, X0Clip, ZeroSnrTail, check_shapes, check_step_index, check_steps,
    spaced_timesteps_i64,
};
use super::config::{PredictionType, ResolvedConfig};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "ddim";

/// Builds `DDIMScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(Ddim::new(config, num_inference_steps)?))
}

/// The float32 scalars of one DDIM step.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    /// `alpha_prod_t ** 0.5`.
    sqrt_alpha: f32,
    /// `beta_prod_t ** 0.5`.
    sqrt_beta: f32,
    /// `alpha_prod_t_prev ** 0.5`.
    sqrt_alpha_prev: f32,
    /// `(1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5`.
    direction: f32,
}

/// `DDIMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    ts: Vec<i64>,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    prediction: PredictionType,
    clip: X0Clip,
    x0: ArrayD<f32>,
    scratch: Vec<f32>,
}

impl Ddim {
    /// `DDIMScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, NAME, n)?;
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Keep)?;
        let ts = spaced_timesteps_i64(cfg, n);
        schedule.check_timesteps(&ts, NAME)?;
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                schedule.alphas_cumprod[0]
            },
            schedule,
            step_ratio: (cfg.num_train_timesteps / n) as i64,
            prediction: cfg.prediction_type,
            clip: X0Clip::from_config(cfg),
            x0: ArrayD::zeros(ndarray::IxDyn(&[0])),
            scratch: Vec::new(),
        })
    }

    fn coefficients(&self, t: i64) -> Result<Coefficients, SchedulerError> {
        let prev_t = t - self.step_ratio;
        let alpha = self.schedule.alpha_prod(t, NAME)?;
        let alpha_prev = if prev_t >= 0 {
            self.schedule.alpha_prod(prev_t, NAME)?
        } else {
            self.final_alpha_cumprod
        };
        // eta = 0: std_dev_t = 0 * variance ** 0.5 = 0.
        let std_dev = 0.0f32;
        Ok(Coefficients {
            sqrt_alpha: alpha.sqrt(),
            sqrt_beta: (1.0 - alpha).sqrt(),
            sqrt_alpha_prev: alpha_prev.sqrt(),
            direction: (1.0 - alpha_prev - std_dev * std_dev).sqrt(),
        })
    }
}

impl Scheduler for Ddim {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(NAME, step_index, None, self.ts.len())?;
        check_shapes(NAME, step_index, &model_output, sample)?;
        let c = self.coefficients(self.ts[step_index])?;
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
        Zip::from(sample)
            .and(&self.x0)
            .and(&model_output)
            .for_each(|x, &x0, &m| {
                // pred_epsilon comes from the unclipped prediction, as in diffusers.
                let eps = match prediction {
                    PredictionType::Epsilon => m,
                    PredictionType::Sample => (*x - c.sqrt_alpha * m) / c.sqrt_beta,
                    PredictionType::VPrediction => c.sqrt_alpha * m + c.sqrt_beta * *x,
                };
                *x = c.sqrt_alpha_prev * x0 + c.direction * eps;
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check_all, check_refusals};

    #[test]
    fn ddim_matches_diffusers() {
        check_all("ddim", 1e-5);
        check_refusals("ddim");
    }
}
