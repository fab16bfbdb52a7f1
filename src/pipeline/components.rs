//! The pipeline's ONNX components: each wraps a session whose signature was checked at
//! load time, and converts between diffusiond's f32 arrays and what the graph declares.

use std::path::{Path, PathBuf};

use half::f16;
use ndarray::{Array2, Array3, ArrayD, ArrayViewD, Axis, Ix3};
use ort::memory::Allocator;
use ort::session::{IoBinding, RunOptions, Session, SessionInputValue};
use ort::value::{Tensor, TensorRef};

use super::PipelineError;
use crate::model::signature::{self, Elem, FLOATS, IDS, Side, Spec, TIMESTEP};
use crate::runtime::Runtime;
use crate::runtime::tensorrt::SessionShapes;

fn ort_err(path: &Path) -> impl Fn(ort::Error) -> PipelineError + '_ {
    move |e| PipelineError::Inference {
        component: component_name(path),
        message: e.to_string(),
    }
}

fn component_name(path: &Path) -> String {
    path.parent().and_then(|p| p.file_name()).map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Wraps an f32 view as a session input of the declared float type (no copy for f32).
fn float_input<'v>(
    view: ArrayViewD<'v, f32>,
    elem: Elem,
) -> Result<SessionInputValue<'v>, ort::Error> {
    Ok(match elem {
        Elem::F16 => Tensor::from_array(view.mapv(f16::from_f32))?.into(),
        _ => TensorRef::from_array_view(view)?.into(),
    })
}

/// Reads a float output as f32, whatever float type the graph produced.
fn float_output(value: &ort::value::DynValue, elem: Elem) -> Result<ArrayD<f32>, ort::Error> {
    Ok(match elem {
        Elem::F16 => value.try_extract_array::<f16>()?.mapv(f16::to_f32),
        _ => value.try_extract_array::<f32>()?.to_owned(),
    })
}

/// A CLIP text encoder.
pub struct TextEncoder {
    session: Session,
    path: PathBuf,
    ids: Spec,
    /// Output names this pipeline reads, with their types.
    hidden: (String, Spec),
    pooled: Option<(String, Spec)>,
}

impl TextEncoder {
    /// Loads the encoder. `hidden` picks the embeddings to use: `last_hidden_state`
    /// (SD1/2) or the second-to-last `hidden_states.N` (SDXL); `pooled` names the
    /// pooled output SDXL's second encoder supplies (`text_embeds`); `shapes` as for
    /// [`Unet::load`].
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        penultimate: bool,
        pooled: Option<&str>,
        shapes: &SessionShapes,
    ) -> Result<TextEncoder, PipelineError> {
        let session = runtime.session_for(path, shapes)?;
        let ids = signature::require(&session, path, Side::Input, "input_ids", IDS, &[2])?;
        let hidden_name = if penultimate {
            penultimate_hidden_state(&session, path)?
        } else {
            "last_hidden_state".to_string()
        };
        let hidden = signature::require(&session, path, Side::Output, &hidden_name, FLOATS, &[3])?;
        let pooled = match pooled {
            Some(name) => Some((
                name.to_string(),
                signature::require(&session, path, Side::Output, name, FLOATS, &[2])?,
            )),
            None => None,
        };
        Ok(TextEncoder {
            session,
            path: path.to_path_buf(),
            ids,
            hidden: (hidden_name, hidden),
            pooled,
        })
    }

    /// Encodes one batch of token ids: `[B, 77]` → (`[B, 77, D]`, pooled `[B, P]`).
    pub fn encode(
        &mut self,
        ids: &[Vec<i64>],
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), PipelineError> {
        let err = ort_err(&self.path);
        let len = ids.first().map_or(0, Vec::len);
        let flat: Vec<i64> = ids.iter().flatten().copied().collect();
        let shape = [ids.len(), len];
        let input: SessionInputValue = match self.ids.elem {
            Elem::I32 => {
                Tensor::from_array((shape, flat.iter().map(|&v| v as i32).collect::<Vec<_>>()))
                    .map_err(&err)?
                    .into()
            }
            _ => Tensor::from_array((shape, flat)).map_err(&err)?.into(),
        };
        let outputs = self
            .session
            .run(ort::inputs!["input_ids" => input])
            .map_err(&err)?;
        let hidden = float_output(&outputs[self.hidden.0.as_str()], self.hidden.1.elem)
            .map_err(&err)?
            .into_dimensionality::<Ix3>()
            .map_err(|e| PipelineError::Inference {
                component: component_name(&self.path),
                message: e.to_string(),
            })?;
        let pooled = match &self.pooled {
            Some((name, spec)) => Some(
                float_output(&outputs[name.as_str()], spec.elem)
                    .map_err(&err)?
                    .into_dimensionality()
                    .map_err(|e| PipelineError::Inference {
                        component: component_name(&self.path),
                        message: e.to_string(),
                    })?,
            ),
            None => None,
        };
        Ok((hidden, pooled))
    }
}

