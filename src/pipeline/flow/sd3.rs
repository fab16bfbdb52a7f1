//! Stable Diffusion 3/3.5 behind [`Denoiser`]: diffusers' `StableDiffusion3Pipeline`.
//!
//! Conditioning (`encode_prompt`): the two CLIP encoders' penultimate hidden states
//! (`hidden_states[-2]`) side by side and zero-padded to the transformer's
//! `joint_attention_dim`, then T5's states after them along the sequence (zeros of
//! `max_sequence_length` tokens when the folder has no `text_encoder_3`); the pooled
//! projections are the two CLIP `text_embeds` side by side. With guidance > 1 the
//! negative prompt (default empty) is encoded the same way and runs first in a doubled
//! batch; the prediction is `uncond + g·(text − uncond)` in f32. The transformer takes
//! the timestep as `sigma · 1000` (float), the latents unpacked.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Array4, Axis, concatenate, s};
use ort::session::{RunOptions, Session};

use super::{Denoiser, FlowParams, shapes};
use crate::model::signature::{self, FLOATS, Side, Spec};
use crate::pipeline::PipelineError;
use crate::pipeline::components::{TextEncoder, float_input, float_output, ort_err};
use crate::runtime::tensorrt::Component;
use crate::runtime::{Replacements, Runtime};
use crate::scheduler::flow_match::FlowPipeline;
use crate::tokenizer::ClipTokenizer;
use crate::tokenizer::t5::T5Tokenizer;

/// The prompt embeddings of a batch: `[rows, 77 + L, D]` and `[rows, P]`, unconditional
/// rows first when guidance runs.
struct Cond {
    hidden: Array3<f32>,
    pooled: Array2<f32>,
    cfg: bool,
    guidance: f32,
}

/// A loaded SD3 folder's text encoders and transformer.
pub struct Sd3 {
    clip_tokenizers: [ClipTokenizer; 2],
    clip: [TextEncoder; 2],
    t5: Option<(T5Tokenizer, TextEncoder)>,
    transformer: Session,
    path: PathBuf,
    specs: [Spec; 4],
    joint_attention_dim: usize,
    cond: Option<Cond>,
}

impl Sd3 {
    /// Loads `text_encoder`, `text_encoder_2`, `text_encoder_3` (optional) and
    /// `transformer` of an Optimum SD3 export.
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<Sd3, PipelineError> {
        let none = Replacements::NONE;
        let clip = |i: &str| -> Result<(ClipTokenizer, TextEncoder), PipelineError> {
            let tok = ClipTokenizer::from_dir(&dir.join(format!("tokenizer{i}")))?;
            let enc = TextEncoder::load(
                runtime,
                &dir.join(format!("text_encoder{i}/model.onnx")),
                true,
                Some("text_embeds"),
                &shapes(Component::TextEncoder, tok.max_length()),
                none,
            )?;
            Ok((tok, enc))
        };
        let (tok1, enc1) = clip("")?;
        let (tok2, enc2) = clip("_2")?;
        let t5 = if dir.join("text_encoder_3/model.onnx").is_file() {
            let tok = T5Tokenizer::from_dir(&dir.join("tokenizer_3"))?;
            let enc = TextEncoder::load(
                runtime,
                &dir.join("text_encoder_3/model.onnx"),
                false,
                None,
                &shapes(Component::TextEncoder, 256),
                none,
            )?;
            Some((tok, enc))
        } else {
            None
        };
        let path = dir.join("transformer/model.onnx");
        let transformer = runtime.session(&path)?;
        let req = |name: &str, ranks: &[usize]| {
            signature::require(&transformer, &path, Side::Input, name, FLOATS, ranks)
        };
        let specs = [
            req("hidden_states", &[4])?,
            req("encoder_hidden_states", &[3])?,
            req("pooled_projections", &[2])?,
            req("timestep", &[1])?,
        ];
        signature::require(
            &transformer,
            &path,
            Side::Output,
            "out_hidden_states",
            FLOATS,
            &[4],
        )?;
        let config = super::read_json(&dir.join("transformer/config.json"))?;
        let joint_attention_dim = config
            .get("joint_attention_dim")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(4096) as usize;
        Ok(Sd3 {
            clip_tokenizers: [tok1, tok2],
            clip: [enc1, enc2],
            t5,
            transformer,
            path,
            specs,
            joint_attention_dim,
            cond: None,
        })
    }

