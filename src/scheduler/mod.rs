//! Diffusion schedulers: pure functions on `ndarray`, configured from a model's
//! `scheduler/scheduler_config.json` exactly as diffusers' `from_config` reads it.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};

use crate::rng::NoiseSource;

pub mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod unipc;

pub use config::{ConfigError, ResolvedConfig, SchedulerClass, SchedulerConfig};

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
    /// The scheduler config could not be read or holds unsupported values.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `step` was called with a step index out of order or past the last timestep.
    #[error("scheduler '{scheduler}': bad step index {step_index}: {message}")]
    BadStep {
        /// The scheduler's diffusiond name.
        scheduler: &'static str,
        /// The step index passed.
        step_index: usize,
        /// What is wrong.
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

/// The diffusers class behind each diffusiond scheduler name, and whether the
/// scheduler is that class with `use_karras_sigmas=True`.
fn class_for_name(name: &str) -> Option<(SchedulerClass, bool)> {
    let class = match name {
        "pndm" => SchedulerClass::Pndm,
        "ddim" => SchedulerClass::Ddim,
        "ddpm" => SchedulerClass::Ddpm,
        "euler" => SchedulerClass::EulerDiscrete,
        "euler-a" => SchedulerClass::EulerAncestralDiscrete,
        "heun" => SchedulerClass::HeunDiscrete,
        "lms" => SchedulerClass::LmsDiscrete,
        "dpm++2m" => SchedulerClass::DpmSolverMultistep,
        "dpm++2m-karras" => return Some((SchedulerClass::DpmSolverMultistep, true)),
        "unipc" => SchedulerClass::UniPcMultistep,
        "lcm" => SchedulerClass::Lcm,
        _ => return None,
    };
    Some((class, false))
}

/// The diffusiond scheduler name for a diffusers class name (as in `model_index.json`,
/// e.g. `"PNDMScheduler"` -> `"pndm"`); `None` for classes diffusiond does not implement.
pub fn name_for_class(class_name: &str) -> Option<&'static str> {
    let class = SchedulerClass::from_class_name(class_name)?;
    NAMES
        .iter()
        .copied()
        .find(|n| class_for_name(n) == Some((class, false)))
}

/// Configures scheduler `name` from the model's scheduler config as
/// `Class.from_config(config, **extra)` followed by `set_timesteps(num_inference_steps)`
/// would: keys in the file win (when the class takes them), missing keys take that
/// class's own defaults; `dpm++2m-karras` adds `use_karras_sigmas=True`.
pub fn create(
    name: &str,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let (class, karras) =
        class_for_name(name).ok_or_else(|| SchedulerError::Unknown(name.to_owned()))?;
    let mut resolved = config.resolve(class)?;
    if karras {
        resolved.use_karras_sigmas = true;
    }
    match class {
        SchedulerClass::Pndm => pndm::create(&resolved, num_inference_steps),
        SchedulerClass::Ddim => ddim::create(&resolved, num_inference_steps),
        SchedulerClass::Ddpm => ddpm::create(&resolved, num_inference_steps),
        SchedulerClass::EulerDiscrete => euler::create_euler(&resolved, num_inference_steps),
        SchedulerClass::EulerAncestralDiscrete => {
            euler::create_euler_ancestral(&resolved, num_inference_steps)
        }
        SchedulerClass::HeunDiscrete => heun::create(&resolved, num_inference_steps),
        SchedulerClass::LmsDiscrete => lms::create(&resolved, num_inference_steps),
        SchedulerClass::DpmSolverMultistep => dpm_solver::create(&resolved, num_inference_steps),
        SchedulerClass::UniPcMultistep => unipc::create(&resolved, num_inference_steps),
        SchedulerClass::Lcm => lcm::create(&resolved, num_inference_steps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_maps_to_a_class_and_back() {
        for name in NAMES {
            let (class, karras) = class_for_name(name).expect("known name");
            if !karras {
                assert_eq!(name_for_class(class.class_name()), Some(*name));
            }
        }
        assert_eq!(name_for_class("PNDMScheduler"), Some("pndm"));
        assert_eq!(
            name_for_class("DPMSolverMultistepScheduler"),
            Some("dpm++2m")
        );
        assert_eq!(name_for_class("KDPM2DiscreteScheduler"), None);
        assert!(matches!(
            create("nope", &SchedulerConfig::default(), 4),
            Err(SchedulerError::Unknown(_))
        ));
    }
}
