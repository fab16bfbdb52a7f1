//! Device-resident UNet buffers: every input and output of the UNet bound in the memory of
//! the device that runs it (a CUDA GPU), so the conditioning crosses the bus once per
//! generation and a step only moves the latents and the timestep up and the prediction
//! down. This is also what ONNX Runtime's CUDA graphs need, and [`DeviceIo`] keeps their
//! rules (one graph id per batch shape, buffers that never move).
//!
//! Per batch shape ([`ShapeKey`]: the shapes of every bound input) there is one
//! [`ShapeBuffers`]: device tensors allocated once and bound to their own [`IoBinding`],
//! with a host staging tensor each. A generation copies its conditioning into them once; a
//! step is: fill the host `sample` (the loop) and `timestep`, copy both to the device, run,
//! copy `out_sample` back. Copies go through `ort`'s [`Tensor::copy_into`] (identity
//! sessions with an output bound to the target; synchronous, so the UNet's stream sees
//! complete inputs and the host a complete output). No tensor is allocated per step.
//!
//! Graphs whose tensors are fp16 (or an int64 timestep) get staging tensors of that type;
//! the loop still sees f32 (`wide` arrays converted on the host, as [`super::unet::Unet::run`]
//! converts its inputs).
//!
//! # CUDA graphs
//!
//! What this relies on, from ONNX Runtime's CUDA graph rules (the CUDA provider's "Using
//! CUDA Graphs" constraints, repeated for TensorRT in onnxruntime#16081), its capture fix
//! onnxruntime#15005 and its CUDA graph manager (`core/providers/cuda/cuda_graph.cc`):
//!
//! * all nodes on the GPU provider, IoBinding required, input and output shapes fixed per
//!   graph, and a replay reads and writes the device addresses it was captured with: so the
//!   buffers of a captured shape are allocated once and never freed or moved while the
//!   session lives; new conditioning is copied *into* them, and rebinding binds the same
//!   memory (`rebind`);
//! * input and output shapes cannot change for one graph: several shapes need several
//!   graphs, chosen per run with the run option `gpu_graph_id` (an id ≥ 0; `-1` runs the
//!   session normally, neither capturing nor replaying). Each shape gets its own id, 1, 2, …,
//!   up to [`MAX_GRAPHS`]; later shapes run uncaptured (`-1`) on one reused buffer set. A run
//!   that sets no id uses id 0, so with graphs on every run here names one;
//! * ONNX Runtime captures after warm-up runs that let its arena grow (no device allocation
//!   is allowed while capturing). Older releases count warm-ups per session, not per id, so
//!   each new shape first runs [`GRAPH_WARMUP_RUNS`] times with `-1` here;
//! * a replay is one `cudaGraphLaunch`: ONNX Runtime's terminate flag is not checked inside
//!   it, and the graph runs use their own run options, so `RunControl::terminate` does not
//!   interrupt a graph step; the denoise loop stops after it (cancel is checked per step);
//! * captured graphs live in ONNX Runtime's per-thread context: a model's steps run on its
//!   worker's thread.

use std::path::{Path, PathBuf};

use half::f16;
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, IxDyn};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{DynTensor, Tensor};

use crate::model::signature::{Elem, Spec};

/// The most batch shapes that get a CUDA graph of their own per UNet session. Each keeps its
/// buffers (a few MB at SDXL sizes) and ONNX Runtime's captured graph for the session's life.
pub const MAX_GRAPHS: usize = 8;

/// Uncaptured runs (`gpu_graph_id` -1) of a new shape before its graph id is used.
pub const GRAPH_WARMUP_RUNS: usize = 2;

/// ONNX Runtime's run-config key that picks the CUDA graph (`kOrtRunOptionsConfigCudaGraphAnnotation`).
const GRAPH_ID_KEY: &str = "gpu_graph_id";

