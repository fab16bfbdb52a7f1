//! A `.safetensors` LoRA file's table of tensors, grouped into layers.
//!
//! Only the header is read: an 8-byte little-endian length, then that many bytes of JSON
//! (`{"name": {"dtype": "F16", "shape": [4, 32], "data_offsets": [0, 256]}, …,
//! "__metadata__": {…}}`), offsets counted from the end of the header. Parsed with
//! serde_json, which the tree has; the `safetensors` crate will read the tensors
//! themselves (memory-mapped) when the merge is written.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::keys::{Component, KeyError, KeyMapper, Part};
use super::targets::Weight;

/// Headers larger than this are refused (real LoRA headers are well under 1 MB).
const MAX_HEADER: u64 = 100 << 20;

/// An error reading a LoRA file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The LoRA file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The safetensors header is malformed.
    #[error("{path}: not a valid safetensors file: {what}")]
    Header {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A key could not be mapped.
    #[error("{path}: {source}")]
    Key {
        /// The LoRA file.
        path: PathBuf,
        /// Why.
        source: KeyError,
    },
    /// A layer's tensors do not make a LoRA layer, or do not fit the model's weight.
    #[error("{path}: layer {module} ({component}): {what}")]
    Layer {
        /// The LoRA file.
        path: PathBuf,
        /// The model component's folder name.
        component: &'static str,
        /// The module path.
        module: String,
        /// What is wrong.
        what: String,
    },
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its key.
    pub name: String,
    /// Its safetensors dtype (`F32`, `F16`, `BF16`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes: [start, end) in the file (absolute).
    pub bytes: (u64, u64),
}

/// The header of a safetensors file.
#[derive(Debug, Clone)]
pub struct Header {
    /// The file read.
    pub path: PathBuf,
    /// Its tensors, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// `__metadata__`, string values only.
    pub metadata: BTreeMap<String, String>,
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

impl Header {
    /// Reads the header of the safetensors file at `path` (not its tensors).
    pub fn read(path: &Path) -> Result<Header, FileError> {
        let io = |source| FileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |what: String| FileError::Header {
            path: path.to_path_buf(),
            what,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad(format!("{size} bytes, too short for a header")))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER || len > size - 8 {
            return Err(bad(format!(
                "header length {len} in a file of {size} bytes"
            )));
        }
        let mut json = vec![0u8; len as usize];
        file.read_exact(&mut json).map_err(io)?;
        let value: Value =
            serde_json::from_slice(&json).map_err(|e| bad(format!("header JSON: {e}")))?;
        let Value::Object(entries) = value else {
            return Err(bad("the header is not a JSON object".into()));
        };
        let data_start = 8 + len;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                if let Value::Object(m) = entry {
                    for (k, v) in m {
                        if let Value::String(v) = v {
                            metadata.insert(k, v);
                        }
                    }
                }
                continue;
            }
            let field = |f: &str| {
                entry
                    .get(f)
                    .ok_or_else(|| bad(format!("tensor {name} has no {f}")))
            };
            let dtype = field("dtype")?
                .as_str()
                .ok_or_else(|| bad(format!("tensor {name}: dtype is not a string")))?
                .to_string();
            let numbers = |f: &str| -> Result<Vec<u64>, FileError> {
                field(f)?
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(format!("tensor {name}: {f} is not a list of numbers")))
            };
            let shape = numbers("shape")?;
            let offsets = numbers("data_offsets")?;
            let [begin, end] = offsets[..] else {
                return Err(bad(format!(
                    "tensor {name}: data_offsets is not [begin, end]"
                )));
            };
            let elem = dtype_size(&dtype)
                .ok_or_else(|| bad(format!("tensor {name}: unknown dtype {dtype}")))?;
            let expected = shape.iter().try_fold(elem, |acc, &d| acc.checked_mul(d));
            if end < begin || expected != Some(end - begin) || data_start + end > size {
                return Err(bad(format!(
                    "tensor {name}: {dtype} {shape:?} does not fit bytes {begin}..{end} of a {} byte payload",
                    size - data_start
                )));
            }
            let shape = shape.into_iter().map(|d| d as usize).collect();
            let info = TensorInfo {
                name: name.clone(),
                dtype,
                shape,
                bytes: (data_start + begin, data_start + end),
            };
            tensors.insert(name, info);
        }
        Ok(Header {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }
}

