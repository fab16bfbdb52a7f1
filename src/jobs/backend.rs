//! What the worker needs from a pipeline: load a model, run a batch of resolved requests.
//! [`OrtBackend`] is the real one (ONNX Runtime sessions through [`Pipeline`]); the engine's
//! unit tests use a fake.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ort::session::RunOptions;

use super::Failure;
use crate::lora::LoraSpec;
use crate::model::ModelBundle;
use crate::pipeline::flow::TransformerPipeline;
use crate::pipeline::{Generation, Pipeline, PipelineError, ProgressFn};
use crate::request::ResolvedRequest;
use crate::runtime::Runtime;

/// Work a batch lets run between two of its steps ([`Model::set_interlude`]): given the
/// model, it may run other batches on it, and returns whether it did; or
/// [`PipelineError::Preempted`] to stop the batch so that its jobs go back to the queue.
pub type ModelInterlude = dyn FnMut(&mut dyn Model) -> Result<bool, PipelineError> + Send;

/// Loads models. Called on a loading thread of its own.
pub trait Backend: Send + Sync + 'static {
    /// The workers' devices, one entry per worker thread (`cpu`, `cuda:0`, ...).
    fn workers(&self) -> Vec<String>;

    /// Loads the model `name` from its opened folder for `worker` (an index into
    /// [`Backend::workers`]), with `loras` merged into its weights; the error says why not
    /// ([`Failure::InvalidArgument`] when a LoRA does not fit the model).
    fn load(
        &self,
        name: &str,
        bundle: &Arc<ModelBundle>,
        loras: &[LoraSpec],
        worker: usize,
    ) -> Result<Box<dyn Model>, Failure>;

    /// A run control for one batch.
    fn run_control(&self) -> Result<RunControl, String>;

    /// The ONNX Runtime version, for PNG metadata.
    fn runtime_version(&self) -> &str;

    /// The execution provider sessions run on first (`cpu`, `cuda`, `tensorrt`), for PNG
    /// metadata.
    fn execution_provider(&self) -> &str {
        "unknown"
    }
}

/// A loaded model.
pub trait Model: Send {
    /// Runs compatible requests (equal [`ResolvedRequest::batch_key`]) as one batch: one
    /// [`Generation`] per request, in order. `progress` is called after each step and
    /// returns false to stop; `control` is terminated from another thread when every job
    /// of the batch is cancelled.
    fn generate(
        &mut self,
        batch: &[&ResolvedRequest],
        control: &RunControl,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError>;

    /// Where the previews of the next batches go (request index in the batch, step, PNG);
    /// models without previews ignore it.
    fn set_preview_sink(&mut self, _sink: Option<crate::pipeline::preview::PreviewSink>) {}

    /// Work the next batches let run between two of their steps; a model that cannot
    /// suspend a batch ignores it.
    fn set_interlude(&mut self, _interlude: Option<Box<ModelInterlude>>) {}
}

/// Stops a batch in flight: a flag for the step loop, and ONNX Runtime's run options,
/// which end a session run at once.
#[derive(Default)]
pub struct RunControl {
    options: Option<RunOptions>,
    terminated: AtomicBool,
}

impl std::fmt::Debug for RunControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunControl")
            .field("options", &self.options.is_some())
            .field("terminated", &self.is_terminated())
            .finish()
    }
}

impl RunControl {
    /// A control with ONNX Runtime run options.
    pub fn with_options(options: RunOptions) -> RunControl {
        RunControl {
            options: Some(options),
            terminated: AtomicBool::new(false),
        }
    }

    /// ONNX Runtime's run options, when this control has them.
    pub fn options(&self) -> Option<&RunOptions> {
        self.options.as_ref()
    }

    /// Stops the batch: session runs in flight end with an error, the loop stops.
    pub fn terminate(&self) {
        self.terminated.store(true, Ordering::SeqCst);
        if let Some(o) = &self.options {
            let _ = o.terminate();
        }
    }

    /// Whether [`RunControl::terminate`] was called.
    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }
}

