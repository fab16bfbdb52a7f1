//! Tests of the ONNX graph reader: a hand-encoded model and the fixture UNet.

use std::io::Cursor;

use super::*;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(number: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(number) << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn int(number: u32, v: u64, out: &mut Vec<u8>) {
    varint(u64::from(number) << 3, out);
    varint(v, out);
}

fn read(bytes: &[u8]) -> Result<Graph, GraphError> {
    Graph::read(Cursor::new(bytes), bytes.len() as u64, Path::new("m.onnx"))
}

/// A model with one Gemm node (transB = 1, and a float attribute that is skipped), an
/// initializer with raw data and unpacked dims, and one with external data and packed dims.
fn model() -> (Vec<u8>, u64) {
    let mut attr = Vec::new();
    field(1, b"transB", &mut attr);
    int(3, 1, &mut attr);
    int(20, 2, &mut attr);
    let mut alpha = Vec::new();
    field(1, b"alpha", &mut alpha);
    alpha.extend_from_slice(&[0x15, 0, 0, 0x80, 0x3f]); // f = 1.0, wire type 5
    let mut node = Vec::new();
    for input in ["x", "w", "b"] {
        field(1, input.as_bytes(), &mut node);
    }
    field(2, b"y", &mut node);
    field(3, b"/time_embedding/linear_1/Gemm", &mut node);
    field(4, b"Gemm", &mut node);
    field(5, &attr, &mut node);
    field(5, &alpha, &mut node);

    let mut raw = Vec::new();
    int(1, 3, &mut raw);
    int(1, 2, &mut raw);
    int(2, 1, &mut raw);
    field(8, b"w", &mut raw);
    let prefix = raw.len();
    field(9, &[7u8; 24], &mut raw);
    let raw_data_at = prefix as u64 + 2; // tag and one-byte length

    let mut ext = Vec::new();
    let mut dims = Vec::new();
    varint(300, &mut dims);
    varint(4, &mut dims);
    field(1, &dims, &mut ext);
    int(2, 10, &mut ext);
    field(8, b"onnx::MatMul_9", &mut ext);
    for (k, v) in [
        ("location", "weights.pb"),
        ("offset", "4096"),
        ("length", "2400"),
    ] {
        let mut entry = Vec::new();
        field(1, k.as_bytes(), &mut entry);
        field(2, v.as_bytes(), &mut entry);
        field(13, &entry, &mut ext);
    }
    int(14, 1, &mut ext);

    let mut graph = Vec::new();
    field(1, &node, &mut graph);
    field(2, b"main", &mut graph);
    let raw_at = graph.len() as u64 + 2;
    field(5, &raw, &mut graph);
    field(5, &ext, &mut graph);
    let mut model = Vec::new();
    int(1, 8, &mut model); // ir_version
    field(2, b"pytorch", &mut model);
    let graph_at = model.len() as u64 + 3; // tag and two-byte length
    field(7, &graph, &mut model);
    (model, graph_at + raw_at + raw_data_at)
}

#[test]
fn reads_nodes_and_initializers_without_their_data() {
    let (bytes, raw_offset) = model();
    let g = read(&bytes).unwrap();
    assert_eq!(g.nodes.len(), 1);
    let n = &g.nodes[0];
    assert_eq!(
        (n.name.as_str(), n.op_type.as_str()),
        ("/time_embedding/linear_1/Gemm", "Gemm")
    );
    assert_eq!(
        (n.inputs.clone(), n.outputs.clone()),
        (vec!["x".into(), "w".into(), "b".into()], vec!["y".into()])
    );
    assert_eq!(n.int_attribute("transB"), Some(1));
    assert_eq!(n.int_attribute("alpha"), None);
    let w = g.initializer("w").unwrap();
    assert_eq!(
        (w.dims.clone(), w.data_type),
        (vec![3, 2], data_type::FLOAT)
    );
    assert_eq!(
        w.data,
        TensorData::Raw {
            offset: raw_offset,
            len: 24
        }
    );
    assert_eq!(&bytes[raw_offset as usize..][..24], &[7u8; 24]);
    let e = g.initializer("onnx::MatMul_9").unwrap();
    assert_eq!(
        (e.dims.clone(), e.data_type),
        (vec![300, 4], data_type::FLOAT16)
    );
    assert_eq!(
        e.data,
        TensorData::External {
            location: "weights.pb".into(),
            offset: 4096,
            length: Some(2400)
        }
    );
}

#[test]
fn a_truncated_file_is_an_error_naming_it() {
    let (bytes, _) = model();
    let err = read(&bytes[..bytes.len() - 5]).unwrap_err();
    assert!(matches!(err, GraphError::Malformed { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("m.onnx: malformed ONNX protobuf at byte "),
        "{err}"
    );
    let err = read(&[0x08, 0x08]).unwrap_err();
    assert_eq!(err.to_string(), "m.onnx: the ONNX model has no graph");
    let err = read(&[0x3b, 0x08]).unwrap_err();
    assert!(err.to_string().contains("unsupported wire type 3"), "{err}");
}

#[test]
fn reads_the_fixture_unet() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sd15/unet/model.onnx");
    let g = Graph::open(&path).unwrap();
    let q = g.initializer("onnx::MatMul_1628").unwrap();
    assert_eq!(q.dims, vec![32, 32]);
    let TensorData::Raw { offset, len } = q.data else {
        panic!("{:?}", q.data)
    };
    assert_eq!(len, 32 * 32 * 4);
    assert!(offset + len <= std::fs::metadata(&path).unwrap().len());
    assert!(g.nodes.iter().any(|n| n.name
        == "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul"
        && n.inputs[1] == "onnx::MatMul_1628"));
    let err = Graph::open(Path::new("/nonexistent/model.onnx")).unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/model.onnx: "),
        "{err}"
    );
}
