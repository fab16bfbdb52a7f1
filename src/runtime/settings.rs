//! Runtime settings: the `[runtime]` table of the config file.
//!
//! Every provider option is typed, so a bad value is refused once, when the config is
//! loaded, with an error that names its key (the `config` crate appends
//! `for key `runtime.cuda.conv_algorithm_search`` to serde's message). Nothing downstream
//! re-parses these values or falls back silently.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::tensorrt;

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
    /// Use the CPU memory arena (on by default). Every step of a batch reuses its
    /// buffers (without it a 512² job took 3.5× as long); the pipeline shrinks it after
    /// each batch's last UNet step and VAE run, so a daemon that once ran a large request
    /// does not keep that peak (docs/memory.md).
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

/// How the CUDA memory arena grows when it runs out (`runtime.cuda.arena_extend_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtendStrategy {
    /// `next_power_of_two`: each extension is a power of two larger (ONNX Runtime's default).
    #[default]
    NextPowerOfTwo,
    /// `same_as_requested`: extend by exactly the amount requested (less memory held).
    SameAsRequested,
}

impl ArenaExtendStrategy {
    /// The same strategy as `ort` spells it.
    pub fn to_ort(self) -> ort::ep::ArenaExtendStrategy {
        match self {
            ArenaExtendStrategy::NextPowerOfTwo => ort::ep::ArenaExtendStrategy::NextPowerOfTwo,
            ArenaExtendStrategy::SameAsRequested => ort::ep::ArenaExtendStrategy::SameAsRequested,
        }
    }
}

impl fmt::Display for ArenaExtendStrategy {
    /// The config file's spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArenaExtendStrategy::NextPowerOfTwo => "next_power_of_two",
            ArenaExtendStrategy::SameAsRequested => "same_as_requested",
        })
    }
}

/// How cuDNN picks a convolution algorithm (`runtime.cuda.conv_algorithm_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvAlgorithmSearch {
    /// `exhaustive`: benchmark every algorithm on first run (slow first run, fastest after).
    #[default]
    Exhaustive,
    /// `heuristic`: take cuDNN's heuristic ranking without benchmarking.
    Heuristic,
    /// `default`: always use cuDNN's default algorithm (least memory; not ONNX Runtime's
    /// default search, which is `exhaustive`).
    Default,
}

impl ConvAlgorithmSearch {
    /// The same search as `ort` spells it.
    #[cfg(feature = "cuda")]
    pub fn to_ort(self) -> ort::ep::cuda::ConvAlgorithmSearch {
        match self {
            ConvAlgorithmSearch::Exhaustive => ort::ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvAlgorithmSearch::Heuristic => ort::ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvAlgorithmSearch::Default => ort::ep::cuda::ConvAlgorithmSearch::Default,
        }
    }
}

impl fmt::Display for ConvAlgorithmSearch {
    /// The config file's spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConvAlgorithmSearch::Exhaustive => "exhaustive",
            ConvAlgorithmSearch::Heuristic => "heuristic",
            ConvAlgorithmSearch::Default => "default",
        })
    }
}

/// CUDA execution provider options (passed through to ONNX Runtime).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CudaSettings {
    /// GPU index.
    pub device_id: i32,
    /// Arena memory limit in bytes; 0 means no limit.
    pub memory_limit: usize,
    /// How the memory arena grows.
    pub arena_extend_strategy: ArenaExtendStrategy,
    /// How cuDNN picks convolution algorithms.
    pub conv_algorithm_search: ConvAlgorithmSearch,
    /// Capture each UNet shape's step in a CUDA graph and replay it (ONNX Runtime's
    /// `enable_cuda_graph`). The UNet then runs on buffers kept in device memory, one
    /// graph per batch shape; it needs every UNet node on the CUDA provider, so a graph
    /// with CPU nodes fails to load with ONNX Runtime's message. Off by default.
    pub cuda_graph: bool,
}

/// A TensorRT builder optimization level that is known to be in TensorRT's range, 0–5
/// (`runtime.tensorrt.builder_optimization_level`; default 3, TensorRT's own default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct BuilderOptimizationLevel(u8);

