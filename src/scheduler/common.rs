//! Building blocks shared by the schedulers, each mirroring the numpy / torch
//! expression diffusers uses, with the same dtypes:
//!
//! * betas and `alphas_cumprod` are torch `float32` tensors (`torch.linspace` in float32,
//!   computed with a fused multiply-add as torch's CPU kernel does; `torch.cumprod`
//!   accumulates in double and stores float32);
//! * timestep schedules are numpy `float64`/`int64` arrays (`np.linspace`, `np.arange`,
//!   `np.round` = round half to even);
//! * training sigmas are float32 (`((1 - ac) / ac) ** 0.5` on the torch tensor), and
//!   interpolated sigmas are float64 (`np.interp`) until diffusers casts them to float32.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis, Zip};

use super::SchedulerError;
use super::config::{BetaSchedule, ResolvedConfig, TimestepSpacing};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
///
/// torch rounds `start`/`end` to float32, computes `step = (end - start) / (steps - 1)`
/// in float32 and fills the first half as `start + step * i` and the second half as
/// `end - step * (steps - 1 - i)`; its vectorised kernel evaluates both with a fused
/// multiply-add, which `mul_add` reproduces bit for bit.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `np.linspace(start, stop, num)` in float64 (endpoint included).
///
/// numpy computes `arange(num) * step + start` and then sets the last element to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (num - 1) as f64;
            let delta = stop - start;
            let step = delta / div;
            let mut out: Vec<f64> = if step == 0.0 {
                (0..num).map(|i| i as f64 / div * delta + start).collect()
            } else {
                (0..num).map(|i| i as f64 * step + start).collect()
            };
            out[num - 1] = stop;
            out
        }
    }
}

/// `np.linspace(start, stop, num, endpoint=False)` in float64.
pub fn np_linspace_no_endpoint(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num as f64;
    let delta = stop - start;
    let step = delta / div;
    if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    }
}

/// `np.arange(start, stop, step)` for float64 arguments.
///
/// numpy sizes the result as `ceil((stop - start) / step)` and fills it as
/// `start + i * ((start + step) - start)`.
pub fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one float64 `x` and float32 `fp`.
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last {
        return f64::from(fp[n - 1]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = (y1 - y0) / 1.0;
    let res = slope * (x - j as f64) + y0;
    if res.is_nan() {
        slope * (x - (j + 1) as f64) + y1
    } else {
        res
    }
}

/// numpy's float32 `np.log` (its SIMD kernel, which is not correctly rounded: up to
/// about 4 ulp off). The input is split as `x = m * 2^e` with `m` in `(sqrt(1/2), sqrt(2)]`,
/// `log(m)` comes from a (5,5) rational approximation in `m - 1` evaluated with fused
/// multiply-adds, and `e * ln 2` is added with one more fused multiply-add.
pub fn log_f32(x: f32) -> f32 {
    // numpy's NPY_COEFF_{P,Q}{0..5}_LOGf, rounded to float32.
    const P: [f32; 6] = [
        f32::from_bits(0x00000000), // 0.000000000000000000000e+00
        f32::from_bits(0x3F800000), // 9.999999999999998702752e-01
        f32::from_bits(0x4007361C), // 2.112677543073053063722e+00
        f32::from_bits(0x3FBD70A9), // 1.480000633576506585156e+00
        f32::from_bits(0x3EC30333), // 3.808837741388407920751e-01
        f32::from_bits(0x3CD42BCD), // 2.589979117907922693523e-02
    ];
    const Q: [f32; 6] = [
        f32::from_bits(0x3F800000), // 1.000000000000000000000e+00
        f32::from_bits(0x4027361C), // 2.612677543073109236779e+00
        f32::from_bits(0x401CFE0D), // 2.453006071784736363091e+00
        f32::from_bits(0x3F7C8AE4), // 9.864942958519418960339e-01
        f32::from_bits(0x3E1E5BF3), // 1.546476374983906719538e-01
        f32::from_bits(0x3BC083DF), // 5.875095403124574342950e-03
    ];
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    if !x.is_normal() {
        // Subnormals: numpy's kernel treats them specially; float64 is close enough.
        return f64::from(x).ln() as f32;
    }
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1.0;
    }
    let y = m - 1.0;
    let num = P[..5].iter().rev().fold(P[5], |acc, &p| acc.mul_add(y, p));
    let den = Q[..5].iter().rev().fold(Q[5], |acc, &q| acc.mul_add(y, q));
    e.mul_add(std::f32::consts::LN_2, num / den)
}

