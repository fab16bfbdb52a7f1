//! The planning half of applying a LoRA set: every file read (its header, its layers
//! and their alphas) and every layer matched to the graph weight it changes, with its
//! shape checked, without reading any tensor data. [`super::apply`] merges a plan;
//! [`check`] is the dry run `ListLoras` reports as `fits`.
//!
//! Alphas follow the file's convention where kohya and diffusers agree, and are refused
//! where diffusers would guess ([`layer_alphas`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::apply::{LoraError, LoraSpec};
use super::file::{Header, LoraLayer, layers};
use super::keys::{Component, KeyFormat, KeyMapper, UnetBlocks};
use super::onnx_graph::Graph;
use super::targets::{Layout, TargetError, Weight, WeightMap};

/// One file of a set, read and matched to the model.
pub(super) struct PlannedFile {
    pub(super) spec: LoraSpec,
    pub(super) header: Header,
    pub(super) layers: Vec<LoraLayer>,
    /// Each layer's alpha.
    pub(super) alphas: Vec<f64>,
    /// Each layer's weight in the graph.
    pub(super) weights: Vec<Weight>,
}

/// A LoRA set matched to a model folder.
pub(super) struct Plan {
    pub(super) files: Vec<PlannedFile>,
    /// The graph file of each component the set touches.
    pub(super) graphs: BTreeMap<Component, PathBuf>,
}

/// Reads every file of `loras` and matches each layer to the weight it changes in the
/// model folder `model_dir`: an unknown key, a component the model lacks, a weight shared
/// by two modules, a shape that does not fit, an undefined alpha: each refuses the set.
pub(super) fn plan(model_dir: &Path, loras: &[LoraSpec]) -> Result<Plan, LoraError> {
    let config = model_dir.join("unet").join("config.json");
    let unet = if config.exists() {
        Some(UnetBlocks::from_config_file(&config)?)
    } else {
        None
    };
    let mapper = KeyMapper::new(unet);
    let mut maps: BTreeMap<Component, WeightMap> = BTreeMap::new();
    let mut graphs: BTreeMap<Component, PathBuf> = BTreeMap::new();
    let mut files = Vec::with_capacity(loras.len());
    for spec in loras {
        let path = &spec.path;
        let header = Header::read(path)?;
        let layers = layers(&header, &mapper)?;
        if layers.is_empty() {
            return Err(LoraError::Empty { path: path.clone() });
        }
        let alphas = layer_alphas(&header, &layers)?;
        let mut weights = Vec::with_capacity(layers.len());
        for layer in &layers {
            let component = layer.component;
            if let std::collections::btree_map::Entry::Vacant(slot) = maps.entry(component) {
                let graph_path = model_dir.join(component.folder()).join("model.onnx");
                if !graph_path.exists() {
                    return Err(LoraError::NoComponent {
                        path: path.clone(),
                        component: component.folder(),
                        model: model_dir.to_path_buf(),
                    });
                }
                slot.insert(WeightMap::from_graph(&Graph::open(&graph_path)?));
                graphs.insert(component, graph_path);
            }
            let weight = maps[&component]
                .get(&layer.module)
                .map_err(|source| match source {
                    TargetError::NotFound { .. } => LoraError::NoWeight {
                        path: path.clone(),
                        key: layer.down.name.clone(),
                        component: component.folder(),
                        module: layer.module.clone(),
                    },
                    source => LoraError::Target {
                        path: path.clone(),
                        key: layer.down.name.clone(),
                        source: Box::new(source),
                    },
                })?;
            layer.check_fits(weight, path)?;
            if weight.layout == Layout::Transposed && weight.dims.len() != 2 {
                return Err(LoraError::Weight {
                    graph: graphs[&component].clone(),
                    initializer: weight.initializer.clone(),
                    what: format!("a transposed weight of shape {:?}", weight.dims),
                });
            }
            weights.push(weight.clone());
        }
        files.push(PlannedFile {
            spec: spec.clone(),
            header,
            layers,
            alphas,
            weights,
        });
    }
    Ok(Plan { files, graphs })
}