    /// `encode_prompt` for one text: (`[1, 77 + L, D]`, `[1, P]`).
    fn encode(
        &mut self,
        text: &str,
        max_len: usize,
    ) -> Result<(Array3<f32>, Array2<f32>), PipelineError> {
        let mut hidden = Vec::with_capacity(2);
        let mut pooled = Vec::with_capacity(2);
        for (tok, enc) in self.clip_tokenizers.iter().zip(self.clip.iter_mut()) {
            let (h, p) = enc.encode(&[tok.encode(text)?])?;
            hidden.push(h);
            pooled.push(p.ok_or_else(|| PipelineError::Inference {
                component: "text_encoder".into(),
                message: "no text_embeds output".into(),
            })?);
        }
        let views: Vec<_> = hidden.iter().map(|h| h.view()).collect();
        let clip = concatenate(Axis(2), &views).map_err(shape)?;
        let d = self.joint_attention_dim;
        let (rows, tokens, width) = clip.dim();
        if width > d {
            return Err(PipelineError::Inference {
                component: "text_encoder".into(),
                message: format!("CLIP states of width {width} exceed joint_attention_dim {d}"),
            });
        }
        let mut padded = Array3::<f32>::zeros((rows, tokens, d));
        padded.slice_mut(s![.., .., ..width]).assign(&clip);
        let t5 = match &mut self.t5 {
            Some((tok, enc)) => {
                let (ids, _) = tok.encode(text, max_len)?;
                enc.encode(&[ids])?.0
            }
            None => Array3::zeros((1, max_len, d)),
        };
        let hidden = concatenate(Axis(1), &[padded.view(), t5.view()]).map_err(shape)?;
        let views: Vec<_> = pooled.iter().map(|p| p.view()).collect();
        let pooled = concatenate(Axis(1), &views).map_err(shape)?;
        Ok((hidden, pooled))
    }
}

fn shape(e: ndarray::ShapeError) -> PipelineError {
    PipelineError::Inference {
        component: "text_encoder".into(),
        message: e.to_string(),
    }
}

/// `rows` copies of a one-row array, stacked.
fn repeat<D: ndarray::RemoveAxis>(
    a: &ndarray::Array<f32, D>,
    rows: usize,
) -> Result<ndarray::Array<f32, D>, PipelineError> {
    let views: Vec<_> = (0..rows).map(|_| a.view()).collect();
    concatenate(Axis(0), &views).map_err(shape)
}

impl Denoiser for Sd3 {
    fn condition(&mut self, p: &FlowParams) -> Result<(), PipelineError> {
        let n = p.num_images;
        let (hidden, pooled) = self.encode(&p.prompt, p.max_sequence_length)?;
        let (mut hidden, mut pooled) = (repeat(&hidden, n)?, repeat(&pooled, n)?);
        let cfg = p.guidance_scale > 1.0;
        if cfg {
            let negative = p.negative_prompt.as_deref().unwrap_or("");
            let (nh, np) = self.encode(negative, p.max_sequence_length)?;
            hidden =
                concatenate(Axis(0), &[repeat(&nh, n)?.view(), hidden.view()]).map_err(shape)?;
            pooled =
                concatenate(Axis(0), &[repeat(&np, n)?.view(), pooled.view()]).map_err(shape)?;
        }
        self.cond = Some(Cond {
            hidden,
            pooled,
            cfg,
            guidance: p.guidance_scale as f32,
        });
        Ok(())
    }

    fn pipeline(&self) -> FlowPipeline {
        FlowPipeline::Sd3
    }

    fn predict(
        &mut self,
        latents: &Array4<f32>,
        t: f32,
        run_options: &RunOptions,
    ) -> Result<Array4<f32>, PipelineError> {
        let cond = self.cond.as_ref().ok_or_else(|| PipelineError::Inference {
            component: "transformer".into(),
            message: "no conditioning".into(),
        })?;
        let err = ort_err(&self.path);
        let n = latents.dim().0;
        let input = if cond.cfg {
            concatenate(Axis(0), &[latents.view(), latents.view()]).map_err(shape)?
        } else {
            latents.clone()
        };
        let rows = input.dim().0;
        let timestep = ndarray::Array1::<f32>::from_elem(rows, t);
        let [hs, ehs, pp, ts] = &self.specs;
        let outputs = self
            .transformer
            .run_with_options(
                ort::inputs![
                    "hidden_states" => float_input(input.view().into_dyn(), hs.elem).map_err(&err)?,
                    "encoder_hidden_states" => float_input(cond.hidden.view().into_dyn(), ehs.elem).map_err(&err)?,
                    "pooled_projections" => float_input(cond.pooled.view().into_dyn(), pp.elem).map_err(&err)?,
                    "timestep" => float_input(timestep.view().into_dyn(), ts.elem).map_err(&err)?,
                ],
                run_options,
            )
            .map_err(&err)?;
        let out = float_output(&outputs["out_hidden_states"], hs.elem)
            .map_err(&err)?
            .into_dimensionality::<ndarray::Ix4>()
            .map_err(shape)?;
        if !cond.cfg {
            return Ok(out);
        }
        let g = cond.guidance;
        let uncond = out.slice(s![..n, .., .., ..]);
        let text = out.slice(s![n.., .., .., ..]);
        let mut guided = uncond.to_owned();
        ndarray::Zip::from(&mut guided)
            .and(&text)
            .for_each(|u, &t| *u += g * (t - *u));
        Ok(guided)
    }
}