/// The Glide cosine schedule (`betas_for_alpha_bar(n)` with `max_beta = 0.999`),
/// computed in float64 and stored as float32.
pub fn betas_for_alpha_bar(num_diffusion_timesteps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    let n = num_diffusion_timesteps as f64;
    (0..num_diffusion_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(x, 0)` for float32 `x`: accumulates in double, stores float32.
pub fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr(betas)` (Algorithm 1 of arXiv:2305.08891), in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    if betas.is_empty() {
        return Vec::new();
    }
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut bar_sqrt: Vec<f32> = torch_cumprod_f32(&alphas)
        .iter()
        .map(|a| a.sqrt())
        .collect();
    let first = bar_sqrt[0];
    let last = bar_sqrt[bar_sqrt.len() - 1];
    let scale = first / (first - last);
    for v in &mut bar_sqrt {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = bar_sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// A scheduler's training noise schedule: float32 `betas` and `alphas_cumprod`.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `self.betas`.
    pub betas: Vec<f32>,
    /// `self.alphas_cumprod`.
    pub alphas_cumprod: Vec<f32>,
}

/// How a class treats the last `alphas_cumprod` entry under `rescale_betas_zero_snr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroSnrTail {
    /// Leave it at 0 (DDIM, DDPM, LCM).
    Keep,
    /// Set it to `2**-24` so the first sigma is finite (Euler, Euler-a, DPM-Solver, UniPC).
    Floor,
}

impl NoiseSchedule {
    /// Builds betas and `alphas_cumprod` as the class's `__init__` does.
    ///
    /// `rescale_betas_zero_snr` is honoured only if the class takes it (the resolved
    /// config holds `false` otherwise).
    pub fn new(cfg: &ResolvedConfig, tail: ZeroSnrTail) -> Result<Self, SchedulerError> {
        let n = cfg.num_train_timesteps;
        let invalid = |message: String| SchedulerError::InvalidConfig {
            scheduler: cfg.class.class_name(),
            message,
        };
        if n < 2 {
            return Err(invalid(format!(
                "num_train_timesteps = {n} (need at least 2)"
            )));
        }
        let mut betas = match &cfg.trained_betas {
            Some(tb) if tb.len() != n => {
                return Err(invalid(format!(
                    "trained_betas has {} entries but num_train_timesteps = {n}",
                    tb.len()
                )));
            }
            Some(tb) => tb.iter().map(|&b| b as f32).collect(),
            None => match cfg.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n),
            },
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = torch_cumprod_f32(&alphas);
        if cfg.rescale_betas_zero_snr && tail == ZeroSnrTail::Floor {
            alphas_cumprod[n - 1] = 2f32.powi(-24);
        }
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// Refuses a schedule with a timestep outside `0..num_train_timesteps` (diffusers
    /// would fail with an index error in `step`).
    pub fn check_timesteps(
        &self,
        timesteps: &[i64],
        scheduler: &'static str,
    ) -> Result<(), SchedulerError> {
        let n = self.alphas_cumprod.len();
        match timesteps.iter().find(|&&t| t < 0 || t >= n as i64) {
            Some(&t) => Err(SchedulerError::InvalidSteps {
                scheduler,
                steps: timesteps.len(),
                message: format!("timestep {t} is outside the {n} training timesteps"),
            }),
            None => Ok(()),
        }
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, ascending in t.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// `alphas_cumprod[t]`, or an error when `t` is outside the training range.
    pub fn alpha_prod(&self, t: i64, scheduler: &'static str) -> Result<f32, SchedulerError> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| SchedulerError::InvalidConfig {
                scheduler,
                message: format!(
                    "timestep {t} is outside the {} training timesteps",
                    self.alphas_cumprod.len()
                ),
            })
    }
}

