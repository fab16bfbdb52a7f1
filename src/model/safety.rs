//! Model-file safety: every external-data reference in an ONNX file is checked before
//! ONNX Runtime is allowed to open the file.
//!
//! ONNX Runtime follows a tensor's `external_data` `location` wherever it points: an
//! absolute path, `../..`, a symlink out of the folder, or the in-memory marker
//! `*/_ORT_MEM_ADDR_/*` (which makes it read a raw process address). A model folder is
//! configured by the operator, but its files may come from anywhere, so diffusiond
//! refuses a model whose graphs (including subgraphs of If/Loop/Scan, tensor attributes
//! such as Constant's `value`, sparse initializers, functions and training graphs) name
//! a location that
//!
//! - is an absolute path;
//! - has a `..` component;
//! - resolves, through a symlink, outside the folder that holds the `.onnx` file
//!   (or is a symlink that does not resolve);
//! - carries the `_ORT_MEM_ADDR_` marker;
//! - is given twice (a duplicate `location` key in one tensor's `external_data`);
//! - does not exist as a regular file.
//!
//! Why a hand-written protobuf walker instead of an ONNX crate: the crates that decode
//! `ModelProto` (prost or rust-protobuf generated, e.g. `onnx-protobuf`) materialise the
//! whole message, weights included, so checking a 1.7 GB single-file UNet would read and
//! allocate all of it, and they add a code-generation dependency for a dozen field
//! numbers. This walker reads only the fields listed below, seeks over everything else
//! (raw weights are skipped, never read), and bounds every length by its parent message.
//! Field numbers are those of `onnx.proto` (ONNX 1.x; they never change):
//!
//! ```text
//! ModelProto        graph = 7, training_info = 20, functions = 25
//! TrainingInfoProto initialization = 1, algorithm = 2
//! GraphProto        node = 1, name = 2, initializer = 5, sparse_initializer = 15
//! NodeProto         name = 3, op_type = 4, attribute = 5
//! FunctionProto     name = 1, node = 7, attribute_proto = 11
//! AttributeProto    name = 1, t = 5, g = 6, tensors = 10, graphs = 11,
//!                   sparse_tensor = 22, sparse_tensors = 23
//! SparseTensorProto values = 1, indices = 2
//! TensorProto       name = 8, external_data = 13, data_location = 14
//! StringStringEntryProto key = 1, value = 2
//! ```

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// The marker ONNX Runtime reads as "the data is at this memory address".
pub const MEMORY_ADDRESS_MARKER: &str = "_ORT_MEM_ADDR_";

/// Nesting deeper than this (messages within messages) is refused as malformed.
const MAX_DEPTH: usize = 64;
/// Longest name or external-data key/value read.
const MAX_STRING: u64 = 64 * 1024;

/// Which rule an external-data location broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The location is an absolute path.
    Absolute,
    /// The location has a `..` component.
    ParentDir,
    /// The location resolves through a symlink outside the model folder, or through a
    /// symlink that does not resolve.
    SymlinkEscape,
    /// The location carries the `_ORT_MEM_ADDR_` marker.
    MemoryAddress,
    /// The tensor gives `location` more than once.
    DuplicateLocation,
    /// The location is not a regular file in the model folder.
    Missing,
}

impl Rule {
    /// A short stable name for the rule (used in messages and tests).
    pub fn name(self) -> &'static str {
        match self {
            Rule::Absolute => "absolute-path",
            Rule::ParentDir => "parent-dir",
            Rule::SymlinkEscape => "symlink-escape",
            Rule::MemoryAddress => "memory-address",
            Rule::DuplicateLocation => "duplicate-location",
            Rule::Missing => "missing-file",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self {
            Rule::Absolute => "absolute paths are not allowed",
            Rule::ParentDir => "'..' is not allowed",
            Rule::SymlinkEscape => "it resolves through a symlink outside the model folder",
            Rule::MemoryAddress => "the _ORT_MEM_ADDR_ marker is not allowed",
            Rule::DuplicateLocation => "'location' is given more than once",
            Rule::Missing => "it is not a regular file in the model folder",
        };
        write!(f, "{why} (rule {})", self.name())
    }
}

