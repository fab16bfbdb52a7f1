//! `heun`: diffusers' `HeunDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).
//!
//! Each inference step but the last takes two UNet calls: an Euler predictor and a
//! trapezoidal corrector, so `timesteps()` holds `2n - 1` float32 entries
//! (`[t0, t1, t1, t2, t2, ...]`) and `step` is called once per UNet call.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Zip};

use super::common::{
    NoiseSchedule, SigmaSpacing, ZeroSnrTail, check_shapes, check_step_index, check_steps,
    euler_init_noise_sigma, interp_sigmas, log_sigmas, scale_by_sigma, sigma_to_t,
    spaced_timesteps_f32,
};
use super::config::{PredictionType, ResolvedConfig};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "heun";

/// Builds `HeunDiscreteScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(HeunDiscrete::new(config, num_inference_steps)?))
}

/// `HeunDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct HeunDiscrete {
    /// `2n - 1` UNet timesteps.
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]` (`2n` entries).
    sigmas: Vec<f32>,
    prediction: PredictionType,
    clip: Option<f32>,
    init_noise_sigma: f32,
    /// The first-order derivative, kept for the corrector.
    prev_derivative: ArrayD<f32>,
    /// The sample the predictor started from.
    start_sample: ArrayD<f32>,
    /// `dt` of the pending predictor step; `None` in first-order state.
    dt: Option<f32>,
    next_call: usize,
}

impl HeunDiscrete {
    /// `HeunDiscreteScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, NAME, n)?;
        let spacing = SigmaSpacing::from_config(cfg)?;
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Keep)?;
        let train_sigmas = schedule.train_sigmas();
        let mut timesteps: Vec<f64> = spaced_timesteps_f32(cfg, n)
            .into_iter()
            .map(f64::from)
            .collect();
        let ts32: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let mut sigmas = interp_sigmas(&ts32, &train_sigmas);
        if spacing != SigmaSpacing::Interpolated {
            let log_train = log_sigmas(&train_sigmas);
            sigmas = spacing.convert(sigmas, cfg.sigma_min, cfg.sigma_max, n);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_train)).collect();
        }
        let mut base: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        base.push(0.0);
        Ok(Self {
            init_noise_sigma: euler_init_noise_sigma(&base, cfg.timestep_spacing),
            timesteps: interleave_timesteps(&timesteps),
            sigmas: interleave_sigmas(&base),
            prediction: cfg.prediction_type,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
            prev_derivative: ArrayD::zeros(ndarray::IxDyn(&[0])),
            start_sample: ArrayD::zeros(ndarray::IxDyn(&[0])),
            dt: None,
            next_call: 0,
        })
    }
}

/// `cat([t[:1], t[1:].repeat_interleave(2)])`, as float32 values.
fn interleave_timesteps(t: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * t.len());
    for (i, &v) in t.iter().enumerate() {
        let v = f64::from(v as f32);
        out.push(v);
        if i > 0 {
            out.push(v);
        }
    }
    out
}

/// `cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])`.
fn interleave_sigmas(s: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * s.len());
    for (i, &v) in s.iter().enumerate() {
        out.push(v);
        if i > 0 && i + 1 < s.len() {
            out.push(v);
        }
    }
    out
}

/// The denoised estimate at noise level `sigma` (float32, torch order), clipped if asked.
fn denoise(prediction: PredictionType, sigma: f32, clip: Option<f32>, x: f32, m: f32) -> f32 {
    let x0 = match prediction {
        PredictionType::Epsilon => x - sigma * m,
        PredictionType::VPrediction => {
            let c_in = sigma * sigma + 1.0;
            m * (-sigma / c_in.sqrt()) + x / c_in
        }
        PredictionType::Sample => m,
    };
    match clip {
        Some(r) => x0.max(-r).min(r),
        None => x0,
    }
}

impl Scheduler for HeunDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.next_call = begin;
    }

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        crate::scheduler::NoiseLevel::Sigma(self.sigmas[index.min(self.sigmas.len() - 1)])
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: ArrayViewMutD<'_, f32>, step_index: usize) {
        scale_by_sigma(sample, &self.sigmas, step_index);
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(NAME, step_index, Some(self.next_call), self.timesteps.len())?;
        check_shapes(NAME, step_index, &model_output, sample)?;
        let (prediction, clip) = (self.prediction, self.clip);
        match self.dt.take() {
            None => {
                // Predictor: Euler step from sigma to sigma_next, remembering the start.
                let sigma = self.sigmas[step_index];
                let dt = self.sigmas[step_index + 1] - sigma;
                self.prev_derivative.clone_from(sample);
                self.start_sample.clone_from(sample);
                Zip::from(&mut self.prev_derivative)
                    .and(sample)
                    .and(&model_output)
                    .for_each(|d, x, &m| {
                        *d = (*x - denoise(prediction, sigma, clip, *x, m)) / sigma;
                        *x += *d * dt;
                    });
                self.dt = Some(dt);
            }
            Some(dt) => {
                // Corrector: average the derivatives at both ends, step from the start.
                let sigma_next = self.sigmas[step_index];
                Zip::from(sample)
                    .and(&self.prev_derivative)
                    .and(&self.start_sample)
                    .and(&model_output)
                    .for_each(|x, &d1, &x_start, &m| {
                        let d2 = (*x - denoise(prediction, sigma_next, clip, *x, m)) / sigma_next;
                        let derivative = (d1 + d2) / 2.0;
                        *x = x_start + derivative * dt;
                    });
            }
        }
        self.next_call += 1;
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
    fn heun_matches_diffusers() {
        check_all("heun", 1e-5);
        check_refusals("heun");
    }
}
