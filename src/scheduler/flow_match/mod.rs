//! Flow-matching schedulers for rectified-flow transformers (SD3, SD3.5, FLUX.1):
//! `flow-euler` (diffusers' `FlowMatchEulerDiscreteScheduler`) and `flow-heun`
//! (`FlowMatchHeunDiscreteScheduler`), plus the pipeline helpers that choose their
//! inputs (`calculate_shift`'s `mu`, FLUX's explicit sigmas, img2img strength).
//!
//! The model predicts a velocity `v`; a sample at noise level `σ` is
//! `x = (1 - σ)·x0 + σ·noise`, so one Euler step is `x + (σ_next - σ)·v` and
//! `x0 = x - σ·v`. Sigmas run from about 1 down to a final 0 that is appended.
//!
//! Precision follows diffusers 0.39.0 exactly: without explicit sigmas the schedule is
//! built in float64 (numpy) and rounded to float32 once; explicit sigmas (FLUX) are
//! rounded to float32 first and shifted in float32 (numpy keeps float32 arrays float32
//! when combined with Python scalars); timesteps are `sigma * num_train_timesteps` in
//! float32; every step is float32 elementwise arithmetic in torch's operation order
//! (never fused), so the result is bit-identical to diffusers on the CPU.
//!
//! Both types also implement [`Scheduler`](super::Scheduler): the timesteps it hands out are the
//! transformer's timesteps on the 0..`num_train_timesteps` scale (SD3 passes them as is;
//! FLUX divides them by 1000), `noise_level` is `Vp { alpha: 1 - σ, sigma: σ }` (so
//! `NoiseLevel::add_noise` is `scale_noise` bit for bit) and `pred_original_sample` is
//! `x - σ·v`.
//!
//! This file holds the names and the step-error helpers; `config.rs` reads the config,
//! `pipeline.rs` has the pipeline helpers, `sigmas.rs` shapes the schedule, `state.rs`
//! holds the state and [`Scheduler`](super::Scheduler) view both types share, and
//! `euler.rs` and `heun.rs` the two schedulers.

use ndarray::{ArrayD, ArrayViewD};

use super::SchedulerError;

mod config;
mod euler;
mod heun;
mod pipeline;
mod sigmas;
mod state;

#[cfg(test)]
mod tests;

pub use config::{FlowMatchConfig, FlowSigmaSpacing};
pub use euler::FlowMatchEuler;
pub use heun::FlowMatchHeun;
pub use pipeline::{
    FlowPipeline, Img2ImgStart, calculate_shift, flux_sigmas, image_seq_len, img2img_start,
};

/// diffusiond's name for [`FlowMatchEuler`].
pub const FLOW_EULER: &str = "flow-euler";
/// diffusiond's name for [`FlowMatchHeun`].
pub const FLOW_HEUN: &str = "flow-heun";
/// The diffusers class behind [`FLOW_EULER`].
pub const EULER_CLASS: &str = "FlowMatchEulerDiscreteScheduler";
/// The diffusers class behind [`FLOW_HEUN`].
pub const HEUN_CLASS: &str = "FlowMatchHeunDiscreteScheduler";

/// Runs `f` on contiguous slices of `model_output` and `sample` (copying only when one
/// is not in standard layout).
pub(super) fn on_slices<R>(
    model_output: ArrayViewD<'_, f32>,
    sample: &mut ArrayD<f32>,
    f: impl FnOnce(&[f32], &mut [f32]) -> R,
) -> R {
    let m = model_output.as_standard_layout();
    let m = m.as_slice().expect("standard layout");
    if let Some(x) = sample.as_slice_mut() {
        return f(m, x);
    }
    let mut tmp = sample.as_standard_layout().into_owned();
    let r = f(m, tmp.as_slice_mut().expect("standard layout"));
    sample.assign(&tmp);
    r
}

pub(super) fn bad_step(
    scheduler: &'static str,
    step_index: usize,
    message: String,
) -> SchedulerError {
    SchedulerError::BadStep {
        scheduler,
        step_index,
        message,
    }
}

pub(super) fn bad_steps(scheduler: &'static str, steps: usize, message: String) -> SchedulerError {
    SchedulerError::InvalidSteps {
        scheduler,
        steps,
        message,
    }
}
