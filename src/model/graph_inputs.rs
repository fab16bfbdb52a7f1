//! An ONNX file's graph inputs (name, element type, dimensions) and the external-data
//! files it names, read without creating a session.
//!
//! TensorRT needs an optimization profile (min/opt/max shape) for every dynamic input of a
//! graph before ONNX Runtime builds its engine, and the engine cache key covers the
//! graph's weights, so both are read here, straight from the protobuf: like
//! [`super::safety`], this reads only the fields listed below and seeks over everything
//! else (raw weights are never read), bounding every length by its parent message.
//! Field numbers are those of `onnx.proto` (ONNX 1.x; they never change):
//!
//! ```text
//! ModelProto        graph = 7, functions = 25
//! GraphProto        node = 1, initializer = 5, input = 11, sparse_initializer = 15
//! NodeProto         attribute = 5
//! FunctionProto     node = 7
//! AttributeProto    t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22,
//!                   sparse_tensors = 23
//! SparseTensorProto values = 1, indices = 2
//! TensorProto       name = 8, external_data = 13
//! StringStringEntryProto key = 1, value = 2
//! ValueInfoProto    name = 1, type = 2
//! TypeProto         tensor_type = 1
//! TypeProto.Tensor  elem_type = 1, shape = 2
//! TensorShapeProto  dim = 1
//! Dimension         dim_value = 1, dim_param = 2
//! ```
//!
//! Inputs that are also initializers (old exports list weights among the inputs) are left
//! out: they are not fed, so they need no profile. External-data locations are collected
//! from the main graph's initializers, node attributes (and their subgraphs) and functions,
//! which is everywhere ONNX Runtime reads weights from for inference; training graphs are
//! not. [`super::safety::check_file`] has already refused unsafe locations by the time a
//! model is loaded, so they are only collected here, not checked again.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Nesting deeper than this is refused as malformed.
const MAX_DEPTH: usize = 64;
/// Longest name read.
const MAX_STRING: u64 = 64 * 1024;

/// One dimension of a declared input shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size (`dim_value`).
    Value(i64),
    /// A named dynamic size (`dim_param`, e.g. `batch`).
    Param(String),
    /// Dynamic with no name (neither field set).
    Any,
}

impl Dim {
    /// The fixed size, if the dimension has one.
    pub fn value(&self) -> Option<i64> {
        match self {
            Dim::Value(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Value(v) => v.fmt(f),
            Dim::Param(p) => f.write_str(p),
            Dim::Any => f.write_str("?"),
        }
    }
}

/// A graph input that is fed at run time (not an initializer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphInput {
    /// The input's name.
    pub name: String,
    /// ONNX `TensorProto.DataType` (1 float, 7 int64, 10 float16, ...); 0 when the input
    /// is not a tensor or declares no type.
    pub elem_type: i32,
    /// The declared dimensions; `None` when the input declares no shape (rank unknown).
    pub dims: Option<Vec<Dim>>,
}

impl GraphInput {
    /// Whether any dimension is dynamic (or the rank itself is unknown).
    pub fn is_dynamic(&self) -> bool {
        self.dims
            .as_ref()
            .is_none_or(|d| d.iter().any(|d| d.value().is_none()))
    }
}

/// What [`read`] finds in an ONNX file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphInfo {
    /// The main graph's inputs that are fed at run time, in declaration order.
    pub inputs: Vec<GraphInput>,
    /// External-data locations, as written (relative to the file's folder), sorted and
    /// without duplicates (every tensor of a `model.onnx_data` names the same file).
    pub external_files: Vec<String>,
}

