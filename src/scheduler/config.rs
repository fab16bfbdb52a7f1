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

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

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

/// The diffusers scheduler classes diffusiond implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerClass {
    /// `PNDMScheduler`.
    Pndm,
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler`.
    Ddpm,
    /// `EulerDiscreteScheduler`.
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestralDiscrete,
    /// `HeunDiscreteScheduler`.
    HeunDiscrete,
    /// `LMSDiscreteScheduler`.
    LmsDiscrete,
    /// `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
    /// `UniPCMultistepScheduler`.
    UniPcMultistep,
    /// `LCMScheduler`.
    Lcm,
}

/// Keys every class takes.
const COMMON_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
];

const PNDM_KEYS: &[&str] = &["skip_prk_steps", "set_alpha_to_one"];
const DDIM_KEYS: &[&str] = &[
    "clip_sample",
    "set_alpha_to_one",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "rescale_betas_zero_snr",
];
const DDPM_KEYS: &[&str] = &[
    "variance_type",
    "clip_sample",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "rescale_betas_zero_snr",
];
const EULER_KEYS: &[&str] = &[
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "rescale_betas_zero_snr",
    "final_sigmas_type",
];
const EULER_A_KEYS: &[&str] = &["rescale_betas_zero_snr"];
const HEUN_KEYS: &[&str] = &[
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "clip_sample",
    "clip_sample_range",
];
const LMS_KEYS: &[&str] = &[
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
];
const DPM_KEYS: &[&str] = &[
    "solver_order",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "lambda_min_clipped",
    "variance_type",
    "rescale_betas_zero_snr",
    "use_dynamic_shifting",
    "time_shift_type",
];
const UNIPC_KEYS: &[&str] = &[
    "solver_order",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "predict_x0",
    "solver_type",
    "lower_order_final",
    "disable_corrector",
    "solver_p",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "rescale_betas_zero_snr",
    "use_dynamic_shifting",
    "time_shift_type",
    "sigma_min",
    "sigma_max",
    "shift_terminal",
];
const LCM_KEYS: &[&str] = &[
    "original_inference_steps",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_scaling",
    "rescale_betas_zero_snr",
];

impl SchedulerClass {
    /// Every class, in diffusiond's order.
    pub const ALL: [SchedulerClass; 10] = [
        Self::Pndm,
        Self::Ddim,
        Self::Ddpm,
        Self::EulerDiscrete,
        Self::EulerAncestralDiscrete,
        Self::HeunDiscrete,
        Self::LmsDiscrete,
        Self::DpmSolverMultistep,
        Self::UniPcMultistep,
        Self::Lcm,
    ];

    /// The diffusers class name (as in `model_index.json` / `_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Pndm => "PNDMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::EulerDiscrete => "EulerDiscreteScheduler",
            Self::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            Self::HeunDiscrete => "HeunDiscreteScheduler",
            Self::LmsDiscrete => "LMSDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            Self::UniPcMultistep => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// The class with diffusers class name `name`, if diffusiond implements it.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.class_name() == name)
    }

    /// Whether this class's `__init__` takes config key `key`.
    pub fn takes(self, key: &str) -> bool {
        let own: &[&str] = match self {
            Self::Pndm => PNDM_KEYS,
            Self::Ddim => DDIM_KEYS,
            Self::Ddpm => DDPM_KEYS,
            Self::EulerDiscrete => EULER_KEYS,
            Self::EulerAncestralDiscrete => EULER_A_KEYS,
            Self::HeunDiscrete => HEUN_KEYS,
            Self::LmsDiscrete => LMS_KEYS,
            Self::DpmSolverMultistep => DPM_KEYS,
            Self::UniPcMultistep => UNIPC_KEYS,
            Self::Lcm => LCM_KEYS,
        };
        COMMON_KEYS.contains(&key) || own.contains(&key)
    }
}

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `"linear"`: `torch.linspace(beta_start, beta_end, n, float32)`.
    Linear,
    /// `"scaled_linear"`: `torch.linspace(sqrt(beta_start), sqrt(beta_end), n, float32) ** 2`.
    ScaledLinear,
    /// `"squaredcos_cap_v2"`: the Glide cosine schedule (`betas_for_alpha_bar`).
    SquaredcosCapV2,
}

/// `prediction_type`: what the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// `"epsilon"`: the noise.
    Epsilon,
    /// `"v_prediction"`: the velocity.
    VPrediction,
    /// `"sample"`: the denoised sample.
    Sample,
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `"linspace"`.
    Linspace,
    /// `"leading"`.
    Leading,
    /// `"trailing"`.
    Trailing,
}

