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
//! Both types also implement [`Scheduler`]: the timesteps it hands out are the
//! transformer's timesteps on the 0..`num_train_timesteps` scale (SD3 passes them as is;
//! FLUX divides them by 1000), `noise_level` is `Vp { alpha: 1 - σ, sigma: σ }` (so
//! `NoiseLevel::add_noise` is `scale_noise` bit for bit) and `pred_original_sample` is
//! `x - σ·v`.

use ndarray::{ArrayD, ArrayViewD};
use serde_json::{Map, Value};

use super::common::{check_shapes, exponential_sigmas, karras_sigmas, np_linspace};
use super::config::{ConfigError, TimeShiftType};
use super::{NoiseLevel, Scheduler, SchedulerError};
use crate::rng::NoiseSource;

/// diffusiond's name for [`FlowMatchEuler`].
pub const FLOW_EULER: &str = "flow-euler";
/// diffusiond's name for [`FlowMatchHeun`].
pub const FLOW_HEUN: &str = "flow-heun";
/// The diffusers class behind [`FLOW_EULER`].
pub const EULER_CLASS: &str = "FlowMatchEulerDiscreteScheduler";
/// The diffusers class behind [`FLOW_HEUN`].
pub const HEUN_CLASS: &str = "FlowMatchHeunDiscreteScheduler";

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

/// Which diffusers pipeline drives the scheduler: decides the explicit sigmas and `mu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowPipeline {
    /// `StableDiffusion3Pipeline` (and img2img): no explicit sigmas; `mu` only with
    /// `use_dynamic_shifting`.
    Sd3,
    /// `FluxPipeline` (and img2img): sigmas `linspace(1, 1/n, n)` and `mu` always.
    Flux,
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
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    defaults: Vec<&'a str>,
    class: &'static str,
}

impl<'a> Keys<'a> {
    fn new(json: &'a Value, class: &'static str) -> Result<Self, ConfigError> {
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

    fn f64(&self, key: &'static str, default: f64) -> Result<f64, ConfigError> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, v)),
        }
    }

    fn usize(&self, key: &'static str, default: usize) -> Result<usize, ConfigError> {
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

/// diffusers' `calculate_shift` (FLUX and SD3 pipelines): `mu` linear in the image's
/// token count, `base_shift` at `base_seq_len` and `max_shift` at `max_seq_len`, in
/// float64 in Python's operation order.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as i64 - base_seq_len as i64) as f64;
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// Latent tokens of a `height` x `width` image for FLUX and SD3 (VAE factor 8, 2x2
/// patches): `(height / 16) * (width / 16)`.
pub fn image_seq_len(height: usize, width: usize) -> usize {
    (height / 16) * (width / 16)
}

/// The sigmas `FluxPipeline` passes: `np.linspace(1.0, 1 / n, n)`, rounded to float32
/// as the scheduler does.
pub fn flux_sigmas(n: usize) -> Vec<f32> {
    np_linspace(1.0, 1.0 / n as f64, n)
        .into_iter()
        .map(|s| s as f32)
        .collect()
}

/// Where an image-to-image run starts (the SD3 and FLUX img2img pipelines' `get_timesteps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Img2ImgStart {
    /// Inference steps skipped: `int(max(n - min(n * strength, n), 0))`.
    pub t_start: usize,
    /// The first timestep index run: `t_start * order` (for `set_begin_index`).
    pub begin_index: usize,
    /// Inference steps left: `n - t_start`.
    pub steps: usize,
}

/// `get_timesteps(n, strength)` of the SD3/FLUX img2img pipelines for a scheduler of
/// `order` (1 for Euler, 2 for Heun). Refuses a strength outside `[0, 1]` and one that
/// leaves no step.
pub fn img2img_start(
    scheduler: &'static str,
    n: usize,
    strength: f64,
    order: usize,
) -> Result<Img2ImgStart, SchedulerError> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(SchedulerError::InvalidConfig {
            scheduler,
            message: format!("strength {strength} is outside [0, 1]"),
        });
    }
    let init_timestep = (n as f64 * strength).min(n as f64);
    let t_start = (n as f64 - init_timestep).max(0.0) as usize;
    let steps = n - t_start.min(n);
    if steps == 0 {
        let message = format!("strength {strength} leaves no denoising step");
        return Err(bad_steps(scheduler, n, message));
    }
    Ok(Img2ImgStart {
        t_start,
        begin_index: t_start * order,
        steps,
    })
}

