//! A minimal reader for the parts of an ONNX model file that LoRA merging needs: the
//! graph's nodes (name, op type, inputs, outputs) and its initializers (name, dims, data
//! type, and *where* their bytes are).
//!
//! Written by hand rather than with a protobuf crate: the tree has none, and only a handful
//! of fields of three messages are read. The protobuf wire format is simple: each field is
//! a varint tag `(field_number << 3) | wire_type`, followed by a varint (type 0), 8 bytes
//! (type 1), a varint length and that many bytes (type 2: strings, bytes, nested messages,
//! packed repeated scalars) or 4 bytes (type 5).
//!
//! Tensor data is never copied: the reader streams the file and seeks over `raw_data`,
//! recording its offset in the `.onnx` file; initializers stored as external data keep
//! their `location`/`offset`/`length`, and their files are never opened here (a real
//! SD UNet has ~3.4 GB of them).

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

/// An error reading an ONNX model file.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The model file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a well-formed protobuf message where ONNX expects one.
    #[error("{path}: malformed ONNX protobuf at byte {offset}: {what}")]
    Malformed {
        /// The model file.
        path: PathBuf,
        /// Byte offset in the file where the problem was found.
        offset: u64,
        /// What was wrong.
        what: String,
    },
    /// The model has no graph (ModelProto field 7).
    #[error("{path}: the ONNX model has no graph")]
    NoGraph {
        /// The model file.
        path: PathBuf,
    },
}

/// One node of the graph (NodeProto), without its attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The node's name, e.g. `/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`.
    pub name: String,
    /// The operator, e.g. `MatMul`, `Conv`, `Gemm`.
    pub op_type: String,
    /// Names of the values the node reads (an empty name is an omitted optional input).
    pub inputs: Vec<String>,
    /// Names of the values the node writes.
    pub outputs: Vec<String>,
    /// The node's integer attributes (AttributeProto `i`), e.g. Gemm's `transB`; other
    /// attributes are skipped.
    pub int_attributes: Vec<(String, i64)>,
}

impl Node {
    /// The integer attribute `name`, if the node has it.
    pub fn int_attribute(&self, name: &str) -> Option<i64> {
        self.int_attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }
}

/// Where an initializer's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorData {
    /// `raw_data` inside the model file: `len` bytes from byte `offset` of the `.onnx` file.
    Raw {
        /// Byte offset in the model file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A typed repeated field (`float_data`, `int64_data`, ...) inside the model file,
    /// packed: `len` bytes from `offset`.
    Typed {
        /// The TensorProto field number (4 float, 5 int32, 7 int64, 10 double, 11 uint64).
        field: u32,
        /// Byte offset in the model file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// External data (`data_location` = EXTERNAL): a file next to the model.
    External {
        /// The file name, relative to the model's folder.
        location: String,
        /// Byte offset in that file (0 when absent).
        offset: u64,
        /// Length in bytes, when given.
        length: Option<u64>,
    },
    /// No data field was present.
    Empty,
}

/// One initializer (TensorProto) of the graph, without its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initializer {
    /// The initializer's name: a torch name (`down_blocks.0.resnets.0.conv1.weight`) or an
    /// anonymous one (`onnx::MatMul_1628`).
    pub name: String,
    /// The tensor's shape.
    pub dims: Vec<i64>,
    /// ONNX `TensorProto.DataType` (1 float, 10 float16, 16 bfloat16, ...).
    pub data_type: i32,
    /// Where the bytes are.
    pub data: TensorData,
}

/// ONNX `TensorProto.DataType` values this crate cares about.
pub mod data_type {
    /// 32-bit float.
    pub const FLOAT: i32 = 1;
    /// 16-bit IEEE float.
    pub const FLOAT16: i32 = 10;
    /// 64-bit float.
    pub const DOUBLE: i32 = 11;
    /// bfloat16.
    pub const BFLOAT16: i32 = 16;
}

/// The nodes and initializers of an ONNX model's main graph.
#[derive(Debug, Clone)]
pub struct Graph {
    /// The model file read.
    pub path: PathBuf,
    /// The graph's nodes, in file order.
    pub nodes: Vec<Node>,
    /// The graph's initializers, in file order.
    pub initializers: Vec<Initializer>,
}