/// Models as ONNX Runtime sessions, one [`Runtime`] per worker ([`Runtime::workers`]:
/// `runtime.devices`).
pub struct OrtBackend {
    runtimes: Vec<Runtime>,
    version: String,
    provider: String,
}

impl OrtBackend {
    /// A backend with one worker per configured device of a loaded runtime.
    pub fn new(runtime: &Runtime) -> OrtBackend {
        let version = runtime.version().to_string();
        OrtBackend {
            runtimes: runtime.workers(),
            version,
            provider: execution_provider(runtime),
        }
    }
}

impl Backend for OrtBackend {
    fn workers(&self) -> Vec<String> {
        self.runtimes
            .iter()
            .map(|r| r.device().to_string())
            .collect()
    }

    fn load(
        &self,
        _name: &str,
        bundle: &Arc<ModelBundle>,
        loras: &[LoraSpec],
        worker: usize,
    ) -> Result<Box<dyn Model>, Failure> {
        let runtime = self
            .runtimes
            .get(worker)
            .ok_or_else(|| Failure::ModelLoad(format!("no worker {worker}")))?;
        // The folder was checked when it was opened; check its graphs again in case they
        // changed since, then load.
        bundle
            .check_files()
            .map_err(|e| Failure::ModelLoad(e.to_string()))?;
        if bundle.kind.is_flow() {
            // The resolve step refuses LoRAs for the transformer families.
            return TransformerPipeline::load(runtime, &bundle.dir)
                .map(|p| Box::new(p) as Box<dyn Model>)
                .map_err(|e| Failure::ModelLoad(e.to_string()));
        }
        // A LoRA that cannot apply is the request's fault, not the model's.
        let merged = crate::lora::prepare(&bundle.dir, loras)
            .map_err(|e| Failure::InvalidArgument(format!("'loras': {e}")))?;
        Pipeline::with_loras(runtime, bundle.clone(), &merged)
            .map(|p| Box::new(p) as Box<dyn Model>)
            .map_err(|e| Failure::ModelLoad(e.to_string()))
    }

    fn run_control(&self) -> Result<RunControl, String> {
        RunOptions::new()
            .map(RunControl::with_options)
            .map_err(|e| format!("cannot create run options: {e}"))
    }

    fn runtime_version(&self) -> &str {
        &self.version
    }

    fn execution_provider(&self) -> &str {
        &self.provider
    }
}

/// The provider a runtime's sessions try first (every worker has the same list), as PNG
/// metadata names it: `cpu`, `cuda`, `tensorrt`.
pub fn execution_provider(runtime: &Runtime) -> String {
    runtime
        .providers()
        .first()
        .map_or_else(|| "cpu".to_string(), ToString::to_string)
}

impl Model for Pipeline {
    fn generate(
        &mut self,
        batch: &[&ResolvedRequest],
        control: &RunControl,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        self.run(batch, run_options(control)?, progress)
    }

    fn set_preview_sink(&mut self, sink: Option<crate::pipeline::preview::PreviewSink>) {
        Pipeline::set_preview_sink(self, sink);
    }

    fn set_interlude(&mut self, interlude: Option<Box<ModelInterlude>>) {
        let wrapped = interlude
            .map(|mut f| Box::new(move |p: &mut Pipeline| f(p)) as Box<crate::pipeline::Interlude>);
        Pipeline::set_interlude(self, wrapped);
    }
}

/// The transformer families run each request of a batch in turn; they have no previews
/// and cannot suspend a batch between steps.
impl Model for TransformerPipeline {
    fn generate(
        &mut self,
        batch: &[&ResolvedRequest],
        control: &RunControl,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        self.run(batch, run_options(control)?, progress)
    }
}

/// A batch's run options (a control made without them cannot run one).
fn run_options(control: &RunControl) -> Result<&RunOptions, PipelineError> {
    control.options().ok_or_else(|| PipelineError::Inference {
        component: "runtime".into(),
        message: "no run options".into(),
    })
}