/// SDXL takes `hidden_states[-2]`: the second-highest `hidden_states.N` output.
fn penultimate_hidden_state(session: &Session, path: &Path) -> Result<String, PipelineError> {
    let mut layers: Vec<usize> = session
        .outputs()
        .iter()
        .filter_map(|o| o.name().strip_prefix("hidden_states.")?.parse().ok())
        .collect();
    layers.sort_unstable();
    match layers.len() {
        0 | 1 => Err(crate::model::ModelError::Signature {
            path: path.to_path_buf(),
            message: format!(
                "SDXL text encoders must output hidden_states.N (it has: {})",
                signature::names(session, Side::Output)
            ),
        }
        .into()),
        n => Ok(format!("hidden_states.{}", layers[n - 2])),
    }
}

/// Extra UNet inputs SDXL needs.
pub struct AddedCond<'a> {
    /// Pooled text embeddings `[B, P]`.
    pub text_embeds: ArrayViewD<'a, f32>,
    /// Micro-conditioning `[B, 6]`.
    pub time_ids: ArrayViewD<'a, f32>,
}

/// The UNet.
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
    /// Reused input/output buffers of the current batch shape (all-f32 graphs).
    bound: Option<Bound>,
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
}

impl Unet {
    /// Loads the UNet and checks its signature; `sdxl` requires `text_embeds` and `time_ids`.
    /// `shapes` is what the pipeline feeds it (TensorRT's optimization profile).
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        sdxl: bool,
        shapes: &SessionShapes,
    ) -> Result<Unet, PipelineError> {
        let session = runtime.session_for(path, shapes)?;
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
        let timestep_fixed_one = session
            .inputs()
            .iter()
            .find(|o| o.name() == "timestep")
            .and_then(|o| o.dtype().tensor_shape().map(|s| s.first() == Some(&1)))
            .unwrap_or(false);
        Ok(Unet {
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
            bound: None,
        })
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
    /// with this conditioning (bound once, for every step). Returns `false` when the graph
    /// is not all-f32: the caller then uses [`Unet::run`].
    pub fn bind(
        &mut self,
        dims: &[usize],
        hidden: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
    ) -> Result<bool, PipelineError> {
        if !self.all_f32() {
            self.bound = None;
            return Ok(false);
        }
        let err = ort_err(&self.path);
        if self.bound.as_ref().is_none_or(|b| b.dims != dims) {
            self.bound = None;
            let alloc = Allocator::default();
            let ts_dims: Vec<usize> = match (self.timestep.rank, self.timestep_fixed_one) {
                (0, _) => vec![],
                (_, true) => vec![1],
                _ => vec![dims[0]],
            };
            let sample = Tensor::<f32>::new(&alloc, dims.to_vec()).map_err(&err)?;
            let timestep = Tensor::<f32>::new(&alloc, ts_dims).map_err(&err)?;
            // The prediction has the latents' 4 channels, whatever the input has (9 for an
            // inpainting UNet).
            let out_dims = [dims[0], LATENT_CHANNELS, dims[2], dims[3]];
            let mut out = Tensor::<f32>::new(&alloc, out_dims.to_vec()).map_err(&err)?;
            let mut binding = self.session.create_binding().map_err(&err)?;
            binding.bind_output("out_sample", &mut out).map_err(&err)?;
            self.bound = Some(Bound {
                dims: dims.to_vec(),
                binding,
                sample,
                timestep,
                out,
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

    /// The bound `sample` input, to fill before [`Unet::run_bound`].
    pub fn input_mut(&mut self) -> Option<ndarray::ArrayViewMutD<'_, f32>> {
        self.bound.as_mut().map(|b| b.sample.extract_array_mut())
    }

    /// One UNet evaluation on the bound buffers: returns a view of `out_sample`.
    pub fn run_bound(
        &mut self,
        timestep: f64,
        run_options: &RunOptions,
    ) -> Result<ArrayViewD<'_, f32>, PipelineError> {
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

    /// One UNet evaluation: returns `out_sample` with the shape of `sample`.
    pub fn run(
        &mut self,
        sample: ArrayViewD<'_, f32>,
        timestep: f64,
        hidden: ArrayViewD<'_, f32>,
        added: Option<&AddedCond<'_>>,
        run_options: &RunOptions,
    ) -> Result<ArrayD<f32>, PipelineError> {
        let err = ort_err(&self.path);
        let batch = sample.len_of(Axis(0));
        let mut inputs = ort::inputs![
            "sample" => float_input(sample, self.sample.elem).map_err(&err)?,
            "timestep" => self.timestep_value(timestep, batch).map_err(&err)?,
            "encoder_hidden_states" => float_input(hidden, self.hidden.elem).map_err(&err)?,
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
        if let (Some(spec), Some(g)) = (self.timestep_cond, self.guidance.as_ref()) {
            inputs.push((
                "timestep_cond".into(),
                float_input(g.view(), spec.elem).map_err(&err)?,
            ));
        }
        let outputs = self
            .session
            .run_with_options(inputs, run_options)
            .map_err(&err)?;
        float_output(&outputs["out_sample"], self.out.elem).map_err(&err)
    }

    /// The timestep as the graph declares it. diffusers hands the scheduler's value to
    /// Optimum, which casts it to the input's type (`astype`): float → f32, int → i64.
    fn timestep_value(
        &self,
        t: f64,
        batch: usize,
    ) -> Result<SessionInputValue<'static>, ort::Error> {
        let shape: Vec<usize> = match (self.timestep.rank, self.timestep_fixed_one) {
            (0, _) => vec![],
            (_, true) => vec![1],
            _ => vec![batch],
        };
        let n = shape.iter().product::<usize>().max(1);
        Ok(match self.timestep.elem {
            Elem::I64 => Tensor::from_array((shape, vec![t as i64; n]))?.into(),
            Elem::F16 => Tensor::from_array((shape, vec![f16::from_f32(t as f32); n]))?.into(),
            _ => Tensor::from_array((shape, vec![t as f32; n]))?.into(),
        })
    }
}

/// Channels of SD latents (and of every UNet's prediction).
pub const LATENT_CHANNELS: usize = 4;

/// The VAE encoder: image-to-image and inpainting encode their images with it.
pub struct VaeEncoder {
    session: Session,
    path: PathBuf,
    input: Spec,
    output: Spec,
}

impl VaeEncoder {
    /// Loads the encoder and checks `sample` → `latent_parameters`; `shapes` as for
    /// [`Unet::load`].
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        shapes: &SessionShapes,
    ) -> Result<VaeEncoder, PipelineError> {
        let session = runtime.session_for(path, shapes)?;
        let input = signature::require(&session, path, Side::Input, "sample", FLOATS, &[4])?;
        let output = signature::require(
            &session,
            path,
            Side::Output,
            "latent_parameters",
            FLOATS,
            &[4],
        )?;
        Ok(VaeEncoder {
            session,
            path: path.to_path_buf(),
            input,
            output,
        })
    }

    /// Encodes images `[B,3,H,W]` in [-1, 1] into the latent distribution's parameters
    /// `[B,8,h,w]` (mean, then log-variance).
    pub fn encode(
        &mut self,
        image: ArrayViewD<'_, f32>,
        run_options: &RunOptions,
    ) -> Result<ArrayD<f32>, PipelineError> {
        let err = ort_err(&self.path);
        let input = float_input(image, self.input.elem).map_err(&err)?;
        let outputs = self
            .session
            .run_with_options(ort::inputs!["sample" => input], run_options)
            .map_err(&err)?;
        float_output(&outputs["latent_parameters"], self.output.elem).map_err(&err)
    }
}

/// The VAE decoder.
pub struct VaeDecoder {
    session: Session,
    path: PathBuf,
    input: Spec,
    output: Spec,
}

impl VaeDecoder {
    /// Loads the decoder and checks `latent_sample` → `sample`; `shapes` as for
    /// [`Unet::load`].
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        shapes: &SessionShapes,
    ) -> Result<VaeDecoder, PipelineError> {
        let session = runtime.session_for(path, shapes)?;
        let input = signature::require(&session, path, Side::Input, "latent_sample", FLOATS, &[4])?;
        let output = signature::require(&session, path, Side::Output, "sample", FLOATS, &[4])?;
        Ok(VaeDecoder {
            session,
            path: path.to_path_buf(),
            input,
            output,
        })
    }

    /// Decodes scaled latents `[B,4,h,w]` into images `[B,3,H,W]` in [-1, 1].
    pub fn decode(
        &mut self,
        latents: ArrayViewD<'_, f32>,
        run_options: &RunOptions,
    ) -> Result<ArrayD<f32>, PipelineError> {
        let err = ort_err(&self.path);
        let input = float_input(latents, self.input.elem).map_err(&err)?;
        let outputs = self
            .session
            .run_with_options(ort::inputs!["latent_sample" => input], run_options)
            .map_err(&err)?;
        float_output(&outputs["sample"], self.output.elem).map_err(&err)
    }
}
