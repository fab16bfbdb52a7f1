//! ControlNets: each a session of its own (`controlnet/NAME/model.onnx`, as
//! `scripts/export-model` writes it), run every step on the UNet's input before the UNet,
//! and the residuals they hand the UNet, as diffusers' `StableDiffusionControlNetPipeline`
//! (and its SDXL and image-to-image variants) computes them:
//!
//! * the control image is resized to the output size with PIL's Lanczos filter (when its
//!   size differs), read in [0, 1] (`do_normalize=False`) and repeated for every row of the
//!   UNet batch (both halves of classifier-free guidance);
//! * each ControlNet's residuals are multiplied by its scale (`controlnet_conditioning_scale`;
//!   the graph is exported with scale 1), several ControlNets' add up in request order
//!   (`MultiControlNetModel`), and a ControlNet outside its `start`..`end` fraction of the
//!   steps adds nothing (diffusers multiplies by a keep factor of 0: the same zeros);
//! * the UNet adds them to its skip connections (`down_block_additional_residuals`) and
//!   its mid block (`mid_block_additional_residual`); with none active it gets zeros, which
//!   leave its output bit for bit what a UNet without those inputs computes.
//!
//! A generation binds its ControlNets' inputs and outputs once ([`Controls::bind`]), as the
//! UNet's are bound: for an all-f32 graph, ONNX Runtime tensors bound with an
//! [`IoBinding`] (the `sample` the loop copies the UNet's latent channels into, shared by
//! the ControlNets; the timestep; the text conditioning, shared; the control image; the
//! residual outputs). A step writes `sample` and the timestep in place, runs the bindings
//! and adds each scaled residual into the UNet's residual buffers in place, which it
//! visits one at a time ([`ResidualSink`]): nothing is allocated per step. Other graphs
//! (fp16) run with their inputs converted per run. The bindings belong to the generation,
//! so a generation that runs in an interlude between two steps binds its own and leaves
//! the suspended one's as they were.

use std::path::PathBuf;

use ndarray::{Array4, ArrayD, ArrayViewD, ArrayViewMutD, Axis, CowArray, IxDyn, Zip};
use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::Tensor;

use super::PipelineError;
use super::components::{
    AddedCond, added_inputs, float_input, float_output, ort_err, timestep_input,
};
use super::preprocess;
use crate::model::controlnet::{self, ControlNetInfo, ResidualShape};
use crate::model::signature::{self, FLOATS, Side, Spec, TIMESTEP};
use crate::request::Control;
use crate::runtime::Runtime;

/// One ControlNet's session with its checked signature.
pub struct ControlNet {
    name: String,
    session: Session,
    path: PathBuf,
    sample: Spec,
    timestep: Spec,
    hidden: Spec,
    cond: Spec,
    added: Option<(Spec, Spec)>,
    /// The down-block outputs then the mid block's, in the UNet's residual order.
    outputs: Vec<(String, Spec)>,
}

