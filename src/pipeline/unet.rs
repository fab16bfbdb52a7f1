//! The UNet: its session, its checked signature, and the buffers the denoise loop runs it
//! on. Where those buffers live is a [`Placement`], chosen from the runtime when the UNet
//! is loaded:
//!
//! * [`Placement::Host`] (the CPU provider, or a build without the `cuda` feature): an
//!   all-f32 graph's `sample`, `timestep` and `out_sample` are ONNX Runtime tensors in host
//!   memory, bound once per batch shape and read and written in place; other graphs run
//!   with converted inputs ([`Unet::run`]).
//! * [`Placement::Device`] (the CUDA or TensorRT provider: [`Runtime::io_device`]): every
//!   input and output is bound in device memory, with host staging for the per-step
//!   tensors (`unet_device.rs`), for f32 and fp16 graphs alike; with
//!   [`Runtime::cuda_graph`] each batch shape also runs as a CUDA graph of its own.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, ArrayViewD, Axis};
use ort::memory::{AllocationDevice, Allocator};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::Tensor;

use super::PipelineError;
use super::components::{
    LATENT_CHANNELS, added_inputs, component_name, float_input, float_output, ort_err,
    timestep_input,
};
use super::unet_device::{DeviceIo, DeviceIoError, HostCond, IoSpecs, RunError};
pub use super::unet_device::{DeviceIoStats, GRAPH_WARMUP_RUNS, MAX_GRAPHS, ShapeStats};
use crate::model::controlnet::{self, ResidualShape};
use crate::model::signature::{self, Elem, FLOATS, Side, Spec, TIMESTEP};
use crate::runtime::tensorrt::SessionShapes;
use crate::runtime::{Replacements, Runtime, RuntimeError, settings::ProviderKind};

/// Where the UNet's bound input and output tensors live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Host memory: the CPU provider reads and writes them in place.
    Host,
    /// The memory of `device` number `id` (CUDA in production): the conditioning is copied
    /// there once per generation, the latents and timestep each step, and the prediction
    /// comes back each step.
    Device {
        /// ONNX Runtime's allocation device (`AllocationDevice::CUDA`).
        device: AllocationDevice<'static>,
        /// The device number.
        id: i32,
    },
}

impl Placement {
    /// The placement for a runtime's sessions: the CUDA device when the CUDA or TensorRT
    /// provider is in use ([`Runtime::io_device`]) and this build has the `cuda` feature
    /// (`ort`'s device copies need it), else the host. CUDA graphs ([`Runtime::cuda_graph`])
    /// need the device placement: without it they are refused, naming the setting.
    pub fn for_runtime(runtime: &Runtime) -> Result<Placement, RuntimeError> {
        let key = match runtime.providers().first() {
            Some(ProviderKind::Tensorrt) => "runtime.tensorrt.cuda_graph",
            _ => "runtime.cuda.cuda_graph",
        };
        match runtime.io_device() {
            Some(id) if cfg!(feature = "cuda") => Ok(Placement::Device {
                device: AllocationDevice::CUDA,
                id,
            }),
            Some(_) if runtime.cuda_graph() => Err(RuntimeError::InvalidSettings(format!(
                "{key}: CUDA graphs need the UNet's buffers in device memory, which needs \
                 diffusiond built with the 'cuda' cargo feature"
            ))),
            None if runtime.cuda_graph() => Err(RuntimeError::InvalidSettings(format!(
                "{key}: CUDA graphs need a CUDA device for the UNet's buffers, and this \
                 worker has none"
            ))),
            _ => Ok(Placement::Host),
        }
    }
}

/// Extra UNet inputs SDXL needs.
pub struct AddedCond<'a> {
    /// Pooled text embeddings `[B, P]`.
    pub text_embeds: ArrayViewD<'a, f32>,
    /// Micro-conditioning `[B, 6]`.
    pub time_ids: ArrayViewD<'a, f32>,
}

/// The UNet. Its bound buffers hold the session alive through their `IoBinding`s, so the
/// field order does not matter for drop.
pub struct Unet {
    session: Session,
    path: PathBuf,
    sample: Spec,
    timestep: Spec,
    /// Declared length of a rank-1 timestep (1 when fixed at 1, else the batch).
    timestep_fixed_one: bool,
    hidden: Spec,
    added: Option<(Spec, Spec)>,
    /// LCM-distilled UNets: the guidance embedding input `[B, time_cond_proj_dim]`.
    timestep_cond: Option<Spec>,
    /// Its value for the current generation (set before [`Unet::bind`] or [`Unet::run`]).
    guidance: Option<ArrayD<f32>>,
    out: Spec,
    /// A ControlNet-ready UNet: the shapes of its residual inputs (down blocks, then the
    /// mid block) with their declared types; empty for a UNet without them.
    residuals: Vec<(String, ResidualShape, Spec)>,
    /// Host placement: reused input/output buffers of the current batch shape (all-f32
    /// graphs).
    bound: Option<Bound>,
    /// Test hook: run every graph with converted inputs, as non-f32 graphs run.
    unbound: bool,
    /// Device placement: the device-resident buffers, one set per batch shape.
    device: Option<DeviceIo>,
}

