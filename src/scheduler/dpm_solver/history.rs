//! Step plumbing the multistep solvers (DPM-Solver, UniPC) share: the step-index and
//! shape check, the contiguous-layout guard and the model-output history.

use ndarray::ArrayD;

use crate::scheduler::SchedulerError;

/// Validates the step index (must be the next one) and the tensor shapes.
pub(crate) fn check_step(
    scheduler: &'static str,
    step_index: usize,
    expected: usize,
    num_steps: usize,
    model_output: &[usize],
    sample: &[usize],
) -> Result<(), SchedulerError> {
    let bad = |message: String| SchedulerError::BadStep {
        scheduler,
        step_index,
        message,
    };
    if step_index >= num_steps {
        return Err(bad(format!("only {num_steps} steps are scheduled")));
    }
    if step_index != expected {
        return Err(bad(format!(
            "steps must run in order; expected step {expected}"
        )));
    }
    if model_output != sample {
        return Err(bad(format!(
            "model output shape {model_output:?} differs from sample shape {sample:?}"
        )));
    }
    Ok(())
}

/// Makes `a` C-contiguous (a no-op for the latents the pipeline passes).
pub(crate) fn make_standard_layout(a: &mut ArrayD<f32>) {
    if !a.is_standard_layout() {
        *a = a.as_standard_layout().into_owned();
    }
}

/// The last `solver_order` converted model outputs, oldest first, in buffers
/// allocated once (on the first step, when the latent shape is known).
#[derive(Debug, Clone)]
pub(crate) struct History {
    capacity: usize,
    buffers: Vec<ArrayD<f32>>,
}

impl History {
    /// An empty history of `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            buffers: Vec::with_capacity(capacity),
        }
    }

    /// Drops the oldest entry and returns the buffer for the newest one (stale content).
    pub fn rotate(&mut self, shape: &[usize]) -> &mut ArrayD<f32> {
        if self.buffers.first().is_none_or(|b| b.shape() != shape) {
            self.buffers = (0..self.capacity).map(|_| ArrayD::zeros(shape)).collect();
        }
        self.buffers.rotate_left(1);
        self.buffers.last_mut().expect("capacity >= 1")
    }

    /// Swaps `buffer` in as the newest entry; `buffer` receives the dropped oldest one.
    pub fn push_swap(&mut self, buffer: &mut ArrayD<f32>) {
        let slot = self.rotate(buffer.shape());
        std::mem::swap(slot, buffer);
    }

    /// The newest `k` entries as flat slices, newest first (`m0, m1, ...`).
    pub fn newest(&self, k: usize) -> Vec<&[f32]> {
        self.buffers
            .iter()
            .rev()
            .take(k)
            .map(|b| b.as_slice().expect("history buffers are contiguous"))
            .collect()
    }
}
