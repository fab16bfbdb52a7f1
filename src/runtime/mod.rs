//! ONNX Runtime: library discovery, environment, execution-provider choice and session options.
//!
//! [`Runtime::init`] finds and loads `libonnxruntime` once per process, creates the
//! `ort` environment, and decides which execution providers to use. Every model session
//! is then built through [`Runtime::session`] or, for pipeline components,
//! [`Runtime::session_for`] (which adds TensorRT's optimization profile: [`tensorrt`]), so
//! the options live in one place.

pub mod devices;
pub mod discovery;
pub mod gpu;
pub mod providers;
pub mod settings;
pub mod tensorrt;

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::DynValue;

pub use devices::WorkerDevice;
pub use settings::{ProviderKind, RuntimeSettings, SessionSettings};

use discovery::{Attempt, Candidate, Inputs};

/// Errors from loading ONNX Runtime or creating sessions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// No ONNX Runtime library could be loaded.
    #[error(
        "ONNX Runtime could not be loaded. Tried, in order:{tried}\nFix: run '{fix}' in the diffusiond source tree \
         (installs onnxruntime==1.32.0 into runtime/), or set ORT_DYLIB_PATH to a libonnxruntime.so"
    )]
    NotFound {
        /// Every place tried, with the reason it failed.
        tried: String,
        /// The command that fixes it.
        fix: &'static str,
    },
    /// The runtime settings are invalid.
    #[error("invalid runtime settings: {0}")]
    InvalidSettings(String),
    /// ONNX Runtime reported an error while setting up.
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    /// A session could not be created for a model file.
    #[error("cannot load {path}: {message}")]
    Session {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
}

/// The library that was loaded into this process (ONNX Runtime can be loaded only once).
#[derive(Debug, Clone)]
pub struct LoadedLibrary {
    /// The file loaded.
    pub path: PathBuf,
    /// Which discovery step found it.
    pub source: discovery::Source,
    /// ONNX Runtime's version string, e.g. `1.32.0`.
    pub version: String,
}

static LOADED: OnceLock<LoadedLibrary> = OnceLock::new();

/// Finds and loads ONNX Runtime, once per process.
pub fn load_library(settings: &RuntimeSettings) -> Result<&'static LoadedLibrary, RuntimeError> {
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let inputs =
        Inputs::from_environment(settings.library_path.clone(), settings.project_dir.clone());
    let loaded = load_first(&discovery::candidates(&inputs))?;
    // A GPU build's CUDA/cuDNN/TensorRT libraries, from where scripts/setup put them.
    gpu::preload(&loaded.path);
    Ok(LOADED.get_or_init(|| loaded))
}

