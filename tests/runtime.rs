//! ONNX Runtime integration: the real library from `scripts/setup` loads, runs a
//! committed graph (tests/data/affine_relu.onnx, from onnx/make_test_graph.py) and
//! returns the numbers worked out by hand; wrong or missing libraries give the
//! actionable error (checked through the real binary, since a process can load
//! ONNX Runtime only once).

use std::path::Path;
use std::process::Command;

use diffusiond::runtime::{Runtime, RuntimeSettings};
use ndarray::array;
use ort::value::Tensor;

fn graph() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/affine_relu.onnx")
}

#[test]
fn runs_committed_graph_and_checks_numbers() {
    let mut settings = RuntimeSettings::default();
    settings.session.intra_threads = 1;
    let runtime = Runtime::init(settings).expect("runtime loads (run scripts/setup)");
    assert!(runtime.version().starts_with("1."), "{}", runtime.version());
    let mut session = runtime.session(&graph()).unwrap();
    assert_eq!(session.inputs()[0].name(), "x");
    assert_eq!(session.outputs()[0].name(), "y");

    let x = array![[1.0f32, 2.0], [-1.0, 0.5], [0.0, 0.0], [-3.0, -3.0]];
    let outputs = session
        .run(ort::inputs!["x" => Tensor::from_array(x).unwrap()])
        .unwrap();
    let y = outputs["y"].try_extract_array::<f32>().unwrap();
    // relu(x @ [[1,-1,0.5],[2,0,-0.5]] + [0.5,1,-1]), by hand:
    let expected = array![
        [5.5f32, 0.0, 0.0],
        [0.5, 2.0, 0.0],
        [0.5, 1.0, 0.0],
        [0.0, 4.0, 0.0]
    ];
    assert_eq!(y.shape(), &[4, 3]);
    assert_eq!(y, expected.into_dyn());
}

fn diffusiond() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusiond"));
    cmd.env_remove("ORT_DYLIB_PATH").env("RUST_LOG", "off");
    cmd
}

#[test]
fn version_names_runtime_and_providers() {
    let out = diffusiond().arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("diffusiond {}", env!("CARGO_PKG_VERSION"))));
    assert!(text.contains("ONNX Runtime 1.32.0"), "{text}");
    assert!(text.contains("CPUExecutionProvider"), "{text}");
}

#[test]
fn wrong_ort_dylib_path_is_an_actionable_error() {
    let out = diffusiond()
        .arg("--version")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/nonexistent/libonnxruntime.so (ORT_DYLIB_PATH): no such file"),
        "{err}"
    );
    assert!(err.contains("Fix: run 'scripts/setup'"), "{err}");
    // An explicit choice is final: nothing else is tried after it.
    assert!(!err.contains("system library path"), "{err}");
}

#[test]
fn missing_runtime_lists_every_place_and_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let out = diffusiond()
        .arg("--version")
        // No project runtime, no python3 on PATH, nothing on the loader path.
        .env("DIFFUSIOND_RUNTIME__PROJECT_DIR", empty.path())
        .env("PATH", empty.path())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for place in [
        "(beside the executable)",
        "(project runtime folder)",
        "(system library path)",
    ] {
        assert!(err.contains(place), "missing {place} in: {err}");
    }
    assert!(err.contains("Fix: run 'scripts/setup'"), "{err}");
}

#[test]
fn bad_config_key_stops_startup_naming_it() {
    let out = diffusiond()
        .arg("--version")
        .env("DIFFUSIOND_RUNTIME__CUDA__CONV_ALGORITHM_SEARCH", "fastest")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("runtime.cuda.conv_algorithm_search"), "{err}");
}