/// Errors of the device-resident buffers; each names the UNet file and what failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceIoError {
    /// The session has no allocator for the device.
    #[error("{path}: no {device} allocator for the UNet's buffers: {source}")]
    Allocator {
        /// The UNet's ONNX file.
        path: PathBuf,
        /// The device, e.g. `Cuda:0`.
        device: String,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// A buffer could not be allocated.
    #[error("{path}: cannot allocate the UNet's '{name}' {shape:?} on {device}: {source}")]
    Allocate {
        /// The UNet's ONNX file.
        path: PathBuf,
        /// The graph input or output.
        name: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// Where (`Cpu:0` for host staging).
        device: String,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// A buffer could not be bound.
    #[error("{path}: cannot bind the UNet's '{name}': {source}")]
    Bind {
        /// The UNet's ONNX file.
        path: PathBuf,
        /// The graph input or output.
        name: &'static str,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// A copy between host and device failed.
    #[error("{path}: copying the UNet's '{name}' {direction} failed: {source}")]
    Copy {
        /// The UNet's ONNX file.
        path: PathBuf,
        /// The graph input or output.
        name: &'static str,
        /// `to Cuda:0` or `from Cuda:0`.
        direction: String,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// A run option could not be set.
    #[error("{path}: cannot set the UNet's run option {key}={value}: {source}")]
    RunOption {
        /// The UNet's ONNX file.
        path: PathBuf,
        /// The run-config key.
        key: &'static str,
        /// Its value.
        value: String,
        /// ONNX Runtime's error.
        source: ort::Error,
    },
    /// [`DeviceIo::run`] before [`DeviceIo::bind`].
    #[error("{path}: the UNet's buffers are not bound")]
    NotBound {
        /// The UNet's ONNX file.
        path: PathBuf,
    },
}

/// The element types of the UNet's inputs and output, as its signature declares them.
#[derive(Debug, Clone, Copy)]
pub(super) struct IoSpecs {
    /// `sample`.
    pub sample: Spec,
    /// `timestep`.
    pub timestep: Spec,
    /// `encoder_hidden_states`.
    pub hidden: Spec,
    /// SDXL's `text_embeds` and `time_ids`.
    pub added: Option<(Spec, Spec)>,
    /// LCM's `timestep_cond`.
    pub timestep_cond: Option<Spec>,
    /// `out_sample`.
    pub out: Spec,
}

/// The conditioning of one generation, as the host has it (f32).
pub(super) struct HostCond<'a> {
    /// `encoder_hidden_states`.
    pub hidden: ArrayViewD<'a, f32>,
    /// SDXL's `text_embeds` and `time_ids`.
    pub added: Option<(ArrayViewD<'a, f32>, ArrayViewD<'a, f32>)>,
    /// LCM's guidance embedding (`timestep_cond`).
    pub guidance: Option<ArrayViewD<'a, f32>>,
}

/// The shapes of every bound input: a different key is a different buffer set (and graph).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShapeKey {
    sample: Vec<usize>,
    timestep: Vec<usize>,
    hidden: Vec<usize>,
    added: Option<(Vec<usize>, Vec<usize>)>,
    timestep_cond: Option<Vec<usize>>,
}

/// What a test can observe of the device path (counts since the UNet was loaded).
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIoStats {
    /// Buffer sets allocated (one per new batch shape).
    pub allocations: usize,
    /// Generations whose conditioning was copied to the device.
    pub condition_uploads: usize,
    /// Host → device copies of `sample` and `timestep` (two per step).
    pub step_uploads: usize,
    /// Device → host copies of `out_sample` (one per step).
    pub step_downloads: usize,
    /// The buffer sets held now, oldest first.
    pub shapes: Vec<ShapeStats>,
}

/// One held buffer set.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeStats {
    /// The `sample` shape.
    pub sample: Vec<usize>,
    /// Its CUDA graph id (`None`: not captured).
    pub graph_id: Option<i32>,
    /// Address of the bound device `sample` (stays put while the set is held).
    pub sample_address: usize,
    /// UNet runs on this set.
    pub runs: usize,
}

/// A bound tensor on the device and its host staging copy.
struct Staged {
    name: &'static str,
    device: DynTensor,
    host: DynTensor,
    /// The f32 values the loop reads or writes, when the graph's type is not f32.
    wide: Option<ArrayD<f32>>,
}

