//! `unipc`: diffusers' `UniPCMultistepScheduler` (UniPC: the UniP predictor with the
//! UniC corrector, B(h) variants `bh1`/`bh2`).
//!
//! Numerics follow diffusers 0.39.0 exactly as in [`super::dpm_solver`]: float64
//! schedule stored as float32, float32 step scalars, float32 tensor ops in Python's
//! evaluation order. The small linear systems for the predictor/corrector weights are
//! solved in float32 as MKL's `sgesv` does for 2x2 systems (bit-exact for the default
//! `solver_order=2`); for `solver_order >= 3` MKL's 3x3 path rounds differently, which
//! shows as ~1e-6 per step. The einsum over the history uses torch's FMA accumulation.

use ndarray::{ArrayD, ArrayViewD};

use super::common::{NoiseSchedule, ZeroSnrTail};
use super::config::{FinalSigmasType, PredictionType, ResolvedConfig, SolverType};
use super::dpm_solver::{
    History, VpPoint, check_step, convert_to_epsilon, convert_to_x0, interpolated_schedule,
    karras_schedule, make_standard_layout, multistep_timesteps, reject_unsupported_sigmas,
    torch_f32,
};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "unipc";

/// `UniPCMultistepScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct UniPcMultistep {
    settings: Settings,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    history: History,
    /// The converted output of the current step, before it joins the history.
    model_t: ArrayD<f32>,
    /// The sample before the last predictor step (`self.last_sample`).
    last_sample: Option<ArrayD<f32>>,
    scratch: Vec<f32>,
    /// The predictor order of the previous step (`self.this_order`).
    this_order: usize,
    lower_order_nums: usize,
    next_step: usize,
}

/// The settings `step` needs, resolved once.
#[derive(Debug, Clone)]
struct Settings {
    order: usize,
    predict_x0: bool,
    bh1: bool,
    prediction: PredictionType,
    threshold: Option<(f64, f64)>,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
}

/// Builds a boxed [`UniPcMultistep`] (the factory entry point).
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(UniPcMultistep::new(config, num_inference_steps)?))
}