/// Why a model file was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SafetyError {
    /// A tensor's external-data location breaks a rule.
    #[error(
        "{file}: tensor '{tensor}' ({context}): external data location '{location}' refused: {rule}"
    )]
    Refused {
        /// The ONNX file.
        file: PathBuf,
        /// The tensor's name (empty names are shown as `<unnamed>`).
        tensor: String,
        /// Where the tensor sits: initializer, node attribute, subgraph, function.
        context: String,
        /// The location as written in the file.
        location: String,
        /// The rule it broke.
        rule: Rule,
    },
    /// The file could not be read or is not a well-formed ONNX protobuf.
    #[error("{file}: cannot check external data: {message}")]
    Malformed {
        /// The ONNX file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl SafetyError {
    /// The rule broken, if a location was refused.
    pub fn rule(&self) -> Option<Rule> {
        match self {
            SafetyError::Refused { rule, .. } => Some(*rule),
            SafetyError::Malformed { .. } => None,
        }
    }
}

/// Checks every external-data reference in `onnx` (a `model.onnx` file). External data
/// files themselves are never read, only their paths resolved.
pub fn check_file(onnx: &Path) -> Result<(), SafetyError> {
    let malformed = |message: String| SafetyError::Malformed {
        file: onnx.to_path_buf(),
        message,
    };
    let (file, meta) =
        super::small_file::open_regular(onnx).map_err(|e| malformed(e.to_string()))?;
    let len = meta.len();
    let dir = onnx
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let root = dir
        .canonicalize()
        .map_err(|e| malformed(format!("{}: {e}", dir.display())))?;
    let mut walker = Walker {
        r: BufReader::with_capacity(64 * 1024, file),
        pos: 0,
        file: onnx,
        dir,
        root,
    };
    walker
        .message(Kind::Model, len, 0, "graph")
        .map_err(|e| match e {
            Stop::Refused(r) => *r,
            Stop::Malformed(m) => malformed(m),
        })
}

/// Checks one location against the rules; `dir` is the folder of the `.onnx` file and
/// `root` its canonical form.
pub fn check_location(dir: &Path, root: &Path, location: &str) -> Result<(), Rule> {
    if location.contains(MEMORY_ADDRESS_MARKER) {
        return Err(Rule::MemoryAddress);
    }
    let path = Path::new(location);
    let drive = location.as_bytes();
    let drive_letter = drive.len() >= 2 && drive[0].is_ascii_alphabetic() && drive[1] == b':';
    if path.is_absolute() || location.starts_with('\\') || drive_letter {
        return Err(Rule::Absolute);
    }
    if location.split(['/', '\\']).any(|c| c == "..") {
        return Err(Rule::ParentDir);
    }
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Rule::ParentDir);
    }
    let full = dir.join(path);
    match full.canonicalize() {
        Ok(real) if !real.starts_with(root) => Err(Rule::SymlinkEscape),
        Ok(real) if !real.is_file() => Err(Rule::Missing),
        Ok(_) => Ok(()),
        Err(_) => {
            // Does not resolve: a dangling symlink on the way is refused as such.
            let mut prefix = dir.to_path_buf();
            for c in path.components() {
                prefix.push(c);
                if prefix.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
                    return Err(Rule::SymlinkEscape);
                }
            }
            Err(Rule::Missing)
        }
    }
}

/// The message types the walker descends into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Model,
    TrainingInfo,
    Graph,
    Node,
    Function,
    Attribute,
    SparseTensor,
}

enum Stop {
    Refused(Box<SafetyError>),
    Malformed(String),
}

type Walk<T> = Result<T, Stop>;

struct Walker<'a> {
    r: BufReader<File>,
    pos: u64,
    file: &'a Path,
    dir: &'a Path,
    root: PathBuf,
}