/// Allocates an uninitialized tensor of the declared element type.
fn alloc(allocator: &Allocator, elem: Elem, shape: &[usize]) -> Result<DynTensor, ort::Error> {
    let shape = shape.to_vec();
    Ok(match elem {
        Elem::F16 => Tensor::<f16>::new(allocator, shape)?.upcast(),
        Elem::I64 => Tensor::<i64>::new(allocator, shape)?.upcast(),
        Elem::I32 => Tensor::<i32>::new(allocator, shape)?.upcast(),
        Elem::F32 => Tensor::<f32>::new(allocator, shape)?.upcast(),
    })
}

fn device_name(allocator: &Allocator) -> String {
    let info = allocator.memory_info();
    format!("{}:{}", info.allocation_device().as_str(), info.device_id())
}

/// One batch shape's buffers, bound once.
struct ShapeBuffers {
    key: ShapeKey,
    binding: IoBinding,
    sample: Staged,
    timestep: Staged,
    out: Staged,
    hidden: Staged,
    added: Option<(Staged, Staged)>,
    timestep_cond: Option<Staged>,
    /// The CUDA graph of this shape: its id and the run options that name it.
    graph: Option<(i32, RunOptions)>,
    runs: usize,
}

/// The UNet's device-resident buffers: one set per batch shape (see the module docs).
pub(super) struct DeviceIo {
    path: PathBuf,
    device: AllocationDevice<'static>,
    device_id: i32,
    /// `to Cuda:0` and `from Cuda:0`, for errors (built once: nothing is allocated per step
    /// but on failure).
    to: String,
    from: String,
    allocator: Allocator,
    /// With CUDA graphs: run options with `gpu_graph_id` -1 (warm-up and uncaptured runs).
    uncaptured: Option<RunOptions>,
    next_graph_id: i32,
    sets: Vec<ShapeBuffers>,
    current: Option<usize>,
    stats: DeviceIoStats,
}

