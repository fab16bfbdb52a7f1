//! diffusiond: Stable Diffusion ONNX pipelines on ONNX Runtime, served over D-Bus.
//!
//! The library holds every concept in its own module; the two binaries
//! (`diffusiond`, `diffusionctl`) are thin front ends over it.

pub mod rng;
pub mod runtime;
pub mod scheduler;