impl UniPcMultistep {
    /// `UniPCMultistepScheduler.from_config(..)` + `set_timesteps(num_inference_steps)`.
    ///
    /// Supports `use_karras_sigmas`; the exponential / beta / flow sigma schedules,
    /// dynamic shifting and `solver_p` are refused with [`SchedulerError::InvalidConfig`].
    pub fn new(
        config: &ResolvedConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let settings = Settings::from_config(config)?;
        let (timesteps, sigmas) = unipc_schedule(config, num_inference_steps)?;
        Ok(Self {
            history: History::new(settings.order),
            settings,
            timesteps,
            sigmas,
            model_t: ArrayD::zeros(vec![0]),
            last_sample: None,
            scratch: Vec::new(),
            this_order: 0,
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// The float32 sigmas diffusers holds (`self.sigmas`): one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `convert_model_output` into `self.model_t`.
    fn convert(&mut self, model_output: &ArrayViewD<'_, f32>, sample: &ArrayD<f32>) {
        let point = VpPoint::new(self.sigmas[self.next_step]);
        if self.model_t.shape() != sample.shape() {
            self.model_t = ArrayD::zeros(sample.shape());
        }
        let s = &self.settings;
        let dst = self.model_t.view_mut();
        if s.predict_x0 {
            convert_to_x0(
                dst,
                model_output,
                sample,
                s.prediction,
                point.alpha,
                point.sigma,
            );
            if let Some((ratio, max)) = s.threshold {
                super::common::threshold_sample(
                    self.model_t.view_mut(),
                    ratio,
                    max,
                    &mut self.scratch,
                );
            }
        } else {
            convert_to_epsilon(
                dst,
                model_output,
                sample,
                s.prediction,
                point.alpha,
                point.sigma,
            );
        }
    }

    /// The scalars of a UniP/UniC update from sigma index `s0` to `t`, using the
    /// history entries at sigma indices `s0 - 1, s0 - 2, ...` (`order - 1` of them).
    fn update_scalars(&self, t: usize, s0: usize, order: usize) -> UpdateScalars {
        let pt = VpPoint::new(self.sigmas[t]);
        let ps0 = VpPoint::new(self.sigmas[s0]);
        let h = pt.lambda - ps0.lambda;
        let rks: Vec<f32> = (1..order)
            .map(|k| (VpPoint::new(self.sigmas[s0 - k]).lambda - ps0.lambda) / h)
            .collect();
        let hh = if self.settings.predict_x0 { -h } else { h };
        let h_phi_1 = torch_f32::exp_m1(hh);
        let b_h = if self.settings.bh1 {
            hh
        } else {
            torch_f32::exp_m1(hh)
        };
        let (x_coef, m0_coef, res_coef) = if self.settings.predict_x0 {
            (pt.sigma / ps0.sigma, pt.alpha * h_phi_1, pt.alpha * b_h)
        } else {
            (pt.alpha / ps0.alpha, pt.sigma * h_phi_1, pt.sigma * b_h)
        };
        UpdateScalars {
            x_coef,
            m0_coef,
            res_coef,
            b: b_vector(hh, h_phi_1, b_h, order),
            rks,
        }
    }

    /// The UniC corrector: overwrites `sample` with the corrected sample at step `i`.
    fn correct(&self, i: usize, sample: &mut [f32]) -> Result<(), SchedulerError> {
        let order = self.this_order;
        let u = self.update_scalars(i, i - 1, order);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(&r_matrix(&u.rks, order), &u.b).ok_or_else(|| singular(i))?
        };
        let last = self
            .last_sample
            .as_ref()
            .expect("corrector runs after a step");
        let x = last.as_slice().expect("contiguous");
        let m = self.history.newest(order);
        let model_t = self.model_t.as_slice().expect("contiguous");
        let (rho_t, rhos) = rhos.split_last().expect("order >= 1");
        for (j, out) in sample.iter_mut().enumerate() {
            let x_t_ = u.x_coef * x[j] - u.m0_coef * m[0][j];
            let corr_res = weighted_differences(rhos, &u.rks, &m, j);
            let d1_t = model_t[j] - m[0][j];
            *out = x_t_ - u.res_coef * (corr_res + *rho_t * d1_t);
        }
        Ok(())
    }

    /// The UniP predictor: advances `sample` from step `i` to `i + 1`.
    fn predict(&self, i: usize, order: usize, sample: &mut [f32]) -> Result<(), SchedulerError> {
        let u = self.update_scalars(i + 1, i, order);
        let rhos = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => {
                let k = order - 1;
                let r = r_matrix(&u.rks, order);
                let r_sub: Vec<Vec<f32>> = r[..k].iter().map(|row| row[..k].to_vec()).collect();
                solve(&r_sub, &u.b[..k]).ok_or_else(|| singular(i))?
            }
        };
        let m = self.history.newest(order);
        if rhos.is_empty() {
            // `pred_res = 0`: diffusers still subtracts `alpha_t * B_h * 0`.
            let zero = u.res_coef * 0.0;
            for (x, &m0) in sample.iter_mut().zip(m[0]) {
                *x = (u.x_coef * *x - u.m0_coef * m0) - zero;
            }
            return Ok(());
        }
        for (j, x) in sample.iter_mut().enumerate() {
            let x_t_ = u.x_coef * *x - u.m0_coef * m[0][j];
            let pred_res = weighted_differences(&rhos, &u.rks, &m, j);
            *x = x_t_ - u.res_coef * pred_res;
        }
        Ok(())
    }

    /// The predictor order for step `i` (warm-up and `lower_order_final`).
    fn order_for_step(&self, i: usize) -> usize {
        let order = if self.settings.lower_order_final {
            self.settings.order.min(self.timesteps.len() - i)
        } else {
            self.settings.order
        };
        order.min(self.lower_order_nums + 1)
    }

    /// Whether diffusers runs the corrector at step `i`.
    fn use_corrector(&self, i: usize) -> bool {
        i > 0 && !self.settings.disable_corrector.contains(&(i - 1)) && self.last_sample.is_some()
    }

    /// Copies `sample` into `last_sample`, allocating only on the first step.
    fn remember_sample(&mut self, sample: &ArrayD<f32>) {
        match &mut self.last_sample {
            Some(last) if last.shape() == sample.shape() => last.assign(sample),
            slot => *slot = Some(sample.clone()),
        }
    }
}

impl Scheduler for UniPcMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.next_step = begin;
    }

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        crate::scheduler::NoiseLevel::from_vp_sigma(self.sigmas[index.min(self.sigmas.len() - 1)])
    }

    fn prediction_type(&self) -> PredictionType {
        self.settings.prediction
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        let i = step_index;
        check_step(
            NAME,
            i,
            self.next_step,
            self.timesteps.len(),
            model_output.shape(),
            sample.shape(),
        )?;
        make_standard_layout(sample);
        self.convert(&model_output, sample);
        if self.use_corrector(i) {
            self.correct(i, sample.as_slice_mut().expect("standard layout"))?;
        }
        self.history.push_swap(&mut self.model_t);
        self.this_order = self.order_for_step(i);
        self.remember_sample(sample);
        let order = self.this_order;
        self.predict(i, order, sample.as_slice_mut().expect("standard layout"))?;
        if self.lower_order_nums < self.settings.order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(())
    }
}