impl Graph {
    /// Reads the graph of the ONNX model at `path`, streaming the file (tensor data is
    /// skipped, never loaded; external data files are not opened).
    pub fn open(path: &Path) -> Result<Graph, GraphError> {
        let io = |source| GraphError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Graph::read(BufReader::with_capacity(1 << 16, file), len, path)
    }

    /// Reads a graph from `reader`, a ModelProto of `len` bytes; `path` names it in errors.
    pub fn read<R: Read + Seek>(reader: R, len: u64, path: &Path) -> Result<Graph, GraphError> {
        let mut wire = Wire {
            reader,
            pos: 0,
            path: path.to_path_buf(),
        };
        let mut graph = None;
        while wire.pos < len {
            let (field, wt) = wire.tag(len)?;
            if field == 7 && wt == 2 {
                let end = wire.len_end(len)?;
                graph = Some(read_graph(&mut wire, end)?);
            } else {
                wire.skip(wt, len)?;
            }
        }
        let (nodes, initializers) = graph.ok_or_else(|| GraphError::NoGraph {
            path: path.to_path_buf(),
        })?;
        Ok(Graph {
            path: path.to_path_buf(),
            nodes,
            initializers,
        })
    }

    /// The initializer named `name`, if any.
    pub fn initializer(&self, name: &str) -> Option<&Initializer> {
        self.initializers.iter().find(|i| i.name == name)
    }
}

fn read_graph<R: Read + Seek>(
    w: &mut Wire<R>,
    end: u64,
) -> Result<(Vec<Node>, Vec<Initializer>), GraphError> {
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    while w.pos < end {
        let (field, wt) = w.tag(end)?;
        match (field, wt) {
            (1, 2) => {
                let e = w.len_end(end)?;
                nodes.push(read_node(w, e)?);
            }
            (5, 2) => {
                let e = w.len_end(end)?;
                inits.push(read_tensor(w, e)?);
            }
            _ => w.skip(wt, end)?,
        }
    }
    Ok((nodes, inits))
}

fn read_node<R: Read + Seek>(w: &mut Wire<R>, end: u64) -> Result<Node, GraphError> {
    let mut node = Node::default();
    while w.pos < end {
        let (field, wt) = w.tag(end)?;
        match (field, wt) {
            (1, 2) => node.inputs.push(w.string(end)?),
            (2, 2) => node.outputs.push(w.string(end)?),
            (3, 2) => node.name = w.string(end)?,
            (4, 2) => node.op_type = w.string(end)?,
            (5, 2) => {
                let e = w.len_end(end)?;
                let (mut name, mut value) = (String::new(), None);
                while w.pos < e {
                    match w.tag(e)? {
                        (1, 2) => name = w.string(e)?,
                        (3, 0) => value = Some(w.varint(e)? as i64),
                        (_, wt) => w.skip(wt, e)?,
                    }
                }
                if let Some(value) = value {
                    node.int_attributes.push((name, value));
                }
            }
            _ => w.skip(wt, end)?,
        }
    }
    Ok(node)
}

fn read_tensor<R: Read + Seek>(w: &mut Wire<R>, end: u64) -> Result<Initializer, GraphError> {
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut data_type = 0;
    let mut data = TensorData::Empty;
    let mut external: Vec<(String, String)> = Vec::new();
    let mut data_location = 0;
    while w.pos < end {
        let (field, wt) = w.tag(end)?;
        match (field, wt) {
            (1, 0) => dims.push(w.varint(end)? as i64),
            (1, 2) => {
                let e = w.len_end(end)?;
                while w.pos < e {
                    dims.push(w.varint(e)? as i64);
                }
            }
            (2, 0) => data_type = w.varint(end)? as i32,
            (8, 2) => name = w.string(end)?,
            (9, 2) => {
                let e = w.len_end(end)?;
                data = TensorData::Raw {
                    offset: w.pos,
                    len: e - w.pos,
                };
                w.seek_to(e)?;
            }
            (4 | 5 | 7 | 10 | 11, 2) => {
                let e = w.len_end(end)?;
                data = TensorData::Typed {
                    field,
                    offset: w.pos,
                    len: e - w.pos,
                };
                w.seek_to(e)?;
            }
            (13, 2) => {
                let e = w.len_end(end)?;
                let (mut key, mut value) = (String::new(), String::new());
                while w.pos < e {
                    match w.tag(e)? {
                        (1, 2) => key = w.string(e)?,
                        (2, 2) => value = w.string(e)?,
                        (_, wt) => w.skip(wt, e)?,
                    }
                }
                external.push((key, value));
            }
            (14, 0) => data_location = w.varint(end)?,
            _ => w.skip(wt, end)?,
        }
    }
    if data_location == 1 {
        let at = w.pos;
        let get = |k: &str| external.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let number = |k: &str| -> Result<Option<u64>, GraphError> {
            get(k)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        w.malformed_at(at, format!("initializer {name}: external {k} {v:?}"))
                    })
                })
                .transpose()
        };
        let location = get("location").cloned().ok_or_else(|| {
            w.malformed_at(
                at,
                format!("initializer {name}: external data without a location"),
            )
        })?;
        data = TensorData::External {
            offset: number("offset")?.unwrap_or(0),
            length: number("length")?,
            location,
        };
    }
    Ok(Initializer {
        name,
        dims,
        data_type,
        data,
    })
}

