//! Seeded Gaussian noise streams that reproduce the Python reference pipelines.
//!
//! * [`TorchGenerator`]: `torch.Generator("cpu").manual_seed(seed)` followed by
//!   `torch.randn(shape, generator=g, dtype=torch.float32)`.
//! * [`NumpyRandomState`]: `np.random.RandomState(seed).randn(*shape)` cast to `float32`.

/// A source of standard-normal noise. One call fills one whole tensor, because the
/// reference generators draw differently depending on the element count.
pub trait NoiseSource: Send {
    /// Fills `out` exactly as one `randn(shape)` call with `numel(shape) == out.len()` would.
    fn fill_randn(&mut self, out: &mut [f32]);
}
