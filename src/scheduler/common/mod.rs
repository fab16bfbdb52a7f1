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
//!
//! Every item is re-exported here; by concern they live in `numeric.rs` (the numpy and
//! torch primitives), `noise.rs` (betas and `alphas_cumprod`), `timesteps.rs` (timestep
//! spacings), `sigmas.rs` (sigma schedules and input scaling), `step.rs` (step checks
//! and elementwise helpers) and `clip.rs` (clipping and dynamic thresholding).

mod clip;
mod noise;
mod numeric;
mod sigmas;
mod step;
mod timesteps;

#[cfg(test)]
mod tests;

pub use clip::{X0Clip, clip_sample, threshold_sample};
pub use noise::{
    NoiseSchedule, ZeroSnrTail, betas_for_alpha_bar, rescale_zero_terminal_snr, torch_cumprod_f32,
};
pub use numeric::{
    log_f32, np_arange_f64, np_interp, np_linspace, np_linspace_no_endpoint, torch_linspace_f32,
};
pub use sigmas::{
    SigmaSpacing, euler_init_noise_sigma, exponential_sigmas, input_scale_divisor, interp_sigmas,
    karras_sigmas, log_sigmas, scale_by_sigma, sigma_to_t,
};
pub use step::{check_shapes, check_step_index, draw_noise, zip_update};
pub use timesteps::{
    check_steps, leading_timesteps, linspace_timesteps_f32, linspace_timesteps_rounded,
    spaced_timesteps_f32, spaced_timesteps_i64, trailing_timesteps,
};
