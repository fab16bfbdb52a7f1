//! A `.safetensors` LoRA file: its table of tensors grouped into layers, and their data.
//!
//! The file is memory-mapped and its header parsed and validated by the `safetensors`
//! crate (offsets, sizes, a payload that exactly covers the tensors); only the pages of
//! the tensors a merge reads are ever touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use super::keys::{Component, KeyError, KeyFormat, KeyMapper, Part};
use super::targets::Weight;

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

/// A safetensors file, mapped: its header, and its tensors' bytes on demand.
#[derive(Debug, Clone)]
pub struct Header {
    /// The file read.
    pub path: PathBuf,
    /// Its tensors, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// `__metadata__` (string values, as the format defines it).
    pub metadata: BTreeMap<String, String>,
    /// Where the tensor payload starts (8 + the header's length).
    payload: usize,
    /// The mapped file.
    map: Arc<Mmap>,
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

impl Header {
    /// Maps the safetensors file at `path` and reads its header (not its tensors).
    pub fn read(path: &Path) -> Result<Header, FileError> {
        let io = |source| FileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |what: String| FileError::Header {
            path: path.to_path_buf(),
            what,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size < 8 {
            return Err(bad(format!("{size} bytes, too short for a header")));
        }
        // SAFETY: the map is read-only and private to this process. LoRA files live in
        // folders the operator configures (a caller never names a path); one truncated
        // while mapped would fault on access, as with any mapped model file.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (len, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(format!("{e}")))?;
        let payload = 8 + len;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (begin, end) = info.data_offsets;
            let info = TensorInfo {
                name: name.clone(),
                dtype: dtype_name(info.dtype),
                shape: info.shape.clone(),
                bytes: ((payload + begin) as u64, (payload + end) as u64),
            };
            tensors.insert(name, info);
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(Header {
            path: path.to_path_buf(),
            tensors,
            metadata,
            payload,
            map: Arc::new(map),
        })
    }

    /// A tensor's values as f32 (F32, F16 and BF16 tensors; others are refused).
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>, FileError> {
        let bytes = &self.map[info.bytes.0 as usize..info.bytes.1 as usize];
        let values = match info.dtype.as_str() {
            "F32" => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            "F16" => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            "BF16" => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(FileError::Header {
                    path: self.path.clone(),
                    what: format!(
                        "tensor {} is {other}; LoRA tensors must be F32, F16 or BF16",
                        info.name
                    ),
                });
            }
        };
        Ok(values)
    }

    /// A1111's short hash of the file (its "addnet" hash, written in `Lora hashes`): the
    /// SHA-256 of the tensor payload after the header, first 12 hex digits.
    pub fn addnet_hash(&self) -> String {
        let digest = Sha256::digest(&self.map[self.payload..]);
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
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
    /// The naming convention of its keys.
    pub format: KeyFormat,
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
    let mut formats: BTreeMap<(Component, String), KeyFormat> = BTreeMap::new();
    for (name, info) in &header.tensors {
        let key = mapper.map(name).map_err(|source| FileError::Key {
            path: path.clone(),
            source,
        })?;
        formats.insert((key.component, key.module.clone()), key.format);
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
        let format = formats[&(component, module.clone())];
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
            format,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