/// A protobuf wire-format reader over a seekable stream, tracking the absolute position.
struct Wire<R> {
    reader: R,
    pos: u64,
    path: PathBuf,
}

impl<R: Read + Seek> Wire<R> {
    fn malformed_at(&self, offset: u64, what: String) -> GraphError {
        GraphError::Malformed {
            path: self.path.clone(),
            offset,
            what,
        }
    }

    fn byte(&mut self, end: u64) -> Result<u8, GraphError> {
        if self.pos >= end {
            return Err(self.malformed_at(self.pos, "field runs past its message".into()));
        }
        let mut b = [0u8];
        self.reader.read_exact(&mut b).map_err(|e| self.io(e))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn io(&self, e: std::io::Error) -> GraphError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.malformed_at(self.pos, "file ends inside a field".into())
        } else {
            GraphError::Io {
                path: self.path.clone(),
                source: e,
            }
        }
    }

    fn varint(&mut self, end: u64) -> Result<u64, GraphError> {
        let start = self.pos;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(end)?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed_at(start, "varint longer than 10 bytes".into()))
    }

    fn tag(&mut self, end: u64) -> Result<(u32, u8), GraphError> {
        let at = self.pos;
        let tag = self.varint(end)?;
        let field = u32::try_from(tag >> 3).unwrap_or(0);
        if field == 0 {
            return Err(self.malformed_at(at, format!("invalid tag {tag}")));
        }
        Ok((field, (tag & 7) as u8))
    }

    /// Reads a length prefix and returns the absolute end of the field it announces.
    fn len_end(&mut self, end: u64) -> Result<u64, GraphError> {
        let at = self.pos;
        let len = self.varint(end)?;
        match self.pos.checked_add(len) {
            Some(e) if e <= end => Ok(e),
            _ => Err(self.malformed_at(at, format!("length {len} runs past its message"))),
        }
    }

    fn string(&mut self, end: u64) -> Result<String, GraphError> {
        let e = self.len_end(end)?;
        let mut buf = vec![0u8; (e - self.pos) as usize];
        self.reader
            .read_exact(&mut buf)
            .map_err(|err| self.io(err))?;
        let at = self.pos;
        self.pos = e;
        String::from_utf8(buf).map_err(|_| self.malformed_at(at, "string is not UTF-8".into()))
    }

    fn seek_to(&mut self, target: u64) -> Result<(), GraphError> {
        let delta = (target - self.pos) as i64;
        self.reader.seek_relative(delta).map_err(|e| self.io(e))?;
        self.pos = target;
        Ok(())
    }

    fn skip(&mut self, wire_type: u8, end: u64) -> Result<(), GraphError> {
        let target = match wire_type {
            0 => return self.varint(end).map(drop),
            1 => self.pos + 8,
            2 => self.len_end(end)?,
            5 => self.pos + 4,
            other => {
                return Err(self.malformed_at(self.pos, format!("unsupported wire type {other}")));
            }
        };
        if target > end {
            return Err(self.malformed_at(self.pos, "field runs past its message".into()));
        }
        self.seek_to(target)
    }
}

#[cfg(test)]
#[path = "onnx_graph_tests.rs"]
mod tests;