/// `timestep_type` (Euler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    /// `"discrete"`: the UNet gets (interpolated) training timesteps.
    Discrete,
    /// `"continuous"`: the UNet gets `0.25 * ln(sigma)` (v-prediction only in diffusers).
    Continuous,
}

/// `interpolation_type` (Euler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// `"linear"`.
    Linear,
    /// `"log_linear"`.
    LogLinear,
}

/// `final_sigmas_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// `"zero"`: the last sigma is 0.
    Zero,
    /// `"sigma_min"`: the last sigma is the smallest training sigma.
    SigmaMin,
}

/// `variance_type` (DDPM, DPM-Solver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// `"fixed_small"`.
    FixedSmall,
    /// `"fixed_small_log"`.
    FixedSmallLog,
    /// `"fixed_large"`.
    FixedLarge,
    /// `"fixed_large_log"`.
    FixedLargeLog,
    /// `"learned"`.
    Learned,
    /// `"learned_range"`.
    LearnedRange,
}

/// `algorithm_type` (DPM-Solver), exactly as written; the class maps `deis` itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmType {
    /// `"dpmsolver"`.
    DpmSolver,
    /// `"dpmsolver++"`.
    DpmSolverPlusPlus,
    /// `"sde-dpmsolver"`.
    SdeDpmSolver,
    /// `"sde-dpmsolver++"`.
    SdeDpmSolverPlusPlus,
    /// `"deis"` (diffusers' DPM-Solver replaces it with `dpmsolver++`).
    Deis,
}

/// `solver_type` (DPM-Solver, UniPC), exactly as written; each class maps the
/// other class's values itself (DPM: logrho/bh1/bh2 -> midpoint; UniPC:
/// midpoint/heun/logrho -> bh2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// `"midpoint"`.
    Midpoint,
    /// `"heun"`.
    Heun,
    /// `"logrho"`.
    Logrho,
    /// `"bh1"`.
    Bh1,
    /// `"bh2"`.
    Bh2,
}

/// `time_shift_type` (dynamic shifting; flow models only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeShiftType {
    /// `"exponential"`.
    Exponential,
    /// `"linear"`.
    Linear,
}

/// A float that may be written as a number or (Python's json) `Infinity`/`-Infinity`/`NaN`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum JsonFloat {
    Num(f64),
    Special(SpecialFloat),
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum SpecialFloat {
    #[serde(rename = "Infinity")]
    Inf,
    #[serde(rename = "-Infinity")]
    NegInf,
    #[serde(rename = "NaN")]
    NaN,
}

impl JsonFloat {
    fn get(self) -> f64 {
        match self {
            Self::Num(v) => v,
            Self::Special(SpecialFloat::Inf) => f64::INFINITY,
            Self::Special(SpecialFloat::NegInf) => f64::NEG_INFINITY,
            Self::Special(SpecialFloat::NaN) => f64::NAN,
        }
    }
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

/// A float config value (a JSON number, or Python's `Infinity`/`-Infinity`/`NaN`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub struct JsonFloatField(JsonFloat);

impl JsonFloatField {
    /// The value.
    pub fn get(self) -> f64 {
        self.0.get()
    }
}

impl From<f64> for JsonFloatField {
    fn from(v: f64) -> Self {
        Self(JsonFloat::Num(v))
    }
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

/// Replaces Python's bare `NaN`, `Infinity` and `-Infinity` JSON tokens (outside
/// strings) with the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, which the float
/// fields accept. diffusers writes `lambda_min_clipped: -Infinity` this way.
fn quote_python_specials(text: &str) -> String {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
        } else if let Some(tok) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

/// Parses an enum-valued key from its diffusers spelling.
fn parse_choice<T: Copy>(
    class: SchedulerClass,
    key: &'static str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| ConfigError::Unsupported {
            class: class.class_name(),
            key,
            value: format!("{value:?}"),
        })
}