impl NoiseSchedule {
    /// The `add_noise` level at timestep index `index` of `ts`: from
    /// `alphas_cumprod[ts[index]]` (the timesteps were checked against the schedule when
    /// the scheduler was built; an index past the end takes the last timestep).
    pub fn noise_level(&self, ts: &[i64], index: usize) -> crate::scheduler::NoiseLevel {
        let t = ts.get(index).or(ts.last()).copied().unwrap_or(0);
        let last = self.alphas_cumprod.len().saturating_sub(1);
        let i = usize::try_from(t).unwrap_or(0).min(last);
        crate::scheduler::NoiseLevel::from_alpha_prod(self.alphas_cumprod[i])
    }
}

/// `np.log(train_sigmas)` in float32.
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| log_f32(s)).collect()
}

/// "leading" spacing: `(arange(n) * (n_train // n)).round()[::-1] + steps_offset`.
pub fn leading_timesteps(num_train: usize, n: usize, steps_offset: usize) -> Vec<i64> {
    let ratio = (num_train / n.max(1)) as i64;
    (0..n as i64)
        .rev()
        .map(|i| i * ratio + steps_offset as i64)
        .collect()
}

/// "trailing" spacing: `np.round(np.arange(start, 0, -(n_train / n))) - 1`, descending.
/// `start` is `num_train_timesteps` for most classes (DPM-Solver passes its clipped
/// last timestep).
pub fn trailing_timesteps(start: f64, num_train: usize, n: usize) -> Vec<i64> {
    let ratio = num_train as f64 / n as f64;
    np_arange_f64(start, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect()
}

/// "linspace" spacing, rounded: `np.linspace(0, n_train - 1, n).round()[::-1]`.
pub fn linspace_timesteps_rounded(num_train: usize, n: usize) -> Vec<i64> {
    np_linspace(0.0, (num_train - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t.round_ties_even() as i64)
        .collect()
}

/// "linspace" spacing in float32: `np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1]`.
pub fn linspace_timesteps_f32(num_train: usize, n: usize) -> Vec<f32> {
    np_linspace(0.0, (num_train - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t as f32)
        .collect()
}

/// Refuses a step count diffusiond does not run: 0, or more than `num_train_timesteps`
/// (where diffusers either raises or builds a schedule with repeated timesteps).
pub fn check_steps(
    cfg: &ResolvedConfig,
    scheduler: &'static str,
    n: usize,
) -> Result<(), SchedulerError> {
    let message = if n == 0 {
        "at least one step is needed".to_owned()
    } else if n > cfg.num_train_timesteps {
        format!(
            "more steps than num_train_timesteps = {}",
            cfg.num_train_timesteps
        )
    } else {
        return Ok(());
    };
    Err(SchedulerError::InvalidSteps {
        scheduler,
        steps: n,
        message,
    })
}

/// The integer timestep schedule of DDIM / DDPM / PNDM-style classes for `timestep_spacing`,
/// descending (`leading` adds `steps_offset`; `trailing` subtracts 1).
pub fn spaced_timesteps_i64(cfg: &ResolvedConfig, n: usize) -> Vec<i64> {
    let n_train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => linspace_timesteps_rounded(n_train, n),
        TimestepSpacing::Leading => leading_timesteps(n_train, n, cfg.steps_offset),
        TimestepSpacing::Trailing => trailing_timesteps(n_train as f64, n_train, n),
    }
}

/// The float32 timestep schedule of the Euler-family classes (Euler, Euler-a, Heun, LMS):
/// `linspace` is not rounded; `leading`/`trailing` are the integer schedules as float32.
pub fn spaced_timesteps_f32(cfg: &ResolvedConfig, n: usize) -> Vec<f32> {
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => linspace_timesteps_f32(cfg.num_train_timesteps, n),
        _ => spaced_timesteps_i64(cfg, n)
            .into_iter()
            .map(|t| t as f32)
            .collect(),
    }
}

/// `np.interp(timesteps, np.arange(len(sigmas)), sigmas)` for float32 timesteps.
pub fn interp_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| np_interp(f64::from(t), train_sigmas))
        .collect()
}

