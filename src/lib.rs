//! diffusiond: Stable Diffusion ONNX pipelines on ONNX Runtime, served over D-Bus.
//!
//! The library holds every concept in its own module; the two binaries
//! (`diffusiond`, `diffusionctl`) are thin front ends over it.

pub mod batch;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod heap;
pub mod jobs;
pub mod local;
/// LoRA files: mapping their layers onto an exported graph's initializers.
pub mod lora;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod prompt_syntax;
pub mod request;
pub mod rng;
pub mod runtime;
pub mod scheduler;
pub mod tokenizer;
pub mod wire;

/// diffusiond's own version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The text `--version` prints: our version, ONNX Runtime's, and the execution
/// providers (those the library offers, and those sessions will use).
pub fn version_report(runtime: &runtime::Runtime) -> String {
    let available = runtime::available_providers().unwrap_or_default();
    let in_use: Vec<String> = runtime.providers().iter().map(|p| p.to_string()).collect();
    let mut report = format!(
        "diffusiond {VERSION}\nONNX Runtime {} ({})\nexecution providers available: {}\nexecution providers in use: {}\n",
        runtime.version(),
        runtime.library().path.display(),
        available.join(", "),
        in_use.join(", "),
    );
    for skipped in runtime.skipped_providers() {
        report += &format!("not used: {}: {}\n", skipped.provider, skipped.reason);
    }
    let workers: Vec<String> = runtime
        .workers()
        .iter()
        .map(|w| w.device().to_string())
        .collect();
    report += &format!("workers: {}\n", workers.join(", "));
    if available.iter().any(|p| p == "CUDAExecutionProvider") {
        report += &match runtime::gpu::cuda_devices() {
            Ok(n) => format!("CUDA devices: {n}\n"),
            Err(reason) => format!("CUDA devices: none ({reason})\n"),
        };
    }
    report
}

/// Logging setup shared by the binaries.
pub mod logging {
    /// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default `warn`). Enabled
    /// spans log their duration when they close (`RUST_LOG=diffusiond=debug`: one line per
    /// pipeline stage; `trace`: per step and UNet run).
    pub fn init() {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}
