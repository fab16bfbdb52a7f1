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
//!
//! Buffers ([`Denoiser::prepare`], once per generation): for an all-f32 graph the batch
//! input (`[2n, 16, h, w]` with guidance), the timestep and the prediction are tensors
//! bound with the conditioning; a step copies the latents into each half of the batch,
//! fills the timestep, runs, and writes the guided prediction into the generation's buffer
//! (without guidance the bound output is the prediction). Nothing is allocated per step.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Array3, Array4, ArrayView4, Axis, concatenate, s};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::Tensor;

use super::{Denoiser, FlowParams, io, shapes};
use crate::model::signature::{self, FLOATS, Side, Spec};
use crate::pipeline::PipelineError;
use crate::pipeline::components::{TextEncoder, float_input, float_output, ort_err};
use crate::runtime::tensorrt::Component;
use crate::runtime::{Replacements, Runtime};
use crate::scheduler::flow_match::FlowPipeline;
use crate::tokenizer::ClipTokenizer;
use crate::tokenizer::t5::T5Tokenizer;

/// The prompt embeddings of a batch: `[rows, 77 + L, D]` and `[rows, P]`, unconditional
/// rows first when guidance runs; the encoders' arrays moved into tensors, bound once per
/// generation.
struct Cond {
    hidden: Tensor<f32>,
    pooled: Tensor<f32>,
    cfg: bool,
    guidance: f32,
}

/// A generation's buffers for latents `dims` `[n, 16, h, w]`, made by
/// [`Denoiser::prepare`]: the steps refill them and allocate nothing.
struct Io {
    dims: [usize; 4],
    /// The guided prediction `[n, 16, h, w]` (classifier-free guidance writes it; the
    /// converted path copies its output here).
    velocity: Array4<f32>,
    run: Run,
}

/// An all-f32 graph's I/O: `hidden_states` (`[rows, 16, h, w]`, the latents once per
/// classifier-free half), `timestep` (`[rows]`) and `out_hidden_states` bound with the
/// conditioning, read and written in place.
struct Bound {
    binding: IoBinding,
    hidden_states: Tensor<f32>,
    timestep: Tensor<f32>,
    out: Tensor<f32>,
}

/// How the transformer runs on a generation's buffers.
enum Run {
    /// An all-f32 graph: its bound tensors.
    Bound(Box<Bound>),
    /// Other element types: the same batch and timestep as host arrays, converted per run.
    Converted {
        input: Array4<f32>,
        timestep: Array1<f32>,
    },
}