impl Settings {
    /// Validates and extracts the UniPC settings of a resolved config.
    fn from_config(cfg: &ResolvedConfig) -> Result<Self, SchedulerError> {
        reject_unsupported_sigmas(cfg, NAME, true)?;
        let invalid = |message: &str| SchedulerError::InvalidConfig {
            scheduler: NAME,
            message: message.to_owned(),
        };
        if cfg.solver_order == 0 {
            return Err(invalid("solver_order must be at least 1"));
        }
        if cfg.shift_terminal.is_some() {
            return Err(invalid(
                "shift_terminal is only supported with use_flow_sigmas",
            ));
        }
        Ok(Self {
            order: cfg.solver_order,
            predict_x0: cfg.predict_x0,
            // midpoint / heun / logrho are mapped to bh2 by diffusers.
            bh1: cfg.solver_type == SolverType::Bh1,
            prediction: cfg.prediction_type,
            threshold: cfg
                .thresholding
                .then_some((cfg.dynamic_thresholding_ratio, cfg.sample_max_value)),
            lower_order_final: cfg.lower_order_final,
            disable_corrector: cfg.disable_corrector.clone(),
        })
    }
}

/// `set_timesteps` of `UniPCMultistepScheduler`: (timesteps, float32 sigmas).
fn unipc_schedule(cfg: &ResolvedConfig, n: usize) -> Result<(Vec<f64>, Vec<f32>), SchedulerError> {
    let noise = NoiseSchedule::new(cfg, ZeroSnrTail::Floor)?;
    let train_sigmas = noise.train_sigmas();
    let timesteps = multistep_timesteps(cfg, cfg.num_train_timesteps, n, NAME)?;
    if cfg.use_karras_sigmas {
        let (timesteps, mut sigmas) = karras_schedule(cfg, &train_sigmas, n);
        let sigma_last = match cfg.final_sigmas_type {
            // `sigmas[-1]` of the Karras schedule (float64, then float32 with the rest).
            FinalSigmasType::SigmaMin => sigmas.last().copied().unwrap_or(0.0),
            FinalSigmasType::Zero => 0.0,
        };
        sigmas.push(sigma_last);
        return Ok((timesteps, sigmas));
    }
    let sigma_last = match cfg.final_sigmas_type {
        FinalSigmasType::SigmaMin => train_sigmas[0],
        FinalSigmasType::Zero => 0.0,
    };
    Ok(interpolated_schedule(&timesteps, &train_sigmas, sigma_last))
}

/// The step-level float32 scalars of one UniP or UniC update.
#[derive(Debug, Clone)]
struct UpdateScalars {
    /// `sigma_t / sigma_s0` (or `alpha_t / alpha_s0`).
    x_coef: f32,
    /// `alpha_t * h_phi_1` (or `sigma_t * h_phi_1`).
    m0_coef: f32,
    /// `alpha_t * B_h` (or `sigma_t * B_h`).
    res_coef: f32,
    /// The right-hand side `b` (one entry per order).
    b: Vec<f32>,
    /// `r_k = (lambda_{s_k} - lambda_{s0}) / h` for the older history entries.
    rks: Vec<f32>,
}

/// `b_i = h_phi_k * i! / B_h` for `i = 1..=order`, updating `h_phi_k` as diffusers does.
fn b_vector(hh: f32, h_phi_1: f32, b_h: f32, order: usize) -> Vec<f32> {
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial: u64 = 1;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order as u64 {
        b.push(h_phi_k * factorial as f32 / b_h);
        factorial *= i + 1;
        h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
    }
    b
}

/// `R[i][k] = rks[k] ** i` with `rks` extended by a trailing 1, `order x order`.
fn r_matrix(rks: &[f32], order: usize) -> Vec<Vec<f32>> {
    let rks: Vec<f32> = rks.iter().copied().chain(std::iter::once(1.0)).collect();
    (0..order)
        .map(|i| rks.iter().map(|&r| torch_pow(r, i)).collect())
        .collect()
}

/// `torch.pow(x, n)` for a float32 tensor and a small integer exponent.
fn torch_pow(x: f32, n: usize) -> f32 {
    match n {
        0 => 1.0,
        1 => x,
        2 => x * x,
        3 => x * x * x,
        _ => x.powi(n as i32),
    }
}

/// `sum_k rhos[k] * (m[k + 1][j] - m[0][j]) / rks[k]`: torch's einsum over `D1s`, which
/// accumulates with fused multiply-adds (`acc = fma(rho_k, D1_k, acc)`).
fn weighted_differences(rhos: &[f32], rks: &[f32], m: &[&[f32]], j: usize) -> f32 {
    let mut terms = rhos
        .iter()
        .zip(rks)
        .enumerate()
        .map(|(k, (&rho, &rk))| (rho, (m[k + 1][j] - m[0][j]) / rk));
    let Some((rho, d1)) = terms.next() else {
        return 0.0;
    };
    terms.fold(rho * d1, |acc, (rho, d1)| rho.mul_add(d1, acc))
}