impl GraphInfo {
    /// The input called `name`.
    pub fn input(&self, name: &str) -> Option<&GraphInput> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

/// Why an ONNX file's inputs could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: cannot read the graph inputs: {message}")]
pub struct GraphInputsError {
    /// The ONNX file.
    pub file: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// Reads the graph inputs and external-data locations of `onnx` (a `model.onnx` file).
pub fn read(onnx: &Path) -> Result<GraphInfo, GraphInputsError> {
    let err = |message: String| GraphInputsError {
        file: onnx.to_path_buf(),
        message,
    };
    let (file, meta) = super::small_file::open_regular(onnx).map_err(|e| err(e.to_string()))?;
    let len = meta.len();
    let mut reader = Reader {
        r: BufReader::with_capacity(64 * 1024, file),
        pos: 0,
    };
    let mut found = Found::default();
    reader.model(len, &mut found).map_err(err)?;
    let Found {
        inputs,
        initializers,
        locations,
    } = found;
    Ok(GraphInfo {
        inputs: inputs
            .into_iter()
            .filter(|i| !initializers.contains(&i.name))
            .collect(),
        external_files: locations.into_iter().collect(),
    })
}

#[derive(Default)]
struct Found {
    inputs: Vec<GraphInput>,
    initializers: BTreeSet<String>,
    locations: BTreeSet<String>,
}

type Res<T> = Result<T, String>;

/// A bounded protobuf reader over a file: reads varints and short strings, seeks over the
/// rest.
struct Reader {
    r: BufReader<File>,
    pos: u64,
}

impl Reader {
    fn byte(&mut self, end: u64) -> Res<u8> {
        if self.pos >= end {
            return Err(format!("truncated at byte {}", self.pos));
        }
        let mut b = [0u8; 1];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("at byte {}: {e}", self.pos))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self, end: u64) -> Res<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(end)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("bad varint before byte {}", self.pos))
    }

    /// Reads a length prefix and returns where that field ends.
    fn len_end(&mut self, end: u64) -> Res<u64> {
        let n = self.varint(end)?;
        match self.pos.checked_add(n) {
            Some(e) if e <= end => Ok(e),
            _ => Err(format!(
                "a field of {n} bytes at byte {} runs past its message",
                self.pos
            )),
        }
    }

    fn skip_to(&mut self, to: u64) -> Res<()> {
        let n = i64::try_from(to - self.pos).map_err(|_| "field too long".to_string())?;
        self.r.seek_relative(n).map_err(|e| e.to_string())?;
        self.pos = to;
        Ok(())
    }

    fn string(&mut self, end: u64) -> Res<String> {
        let e = self.len_end(end)?;
        if e - self.pos > MAX_STRING {
            return Err(format!(
                "a name of {} bytes at byte {}",
                e - self.pos,
                self.pos
            ));
        }
        let mut buf = vec![0u8; (e - self.pos) as usize];
        self.r.read_exact(&mut buf).map_err(|e| e.to_string())?;
        self.pos = e;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Skips one field of wire type `wt`.
    fn skip(&mut self, wt: u64, end: u64) -> Res<()> {
        match wt {
            0 => self.varint(end).map(drop),
            1 | 5 => {
                let to = self.pos + if wt == 1 { 8 } else { 4 };
                if to > end {
                    return Err(format!("truncated at byte {}", self.pos));
                }
                self.skip_to(to)
            }
            2 => {
                let to = self.len_end(end)?;
                self.skip_to(to)
            }
            _ => Err(format!("unsupported wire type {wt} at byte {}", self.pos)),
        }
    }

    /// Calls `each(reader, field, wire_type)` for every field of a message ending at `end`;
    /// `each` returns `false` for fields it did not consume, which are skipped.
    fn fields(
        &mut self,
        end: u64,
        mut each: impl FnMut(&mut Self, u64, u64) -> Res<bool>,
    ) -> Res<()> {
        while self.pos < end {
            let tag = self.varint(end)?;
            let (field, wt) = (tag >> 3, tag & 7);
            if !each(self, field, wt)? {
                self.skip(wt, end)?;
            }
        }
        if self.pos != end {
            return Err(format!("message overran byte {end}"));
        }
        Ok(())
    }

    /// A length-delimited sub-message: where it ends.
    fn sub(&mut self, wt: u64, end: u64) -> Res<Option<u64>> {
        if wt == 2 {
            self.len_end(end).map(Some)
        } else {
            Ok(None)
        }
    }

    fn model(&mut self, end: u64, found: &mut Found) -> Res<()> {
        self.fields(end, |r, field, wt| {
            let Some(e) = r.sub(wt, end)? else {
                return Ok(false);
            };
            match field {
                7 => r.graph(e, 0, true, found)?,
                25 => r.fields(e, |r, field, wt| match (field, r.sub(wt, e)?) {
                    (7, Some(ne)) => r.node(ne, 1, found).map(|()| true),
                    (_, Some(ne)) => r.skip_to(ne).map(|()| true),
                    _ => Ok(false),
                })?,
                _ => r.skip_to(e)?,
            }
            Ok(true)
        })
    }

    /// A GraphProto; `main` says whether its inputs and initializer names are wanted.
    fn graph(&mut self, end: u64, depth: usize, main: bool, found: &mut Found) -> Res<()> {
        if depth > MAX_DEPTH {
            return Err(format!("messages nested deeper than {MAX_DEPTH}"));
        }
        self.fields(end, |r, field, wt| {
            let Some(e) = r.sub(wt, end)? else {
                return Ok(false);
            };
            match field {
                1 => r.node(e, depth + 1, found)?,
                5 => {
                    let name = r.tensor(e, found)?;
                    if main {
                        found.initializers.insert(name);
                    }
                }
                11 if main => {
                    let input = r.value_info(e)?;
                    found.inputs.push(input);
                }
                15 => r.sparse(e, found)?,
                _ => r.skip_to(e)?,
            }
            Ok(true)
        })
    }

    /// A NodeProto: only its attributes' tensors and subgraphs matter.
    fn node(&mut self, end: u64, depth: usize, found: &mut Found) -> Res<()> {
        if depth > MAX_DEPTH {
            return Err(format!("messages nested deeper than {MAX_DEPTH}"));
        }
        self.fields(end, |r, field, wt| match (field, r.sub(wt, end)?) {
            (5, Some(ae)) => r
                .fields(ae, |r, field, wt| match (field, r.sub(wt, ae)?) {
                    (5 | 10, Some(te)) => r.tensor(te, found).map(|_| true),
                    (6 | 11, Some(ge)) => r.graph(ge, depth + 1, false, found).map(|()| true),
                    (22 | 23, Some(se)) => r.sparse(se, found).map(|()| true),
                    (_, Some(e)) => r.skip_to(e).map(|()| true),
                    _ => Ok(false),
                })
                .map(|()| true),
            (_, Some(e)) => r.skip_to(e).map(|()| true),
            _ => Ok(false),
        })
    }

    /// A SparseTensorProto: its values and indices tensors.
    fn sparse(&mut self, end: u64, found: &mut Found) -> Res<()> {
        self.fields(end, |r, field, wt| match (field, r.sub(wt, end)?) {
            (1 | 2, Some(te)) => r.tensor(te, found).map(|_| true),
            (_, Some(te)) => r.skip_to(te).map(|()| true),
            _ => Ok(false),
        })
    }

    /// A TensorProto: records its external-data location; returns its name.
    fn tensor(&mut self, end: u64, found: &mut Found) -> Res<String> {
        let mut name = String::new();
        self.fields(end, |r, field, wt| match (field, wt) {
            (8, 2) => {
                name = r.string(end)?;
                Ok(true)
            }
            (13, 2) => {
                let e = r.len_end(end)?;
                let (mut key, mut value) = (String::new(), String::new());
                r.fields(e, |r, field, wt| match (field, wt) {
                    (1, 2) => r.string(e).map(|s| key = s).map(|()| true),
                    (2, 2) => r.string(e).map(|s| value = s).map(|()| true),
                    _ => Ok(false),
                })?;
                if key == "location" {
                    found.locations.insert(value);
                }
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(name)
    }

    /// A ValueInfoProto: name, and the tensor type's element type and shape.
    fn value_info(&mut self, end: u64) -> Res<GraphInput> {
        let mut input = GraphInput {
            name: String::new(),
            elem_type: 0,
            dims: None,
        };
        self.fields(end, |r, field, wt| match (field, wt) {
            (1, 2) => r.string(end).map(|s| input.name = s).map(|()| true),
            (2, 2) => {
                let te = r.len_end(end)?;
                r.fields(te, |r, field, wt| match (field, r.sub(wt, te)?) {
                    (1, Some(e)) => r.tensor_type(e, &mut input).map(|()| true),
                    (_, Some(e)) => r.skip_to(e).map(|()| true),
                    _ => Ok(false),
                })
                .map(|()| true)
            }
            _ => Ok(false),
        })?;
        Ok(input)
    }

    /// TypeProto.Tensor: elem_type and shape.
    fn tensor_type(&mut self, end: u64, input: &mut GraphInput) -> Res<()> {
        self.fields(end, |r, field, wt| match (field, wt) {
            (1, 0) => {
                input.elem_type = r.varint(end)? as i32;
                Ok(true)
            }
            (2, 2) => {
                let se = r.len_end(end)?;
                let mut dims = Vec::new();
                r.fields(se, |r, field, wt| match (field, r.sub(wt, se)?) {
                    (1, Some(de)) => {
                        dims.push(r.dimension(de)?);
                        Ok(true)
                    }
                    (_, Some(e)) => r.skip_to(e).map(|()| true),
                    _ => Ok(false),
                })?;
                input.dims = Some(dims);
                Ok(true)
            }
            _ => Ok(false),
        })
    }

    /// TensorShapeProto.Dimension.
    fn dimension(&mut self, end: u64) -> Res<Dim> {
        let mut dim = Dim::Any;
        self.fields(end, |r, field, wt| match (field, wt) {
            (1, 0) => {
                // int64 as a varint: a negative value (never valid) reads as dynamic.
                let v = r.varint(end)? as i64;
                dim = if v >= 0 { Dim::Value(v) } else { Dim::Any };
                Ok(true)
            }
            (2, 2) => {
                let p = r.string(end)?;
                dim = if p.is_empty() {
                    Dim::Any
                } else {
                    Dim::Param(p)
                };
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> GraphInfo {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx").join(rel);
        read(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `name: [dims] type` for each input, for compact assertions.
    fn describe(info: &GraphInfo) -> Vec<String> {
        info.inputs
            .iter()
            .map(|i| {
                let dims = i.dims.as_ref().map_or("?".to_string(), |d| {
                    d.iter().map(Dim::to_string).collect::<Vec<_>>().join(",")
                });
                format!("{}:[{dims}]:{}", i.name, i.elem_type)
            })
            .collect()
    }

    #[test]
    fn tiny_sd15_inputs_and_their_dim_params() {
        assert_eq!(
            describe(&fixture("tiny-sd15/unet/model.onnx")),
            [
                "sample:[batch_size,4,height,width]:1",
                "timestep:[]:1",
                "encoder_hidden_states:[batch_size,sequence_length,32]:1",
            ]
        );
        assert_eq!(
            describe(&fixture("tiny-sd15/text_encoder/model.onnx")),
            ["input_ids:[batch_size,sequence_length]:7"]
        );
        assert_eq!(
            describe(&fixture("tiny-sd15/vae_decoder/model.onnx")),
            ["latent_sample:[batch_size,4,latent_height,latent_width]:1"]
        );
        assert_eq!(
            describe(&fixture("tiny-sd15/vae_encoder/model.onnx")),
            ["sample:[batch_size,3,sample_height,sample_width]:1"]
        );
    }

    #[test]
    fn tiny_sdxl_inputs_and_their_dim_params() {
        let unet = fixture("tiny-sdxl/unet/model.onnx");
        assert_eq!(
            describe(&unet),
            [
                "sample:[batch_size,4,height,width]:1",
                "timestep:[]:1",
                "encoder_hidden_states:[batch_size,sequence_length,48]:1",
                "text_embeds:[batch_size,32]:1",
                "time_ids:[batch_size,6]:1",
            ]
        );
        assert!(unet.input("sample").is_some_and(GraphInput::is_dynamic));
        assert!(unet.input("timestep").is_some_and(|t| !t.is_dynamic()));
        assert!(unet.external_files.is_empty());
        for c in ["text_encoder", "text_encoder_2"] {
            assert_eq!(
                describe(&fixture(&format!("tiny-sdxl/{c}/model.onnx"))),
                ["input_ids:[batch_size,sequence_length]:7"]
            );
        }
        assert_eq!(
            describe(&fixture("tiny-sdxl/vae_decoder/model.onnx")),
            ["latent_sample:[batch_size,4,latent_height,latent_width]:1"]
        );
        assert_eq!(
            describe(&fixture("tiny-sdxl/vae_encoder/model.onnx")),
            ["sample:[batch_size,3,sample_height,sample_width]:1"]
        );
    }

    #[test]
    fn lcm_and_inpaint_unets_declare_their_extra_input_and_channels() {
        assert_eq!(
            describe(&fixture("tiny-lcm/unet/model.onnx"))[3],
            "timestep_cond:[batch_size,32]:1"
        );
        assert_eq!(
            describe(&fixture("tiny-sd15-inpaint/unet/model.onnx"))[0],
            "sample:[batch_size,9,height,width]:1"
        );
    }

    /// External data is found wherever a tensor can sit (the safety fixtures put one
    /// location in each place), whatever the location says.
    #[test]
    fn external_locations_are_collected_everywhere() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/unsafe");
        for (file, want) in [
            ("safe.onnx", &["weights.bin"][..]),
            ("duplicate_location.onnx", &["/etc/passwd", "weights.bin"]),
            ("constant_attribute.onnx", &["/etc/passwd"]),
            ("function_constant.onnx", &["../../f.bin"]),
            ("sparse_initializer.onnx", &["/etc/shadow"]),
            ("sparse_attribute.onnx", &["../sp.bin"]),
            ("subgraph_initializer.onnx", &["../x.bin"]),
            ("nested_subgraph_constant.onnx", &["*/_ORT_MEM_ADDR_/*"]),
        ] {
            let info = read(&dir.join(file)).unwrap();
            assert_eq!(info.external_files, want, "{file}");
            assert_eq!(describe(&info), ["x:[1]:1"], "{file}");
        }
    }

    /// A minimal protobuf writer for hand-built models.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field(n: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    fn int_field(n: u64, v: u64, out: &mut Vec<u8>) {
        varint(n << 3, out);
        varint(v, out);
    }

    fn value_info(name: &str, dims: &[Result<u64, &str>]) -> Vec<u8> {
        let mut shape = Vec::new();
        for d in dims {
            let mut dim = Vec::new();
            match d {
                Ok(v) => int_field(1, *v, &mut dim),
                Err("") => {}
                Err(p) => field(2, p.as_bytes(), &mut dim),
            }
            field(1, &dim, &mut shape);
        }
        let mut tensor = Vec::new();
        int_field(1, 1, &mut tensor);
        field(2, &shape, &mut tensor);
        let mut ty = Vec::new();
        field(1, &tensor, &mut ty);
        let mut vi = Vec::new();
        field(1, name.as_bytes(), &mut vi);
        field(2, &ty, &mut vi);
        vi
    }

    /// An old-style export: the weight `w` is both an initializer (with external data) and
    /// a graph input; only `x` is fed.
    #[test]
    fn initializers_listed_as_inputs_are_left_out() {
        let mut entry = Vec::new();
        field(1, b"location", &mut entry);
        field(2, b"model.onnx_data", &mut entry);
        let mut w = Vec::new();
        field(8, b"w", &mut w);
        field(13, &entry, &mut w);
        let mut graph = Vec::new();
        field(5, &w, &mut graph);
        field(
            11,
            &value_info("x", &[Err("batch"), Ok(3), Err("")]),
            &mut graph,
        );
        field(11, &value_info("w", &[Ok(3)]), &mut graph);
        let mut model = Vec::new();
        int_field(1, 8, &mut model);
        field(7, &graph, &mut model);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, &model).unwrap();
        let info = read(&path).unwrap();
        assert_eq!(
            info.inputs,
            [GraphInput {
                name: "x".into(),
                elem_type: 1,
                dims: Some(vec![Dim::Param("batch".into()), Dim::Value(3), Dim::Any]),
            }]
        );
        assert_eq!(info.external_files, ["model.onnx_data"]);

        // Cut short: refused, naming the file.
        std::fs::write(&path, &model[..model.len() - 3]).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: cannot read the graph inputs:",
                path.display()
            )),
            "{err}"
        );
        let err = read(&dir.path().join("none.onnx")).unwrap_err().to_string();
        assert!(err.contains("none.onnx"), "{err}");
    }
}
