//! The pipeline's ONNX components: each wraps a session whose signature was checked at
//! load time, and converts between diffusiond's f32 arrays and what the graph declares.
//! The text encoders and the VAE live here; the UNet, with its bound buffers, is in
//! [`super::unet`] (re-exported here).

use std::path::{Path, PathBuf};

use half::f16;
use ndarray::{Array2, Array3, ArrayD, ArrayViewD, Ix3};
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{Tensor, TensorRef};

use super::PipelineError;
pub use super::unet::{AddedCond, Unet};
use crate::model::signature::{self, Elem, FLOATS, IDS, Side, Spec};
use crate::runtime::tensorrt::SessionShapes;
use crate::runtime::{Replacements, Runtime};

pub(super) fn ort_err(path: &Path) -> impl Fn(ort::Error) -> PipelineError + '_ {
    move |e| PipelineError::Inference {
        component: component_name(path),
        message: e.to_string(),
    }
}

pub(super) fn component_name(path: &Path) -> String {
    path.parent().and_then(|p| p.file_name()).map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Wraps an f32 view as a session input of the declared float type (no copy for f32).
pub(super) fn float_input<'v>(
    view: ArrayViewD<'v, f32>,
    elem: Elem,
) -> Result<SessionInputValue<'v>, ort::Error> {
    Ok(match elem {
        Elem::F16 => Tensor::from_array(view.mapv(f16::from_f32))?.into(),
        _ => TensorRef::from_array_view(view)?.into(),
    })
}

/// A timestep as a graph declares it, filled with `t` in `shape` (a scalar when empty).
/// diffusers hands the scheduler's value to Optimum, which casts it to the input's type
/// (`astype`): float → f32 (or f16), int → i64.
pub(super) fn timestep_input(
    elem: Elem,
    shape: Vec<usize>,
    t: f64,
) -> Result<SessionInputValue<'static>, ort::Error> {
    let n = shape.iter().product::<usize>().max(1);
    Ok(match elem {
        Elem::I64 => Tensor::from_array((shape, vec![t as i64; n]))?.into(),
        Elem::F16 => Tensor::from_array((shape, vec![f16::from_f32(t as f32); n]))?.into(),
        _ => Tensor::from_array((shape, vec![t as f32; n]))?.into(),
    })
}

/// SDXL's `text_embeds` and `time_ids`, as the declared float types, for a UNet-like
/// graph (the UNet, a ControlNet) that takes them.
pub(super) fn added_inputs<'v>(
    added: &'v super::unet::AddedCond<'_>,
    (text_embeds, time_ids): (Spec, Spec),
) -> Result<[(std::borrow::Cow<'static, str>, SessionInputValue<'v>); 2], ort::Error> {
    Ok([
        (
            "text_embeds".into(),
            float_input(added.text_embeds.view(), text_embeds.elem)?,
        ),
        (
            "time_ids".into(),
            float_input(added.time_ids.view(), time_ids.elem)?,
        ),
    ])
}

/// Reads a float output as f32, whatever float type the graph produced.
pub(super) fn float_output(
    value: &ort::value::DynValue,
    elem: Elem,
) -> Result<ArrayD<f32>, ort::Error> {
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
    /// pooled output SDXL's second encoder supplies (`text_embeds`); `shapes` and
    /// `initializers` as for [`Unet::load`].
    pub fn load(
        runtime: &Runtime,
        path: &Path,
        penultimate: bool,
        pooled: Option<&str>,
        shapes: &SessionShapes,
        replaced: &Replacements,
    ) -> Result<TextEncoder, PipelineError> {
        let session = runtime.session_with(path, shapes, replaced)?;
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