impl DeviceIo {
    /// Buffers on `device`/`device_id`, allocated from `session`'s allocator for it;
    /// `graphs`: name a CUDA graph per batch shape in every run.
    pub(super) fn new(
        session: &Session,
        path: &Path,
        device: AllocationDevice<'static>,
        device_id: i32,
        graphs: bool,
    ) -> Result<DeviceIo, DeviceIoError> {
        let where_ = format!("{}:{device_id}", device.as_str());
        let allocator = MemoryInfo::new(
            device.clone(),
            device_id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .and_then(|info| Allocator::new(session, info))
        .map_err(|source| DeviceIoError::Allocator {
            path: path.to_path_buf(),
            device: where_.clone(),
            source,
        })?;
        let uncaptured = if graphs {
            Some(graph_options(path, -1)?)
        } else {
            None
        };
        Ok(DeviceIo {
            path: path.to_path_buf(),
            to: format!("to {where_}"),
            from: format!("from {where_}"),
            device,
            device_id,
            allocator,
            uncaptured,
            next_graph_id: 1,
            sets: Vec::new(),
            current: None,
            stats: DeviceIoStats::default(),
        })
    }

    /// Where the buffers live.
    pub(super) fn device(&self) -> (AllocationDevice<'static>, i32) {
        (self.device.clone(), self.device_id)
    }

    /// Whether runs name CUDA graphs.
    pub(super) fn graphs(&self) -> bool {
        self.uncaptured.is_some()
    }

    /// Selects (or allocates and binds) the buffers of this batch shape and copies the
    /// generation's conditioning into them. `sample` is `[B, C, h, w]`, `timestep` the shape
    /// the graph takes.
    pub(super) fn bind(
        &mut self,
        session: &Session,
        specs: &IoSpecs,
        sample: &[usize],
        timestep: &[usize],
        cond: &HostCond<'_>,
    ) -> Result<(), DeviceIoError> {
        let added = match (&cond.added, specs.added) {
            (Some((te, ti)), Some(_)) => Some((te.shape().to_vec(), ti.shape().to_vec())),
            _ => None,
        };
        let key = ShapeKey {
            sample: sample.to_vec(),
            timestep: timestep.to_vec(),
            hidden: cond.hidden.shape().to_vec(),
            added,
            timestep_cond: match (&cond.guidance, specs.timestep_cond) {
                (Some(g), Some(_)) => Some(g.shape().to_vec()),
                _ => None,
            },
        };
        let index = match self.sets.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                // A set without a graph can go: nothing replays its addresses. A captured
                // set must stay (its graph reads and writes those addresses).
                self.current = None;
                self.sets.retain(|s| s.graph.is_some());
                let graph = match self.graphs() {
                    true if self.sets.len() < MAX_GRAPHS => {
                        let id = self.next_graph_id;
                        self.next_graph_id += 1;
                        Some((id, graph_options(&self.path, id)?))
                    }
                    _ => None,
                };
                let set = self.allocate(session, specs, key, graph)?;
                self.stats.allocations += 1;
                self.sets.push(set);
                self.sets.len() - 1
            }
        };
        self.current = Some(index);
        // The conditioning goes into the set's own tensors (same addresses: a captured
        // graph reads it there), through host staging tensors allocated with them (`ort`
        // copies only from tensors that own their memory: a borrowed source is cloned first,
        // through the same identity-session lock, and deadlocks).
        let (path, to, set) = (&self.path, &self.to, &mut self.sets[index]);
        set.hidden.upload_from(path, to, &cond.hidden)?;
        rebind(path, &mut set.binding, &set.hidden)?;
        if let (Some((te, ti)), Some((dte, dti))) = (&cond.added, set.added.as_mut()) {
            dte.upload_from(path, to, te)?;
            dti.upload_from(path, to, ti)?;
            rebind(path, &mut set.binding, dte)?;
            rebind(path, &mut set.binding, dti)?;
        }
        if let (Some(g), Some(dg)) = (&cond.guidance, set.timestep_cond.as_mut()) {
            dg.upload_from(path, to, g)?;
            rebind(path, &mut set.binding, dg)?;
        }
        self.stats.condition_uploads += 1;
        Ok(())
    }

    /// Allocates one shape's device and staging tensors and binds them (once: a captured
    /// graph needs the same addresses on every replay).
    fn allocate(
        &self,
        session: &Session,
        specs: &IoSpecs,
        key: ShapeKey,
        graph: Option<(i32, RunOptions)>,
    ) -> Result<ShapeBuffers, DeviceIoError> {
        let host = Allocator::default();
        // `widen`: the loop sees f32 values, converted from and to an fp16 graph's type.
        let staged = |name: &'static str, elem: Elem, shape: &[usize], widen: bool| {
            Ok::<_, DeviceIoError>(Staged {
                name,
                device: self.tensor(&self.allocator, name, elem, shape)?,
                host: self.tensor(&host, name, elem, shape)?,
                wide: (widen && elem == Elem::F16).then(|| ArrayD::zeros(IxDyn(shape))),
            })
        };
        let sample = staged("sample", specs.sample.elem, &key.sample, true)?;
        // The timestep is written in the graph's type directly (`fill_timestep`).
        let timestep = staged("timestep", specs.timestep.elem, &key.timestep, false)?;
        // The prediction has the latents' channels, whatever the input has (9 for an
        // inpainting UNet).
        let out_shape = [
            key.sample[0],
            super::components::LATENT_CHANNELS,
            key.sample[2],
            key.sample[3],
        ];
        let mut out = staged("out_sample", specs.out.elem, &out_shape, true)?;
        // The conditioning is written into its host staging tensor in the graph's type
        // directly (`Staged::upload_from`).
        let hidden = staged(
            "encoder_hidden_states",
            specs.hidden.elem,
            &key.hidden,
            false,
        )?;
        let added = match (&key.added, specs.added) {
            (Some((te, ti)), Some((ste, sti))) => Some((
                staged("text_embeds", ste.elem, te, false)?,
                staged("time_ids", sti.elem, ti, false)?,
            )),
            _ => None,
        };
        let timestep_cond = match (&key.timestep_cond, specs.timestep_cond) {
            (Some(shape), Some(spec)) => Some(staged("timestep_cond", spec.elem, shape, false)?),
            _ => None,
        };
        let bind_err = |name: &'static str| {
            let path = self.path.clone();
            move |source| DeviceIoError::Bind { path, name, source }
        };
        // Inputs are bound when written: the conditioning in `bind`, `sample` and `timestep`
        // in `run` (see `rebind`).
        let mut binding = session.create_binding().map_err(bind_err("out_sample"))?;
        // Tensors from `Tensor::new` own their memory: binding one binds that memory (no
        // copy), and the binding keeps it alive.
        binding
            .bind_output("out_sample", &mut out.device)
            .map_err(bind_err("out_sample"))?;
        Ok(ShapeBuffers {
            key,
            binding,
            sample,
            timestep,
            out,
            hidden,
            added,
            timestep_cond,
            graph,
            runs: 0,
        })
    }

    fn tensor(
        &self,
        allocator: &Allocator,
        name: &'static str,
        elem: Elem,
        shape: &[usize],
    ) -> Result<DynTensor, DeviceIoError> {
        alloc(allocator, elem, shape).map_err(|source| DeviceIoError::Allocate {
            path: self.path.clone(),
            name,
            shape: shape.to_vec(),
            device: device_name(allocator),
            source,
        })
    }

    /// The host `sample` the loop fills before [`DeviceIo::run`] (f32, whatever the graph
    /// takes).
    pub(super) fn input_mut(&mut self) -> Option<ArrayViewMutD<'_, f32>> {
        let set = &mut self.sets[self.current?];
        set.sample.f32_mut()
    }

    /// One step: `timestep` and the host `sample` to the device, the UNet, `out_sample` back
    /// to the host. `run_options` (the caller's, which a terminate reaches) is used unless
    /// runs name CUDA graphs; then the shape's own (see the module docs).
    pub(super) fn run(
        &mut self,
        session: &mut Session,
        timestep: f64,
        run_options: &RunOptions,
    ) -> Result<ArrayViewD<'_, f32>, RunError> {
        let index = self.current.ok_or_else(|| DeviceIoError::NotBound {
            path: self.path.clone(),
        })?;
        let set = &mut self.sets[index];
        fill_timestep(&mut set.timestep.host, timestep).map_err(|source| DeviceIoError::Copy {
            path: self.path.clone(),
            name: "timestep",
            direction: "to the host staging tensor".into(),
            source,
        })?;
        set.sample.upload(&self.path, &self.to)?;
        set.timestep.upload(&self.path, &self.to)?;
        rebind(&self.path, &mut set.binding, &set.sample)?;
        rebind(&self.path, &mut set.binding, &set.timestep)?;
        self.stats.step_uploads += 2;
        let options = match (&set.graph, &self.uncaptured) {
            (Some((_, graph)), _) if set.runs >= GRAPH_WARMUP_RUNS => graph,
            (_, Some(uncaptured)) => uncaptured,
            (_, None) => run_options,
        };
        drop(
            session
                .run_binding_with_options(&set.binding, options)
                .map_err(RunError::Run)?,
        );
        set.runs += 1;
        set.out.download(&self.path, &self.from)?;
        self.stats.step_downloads += 1;
        Ok(set.out.f32_view())
    }

    /// Counts and the buffer sets held, for tests.
    pub(super) fn stats(&self) -> DeviceIoStats {
        let mut stats = self.stats.clone();
        stats.shapes = self
            .sets
            .iter()
            .map(|s| ShapeStats {
                sample: s.key.sample.clone(),
                graph_id: s.graph.as_ref().map(|(id, _)| *id),
                sample_address: s.sample.device.data_ptr() as usize,
                runs: s.runs,
            })
            .collect();
        stats
    }
}

