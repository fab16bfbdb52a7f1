//! A LoRA set applied to one model folder: every layer of every file mapped to the graph
//! initializer it changes, the merged weights W + Σ scaleᵢ·(alphaᵢ/rankᵢ)·BᵢAᵢ computed
//! in f32 and cast once to the graph's type, ready to hand to ONNX Runtime as initializer
//! overrides ([`Overrides`]). The graph files are never rewritten, and only the touched
//! initializers are held in memory.
//! The files are read and matched to the graph first ([`super::plan`]).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use ort::value::{DynValue, Tensor};

use crate::runtime::Replacements;

use super::file::FileError;
use super::keys::{Component, KeyError};
use super::merge::{Delta, add_delta, factor};
use super::onnx_graph::{GraphError, TensorData, data_type};
use super::plan::plan;
use super::targets::{Layout, TargetError, Weight};

/// One LoRA file of a set, with its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Its name: the file name without `.safetensors`.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The multiplier of its delta.
    pub scale: f64,
}

impl LoraSpec {
    /// A spec for a file, named by its stem.
    pub fn from_path(path: &Path, scale: f64) -> LoraSpec {
        let name = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        LoraSpec {
            name,
            path: path.to_path_buf(),
            scale,
        }
    }
}

/// Why a LoRA set could not be applied. Nothing is applied in part: any error refuses
/// the whole set.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file could not be read, or its layers are malformed.
    #[error(transparent)]
    File(#[from] FileError),
    /// A model graph could not be read.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The model's UNet config could not be read (needed for SGM block names).
    #[error(transparent)]
    Config(#[from] KeyError),
    /// The file has no LoRA layer at all.
    #[error("{path}: holds no LoRA layers")]
    Empty {
        /// The LoRA file.
        path: PathBuf,
    },
    /// The file has layers for a component the model does not have.
    #[error(
        "{path}: has layers for {component}, which the model {model} does not have (a LoRA for another architecture)"
    )]
    NoComponent {
        /// The LoRA file.
        path: PathBuf,
        /// The component's folder name.
        component: &'static str,
        /// The model folder.
        model: PathBuf,
    },
    /// A key names a module the model has no weight for.
    #[error(
        "{path}: key {key} names {module} in {component}, which the model has no weight for (is the LoRA for another base model?)"
    )]
    NoWeight {
        /// The LoRA file.
        path: PathBuf,
        /// The key (its down tensor).
        key: String,
        /// The component's folder name.
        component: &'static str,
        /// The module path the key maps to.
        module: String,
    },
    /// A key's weight cannot take a delta (an initializer shared with other modules).
    #[error("{path}: key {key}: {source}")]
    Target {
        /// The LoRA file.
        path: PathBuf,
        /// The key (its down tensor).
        key: String,
        /// Why (boxed: it names modules and initializers).
        source: Box<TargetError>,
    },
    /// The file's alphas or ranks leave the scale undefined.
    #[error("{path}: {what}")]
    Alpha {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A weight of the graph could not be read or written back.
    #[error("{graph}: initializer {initializer}: {what}")]
    Weight {
        /// The graph file.
        graph: PathBuf,
        /// The initializer.
        initializer: String,
        /// What is wrong.
        what: String,
    },
}

/// A LoRA file as applied: what A1111's infotext records of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Its name (the file name without `.safetensors`).
    pub name: String,
    /// Its scale.
    pub scale: f64,
    /// Its A1111 short hash ([`Header::addnet_hash`]).
    pub hash: String,
}

/// Merged weights for one model folder, by component folder: (initializer name, value)
/// pairs for ONNX Runtime's `AddInitializer`, and the files they came from.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    by_folder: BTreeMap<String, Replacements>,
    bytes: u64,
    applied: Vec<Applied>,
}

impl Overrides {
    /// No overrides: the base model.
    pub fn none() -> Overrides {
        Overrides::default()
    }

    /// The overrides of one component folder (`unet`, `text_encoder`, …).
    pub fn for_folder(&self, folder: &str) -> &Replacements {
        self.by_folder.get(folder).unwrap_or(Replacements::NONE)
    }

    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self.by_folder.is_empty()
    }

    /// The bytes the merged weights hold (what a loaded LoRA set costs on top of the
    /// base model's sessions, before ONNX Runtime's own copies).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many initializers are overridden.
    pub fn len(&self) -> usize {
        self.by_folder.values().map(|r| r.initializers.len()).sum()
    }

    /// The LoRA files merged, in the order given.
    pub fn applied(&self) -> &[Applied] {
        &self.applied
    }
}

/// Reads every file of `loras` and merges them into the weights of the model folder
/// `model_dir` (Optimum's layout: `unet/model.onnx`, `text_encoder/model.onnx`, …).
/// ONNX Runtime must be loaded (`Runtime::init`): the merged weights are its tensors.
pub fn prepare(model_dir: &Path, loras: &[LoraSpec]) -> Result<Overrides, LoraError> {
    merge_all(model_dir, loras, true)
}