/// A loaded SD3 folder's text encoders and transformer.
pub struct Sd3 {
    clip_tokenizers: [ClipTokenizer; 2],
    clip: [TextEncoder; 2],
    t5: Option<(T5Tokenizer, TextEncoder)>,
    transformer: Session,
    path: PathBuf,
    /// `hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`.
    specs: [Spec; 4],
    out_spec: Spec,
    joint_attention_dim: usize,
    cond: Option<Cond>,
    io: Option<Io>,
    /// Test hook: run f32 graphs with converted inputs too.
    force_converted: bool,
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
        let out_spec = signature::require(
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
            out_spec,
            joint_attention_dim,
            cond: None,
            io: None,
            force_converted: false,
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

impl Sd3 {
    /// The graph's float inputs and output, all f32: buffers bound in place.
    fn all_f32(&self) -> bool {
        io::all_f32(self.specs.iter().chain([&self.out_spec])) && !self.force_converted
    }
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
        let err = ort_err(&self.path);
        self.io = None;
        self.cond = Some(Cond {
            hidden: io::owned_tensor(hidden, &err)?,
            pooled: io::owned_tensor(pooled, &err)?,
            cfg,
            guidance: p.guidance_scale as f32,
        });
        Ok(())
    }

    fn pipeline(&self) -> FlowPipeline {
        FlowPipeline::Sd3
    }

    fn prepare(&mut self, dims: [usize; 4]) -> Result<(), PipelineError> {
        let err = ort_err(&self.path);
        let cond = self.cond.as_ref().ok_or_else(no_conditioning)?;
        let rows = if cond.cfg { 2 * dims[0] } else { dims[0] };
        let batch = [rows, dims[1], dims[2], dims[3]];
        let run = if self.all_f32() {
            let hidden_states = io::host_tensor(&batch, &err)?;
            let timestep = io::host_tensor(&[rows], &err)?;
            let mut out = io::host_tensor(&batch, &err)?;
            let mut binding = self.transformer.create_binding().map_err(&err)?;
            binding
                .bind_input("hidden_states", &hidden_states)
                .map_err(&err)?;
            binding
                .bind_input("encoder_hidden_states", &cond.hidden)
                .map_err(&err)?;
            binding
                .bind_input("pooled_projections", &cond.pooled)
                .map_err(&err)?;
            binding.bind_input("timestep", &timestep).map_err(&err)?;
            binding
                .bind_output("out_hidden_states", &mut out)
                .map_err(&err)?;
            Run::Bound(Box::new(Bound {
                binding,
                hidden_states,
                timestep,
                out,
            }))
        } else {
            Run::Converted {
                input: Array4::zeros(batch),
                timestep: Array1::zeros(rows),
            }
        };
        self.io = Some(Io {
            dims,
            velocity: Array4::zeros(dims),
            run,
        });
        Ok(())
    }

    fn predict(
        &mut self,
        latents: &Array4<f32>,
        t: f32,
        run_options: &RunOptions,
    ) -> Result<ArrayView4<'_, f32>, PipelineError> {
        let Sd3 {
            transformer,
            path,
            specs,
            out_spec,
            cond,
            io,
            ..
        } = self;
        let err = ort_err(path);
        let cond = cond.as_ref().ok_or_else(no_conditioning)?;
        let io = io.as_mut().ok_or_else(not_prepared)?;
        let (n, c, h, w) = latents.dim();
        if [n, c, h, w] != io.dims {
            return Err(not_prepared());
        }
        let src = latents.as_slice().expect("standard layout");
        let velocity = io.velocity.as_slice_mut().expect("standard layout");
        match &mut io.run {
            Run::Bound(b) => {
                let Bound {
                    binding,
                    hidden_states,
                    timestep,
                    out,
                } = &mut **b;
                io::repeat_into(hidden_states.extract_tensor_mut().1, src);
                timestep.extract_tensor_mut().1.fill(t);
                drop(
                    transformer
                        .run_binding_with_options(binding, run_options)
                        .map_err(&err)?,
                );
                let out = out.extract_tensor().1;
                if !cond.cfg {
                    return ArrayView4::from_shape(io.dims, out).map_err(shape);
                }
                let (uncond, text) = out.split_at(src.len());
                io::guide(uncond, text, cond.guidance, velocity);
            }
            Run::Converted { input, timestep } => {
                io::repeat_into(input.as_slice_mut().expect("standard layout"), src);
                timestep.fill(t);
                let [hs, ehs, pp, ts] = &*specs;
                let outputs = transformer
                    .run_with_options(
                        ort::inputs![
                            "hidden_states" => float_input(input.view().into_dyn(), hs.elem).map_err(&err)?,
                            "encoder_hidden_states" => float_input(cond.hidden.extract_array(), ehs.elem).map_err(&err)?,
                            "pooled_projections" => float_input(cond.pooled.extract_array(), pp.elem).map_err(&err)?,
                            "timestep" => float_input(timestep.view().into_dyn(), ts.elem).map_err(&err)?,
                        ],
                        run_options,
                    )
                    .map_err(&err)?;
                let out = float_output(&outputs["out_hidden_states"], out_spec.elem)
                    .map_err(&err)?
                    .into_dimensionality::<ndarray::Ix4>()
                    .map_err(shape)?;
                if out.dim() != input.dim() {
                    return Err(PipelineError::Inference {
                        component: "transformer".into(),
                        message: format!(
                            "out_hidden_states {:?}, want {:?}",
                            out.dim(),
                            input.dim()
                        ),
                    });
                }
                let out = out.as_slice().expect("standard layout");
                if cond.cfg {
                    let (uncond, text) = out.split_at(src.len());
                    io::guide(uncond, text, cond.guidance, velocity);
                } else {
                    velocity.copy_from_slice(out);
                }
            }
        }
        Ok(io.velocity.view())
    }

    fn force_converted(&mut self, converted: bool) {
        self.force_converted = converted;
        self.io = None;
    }
}

fn no_conditioning() -> PipelineError {
    PipelineError::Inference {
        component: "transformer".into(),
        message: "no conditioning".into(),
    }
}

fn not_prepared() -> PipelineError {
    PipelineError::Inference {
        component: "transformer".into(),
        message: "no buffers for these latents (prepare first)".into(),
    }
}
