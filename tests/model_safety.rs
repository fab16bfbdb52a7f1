//! Model-file safety: each crafted ONNX file in tests/data/unsafe (made by
//! onnx/make_unsafe_models.py) breaks one rule in one place a tensor can sit, and is
//! refused with a message naming the file, the tensor and the rule; the shipped models
//! pass; over D-Bus a refused model is `ModelLoadFailed` and client paths are never used.
//! Model folders whose files are FIFOs, devices, symlink loops or too large are
//! `unreadable` (saying why) while the other models are served.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{Daemon, PrivateBus, root};
use diffusiond::model::safety::{self, Rule, SafetyError};
use diffusiond::model::{ModelBundle, ModelError};
use zbus::zvariant::{OwnedValue, Value};

fn unsafe_dir() -> PathBuf {
    root().join("tests/data/unsafe")
}

/// Copies a crafted file into a fresh folder next to `weights.bin`, a symlink `link.bin`
/// to a file outside the folder and `linkdir/` to a folder outside it.
fn staged(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(outside.join("weights.bin"), [0u8; 4]).unwrap();
    std::fs::write(dir.join("weights.bin"), [0u8; 4]).unwrap();
    std::os::unix::fs::symlink(outside.join("weights.bin"), dir.join("link.bin")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("linkdir")).unwrap();
    let file = dir.join("model.onnx");
    std::fs::copy(unsafe_dir().join(format!("{name}.onnx")), &file).unwrap();
    (tmp, file)
}