impl ControlNet {
    /// Loads a ControlNet and checks it gives the `residuals` down-block residuals the
    /// UNet takes (and the mid block's); `sdxl`: it takes `text_embeds` and `time_ids`.
    pub fn load(
        runtime: &Runtime,
        info: &ControlNetInfo,
        sdxl: bool,
        residuals: usize,
    ) -> Result<ControlNet, PipelineError> {
        let path = info.onnx();
        // It runs in turn with the UNet every step: threads that sleep between runs
        // leave the cores to the UNet's (docs/controlnet.md).
        let session = runtime.session_without_spinning(&path)?;
        let req = |side, name: &str, elems, ranks: &[usize]| {
            signature::require(&session, &path, side, name, elems, ranks)
        };
        let sample = req(Side::Input, "sample", FLOATS, &[4])?;
        let timestep = req(Side::Input, "timestep", TIMESTEP, &[0, 1])?;
        let hidden = req(Side::Input, "encoder_hidden_states", FLOATS, &[3])?;
        let cond = req(Side::Input, "controlnet_cond", FLOATS, &[4])?;
        let added = if sdxl {
            Some((
                req(Side::Input, "text_embeds", FLOATS, &[2])?,
                req(Side::Input, "time_ids", FLOATS, &[2])?,
            ))
        } else {
            None
        };
        let mut outputs = Vec::with_capacity(residuals + 1);
        for i in 0..residuals {
            let name = controlnet::down_output(i);
            outputs.push((name.clone(), req(Side::Output, &name, FLOATS, &[4])?));
        }
        let mid = controlnet::MID_OUTPUT.to_string();
        outputs.push((mid.clone(), req(Side::Output, &mid, FLOATS, &[4])?));
        let extra = session
            .outputs()
            .iter()
            .filter(|o| !outputs.iter().any(|(n, _)| n == o.name()))
            .count();
        if extra > 0 {
            return Err(PipelineError::Model(crate::model::ModelError::Signature {
                path,
                message: format!(
                    "the ControlNet gives {} residuals and the UNet takes {}: it was exported for another UNet",
                    session.outputs().len(),
                    residuals + 1
                ),
            }));
        }
        Ok(ControlNet {
            name: info.name.clone(),
            session,
            path,
            sample,
            timestep,
            hidden,
            cond,
            added,
            outputs,
        })
    }

    /// Its name (the folder under `controlnet/`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether every tensor it exchanges is f32, so its inputs and outputs can be bound in
    /// place.
    fn all_f32(&self) -> bool {
        let f32s = |s: &Spec| s.elem == signature::Elem::F32;
        f32s(&self.sample)
            && f32s(&self.timestep)
            && f32s(&self.hidden)
            && f32s(&self.cond)
            && self.added.as_ref().is_none_or(|(a, b)| f32s(a) && f32s(b))
            && self.outputs.iter().all(|(_, s)| f32s(s))
    }

    /// Binds a generation's inputs (`shared`, its `image`) and allocates its residual
    /// outputs, `shapes` at `rows` rows of `h` × `w` latents.
    fn bind(
        &self,
        shared: &Shared,
        image: &Tensor<f32>,
        shapes: &[ResidualShape],
        (rows, h, w): (usize, usize, usize),
    ) -> Result<BoundNet, PipelineError> {
        let err = ort_err(&self.path);
        let alloc = Allocator::default();
        let mut binding = self.session.create_binding().map_err(&err)?;
        // The timestep as the graph declares it: a scalar, or one per row.
        let ts_dims = if self.timestep.rank == 0 {
            vec![]
        } else {
            vec![rows]
        };
        let timestep = Tensor::<f32>::new(&alloc, ts_dims).map_err(&err)?;
        binding.bind_input("sample", &shared.sample).map_err(&err)?;
        binding.bind_input("timestep", &timestep).map_err(&err)?;
        binding
            .bind_input("encoder_hidden_states", &shared.hidden)
            .map_err(&err)?;
        binding.bind_input("controlnet_cond", image).map_err(&err)?;
        if let (Some((te, ti)), Some(_)) = (shared.added.as_ref(), self.added) {
            binding.bind_input("text_embeds", te).map_err(&err)?;
            binding.bind_input("time_ids", ti).map_err(&err)?;
        }
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for ((name, _), shape) in self.outputs.iter().zip(shapes) {
            let mut t =
                Tensor::<f32>::new(&alloc, shape.dims(rows, h, w).to_vec()).map_err(&err)?;
            binding.bind_output(name.as_str(), &mut t).map_err(&err)?;
            outputs.push(t);
        }
        Ok(BoundNet {
            binding,
            timestep,
            outputs,
        })
    }

