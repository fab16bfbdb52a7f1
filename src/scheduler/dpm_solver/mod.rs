//! `dpm++2m` and `dpm++2m-karras`: diffusers' `DPMSolverMultistepScheduler`
//! (DPM-Solver++ multistep), the latter with `use_karras_sigmas=True`.
//!
//! Numerics follow diffusers 0.39.0: the sigma schedule is built in float64 (numpy)
//! and stored as float32; every step coefficient (alpha, sigma, lambda, h, ...) is a
//! float32 scalar, and every tensor operation is rounded to float32 in the order the
//! Python expressions evaluate it.
//!
//! The helpers shared with [`super::unipc`] (the multistep timestep schedule, the
//! model-output history, VP-sigma conversions) are re-exported here as `pub(crate)` items.
//!
//! This file holds the scheduler and its `step`; the parts are submodules:
//! `schedule.rs` (timesteps and sigmas), `convert.rs` (VP-sigma conversions of the
//! model output), `update.rs` (the first-, second- and third-order updates),
//! `history.rs` (the model-output history and step checks) and `torch_f32.rs`
//! (torch's float32 `exp`, `log` and `expm1`).

use ndarray::{ArrayD, ArrayViewD};

use super::common;
use super::config::{AlgorithmType, FinalSigmasType, PredictionType, ResolvedConfig, SolverType};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

mod convert;
mod history;
mod schedule;
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
pub(crate) mod torch_f32;
mod update;

#[cfg(test)]
pub(crate) mod golden;
#[cfg(test)]
mod tests;

pub(crate) use convert::{VpPoint, alpha_sigma, convert_to_epsilon, convert_to_x0};
pub(crate) use history::{History, check_step, make_standard_layout};
pub(crate) use schedule::{
    interpolated_schedule, karras_schedule, multistep_timesteps, reject_unsupported_sigmas,
};

use convert::threshold_epsilon;
use schedule::dpm_schedule;
use update::{
    Coefficients, first_order_coefficients, second_order_d1, third_order_d1_d2, update_first,
    update_second, update_third,
};

/// `DPMSolverMultistepScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    name: &'static str,
    settings: Settings,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    history: History,
    scratch: Vec<f32>,
    lower_order_nums: usize,
    next_step: usize,
}

/// The solver family (`algorithm_type`, with `deis` mapped to `dpmsolver++`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    /// Data-prediction solver (`dpmsolver++`).
    PlusPlus,
    /// Noise-prediction solver (`dpmsolver`).
    Noise,
}

/// The settings `step` needs, resolved once.
#[derive(Debug, Clone, Copy)]
struct Settings {
    order: usize,
    algorithm: Algorithm,
    heun: bool,
    prediction: PredictionType,
    threshold: Option<(f64, f64)>,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
}

/// Builds a boxed [`DpmSolverMultistep`] (the factory entry point).
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(DpmSolverMultistep::new(
        config,
        num_inference_steps,
    )?))
}

