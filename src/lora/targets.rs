//! Which initializer of an exported graph holds the weight of each torch module.
//!
//! An Optimum export keeps Conv and Gemm weights under their torch names
//! (`down_blocks.0.resnets.0.conv1.weight`, `time_embedding.linear_1.weight`), while a
//! Linear applied to a 3-D input becomes a MatMul whose weight is an anonymous initializer
//! holding the *transposed* torch weight (`onnx::MatMul_1628`, shaped [in, out]). The
//! module a weight belongs to is therefore read from the node's name
//! (`/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul` →
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), never from the
//! initializer's name. The exporter deduplicates identical tensors, so one initializer can
//! serve several modules: [`WeightMap`] records that, and [`WeightMap::get`] refuses such a
//! module rather than let one layer's change reach the others.

use std::collections::BTreeMap;

use super::onnx_graph::{Graph, Initializer, Node, TensorData};

/// An error looking up a module's weight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No node of the graph reads a weight for this module.
    #[error("{graph}: no weight for module {module} in the graph")]
    NotFound {
        /// The model file.
        graph: String,
        /// The module path asked for.
        module: String,
    },
    /// The module's initializer is also read by other modules or nodes, so changing it
    /// would change them too.
    #[error(
        "{graph}: module {module}'s weight {initializer} is shared with {}: the exporter merged identical tensors, and changing one would change all",
        others.join(", ")
    )]
    Shared {
        /// The model file.
        graph: String,
        /// The module path asked for.
        module: String,
        /// The shared initializer.
        initializer: String,
        /// The other modules (or, for non-weight readers, node names) reading it.
        others: Vec<String>,
    },
}

/// How an initializer holds a torch weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As torch does: [out, in] for Linear (Gemm with `transB` = 1), [out, in/groups, kh, kw]
    /// for Conv.
    AsTorch,
    /// Transposed: [in, out], the weight of a MatMul (or of a Gemm with `transB` = 0). A
    /// LoRA delta B@A must be transposed before it is added.
    Transposed,
}

/// The weight of one torch module, as found in the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weight {
    /// The diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    /// The node that reads it, e.g. `/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`.
    pub node: String,
    /// The node's operator: `MatMul`, `Gemm` or `Conv`.
    pub op_type: String,
    /// The initializer's name.
    pub initializer: String,
    /// The initializer's shape, as stored.
    pub dims: Vec<i64>,
    /// ONNX data type of the initializer (see [`super::onnx_graph::data_type`]).
    pub data_type: i32,
    /// Where its bytes are.
    pub data: TensorData,
    /// How it relates to the torch weight.
    pub layout: Layout,
}

impl Weight {
    /// The shape of the torch weight: [out, in] for a Linear, [out, in/groups, kh, kw] for
    /// a Conv.
    pub fn torch_shape(&self) -> Vec<i64> {
        match self.layout {
            Layout::AsTorch => self.dims.clone(),
            Layout::Transposed => self.dims.iter().rev().copied().collect(),
        }
    }
}

/// The weights of a graph's MatMul, Gemm and Conv nodes, by diffusers module path.
#[derive(Debug, Clone)]
pub struct WeightMap {
    graph: String,
    modules: BTreeMap<String, Weight>,
    /// Initializer name → every reader (module paths for weights, node names otherwise),
    /// for initializers that have more than one.
    shared: BTreeMap<String, Vec<String>>,
}

/// The module path of a node, from its name: `/a.0/b/c/MatMul` → `a.0.b.c`.
fn module_of(node: &Node) -> Option<String> {
    let name = node.name.strip_prefix('/')?;
    let (path, _op) = name.rsplit_once('/')?;
    (!path.is_empty()).then(|| path.replace('/', "."))
}

/// The initializer `value` is, directly or through a chain of Identity nodes.
fn resolve<'g>(
    inits: &BTreeMap<&str, &'g Initializer>,
    identity: &BTreeMap<&str, &'g str>,
    value: &str,
) -> Option<&'g Initializer> {
    if let Some(init) = inits.get(value) {
        return Some(init);
    }
    let mut value: &'g str = identity.get(value)?;
    for _ in 0..identity.len() {
        if let Some(init) = inits.get(value) {
            return Some(init);
        }
        value = identity.get(value)?;
    }
    None
}