impl BuilderOptimizationLevel {
    /// The highest level TensorRT takes.
    pub const MAX: u8 = 5;

    /// The level as TensorRT takes it.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl Default for BuilderOptimizationLevel {
    fn default() -> Self {
        BuilderOptimizationLevel(3)
    }
}

/// A builder optimization level above [`BuilderOptimizationLevel::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("builder optimization level {0} is above 5 (TensorRT takes 0-5)")]
pub struct BuilderOptimizationLevelError(pub u8);

impl TryFrom<u8> for BuilderOptimizationLevel {
    type Error = BuilderOptimizationLevelError;

    fn try_from(level: u8) -> Result<Self, Self::Error> {
        if level > Self::MAX {
            Err(BuilderOptimizationLevelError(level))
        } else {
            Ok(BuilderOptimizationLevel(level))
        }
    }
}

impl From<BuilderOptimizationLevel> for u8 {
    fn from(level: BuilderOptimizationLevel) -> u8 {
        level.0
    }
}

impl fmt::Display for BuilderOptimizationLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// TensorRT execution provider options (passed through to ONNX Runtime).
///
/// Every session is built with one optimization profile that covers the requests the
/// daemon accepts, so TensorRT builds one engine per graph instead of rebuilding when a
/// new shape arrives (src/runtime/tensorrt/ derives it from each graph's inputs). With a
/// profile for every dynamic input, ONNX Runtime builds the engine when the session is
/// created, so the model load takes the build time (minutes for a UNet, once per engine
/// cache key), not the first request. Its ranges, per image side and batch:
///
/// | axis | min | opt | max |
/// |---|---|---|---|
/// | image side (px; latents: ÷ VAE factor) | `min_size`, else the model's size multiple | `opt_size`, else the model's native size | `max_size`, else `limits.max_width`/`max_height` capped at 8 × the native size |
/// | UNet batch rows | 1 | 2 (1 for LCM) | 2 × `max_batch` (guidance doubles it) |
/// | VAE batch | 1 | 1 | `max_batch` |
/// | UNet text sequence | 77 | 77 | 77 × `limits.max_prompt_chunks` |
/// | text encoder rows × tokens | 1 × 77 | 1 × 77 | 2 × `max_batch` × 77 |
///
/// Sides are rounded to the model's size multiple (min up, max and opt down). Axes a graph
/// declares fixed stay fixed; a graph with a dynamic input diffusiond cannot size gets no
/// profile, with a warning naming the file and input (its engine is then rebuilt for
/// larger shapes, as without profiles).
///
/// `max_batch` defaults to the most images the worker puts in one batch, the larger of
/// `jobs.max_batch_images` and `limits.max_images` (16 with the defaults). The `[limits]` and
/// `[jobs]` values are those [`TensorRtSettings::accepting`] was given, else their
/// defaults. A request outside the profile fails with TensorRT's shape error, so narrow
/// these only together with `[limits]`. TensorRT sizes an engine's activation memory for
/// the largest shapes, so a smaller `max_size` and `max_batch` (with `[limits]` to match)
/// is what saves GPU memory.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TensorRtSettings {
    /// GPU index.
    pub device_id: i32,
    /// Build fp16 engines.
    pub fp16: bool,
    /// Where built engines are cached; unset disables the cache. Each graph's engines go
    /// into a subfolder named by a key over the graph's contents (the `.onnx` file and its
    /// external data), the GPU, the TensorRT and ONNX Runtime versions, the profile, `fp16`
    /// and `builder_optimization_level`, so a changed model never loads a stale engine.
    /// The first load of a model version reads all its files once to hash them (about a
    /// second per GB); `digests/` here remembers each file's hash by path, size and mtime.
    /// Subfolders for older versions of a graph are removed: see `engine_cache_keep`.
    pub engine_cache_dir: Option<PathBuf>,
    /// How many engine cache subfolders to keep per graph file, the one in use included,
    /// most recently used first (default 2: the current one and the one before it, so going
    /// back to the previous model version or settings does not rebuild). 0 and 1 both keep
    /// only the current one. Only subfolders whose `source.json` names the graph are
    /// counted or removed; a subfolder this daemon has loaded since it started is kept.
    pub engine_cache_keep: usize,
    /// Where the timing cache lives; unset disables it. Shared by every model, in a
    /// subfolder keyed by the GPU and the TensorRT version.
    pub timing_cache_dir: Option<PathBuf>,
    /// Builder optimization level, 0–5 (TensorRT's default is 3).
    pub builder_optimization_level: BuilderOptimizationLevel,
    /// Capture TensorRT's engine runs in CUDA graphs (`trt_cuda_graph_enable`); the UNet
    /// then runs on buffers kept in device memory, one graph per batch shape. Off by
    /// default.
    pub cuda_graph: bool,
    /// Smallest image side the engines take, in pixels (a multiple of 8; unset: the
    /// model's size multiple, 64 for SD 1.x/2.x, 32 for SDXL).
    pub min_size: Option<tensorrt::ProfileSize>,
    /// Image side TensorRT tunes its kernels for (unset: the model's native size, 512 for
    /// SD 1.5, 1024 for SDXL).
    pub opt_size: Option<tensorrt::ProfileSize>,
    /// Largest image side the engines take (unset: `limits.max_width`/`max_height`, at
    /// most 8 × the model's native size).
    pub max_size: Option<tensorrt::ProfileSize>,
    /// Most images in one batch (unset: the larger of `jobs.max_batch_images` and
    /// `limits.max_images`). The UNet's batch is twice this with guidance.
    pub max_batch: Option<tensorrt::ProfileBatch>,
    /// What the daemon accepts (`[limits]`, `[jobs]`), set by
    /// [`TensorRtSettings::accepting`]; not a config key.
    #[serde(skip)]
    pub accepted: Option<tensorrt::AcceptedRequests>,
}

