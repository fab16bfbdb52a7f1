//! The schedule and position both flow schedulers hold, and the `flow_scheduler!`
//! macro that gives both their shared inherent methods and their `Scheduler` view.

use super::bad_step;
use crate::scheduler::SchedulerError;

/// The schedule and position shared by both flow schedulers.
#[derive(Debug, Clone, Default)]
pub(super) struct FlowState {
    pub(super) sigmas: Vec<f32>,
    /// One per model call.
    pub(super) timesteps: Vec<f32>,
    pub(super) timesteps_f64: Vec<f64>,
    pub(super) step_index: Option<usize>,
    pub(super) begin_index: Option<usize>,
}

impl FlowState {
    /// Installs a new schedule and resets the step and begin index.
    pub(super) fn install(&mut self, sigmas: Vec<f32>, timesteps: Vec<f32>) {
        self.timesteps_f64 = timesteps.iter().map(|&t| f64::from(t)).collect();
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        self.begin_index = None;
    }

    /// `sigmas[index]`, clamped to the last sigma.
    pub(super) fn sigma(&self, index: usize) -> f32 {
        self.sigmas[index.min(self.sigmas.len().saturating_sub(1))]
    }

    /// `index_for_timestep(t)`: the second match if `t` occurs more than once.
    pub(super) fn index_for_timestep(&self, t: f32) -> Option<usize> {
        let mut hits = self.timesteps.iter().enumerate().filter(|&(_, &x)| x == t);
        let first = hits.next()?.0;
        Some(hits.next().map_or(first, |h| h.0))
    }

    /// A `BadStep` error unless `index` is scheduled and the sizes agree.
    pub(super) fn check(
        &self,
        name: &'static str,
        index: usize,
        m: &[f32],
        x: &[f32],
    ) -> Result<(), SchedulerError> {
        let n = self.timesteps.len();
        let message = if index >= n {
            format!("only {n} steps are scheduled")
        } else if m.len() != x.len() {
            "the model output and the sample differ in size".to_owned()
        } else {
            return Ok(());
        };
        Err(bad_step(name, index, message))
    }
}

/// The inherent accessors and the [`Scheduler`](crate::scheduler::Scheduler) view both flow
/// schedulers share.
macro_rules! flow_scheduler {
    ($ty:ty, $name:expr, $order:expr) => {
        impl $ty {
            /// The float32 timesteps (`sigma * num_train_timesteps`), one per model call.
            pub fn timesteps(&self) -> &[f32] {
                &self.s.timesteps
            }

            /// The float32 sigmas, ending with the final one.
            pub fn sigmas(&self) -> &[f32] {
                &self.s.sigmas
            }

            /// Always 1: the pipelines start from unscaled noise.
            pub fn init_noise_sigma(&self) -> f32 {
                1.0
            }

            /// `set_begin_index(begin)`: the first model call run (img2img).
            pub fn set_begin_index(&mut self, begin: usize) {
                self.s.begin_index = Some(begin);
            }

            /// The index of the next model call: the step index once stepping began,
            /// else the begin index, else 0.
            pub fn current_index(&self) -> usize {
                self.s.step_index.or(self.s.begin_index).unwrap_or(0)
            }

            /// Applies img2img `strength` as the pipelines' `get_timesteps` does and sets
            /// the begin index; the timesteps run are `timesteps()[start.begin_index..]`.
            pub fn apply_strength(
                &mut self,
                strength: f64,
            ) -> Result<Img2ImgStart, SchedulerError> {
                let n = self.s.timesteps.len().div_ceil($order);
                let start = img2img_start($name, n, strength, $order)?;
                self.set_begin_index(start.begin_index);
                Ok(start)
            }

            /// `scale_noise(sample, timestep, noise)` into `out`: `σ·noise + (1 - σ)·sample`
            /// at the step index, else the begin index, else the index of `timestep`.
            pub fn scale_noise(
                &self,
                sample: &[f32],
                timestep: f32,
                noise: &[f32],
                out: &mut [f32],
            ) -> Result<(), SchedulerError> {
                let index = match self.s.step_index.or(self.s.begin_index) {
                    Some(i) => i,
                    None => self.s.index_for_timestep(timestep).ok_or_else(|| {
                        bad_step($name, 0, format!("timestep {timestep} is not scheduled"))
                    })?,
                };
                let sigma = *self
                    .s
                    .sigmas
                    .get(index)
                    .ok_or_else(|| bad_step($name, index, "past the last sigma".into()))?;
                let keep = 1.0 - sigma;
                for ((o, &x), &n) in out.iter_mut().zip(sample).zip(noise) {
                    *o = sigma * n + keep * x;
                }
                Ok(())
            }

            /// One model call's update at [`Self::current_index`], in place.
            pub fn step(
                &mut self,
                model_output: &[f32],
                sample: &mut [f32],
            ) -> Result<(), SchedulerError> {
                self.step_at(self.current_index(), model_output, sample)
            }
        }

        impl Scheduler for $ty {
            fn timesteps(&self) -> &[f64] {
                &self.s.timesteps_f64
            }

            fn step(
                &mut self,
                model_output: ArrayViewD<'_, f32>,
                step_index: usize,
                sample: &mut ArrayD<f32>,
                _noise: &mut dyn NoiseSource,
            ) -> Result<(), SchedulerError> {
                check_shapes($name, step_index, &model_output, sample)?;
                on_slices(model_output, sample, |m, x| self.step_at(step_index, m, x))
            }

            fn sigmas(&self) -> Option<&[f32]> {
                Some(&self.s.sigmas)
            }

            fn order(&self) -> usize {
                $order
            }

            fn set_begin_index(&mut self, begin: usize) {
                self.s.begin_index = Some(begin);
            }

            /// `Vp { alpha: 1 - σ, sigma: σ }`: `add_noise` is `scale_noise` bit for bit.
            fn noise_level(&self, index: usize) -> NoiseLevel {
                let sigma = self.s.sigma(index);
                NoiseLevel::Vp {
                    alpha: 1.0 - sigma,
                    sigma,
                }
            }

            /// `x0 = x - σ·v`.
            fn pred_original_sample(&self, index: usize, x: &[f32], v: &[f32], out: &mut [f32]) {
                let sigma = self.s.sigma(index);
                for ((o, &x), &v) in out.iter_mut().zip(x).zip(v) {
                    *o = x - sigma * v;
                }
            }
        }
    };
}

pub(super) use flow_scheduler;