impl Walker<'_> {
    fn byte(&mut self, end: u64) -> Walk<u8> {
        if self.pos >= end {
            return Err(Stop::Malformed(format!("truncated at byte {}", self.pos)));
        }
        let mut b = [0u8; 1];
        self.r
            .read_exact(&mut b)
            .map_err(|e| Stop::Malformed(format!("at byte {}: {e}", self.pos)))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self, end: u64) -> Walk<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte(end)?;
            if shift == 63 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Stop::Malformed(format!(
            "bad varint before byte {}",
            self.pos
        )))
    }

    /// Reads a length prefix and returns where that field ends.
    fn len_end(&mut self, end: u64) -> Walk<u64> {
        let n = self.varint(end)?;
        match self.pos.checked_add(n) {
            Some(e) if e <= end => Ok(e),
            _ => Err(Stop::Malformed(format!(
                "a field of {n} bytes at byte {} runs past its message",
                self.pos
            ))),
        }
    }

    fn skip_to(&mut self, to: u64) -> Walk<()> {
        let n = i64::try_from(to - self.pos)
            .map_err(|_| Stop::Malformed("field too long".to_string()))?;
        self.r
            .seek_relative(n)
            .map_err(|e| Stop::Malformed(e.to_string()))?;
        self.pos = to;
        Ok(())
    }

    fn string(&mut self, end: u64) -> Walk<String> {
        let e = self.len_end(end)?;
        if e - self.pos > MAX_STRING {
            return Err(Stop::Malformed(format!(
                "a name of {} bytes at byte {}",
                e - self.pos,
                self.pos
            )));
        }
        let mut buf = vec![0u8; (e - self.pos) as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|err| Stop::Malformed(err.to_string()))?;
        self.pos = e;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Skips one field of wire type `wt`.
    fn skip(&mut self, wt: u64, end: u64) -> Walk<()> {
        match wt {
            0 => self.varint(end).map(drop),
            1 | 5 => {
                let to = self.pos + if wt == 1 { 8 } else { 4 };
                if to > end {
                    return Err(Stop::Malformed(format!("truncated at byte {}", self.pos)));
                }
                self.skip_to(to)
            }
            2 => {
                let to = self.len_end(end)?;
                self.skip_to(to)
            }
            _ => Err(Stop::Malformed(format!(
                "unsupported wire type {wt} at byte {}",
                self.pos
            ))),
        }
    }

    /// Walks a message of `kind` that ends at `end`. `context` says where it sits.
    fn message(&mut self, kind: Kind, end: u64, depth: usize, context: &str) -> Walk<()> {
        if depth > MAX_DEPTH {
            return Err(Stop::Malformed(format!(
                "messages nested deeper than {MAX_DEPTH}"
            )));
        }
        // Names seen so far (protobuf writers put them before the fields that use them).
        let mut name = String::new();
        let mut op_type = String::new();
        while self.pos < end {
            let tag = self.varint(end)?;
            let (field, wt) = (tag >> 3, tag & 7);
            if wt != 2 {
                self.skip(wt, end)?;
                continue;
            }
            let here = |what: &str| format!("{context} > {what}");
            let (child, ctx) = match (kind, field) {
                (Kind::Model, 7) => (Kind::Graph, context.to_string()),
                (Kind::Model, 20) => (Kind::TrainingInfo, "training_info".to_string()),
                (Kind::Model, 25) => (Kind::Function, "function".to_string()),
                (Kind::TrainingInfo, 1) => (Kind::Graph, here("initialization")),
                (Kind::TrainingInfo, 2) => (Kind::Graph, here("algorithm")),
                (Kind::Graph, 1) => (Kind::Node, context.to_string()),
                (Kind::Function, 7) => (Kind::Node, format!("function '{name}'")),
                (Kind::Graph, 5) => {
                    let e = self.len_end(end)?;
                    self.tensor(e, &here("initializer"))?;
                    continue;
                }
                (Kind::Graph, 15) => (Kind::SparseTensor, here("sparse_initializer")),
                (Kind::Function, 1) | (Kind::Node, 3) | (Kind::Attribute, 1) => {
                    name = self.string(end)?;
                    continue;
                }
                (Kind::Node, 4) => {
                    op_type = self.string(end)?;
                    continue;
                }
                (Kind::Node, 5) | (Kind::Function, 11) => {
                    let who = if kind == Kind::Node {
                        here(&format!("node '{name}' ({op_type})"))
                    } else {
                        format!("function '{name}' default")
                    };
                    (Kind::Attribute, who)
                }
                (Kind::Attribute, 5 | 10) => {
                    let e = self.len_end(end)?;
                    self.tensor(e, &format!("{context} attribute '{name}'"))?;
                    continue;
                }
                (Kind::Attribute, 6 | 11) => (
                    Kind::Graph,
                    format!("{context} attribute '{name}' subgraph"),
                ),
                (Kind::Attribute, 22 | 23) => (
                    Kind::SparseTensor,
                    format!("{context} attribute '{name}' sparse tensor"),
                ),
                (Kind::SparseTensor, 1 | 2) => {
                    let e = self.len_end(end)?;
                    let part = if field == 1 { "values" } else { "indices" };
                    self.tensor(e, &here(part))?;
                    continue;
                }
                _ => {
                    self.skip(wt, end)?;
                    continue;
                }
            };
            let e = self.len_end(end)?;
            self.message(child, e, depth + 1, &ctx)?;
            if self.pos != e {
                return Err(Stop::Malformed(format!("message overran byte {e}")));
            }
        }
        if self.pos != end {
            return Err(Stop::Malformed(format!("message overran byte {end}")));
        }
        Ok(())
    }

    /// Reads one TensorProto ending at `end` and checks its external data.
    fn tensor(&mut self, end: u64, context: &str) -> Walk<()> {
        let mut name = String::new();
        let mut locations = Vec::new();
        while self.pos < end {
            let tag = self.varint(end)?;
            match (tag >> 3, tag & 7) {
                (8, 2) => name = self.string(end)?,
                (13, 2) => {
                    let e = self.len_end(end)?;
                    let (mut key, mut value) = (String::new(), String::new());
                    while self.pos < e {
                        let tag = self.varint(e)?;
                        match (tag >> 3, tag & 7) {
                            (1, 2) => key = self.string(e)?,
                            (2, 2) => value = self.string(e)?,
                            (_, wt) => self.skip(wt, e)?,
                        }
                    }
                    if key == "location" {
                        locations.push(value);
                    }
                }
                (_, wt) => self.skip(wt, end)?,
            }
        }
        let refuse = |location: &str, rule| {
            Stop::Refused(Box::new(SafetyError::Refused {
                file: self.file.to_path_buf(),
                tensor: if name.is_empty() {
                    "<unnamed>".to_string()
                } else {
                    name.clone()
                },
                context: context.to_string(),
                location: location.to_string(),
                rule,
            }))
        };
        if locations.len() > 1 {
            return Err(refuse(&locations.join("', '"), Rule::DuplicateLocation));
        }
        for location in &locations {
            check_location(self.dir, &self.root, location).map_err(|r| refuse(location, r))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_checked_against_each_rule() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let root = d.canonicalize().unwrap();
        std::fs::write(d.join("w.bin"), b"1234").unwrap();
        assert_eq!(check_location(d, &root, "w.bin"), Ok(()));
        assert_eq!(check_location(d, &root, "./w.bin"), Ok(()));
        assert_eq!(check_location(d, &root, "/etc/passwd"), Err(Rule::Absolute));
        assert_eq!(check_location(d, &root, "C:\\w.bin"), Err(Rule::Absolute));
        assert_eq!(
            check_location(d, &root, "\\\\host\\w.bin"),
            Err(Rule::Absolute)
        );
        assert_eq!(check_location(d, &root, "a/../w.bin"), Err(Rule::ParentDir));
        assert_eq!(check_location(d, &root, "..\\w.bin"), Err(Rule::ParentDir));
        assert_eq!(
            check_location(d, &root, "*/_ORT_MEM_ADDR_/*"),
            Err(Rule::MemoryAddress)
        );
        assert_eq!(check_location(d, &root, "nope.bin"), Err(Rule::Missing));
        std::os::unix::fs::symlink("/etc/passwd", d.join("out.bin")).unwrap();
        assert_eq!(
            check_location(d, &root, "out.bin"),
            Err(Rule::SymlinkEscape)
        );
        std::os::unix::fs::symlink("/nonexistent/x", d.join("dangling")).unwrap();
        assert_eq!(
            check_location(d, &root, "dangling"),
            Err(Rule::SymlinkEscape)
        );
        std::os::unix::fs::symlink("w.bin", d.join("in.bin")).unwrap();
        assert_eq!(check_location(d, &root, "in.bin"), Ok(()));
    }
}
