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

use std::path::PathBuf;

use ndarray::{Array4, ArrayD, ArrayViewD, ArrayViewMutD, Axis, IxDyn, Zip};
use ort::session::{RunOptions, Session};

use super::PipelineError;
use super::components::{AddedCond, float_input, float_output, ort_err};
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

    /// One evaluation on the UNet's input `sample` (its latent channels), adding
    /// `scales[i]` times residual `i` to `acc[i]` (`assign`: overwrite instead of adding:
    /// the first active ControlNet of a step).
    #[allow(clippy::too_many_arguments)]
    pub fn run_into(
        &mut self,
        sample: ArrayViewD<'_, f32>,
        timestep: f64,
        hidden: ArrayViewD<'_, f32>,
        image: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
        scales: &[f32],
        acc: &mut [ArrayViewMutD<'_, f32>],
        assign: bool,
        run_options: &RunOptions,
    ) -> Result<(), PipelineError> {
        let err = ort_err(&self.path);
        let batch = sample.len_of(Axis(0));
        let mut inputs = ort::inputs![
            "sample" => float_input(sample, self.sample.elem).map_err(&err)?,
            "timestep" => timestep_value(self.timestep, timestep, batch).map_err(&err)?,
            "encoder_hidden_states" => float_input(hidden, self.hidden.elem).map_err(&err)?,
            "controlnet_cond" => float_input(image, self.cond.elem).map_err(&err)?,
        ];
        if let (Some(a), Some((te, ti))) = (added, self.added) {
            inputs.push((
                "text_embeds".into(),
                float_input(a.text_embeds.view(), te.elem).map_err(&err)?,
            ));
            inputs.push((
                "time_ids".into(),
                float_input(a.time_ids.view(), ti.elem).map_err(&err)?,
            ));
        }
        let outputs = self
            .session
            .run_with_options(inputs, run_options)
            .map_err(&err)?;
        for (((name, spec), dst), &scale) in self.outputs.iter().zip(acc.iter_mut()).zip(scales) {
            let out = &outputs[name.as_str()];
            // f32 graphs are read in place; others converted once.
            let owned;
            let view = match spec.elem {
                signature::Elem::F32 => out.try_extract_array::<f32>().map_err(&err)?,
                elem => {
                    owned = float_output(out, elem).map_err(&err)?;
                    owned.view()
                }
            };
            if view.shape() != dst.shape() {
                return Err(PipelineError::Inference {
                    component: format!("controlnet/{}", self.name),
                    message: format!(
                        "{name} has shape {:?}, and the UNet takes {:?}",
                        view.shape(),
                        dst.shape()
                    ),
                });
            }
            // diffusers: `residual * conditioning_scale`, then the ControlNets' sum.
            if assign {
                Zip::from(&mut *dst)
                    .and(&view)
                    .for_each(|d, &r| *d = r * scale);
            } else {
                Zip::from(&mut *dst)
                    .and(&view)
                    .for_each(|d, &r| *d += r * scale);
            }
        }
        Ok(())
    }
}

/// The timestep as the graph declares it (as the UNet's: a scalar, or one per row).
fn timestep_value(
    spec: Spec,
    t: f64,
    batch: usize,
) -> Result<ort::session::SessionInputValue<'static>, ort::Error> {
    use half::f16;
    use ort::value::Tensor;
    let shape: Vec<usize> = if spec.rank == 0 { vec![] } else { vec![batch] };
    let n = shape.iter().product::<usize>().max(1);
    Ok(match spec.elem {
        signature::Elem::I64 => Tensor::from_array((shape, vec![t as i64; n]))?.into(),
        signature::Elem::F16 => {
            Tensor::from_array((shape, vec![f16::from_f32(t as f32); n]))?.into()
        }
        _ => Tensor::from_array((shape, vec![t as f32; n]))?.into(),
    })
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
    image: Array4<f32>,
    /// What each residual is multiplied by (down blocks, then the mid block).
    scales: Vec<f32>,
    control: Control,
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

    /// Runs the ControlNets active at step `i` of `n` (counted from the first step that
    /// runs) and writes their summed residuals into `acc`; `false` when none is active
    /// (then `acc` is left as it was: the caller makes it zeros).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_step(
        &self,
        nets: &mut [ControlNet],
        (i, n): (usize, usize),
        sample: ArrayViewD<'_, f32>,
        timestep: f64,
        hidden: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
        acc: &mut [ArrayViewMutD<'_, f32>],
        run_options: &RunOptions,
    ) -> Result<bool, PipelineError> {
        if !self.any_active((i, n)) {
            return Ok(false);
        }
        // Guess mode with guidance: the conditional half in, zeros for the other half.
        let only = self.cond_rows_only;
        let half = |v| cond_half(v, only);
        let added = added.map(|a| AddedCond {
            text_embeds: half(a.text_embeds.view()),
            time_ids: half(a.time_ids.view()),
        });
        let mut cond_acc: Vec<ArrayViewMutD<'_, f32>> = acc
            .iter_mut()
            .map(|a| {
                let rows = a.len_of(Axis(0));
                if self.cond_rows_only {
                    let (mut uncond, cond) = a.view_mut().split_at(Axis(0), rows / 2);
                    uncond.fill(0.0);
                    cond
                } else {
                    a.view_mut()
                }
            })
            .collect();
        let mut any = false;
        for e in &self.entries {
            if !e.control.active_at(i, n) {
                continue;
            }
            nets[e.net].run_into(
                half(sample.view()),
                timestep,
                half(hidden.view()),
                e.image.view().into_dyn(),
                added.as_ref(),
                &e.scales,
                &mut cond_acc,
                !any,
                run_options,
            )?;
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
