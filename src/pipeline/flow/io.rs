//! The host buffers the flow transformers run on, shared by the families.
//!
//! A generation allocates its buffers once ([`super::Denoiser::prepare`]); a denoising step
//! only refills them. For an all-f32 graph they are ONNX Runtime tensors bound with an
//! [`ort::session::IoBinding`]: the conditioning tensors are the encoders' arrays moved in
//! (no copy) and bound once, the latents and the timestep are written into the bound
//! inputs in place, and the prediction is read from the bound output in place. Graphs with
//! other element types (fp16) run with their inputs converted per run
//! ([`super::super::components`]' `float_input`), on the same host arrays.
//!
//! The helpers here copy or combine values and never change them: classifier-free
//! guidance is `u + g·(t − u)` in f32 as diffusers computes it, element by element.

use ndarray::{Array, Dimension};
use ort::memory::Allocator;
use ort::value::{DynTensor, Tensor};

use crate::model::signature::{Elem, Spec};
use crate::pipeline::PipelineError;

/// How ONNX Runtime's errors are reported (`components::ort_err` of the graph's path).
pub(super) type Err<'a> = &'a dyn Fn(ort::Error) -> PipelineError;

/// A zeroed f32 tensor of `dims` in host memory (ONNX Runtime's default allocator), to
/// bind as an input or an output.
pub(super) fn host_tensor(dims: &[usize], err: Err<'_>) -> Result<Tensor<f32>, PipelineError> {
    Tensor::<f32>::new(&Allocator::default(), dims.to_vec()).map_err(err)
}

/// An f32 array moved into a tensor: its buffer becomes the tensor's, without a copy
/// (standard layout; another layout is copied once).
pub(super) fn owned_tensor<D: Dimension + 'static>(
    a: Array<f32, D>,
    err: Err<'_>,
) -> Result<Tensor<f32>, PipelineError> {
    Tensor::from_array(a).map_err(err)
}

/// An ids tensor (FLUX's `img_ids`, `txt_ids`) as the graph declares it: int64 (Optimum's
/// export) or f32, made once per generation.
pub(super) fn ids_tensor(
    a: ndarray::Array2<f32>,
    int: bool,
    err: Err<'_>,
) -> Result<DynTensor, PipelineError> {
    Ok(if int {
        Tensor::from_array(a.mapv(|v| v as i64))
            .map_err(err)?
            .upcast()
    } else {
        Tensor::from_array(a).map_err(err)?.upcast()
    })
}

/// Whether every tensor a graph exchanges on the float side is f32 (then its buffers are
/// bound in place).
pub(super) fn all_f32<'a>(specs: impl IntoIterator<Item = &'a Spec>) -> bool {
    specs.into_iter().all(|s| s.elem == Elem::F32)
}

/// Fills `dst` with copies of `src` one after the other (the classifier-free batch: the
/// latents once per half). `dst.len()` is a multiple of `src.len()`.
pub(super) fn repeat_into(dst: &mut [f32], src: &[f32]) {
    debug_assert!(!src.is_empty() && dst.len().is_multiple_of(src.len()));
    for chunk in dst.chunks_exact_mut(src.len()) {
        chunk.copy_from_slice(src);
    }
}

/// Classifier-free guidance into `out`: `u + g·(t − u)` for the unconditional `u` and the
/// text-conditioned `t` prediction, element by element in f32.
pub(super) fn guide(uncond: &[f32], text: &[f32], g: f32, out: &mut [f32]) {
    debug_assert!(uncond.len() == out.len() && text.len() == out.len());
    for ((o, &u), &t) in out.iter_mut().zip(uncond).zip(text) {
        *o = u + g * (t - u);
    }
}

/// Classifier-free guidance in place of the text-conditioned prediction `text`:
/// `u + g·(t − u)` with the unconditional `uncond` (FLUX's true CFG).
pub(super) fn guide_in_place(text: &mut [f32], uncond: &[f32], g: f32) {
    debug_assert_eq!(text.len(), uncond.len());
    for (t, &u) in text.iter_mut().zip(uncond) {
        *t = u + g * (*t - u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_is_diffusers_expression_and_the_batch_repeats() {
        let (u, t) = ([0.25f32, -1.5, 3.0], [1.0f32, 2.0, -0.125]);
        let g = 7.0f32;
        let mut out = [0.0f32; 3];
        guide(&u, &t, g, &mut out);
        let mut inplace = t;
        guide_in_place(&mut inplace, &u, g);
        for i in 0..3 {
            let mut want = u[i];
            want += g * (t[i] - want);
            assert_eq!(out[i].to_bits(), want.to_bits());
            assert_eq!(inplace[i].to_bits(), want.to_bits());
        }
        let mut batch = [0.0f32; 6];
        repeat_into(&mut batch, &u);
        assert_eq!(batch, [0.25, -1.5, 3.0, 0.25, -1.5, 3.0]);
    }
}