/// Tries candidates in order; stops at the first explicit one that fails.
fn load_first(candidates: &[Candidate]) -> Result<LoadedLibrary, RuntimeError> {
    let mut attempts = Vec::new();
    for candidate in candidates {
        let result = discovery::resolve(candidate).and_then(|file| {
            ort::init_from(&file)
                .map(|_| file)
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(path) => {
                let version = library_version(&path).unwrap_or_else(|| "unknown".into());
                tracing::info!(path = %path.display(), source = %candidate.source, %version, "loaded ONNX Runtime");
                return Ok(LoadedLibrary {
                    path,
                    source: candidate.source,
                    version,
                });
            }
            Err(reason) => {
                tracing::debug!(path = %candidate.path.display(), %reason, "ONNX Runtime not loaded");
                attempts.push(Attempt {
                    candidate: candidate.clone(),
                    reason,
                });
                if candidate.source.is_explicit() {
                    break;
                }
            }
        }
    }
    Err(RuntimeError::NotFound {
        tried: discovery::describe_attempts(&attempts),
        fix: discovery::FIX_COMMAND,
    })
}

/// The loaded runtime: environment, chosen providers and session options.
pub struct Runtime {
    env: Environment,
    settings: RuntimeSettings,
    providers: Vec<ProviderKind>,
    skipped: Vec<providers::Fallback>,
    library: &'static LoadedLibrary,
    /// The worker these sessions are for (the first, unless from [`Runtime::workers`]).
    device: WorkerDevice,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.library)
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Loads ONNX Runtime and prepares the environment and provider list.
    pub fn init(settings: RuntimeSettings) -> Result<Runtime, RuntimeError> {
        providers::validate(&settings).map_err(RuntimeError::InvalidSettings)?;
        devices::validate(&settings.devices).map_err(RuntimeError::InvalidSettings)?;
        let library = load_library(&settings)?;
        let available = available_providers()?;
        let (chosen, mut skipped) = providers::plan(&settings.execution_providers, |p| {
            available.iter().any(|a| a == p.ort_name())
        });
        let (chosen, unusable) = providers::confirm(chosen, |p| gpu::probe(p, &library.path));
        skipped.extend(unusable);
        for f in &skipped {
            tracing::warn!(provider = %f.provider, reason = %f.reason, "execution provider unavailable, falling back");
        }
        if devices::on_gpu(&chosen) && !settings.devices.is_empty() {
            let count = gpu::cuda_devices().map_err(RuntimeError::InvalidSettings)?;
            devices::check_present(&settings.devices, count)
                .map_err(RuntimeError::InvalidSettings)?;
        }
        let env = ort::init().with_name("diffusiond").build()?;
        let mut runtime = Runtime {
            env,
            settings,
            providers: chosen,
            skipped,
            library,
            device: WorkerDevice {
                worker: 0,
                gpu: None,
            },
        };
        // The first worker's view is the runtime's own (`diffusiond --version`, --local).
        if let Some((device, settings)) = runtime.plan().into_iter().next() {
            runtime.device = device;
            runtime.settings = settings;
        }
        Ok(runtime)
    }

    fn plan(&self) -> Vec<(WorkerDevice, RuntimeSettings)> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        devices::plan(&self.settings, &self.providers, cores)
    }

    /// One runtime per worker (`runtime.devices`): the same library, environment and
    /// providers, each with its worker's device ids and thread share
    /// ([`devices::plan`]).
    pub fn workers(&self) -> Vec<Runtime> {
        self.plan()
            .into_iter()
            .map(|(device, settings)| Runtime {
                env: self.env.clone(),
                settings,
                providers: self.providers.clone(),
                skipped: self.skipped.clone(),
                library: self.library,
                device,
            })
            .collect()
    }

    /// The worker and device these sessions are for.
    pub fn device(&self) -> WorkerDevice {
        self.device
    }

    /// The CUDA device whose memory holds a UNet's bound buffers: the worker's GPU when
    /// the CUDA or TensorRT provider is in use; `None`: host memory (the CPU provider).
    pub fn io_device(&self) -> Option<i32> {
        if !devices::on_gpu(&self.providers) {
            return None;
        }
        self.device
            .gpu
            .map(|d| i32::try_from(d).unwrap_or(i32::MAX))
    }

    /// Whether the first provider replays the UNet from CUDA graphs
    /// (`runtime.cuda.cuda_graph` or `runtime.tensorrt.cuda_graph`).
    pub fn cuda_graph(&self) -> bool {
        match self.providers.first() {
            Some(ProviderKind::Tensorrt) => self.settings.tensorrt.cuda_graph,
            Some(ProviderKind::Cuda) => self.settings.cuda.cuda_graph,
            _ => false,
        }
    }

    /// The execution providers sessions are created with, in order.
    pub fn providers(&self) -> &[ProviderKind] {
        &self.providers
    }

    /// The providers asked for that are not used, and why.
    pub fn skipped_providers(&self) -> &[providers::Fallback] {
        &self.skipped
    }

    /// The library file in use.
    pub fn library(&self) -> &LoadedLibrary {
        self.library
    }

    /// The settings this runtime was created with.
    pub fn settings(&self) -> &RuntimeSettings {
        &self.settings
    }

    /// ONNX Runtime's version, e.g. `1.32.0`.
    pub fn version(&self) -> &str {
        &self.library.version
    }

    /// A session builder with the configured options and providers applied. TensorRT gets
    /// no optimization profile and no caches here (their folders are keyed to a graph):
    /// use [`Runtime::session`] or [`Runtime::session_for`] for those.
    pub fn session_builder(&self) -> Result<SessionBuilder, RuntimeError> {
        self.builder_for(None, None, true)
    }

    /// A session builder for one session's TensorRT plan and pipeline component.
    fn builder_for(
        &self,
        plan: Option<&tensorrt::SessionPlan>,
        component: Option<tensorrt::Component>,
        spinning: bool,
    ) -> Result<SessionBuilder, RuntimeError> {
        let s = &self.settings.session;
        let mut b = Session::builder(&self.env)?
            .with_optimization_level(optimization_level(s))
            .map_err(ort::Error::from)?
            .with_memory_pattern(s.memory_pattern)
            .map_err(ort::Error::from)?;
        if s.intra_threads > 0 {
            b = b
                .with_intra_threads(s.intra_threads)
                .map_err(ort::Error::from)?;
        }
        if s.inter_threads > 0 {
            b = b
                .with_inter_threads(s.inter_threads)
                .map_err(ort::Error::from)?;
        }
        if !spinning {
            b = b.with_intra_op_spinning(false).map_err(ort::Error::from)?;
        }
        Ok(self.apply_providers(b, plan, component))
    }

    /// Registers each chosen provider; one that fails to register is logged and skipped.
    fn apply_providers(
        &self,
        mut builder: SessionBuilder,
        plan: Option<&tensorrt::SessionPlan>,
        component: Option<tensorrt::Component>,
    ) -> SessionBuilder {
        let settings = providers::for_component(&self.settings, component);
        for &kind in &self.providers {
            let ep = providers::dispatch_for(kind, &settings, plan);
            builder = match builder.with_execution_providers([ep]) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(provider = %kind, error = %e, "execution provider failed to register, falling back");
                    e.recover()
                }
            };
        }
        builder
    }

    /// Creates a session for one ONNX file. With TensorRT in use, its engine and timing
    /// caches are keyed to the file ([`tensorrt::plan`]), but it has no optimization
    /// profile: pipeline components use [`Runtime::session_for`].
    pub fn session(&self, path: &Path) -> Result<Session, RuntimeError> {
        self.create(path, None, Replacements::NONE, true)
    }

    /// [`Runtime::session`] whose intra-op threads sleep when a run ends instead of
    /// spinning for more work: for sessions that run in turn with another session every
    /// step (a ControlNet and its UNet), where one session's spinning threads would take
    /// the cores the other's need (measured in docs/controlnet.md).
    pub fn session_without_spinning(&self, path: &Path) -> Result<Session, RuntimeError> {
        self.create(path, None, Replacements::NONE, false)
    }

    /// Creates a session for one pipeline component's ONNX file. With TensorRT among the
    /// providers, the session gets an optimization profile covering every request the
    /// daemon accepts (derived from the graph's inputs and `shapes`) and engine and timing
    /// caches keyed to the graph's contents, the GPU and the build settings; the graph is
    /// hashed for that key, once per file version (docs on
    /// [`settings::TensorRtSettings`]). Without TensorRT this is [`Runtime::session`]: no
    /// file is read besides by ONNX Runtime.
    pub fn session_for(
        &self,
        path: &Path,
        shapes: &tensorrt::SessionShapes,
    ) -> Result<Session, RuntimeError> {
        self.create(path, Some(shapes), Replacements::NONE, true)
    }

    /// [`Runtime::session_for`] with some of the graph's initializers replaced
    /// (ONNX Runtime's `AddInitializer`; the session keeps the values alive): how LoRA
    /// weights are applied without rewriting the graph. The ONNX Runtime transformers that
    /// would read the graph's original weights instead are off in such sessions
    /// ([`Replacements`]). Refused with TensorRT, whose engine caches are keyed to the
    /// graph file alone.
    pub fn session_with(
        &self,
        path: &Path,
        shapes: &tensorrt::SessionShapes,
        replaced: &Replacements,
    ) -> Result<Session, RuntimeError> {
        self.create(path, Some(shapes), replaced, true)
    }

    /// [`Runtime::session_with`]; `spinning` false: its intra-op threads sleep when a run
    /// ends ([`Runtime::session_without_spinning`]).
    pub fn session_with_spinning(
        &self,
        path: &Path,
        shapes: &tensorrt::SessionShapes,
        replaced: &Replacements,
        spinning: bool,
    ) -> Result<Session, RuntimeError> {
        self.create(path, Some(shapes), replaced, spinning)
    }

    fn create(
        &self,
        path: &Path,
        shapes: Option<&tensorrt::SessionShapes>,
        replaced: &Replacements,
        spinning: bool,
    ) -> Result<Session, RuntimeError> {
        let initializers = replaced.initializers.as_slice();
        let to_err = |message: String| RuntimeError::Session {
            path: path.to_path_buf(),
            message,
        };
        if !initializers.is_empty() && self.providers.contains(&ProviderKind::Tensorrt) {
            return Err(to_err(
                "replaced weights (LoRA) are not supported with the TensorRT provider: its engine cache is keyed to the graph file; use the CUDA or CPU provider".into(),
            ));
        }
        let plan = if self.providers.contains(&ProviderKind::Tensorrt) {
            let plan = tensorrt::plan(path, shapes, &self.settings.tensorrt, self.version())
                .map_err(|e| to_err(e.to_string()))?;
            Some(plan)
        } else {
            None
        };
        let mut builder = self.builder_for(plan.as_ref(), shapes.map(|s| s.component), spinning)?;
        if let Some(disabled) = replaced.disabled_optimizers() {
            builder = builder
                .with_disabled_optimizers(&disabled)
                .map_err(|e| to_err(format!("disabling {disabled}: {e}")))?;
        }
        for (name, value) in initializers {
            builder = builder
                .with_initializer(name, Arc::clone(value))
                .map_err(|e| to_err(format!("replacing initializer {name}: {e}")))?;
        }
        builder
            .commit_from_file(path)
            .map_err(|e| to_err(e.to_string()))
    }
}