/// An f32 UNet's I/O for one batch shape, kept across steps and generations: the input
/// and output tensors are allocated once and bound with an [`IoBinding`], so a step
/// writes the scaled latents straight into ONNX Runtime's input, runs, and reads the
/// prediction in place; nothing is allocated or copied per step.
struct Bound {
    dims: Vec<usize>,
    binding: IoBinding,
    sample: Tensor<f32>,
    timestep: Tensor<f32>,
    out: Tensor<f32>,
    /// The ControlNet residual inputs, bound with the others.
    residuals: Vec<Tensor<f32>>,
    /// Whether they hold zeros (what a step without an active ControlNet feeds).
    residuals_zero: bool,
}

impl Unet {
    /// Loads the UNet and checks its signature; `sdxl` requires `text_embeds` and `time_ids`.
    /// `shapes` is what the pipeline feeds it (TensorRT's optimization profile);
    /// `initializers` replace weights of the graph (a LoRA set's merged weights);
    /// `residuals`: a ControlNet-ready UNet's residual shapes (empty: none).
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        sdxl: bool,
        shapes: &SessionShapes,
        replaced: &Replacements,
        residuals: &[ResidualShape],
    ) -> Result<Unet, PipelineError> {
        // A ControlNet-ready UNet runs in turn with the ControlNets every step: its
        // threads sleep between runs rather than spin on the cores theirs need.
        let spinning = residuals.is_empty();
        let session = runtime.session_with_spinning(path, shapes, replaced, spinning)?;
        let req = |side, name: &str, elems, ranks: &[usize]| {
            signature::require(&session, path, side, name, elems, ranks)
        };
        let sample = req(Side::Input, "sample", FLOATS, &[4])?;
        let timestep = req(Side::Input, "timestep", TIMESTEP, &[0, 1])?;
        let hidden = req(Side::Input, "encoder_hidden_states", FLOATS, &[3])?;
        let added = if sdxl {
            Some((
                req(Side::Input, "text_embeds", FLOATS, &[2])?,
                req(Side::Input, "time_ids", FLOATS, &[2])?,
            ))
        } else {
            None
        };
        let out = req(Side::Output, "out_sample", FLOATS, &[4])?;
        let timestep_cond = match signature::find(&session, Side::Input, "timestep_cond") {
            Some(_) => Some(req(Side::Input, "timestep_cond", FLOATS, &[2])?),
            None => None,
        };
        let mut residual_inputs = Vec::with_capacity(residuals.len());
        for (i, shape) in residuals.iter().enumerate() {
            let name = if i + 1 == residuals.len() {
                controlnet::MID_INPUT.to_string()
            } else {
                controlnet::down_input(i)
            };
            let spec = req(Side::Input, &name, FLOATS, &[4])?;
            residual_inputs.push((name, *shape, spec));
        }
        let timestep_fixed_one = session
            .inputs()
            .iter()
            .find(|o| o.name() == "timestep")
            .and_then(|o| o.dtype().tensor_shape().map(|s| s.first() == Some(&1)))
            .unwrap_or(false);
        let mut unet = Unet {
            session,
            path: path.to_path_buf(),
            sample,
            timestep,
            timestep_fixed_one,
            hidden,
            added,
            timestep_cond,
            guidance: None,
            out,
            residuals: residual_inputs,
            bound: None,
            unbound: false,
            device: None,
        };
        let graphs = runtime.cuda_graph();
        let placement = Placement::for_runtime(runtime)?;
        let placement = if unet.residuals.is_empty() || placement == Placement::Host {
            placement
        } else if graphs {
            return Err(PipelineError::InvalidArgument {
                param: "cuda_graph",
                message: "a ControlNet-ready UNet runs without CUDA graphs (its residual inputs are fed from the host)".into(),
            });
        } else {
            // The device path binds Optimum's inputs only: a ControlNet-ready UNet runs
            // with its inputs converted per run, and ONNX Runtime copies them.
            tracing::info!("ControlNet-ready UNet: inputs fed from host memory");
            Placement::Host
        };
        unet.place(placement, graphs)?;
        if let Placement::Device { device, id } = unet.placement() {
            tracing::info!(
                device = %format!("{}:{id}", device.as_str()),
                cuda_graphs = graphs,
                "UNet buffers in device memory"
            );
        }
        Ok(unet)
    }

    /// Sets where the bound buffers live, dropping any held ones; `graphs`: name a CUDA
    /// graph per batch shape in every run (device placement only).
    fn place(&mut self, placement: Placement, graphs: bool) -> Result<(), PipelineError> {
        self.bound = None;
        self.device = None;
        match placement {
            Placement::Host if graphs => Err(PipelineError::InvalidArgument {
                param: "cuda_graph",
                message: "CUDA graphs need the UNet's buffers in device memory".into(),
            }),
            Placement::Host => Ok(()),
            Placement::Device { device, id } => {
                let io = DeviceIo::new(&self.session, &self.path, device, id, graphs)
                    .map_err(|e| io_err(&self.path, &e))?;
                self.device = Some(io);
                Ok(())
            }
        }
    }

    /// Where the bound buffers live.
    pub fn placement(&self) -> Placement {
        match &self.device {
            Some(io) => {
                let (device, id) = io.device();
                Placement::Device { device, id }
            }
            None => Placement::Host,
        }
    }

    /// Whether the steps run as CUDA graphs (one per batch shape).
    pub fn cuda_graphs(&self) -> bool {
        self.device.as_ref().is_some_and(DeviceIo::graphs)
    }

    /// Test hook: puts the buffers at `placement` whatever the runtime says, e.g.
    /// `Device { CPU, 0 }` on a CPU session runs the device path (staging tensors, copies
    /// through `ort`'s identity sessions, conditioning bound once, one graph id per shape
    /// when `graphs`) without a GPU.
    #[doc(hidden)]
    pub fn force_placement(
        &mut self,
        placement: Placement,
        graphs: bool,
    ) -> Result<(), PipelineError> {
        self.place(placement, graphs)
    }

    /// Test hook: `true` runs every step with converted inputs ([`Unet::run`]) as graphs
    /// that are not all-f32 run, instead of on bound buffers (host placement).
    #[doc(hidden)]
    pub fn force_unbound(&mut self, unbound: bool) {
        self.unbound = unbound;
        self.bound = None;
    }

    /// Test hook: what the device path did so far (`None` on the host path).
    #[doc(hidden)]
    pub fn device_io_stats(&self) -> Option<DeviceIoStats> {
        self.device.as_ref().map(DeviceIo::stats)
    }

    /// The element types the graph declares for its inputs and output.
    fn specs(&self) -> IoSpecs {
        IoSpecs {
            sample: self.sample,
            timestep: self.timestep,
            hidden: self.hidden,
            added: self.added,
            timestep_cond: self.timestep_cond,
            out: self.out,
        }
    }

    /// The timestep's shape for a UNet batch of `batch` rows: a scalar, `[1]` when the graph
    /// fixes it at 1, else `[batch]`.
    fn timestep_dims(&self, batch: usize) -> Vec<usize> {
        match (self.timestep.rank, self.timestep_fixed_one) {
            (0, _) => vec![],
            (_, true) => vec![1],
            _ => vec![batch],
        }
    }

    /// Whether every tensor the UNet exchanges is f32, so buffers can be bound in place.
    fn all_f32(&self) -> bool {
        let f32s = |s: &Spec| s.elem == Elem::F32;
        f32s(&self.sample)
            && f32s(&self.timestep)
            && f32s(&self.hidden)
            && f32s(&self.out)
            && self.added.as_ref().is_none_or(|(a, b)| f32s(a) && f32s(b))
            && self.timestep_cond.as_ref().is_none_or(f32s)
            && self.residuals.iter().all(|(_, _, s)| f32s(s))
    }

    /// Whether the UNet takes ControlNet residuals.
    pub fn takes_residuals(&self) -> bool {
        !self.residuals.is_empty()
    }

    /// Calls `f` with each bound residual input in order (down blocks, then the mid block)
    /// to write a step's ControlNet residuals into, in place, stopping at its first error;
    /// `Ok(false)` when the buffers are not bound (host path). They no longer count as
    /// zeros.
    pub fn for_each_residual<E>(
        &mut self,
        mut f: impl FnMut(usize, ndarray::ArrayViewMutD<'_, f32>) -> Result<(), E>,
    ) -> Result<bool, E> {
        let Some(b) = self.bound.as_mut() else {
            return Ok(false);
        };
        b.residuals_zero = false;
        for (i, t) in b.residuals.iter_mut().enumerate() {
            f(i, t.extract_array_mut())?;
        }
        Ok(true)
    }

    /// Makes the bound residual inputs zeros (a step without an active ControlNet), unless
    /// they are already.
    pub fn zero_residuals(&mut self) {
        if let Some(b) = self.bound.as_mut()
            && !b.residuals_zero
        {
            for t in &mut b.residuals {
                t.extract_array_mut().fill(0.0);
            }
            b.residuals_zero = true;
        }
    }

    /// Whether the graph takes a guidance embedding (`timestep_cond`: LCM-distilled).
    pub fn takes_guidance_embedding(&self) -> bool {
        self.timestep_cond.is_some()
    }

    /// The guidance embedding `[B, dim]` of the next generation's rows (LCM-distilled
    /// UNets); bound with the conditioning.
    pub fn set_guidance_embedding(&mut self, embedding: Option<ArrayD<f32>>) {
        self.guidance = embedding;
    }

    /// Prepares bound buffers for a generation whose UNet batch is `dims` (`[B, 4, h, w]`)
    /// with this conditioning (bound once, for every step). Returns `false` on the host
    /// path when the graph is not all-f32: the caller then uses [`Unet::run`]. The device
    /// path binds every graph (fp16 too) and returns `true`.
    pub fn bind(
        &mut self,
        dims: &[usize],
        hidden: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
    ) -> Result<bool, PipelineError> {
        if self.device.is_some() {
            return self.bind_device(dims, hidden, added);
        }
        if !self.all_f32() || self.unbound {
            self.bound = None;
            return Ok(false);
        }
        let err = ort_err(&self.path);
        if self.bound.as_ref().is_none_or(|b| b.dims != dims) {
            self.bound = None;
            let alloc = Allocator::default();
            let ts_dims = self.timestep_dims(dims[0]);
            let sample = Tensor::<f32>::new(&alloc, dims.to_vec()).map_err(&err)?;
            let timestep = Tensor::<f32>::new(&alloc, ts_dims).map_err(&err)?;
            // The prediction has the latents' 4 channels, whatever the input has (9 for an
            // inpainting UNet).
            let out_dims = [dims[0], LATENT_CHANNELS, dims[2], dims[3]];
            let mut out = Tensor::<f32>::new(&alloc, out_dims.to_vec()).map_err(&err)?;
            let mut binding = self.session.create_binding().map_err(&err)?;
            binding.bind_output("out_sample", &mut out).map_err(&err)?;
            let mut residuals = Vec::with_capacity(self.residuals.len());
            for (name, shape, _) in &self.residuals {
                let mut t =
                    Tensor::<f32>::new(&alloc, shape.dims(dims[0], dims[2], dims[3]).to_vec())
                        .map_err(&err)?;
                t.extract_array_mut().fill(0.0);
                binding.bind_input(name, &t).map_err(&err)?;
                residuals.push(t);
            }
            self.bound = Some(Bound {
                dims: dims.to_vec(),
                binding,
                sample,
                timestep,
                out,
                residuals,
                residuals_zero: true,
            });
        }
        let Some(b) = self.bound.as_mut() else {
            return Ok(false);
        };
        // The conditioning is copied into an owned tensor once per generation, not per step
        // (binding a borrowed `TensorRef` would make ort clone it through a helper session).
        let bind = |b: &mut Bound, name: &str, v: ArrayViewD<'_, f32>| {
            let value = Tensor::from_array(v.to_owned()).map_err(&err)?;
            b.binding.bind_input(name, &value).map_err(&err)
        };
        bind(b, "encoder_hidden_states", hidden)?;
        if let Some(a) = added {
            bind(b, "text_embeds", a.text_embeds.view())?;
            bind(b, "time_ids", a.time_ids.view())?;
        }
        if let (Some(_), Some(g)) = (self.timestep_cond, self.guidance.as_ref()) {
            bind(b, "timestep_cond", g.view())?;
        }
        Ok(true)
    }

    /// [`Unet::bind`] on the device path: selects (or allocates) the shape's device
    /// buffers and copies the conditioning into them, for every graph type.
    fn bind_device(
        &mut self,
        dims: &[usize],
        hidden: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
    ) -> Result<bool, PipelineError> {
        let specs = self.specs();
        let ts_dims = self.timestep_dims(dims[0]);
        let Unet {
            session,
            path,
            guidance,
            device,
            ..
        } = self;
        let Some(io) = device.as_mut() else {
            return Ok(false);
        };
        let cond = HostCond {
            hidden,
            added: added.map(|a| (a.text_embeds.view(), a.time_ids.view())),
            guidance: guidance.as_ref().map(|g| g.view()),
        };
        io.bind(session, &specs, dims, &ts_dims, &cond)
            .map_err(|e| io_err(path, &e))?;
        Ok(true)
    }

    /// The bound `sample` input (f32, whatever the graph takes), to fill before
    /// [`Unet::run_bound`]. On the device path it is the host staging copy.
    pub fn input_mut(&mut self) -> Option<ndarray::ArrayViewMutD<'_, f32>> {
        if let Some(io) = self.device.as_mut() {
            return io.input_mut();
        }
        self.bound.as_mut().map(|b| b.sample.extract_array_mut())
    }

    /// One UNet evaluation on the bound buffers: returns a view of `out_sample`. On the
    /// device path with CUDA graphs the run uses the shape's own run options (its graph id),
    /// so `run_options` cannot terminate it mid-run; the loop stops after the step.
    pub fn run_bound(
        &mut self,
        timestep: f64,
        run_options: &RunOptions,
    ) -> Result<ArrayViewD<'_, f32>, PipelineError> {
        if let Some(io) = self.device.as_mut() {
            let path = &self.path;
            return io
                .run(&mut self.session, timestep, run_options)
                .map_err(|e| match e {
                    RunError::Run(e) => ort_err(path)(e),
                    RunError::Io(e) => io_err(path, &e),
                });
        }
        let err = ort_err(&self.path);
        let b = self
            .bound
            .as_mut()
            .ok_or_else(|| PipelineError::Inference {
                component: component_name(&self.path),
                message: "UNet buffers are not bound".into(),
            })?;
        b.timestep.extract_array_mut().fill(timestep as f32);
        b.binding.bind_input("sample", &b.sample).map_err(&err)?;
        b.binding
            .bind_input("timestep", &b.timestep)
            .map_err(&err)?;
        drop(
            self.session
                .run_binding_with_options(&b.binding, run_options)
                .map_err(&err)?,
        );
        Ok(b.out.extract_array())
    }

    /// One UNet evaluation: returns `out_sample` with the shape of `sample`. A
    /// ControlNet-ready UNet takes `residuals` (zeros when `None`).
    pub fn run(
        &mut self,
        sample: ArrayViewD<'_, f32>,
        timestep: f64,
        hidden: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
        residuals: Option<&[ArrayD<f32>]>,
        run_options: &RunOptions,
    ) -> Result<ArrayD<f32>, PipelineError> {
        let err = ort_err(&self.path);
        let batch = sample.len_of(Axis(0));
        let (h, w) = (sample.shape()[2], sample.shape()[3]);
        let mut inputs = ort::inputs![
            "sample" => float_input(sample, self.sample.elem).map_err(&err)?,
            "timestep" => timestep_input(self.timestep.elem, self.timestep_dims(batch), timestep)
                .map_err(&err)?,
            "encoder_hidden_states" => float_input(hidden, self.hidden.elem).map_err(&err)?,
        ];
        if let (Some(a), Some(specs)) = (added, self.added) {
            inputs.extend(added_inputs(a, specs).map_err(&err)?);
        }
        if let (Some(spec), Some(g)) = (self.timestep_cond, self.guidance.as_ref()) {
            inputs.push((
                "timestep_cond".into(),
                float_input(g.view(), spec.elem).map_err(&err)?,
            ));
        }
        let zeros;
        let residuals = match residuals {
            Some(r) => r,
            None => {
                zeros = self
                    .residuals
                    .iter()
                    .map(|(_, shape, _)| ArrayD::zeros(shape.dims(batch, h, w).to_vec()))
                    .collect::<Vec<_>>();
                &zeros
            }
        };
        for ((name, _, spec), r) in self.residuals.iter().zip(residuals) {
            inputs.push((
                name.clone().into(),
                float_input(r.view(), spec.elem).map_err(&err)?,
            ));
        }
        let outputs = self
            .session
            .run_with_options(inputs, run_options)
            .map_err(&err)?;
        float_output(&outputs["out_sample"], self.out.elem).map_err(&err)
    }
}

/// A device-buffer error as the pipeline reports a UNet failure.
fn io_err(path: &Path, e: &DeviceIoError) -> PipelineError {
    PipelineError::Inference {
        component: component_name(path),
        message: e.to_string(),
    }
}