    /// One evaluation on its bound I/O `b`: the timestep is written in place, and the
    /// residuals are read from the bound outputs in place and added into the UNet's
    /// ([`add_residuals`]).
    fn run_bound(
        &mut self,
        b: &mut BoundNet,
        timestep: f64,
        scales: &[f32],
        acc: &mut ResidualSink<'_>,
        modes: (bool, bool),
        run_options: &RunOptions,
    ) -> Result<(), PipelineError> {
        let err = ort_err(&self.path);
        b.timestep.extract_tensor_mut().1.fill(timestep as f32);
        drop(
            self.session
                .run_binding_with_options(&b.binding, run_options)
                .map_err(&err)?,
        );
        let outputs = &b.outputs;
        let names = &self.outputs;
        add_residuals(&self.name, acc, scales, modes, &|i| {
            Ok((
                names[i].0.as_str(),
                CowArray::from(outputs[i].extract_array()),
            ))
        })
    }

    /// One evaluation with converted inputs (graphs that are not all-f32) on the
    /// ControlNets' `sample` (the UNet's latent channels), adding `scales[i]` times
    /// residual `i` into the UNet's residual `i` ([`add_residuals`]).
    #[allow(clippy::too_many_arguments)]
    fn run_converted(
        &mut self,
        sample: ArrayViewD<'_, f32>,
        timestep: f64,
        hidden: ArrayViewD<'_, f32>,
        image: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
        scales: &[f32],
        acc: &mut ResidualSink<'_>,
        modes: (bool, bool),
        run_options: &RunOptions,
    ) -> Result<(), PipelineError> {
        let err = ort_err(&self.path);
        let batch = sample.len_of(Axis(0));
        let mut inputs = ort::inputs![
            "sample" => float_input(sample, self.sample.elem).map_err(&err)?,
            "timestep" => timestep_input(self.timestep.elem, timestep_dims(self.timestep, batch), timestep)
                .map_err(&err)?,
            "encoder_hidden_states" => float_input(hidden, self.hidden.elem).map_err(&err)?,
            "controlnet_cond" => float_input(image, self.cond.elem).map_err(&err)?,
        ];
        if let (Some(a), Some(specs)) = (added, self.added) {
            inputs.extend(added_inputs(a, specs).map_err(&err)?);
        }
        let outputs = self
            .session
            .run_with_options(inputs, run_options)
            .map_err(&err)?;
        let names = &self.outputs;
        add_residuals(&self.name, acc, scales, modes, &|i| {
            let (name, spec) = &names[i];
            let out = &outputs[name.as_str()];
            // f32 graphs are read in place; others converted once.
            let view = match spec.elem {
                signature::Elem::F32 => {
                    CowArray::from(out.try_extract_array::<f32>().map_err(&err)?)
                }
                elem => CowArray::from(float_output(out, elem).map_err(&err)?),
            };
            Ok((name.as_str(), view))
        })
    }
}

/// The UNet's residual inputs a step writes into: called with a function, it calls it with
/// each residual's index and buffer in the UNet's order (down blocks, then the mid block),
/// and stops at its first error. The loop visits the buffers in place, so a step builds no
/// list of views.
pub(super) type ResidualSink<'s> = dyn FnMut(&mut ResidualFn<'_>) -> Result<(), PipelineError> + 's;

/// What a [`ResidualSink`] calls per residual buffer.
pub(super) type ResidualFn<'f> =
    dyn FnMut(usize, ArrayViewMutD<'_, f32>) -> Result<(), PipelineError> + 'f;

/// ControlNet residual `i` with its output name, as [`add_residuals`] reads it.
type Residual<'a> = Result<(&'a str, CowArray<'a, f32, IxDyn>), PipelineError>;

/// Adds `scales[i]` times residual `i` (`output(i)`) into the UNet's residual `i`
/// through `acc`. `(assign, only)`: `assign` overwrites instead of adding (the first active
/// ControlNet of a step); `only`: the residuals are the conditional (second) half of the
/// UNet's rows, and the first half is made zeros (guess mode with guidance).
fn add_residuals<'a>(
    net: &str,
    acc: &mut ResidualSink<'_>,
    scales: &[f32],
    (assign, only): (bool, bool),
    output: &dyn Fn(usize) -> Residual<'a>,
) -> Result<(), PipelineError> {
    acc(&mut |i, dst| {
        let Some(&scale) = scales.get(i) else {
            return Ok(());
        };
        let mut dst = if only {
            let rows = dst.len_of(Axis(0));
            let (mut uncond, cond) = dst.split_at(Axis(0), rows / 2);
            if assign {
                uncond.fill(0.0);
            }
            cond
        } else {
            dst
        };
        let (name, view) = output(i)?;
        if view.shape() != dst.shape() {
            return Err(PipelineError::Inference {
                component: format!("controlnet/{net}"),
                message: format!(
                    "{name} has shape {:?}, and the UNet takes {:?}",
                    view.shape(),
                    dst.shape()
                ),
            });
        }
        // diffusers: `residual * conditioning_scale`, then the ControlNets' sum.
        if assign {
            Zip::from(&mut dst)
                .and(&view)
                .for_each(|d, &r| *d = r * scale);
        } else {
            Zip::from(&mut dst)
                .and(&view)
                .for_each(|d, &r| *d += r * scale);
        }
        Ok(())
    })
}