impl SchedulerConfig {
    /// Parses the text of a `scheduler_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(&quote_python_specials(text))?;
        let Value::Object(mut map) = value else {
            return Err(ConfigError::NotAnObject);
        };
        drop_used_defaults(&mut map);
        Ok(serde_json::from_value(Value::Object(map))?)
    }

    /// Reads and parses a `scheduler_config.json`: a regular file of at most
    /// [`MAX_CONFIG_BYTES`](crate::model::small_file::MAX_CONFIG_BYTES)
    /// ([`read_text_capped`](crate::model::small_file::read_text_capped)).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use crate::model::small_file::{MAX_CONFIG_BYTES, read_text_capped};
        let text = read_text_capped(path, MAX_CONFIG_BYTES).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Self::from_json_str(&text)
    }

    /// The settings `class` gets from `Class.from_config(self)`.
    pub fn resolve(&self, class: SchedulerClass) -> Result<ResolvedConfig, ConfigError> {
        let d = ResolvedConfig::defaults(class);
        let r = Resolver { class };
        Ok(ResolvedConfig {
            class,
            num_train_timesteps: r.pick(
                "num_train_timesteps",
                self.num_train_timesteps,
                d.num_train_timesteps,
            ),
            beta_start: r.float("beta_start", self.beta_start, d.beta_start),
            beta_end: r.float("beta_end", self.beta_end, d.beta_end),
            beta_schedule: r.choice(
                "beta_schedule",
                &self.beta_schedule,
                d.beta_schedule,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                ],
            )?,
            trained_betas: r.pick("trained_betas", self.trained_betas.clone().map(Some), None),
            prediction_type: r.choice(
                "prediction_type",
                &self.prediction_type,
                d.prediction_type,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                ],
            )?,
            timestep_spacing: r.choice(
                "timestep_spacing",
                &self.timestep_spacing,
                d.timestep_spacing,
                &[
                    ("linspace", TimestepSpacing::Linspace),
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                ],
            )?,
            steps_offset: r.pick("steps_offset", self.steps_offset, d.steps_offset),
            clip_sample: r.pick("clip_sample", self.clip_sample, d.clip_sample),
            clip_sample_range: r.float(
                "clip_sample_range",
                self.clip_sample_range,
                d.clip_sample_range,
            ),
            thresholding: r.pick("thresholding", self.thresholding, d.thresholding),
            dynamic_thresholding_ratio: r.float(
                "dynamic_thresholding_ratio",
                self.dynamic_thresholding_ratio,
                d.dynamic_thresholding_ratio,
            ),
            sample_max_value: r.float(
                "sample_max_value",
                self.sample_max_value,
                d.sample_max_value,
            ),
            set_alpha_to_one: r.pick(
                "set_alpha_to_one",
                self.set_alpha_to_one,
                d.set_alpha_to_one,
            ),
            skip_prk_steps: r.pick("skip_prk_steps", self.skip_prk_steps, d.skip_prk_steps),
            rescale_betas_zero_snr: r.pick(
                "rescale_betas_zero_snr",
                self.rescale_betas_zero_snr,
                d.rescale_betas_zero_snr,
            ),
            variance_type: r.optional_choice(
                "variance_type",
                &self.variance_type,
                d.variance_type,
                &[
                    ("fixed_small", VarianceType::FixedSmall),
                    ("fixed_small_log", VarianceType::FixedSmallLog),
                    ("fixed_large", VarianceType::FixedLarge),
                    ("fixed_large_log", VarianceType::FixedLargeLog),
                    ("learned", VarianceType::Learned),
                    ("learned_range", VarianceType::LearnedRange),
                ],
            )?,
            interpolation_type: r.choice(
                "interpolation_type",
                &self.interpolation_type,
                d.interpolation_type,
                &[
                    ("linear", InterpolationType::Linear),
                    ("log_linear", InterpolationType::LogLinear),
                ],
            )?,
            use_karras_sigmas: r.pick(
                "use_karras_sigmas",
                self.use_karras_sigmas,
                d.use_karras_sigmas,
            ),
            use_exponential_sigmas: r.pick(
                "use_exponential_sigmas",
                self.use_exponential_sigmas,
                d.use_exponential_sigmas,
            ),
            use_beta_sigmas: r.pick("use_beta_sigmas", self.use_beta_sigmas, d.use_beta_sigmas),
            use_lu_lambdas: r.pick("use_lu_lambdas", self.use_lu_lambdas, d.use_lu_lambdas),
            use_flow_sigmas: r.pick("use_flow_sigmas", self.use_flow_sigmas, d.use_flow_sigmas),
            flow_shift: r.float("flow_shift", self.flow_shift, d.flow_shift),
            // diffusers registers keys a class does not take as hidden config entries,
            // and the Karras/exponential conversions read `self.config.sigma_min` via
            // `hasattr`, so these come from the file whatever the class.
            sigma_min: self.sigma_min.map(JsonFloatField::get),
            sigma_max: self.sigma_max.map(JsonFloatField::get),
            timestep_type: r.choice(
                "timestep_type",
                &self.timestep_type,
                d.timestep_type,
                &[
                    ("discrete", TimestepType::Discrete),
                    ("continuous", TimestepType::Continuous),
                ],
            )?,
            final_sigmas_type: r.choice(
                "final_sigmas_type",
                &self.final_sigmas_type,
                d.final_sigmas_type,
                &[
                    ("zero", FinalSigmasType::Zero),
                    ("sigma_min", FinalSigmasType::SigmaMin),
                ],
            )?,
            solver_order: r.pick("solver_order", self.solver_order, d.solver_order),
            algorithm_type: r.choice(
                "algorithm_type",
                &self.algorithm_type,
                d.algorithm_type,
                &[
                    ("dpmsolver", AlgorithmType::DpmSolver),
                    ("dpmsolver++", AlgorithmType::DpmSolverPlusPlus),
                    ("sde-dpmsolver", AlgorithmType::SdeDpmSolver),
                    ("sde-dpmsolver++", AlgorithmType::SdeDpmSolverPlusPlus),
                    ("deis", AlgorithmType::Deis),
                ],
            )?,
            solver_type: r.choice(
                "solver_type",
                &self.solver_type,
                d.solver_type,
                &[
                    ("midpoint", SolverType::Midpoint),
                    ("heun", SolverType::Heun),
                    ("logrho", SolverType::Logrho),
                    ("bh1", SolverType::Bh1),
                    ("bh2", SolverType::Bh2),
                ],
            )?,
            lower_order_final: r.pick(
                "lower_order_final",
                self.lower_order_final,
                d.lower_order_final,
            ),
            euler_at_final: r.pick("euler_at_final", self.euler_at_final, d.euler_at_final),
            lambda_min_clipped: r.float(
                "lambda_min_clipped",
                self.lambda_min_clipped,
                d.lambda_min_clipped,
            ),
            use_dynamic_shifting: r.pick(
                "use_dynamic_shifting",
                self.use_dynamic_shifting,
                d.use_dynamic_shifting,
            ),
            time_shift_type: r.choice(
                "time_shift_type",
                &self.time_shift_type,
                d.time_shift_type,
                &[
                    ("exponential", TimeShiftType::Exponential),
                    ("linear", TimeShiftType::Linear),
                ],
            )?,
            predict_x0: r.pick("predict_x0", self.predict_x0, d.predict_x0),
            disable_corrector: r.pick(
                "disable_corrector",
                self.disable_corrector.clone(),
                d.disable_corrector,
            ),
            shift_terminal: r.optional_float("shift_terminal", self.shift_terminal),
            original_inference_steps: r.pick(
                "original_inference_steps",
                self.original_inference_steps,
                d.original_inference_steps,
            ),
            timestep_scaling: r.float(
                "timestep_scaling",
                self.timestep_scaling,
                d.timestep_scaling,
            ),
        })
        .and_then(|resolved| r.check_solver_p(&self.solver_p).map(|()| resolved))
    }
}

