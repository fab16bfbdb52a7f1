//! Diffusion schedulers: pure functions on `ndarray`, configured from a model's
//! `scheduler/scheduler_config.json` exactly as diffusers' `from_config` reads it.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};

use crate::rng::NoiseSource;

/// Errors raised while configuring or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The scheduler name is not one diffusiond knows.
    #[error("unknown scheduler '{0}' (known: {known})", known = NAMES.join(", "))]
    Unknown(String),
    /// A configuration value is outside what the scheduler supports.
    #[error("scheduler '{scheduler}': {message}")]
    InvalidConfig {
        /// The scheduler's diffusiond name.
        scheduler: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// The requested number of inference steps cannot be used with this configuration.
    #[error("scheduler '{scheduler}' cannot run {steps} steps: {message}")]
    InvalidSteps {
        /// The scheduler's diffusiond name.
        scheduler: &'static str,
        /// The number of steps asked for.
        steps: usize,
        /// Why not.
        message: String,
    },
}

/// Every scheduler name diffusiond accepts.
pub const NAMES: &[&str] = &[
    "pndm",
    "ddim",
    "ddpm",
    "euler",
    "euler-a",
    "heun",
    "lms",
    "dpm++2m",
    "dpm++2m-karras",
    "unipc",
    "lcm",
];

/// One configured scheduler for one generation (`set_timesteps` already applied).
///
/// The pipeline drives it exactly as diffusers' `StableDiffusionPipeline` does:
/// ```text
/// latents *= init_noise_sigma()
/// for (i, t) in timesteps().enumerate():
///     input = scale_model_input(latents (duplicated for CFG), i)
///     noise_pred = unet(input, t)            // then CFG
///     step(noise_pred, i, &mut latents, noise)
/// ```
pub trait Scheduler: Send {
    /// The timesteps the UNet is evaluated at, in order: one entry per UNet call
    /// (Heun and PNDM repeat entries). Values are what diffusers passes to the UNet.
    fn timesteps(&self) -> &[f64];

    /// The factor diffusers multiplies the initial noise by.
    fn init_noise_sigma(&self) -> f32;

    /// Scales the UNet input for step `step_index`, in place (diffusers' `scale_model_input`).
    fn scale_model_input(&self, sample: ArrayViewMutD<'_, f32>, step_index: usize);

    /// Advances `sample` by one step, given the guided model output for step `step_index`.
    /// Stochastic schedulers draw their noise from `noise`, one `randn(sample.shape)` call
    /// per step, as diffusers does with the pipeline's generator.
    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError>;
}