/// The timestep's shape: a scalar, or one value per row.
fn timestep_dims(spec: Spec, batch: usize) -> Vec<usize> {
    if spec.rank == 0 { vec![] } else { vec![batch] }
}

/// A generation's ControlNets, ready to run: the index of each one's session, its
/// control image as the ControlNet's input (`[rows, 3, H, W]` in [0, 1]) and its request
/// values.
pub(super) struct Controls {
    entries: Vec<Entry>,
    /// Guess mode with guidance: the ControlNets run on the conditional rows only (the
    /// second half of the UNet batch) and the unconditional rows get zeros.
    cond_rows_only: bool,
}

struct Entry {
    net: usize,
    /// The control image, moved into a tensor to bind as it is.
    image: Tensor<f32>,
    /// What each residual is multiplied by (down blocks, then the mid block).
    scales: Vec<f32>,
    control: Control,
}

/// A generation's ControlNet I/O ([`Controls::bind`]), made once and refilled each step.
pub(super) struct ControlIo {
    /// The ControlNets' `sample`: the UNet's latent channels (the conditional half in guess
    /// mode), written on the steps where a ControlNet runs; shared by their bindings.
    sample: Tensor<f32>,
    /// Guess mode with guidance ([`Controls`]).
    cond_rows_only: bool,
    /// Per entry of the [`Controls`]: its bound I/O, or `None` where it runs with
    /// converted inputs.
    bound: Vec<Option<BoundNet>>,
}

/// The inputs a generation's bound ControlNets share: `sample`, and the conditioning
/// copied once per generation (the conditional half in guess mode).
struct Shared {
    sample: Tensor<f32>,
    hidden: Tensor<f32>,
    added: Option<(Tensor<f32>, Tensor<f32>)>,
}

/// One ControlNet's I/O for a generation, bound with an [`IoBinding`] that also holds
/// the shared inputs and the control image: the timestep is written in place each step and
/// the residuals read from the bound outputs in place.
struct BoundNet {
    binding: IoBinding,
    timestep: Tensor<f32>,
    /// Its residual outputs, in the UNet's order.
    outputs: Vec<Tensor<f32>>,
}

impl ControlIo {
    /// Copies the UNet's input `unet_in` (`[rows, C, h, w]`)'s latent channels into the
    /// ControlNets' `sample` (the conditional half of its rows in guess mode).
    pub(super) fn fill_sample(&mut self, unet_in: ArrayViewD<'_, f32>) {
        let mut dst = self.sample.extract_array_mut();
        let c = dst.len_of(Axis(1));
        let src = unet_in.slice_axis_move(Axis(1), (..c).into());
        dst.assign(&cond_half(src, self.cond_rows_only));
    }
}

/// `torch.logspace(-1, 0, n)` in float32 as PyTorch's CPU kernel computes it (each half
/// from its own end): guess mode's per-residual factors, 0.1 for the first down block to 1
/// for the mid block.
fn logspace_tenth_to_one(n: usize) -> Vec<f32> {
    if n < 2 {
        return vec![1.0; n];
    }
    let (start, end) = (-1f32, 0f32);
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            let exponent = if i < halfway {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            };
            10f32.powf(exponent)
        })
        .collect()
}

