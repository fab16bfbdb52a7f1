//! Array helpers of the pipeline: finiteness checks, row repeats, shape errors.

use ndarray::{ArrayD, Axis, concatenate};

use super::PipelineError;

/// Whether every value is finite (one pass, no allocation).
pub(super) fn all_finite(a: ndarray::ArrayViewD<'_, f32>) -> bool {
    match a.as_slice_memory_order() {
        Some(s) => s.iter().all(|x| x.is_finite()),
        None => a.iter().all(|x| x.is_finite()),
    }
}

/// Repeats each row of a batch `n` times, consecutively (`repeat_interleave`).
pub(super) fn repeat_rows(a: ndarray::ArrayViewD<'_, f32>, n: usize) -> ArrayD<f32> {
    let views: Vec<_> = a
        .axis_iter(Axis(0))
        .flat_map(|row| std::iter::repeat_n(row.insert_axis(Axis(0)), n))
        .collect();
    concatenate(Axis(0), &views).unwrap_or_else(|_| a.to_owned())
}

pub(super) fn shape_err(e: ndarray::ShapeError) -> PipelineError {
    PipelineError::Inference {
        component: "pipeline".into(),
        message: e.to_string(),
    }
}