/// Removes the keys listed in `_use_default_values` (and that list itself), as
/// diffusers' `extract_init_dict` does.
fn drop_used_defaults(map: &mut Map<String, Value>) {
    let Some(Value::Array(names)) = map.remove("_use_default_values") else {
        return;
    };
    for name in names.iter().filter_map(Value::as_str) {
        map.remove(name);
    }
}

/// Applies "file value if the class takes the key, else the class default".
struct Resolver {
    class: SchedulerClass,
}

impl Resolver {
    fn pick<T>(&self, key: &str, value: Option<T>, default: T) -> T {
        match value {
            Some(v) if self.class.takes(key) => v,
            _ => default,
        }
    }

    fn float(&self, key: &str, value: Option<JsonFloatField>, default: f64) -> f64 {
        self.pick(key, value.map(JsonFloatField::get), default)
    }

    fn optional_float(&self, key: &str, value: Option<JsonFloatField>) -> Option<f64> {
        self.pick(key, value.map(|v| Some(v.get())), None)
    }

    fn choice<T: Copy>(
        &self,
        key: &'static str,
        value: &Option<String>,
        default: T,
        choices: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        match value {
            Some(v) if self.class.takes(key) => parse_choice(self.class, key, v, choices),
            _ => Ok(default),
        }
    }