/// Initializers of a graph replaced at session build, and what they are.
///
/// Two of ONNX Runtime's level-`all` CPU transformers build new weights from the graph's
/// own initializers, ignoring replaced ones: the NCHWc layout transformer (Conv weights)
/// and the float16 initializer fusion (the float16 weights it widens to float32). A
/// replaced weight of either kind would silently not apply, so a session with one turns
/// that transformer off (found by the LoRA parity tests; the other optimizations see the
/// replaced values). The NCHWc transformer speeds up convolutions on the CPU: it stays on
/// when no Conv weight is replaced.
#[derive(Debug, Clone, Default)]
pub struct Replacements {
    /// (initializer name, value) pairs.
    pub initializers: Vec<(String, Arc<DynValue>)>,
    /// Whether a Conv node's weight is among them.
    pub conv_weights: bool,
    /// Whether a float16 weight is among them.
    pub float16: bool,
}

impl Replacements {
    /// None: the graph as it is.
    pub const NONE: &Replacements = &Replacements {
        initializers: Vec::new(),
        conv_weights: false,
        float16: false,
    };

    /// The transformers to turn off (`optimization.disable_specified_optimizers` syntax).
    fn disabled_optimizers(&self) -> Option<String> {
        let off: Vec<&str> = [
            (self.conv_weights, "NchwcTransformer"),
            (self.float16, "FuseFp16InitializerToFp32NodeTransformer"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        (!off.is_empty()).then(|| off.join(";"))
    }
}

fn optimization_level(s: &SessionSettings) -> GraphOptimizationLevel {
    use settings::OptimizationLevel::*;
    match s.optimization_level {
        Disable => GraphOptimizationLevel::Disable,
        Basic => GraphOptimizationLevel::Level1,
        Extended => GraphOptimizationLevel::Level2,
        All => GraphOptimizationLevel::All,
    }
}

/// Reads `OrtGetApiBase()->GetVersionString()` from an already loaded library.
/// `ort` checks the version but does not expose it, so the library is opened once more
/// (the loader returns the same handle) just to ask.
fn library_version(path: &Path) -> Option<String> {
    // SAFETY: the file was just loaded successfully by `ort`; opening it again only
    // increments the loader's reference count.
    let lib = unsafe { libloading::Library::new(path) }.ok()?;
    // SAFETY: the symbol has this signature in every ONNX Runtime release.
    let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
        unsafe { lib.get(b"OrtGetApiBase") }.ok()?;
    // SAFETY: OrtGetApiBase returns a static table; GetVersionString a static C string.
    let version = unsafe {
        let base = get_base();
        if base.is_null() {
            return None;
        }
        CStr::from_ptr(((*base).GetVersionString)())
    };
    Some(version.to_string_lossy().into_owned())
}

/// The providers the loaded library offers (`GetAvailableProviders`).
pub fn available_providers() -> Result<Vec<String>, RuntimeError> {
    let api = ort::api();
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut len: std::ffi::c_int = 0;
    // SAFETY: the API table comes from the loaded library; the function fills `list`
    // with `len` C strings that stay valid until ReleaseAvailableProviders.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut len) };
    if !status.0.is_null() {
        release_status(status);
        return Err(RuntimeError::InvalidSettings(
            "ONNX Runtime could not list its execution providers".into(),
        ));
    }
    let names = (0..len.max(0) as usize)
        .map(|i| {
            // SAFETY: i < len, and each entry is a NUL-terminated string.
            unsafe { CStr::from_ptr(*list.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: releases exactly what GetAvailableProviders returned.
    release_status(unsafe { (api.ReleaseAvailableProviders)(list, len) });
    Ok(names)
}

/// Frees an error status returned by the C API (a null status means success).
fn release_status(status: ort::sys::OrtStatusPtr) {
    if !status.0.is_null() {
        // SAFETY: a non-null status is owned by the caller and released exactly once.
        unsafe { (ort::api().ReleaseStatus)(status.0) };
    }
}

#[cfg(test)]
mod replacements_tests {
    use super::Replacements;

    #[test]
    fn only_the_transformers_that_would_miss_a_replaced_weight_are_turned_off() {
        let r = |conv_weights, float16| Replacements {
            initializers: Vec::new(),
            conv_weights,
            float16,
        };
        assert_eq!(r(false, false).disabled_optimizers(), None);
        assert_eq!(
            r(true, false).disabled_optimizers().as_deref(),
            Some("NchwcTransformer")
        );
        assert_eq!(
            r(true, true).disabled_optimizers().as_deref(),
            Some("NchwcTransformer;FuseFp16InitializerToFp32NodeTransformer")
        );
        assert_eq!(
            r(false, true).disabled_optimizers().as_deref(),
            Some("FuseFp16InitializerToFp32NodeTransformer")
        );
    }
}
