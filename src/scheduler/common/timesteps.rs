//! Timestep spacings (`leading`, `trailing`, `linspace`) as integer or float32
//! schedules, and the step-count check.

use super::numeric::{np_arange_f64, np_linspace};
use crate::scheduler::SchedulerError;
use crate::scheduler::config::{ResolvedConfig, TimestepSpacing};

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
