//! The GPU runtime on a machine without a GPU: `scripts/setup --gpu` installs
//! onnxruntime-gpu 1.31.1 and the CUDA 13 libraries into a scratch copy of the scripts
//! folder, and diffusiond, asked for `["tensorrt", "cuda", "cpu"]`, loads that library (both
//! NVIDIA providers listed), preloads the CUDA libraries by itself, skips each NVIDIA
//! provider with the loader's exact reason, serves on the CPU and says so in
//! `ExecutionProviders`.
//!
//! Opt-in (`cargo test --test gpu_runtime -- --ignored`): the install downloads about
//! 1.5 GB from PyPI (about 45 s here, 2 cores). Where a CUDA device is present the test
//! checks the opposite: both providers in use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Daemon, PrivateBus, config_text, generate, result_pngs, tokio_runtime, wait};
use zbus::zvariant::Value;

/// Runs `scripts/setup --gpu` in a scratch root; the library it installed.
fn install_gpu_runtime(scratch: &Path) -> PathBuf {
    std::fs::create_dir_all(scratch.join("scripts")).unwrap();
    std::fs::copy(
        common::root().join("scripts/setup"),
        scratch.join("scripts/setup"),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let o = Command::new("bash")
        .arg(scratch.join("scripts/setup"))
        .arg("--gpu")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scripts/setup --gpu: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("scripts/setup --gpu took {:.0?}", started.elapsed());
    // Idempotent: a second run does nothing.
    let again = Command::new("bash")
        .arg(scratch.join("scripts/setup"))
        .arg("--gpu")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("already in"));
    scratch.join("runtime/lib/libonnxruntime.so.1.31.1")
}

fn has_cuda_device() -> bool {
    Path::new("/dev/nvidia0").exists()
}

#[test]
#[ignore = "downloads about 1.5 GB: cargo test --test gpu_runtime -- --ignored"]
fn the_gpu_runtime_installs_and_falls_back_to_the_cpu_with_reasons() {
    let scratch = tempfile::tempdir().unwrap();
    let library = install_gpu_runtime(scratch.path());
    let runtime_keys = format!(
        "[runtime]\nexecution_providers = [\"tensorrt\", \"cuda\", \"cpu\"]\nlibrary_path = \"{}\"\n",
        library.display()
    );
    let config = scratch.path().join("diffusiond.toml");
    std::fs::write(&config, config_text(&runtime_keys)).unwrap();

    let o = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["--config", config.to_str().unwrap(), "--version"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("ONNX Runtime 1.31.1"), "{stdout}");
    assert!(
        stdout.contains(
            "available: TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider"
        ),
        "{stdout}"
    );
    if has_cuda_device() {
        assert!(stdout.contains("in use: cuda, cpu"), "{stdout}");
        return;
    }
    assert!(stdout.contains("in use: cpu\n"), "{stdout}");
    // No TensorRT installed (no --tensorrt): the library it misses is named.
    assert!(
        stdout.contains("not used: tensorrt: libonnxruntime_providers_tensorrt.so cannot be loaded: libnvinfer.so.10"),
        "{stdout}"
    );
    // The CUDA 13 libraries were preloaded, so what is missing is the driver itself.
    assert!(
        stdout.contains("not used: cuda: ") && stdout.contains("libcuda.so.1"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("libcublas") && !stdout.contains("libcudnn"),
        "the pip-installed CUDA libraries are found without LD_LIBRARY_PATH: {stdout}"
    );
    assert!(
        stdout.contains("CUDA devices: none (no NVIDIA driver"),
        "{stdout}"
    );
    for provider in ["tensorrt", "cuda"] {
        assert!(
            stderr.contains(&format!("falling back provider={provider}")),
            "a warning per skipped provider: {stderr}"
        );
    }

    // The daemon starts with that config, serves on the CPU and says so.
    let bus = PrivateBus::start();
    let _d = Daemon::start_with_config(&bus, &std::fs::read_to_string(&config).unwrap());
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let manager = zbus::Proxy::new(
            &conn,
            "io.github.Diffusiond1",
            "/io/github/Diffusiond1",
            "io.github.Diffusiond1.Manager",
        )
        .await
        .unwrap();
        let providers: Vec<String> = manager.get_property("ExecutionProviders").await.unwrap();
        assert_eq!(providers, ["cpu"]);
        let version: String = manager.get_property("RuntimeVersion").await.unwrap();
        assert_eq!(version, "1.31.1");
        let job = generate(
            &conn,
            common::request_dict(&[
                ("prompt", Value::from("a lighthouse")),
                ("steps", Value::U32(2)),
            ]),
        )
        .await
        .unwrap();
        assert_eq!(result_pngs(&wait(&conn, &job).await.unwrap()).len(), 1);
    });
}