impl Controls {
    /// Decodes and resizes the control images of `controls` for a UNet batch of `rows` rows
    /// at `width` × `height` (`cfg`: the two halves of guidance), and finds each
    /// ControlNet's session among `nets`; `guess`: diffusers' guess mode.
    pub(super) fn prepare(
        controls: &[Control],
        nets: &[ControlNet],
        (rows, cfg, guess): (usize, bool, bool),
        (width, height): (usize, usize),
    ) -> Result<Controls, PipelineError> {
        let cond_rows_only = guess && cfg;
        let rows = if cond_rows_only { rows / 2 } else { rows };
        let mut entries = Vec::with_capacity(controls.len());
        for c in controls {
            let net = nets
                .iter()
                .position(|n| n.name == c.controlnet)
                .ok_or_else(|| PipelineError::InvalidArgument {
                    param: "controls",
                    message: format!(
                        "the loaded model has no ControlNet '{}'",
                        crate::wire::error::echo(&c.controlnet)
                    ),
                })?;
            let rgb = preprocess::decode_rgb(c.image.bytes()).map_err(|e| {
                PipelineError::InvalidArgument {
                    param: "controls",
                    message: format!("control image of '{}': {e}", c.controlnet),
                }
            })?;
            let (h0, w0, _) = rgb.dim();
            let rgb = if (w0, h0) == (width, height) {
                rgb
            } else {
                preprocess::resize_lanczos(&rgb, width, height)
            };
            let mut image = Array4::<f32>::zeros((rows, 3, height, width));
            for row in 0..rows {
                for ch in 0..3 {
                    let mut plane = image.slice_mut(ndarray::s![row, ch, .., ..]);
                    Zip::from(&mut plane)
                        .and(&rgb.slice(ndarray::s![.., .., ch]))
                        .for_each(|d, &v| *d = f32::from(v) / 255.0);
                }
            }
            let residuals = nets[net].outputs.len();
            // diffusers: `residual * conditioning_scale`; in guess mode the scale times
            // `torch.logspace(-1, 0, residuals)`, each in float32.
            let scales = if guess {
                logspace_tenth_to_one(residuals)
                    .into_iter()
                    .map(|f| f * c.scale as f32)
                    .collect()
            } else {
                vec![c.scale as f32; residuals]
            };
            let image = Tensor::from_array(image).map_err(ort_err(&nets[net].path))?;
            entries.push(Entry {
                net,
                image,
                scales,
                control: c.clone(),
            });
        }
        Ok(Controls {
            entries,
            cond_rows_only,
        })
    }

    /// Whether there are none.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any runs at step `i` of `n`.
    pub(super) fn any_active(&self, (i, n): (usize, usize)) -> bool {
        self.entries.iter().any(|e| e.control.active_at(i, n))
    }