/// Whether `lora` applies to the model folder `model_dir` (every key maps to a weight
/// that fits, its alphas are defined); `Ok` holds its layer count. Reads the file's
/// header and the graphs' structure, no tensor data.
pub fn check(model_dir: &Path, lora: &LoraSpec) -> Result<usize, LoraError> {
    let plan = plan(model_dir, std::slice::from_ref(lora))?;
    Ok(plan.files.iter().map(|f| f.layers.len()).sum())
}

/// Each layer's alpha, where kohya's convention and diffusers' loader agree:
/// - diffusers' saved adapter metadata (`lora_adapter_metadata`): its `lora_alpha` per
///   component, when it has no per-module rank or alpha patterns and no DoRA;
/// - `.alpha` tensors on every layer of a component: those;
/// - no alpha anywhere in a component and one rank: alpha = rank (a scale of 1).
///
/// Refused: a component mixing layers with and without `.alpha` (kohya takes the rank
/// for the latter, diffusers the most common alpha), and one without alphas whose layers
/// have different ranks (diffusers then scales layers by the first layer's rank).
pub fn layer_alphas(header: &Header, layers: &[LoraLayer]) -> Result<Vec<f64>, LoraError> {
    let refuse = |what: String| LoraError::Alpha {
        path: header.path.clone(),
        what,
    };
    if let Some(raw) = header.metadata.get("lora_adapter_metadata") {
        let meta: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| refuse(format!("lora_adapter_metadata is not JSON: {e}")))?;
        return layers
            .iter()
            .map(|l| {
                let prefix = l.component.folder();
                let get = |k: &str| meta.get(format!("{prefix}.{k}"));
                let empty = |v: Option<&serde_json::Value>| {
                    v.is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))
                };
                if get("use_dora").and_then(serde_json::Value::as_bool) == Some(true) {
                    return Err(refuse(format!("{prefix} is a DoRA adapter, not supported")));
                }
                if !empty(get("rank_pattern")) || !empty(get("alpha_pattern")) {
                    return Err(refuse(format!(
                        "lora_adapter_metadata has per-module rank or alpha patterns for {prefix}, not supported"
                    )));
                }
                let alpha = get("lora_alpha")
                    .and_then(serde_json::Value::as_f64)
                    .ok_or_else(|| {
                        refuse(format!("lora_adapter_metadata has no {prefix}.lora_alpha"))
                    })?;
                let r = get("r").and_then(serde_json::Value::as_u64);
                if r != Some(l.rank as u64) {
                    return Err(refuse(format!(
                        "layer {} has rank {}, lora_adapter_metadata says {prefix}.r = {r:?}",
                        l.module, l.rank
                    )));
                }
                Ok(alpha)
            })
            .collect();
    }
    let mut alphas = Vec::with_capacity(layers.len());
    for l in layers {
        alphas.push(match &l.alpha {
            Some(info) => {
                let v = header.tensor_f32(info)?;
                v[0] as f64
            }
            None => f64::NAN,
        });
    }
    let components: BTreeSet<Component> = layers.iter().map(|l| l.component).collect();
    for c in components {
        let idx: Vec<usize> = (0..layers.len())
            .filter(|&i| layers[i].component == c)
            .collect();
        let with = idx.iter().filter(|&&i| !alphas[i].is_nan()).count();
        if with == idx.len() {
            continue;
        }
        if with > 0 {
            let missing = idx.iter().find(|&&i| alphas[i].is_nan()).unwrap();
            return Err(refuse(format!(
                "{}: some layers have an alpha and {} has none; kohya and diffusers scale such a layer differently",
                c.folder(),
                layers[*missing].module
            )));
        }
        let ranks: BTreeSet<usize> = idx.iter().map(|&i| layers[i].rank).collect();
        if ranks.len() > 1 {
            let format = match layers[idx[0]].format {
                KeyFormat::Kohya => "kohya",
                KeyFormat::Peft => "PEFT",
            };
            return Err(refuse(format!(
                "{}: {format} layers of ranks {ranks:?} without alphas or adapter metadata; the scale of each layer is undefined",
                c.folder()
            )));
        }
        for &i in &idx {
            alphas[i] = layers[i].rank as f64;
        }
    }
    Ok(alphas)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