impl WeightMap {
    /// Maps every MatMul, Gemm and Conv node whose weight input is an initializer of rank 2
    /// or more (directly or through Identity nodes) to its module path, and records weight
    /// initializers read by more than one module or node.
    pub fn from_graph(graph: &Graph) -> WeightMap {
        let inits: BTreeMap<&str, &Initializer> = graph
            .initializers
            .iter()
            .map(|i| (i.name.as_str(), i))
            .collect();
        // The exporter shares deduplicated tensors through Identity nodes: a layer's weight
        // may be `Identity_12`'s output, itself reading another layer's initializer.
        let identity: BTreeMap<&str, &str> = graph
            .nodes
            .iter()
            .filter(|n| n.op_type == "Identity" && n.inputs.len() == 1 && n.outputs.len() == 1)
            .map(|n| (n.outputs[0].as_str(), n.inputs[0].as_str()))
            .collect();
        let resolve = |value: &str| resolve(&inits, &identity, value);
        let mut modules = BTreeMap::new();
        let mut readers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for node in &graph.nodes {
            if node.op_type == "Identity" {
                continue;
            }
            let weight_input = match node.op_type.as_str() {
                "MatMul" | "Gemm" | "Conv" => node.inputs.get(1),
                _ => None,
            };
            let found = weight_input
                .and_then(|w| resolve(w))
                .filter(|i| i.dims.len() >= 2)
                .and_then(|i| module_of(node).map(|m| (i, m)));
            for (k, input) in node.inputs.iter().enumerate() {
                let Some(init) = resolve(input) else {
                    continue;
                };
                let reader = match &found {
                    Some((_, module)) if k == 1 => module.clone(),
                    _ => node.name.clone(),
                };
                let list = readers.entry(init.name.as_str()).or_default();
                if !list.contains(&reader) {
                    list.push(reader);
                }
            }
            let Some((init, module)) = found else {
                continue;
            };
            let layout = match node.op_type.as_str() {
                "MatMul" => Layout::Transposed,
                "Gemm" if node.int_attribute("transB").unwrap_or(0) == 0 => Layout::Transposed,
                _ => Layout::AsTorch,
            };
            modules.insert(
                module.clone(),
                Weight {
                    module,
                    node: node.name.clone(),
                    op_type: node.op_type.clone(),
                    initializer: init.name.clone(),
                    dims: init.dims.clone(),
                    data_type: init.data_type,
                    data: init.data.clone(),
                    layout,
                },
            );
        }
        // Only weights matter: biases and norms shared between layers are never changed.
        let weights: std::collections::BTreeSet<&str> = modules
            .values()
            .map(|w: &Weight| w.initializer.as_str())
            .collect();
        let shared = readers
            .into_iter()
            .filter(|(i, r)| r.len() > 1 && weights.contains(i))
            .map(|(i, r)| (i.to_string(), r))
            .collect();
        WeightMap {
            graph: graph.path.display().to_string(),
            modules,
            shared,
        }
    }

    /// The weight of `module`, refused when its initializer is shared with another reader.
    pub fn get(&self, module: &str) -> Result<&Weight, TargetError> {
        let weight = self.lookup(module).ok_or_else(|| TargetError::NotFound {
            graph: self.graph.clone(),
            module: module.to_string(),
        })?;
        if let Some(readers) = self.shared.get(&weight.initializer) {
            return Err(TargetError::Shared {
                graph: self.graph.clone(),
                module: module.to_string(),
                initializer: weight.initializer.clone(),
                others: readers.iter().filter(|r| *r != module).cloned().collect(),
            });
        }
        Ok(weight)
    }

    /// The weight of `module`, shared or not.
    pub fn lookup(&self, module: &str) -> Option<&Weight> {
        self.modules.get(module)
    }

    /// Every mapped module, in path order.
    pub fn iter(&self) -> impl Iterator<Item = &Weight> {
        self.modules.values()
    }

    /// How many modules were mapped.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether no module was mapped.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Initializers read by more than one module or node, with their readers.
    pub fn shared(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.shared.iter().map(|(i, r)| (i.as_str(), r.as_slice()))
    }

    /// The module whose flattened name (dots as underscores, as kohya's files write it) is
    /// `flat`, if exactly one module has it.
    pub fn by_flat_name(&self, flat: &str) -> Option<&Weight> {
        let mut hits = self
            .modules
            .values()
            .filter(|w| w.module.replace('.', "_") == flat);
        let first = hits.next()?;
        hits.next().is_none().then_some(first)
    }
}

#[cfg(test)]
#[path = "targets_tests.rs"]
mod tests;