    fn optional_choice<T: Copy>(
        &self,
        key: &'static str,
        value: &Option<String>,
        default: Option<T>,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, ConfigError> {
        match value {
            Some(v) if self.class.takes(key) => parse_choice(self.class, key, v, choices).map(Some),
            _ => Ok(default),
        }
    }

    fn check_solver_p(&self, value: &Option<Value>) -> Result<(), ConfigError> {
        match value {
            Some(v) if self.class.takes("solver_p") && !v.is_null() => {
                Err(ConfigError::Unsupported {
                    class: self.class.class_name(),
                    key: "solver_p",
                    value: v.to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_config(name: &str) -> SchedulerConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/schedulers")
            .join(name)
            .join("scheduler_config.json");
        SchedulerConfig::from_file(&path).expect("golden config parses")
    }

    #[test]
    fn base_config_resolves_per_class() {
        let cfg = golden_config("base");
        assert_eq!(cfg.class_name.as_deref(), Some("PNDMScheduler"));
        let pndm = cfg.resolve(SchedulerClass::Pndm).unwrap();
        assert!(pndm.skip_prk_steps);
        assert_eq!(pndm.steps_offset, 1);
        assert_eq!(pndm.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(pndm.timestep_spacing, TimestepSpacing::Leading);
        // The saved config carries timestep_spacing "leading"; Euler takes it.
        let euler = cfg.resolve(SchedulerClass::EulerDiscrete).unwrap();
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Leading);
        let ddim = cfg.resolve(SchedulerClass::Ddim).unwrap();
        assert!(!ddim.clip_sample);
        assert!(!ddim.set_alpha_to_one);
    }

    #[test]
    fn missing_keys_take_class_defaults() {
        let cfg = golden_config("minimal");
        let ddim = cfg.resolve(SchedulerClass::Ddim).unwrap();
        assert!(ddim.clip_sample);
        assert!(ddim.set_alpha_to_one);
        assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
        let euler = cfg.resolve(SchedulerClass::EulerDiscrete).unwrap();
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(euler.beta_start, 0.00085);
        let lcm = cfg.resolve(SchedulerClass::Lcm).unwrap();
        assert!(lcm.set_alpha_to_one);
        assert!(!lcm.clip_sample);
        let ddpm = cfg.resolve(SchedulerClass::Ddpm).unwrap();
        assert_eq!(ddpm.variance_type, Some(VarianceType::FixedSmall));
        assert!(ddpm.clip_sample);
    }

    #[test]
    fn keys_a_class_does_not_take_are_ignored() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"set_alpha_to_one": false, "clip_sample": false, "algorithm_type": "bogus"}"#,
        )
        .unwrap();
        // LCM takes set_alpha_to_one, Heun does not take algorithm_type.
        assert!(!cfg.resolve(SchedulerClass::Lcm).unwrap().set_alpha_to_one);
        assert!(cfg.resolve(SchedulerClass::HeunDiscrete).is_ok());
        assert!(matches!(
            cfg.resolve(SchedulerClass::DpmSolverMultistep),
            Err(ConfigError::Unsupported {
                key: "algorithm_type",
                ..
            })
        ));
    }

    #[test]
    fn python_infinity_and_use_default_values() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "note": "Infinity \" NaN",
                "solver_order": 3, "_use_default_values": ["solver_order"]}"#,
        )
        .unwrap();
        let r = cfg.resolve(SchedulerClass::DpmSolverMultistep).unwrap();
        assert_eq!(r.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(r.solver_order, 2);
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(matches!(
            SchedulerConfig::from_json_str("[1]"),
            Err(ConfigError::NotAnObject)
        ));
        assert!(matches!(
            SchedulerConfig::from_json_str("{"),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            SchedulerConfig::from_json_str(r#"{"num_train_timesteps": "many"}"#),
            Err(ConfigError::Json(_))
        ));
        let cfg = SchedulerConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#).unwrap();
        assert!(matches!(
            cfg.resolve(SchedulerClass::Pndm),
            Err(ConfigError::Unsupported {
                key: "beta_schedule",
                ..
            })
        ));
        let cfg = SchedulerConfig::from_json_str(r#"{"solver_p": {"x": 1}}"#).unwrap();
        assert!(cfg.resolve(SchedulerClass::UniPcMultistep).is_err());
        assert!(cfg.resolve(SchedulerClass::DpmSolverMultistep).is_ok());
        assert!(matches!(
            SchedulerConfig::from_file(Path::new("/nonexistent/scheduler_config.json")),
            Err(ConfigError::Io { .. })
        ));
    }
}
