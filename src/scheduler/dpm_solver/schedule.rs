//! The DPM-Solver schedule (`set_timesteps`: integer timesteps and float32 sigmas) and
//! the multistep schedule helpers UniPC shares: the refused sigma options, the
//! timestep spacings, Karras and interpolated sigmas.

use crate::scheduler::SchedulerError;
use crate::scheduler::common::{self, NoiseSchedule, ZeroSnrTail};
use crate::scheduler::config::{FinalSigmasType, ResolvedConfig, TimestepSpacing};

/// Refuses the sigma schedules and options diffusiond does not implement for the
/// multistep solvers (`karras_ok`: whether Karras sigmas are implemented).
pub(crate) fn reject_unsupported_sigmas(
    cfg: &ResolvedConfig,
    name: &'static str,
    karras_ok: bool,
) -> Result<(), SchedulerError> {
    let unsupported = [
        ("use_karras_sigmas", cfg.use_karras_sigmas && !karras_ok),
        ("use_exponential_sigmas", cfg.use_exponential_sigmas),
        ("use_beta_sigmas", cfg.use_beta_sigmas),
        ("use_lu_lambdas", cfg.use_lu_lambdas),
        ("use_flow_sigmas", cfg.use_flow_sigmas),
        ("use_dynamic_shifting", cfg.use_dynamic_shifting),
    ];
    match unsupported.iter().find(|(_, on)| *on) {
        Some((key, _)) => Err(SchedulerError::InvalidConfig {
            scheduler: name,
            message: format!("{key} = true is not supported"),
        }),
        None => Ok(()),
    }
}

/// `set_timesteps` of `DPMSolverMultistepScheduler`: (timesteps, float32 sigmas).
pub(super) fn dpm_schedule(
    cfg: &ResolvedConfig,
    n: usize,
    name: &'static str,
) -> Result<(Vec<f64>, Vec<f32>), SchedulerError> {
    let noise = NoiseSchedule::new(cfg, ZeroSnrTail::Floor)?;
    let train_sigmas = noise.train_sigmas();
    let last_timestep = cfg.num_train_timesteps - clipped_index(&noise, cfg.lambda_min_clipped);
    let timesteps = multistep_timesteps(cfg, last_timestep, n, name)?;
    let sigma_last = match cfg.final_sigmas_type {
        FinalSigmasType::SigmaMin => train_sigmas[0],
        FinalSigmasType::Zero => 0.0,
    };
    if cfg.use_karras_sigmas {
        let (timesteps, mut sigmas) = karras_schedule(cfg, &train_sigmas, n);
        sigmas.push(sigma_last);
        return Ok((timesteps, sigmas));
    }
    Ok(interpolated_schedule(&timesteps, &train_sigmas, sigma_last))
}

/// `torch.searchsorted(torch.flip(lambda_t), lambda_min_clipped)`: how many of the
/// smallest log-SNRs lie below the clipping threshold.
fn clipped_index(noise: &NoiseSchedule, lambda_min_clipped: f64) -> usize {
    if lambda_min_clipped == f64::NEG_INFINITY {
        return 0;
    }
    let threshold = lambda_min_clipped as f32;
    noise
        .alphas_cumprod
        .iter()
        .rev()
        .map(|&ac| ac.sqrt().ln() - (1.0 - ac).sqrt().ln())
        .take_while(|&lambda| lambda < threshold)
        .count()
}

/// The integer timestep schedule of the multistep solvers (DPM-Solver, UniPC), with
/// `last_timestep` the (clipped) end of the training range.
pub(crate) fn multistep_timesteps(
    cfg: &ResolvedConfig,
    last_timestep: usize,
    n: usize,
    name: &'static str,
) -> Result<Vec<i64>, SchedulerError> {
    let mut timesteps = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => common::linspace_timesteps_rounded(last_timestep, n + 1),
        TimestepSpacing::Leading => common::leading_timesteps(last_timestep, n + 1, 0),
        TimestepSpacing::Trailing if n == 0 => {
            return Err(SchedulerError::InvalidSteps {
                scheduler: name,
                steps: n,
                message: "trailing spacing needs at least one step".to_owned(),
            });
        }
        TimestepSpacing::Trailing => {
            return Ok(common::trailing_timesteps(
                last_timestep as f64,
                cfg.num_train_timesteps,
                n,
            ));
        }
    };
    timesteps.pop();
    if cfg.timestep_spacing == TimestepSpacing::Leading {
        timesteps
            .iter_mut()
            .for_each(|t| *t += cfg.steps_offset as i64);
    }
    Ok(timesteps)
}

/// Karras sigmas (float64, `n` of them) and their rounded timesteps.
///
/// `sigma_min`/`sigma_max` default to the extreme training sigmas, as `_convert_to_karras`.
pub(crate) fn karras_schedule(
    cfg: &ResolvedConfig,
    train_sigmas: &[f32],
    n: usize,
) -> (Vec<f64>, Vec<f32>) {
    let sigma_min = cfg.sigma_min.unwrap_or(f64::from(train_sigmas[0]));
    let sigma_max = cfg
        .sigma_max
        .unwrap_or(f64::from(train_sigmas[train_sigmas.len() - 1]));
    let sigmas = common::karras_sigmas(sigma_min, sigma_max, n);
    let log_sigmas = common::log_sigmas(train_sigmas);
    let round = cfg.beta_schedule != crate::scheduler::config::BetaSchedule::SquaredcosCapV2
        || cfg.class == crate::scheduler::config::SchedulerClass::UniPcMultistep;
    let timesteps = sigmas
        .iter()
        .map(|&s| {
            let t = common::sigma_to_t(s, &log_sigmas);
            // `.round()` (half to even), then `.to(torch.int64)` (truncation).
            if round {
                t.round_ties_even()
            } else {
                t.trunc()
            }
        })
        .collect();
    (timesteps, sigmas.iter().map(|&s| s as f32).collect())
}

/// Non-Karras sigmas: `np.interp(timesteps, arange, train_sigmas)` plus the final sigma.
pub(crate) fn interpolated_schedule(
    timesteps: &[i64],
    train_sigmas: &[f32],
    sigma_last: f32,
) -> (Vec<f64>, Vec<f32>) {
    let mut sigmas: Vec<f32> = timesteps
        .iter()
        .map(|&t| common::np_interp(t as f64, train_sigmas) as f32)
        .collect();
    sigmas.push(sigma_last);
    (timesteps.iter().map(|&t| t as f64).collect(), sigmas)
}
