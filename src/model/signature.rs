//! Load-time checks of each graph's inputs and outputs: names, ranks and element types.
//!
//! Declared dimension names in exports are unreliable, so only ranks and types are
//! checked; sizes are trusted from the data at run time.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorElementType;

use super::ModelError;

/// The element types diffusiond feeds and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// 16-bit float (fp16 exports); values are cast from and to f32.
    F16,
    /// 64-bit integer (token ids, older timesteps).
    I64,
    /// 32-bit integer (some token-id inputs).
    I32,
}

impl Elem {
    fn from_ort(t: TensorElementType) -> Option<Elem> {
        match t {
            TensorElementType::Float32 => Some(Elem::F32),
            TensorElementType::Float16 => Some(Elem::F16),
            TensorElementType::Int64 => Some(Elem::I64),
            TensorElementType::Int32 => Some(Elem::I32),
            _ => None,
        }
    }
}

/// What one graph input or output looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Element type.
    pub elem: Elem,
    /// Number of dimensions.
    pub rank: usize,
}

/// Whether to look at a graph's inputs or its outputs.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// Graph inputs.
    Input,
    /// Graph outputs.
    Output,
}

/// Finds `name` on one side of a session, or `None` if the graph has no such value.
pub fn find(session: &Session, side: Side, name: &str) -> Option<(Option<Elem>, usize, String)> {
    let list = match side {
        Side::Input => session.inputs(),
        Side::Output => session.outputs(),
    };
    list.iter().find(|o| o.name() == name).map(|o| {
        let ty = o.dtype();
        let elem = ty.tensor_type().and_then(Elem::from_ort);
        let rank = ty.tensor_shape().map_or(0, |s| s.len());
        (elem, rank, format!("{ty:?}"))
    })
}

/// Requires `name` with one of `elems` and one of `ranks`.
pub fn require(
    session: &Session,
    file: &Path,
    side: Side,
    name: &str,
    elems: &[Elem],
    ranks: &[usize],
) -> Result<Spec, ModelError> {
    let what = match side {
        Side::Input => "input",
        Side::Output => "output",
    };
    let mismatch = |message: String| ModelError::Signature {
        path: file.to_path_buf(),
        message,
    };
    let Some((elem, rank, shown)) = find(session, side, name) else {
        return Err(mismatch(format!(
            "the graph has no {what} named '{name}' (it has: {})",
            names(session, side)
        )));
    };
    let elem = elem.filter(|e| elems.contains(e)).ok_or_else(|| {
        mismatch(format!(
            "{what} '{name}' is {shown}, expected one of {elems:?}"
        ))
    })?;
    if !ranks.contains(&rank) {
        return Err(mismatch(format!(
            "{what} '{name}' has rank {rank}, expected {ranks:?}"
        )));
    }
    Ok(Spec { elem, rank })
}

/// Comma-separated names on one side, for error messages.
pub fn names(session: &Session, side: Side) -> String {
    let list = match side {
        Side::Input => session.inputs(),
        Side::Output => session.outputs(),
    };
    list.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ")
}

/// Float tensors may be fp32 or fp16.
pub const FLOATS: &[Elem] = &[Elem::F32, Elem::F16];
/// Timesteps: a float in current exports, int64 in older ones.
pub const TIMESTEP: &[Elem] = &[Elem::F32, Elem::F16, Elem::I64];
/// Token ids.
pub const IDS: &[Elem] = &[Elem::I64, Elem::I32];
