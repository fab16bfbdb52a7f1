//! `lcm`: diffusers' `LCMScheduler` (latent consistency models, multistep sampling).
//!
//! The timesteps are a subset of the `original_inference_steps` distillation schedule
//! (`timestep_spacing` and `steps_offset` are not used). Every step but the last draws
//! one `randn` to re-noise the denoised estimate. The UNet gets integer timesteps.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};

use super::common::{
    NoiseSchedule, X0Clip, ZeroSnrTail, check_shapes, check_step_index, check_steps, draw_noise,
    np_linspace_no_endpoint,
};
use super::config::{PredictionType, ResolvedConfig};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "lcm";

/// Builds `LCMScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(Lcm::new(config, num_inference_steps)?))
}

/// Builds `LCMScheduler` with `set_timesteps(num_inference_steps, strength=strength)`, as
/// diffusers' LCM image-to-image pipeline does: the distillation schedule shrinks to its
/// first `int(original_inference_steps * strength)` entries, and every step runs.
pub fn create_with_strength(
    config: &ResolvedConfig,
    num_inference_steps: usize,
    strength: f64,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(Lcm::with_strength(
        config,
        num_inference_steps,
        strength,
    )?))
}

/// The float32 scalars of one LCM step.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    sqrt_alpha: f32,
    sqrt_beta: f32,
    sqrt_alpha_prev: f32,
    sqrt_beta_prev: f32,
    c_skip: f32,
    c_out: f32,
}

/// `LCMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Lcm {
    timesteps: Vec<f64>,
    ts: Vec<i64>,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    timestep_scaling: f32,
    prediction: PredictionType,
    clip: X0Clip,
    noise: Vec<f32>,
    scratch: Vec<f32>,
}

impl Lcm {
    /// `LCMScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        Lcm::with_strength(cfg, n, 1.0)
    }

    /// `LCMScheduler.from_config(config)` then `set_timesteps(n, strength=strength)`.
    pub fn with_strength(
        cfg: &ResolvedConfig,
        n: usize,
        strength: f64,
    ) -> Result<Self, SchedulerError> {
        check_steps(cfg, NAME, n)?;
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Keep)?;
        let ts = lcm_timesteps(cfg, n, strength)?;
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
            timestep_scaling: cfg.timestep_scaling as f32,
            prediction: cfg.prediction_type,
            clip: X0Clip::from_config(cfg),
            noise: Vec::new(),
            scratch: Vec::new(),
        })
    }

    fn coefficients(&self, step_index: usize) -> Result<Coefficients, SchedulerError> {
        let t = self.ts[step_index];
        let prev_t = self.ts.get(step_index + 1).copied().unwrap_or(t);
        let alpha = self.schedule.alpha_prod(t, NAME)?;
        let alpha_prev = if prev_t >= 0 {
            self.schedule.alpha_prod(prev_t, NAME)?
        } else {
            self.final_alpha_cumprod
        };
        // get_scalings_for_boundary_condition_discrete, sigma_data = 0.5.
        let scaled = t as f32 * self.timestep_scaling;
        let denom = scaled * scaled + 0.25;
        Ok(Coefficients {
            sqrt_alpha: alpha.sqrt(),
            sqrt_beta: (1.0 - alpha).sqrt(),
            sqrt_alpha_prev: alpha_prev.sqrt(),
            sqrt_beta_prev: (1.0 - alpha_prev).sqrt(),
            c_skip: 0.25 / denom,
            c_out: scaled / denom.sqrt(),
        })
    }
}

/// `set_timesteps(n, strength)`: `n` indices spread (floor of
/// `linspace(0, len, n, endpoint=False)`) over the reversed distillation schedule
/// `arange(1, int(original_steps * strength) + 1) * (n_train // original_steps) - 1`.
fn lcm_timesteps(
    cfg: &ResolvedConfig,
    n: usize,
    strength: f64,
) -> Result<Vec<i64>, SchedulerError> {
    let original = cfg.original_inference_steps;
    let refuse = |message: String| SchedulerError::InvalidSteps {
        scheduler: NAME,
        steps: n,
        message,
    };
    if original == 0 || original > cfg.num_train_timesteps {
        return Err(SchedulerError::InvalidConfig {
            scheduler: NAME,
            message: format!(
                "original_inference_steps = {original} must be in 1..={}",
                cfg.num_train_timesteps
            ),
        });
    }
    if n > original {
        return Err(refuse(format!(
            "more steps than original_inference_steps = {original}"
        )));
    }
    let k = (cfg.num_train_timesteps / original) as i64;
    let kept = (original as f64 * strength) as i64;
    if kept < n as i64 {
        return Err(refuse(format!(
            "original_inference_steps x strength = {original} x {strength} leaves {kept} distillation steps, fewer than the steps asked for"
        )));
    }
    let origin: Vec<i64> = (1..=kept).rev().map(|i| i * k - 1).collect();
    Ok(np_linspace_no_endpoint(0.0, origin.len() as f64, n)
        .into_iter()
        .map(|v| origin[(v.floor() as usize).min(origin.len() - 1)])
        .collect())
}

impl Scheduler for Lcm {
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
        // The predicted x0 needs the whole tensor before thresholding, so it is built in
        // the noise buffer (reused) and then combined with the sample.
        self.noise.clear();
        self.noise
            .extend(
                sample
                    .iter()
                    .zip(model_output.iter())
                    .map(|(&x, &m)| match prediction {
                        PredictionType::Epsilon => (x - c.sqrt_beta * m) / c.sqrt_alpha,
                        PredictionType::Sample => m,
                        PredictionType::VPrediction => c.sqrt_alpha * x - c.sqrt_beta * m,
                    }),
            );
        if self.clip != X0Clip::None {
            let view =
                ArrayViewMutD::from_shape(sample.raw_dim(), &mut self.noise[..]).map_err(|e| {
                    SchedulerError::BadStep {
                        scheduler: NAME,
                        step_index,
                        message: e.to_string(),
                    }
                })?;
            self.clip.apply(view, &mut self.scratch);
        }
        // denoised = c_out * x0 + c_skip * sample
        for (x, &x0) in sample.iter_mut().zip(&self.noise) {
            *x = c.c_out * x0 + c.c_skip * *x;
        }
        if step_index + 1 != self.ts.len() {
            draw_noise(noise, &mut self.noise, sample.len());
            for (x, &z) in sample.iter_mut().zip(&self.noise) {
                *x = c.sqrt_alpha_prev * *x + c.sqrt_beta_prev * z;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check_all, check_refusals};

    #[test]
    fn lcm_matches_diffusers() {
        check_all("lcm", 1e-5);
        check_refusals("lcm");
    }
}