    /// Makes the generation's ControlNet I/O for a UNet batch `[rows, c, h, w]` (`c`
    /// latent channels) whose residual inputs have `shapes`, with its text conditioning
    /// (the UNet's rows); `None` without ControlNets. `bind`: all-f32 ControlNets run on
    /// bound buffers (the loop passes whether the UNet does, so the UNet's test hook that
    /// runs it with converted inputs runs the ControlNets so too); others are converted
    /// per run.
    pub(super) fn bind(
        &self,
        nets: &[ControlNet],
        [rows, c, h, w]: [usize; 4],
        shapes: &[ResidualShape],
        (hidden, added): (ArrayViewD<'_, f32>, Option<&AddedCond<'_>>),
        bind: bool,
    ) -> Result<Option<ControlIo>, PipelineError> {
        let Some(first) = self.entries.first() else {
            return Ok(None);
        };
        let only = self.cond_rows_only;
        let rows = if only { rows / 2 } else { rows };
        let err = ort_err(&nets[first.net].path);
        let sample = Tensor::<f32>::new(&Allocator::default(), vec![rows, c, h, w]);
        let sample = sample.map_err(&err)?;
        let is_bound = |e: &Entry| bind && nets[e.net].all_f32();
        let mut bound = Vec::with_capacity(self.entries.len());
        if self.entries.iter().any(is_bound) {
            let owned = |v: ArrayViewD<'_, f32>| Tensor::from_array(cond_half(v, only).to_owned());
            let shared = Shared {
                hidden: owned(hidden).map_err(&err)?,
                added: match added {
                    Some(a) => Some((
                        owned(a.text_embeds.view()).map_err(&err)?,
                        owned(a.time_ids.view()).map_err(&err)?,
                    )),
                    None => None,
                },
                sample,
            };
            for e in &self.entries {
                bound.push(match is_bound(e) {
                    true => Some(nets[e.net].bind(&shared, &e.image, shapes, (rows, h, w))?),
                    false => None,
                });
            }
            return Ok(Some(ControlIo {
                sample: shared.sample,
                cond_rows_only: only,
                bound,
            }));
        }
        bound.resize_with(self.entries.len(), || None);
        Ok(Some(ControlIo {
            sample,
            cond_rows_only: only,
            bound,
        }))
    }

    /// Runs the ControlNets active at step `i` of `n` (counted from the first step that
    /// runs) on `io` (its `sample` filled: [`ControlIo::fill_sample`]) and writes their
    /// summed residuals into the UNet's through `acc`; `false` when none is active (then
    /// they are left as they were: the caller makes them zeros). `hidden` and `added` (the
    /// UNet's rows) are what ControlNets with converted inputs take.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_step(
        &self,
        nets: &mut [ControlNet],
        io: &mut ControlIo,
        (i, n): (usize, usize),
        timestep: f64,
        (hidden, added): (ArrayViewD<'_, f32>, Option<&AddedCond<'_>>),
        acc: &mut ResidualSink<'_>,
        run_options: &RunOptions,
    ) -> Result<bool, PipelineError> {
        if !self.any_active((i, n)) {
            return Ok(false);
        }
        // Guess mode with guidance: the conditional half in, zeros for the other half.
        let only = self.cond_rows_only;
        let half = |v| cond_half(v, only);
        let mut any = false;
        for (e, bound) in self.entries.iter().zip(io.bound.iter_mut()) {
            if !e.control.active_at(i, n) {
                continue;
            }
            let net = &mut nets[e.net];
            let modes = (!any, only);
            match bound {
                Some(b) => net.run_bound(b, timestep, &e.scales, acc, modes, run_options)?,
                None => {
                    let added = added.map(|a| AddedCond {
                        text_embeds: half(a.text_embeds.view()),
                        time_ids: half(a.time_ids.view()),
                    });
                    net.run_converted(
                        io.sample.extract_array(),
                        timestep,
                        half(hidden.view()),
                        e.image.extract_array(),
                        added.as_ref(),
                        &e.scales,
                        acc,
                        modes,
                        run_options,
                    )?
                }
            }
            any = true;
        }
        Ok(any)
    }
}

/// The conditional (second) half of a guidance batch's rows when `only`, else all of them.
fn cond_half(v: ArrayViewD<'_, f32>, only: bool) -> ArrayViewD<'_, f32> {
    if only {
        let rows = v.len_of(Axis(0));
        v.slice_axis_move(Axis(0), (rows / 2..).into())
    } else {
        v
    }
}

/// Residual buffers the pipeline owns (graphs the UNet does not run on bound buffers):
/// one array per residual, allocated once per generation.
pub(super) fn owned_residuals(
    shapes: &[ResidualShape],
    rows: usize,
    (h, w): (usize, usize),
) -> Vec<ArrayD<f32>> {
    shapes
        .iter()
        .map(|s| ArrayD::zeros(IxDyn(&s.dims(rows, h, w))))
        .collect()
}