#[test]
fn each_crafted_file_is_refused_for_its_rule() {
    let cases = [
        ("absolute", "w_abs", Rule::Absolute),
        ("parent_dir", "w_up", Rule::ParentDir),
        ("memory_address", "w_mem", Rule::MemoryAddress),
        ("duplicate_location", "w_dup", Rule::DuplicateLocation),
        ("symlink_file", "w_link", Rule::SymlinkEscape),
        ("symlink_dir", "w_linkdir", Rule::SymlinkEscape),
        ("constant_attribute", "c_value", Rule::Absolute),
        ("subgraph_initializer", "w_sub", Rule::ParentDir),
        ("nested_subgraph_constant", "d_value", Rule::MemoryAddress),
        ("sparse_initializer", "s_values", Rule::Absolute),
        ("sparse_attribute", "sp_values", Rule::ParentDir),
        ("function_constant", "f_value", Rule::ParentDir),
    ];
    let mut failures = Vec::new();
    for (name, tensor, rule) in cases {
        let (_tmp, file) = staged(name);
        match safety::check_file(&file) {
            Err(e @ SafetyError::Refused { .. }) => {
                let msg = e.to_string();
                println!("{name}: {msg}");
                if e.rule() != Some(rule)
                    || !msg.contains(&file.display().to_string())
                    || !msg.contains(&format!("'{tensor}'"))
                    || !msg.contains(rule.name())
                {
                    failures.push(format!(
                        "{name}: expected {rule:?} on '{tensor}', got: {msg}"
                    ));
                }
            }
            other => failures.push(format!("{name}: expected {rule:?}, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn subgraph_and_constant_refusals_say_where_the_tensor_sits() {
    let (_tmp, file) = staged("nested_subgraph_constant");
    let msg = safety::check_file(&file).unwrap_err().to_string();
    assert!(msg.contains("if_node"), "{msg}");
    assert!(msg.contains("subgraph"), "{msg}");
    assert!(msg.contains("attribute 'value'"), "{msg}");
    let (_tmp, file) = staged("function_constant");
    let msg = safety::check_file(&file).unwrap_err().to_string();
    assert!(msg.contains("function 'Unsafe'"), "{msg}");
}

#[test]
fn a_safe_external_location_passes() {
    let (_tmp, file) = staged("safe");
    safety::check_file(&file).unwrap();
}

#[test]
fn truncated_and_garbage_files_are_malformed_not_panics() {
    let bytes = std::fs::read(unsafe_dir().join("nested_subgraph_constant.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.onnx");
    for cut in (1..bytes.len()).step_by(7) {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let _ = safety::check_file(&file); // Any answer but a panic.
    }
    std::fs::write(&file, [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap();
    assert!(matches!(
        safety::check_file(&file),
        Err(SafetyError::Malformed { .. })
    ));
}

/// Every .onnx file below `dir`.
fn onnx_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            onnx_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "onnx") {
            out.push(p);
        }
    }
}

#[test]
fn the_shipped_models_pass() {
    let mut files = Vec::new();
    for m in ["tiny-sd15", "tiny-sd2-v", "tiny-sdxl", "tiny-demo"] {
        let dir = root().join("onnx").join(m);
        if dir.is_dir() {
            ModelBundle::open(&dir).unwrap_or_else(|e| panic!("{m}: {e}"));
            onnx_files(&dir, &mut files);
        }
    }
    assert!(!files.is_empty());
    for f in files {
        safety::check_file(&f).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A copy of tiny-sd15 whose UNet is the crafted `absolute.onnx`.
fn bad_model() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&root().join("onnx/tiny-sd15"), tmp.path());
    std::fs::copy(
        unsafe_dir().join("absolute.onnx"),
        tmp.path().join("unet/model.onnx"),
    )
    .unwrap();
    tmp
}

#[test]
fn model_bundle_open_refuses_an_unsafe_component() {
    let tmp = bad_model();
    let err = ModelBundle::open(tmp.path()).unwrap_err();
    assert!(matches!(err, ModelError::Unsafe(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("unet/model.onnx") && msg.contains("w_abs"),
        "{msg}"
    );
}

fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => format!("{other:?}"),
    }
}

#[test]
fn over_dbus_an_unsafe_model_is_model_load_failed_and_paths_are_not_models() {
    let tmp = bad_model();
    let bus = PrivateBus::start();
    let extra = format!("[models.bad]\npath = \"{}\"\n", tmp.path().display());
    let _d = Daemon::start(&bus, &extra);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let conn = bus.connect().await;
            let manager = zbus::Proxy::new(
                &conn,
                "io.github.Diffusiond1",
                "/io/github/Diffusiond1",
                "io.github.Diffusiond1.Manager",
            )
            .await
            .unwrap();
            let req = |model: &str| -> HashMap<String, OwnedValue> {
                [
                    ("prompt", Value::from("x")),
                    ("model", Value::from(model)),
                    ("steps", Value::U32(1)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
                .collect()
            };
            let err = manager
                .call::<_, _, zbus::zvariant::OwnedObjectPath>("Generate", &(req("bad"),))
                .await
                .unwrap_err();
            assert_eq!(
                error_name(&err),
                "io.github.Diffusiond1.Error.ModelLoadFailed"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("unet/model.onnx")
                    && msg.contains("w_abs")
                    && msg.contains("absolute-path"),
                "{msg}"
            );
            let err = manager
                .call::<_, _, ()>("LoadModel", &("bad",))
                .await
                .unwrap_err();
            assert_eq!(
                error_name(&err),
                "io.github.Diffusiond1.Error.ModelLoadFailed",
                "{err}"
            );
            // A client cannot name a folder: model names are config keys only.
            let path = root().join("onnx/tiny-sd15").display().to_string();
            for model in [path.as_str(), "/etc", "../tiny", "tiny/../bad"] {
                let err = manager
                    .call::<_, _, zbus::zvariant::OwnedObjectPath>("Generate", &(req(model),))
                    .await
                    .unwrap_err();
                assert_eq!(
                    error_name(&err),
                    "io.github.Diffusiond1.Error.UnknownModel",
                    "{model}"
                );
                let err = manager
                    .call::<_, _, ()>("LoadModel", &(model,))
                    .await
                    .unwrap_err();
                assert_eq!(
                    error_name(&err),
                    "io.github.Diffusiond1.Error.UnknownModel",
                    "{model}"
                );
            }
        });
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Folders with one hostile file each, by model name, and what their error must say.
fn hostile_models(tmp: &Path) -> Vec<(&'static str, PathBuf, &'static str)> {
    let folder = |name: &str| {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let fifo = folder("fifo");
    mkfifo(&fifo.join("model_index.json"));
    let zero = folder("zero");
    std::os::unix::fs::symlink("/dev/zero", zero.join("model_index.json")).unwrap();
    let looped = folder("looped");
    let index = looped.join("model_index.json");
    std::os::unix::fs::symlink(&index, &index).unwrap();
    let loop_dir = tmp.join("loop-dir");
    std::os::unix::fs::symlink(&loop_dir, &loop_dir).unwrap();
    let huge = folder("huge");
    let f = std::fs::File::create(huge.join("model_index.json")).unwrap();
    f.set_len(diffusiond::model::small_file::MAX_CONFIG_BYTES + 1)
        .unwrap();
    vec![
        ("fifo", fifo, "FIFO (named pipe), not a regular file"),
        ("zero", zero, "character device, not a regular file"),
        ("looped", looped, "symlink loop"),
        ("loopdir", loop_dir, "symlink loop"),
        ("huge", huge, "limit"),
    ]
}

/// The daemon starts with a FIFO, `/dev/zero`, a symlink loop and an oversized file as
/// `model_index.json` (and a folder that is a symlink loop) configured beside the good
/// model: it serves the good one; `ListModels` shows each bad one `unreadable` with its
/// error naming the file and what is wrong; `Generate` on one is `ModelLoadFailed` saying
/// the same. A model whose `tokenizer/vocab.json` is a FIFO (read at load time) fails its
/// load saying so, and the worker goes on.
#[test]
fn models_whose_files_are_not_regular_files_are_unreadable_and_the_rest_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let models = hostile_models(tmp.path());
    let tok = tmp.path().join("tokfifo");
    common::copy_dir(&root().join("onnx/tiny-sd15"), &tok);
    std::fs::remove_file(tok.join("tokenizer/tokenizer.json")).unwrap();
    std::fs::remove_file(tok.join("tokenizer/vocab.json")).unwrap();
    mkfifo(&tok.join("tokenizer/vocab.json"));
    let mut extra = String::new();
    for (name, path, _) in &models {
        extra += &format!("[models.{name}]\npath = \"{}\"\n", path.display());
    }
    extra += &format!("[models.tokfifo]\npath = \"{}\"\n", tok.display());
    let bus = PrivateBus::start();
    let started = std::time::Instant::now();
    let _d = Daemon::start(&bus, &extra);
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    common::tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let manager = zbus::Proxy::new(
            &conn,
            "io.github.Diffusiond1",
            "/io/github/Diffusiond1",
            "io.github.Diffusiond1.Manager",
        )
        .await
        .unwrap();
        let list: Vec<common::Dict> = manager.call("ListModels", &()).await.unwrap();
        let field = |name: &str, key: &str| -> String {
            let m = list
                .iter()
                .find(|m| <&str>::try_from(&m["name"]).unwrap() == name)
                .unwrap_or_else(|| panic!("{name} not listed"));
            <&str>::try_from(&m[key]).unwrap().to_string()
        };
        assert_eq!(field("tiny", "kind"), "sd");
        assert_eq!(field("tiny", "error"), "");
        assert_eq!(
            field("tokfifo", "kind"),
            "sd",
            "its tokenizer is read at load"
        );
        for (name, path, why) in &models {
            assert_eq!(field(name, "kind"), "unreadable", "{name}");
            let error = field(name, "error");
            println!("{name}: {error}");
            assert!(
                error.contains(&path.display().to_string()) && error.contains(why),
                "{name}: {error}"
            );
        }
        let req = |model: &str| {
            common::request_dict(&[
                ("prompt", Value::from("x")),
                ("model", Value::from(model)),
                ("steps", Value::U32(1)),
            ])
        };
        let err = common::generate(&conn, req("fifo")).await.unwrap_err();
        assert_eq!(
            error_name(&err),
            "io.github.Diffusiond1.Error.ModelLoadFailed"
        );
        assert!(err.to_string().contains("FIFO"), "{err}");
        let err = manager
            .call::<_, _, ()>("LoadModel", &("tokfifo",))
            .await
            .unwrap_err();
        assert_eq!(
            error_name(&err),
            "io.github.Diffusiond1.Error.ModelLoadFailed",
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("vocab.json") && msg.contains("FIFO"), "{msg}");
        // The good model is served.
        let job = common::generate(&conn, req("tiny")).await.unwrap();
        let result = common::wait(&conn, &job).await.unwrap();
        assert_eq!(common::result_pngs(&result).len(), 1);
    });
}