/// One LoRA layer: the down (A) and up (B) tensors of one module, and its alpha.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraLayer {
    /// The model it applies to.
    pub component: Component,
    /// The diffusers module path.
    pub module: String,
    /// A: [rank, in] or [rank, in, kh, kw].
    pub down: TensorInfo,
    /// B: [out, rank] or [out, rank, 1, 1].
    pub up: TensorInfo,
    /// The scalar alpha, when the file has one (kohya's convention: absent means rank).
    pub alpha: Option<TensorInfo>,
    /// The rank: A's first dimension, B's second.
    pub rank: usize,
}

impl LoraLayer {
    /// The torch weight shape the layer's delta B@A has: [out, in] or [out, in, kh, kw].
    pub fn delta_shape(&self) -> Vec<usize> {
        let mut shape = vec![self.up.shape[0], self.down.shape[1]];
        shape.extend_from_slice(&self.down.shape[2..]);
        shape
    }

    /// Checks the delta's shape against the model's weight for this module.
    pub fn check_fits(&self, weight: &Weight, path: &Path) -> Result<(), FileError> {
        let torch: Vec<usize> = weight.torch_shape().iter().map(|&d| d as usize).collect();
        // A Linear LoRA on a 1×1 conv (or the reverse) differs only by trailing 1s.
        let trim = |s: &[usize]| -> Vec<usize> {
            let mut s = s.to_vec();
            while s.len() > 2 && s.last() == Some(&1) {
                s.pop();
            }
            s
        };
        if trim(&self.delta_shape()) != trim(&torch) {
            return Err(self.error(
                path,
                format!(
                    "the LoRA's delta is {:?}, the model's weight {} is {:?}",
                    self.delta_shape(),
                    weight.initializer,
                    torch
                ),
            ));
        }
        Ok(())
    }

    fn error(&self, path: &Path, what: String) -> FileError {
        FileError::Layer {
            path: path.to_path_buf(),
            component: self.component.folder(),
            module: self.module.clone(),
            what,
        }
    }
}

/// Groups a file's tensors into layers, mapping every key with `mapper`; refuses a file
/// where a key is unknown, a layer lacks its down or up tensor, a module appears under
/// two names, or ranks and shapes disagree.
pub fn layers(header: &Header, mapper: &KeyMapper) -> Result<Vec<LoraLayer>, FileError> {
    let path = &header.path;
    type Parts = BTreeMap<Part, TensorInfo>;
    let mut modules: BTreeMap<(Component, String), Parts> = BTreeMap::new();
    for (name, info) in &header.tensors {
        let key = mapper.map(name).map_err(|source| FileError::Key {
            path: path.clone(),
            source,
        })?;
        let parts = modules
            .entry((key.component, key.module.clone()))
            .or_default();
        if let Some(other) = parts.insert(key.part, info.clone()) {
            return Err(FileError::Layer {
                path: path.clone(),
                component: key.component.folder(),
                module: key.module,
                what: format!("keys {} and {name} name the same tensor", other.name),
            });
        }
    }
    let mut out = Vec::new();
    for ((component, module), mut parts) in modules {
        let error = |what: String| FileError::Layer {
            path: path.clone(),
            component: component.folder(),
            module: module.clone(),
            what,
        };
        let mut take = |part: Part, what: &str| {
            parts
                .remove(&part)
                .ok_or_else(|| error(format!("no {what} tensor")))
        };
        let down = take(Part::Down, "down (lora_down / lora_A)")?;
        let up = take(Part::Up, "up (lora_up / lora_B)")?;
        let alpha = parts.remove(&Part::Alpha);
        let conv = down.shape.len() == 4;
        if !(down.shape.len() == 2 || conv) || up.shape.len() != down.shape.len() {
            return Err(error(format!(
                "down {:?} and up {:?} are not a LoRA pair",
                down.shape, up.shape
            )));
        }
        let rank = down.shape[0];
        if up.shape[1] != rank || rank == 0 || (conv && up.shape[2..] != [1, 1]) {
            return Err(error(format!(
                "down {} {:?} and up {} {:?} disagree on the rank",
                down.name, down.shape, up.name, up.shape
            )));
        }
        if let Some(a) = &alpha
            && a.shape.iter().product::<usize>() != 1
        {
            return Err(error(format!(
                "alpha {} has shape {:?}, not a scalar",
                a.name, a.shape
            )));
        }
        out.push(LoraLayer {
            component,
            module,
            down,
            up,
            alpha,
            rank,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
