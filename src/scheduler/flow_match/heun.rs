//! [`FlowMatchHeun`]: diffusers' `FlowMatchHeunDiscreteScheduler` (no churn).

// These imports include the names the `flow_scheduler!` expansion uses.
use ndarray::{ArrayD, ArrayViewD};
use serde_json::Value;

use super::config::Keys;
use super::pipeline::{Img2ImgStart, img2img_start};
use super::sigmas::{static_shift, train_sigma_range};
use super::state::{FlowState, flow_scheduler};
use super::{FLOW_HEUN, HEUN_CLASS, bad_step, bad_steps, on_slices};
use crate::rng::NoiseSource;
use crate::scheduler::common::{check_shapes, np_linspace};
use crate::scheduler::{NoiseLevel, Scheduler, SchedulerError};

/// `FlowMatchHeunDiscreteScheduler` (no churn): two model calls per step, an Euler
/// predictor then the trapezoidal corrector; `2n - 1` calls, sigmas
/// `[s0, s1, s1, ..., s(n-1), s(n-1), 0]`. Takes only `num_train_timesteps` and
/// `shift`, and neither explicit sigmas nor `mu`.
#[derive(Debug, Clone)]
pub struct FlowMatchHeun {
    num_train_timesteps: usize,
    shift: f64,
    sigma_max: f32,
    sigma_min: f32,
    s: FlowState,
    /// The predictor's `dt` while a corrector call is pending.
    dt: Option<f32>,
    prev_derivative: Vec<f32>,
    saved_sample: Vec<f32>,
}

flow_scheduler!(FlowMatchHeun, FLOW_HEUN, 2);

impl FlowMatchHeun {
    /// `FlowMatchHeunDiscreteScheduler(num_train_timesteps, shift)`.
    pub fn new(num_train_timesteps: usize, shift: f64) -> Self {
        let (sigma_max, sigma_min) = train_sigma_range(num_train_timesteps, Some(shift));
        Self {
            num_train_timesteps,
            shift,
            sigma_max,
            sigma_min,
            s: FlowState::default(),
            dt: None,
            prev_derivative: Vec::new(),
            saved_sample: Vec::new(),
        }
    }

    /// `FlowMatchHeunDiscreteScheduler.from_config(json)`: reads `num_train_timesteps`
    /// and `shift` (an Euler config such as SD3's configures it too).
    pub fn from_config(json: &Value) -> Result<Self, SchedulerError> {
        let k = Keys::new(json, HEUN_CLASS)?;
        Ok(Self::new(
            k.usize("num_train_timesteps", 1000)?,
            k.f64("shift", 1.0)?,
        ))
    }

    /// `set_timesteps(n)`; resets the step and begin index and the corrector state.
    pub fn set_timesteps(&mut self, n: usize) -> Result<(), SchedulerError> {
        if n == 0 {
            return Err(bad_steps(
                FLOW_HEUN,
                n,
                "at least one step is needed".into(),
            ));
        }
        let train = self.num_train_timesteps as f64;
        let (hi, lo) = (f64::from(self.sigma_max), f64::from(self.sigma_min));
        let mut s: Vec<f64> = np_linspace(hi * train, lo * train, n)
            .into_iter()
            .map(|t| t / train)
            .collect();
        static_shift(self.shift, &mut s);
        let train = self.num_train_timesteps as f32;
        let (mut sigmas, mut timesteps) = (Vec::with_capacity(2 * n), Vec::with_capacity(2 * n));
        for (i, x) in s.into_iter().map(|x| x as f32).enumerate() {
            let copies = if i == 0 { 1 } else { 2 };
            for _ in 0..copies {
                sigmas.push(x);
                timesteps.push(x * train);
            }
        }
        sigmas.push(0.0);
        self.s.install(sigmas, timesteps);
        self.dt = None;
        Ok(())
    }

    /// The Heun update of model call `index`, in place (which must follow the previous
    /// call while a corrector call is pending). Allocates its two state buffers on the
    /// first call only.
    pub fn step_at(
        &mut self,
        index: usize,
        model_output: &[f32],
        sample: &mut [f32],
    ) -> Result<(), SchedulerError> {
        self.s.check(FLOW_HEUN, index, model_output, sample)?;
        if self.dt.is_some() && Some(index) != self.s.step_index {
            return Err(bad_step(
                FLOW_HEUN,
                index,
                "a corrector call is pending".into(),
            ));
        }
        match self.dt.take() {
            None => {
                let (sigma, sigma_next) = (self.s.sigmas[index], self.s.sigmas[index + 1]);
                // `sigma_hat = sigma * (gamma + 1)` with `gamma = 0`.
                let dt = sigma_next - sigma;
                self.prev_derivative.resize(sample.len(), 0.0);
                self.saved_sample.resize(sample.len(), 0.0);
                let state = self.prev_derivative.iter_mut().zip(&mut self.saved_sample);
                for ((x, &m), (d, s)) in sample.iter_mut().zip(model_output).zip(state) {
                    let denoised = *x - m * sigma;
                    *d = (*x - denoised) / sigma;
                    *s = *x;
                    *x += *d * dt;
                }
                self.dt = Some(dt);
            }
            Some(dt) => {
                let sigma_next = self.s.sigmas[index];
                let state = self.prev_derivative.iter().zip(&self.saved_sample);
                for ((x, &m), (&d, &s)) in sample.iter_mut().zip(model_output).zip(state) {
                    let denoised = *x - m * sigma_next;
                    let derivative = 0.5 * (d + (*x - denoised) / sigma_next);
                    *x = s + derivative * dt;
                }
            }
        }
        self.s.step_index = Some(index + 1);
        Ok(())
    }
}