/// How a sigma-based class spaces its sigmas (`use_karras_sigmas` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    /// Training sigmas interpolated at the spaced timesteps.
    Interpolated,
    /// Karras et al. (2022), rho = 7.
    Karras,
    /// Log-uniform between sigma_max and sigma_min.
    Exponential,
}

impl SigmaSpacing {
    /// Reads `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`.
    /// Beta sigmas (`scipy.stats.beta.ppf`) are not supported.
    pub fn from_config(cfg: &ResolvedConfig) -> Result<Self, SchedulerError> {
        let invalid = |message: &str| SchedulerError::InvalidConfig {
            scheduler: cfg.class.class_name(),
            message: message.to_owned(),
        };
        let flags = [
            cfg.use_karras_sigmas,
            cfg.use_exponential_sigmas,
            cfg.use_beta_sigmas,
        ];
        if flags.iter().filter(|&&f| f).count() > 1 {
            return Err(invalid(
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used",
            ));
        }
        if cfg.use_beta_sigmas {
            return Err(invalid("use_beta_sigmas is not supported"));
        }
        Ok(if cfg.use_karras_sigmas {
            Self::Karras
        } else if cfg.use_exponential_sigmas {
            Self::Exponential
        } else {
            Self::Interpolated
        })
    }

    /// Converts the interpolated sigmas (descending, float64) to this spacing with `n`
    /// entries; `sigma_min`/`sigma_max` default to the last/first input sigma.
    pub fn convert(
        self,
        in_sigmas: Vec<f64>,
        sigma_min: Option<f64>,
        sigma_max: Option<f64>,
        n: usize,
    ) -> Vec<f64> {
        let lo = sigma_min.unwrap_or_else(|| in_sigmas.last().copied().unwrap_or(0.0));
        let hi = sigma_max.unwrap_or_else(|| in_sigmas.first().copied().unwrap_or(0.0));
        match self {
            Self::Interpolated => in_sigmas,
            Self::Karras => karras_sigmas(lo, hi, n),
            Self::Exponential => exponential_sigmas(lo, hi, n),
        }
    }
}

/// `sigma / sqrt(sigma^2 + 1)` scaling divisor of the Euler family, in float32:
/// `(sigma**2 + 1) ** 0.5`.
pub fn input_scale_divisor(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// The sigma-based schedulers' `scale_model_input`: divides `sample` in place by
/// `(sigma**2 + 1) ** 0.5` for the step's sigma (a step past the end is left as is).
pub fn scale_by_sigma(
    mut sample: ndarray::ArrayViewMutD<'_, f32>,
    sigmas: &[f32],
    step_index: usize,
) {
    if let Some(&sigma) = sigmas.get(step_index) {
        let d = input_scale_divisor(sigma);
        sample.mapv_inplace(|x| x / d);
    }
}

/// The Euler family's `(max_sigma**2 + 1) ** 0.5` (leading) or `max_sigma`
/// (linspace/trailing), in float32.
pub fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// Checks that `model_output` has the sample's shape.
pub fn check_shapes(
    scheduler: &'static str,
    step_index: usize,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayD<f32>,
) -> Result<(), SchedulerError> {
    if model_output.shape() == sample.shape() {
        return Ok(());
    }
    Err(SchedulerError::BadStep {
        scheduler,
        step_index,
        message: format!(
            "model output shape {:?} differs from sample shape {:?}",
            model_output.shape(),
            sample.shape()
        ),
    })
}

/// Applies `f(sample, model_output)` elementwise, in place on `sample`.
pub fn zip_update(
    sample: &mut ArrayD<f32>,
    model_output: &ArrayViewD<'_, f32>,
    f: impl Fn(f32, f32) -> f32,
) {
    Zip::from(sample)
        .and(model_output)
        .for_each(|x, &m| *x = f(*x, m));
}

/// Fills `buf` (resized to `len`) with one `randn` draw from `noise`.
pub fn draw_noise(noise: &mut dyn crate::rng::NoiseSource, buf: &mut Vec<f32>, len: usize) {
    buf.resize(len, 0.0);
    noise.fill_randn(buf);
}

/// A `BadStep` error unless `step_index` is the expected one and within `len` steps.
pub fn check_step_index(
    scheduler: &'static str,
    step_index: usize,
    expected: Option<usize>,
    len: usize,
) -> Result<(), SchedulerError> {
    let message = if step_index >= len {
        format!("only {len} steps are scheduled")
    } else if let Some(e) = expected.filter(|&e| e != step_index) {
        format!("steps must run in order; expected step {e}")
    } else {
        return Ok(());
    };
    Err(SchedulerError::BadStep {
        scheduler,
        step_index,
        message,
    })
}

/// Karras et al. (2022) sigmas: `(max^(1/7) + ramp * (min^(1/7) - max^(1/7))) ** 7`
/// with `ramp = np.linspace(0, 1, n)`, in float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// Exponential sigmas: `np.exp(np.linspace(ln(max), ln(min), n))`, in float64.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `_sigma_to_t(sigma, log_sigmas)`: the fractional training timestep of `sigma`,
/// interpolating linearly in log-sigma between neighbouring training sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax(cumsum(dists >= 0)) = index of the last entry with log_sigmas[i] <= log_sigma
    // (0 when there is none), clipped to n - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - f64::from(ls) >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `torch.quantile(x, q)` on float32 data (linear interpolation), sorting `x` in place.
fn quantile_f32(x: &mut [f32], q: f32) -> f32 {
    x.sort_by(f32::total_cmp);
    let rank = q * (x.len() - 1) as f32;
    let below = rank as usize;
    let above = (below + 1).min(x.len() - 1);
    let weight = rank - below as f32;
    let (lo, hi) = (x[below], x[above]);
    // torch.lerp
    if weight < 0.5 {
        lo + weight * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - weight)
    }
}

