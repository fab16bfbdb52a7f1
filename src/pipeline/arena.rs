//! ONNX Runtime's CPU arena between batches: which runs shrink it, and how a batch that
//! stops early hands it back.
//!
//! The arena keeps the buffers of a session run for the next one, so every step of a
//! batch reuses them. Three things would otherwise keep or double a large batch's peak
//! (docs/memory.md):
//!
//! * after the batch, the arena holds its peak for good: the last UNet step and the VAE
//!   decode (and each VAE encode of an image-to-image batch) shrink it (its free regions
//!   go back to the heap; the worker's `malloc_trim` hands them to the system);
//! * a session's first run at a new input shape has no memory pattern yet: ONNX Runtime
//!   allocates each tensor on its own and records the pattern; the next run takes one block
//!   of the whole pattern, which the arena cannot carve from the first run's regions, so it
//!   grows by as much again (a fresh daemon's first 512² job peaked at 4.52 GB, later ones
//!   at 2.36 GB). The first UNet step of a large batch at a shape the session has not run
//!   yet shrinks the arena too (at a shape it ran, the arena's block of the pattern is
//!   reused, and shrinking would only fault its pages in again);
//! * a batch that ends before its last step (cancelled, terminated, failed) never runs the
//!   shrinking step: one UNet run with the terminate flag set computes nothing and shrinks
//!   the arena ([`ArenaOptions::release`]).

use std::collections::HashSet;

use ort::session::RunOptions;

use super::text::Conditioning;
use super::{AddedCond, Pipeline, PipelineError};
use crate::runtime::Runtime;

/// ONNX Runtime's run-config key that shrinks the named arenas after a run.
const SHRINK_KEY: &str = "memory.enable_memory_arena_shrinkage";
/// At most this many UNet shapes are remembered; past it the set starts again (an extra
/// shrink after a first step costs time, not memory).
const SHAPES_KEPT: usize = 256;

/// The run options that shrink the CPU arena; both `None` with the arena off.
pub(super) struct ArenaOptions {
    /// Shrink after the run.
    shrink: Option<RunOptions>,
    /// Shrink after a run that stops before its first node (the terminate flag is set):
    /// ONNX Runtime shrinks the arena after a terminated run too.
    release: Option<RunOptions>,
    /// The UNet input shapes (sample, then text conditioning) this pipeline's session has
    /// finished a run at: ONNX Runtime has their memory pattern.
    ran: HashSet<Vec<usize>>,
}

impl ArenaOptions {
    /// The options for `runtime`'s sessions (none when `runtime.session.cpu_arena` is off).
    pub fn new(runtime: &Runtime) -> Result<ArenaOptions, PipelineError> {
        if !runtime.settings().session.cpu_arena {
            return Ok(ArenaOptions {
                shrink: None,
                release: None,
                ran: HashSet::new(),
            });
        }
        Ok(ArenaOptions {
            shrink: Some(shrink_options(false)?),
            release: Some(shrink_options(true)?),
            ran: HashSet::new(),
        })
    }

    /// Whether the UNet has finished a run at `shape` ([`ArenaOptions::ran_at`]).
    pub fn has_run(&self, shape: &[usize]) -> bool {
        self.ran.contains(shape)
    }

    /// Records that the UNet finished a run at `shape` (so ONNX Runtime has its pattern).
    pub fn ran_at(&mut self, shape: &[usize]) {
        if !self.ran.contains(shape) {
            if self.ran.len() >= SHAPES_KEPT {
                self.ran.clear();
            }
            self.ran.insert(shape.to_vec());
        }
    }

    /// The options for UNet step `step` of a loop over `begin..end`: the shrinking ones for
    /// the last step of a batch that hands its memory back (`shrink_after`), and for its
    /// first at a shape the session has not run (`new_shape`); else the batch's own
    /// `run_options`.
    pub fn for_step<'a>(
        &'a self,
        step: usize,
        (begin, end): (usize, usize),
        (shrink_after, new_shape): (bool, bool),
        run_options: &'a RunOptions,
    ) -> &'a RunOptions {
        match &self.shrink {
            Some(shrink) if shrink_after && shrinks_after_step(step, begin, end, new_shape) => {
                shrink
            }
            _ => run_options,
        }
    }

    /// The options for a batch's VAE runs (each image's encode for image-to-image, the
    /// decode): shrinking when the batch hands its memory back, so neither keeps its peak
    /// and an encode at a new shape does not leave its regions under the next one's
    /// memory-pattern block.
    pub fn for_vae<'a>(
        &'a self,
        shrink_after: bool,
        run_options: &'a RunOptions,
    ) -> &'a RunOptions {
        match &self.shrink {
            Some(shrink) if shrink_after => shrink,
            _ => run_options,
        }
    }

    /// Options for a run that only shrinks the arena (terminated before its first node).
    pub fn release(&self) -> Option<&RunOptions> {
        self.release.as_ref()
    }
}

/// Whether UNet step `step` of a loop over `begin..end` shrinks the arena after it: the
/// last, and the first when it is the session's first run at the batch's shape
/// (`new_shape`: no memory pattern yet, so the next step allocates the pattern's block).
pub(super) fn shrinks_after_step(step: usize, begin: usize, end: usize, new_shape: bool) -> bool {
    (new_shape && step == begin) || step + 1 == end
}

/// Run options that shrink the CPU arena after the run; with `terminated`, the run stops
/// before its first node.
fn shrink_options(terminated: bool) -> Result<RunOptions, PipelineError> {
    let err = |e: ort::Error| PipelineError::Inference {
        component: "runtime".into(),
        message: format!("cannot create run options: {e}"),
    };
    let mut options = RunOptions::new().map_err(err)?;
    options.set(SHRINK_KEY, "cpu:0").map_err(err)?;
    if terminated {
        options.terminate().map_err(err)?;
    }
    Ok(options)
}

impl Pipeline {
    /// Hands the UNet's arena back after a batch that stopped before its last step: one
    /// run with [`ArenaOptions::release`], which stops before its first node and shrinks
    /// the arena. Its (expected) termination error is only logged. Host placement only.
    pub(super) fn release_unet(
        &mut self,
        bound: bool,
        own_in: Option<&ndarray::Array4<f32>>,
        timestep: f64,
        cond: &Conditioning,
        added: Option<&AddedCond<'_>>,
    ) {
        let Some(release) = self.arena.release() else {
            return;
        };
        // On a device the UNet's buffers are not in the CPU arena, and a run with CUDA
        // graphs replays its graph with the graph's own options (a whole step, not stopped).
        if self.unet.placement() != super::unet::Placement::Host {
            return;
        }
        let result = match own_in {
            _ if bound => self.unet.run_bound(timestep, release).map(drop),
            Some(a) => self
                .unet
                .run(
                    a.view().into_dyn(),
                    timestep,
                    cond.hidden.view(),
                    added,
                    None,
                    release,
                )
                .map(drop),
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "UNet arena released by a terminated run");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shrinking(begin: usize, end: usize, new_shape: bool) -> Vec<usize> {
        (begin..end)
            .filter(|&i| shrinks_after_step(i, begin, end, new_shape))
            .collect()
    }

    #[test]
    fn the_last_step_shrinks_and_the_first_at_a_new_shape() {
        assert_eq!(shrinking(0, 6, true), [0, 5]);
        assert_eq!(shrinking(0, 6, false), [5]);
        // Image-to-image starts later in the schedule.
        assert_eq!(shrinking(3, 6, true), [3, 5]);
        // One step: the same run.
        assert_eq!(shrinking(5, 6, true), [5]);
        assert_eq!(shrinking(5, 6, false), [5]);
    }
}
