//! [`FlowMatchEuler`]: diffusers' `FlowMatchEulerDiscreteScheduler`.

// These imports include the names the `flow_scheduler!` expansion uses.
use ndarray::{ArrayD, ArrayViewD};
use serde_json::Value;

use super::config::FlowMatchConfig;
use super::pipeline::{FlowPipeline, Img2ImgStart, flux_sigmas, img2img_start};
use super::sigmas::{shape_sigmas, train_sigma_range};
use super::state::{FlowState, flow_scheduler};
use super::{FLOW_EULER, bad_step, bad_steps, on_slices};
use crate::rng::NoiseSource;
use crate::scheduler::common::{check_shapes, np_linspace};
use crate::scheduler::{NoiseLevel, Scheduler, SchedulerError};

/// `FlowMatchEulerDiscreteScheduler`: `n` model calls, `n + 1` sigmas ending in 0 (1 with
/// `invert_sigmas`).
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    config: FlowMatchConfig,
    /// The `__init__` schedule's first and last sigma.
    sigma_max: f32,
    sigma_min: f32,
    s: FlowState,
}

flow_scheduler!(FlowMatchEuler, FLOW_EULER, 1);

impl FlowMatchEuler {
    /// `FlowMatchEulerDiscreteScheduler(**config)`; call [`Self::set_timesteps`] next.
    pub fn new(config: FlowMatchConfig) -> Self {
        let shift = (!config.use_dynamic_shifting).then_some(config.shift);
        let (sigma_max, sigma_min) = train_sigma_range(config.num_train_timesteps, shift);
        Self {
            config,
            sigma_max,
            sigma_min,
            s: FlowState::default(),
        }
    }

    /// `FlowMatchEulerDiscreteScheduler.from_config(json)` (a `scheduler_config.json`).
    pub fn from_config(json: &Value) -> Result<Self, SchedulerError> {
        Ok(Self::new(FlowMatchConfig::from_json(json)?))
    }

    /// The resolved config.
    pub fn config(&self) -> &FlowMatchConfig {
        &self.config
    }

    /// `set_timesteps(n, sigmas=sigmas, mu=mu)`. `sigmas` (if given) must hold `n` values;
    /// `mu` is required with `use_dynamic_shifting` and ignored otherwise. Resets the
    /// step and begin index.
    pub fn set_timesteps(
        &mut self,
        n: usize,
        sigmas: Option<&[f32]>,
        mu: Option<f64>,
    ) -> Result<(), SchedulerError> {
        let invalid = |message: String| bad_steps(FLOW_EULER, n, message);
        if n == 0 {
            return Err(invalid("at least one step is needed".into()));
        }
        let mu = match (self.config.use_dynamic_shifting, mu) {
            (true, None) => {
                return Err(SchedulerError::InvalidConfig {
                    scheduler: FLOW_EULER,
                    message: "mu must be passed when use_dynamic_shifting is set".into(),
                });
            }
            (_, mu) => mu.unwrap_or(0.0),
        };
        let shaped = match sigmas {
            Some(s) if s.len() != n => return Err(invalid(format!("{} sigmas given", s.len()))),
            Some(s) => shape_sigmas(&self.config, s.to_vec(), mu),
            None => {
                let train = self.config.num_train_timesteps as f64;
                let (hi, lo) = (f64::from(self.sigma_max), f64::from(self.sigma_min));
                let ts = np_linspace(hi * train, lo * train, n);
                shape_sigmas(
                    &self.config,
                    ts.into_iter().map(|t| t / train).collect(),
                    mu,
                )
            }
        };
        if shaped.iter().any(|s| s.is_nan()) {
            return Err(invalid(
                "the schedule is NaN (shift_terminal with a schedule ending at sigma 1)".into(),
            ));
        }
        let train = self.config.num_train_timesteps as f32;
        let (mut sigmas, last) = if self.config.invert_sigmas {
            (shaped.into_iter().map(|s| 1.0 - s).collect::<Vec<_>>(), 1.0)
        } else {
            (shaped, 0.0)
        };
        let timesteps = sigmas.iter().map(|&s| s * train).collect();
        sigmas.push(last);
        self.s.install(sigmas, timesteps);
        Ok(())
    }

    /// Configures the schedule the way `pipeline` does for a `height` x `width` image
    /// and `n` steps ([`FlowMatchConfig::pipeline_mu`], [`flux_sigmas`]).
    pub fn set_timesteps_for(
        &mut self,
        pipeline: FlowPipeline,
        n: usize,
        height: usize,
        width: usize,
    ) -> Result<(), SchedulerError> {
        let mu = self.config.pipeline_mu(pipeline, height, width);
        match pipeline {
            FlowPipeline::Sd3 => self.set_timesteps(n, None, mu),
            FlowPipeline::Flux => self.set_timesteps(n, Some(&flux_sigmas(n)), mu),
        }
    }

    /// The Euler step at timestep index `index`, in place and allocation-free:
    /// `sample + (σ_next - σ)·model_output` in float32. The next step is `index + 1`.
    pub fn step_at(
        &mut self,
        index: usize,
        model_output: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        self.s.check(FLOW_EULER, index, model_output, sample)?;
        let dt = self.s.sigmas[index + 1] - self.s.sigmas[index];
        for (x, &m) in sample.iter_mut().zip(model_output) {
            *x += dt * m;
        }
        self.s.step_index = Some(index + 1);
        Ok(())
    }
}