/// A step's failure: the session run itself (ONNX Runtime's error, as for the host path), or
/// the buffers around it.
#[derive(Debug, thiserror::Error)]
pub(super) enum RunError {
    /// The session run failed.
    #[error(transparent)]
    Run(ort::Error),
    /// Copying or binding failed.
    #[error(transparent)]
    Io(#[from] DeviceIoError),
}

/// Binds a staged input's device tensor (again). ONNX Runtime copies a bound input at bind
/// time when the node consuming it runs on another device (the CPU), so an input is bound
/// after each write, as the host path does; when the devices match (always, with CUDA
/// graphs: every node is on the GPU) it binds the same memory and copies nothing, so a
/// captured graph keeps its addresses.
fn rebind(path: &Path, binding: &mut IoBinding, input: &Staged) -> Result<(), DeviceIoError> {
    binding
        .bind_input(input.name, &input.device)
        .map_err(|source| DeviceIoError::Bind {
            path: path.to_path_buf(),
            name: input.name,
            source,
        })
}

/// Run options naming CUDA graph `id` (`-1`: run without capturing or replaying).
fn graph_options(path: &Path, id: i32) -> Result<RunOptions, DeviceIoError> {
    let err = |source| DeviceIoError::RunOption {
        path: path.to_path_buf(),
        key: GRAPH_ID_KEY,
        value: id.to_string(),
        source,
    };
    let mut options = RunOptions::new().map_err(err)?;
    options.set(GRAPH_ID_KEY, id.to_string()).map_err(err)?;
    Ok(options)
}

/// Writes the timestep as the graph declares it, as `components::timestep_input` does: float → f32
/// (or f16), int → i64.
fn fill_timestep(host: &mut DynTensor, t: f64) -> Result<(), ort::Error> {
    if let Ok(mut a) = host.try_extract_array_mut::<f32>() {
        a.fill(t as f32);
    } else if let Ok(mut a) = host.try_extract_array_mut::<f16>() {
        a.fill(f16::from_f32(t as f32));
    } else {
        host.try_extract_array_mut::<i64>()?.fill(t as i64);
    }
    Ok(())
}

impl Staged {
    /// The f32 values the loop writes (the host staging tensor itself for f32 graphs).
    fn f32_mut(&mut self) -> Option<ArrayViewMutD<'_, f32>> {
        match &mut self.wide {
            Some(w) => Some(w.view_mut()),
            None => self.host.try_extract_array_mut::<f32>().ok(),
        }
    }

