//! LoRA support: which initializer of an exported ONNX graph each layer of a LoRA file
//! changes, how, and the merged weights a LoRA set gives.
//!
//! What exists:
//! - [`onnx_graph`]: a streaming reader of an ONNX model's nodes and initializers that
//!   records where tensor data lies (inside the `.onnx` file or in external data files)
//!   without loading it.
//! - [`targets`]: [`WeightMap`], from a diffusers module path
//!   (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
//!   `text_model.encoder.layers.0.self_attn.q_proj`) to the initializer holding its
//!   weight, its shape and data type, and whether it holds torch's weight as is (Conv,
//!   Gemm with `transB`) or transposed (MatMul); initializers the exporter shared between
//!   modules are detected and refused.
//! - [`keys`]: LoRA tensor names (kohya/sd-scripts, including SDXL's SGM block names mapped
//!   by the model's own UNet config, and PEFT/diffusers) to (component, module path,
//!   down/up/alpha); LyCORIS types and DoRA are refused by name.
//! - [`file`]: a `.safetensors` LoRA file's header (names, dtypes, shapes, byte ranges,
//!   metadata) grouped into [`LoraLayer`]s (down, up, alpha per module) with rank checks,
//!   and [`LoraLayer::check_fits`] against the model's weight.
//! - [`catalog`]: LoRA files by name, from the configured folders or the command line.
//! - [`describe`]: what `ListLoras` says of a file (hash, base model, trigger words, fit).
//! - [`merge`]: W += scale·(alpha/rank)·B@A over f32 slices, in the stored layout.
//! - [`plan`]: a LoRA set's files read and every layer matched to its weight, checked
//!   (the dry run `ListLoras` reports as `fits`).
//! - [`apply`]: a LoRA set read and merged for one model folder into [`Overrides`], the
//!   initializers ONNX Runtime replaces at session build (`AddInitializer`); alphas follow
//!   kohya and diffusers where they agree and are refused where diffusers guesses.

pub mod apply;
pub mod catalog;
pub mod describe;
pub mod file;
pub mod keys;
pub mod merge;
pub mod onnx_graph;
pub mod plan;
pub mod targets;

pub use apply::{Applied, LoraError, LoraSpec, Overrides, prepare};
pub use catalog::{LoraCatalog, LoraEntry, LoraShelf};
pub use file::{FileError, Header, LoraLayer, TensorInfo, layers};
pub use keys::{Component, KeyError, KeyFormat, KeyMapper, LoraKey, Part, UnetBlocks};
pub use onnx_graph::{Graph, GraphError, Initializer, Node, TensorData};
pub use plan::check;
pub use targets::{Layout, TargetError, Weight, WeightMap};
