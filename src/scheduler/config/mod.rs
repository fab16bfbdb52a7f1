//! A model's `scheduler/scheduler_config.json`, read the way diffusers'
//! `ConfigMixin.from_config` reads it.
//!
//! [`SchedulerConfig`] holds the keys as written in the file (each one optional).
//! [`SchedulerConfig::resolve`] then builds the concrete [`ResolvedConfig`] that one
//! scheduler class sees: a key present in the file wins *if that class's `__init__`
//! takes it*; every other key takes that class's own default (so DDIM gets
//! `clip_sample = true` and Euler `timestep_spacing = "linspace"` when the file does not
//! say otherwise). Keys named in `_use_default_values` are treated as absent, as in
//! diffusers. A JSON `null` is treated as absent too (for the keys whose diffusers
//! default is `None` that is the same thing; for the others diffusers would pass `None`
//! on and fail later).
//!
//! String-valued keys are only checked when a class takes them, so a config written for
//! one class can still configure another.
//!
//! This file holds the error and the two config types; `class.rs` has the classes and
//! the keys each takes, `values.rs` the typed key values, `read.rs` the JSON reading
//! and `resolve.rs` [`SchedulerConfig::resolve`].

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

mod class;
mod read;
mod resolve;
mod values;

#[cfg(test)]
mod tests;

pub use class::SchedulerClass;
pub use values::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, JsonFloatField,
    PredictionType, SolverType, TimeShiftType, TimestepSpacing, TimestepType, VarianceType,
};

/// Errors raised while reading or resolving a scheduler config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read scheduler config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not a JSON object, or a known key has the wrong JSON type.
    #[error("malformed scheduler config: {0}")]
    Json(#[from] serde_json::Error),
    /// The text is JSON but not an object.
    #[error("malformed scheduler config: expected a JSON object at the top level")]
    NotAnObject,
    /// A key holds a value that the class does not support.
    #[error("{class}: unsupported {key} = {value}")]
    Unsupported {
        /// The diffusers class being configured.
        class: &'static str,
        /// The config key.
        key: &'static str,
        /// The offending value, as text.
        value: String,
    },
}

/// The scheduler keys of a `scheduler_config.json`, each as written (absent = `None`).
///
/// Unknown keys are ignored; known keys with the wrong JSON type are an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct SchedulerConfig {
    /// `_class_name`: the class the config was saved from.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<JsonFloatField>,
    pub beta_end: Option<JsonFloatField>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<JsonFloatField>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<JsonFloatField>,
    pub sample_max_value: Option<JsonFloatField>,
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub variance_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub flow_shift: Option<JsonFloatField>,
    pub sigma_min: Option<JsonFloatField>,
    pub sigma_max: Option<JsonFloatField>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<JsonFloatField>,
    pub use_dynamic_shifting: Option<bool>,
    pub time_shift_type: Option<String>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    /// `solver_p` is a scheduler object in diffusers; only `null` is supported.
    pub solver_p: Option<Value>,
    pub shift_terminal: Option<JsonFloatField>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<JsonFloatField>,
}

/// Every scheduler setting, concrete, as one class sees it after `from_config`.
///
/// Keys the class does not take hold that class's nominal default and mean nothing.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct ResolvedConfig {
    /// The class this was resolved for.
    pub class: SchedulerClass,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub set_alpha_to_one: bool,
    pub skip_prk_steps: bool,
    pub rescale_betas_zero_snr: bool,
    /// DDPM default `fixed_small`; DPM-Solver default `None`.
    pub variance_type: Option<VarianceType>,
    pub interpolation_type: InterpolationType,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    /// From the file even when the class does not take it (diffusers' hidden config).
    pub sigma_min: Option<f64>,
    /// From the file even when the class does not take it (diffusers' hidden config).
    pub sigma_max: Option<f64>,
    pub timestep_type: TimestepType,
    pub final_sigmas_type: FinalSigmasType,
    pub solver_order: usize,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: TimeShiftType,
    pub predict_x0: bool,
    pub disable_corrector: Vec<usize>,
    pub shift_terminal: Option<f64>,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
}

impl ResolvedConfig {
    /// The class's own `__init__` defaults.
    pub fn defaults(class: SchedulerClass) -> Self {
        use SchedulerClass as C;
        let (beta_start, beta_end, beta_schedule) = match class {
            C::HeunDiscrete => (0.00085, 0.012, BetaSchedule::Linear),
            C::Lcm => (0.00085, 0.012, BetaSchedule::ScaledLinear),
            _ => (0.0001, 0.02, BetaSchedule::Linear),
        };
        let timestep_spacing = match class {
            C::Pndm | C::Ddim | C::Ddpm | C::Lcm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        };
        Self {
            class,
            num_train_timesteps: 1000,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing,
            steps_offset: 0,
            clip_sample: matches!(class, C::Ddim | C::Ddpm),
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            set_alpha_to_one: matches!(class, C::Ddim | C::Lcm),
            skip_prk_steps: false,
            rescale_betas_zero_snr: false,
            variance_type: (class == C::Ddpm).then_some(VarianceType::FixedSmall),
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            sigma_min: None,
            sigma_max: None,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: match class {
                C::UniPcMultistep => SolverType::Bh2,
                _ => SolverType::Midpoint,
            },
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
            predict_x0: true,
            disable_corrector: Vec::new(),
            shift_terminal: None,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
        }
    }

    /// Builds the error for an unsupported `key = value` in this class.
    pub fn unsupported(&self, key: &'static str, value: impl std::fmt::Display) -> ConfigError {
        ConfigError::Unsupported {
            class: self.class.class_name(),
            key,
            value: value.to_string(),
        }
    }
}
