//! Runtime settings: the `[runtime]` table of the config file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// An execution provider diffusiond can ask ONNX Runtime for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// NVIDIA TensorRT (needs the `tensorrt` cargo feature and `onnxruntime-gpu`).
    Tensorrt,
    /// NVIDIA CUDA (needs the `cuda` cargo feature and `onnxruntime-gpu`).
    Cuda,
    /// The always-present CPU provider.
    Cpu,
}

impl ProviderKind {
    /// ONNX Runtime's name for the provider, as `GetAvailableProviders` lists it.
    pub fn ort_name(self) -> &'static str {
        match self {
            ProviderKind::Tensorrt => "TensorrtExecutionProvider",
            ProviderKind::Cuda => "CUDAExecutionProvider",
            ProviderKind::Cpu => "CPUExecutionProvider",
        }
    }

    /// Whether this build of diffusiond was compiled with support for the provider.
    pub fn compiled_in(self) -> bool {
        match self {
            ProviderKind::Tensorrt => cfg!(feature = "tensorrt"),
            ProviderKind::Cuda => cfg!(feature = "cuda"),
            ProviderKind::Cpu => true,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::Tensorrt => "tensorrt",
            ProviderKind::Cuda => "cuda",
            ProviderKind::Cpu => "cpu",
        })
    }
}

/// Graph optimization level, as ONNX Runtime names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizationLevel {
    /// No graph optimizations.
    Disable,
    /// Basic (constant folding, redundant node elimination).
    Basic,
    /// Extended (fusions).
    Extended,
    /// Everything, including layout optimizations.
    #[default]
    All,
}

/// Session options shared by every model session.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Threads inside one operator; 0 lets ONNX Runtime choose (one per physical core).
    pub intra_threads: usize,
    /// Threads across independent operators; 0 lets ONNX Runtime choose.
    pub inter_threads: usize,
    /// Graph optimization level.
    pub optimization_level: OptimizationLevel,
    /// Use the CPU memory arena (faster repeated runs, memory kept between runs).
    pub cpu_arena: bool,
    /// Use memory pattern planning for fixed-shape runs.
    pub memory_pattern: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            intra_threads: 0,
            inter_threads: 0,
            optimization_level: OptimizationLevel::All,
            cpu_arena: true,
            memory_pattern: true,
        }
    }
}

/// CUDA execution provider options (passed through to ONNX Runtime).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CudaSettings {
    /// GPU index.
    pub device_id: i32,
    /// Arena memory limit in bytes; 0 means no limit.
    pub memory_limit: usize,
    /// `next_power_of_two` or `same_as_requested`.
    pub arena_extend_strategy: String,
    /// cuDNN convolution algorithm search: `exhaustive`, `heuristic` or `default`.
    pub conv_algorithm_search: String,
}

impl Default for CudaSettings {
    fn default() -> Self {
        CudaSettings {
            device_id: 0,
            memory_limit: 0,
            arena_extend_strategy: "next_power_of_two".into(),
            conv_algorithm_search: "exhaustive".into(),
        }
    }
}

/// TensorRT execution provider options (passed through to ONNX Runtime).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TensorRtSettings {
    /// GPU index.
    pub device_id: i32,
    /// Build fp16 engines.
    pub fp16: bool,
    /// Where built engines are cached; empty disables the cache.
    pub engine_cache_dir: Option<PathBuf>,
    /// Where the timing cache lives; empty disables it.
    pub timing_cache_dir: Option<PathBuf>,
    /// Builder optimization level, 0–5 (TensorRT's default is 3).
    pub builder_optimization_level: u8,
}

impl Default for TensorRtSettings {
    fn default() -> Self {
        TensorRtSettings {
            device_id: 0,
            fp16: true,
            engine_cache_dir: None,
            timing_cache_dir: None,
            builder_optimization_level: 3,
        }
    }
}

/// The `[runtime]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Explicit path to `libonnxruntime.so` (or its folder). Tried first.
    pub library_path: Option<PathBuf>,
    /// The project-local runtime folder `scripts/setup` fills (default: `runtime/` in the
    /// source tree diffusiond was built from).
    pub project_dir: Option<PathBuf>,
    /// Execution providers in order of preference; unavailable ones fall back to the next.
    pub execution_providers: Vec<ProviderKind>,
    /// Session options.
    pub session: SessionSettings,
    /// CUDA options.
    pub cuda: CudaSettings,
    /// TensorRT options.
    pub tensorrt: TensorRtSettings,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            library_path: None,
            project_dir: None,
            execution_providers: vec![ProviderKind::Cpu],
            session: SessionSettings::default(),
            cuda: CudaSettings::default(),
            tensorrt: TensorRtSettings::default(),
        }
    }
}