impl Default for TensorRtSettings {
    fn default() -> Self {
        TensorRtSettings {
            device_id: 0,
            fp16: true,
            engine_cache_dir: None,
            engine_cache_keep: 2,
            timing_cache_dir: None,
            builder_optimization_level: BuilderOptimizationLevel::default(),
            cuda_graph: false,
            min_size: None,
            opt_size: None,
            max_size: None,
            max_batch: None,
            accepted: None,
        }
    }
}

impl TensorRtSettings {
    /// These settings for a daemon that accepts what `limits` and `max_batch_images`
    /// (`jobs.max_batch_images`) allow: the profiles' defaults then cover it.
    pub fn accepting(mut self, limits: &crate::request::Limits, max_batch_images: usize) -> Self {
        self.accepted = Some(tensorrt::AcceptedRequests::new(limits, max_batch_images));
        self
    }

    /// Checks what the types cannot: `min_size` ≤ `opt_size` ≤ `max_size` where given.
    pub fn validate(&self) -> Result<(), String> {
        let sides = [
            ("min_size", self.min_size),
            ("opt_size", self.opt_size),
            ("max_size", self.max_size),
        ];
        for (i, (a, va)) in sides.iter().enumerate() {
            for (b, vb) in &sides[i + 1..] {
                if let (Some(va), Some(vb)) = (va, vb)
                    && va > vb
                {
                    return Err(format!(
                        "runtime.tensorrt.{a}: {} is above runtime.tensorrt.{b} ({})",
                        va.get(),
                        vb.get()
                    ));
                }
            }
        }
        Ok(())
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
    /// One worker per entry, each with its own sessions; the queue spreads batches over
    /// them. With the CUDA or TensorRT provider each entry is a GPU index (it replaces
    /// `cuda.device_id` and `tensorrt.device_id` for that worker), and every index must be
    /// present. With the CPU provider the entries only count workers, which share the
    /// cores (`session.intra_threads` 0 gives each its share). Empty (the default): one
    /// worker on `cuda.device_id`/`tensorrt.device_id`.
    pub devices: Vec<u32>,
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
            devices: Vec::new(),
        }
    }
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