/// Dynamic thresholding (`_threshold_sample`, Imagen): per batch item, clamps
/// `sample` to `±s` and divides by `s`, where `s` is the `ratio` quantile of `|sample|`
/// clamped to `[1, max_value]`. `scratch` is reused between calls.
pub fn threshold_sample(
    mut sample: ArrayViewMutD<'_, f32>,
    ratio: f64,
    max_value: f64,
    scratch: &mut Vec<f32>,
) {
    if sample.ndim() == 0 {
        return;
    }
    for mut item in sample.axis_iter_mut(Axis(0)) {
        scratch.clear();
        scratch.extend(item.iter().map(|v| v.abs()));
        if scratch.is_empty() {
            continue;
        }
        let s = quantile_f32(scratch, ratio as f32)
            .max(1.0)
            .min(max_value as f32);
        item.mapv_inplace(|v| v.max(-s).min(s) / s);
    }
}

/// What DDIM, DDPM and LCM do to the predicted `x0`: dynamic thresholding wins over
/// `clip_sample`, as in diffusers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum X0Clip {
    /// Leave it.
    None,
    /// `clip_sample`: clamp to `[-range, range]`.
    Clip(f64),
    /// `thresholding`: `_threshold_sample` with `dynamic_thresholding_ratio`, `sample_max_value`.
    Threshold {
        /// `dynamic_thresholding_ratio`.
        ratio: f64,
        /// `sample_max_value`.
        max_value: f64,
    },
}

impl X0Clip {
    /// Reads `thresholding` / `clip_sample` from the config.
    pub fn from_config(cfg: &ResolvedConfig) -> Self {
        if cfg.thresholding {
            Self::Threshold {
                ratio: cfg.dynamic_thresholding_ratio,
                max_value: cfg.sample_max_value,
            }
        } else if cfg.clip_sample {
            Self::Clip(cfg.clip_sample_range)
        } else {
            Self::None
        }
    }

    /// Applies it to `x0` in place; `scratch` is reused by thresholding.
    pub fn apply(self, x0: ArrayViewMutD<'_, f32>, scratch: &mut Vec<f32>) {
        match self {
            Self::None => {}
            Self::Clip(range) => clip_sample(x0, range),
            Self::Threshold { ratio, max_value } => threshold_sample(x0, ratio, max_value, scratch),
        }
    }
}