impl DpmSolverMultistep {
    /// `DPMSolverMultistepScheduler.from_config(..)` + `set_timesteps(num_inference_steps)`.
    ///
    /// Karras sigmas are used when `config.use_karras_sigmas` is set (the factory sets it
    /// for `dpm++2m-karras`). SDE variants, learned variance, and the exponential / beta /
    /// Lu-lambda / flow sigma schedules are refused with [`SchedulerError::InvalidConfig`].
    pub fn new(
        config: &ResolvedConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let name = if config.use_karras_sigmas {
            "dpm++2m-karras"
        } else {
            "dpm++2m"
        };
        let settings = Settings::from_config(config, name)?;
        let (timesteps, sigmas) = dpm_schedule(config, num_inference_steps, name)?;
        Ok(Self {
            name,
            settings,
            timesteps,
            sigmas,
            history: History::new(settings.order),
            scratch: Vec::new(),
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// The float32 sigmas diffusers holds (`self.sigmas`): one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Converts the raw model output into the history's newest slot (`convert_model_output`).
    fn push_model_output(&mut self, model_output: &ArrayViewD<'_, f32>, sample: &ArrayD<f32>) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[self.next_step]);
        let s = self.settings;
        let dst = self.history.rotate(sample.shape());
        match s.algorithm {
            Algorithm::PlusPlus => {
                convert_to_x0(
                    dst.view_mut(),
                    model_output,
                    sample,
                    s.prediction,
                    alpha,
                    sigma,
                );
                if let Some((ratio, max)) = s.threshold {
                    common::threshold_sample(dst.view_mut(), ratio, max, &mut self.scratch);
                }
            }
            Algorithm::Noise => {
                convert_to_epsilon(
                    dst.view_mut(),
                    model_output,
                    sample,
                    s.prediction,
                    alpha,
                    sigma,
                );
                if let Some((ratio, max)) = s.threshold {
                    threshold_epsilon(dst, sample, alpha, sigma, (ratio, max), &mut self.scratch);
                }
            }
        }
    }

    /// The solver order diffusers picks for step `i` (first, second or third).
    fn order_for_step(&self, i: usize) -> usize {
        let s = &self.settings;
        let n = self.timesteps.len();
        let few = s.lower_order_final && n < 15;
        let lower_order_final = i + 1 == n && (s.euler_at_final || few || s.final_zero);
        let lower_order_second = i + 2 == n && few;
        if s.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if s.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        }
    }

    /// The float32 update coefficients for step `i` at `order`.
    fn coefficients(&self, i: usize, order: usize) -> Coefficients {
        let point = |j: usize| VpPoint::new(self.sigmas[j]);
        let (t, s0) = (point(i + 1), point(i));
        let h = t.lambda - s0.lambda;
        let plus = self.settings.algorithm == Algorithm::PlusPlus;
        let (a, b) = first_order_coefficients(t, s0, h, plus);
        let mut c = Coefficients {
            a,
            b,
            ..Coefficients::default()
        };
        if order >= 2 {
            let s1 = point(i - 1);
            let r0 = (s0.lambda - s1.lambda) / h;
            c.inv_r0 = 1.0 / r0;
            if order == 2 {
                c.c1 = second_order_d1(t, h, b, plus, self.settings.heun);
            } else {
                let r1 = (s1.lambda - point(i - 2).lambda) / h;
                c.inv_r1 = 1.0 / r1;
                c.k1 = r0 / (r0 + r1);
                c.k2 = 1.0 / (r0 + r1);
                (c.c1, c.c2) = third_order_d1_d2(t, h, plus);
            }
        }
        c
    }

    /// Rejects a step index that is not the next one, or shapes that do not match.
    fn check_step(
        &self,
        step_index: usize,
        model_output: &[usize],
        sample: &[usize],
    ) -> Result<(), SchedulerError> {
        check_step(
            self.name,
            step_index,
            self.next_step,
            self.timesteps.len(),
            model_output,
            sample,
        )
    }
}

impl Scheduler for DpmSolverMultistep {
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
        self.check_step(step_index, model_output.shape(), sample.shape())?;
        make_standard_layout(sample);
        let order = self.order_for_step(step_index);
        self.push_model_output(&model_output, sample);
        let c = self.coefficients(step_index, order);
        let x = sample.as_slice_mut().expect("standard layout");
        let m = self.history.newest(order);
        match order {
            1 => update_first(x, m[0], &c),
            2 => update_second(x, m[0], m[1], &c),
            _ => update_third(x, m[0], m[1], m[2], &c),
        }
        if self.lower_order_nums < self.settings.order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(())
    }
}

impl Settings {
    /// Validates and extracts the DPM-Solver settings of a resolved config.
    fn from_config(cfg: &ResolvedConfig, name: &'static str) -> Result<Self, SchedulerError> {
        let invalid = |message: String| SchedulerError::InvalidConfig {
            scheduler: name,
            message,
        };
        reject_unsupported_sigmas(cfg, name, true)?;
        let algorithm = match cfg.algorithm_type {
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => Algorithm::PlusPlus,
            AlgorithmType::DpmSolver => Algorithm::Noise,
            other => {
                return Err(invalid(format!(
                    "algorithm_type {other:?} (stochastic DPM-Solver) is not supported"
                )));
            }
        };
        if !(1..=3).contains(&cfg.solver_order) {
            return Err(invalid(format!(
                "solver_order = {} (DPM-Solver supports 1, 2 or 3)",
                cfg.solver_order
            )));
        }
        if matches!(
            cfg.variance_type,
            Some(super::config::VarianceType::Learned | super::config::VarianceType::LearnedRange)
        ) {
            return Err(invalid("learned variance_type is not supported".to_owned()));
        }
        let final_zero = cfg.final_sigmas_type == FinalSigmasType::Zero;
        // diffusers checks the algorithm as written, before mapping `deis`.
        let plus_as_written = cfg.algorithm_type == AlgorithmType::DpmSolverPlusPlus;
        if !plus_as_written && final_zero {
            return Err(invalid(format!(
                "final_sigmas_type \"zero\" is not supported for algorithm_type {:?}",
                cfg.algorithm_type
            )));
        }
        Ok(Self {
            order: cfg.solver_order,
            algorithm,
            heun: cfg.solver_type == SolverType::Heun,
            prediction: cfg.prediction_type,
            threshold: cfg
                .thresholding
                .then_some((cfg.dynamic_thresholding_ratio, cfg.sample_max_value)),
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_zero,
        })
    }
}
