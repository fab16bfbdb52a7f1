//! [`FlowMatchConfig`]: `FlowMatchEulerDiscreteScheduler`'s config as `from_config`
//! resolves it, and the key reader both flow schedulers use.

use serde_json::{Map, Value};

use super::EULER_CLASS;
use super::pipeline::{FlowPipeline, calculate_shift, image_seq_len};
use crate::scheduler::config::{ConfigError, TimeShiftType};

/// How the shifted sigmas are respaced (`use_karras_sigmas`, `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSigmaSpacing {
    /// The shifted sigmas as they are.
    Shifted,
    /// Karras et al. (ρ = 7) between the first and last shifted sigma.
    Karras,
    /// Log-linear between the first and last shifted sigma.
    Exponential,
}

/// `FlowMatchEulerDiscreteScheduler`'s config, as `from_config` resolves it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchConfig {
    /// `num_train_timesteps` (1000).
    pub num_train_timesteps: usize,
    /// `shift` (1.0): the static shift, unused with dynamic shifting.
    pub shift: f64,
    /// `use_dynamic_shifting` (false): shift by `mu` at `set_timesteps`.
    pub use_dynamic_shifting: bool,
    /// `base_shift` (0.5): `mu` at `base_image_seq_len`.
    pub base_shift: f64,
    /// `max_shift` (1.15): `mu` at `max_image_seq_len`.
    pub max_shift: f64,
    /// `base_image_seq_len` (256).
    pub base_image_seq_len: usize,
    /// `max_image_seq_len` (4096).
    pub max_image_seq_len: usize,
    /// `invert_sigmas` (false).
    pub invert_sigmas: bool,
    /// `shift_terminal` (none; 0 counts as none, as in diffusers).
    pub shift_terminal: Option<f64>,
    /// `use_karras_sigmas` / `use_exponential_sigmas`.
    pub spacing: FlowSigmaSpacing,
    /// `time_shift_type` ("exponential").
    pub time_shift_type: TimeShiftType,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            spacing: FlowSigmaSpacing::Shifted,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

/// Reads the keys of a `scheduler_config.json` object for one class: JSON `null` and
/// keys named in `_use_default_values` count as absent; a wrong type is an error.
pub(super) struct Keys<'a> {
    obj: &'a Map<String, Value>,
    defaults: Vec<&'a str>,
    class: &'static str,
}

impl<'a> Keys<'a> {
    pub(super) fn new(json: &'a Value, class: &'static str) -> Result<Self, ConfigError> {
        let obj = json.as_object().ok_or(ConfigError::NotAnObject)?;
        let defaults = obj
            .get("_use_default_values")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        Ok(Self {
            obj,
            defaults,
            class,
        })
    }

    fn raw(&self, key: &'static str) -> Option<&'a Value> {
        self.obj
            .get(key)
            .filter(|v| !v.is_null() && !self.defaults.contains(&key))
    }

    fn bad(&self, key: &'static str, v: &Value) -> ConfigError {
        ConfigError::Unsupported {
            class: self.class,
            key,
            value: v.to_string(),
        }
    }

    pub(super) fn f64(&self, key: &'static str, default: f64) -> Result<f64, ConfigError> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, v)),
        }
    }

    pub(super) fn usize(&self, key: &'static str, default: usize) -> Result<usize, ConfigError> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => (v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as u64)))
            .and_then(|u| usize::try_from(u).ok())
            .filter(|&u| u > 0)
            .ok_or_else(|| self.bad(key, v)),
        }
    }

    fn bool(&self, key: &'static str) -> Result<bool, ConfigError> {
        match self.raw(key) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, v)),
        }
    }
}

impl FlowMatchConfig {
    /// `FlowMatchEulerDiscreteScheduler.from_config(json)`. Refuses (naming the key)
    /// `use_beta_sigmas` (needs scipy's beta quantile), `stochastic_sampling`, more than
    /// one sigma respacing, and an unknown `time_shift_type`. Keys the class does not
    /// take are ignored.
    pub fn from_json(json: &Value) -> Result<Self, ConfigError> {
        let k = Keys::new(json, EULER_CLASS)?;
        let d = Self::default();
        let karras = k.bool("use_karras_sigmas")?;
        let exponential = k.bool("use_exponential_sigmas")?;
        let beta = k.bool("use_beta_sigmas")?;
        let unsupported = |key, value: &str| ConfigError::Unsupported {
            class: EULER_CLASS,
            key,
            value: value.to_owned(),
        };
        if usize::from(karras) + usize::from(exponential) + usize::from(beta) > 1 {
            return Err(unsupported(
                "use_karras_sigmas",
                "true together with another sigma respacing (only one may be set)",
            ));
        }
        if beta {
            return Err(unsupported("use_beta_sigmas", "true"));
        }
        if k.bool("stochastic_sampling")? {
            return Err(unsupported("stochastic_sampling", "true"));
        }
        let time_shift_type = match k.raw("time_shift_type") {
            None => TimeShiftType::Exponential,
            Some(Value::String(s)) if s == "exponential" => TimeShiftType::Exponential,
            Some(Value::String(s)) if s == "linear" => TimeShiftType::Linear,
            Some(v) => return Err(k.bad("time_shift_type", v)),
        };
        let shift_terminal = Some(k.f64("shift_terminal", 0.0)?).filter(|&t| t != 0.0);
        Ok(Self {
            num_train_timesteps: k.usize("num_train_timesteps", d.num_train_timesteps)?,
            shift: k.f64("shift", d.shift)?,
            use_dynamic_shifting: k.bool("use_dynamic_shifting")?,
            base_shift: k.f64("base_shift", d.base_shift)?,
            max_shift: k.f64("max_shift", d.max_shift)?,
            base_image_seq_len: k.usize("base_image_seq_len", d.base_image_seq_len)?,
            max_image_seq_len: k.usize("max_image_seq_len", d.max_image_seq_len)?,
            invert_sigmas: k.bool("invert_sigmas")?,
            shift_terminal,
            spacing: if karras {
                FlowSigmaSpacing::Karras
            } else if exponential {
                FlowSigmaSpacing::Exponential
            } else {
                FlowSigmaSpacing::Shifted
            },
            time_shift_type,
        })
    }

    /// `mu` for an image of `image_seq_len` latent tokens, from this config's
    /// `base_*`/`max_*` keys ([`calculate_shift`]).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift,
            self.max_shift,
        )
    }

    /// The `mu` `pipeline` passes to `set_timesteps` for a `height` x `width` image:
    /// FLUX always computes one, SD3 only with `use_dynamic_shifting`.
    pub fn pipeline_mu(&self, pipeline: FlowPipeline, height: usize, width: usize) -> Option<f64> {
        match pipeline {
            FlowPipeline::Sd3 if !self.use_dynamic_shifting => None,
            _ => Some(self.mu(image_seq_len(height, width))),
        }
    }
}
