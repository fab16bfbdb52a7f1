//! Helpers of a scheduler's `step`: the shape and step-index checks, elementwise
//! updates and noise draws.

use ndarray::{ArrayD, ArrayViewD, Zip};

use crate::scheduler::SchedulerError;

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
