//! LoRA support (issue 23), first building block: which initializer of an exported ONNX
//! graph each layer of a LoRA file changes, and how.
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
//!
//! Still to come for issue 23:
//! - reading the tensors' data (the `safetensors` crate, memory-mapped; the header is
//!   parsed here with serde_json) and the initializers' data from the graph (inside the
//!   `.onnx` file or its external data files);
//! - a key that names no weight of the model is an error naming the key: the caller
//!   looks each [`LoraLayer`] up with [`WeightMap::get`];
//! - alpha conventions: a missing alpha means alpha = rank (kohya); diffusers' handling
//!   of files mixing ranks without metadata;
//! - merging W + scale·(alpha/rank)·B@A in f32 (transposed for [`Layout::Transposed`]
//!   weights; a 3×3 conv LoRA composed as peft's `get_delta_weight` does), cast once to
//!   the graph's dtype;
//! - handing the merged initializers to ONNX Runtime through ort's
//!   `SessionBuilder::with_initializer`, one session per LoRA set;
//! - the daemon's `loras` request key and `ListLoras` method, `<lora:NAME:WEIGHT>` in the
//!   a1111 prompt syntax, and `diffusionctl --lora`.

pub mod file;
pub mod keys;
pub mod onnx_graph;
pub mod targets;

pub use file::{FileError, Header, LoraLayer, TensorInfo, layers};
pub use keys::{Component, KeyError, KeyFormat, KeyMapper, LoraKey, Part, UnetBlocks};
pub use onnx_graph::{Graph, GraphError, Initializer, Node, TensorData};
pub use targets::{Layout, TargetError, Weight, WeightMap};