/// Clamps every element to `[-range, range]` (`clip_sample`).
pub fn clip_sample(mut sample: ArrayViewMutD<'_, f32>, range: f64) {
    let r = range as f32;
    sample.mapv_inplace(|v| v.max(-r).min(r));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::config::{SchedulerClass, SchedulerConfig};

    fn common_golden() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/schedulers/common.json"
        );
        let text = std::fs::read_to_string(path).expect("golden common.json");
        serde_json::from_str(&text).expect("valid json")
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    }

    fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn betas_and_alphas_cumprod_match_diffusers() {
        let golden = common_golden();
        // (golden key, beta_schedule, rescale_betas_zero_snr, allowed abs difference)
        // torch's `Tensor.sqrt()` (MKL VML) is not always correctly rounded; the zero-SNR
        // rescale uses it, so its sqrt(alphas_cumprod) may be one float32 ulp off, which
        // moves `1 - ratio` by about one ulp of 1.0. Everything else is bit-exact.
        for (name, schedule, zero_snr, tol) in [
            ("linear", "linear", false, 0.0),
            ("scaled_linear", "scaled_linear", false, 0.0),
            ("squaredcos_cap_v2", "squaredcos_cap_v2", false, 0.0),
            (
                "scaled_linear_zero_snr",
                "scaled_linear",
                true,
                2.0 * f32::EPSILON,
            ),
        ] {
            let json = format!(
                r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "{schedule}",
                    "rescale_betas_zero_snr": {zero_snr}}}"#
            );
            let cfg = SchedulerConfig::from_json_str(&json)
                .unwrap()
                .resolve(SchedulerClass::Ddim)
                .unwrap();
            let s = NoiseSchedule::new(&cfg, ZeroSnrTail::Keep).unwrap();
            let g = &golden[name];
            let b = max_abs_diff(&s.betas, &floats(&g["betas"]));
            assert!(b <= tol, "{name} betas differ by {b}");
            let a = max_abs_diff(&s.alphas_cumprod, &floats(&g["alphas_cumprod"]));
            assert!(a <= tol, "{name} alphas_cumprod differ by {a}");
        }
    }

    #[test]
    fn log_f32_matches_numpy_bit_for_bit() {
        let g = &common_golden()["numpy_log_f32"];
        let (x, want) = (floats(&g["x"]), floats(&g["log"]));
        let got: Vec<f32> = x.iter().map(|&v| log_f32(v)).collect();
        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{bad} of {} differ", want.len());
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(leading_timesteps(1000, 4, 1), vec![751, 501, 251, 1]);
        assert_eq!(
            trailing_timesteps(1000.0, 1000, 4),
            vec![999, 749, 499, 249]
        );
        assert_eq!(linspace_timesteps_rounded(1000, 3), vec![999, 500, 0]);
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp(0.5, &fp), 2.0);
        assert_eq!(np_interp(1.25, &fp), 4.0);
        assert_eq!(np_interp(5.0, &fp), 7.0);
        assert_eq!(np_interp(-1.0, &fp), 1.0);
    }

    #[test]
    fn sigma_to_t_inverts_training_sigmas() {
        let ls: Vec<f32> = [0.1f32, 0.5, 1.0, 5.0]
            .iter()
            .map(|&s| log_f32(s))
            .collect();
        assert!((sigma_to_t(f64::from(0.5f32), &ls) - 1.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(100.0, &ls), 3.0);
        assert_eq!(sigma_to_t(0.0, &ls), 0.0);
    }

    #[test]
    fn thresholding_clamps_per_item() {
        let mut a = ndarray::Array::from_shape_vec(
            vec![2, 4],
            vec![0.5, -3.0, 2.0, 1.0, 0.1, 0.2, -0.3, 0.4],
        )
        .unwrap()
        .into_dyn();
        let mut scratch = Vec::new();
        threshold_sample(a.view_mut(), 0.5, 10.0, &mut scratch);
        // item 0: |x| sorted = [0.5, 1, 2, 3], q=0.5 -> rank 1.5 -> 1.5; item 1: s clamps to 1.
        assert_eq!(
            a.as_slice().unwrap()[..4],
            [0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5]
        );
        assert_eq!(a.as_slice().unwrap()[4..], [0.1, 0.2, -0.3, 0.4]);
    }
}