/// A deliberately wrong merge, for the parity tests' control: every MatMul weight (stored
/// pre-transposed, [in, out]) takes the delta laid out as torch's [out, in].
#[doc(hidden)]
pub fn prepare_untransposed(model_dir: &Path, loras: &[LoraSpec]) -> Result<Overrides, LoraError> {
    merge_all(model_dir, loras, false)
}

fn merge_all(
    model_dir: &Path,
    loras: &[LoraSpec],
    transpose: bool,
) -> Result<Overrides, LoraError> {
    if loras.is_empty() {
        return Ok(Overrides::none());
    }
    let plan = plan(model_dir, loras)?;
    let mut merged: BTreeMap<(Component, String), (&Weight, Vec<f32>)> = BTreeMap::new();
    let mut row = Vec::new();
    for file in &plan.files {
        for ((layer, &alpha), weight) in file.layers.iter().zip(&file.alphas).zip(&file.weights) {
            let component = layer.component;
            let key = (component, weight.initializer.clone());
            if !merged.contains_key(&key) {
                let base = read_weight(&plan.graphs[&component], weight)?;
                merged.insert(key.clone(), (weight, base));
            }
            let (weight, values) = merged.get_mut(&key).expect("inserted above");
            let up = file.header.tensor_f32(&layer.up)?;
            let down = file.header.tensor_f32(&layer.down)?;
            let delta = Delta {
                out: layer.up.shape[0],
                rank: layer.rank,
                rest: down.len() / layer.rank,
                up: &up,
                down: &down,
                factor: factor(file.spec.scale, alpha, layer.rank),
            };
            let layout = if transpose {
                weight.layout
            } else {
                Layout::AsTorch
            };
            add_delta(values, layout, &delta, &mut row);
        }
    }

    let mut out = Overrides::none();
    out.applied = plan
        .files
        .iter()
        .map(|f| Applied {
            name: f.spec.name.clone(),
            scale: f.spec.scale,
            hash: f.header.addnet_hash(),
        })
        .collect();
    for ((component, name), (weight, values)) in merged {
        let graph = &plan.graphs[&component];
        let (value, bytes) = to_value(graph, weight, values)?;
        out.bytes += bytes;
        let folder = out
            .by_folder
            .entry(component.folder().to_string())
            .or_default();
        folder.conv_weights |= weight.op_type == "Conv";
        folder.float16 |= weight.data_type == data_type::FLOAT16;
        folder.initializers.push((name, Arc::new(value)));
    }
    Ok(out)
}

/// Reads an initializer's values as f32 from the graph file or its external data file.
fn read_weight(graph: &Path, weight: &Weight) -> Result<Vec<f32>, LoraError> {
    let bad = |what: String| LoraError::Weight {
        graph: graph.to_path_buf(),
        initializer: weight.initializer.clone(),
        what,
    };
    let count: usize = weight
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("dimension {d}"))))
        .product::<Result<usize, _>>()?;
    let elem = match weight.data_type {
        data_type::FLOAT => 4,
        data_type::FLOAT16 => 2,
        t => {
            return Err(bad(format!(
                "data type {t}: LoRA merges into float and float16 weights only"
            )));
        }
    };
    let want = (count * elem) as u64;
    let (file, offset, len) = match &weight.data {
        TensorData::Raw { offset, len } => (graph.to_path_buf(), *offset, *len),
        TensorData::Typed {
            field: 4,
            offset,
            len,
        } if weight.data_type == data_type::FLOAT => (graph.to_path_buf(), *offset, *len),
        TensorData::External {
            location,
            offset,
            length,
        } => {
            let rel = Path::new(location);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(bad(format!(
                    "external data location {location} leaves the model folder"
                )));
            }
            let dir = graph.parent().unwrap_or(Path::new("."));
            (dir.join(rel), *offset, length.unwrap_or(want))
        }
        other => return Err(bad(format!("data stored as {other:?} is not supported"))),
    };
    if len != want {
        return Err(bad(format!(
            "{len} bytes of data for {count} values of {elem} bytes"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    let io = |e: std::io::Error| bad(format!("{}: {e}", file.display()));
    let mut f = std::fs::File::open(&file).map_err(io)?;
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    f.read_exact(&mut bytes).map_err(io)?;
    Ok(if elem == 4 {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    })
}

/// The merged values as a tensor of the initializer's shape and type (f16 rounded once
/// from the f32 sum), with its size in bytes.
fn to_value(graph: &Path, weight: &Weight, values: Vec<f32>) -> Result<(DynValue, u64), LoraError> {
    let bad = |what: String| LoraError::Weight {
        graph: graph.to_path_buf(),
        initializer: weight.initializer.clone(),
        what,
    };
    let dims = weight.dims.clone();
    Ok(match weight.data_type {
        data_type::FLOAT16 => {
            let v: Vec<f16> = values.into_iter().map(f16::from_f32).collect();
            let bytes = (v.len() * 2) as u64;
            let t = Tensor::from_array((dims, v)).map_err(|e| bad(e.to_string()))?;
            (t.into_dyn(), bytes)
        }
        _ => {
            let bytes = (values.len() * 4) as u64;
            let t = Tensor::from_array((dims, values)).map_err(|e| bad(e.to_string()))?;
            (t.into_dyn(), bytes)
        }
    })
}
