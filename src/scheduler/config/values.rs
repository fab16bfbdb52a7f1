//! The typed values of a scheduler config's enum-valued keys (`beta_schedule`,
//! `prediction_type`, ...) and of its float keys (a number, or Python's `Infinity`,
//! `-Infinity` and `NaN`).

use serde::Deserialize;

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
