//! The pipeline helpers that choose the flow schedulers' inputs: which pipeline drives
//! them, `calculate_shift`'s `mu`, FLUX's explicit sigmas and the img2img start.

use super::bad_steps;
use crate::scheduler::SchedulerError;
use crate::scheduler::common::np_linspace;

/// Which diffusers pipeline drives the scheduler: decides the explicit sigmas and `mu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowPipeline {
    /// `StableDiffusion3Pipeline` (and img2img): no explicit sigmas; `mu` only with
    /// `use_dynamic_shifting`.
    Sd3,
    /// `FluxPipeline` (and img2img): sigmas `linspace(1, 1/n, n)` and `mu` always.
    Flux,
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