    /// The f32 values the loop reads.
    fn f32_view(&self) -> ArrayViewD<'_, f32> {
        match &self.wide {
            Some(w) => w.view(),
            None => self
                .host
                .try_extract_array::<f32>()
                .unwrap_or_else(|_| unreachable!("an f32 staging tensor without `wide` is f32")),
        }
    }

    /// The error of a copy of this buffer (`direction`: host to device or back).
    fn copy_error<'a>(
        &self,
        path: &'a Path,
        direction: &'a str,
    ) -> impl Fn(ort::Error) -> DeviceIoError + Copy + use<'a> {
        let name = self.name;
        move |source| DeviceIoError::Copy {
            path: path.to_path_buf(),
            name,
            direction: direction.to_string(),
            source,
        }
    }

    /// Host staging → device (narrowing `wide` first).
    fn upload(&mut self, path: &Path, direction: &str) -> Result<(), DeviceIoError> {
        let err = self.copy_error(path, direction);
        if let Some(w) = &self.wide {
            let mut host = self.host.try_extract_array_mut::<f16>().map_err(err)?;
            host.zip_mut_with(w, |h, &x| *h = f16::from_f32(x));
        }
        self.host.copy_into(&mut self.device).map_err(err)
    }

    /// Writes `values` into the host staging tensor in the graph's type (f32 or f16) and
    /// copies it to the device: a generation's conditioning.
    fn upload_from(
        &mut self,
        path: &Path,
        direction: &str,
        values: &ArrayViewD<'_, f32>,
    ) -> Result<(), DeviceIoError> {
        let err = self.copy_error(path, direction);
        if let Ok(mut host) = self.host.try_extract_array_mut::<f32>() {
            host.assign(values);
        } else {
            let mut host = self.host.try_extract_array_mut::<f16>().map_err(err)?;
            host.zip_mut_with(values, |h, &x| *h = f16::from_f32(x));
        }
        self.host.copy_into(&mut self.device).map_err(err)
    }

    /// Device → host staging (widening into `wide` after).
    fn download(&mut self, path: &Path, direction: &str) -> Result<(), DeviceIoError> {
        let err = self.copy_error(path, direction);
        self.device.copy_into(&mut self.host).map_err(err)?;
        if let Some(w) = &mut self.wide {
            let host = self.host.try_extract_array::<f16>().map_err(err)?;
            w.zip_mut_with(&host, |x, &h| *x = h.to_f32());
        }
        Ok(())
    }
}