/// A float type numpy computes the schedule in (float64 arrays, or float32 arrays
/// combined with Python scalars rounded to float32).
trait Real:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
        }
    };
}
real!(f32);
real!(f64);

/// `shift * s / (1 + (shift - 1) * s)`.
fn static_shift<T: Real>(shift: f64, s: &mut [T]) {
    let (a, b, one) = (T::of(shift), T::of(shift - 1.0), T::of(1.0));
    s.iter_mut().for_each(|x| *x = a * *x / (one + b * *x));
}

/// The shift, `shift_terminal` stretch and respacing of `set_timesteps`, steps 2 to 4,
/// in the float type of the input; returns float32 sigmas.
fn shape_sigmas<T: Real>(cfg: &FlowMatchConfig, mut s: Vec<T>, mu: f64) -> Vec<f32> {
    if cfg.use_dynamic_shifting {
        let one = T::of(1.0);
        // `(1 / t - 1) ** 1.0` is `1 / t - 1` exactly.
        let m = T::of(match cfg.time_shift_type {
            TimeShiftType::Exponential => mu.exp(),
            TimeShiftType::Linear => mu,
        });
        s.iter_mut().for_each(|t| *t = m / (m + (one / *t - one)));
    } else {
        static_shift(cfg.shift, &mut s);
    }
    if let (Some(terminal), Some(&last)) = (cfg.shift_terminal, s.last()) {
        let one = T::of(1.0);
        let scale = (one - last) / T::of(1.0 - terminal);
        s.iter_mut().for_each(|t| *t = one - (one - *t) / scale);
    }
    let n = s.len();
    let (first, last) = match (s.first(), s.last()) {
        (Some(f), Some(l)) => (f.f64(), l.f64()),
        _ => return Vec::new(),
    };
    let respaced = match cfg.spacing {
        FlowSigmaSpacing::Shifted => s.into_iter().map(T::f64).collect(),
        FlowSigmaSpacing::Karras => karras_sigmas(last, first, n),
        FlowSigmaSpacing::Exponential => exponential_sigmas(last, first, n),
    };
    respaced.into_iter().map(|x| x as f32).collect()
}

/// The `__init__` training schedule's first and last sigma (float32, shifted unless
/// dynamic shifting is on): the ends of the default `set_timesteps` linspace.
fn train_sigma_range(num_train: usize, shift: Option<f64>) -> (f32, f32) {
    let n = num_train as f32;
    // `linspace(1, N, N)[::-1] / N`: N / N is exactly 1.
    let mut ends = [1.0, 1.0 / n];
    if let Some(shift) = shift {
        static_shift(shift, &mut ends);
    }
    (ends[0], ends[1])
}

/// Runs `f` on contiguous slices of `model_output` and `sample` (copying only when one
/// is not in standard layout).
fn on_slices<R>(
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

fn bad_step(scheduler: &'static str, step_index: usize, message: String) -> SchedulerError {
    SchedulerError::BadStep {
        scheduler,
        step_index,
        message,
    }
}

fn bad_steps(scheduler: &'static str, steps: usize, message: String) -> SchedulerError {
    SchedulerError::InvalidSteps {
        scheduler,
        steps,
        message,
    }
}

/// The schedule and position shared by both flow schedulers.
#[derive(Debug, Clone, Default)]
struct FlowState {
    sigmas: Vec<f32>,
    /// One per model call.
    timesteps: Vec<f32>,
    timesteps_f64: Vec<f64>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl FlowState {
    /// Installs a new schedule and resets the step and begin index.
    fn install(&mut self, sigmas: Vec<f32>, timesteps: Vec<f32>) {
        self.timesteps_f64 = timesteps.iter().map(|&t| f64::from(t)).collect();
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        self.begin_index = None;
    }

    /// `sigmas[index]`, clamped to the last sigma.
    fn sigma(&self, index: usize) -> f32 {
        self.sigmas[index.min(self.sigmas.len().saturating_sub(1))]
    }

    /// `index_for_timestep(t)`: the second match if `t` occurs more than once.
    fn index_for_timestep(&self, t: f32) -> Option<usize> {
        let mut hits = self.timesteps.iter().enumerate().filter(|&(_, &x)| x == t);
        let first = hits.next()?.0;
        Some(hits.next().map_or(first, |h| h.0))
    }

    /// A `BadStep` error unless `index` is scheduled and the sizes agree.
    fn check(
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

/// The inherent accessors and the [`Scheduler`] view both flow schedulers share.
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

#[cfg(test)]
#[path = "flow_match_tests.rs"]
mod tests;