/// Solves `a x = b` in float32 as `torch.linalg.solve` does on the CPU (LAPACK `sgesv`
/// from MKL): partial pivoting, multipliers and back-substitution through reciprocals
/// of the pivots, fused multiply-adds in the updates. `None` when a pivot is zero.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Option<Vec<f32>> {
    let n = b.len();
    let mut a: Vec<Vec<f32>> = a.to_vec();
    let mut x = b.to_vec();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col] == 0.0 {
            return None;
        }
        a.swap(col, pivot);
        x.swap(col, pivot);
        let inv = 1.0 / a[col][col];
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (offset, row) in rest.iter_mut().enumerate() {
            let l = row[col] * inv;
            for (v, &p) in row[col + 1..].iter_mut().zip(&pivot_row[col + 1..]) {
                *v = (-l).mul_add(p, *v);
            }
            x[col + 1 + offset] = (-l).mul_add(x[col], x[col + 1 + offset]);
        }
    }
    for col in (0..n).rev() {
        x[col] *= 1.0 / a[col][col];
        for row in 0..col {
            x[row] = (-x[col]).mul_add(a[row][col], x[row]);
        }
    }
    Some(x)
}

/// The error for a singular predictor/corrector system at step `i`.
fn singular(i: usize) -> SchedulerError {
    SchedulerError::BadStep {
        scheduler: NAME,
        step_index: i,
        message: "the UniPC weight system is singular (repeated sigmas)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::config::{SchedulerClass, SchedulerConfig};
    use crate::scheduler::dpm_solver::golden::{self, Case};

    const TOLERANCE: f64 = 1e-5;

    fn build(case: &Case) -> UniPcMultistep {
        let cfg = golden::resolved(case, SchedulerClass::UniPcMultistep);
        UniPcMultistep::new(&cfg, case.steps).expect("builds")
    }

    #[test]
    fn unipc_matches_diffusers() {
        let mut failures = Vec::new();
        for case in golden::cases(NAME) {
            let refused = || {
                let cfg = golden::resolved(&case, SchedulerClass::UniPcMultistep);
                UniPcMultistep::new(&cfg, case.steps).is_err()
            };
            if golden::skip_refused(&case, refused) {
                continue;
            }
            let mut sched = build(&case);
            let sigma_diff = golden::check_schedule(&case, &sched, sched.sigmas());
            let free = golden::run_trajectory(&case, NAME, &mut sched, false);
            let forced = golden::run_trajectory(&case, NAME, &mut build(&case), true);
            println!(
                "unipc {}/{}: sigma diff {sigma_diff:e}, max |prev diff| {free:e} (per step {forced:e})",
                case.config, case.steps
            );
            if free > TOLERANCE || forced > TOLERANCE {
                failures.push(format!(
                    "{}/{}: {free:e} / {forced:e}",
                    case.config, case.steps
                ));
            }
        }
        assert!(failures.is_empty(), "unipc: {failures:?}");
    }

    #[test]
    fn factory_builds_unipc() {
        let case = golden::cases(NAME).into_iter().next().expect("a case");
        let path = golden::dir()
            .join(&case.config)
            .join("scheduler_config.json");
        let cfg = SchedulerConfig::from_file(&path).unwrap();
        let sched = crate::scheduler::create(NAME, &cfg, case.steps).expect("factory");
        assert_eq!(sched.timesteps(), build(&case).timesteps());
    }

    #[test]
    fn steps_must_run_in_order() {
        let case = golden::cases(NAME).into_iter().next().expect("a case");
        golden::check_step_errors(&mut build(&case));
    }

    #[test]
    fn unsupported_options_are_refused() {
        for json in [
            r#"{"use_flow_sigmas": true}"#,
            r#"{"use_beta_sigmas": true}"#,
            r#"{"use_dynamic_shifting": true}"#,
            r#"{"solver_order": 0}"#,
        ] {
            let cfg = SchedulerConfig::from_json_str(json).unwrap();
            let resolved = cfg.resolve(SchedulerClass::UniPcMultistep).unwrap();
            let err = UniPcMultistep::new(&resolved, 4).expect_err(json);
            assert!(
                matches!(err, SchedulerError::InvalidConfig { .. }),
                "{json}"
            );
        }
    }

    #[test]
    fn small_systems_solve_like_lapack() {
        let x = solve(&[vec![1.0, 1.0], vec![-1.0, 1.0]], &[3.0, 1.0]).unwrap();
        assert_eq!(x, vec![1.0, 2.0]);
        assert!(solve(&[vec![1.0, 1.0], vec![1.0, 1.0]], &[1.0, 1.0]).is_none());
    }
}
