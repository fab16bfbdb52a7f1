//! FLUX.1 behind [`Denoiser`]: diffusers' `FluxPipeline`.
//!
//! Conditioning (`encode_prompt`): CLIP's `pooler_output` as the pooled projections and
//! T5's last hidden states (`max_sequence_length` tokens) as the text; `txt_ids` are zeros
//! `[L, 3]`. No classifier-free batch: a guidance-distilled (dev-style) transformer, with a
//! `guidance` input, gets `guidance_scale` there; a schnell-style one ignores it. The
//! latents are packed into 2×2 patches (`[n, h/2 · w/2, 64]`) for the transformer, with
//! `img_ids` holding each patch's row and column, and its prediction unpacked again; the
//! timestep goes in as `t / 1000`. The scheduler uses FLUX's sigmas and `mu`.
//!
//! Buffers ([`Denoiser::prepare`], once per generation): the ids, the guidance and the
//! conditioning tensors are made once; for an all-f32 graph the packed latents, the
//! timestep and one output per prompt (two with true CFG) are bound with them. A step
//! packs the latents into the bound input ([`pack_into`]), runs, guides in place and
//! unpacks into the generation's prediction buffer ([`unpack_into`]): nothing is allocated
//! per step.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, Array3, Array4, ArrayView4, Axis, concatenate};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{DynTensor, Tensor};

use super::{Denoiser, FlowParams, LATENT_CHANNELS, io, shapes};
use crate::model::signature::{self, FLOATS, Side, Spec};
use crate::pipeline::PipelineError;
use crate::pipeline::components::{TextEncoder, float_input, float_output, ort_err};
use crate::runtime::tensorrt::Component;
use crate::runtime::{Replacements, Runtime};
use crate::scheduler::flow_match::FlowPipeline;
use crate::tokenizer::ClipTokenizer;
use crate::tokenizer::t5::T5Tokenizer;

/// One prompt's conditioning for a batch: `[n, L, D]` and `[n, P]`, the encoders' arrays
/// moved into tensors (bound once per generation).
struct Text {
    hidden: Tensor<f32>,
    pooled: Tensor<f32>,
}

/// A batch's conditioning: the prompt's, the negative prompt's with true classifier-free
/// guidance (`true_cfg_scale` > 1 and a negative prompt), `txt_ids` `[L, 3]`, the
/// guidance.
struct Cond {
    positive: Text,
    negative: Option<(Text, f32)>,
    tokens: usize,
    guidance: f32,
}

/// A generation's buffers for latents `dims` `[n, 16, h, w]`, made by
/// [`Denoiser::prepare`]: the steps refill them and allocate nothing.
struct Io {
    dims: [usize; 4],
    /// The prediction unpacked to `[n, 16, h, w]`.
    velocity: Array4<f32>,
    run: Run,
}

/// An all-f32 graph's I/O: the packed latents (`[n, h/2 · w/2, 64]`), `timestep`
/// (`[n]`), the ids and `guidance` (made once) bound with each prompt's conditioning, one
/// binding and output per prompt (the negative's with true CFG).
struct Bound {
    positive: (IoBinding, Tensor<f32>),
    negative: Option<(IoBinding, Tensor<f32>)>,
    hidden_states: Tensor<f32>,
    timestep: Tensor<f32>,
}

/// How the transformer runs on a generation's buffers.
enum Run {
    /// An all-f32 graph: its bound tensors.
    Bound(Box<Bound>),
    /// Other element types: the same host arrays, the float inputs converted per run.
    Converted {
        packed: Array3<f32>,
        timestep: Array1<f32>,
        guidance: Array1<f32>,
        img_ids: DynTensor,
        txt_ids: DynTensor,
    },
}

/// A loaded FLUX folder's text encoders and transformer.
pub struct Flux {
    clip_tokenizer: ClipTokenizer,
    clip: TextEncoder,
    t5_tokenizer: T5Tokenizer,
    t5: TextEncoder,
    transformer: Session,
    path: PathBuf,
    /// `hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`.
    specs: [Spec; 4],
    out_spec: Spec,
    /// Whether the transformer takes `guidance` (dev-style).
    guidance_input: Option<Spec>,
    /// Whether `img_ids`/`txt_ids` are int64 (Optimum's export) rather than float.
    int_ids: bool,
    cond: Option<Cond>,
    io: Option<Io>,
    /// Test hook: run f32 graphs with converted inputs too.
    force_converted: bool,
}

/// `[n, 16, h, w]` → `[n, h/2 · w/2, 64]` (diffusers' `_pack_latents`).
pub fn pack(latents: &Array4<f32>) -> Array3<f32> {
    let (n, c, h, w) = latents.dim();
    let mut out = Array3::<f32>::zeros((n, (h / 2) * (w / 2), c * 4));
    pack_into(
        latents
            .as_standard_layout()
            .as_slice()
            .expect("standard layout"),
        [n, c, h, w],
        out.as_slice_mut().expect("standard layout"),
    );
    out
}

/// [`pack`] into a buffer: `latents` `[n, c, h, w]` (standard layout) to `out`
/// `[n, h/2 · w/2, 4c]`, token `y · w/2 + x` holding channel `ch`'s 2×2 patch at
/// `4ch + 2dy + dx`.
pub fn pack_into(latents: &[f32], [n, c, h, w]: [usize; 4], out: &mut [f32]) {
    assert!(latents.len() == n * c * h * w && out.len() == latents.len());
    let (rows, cols, features) = (h / 2, w / 2, c * 4);
    for b in 0..n {
        for y in 0..rows {
            for x in 0..cols {
                let token = ((b * rows + y) * cols + x) * features;
                for ch in 0..c {
                    let at = ((b * c + ch) * h + 2 * y) * w + 2 * x;
                    let o = &mut out[token + ch * 4..token + ch * 4 + 4];
                    o[0] = latents[at];
                    o[1] = latents[at + 1];
                    o[2] = latents[at + w];
                    o[3] = latents[at + w + 1];
                }
            }
        }
    }
}

/// The inverse of [`pack`] (diffusers' `_unpack_latents`) for latents `h` x `w`.
pub fn unpack(packed: &Array3<f32>, h: usize, w: usize) -> Array4<f32> {
    let (n, _, features) = packed.dim();
    let c = features / 4;
    let mut out = Array4::<f32>::zeros((n, c, h, w));
    unpack_into(
        packed
            .as_standard_layout()
            .as_slice()
            .expect("standard layout"),
        [n, c, h, w],
        out.as_slice_mut().expect("standard layout"),
    );
    out
}

/// [`unpack`] into a buffer: `packed` `[n, h/2 · w/2, 4c]` to `out` `[n, c, h, w]`.
pub fn unpack_into(packed: &[f32], [n, c, h, w]: [usize; 4], out: &mut [f32]) {
    assert!(out.len() == n * c * h * w && packed.len() == out.len());
    let (rows, cols, features) = (h / 2, w / 2, c * 4);
    for b in 0..n {
        for y in 0..rows {
            for x in 0..cols {
                let token = ((b * rows + y) * cols + x) * features;
                for ch in 0..c {
                    let at = ((b * c + ch) * h + 2 * y) * w + 2 * x;
                    let p = &packed[token + ch * 4..token + ch * 4 + 4];
                    out[at] = p[0];
                    out[at + 1] = p[1];
                    out[at + w] = p[2];
                    out[at + w + 1] = p[3];
                }
            }
        }
    }
}

/// `img_ids` for latents `h` x `w`: one row per patch, `[0, row, column]`.
pub fn image_ids(h: usize, w: usize) -> Array2<f32> {
    let (rows, cols) = (h / 2, w / 2);
    let mut ids = Array2::<f32>::zeros((rows * cols, 3));
    for y in 0..rows {
        for x in 0..cols {
            ids[[y * cols + x, 1]] = y as f32;
            ids[[y * cols + x, 2]] = x as f32;
        }
    }
    ids
}

impl Flux {
    /// Loads `text_encoder` (CLIP), `text_encoder_2` (T5) and `transformer` of an Optimum
    /// FLUX export.
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<Flux, PipelineError> {
        let none = Replacements::NONE;
        let clip_tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let clip = TextEncoder::load(
            runtime,
            &dir.join("text_encoder/model.onnx"),
            false,
            Some("pooler_output"),
            &shapes(Component::TextEncoder, clip_tokenizer.max_length()),
            none,
        )?;
        let t5_tokenizer = T5Tokenizer::from_dir(&dir.join("tokenizer_2"))?;
        let t5 = TextEncoder::load(
            runtime,
            &dir.join("text_encoder_2/model.onnx"),
            false,
            None,
            &shapes(Component::TextEncoder, 512),
            none,
        )?;
        let path = dir.join("transformer/model.onnx");
        let transformer = runtime.session(&path)?;
        let req = |name: &str, ranks: &[usize]| {
            signature::require(&transformer, &path, Side::Input, name, FLOATS, ranks)
        };
        let specs = [
            req("hidden_states", &[3])?,
            req("encoder_hidden_states", &[3])?,
            req("pooled_projections", &[2])?,
            req("timestep", &[1])?,
        ];
        let ids = [signature::Elem::I64, signature::Elem::F32];
        let img_ids = signature::require(&transformer, &path, Side::Input, "img_ids", &ids, &[2])?;
        signature::require(&transformer, &path, Side::Input, "txt_ids", &ids, &[2])?;
        let int_ids = img_ids.elem == signature::Elem::I64;
        let guidance_input = match signature::find(&transformer, Side::Input, "guidance") {
            Some(_) => Some(req("guidance", &[1])?),
            None => None,
        };
        let out_spec = signature::require(
            &transformer,
            &path,
            Side::Output,
            "out_hidden_states",
            FLOATS,
            &[3],
        )?;
        Ok(Flux {
            clip_tokenizer,
            clip,
            t5_tokenizer,
            t5,
            transformer,
            path,
            specs,
            out_spec,
            guidance_input,
            int_ids,
            cond: None,
            io: None,
            force_converted: false,
        })
    }
}

impl Flux {
    /// `encode_prompt` for one text, repeated for `n` images.
    fn encode(&mut self, text: &str, n: usize, tokens: usize) -> Result<Text, PipelineError> {
        let ids = self.clip_tokenizer.encode(text)?;
        let pooled = self
            .clip
            .encode(&[ids])?
            .1
            .ok_or_else(|| PipelineError::Inference {
                component: "text_encoder".into(),
                message: "no pooler_output output".into(),
            })?;
        let (ids, _) = self.t5_tokenizer.encode(text, tokens)?;
        let hidden = self.t5.encode(&[ids])?.0;
        let hidden_views: Vec<_> = (0..n).map(|_| hidden.view()).collect();
        let pooled_views: Vec<_> = (0..n).map(|_| pooled.view()).collect();
        let err = ort_err(&self.path);
        Ok(Text {
            hidden: io::owned_tensor(concatenate(Axis(0), &hidden_views).map_err(shape)?, &err)?,
            pooled: io::owned_tensor(concatenate(Axis(0), &pooled_views).map_err(shape)?, &err)?,
        })
    }

    /// The graph's float inputs and outputs, all f32: buffers bound in place.
    fn all_f32(&self) -> bool {
        io::all_f32(
            self.specs
                .iter()
                .chain([&self.out_spec])
                .chain(&self.guidance_input),
        ) && !self.force_converted
    }
}

/// One transformer run with its float inputs converted (graphs that are not all-f32), on
/// the packed latents with one prompt's conditioning: the packed prediction.
struct Converted<'a> {
    session: &'a mut Session,
    specs: &'a [Spec; 4],
    out_spec: Spec,
    /// `guidance` with its declared type (dev-style).
    guidance: Option<(&'a Array1<f32>, Spec)>,
    packed: &'a Array3<f32>,
    timestep: &'a Array1<f32>,
    ids: (&'a DynTensor, &'a DynTensor),
}

impl Converted<'_> {
    /// One run with `text`'s conditioning: the packed prediction.
    fn run(
        &mut self,
        text: &Text,
        err: io::Err<'_>,
        run_options: &RunOptions,
    ) -> Result<ndarray::ArrayD<f32>, PipelineError> {
        let [hs, ehs, pp, ts] = self.specs;
        let mut inputs = ort::inputs![
            "hidden_states" => float_input(self.packed.view().into_dyn(), hs.elem).map_err(err)?,
            "encoder_hidden_states" => float_input(text.hidden.extract_array(), ehs.elem).map_err(err)?,
            "pooled_projections" => float_input(text.pooled.extract_array(), pp.elem).map_err(err)?,
            "timestep" => float_input(self.timestep.view().into_dyn(), ts.elem).map_err(err)?,
            "img_ids" => self.ids.0,
            "txt_ids" => self.ids.1,
        ];
        if let Some((g, spec)) = self.guidance {
            inputs.push((
                "guidance".into(),
                float_input(g.view().into_dyn(), spec.elem).map_err(err)?,
            ));
        }
        let outputs = self
            .session
            .run_with_options(inputs, run_options)
            .map_err(err)?;
        let out = float_output(&outputs["out_hidden_states"], self.out_spec.elem).map_err(err)?;
        if out.shape() != self.packed.shape() {
            return Err(PipelineError::Inference {
                component: "transformer".into(),
                message: format!(
                    "out_hidden_states {:?}, want {:?}",
                    out.shape(),
                    self.packed.shape()
                ),
            });
        }
        Ok(out.as_standard_layout().into_owned())
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

fn shape(e: ndarray::ShapeError) -> PipelineError {
    PipelineError::Inference {
        component: "transformer".into(),
        message: e.to_string(),
    }
}

impl Denoiser for Flux {
    fn condition(&mut self, p: &FlowParams) -> Result<(), PipelineError> {
        self.io = None;
        let positive = self.encode(&p.prompt, p.num_images, p.max_sequence_length)?;
        let negative = match (&p.negative_prompt, p.true_cfg_scale) {
            (Some(n), g) if g > 1.0 => Some((
                self.encode(n, p.num_images, p.max_sequence_length)?,
                g as f32,
            )),
            _ => None,
        };
        self.cond = Some(Cond {
            positive,
            negative,
            tokens: p.max_sequence_length,
            guidance: p.guidance_scale as f32,
        });
        Ok(())
    }

    fn pipeline(&self) -> FlowPipeline {
        FlowPipeline::Flux
    }

    fn prepare(&mut self, dims: [usize; 4]) -> Result<(), PipelineError> {
        let err = ort_err(&self.path);
        let cond = self.cond.as_ref().ok_or_else(no_conditioning)?;
        let [n, c, h, w] = dims;
        debug_assert_eq!(c, LATENT_CHANNELS);
        let packed_dims = [n, (h / 2) * (w / 2), c * 4];
        let img_ids = io::ids_tensor(image_ids(h, w), self.int_ids, &err)?;
        let txt_ids = io::ids_tensor(Array2::zeros((cond.tokens, 3)), self.int_ids, &err)?;
        let guidance = Array1::<f32>::from_elem(n, cond.guidance);
        let run = if self.all_f32() {
            let hidden_states = io::host_tensor(&packed_dims, &err)?;
            let timestep = io::host_tensor(&[n], &err)?;
            let guidance = match self.guidance_input {
                Some(_) => Some(io::owned_tensor(guidance, &err)?),
                None => None,
            };
            let transformer = &self.transformer;
            let bind = |text: &Text| -> Result<(IoBinding, Tensor<f32>), PipelineError> {
                let mut binding = transformer.create_binding().map_err(&err)?;
                let inputs: [(&str, &DynTensor); 2] =
                    [("img_ids", &img_ids), ("txt_ids", &txt_ids)];
                binding
                    .bind_input("hidden_states", &hidden_states)
                    .map_err(&err)?;
                binding
                    .bind_input("encoder_hidden_states", &text.hidden)
                    .map_err(&err)?;
                binding
                    .bind_input("pooled_projections", &text.pooled)
                    .map_err(&err)?;
                binding.bind_input("timestep", &timestep).map_err(&err)?;
                for (name, value) in inputs {
                    binding.bind_input(name, value).map_err(&err)?;
                }
                if let Some(g) = &guidance {
                    binding.bind_input("guidance", g).map_err(&err)?;
                }
                let mut out = io::host_tensor(&packed_dims, &err)?;
                binding
                    .bind_output("out_hidden_states", &mut out)
                    .map_err(&err)?;
                Ok((binding, out))
            };
            let positive = bind(&cond.positive)?;
            let negative = match &cond.negative {
                Some((text, _)) => Some(bind(text)?),
                None => None,
            };
            Run::Bound(Box::new(Bound {
                positive,
                negative,
                hidden_states,
                timestep,
            }))
        } else {
            Run::Converted {
                packed: Array3::zeros(packed_dims),
                timestep: Array1::zeros(n),
                guidance,
                img_ids,
                txt_ids,
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
        let Flux {
            transformer,
            path,
            specs,
            out_spec,
            guidance_input,
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
                    positive,
                    negative,
                    hidden_states,
                    timestep,
                } = &mut **b;
                pack_into(src, io.dims, hidden_states.extract_tensor_mut().1);
                timestep.extract_tensor_mut().1.fill(t / 1000.0);
                let mut run = |binding: &IoBinding| {
                    transformer
                        .run_binding_with_options(binding, run_options)
                        .map(drop)
                        .map_err(&err)
                };
                run(&positive.0)?;
                if let (Some((binding, out)), Some((_, g))) = (negative.as_mut(), &cond.negative) {
                    // diffusers' true CFG: neg + g·(pos − neg), two separate runs.
                    run(binding)?;
                    io::guide_in_place(
                        positive.1.extract_tensor_mut().1,
                        out.extract_tensor().1,
                        *g,
                    );
                }
                unpack_into(positive.1.extract_tensor().1, io.dims, velocity);
            }
            Run::Converted {
                packed,
                timestep,
                guidance,
                img_ids,
                txt_ids,
            } => {
                pack_into(
                    src,
                    io.dims,
                    packed.as_slice_mut().expect("standard layout"),
                );
                timestep.fill(t / 1000.0);
                let mut run = Converted {
                    session: transformer,
                    specs,
                    out_spec: *out_spec,
                    guidance: guidance_input.map(|spec| (&*guidance, spec)),
                    packed,
                    timestep,
                    ids: (img_ids, txt_ids),
                };
                let mut out = run.run(&cond.positive, &err, run_options)?;
                let out = out.as_slice_mut().expect("standard layout");
                if let Some((negative, g)) = &cond.negative {
                    let neg = run.run(negative, &err, run_options)?;
                    io::guide_in_place(out, neg.as_slice().expect("standard layout"), *g);
                }
                unpack_into(out, io.dims, velocity);
            }
        }
        Ok(io.velocity.view())
    }

    fn force_converted(&mut self, converted: bool) {
        self.force_converted = converted;
        self.io = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_is_diffusers_view_permute_reshape_and_unpacks_back() {
        let latents = Array4::from_shape_fn((2, 16, 4, 6), |(b, c, y, x)| {
            (b * 1000 + c * 100 + y * 10 + x) as f32
        });
        let packed = pack(&latents);
        assert_eq!(packed.dim(), (2, 6, 64));
        // Token (row 1, col 2) of image 1, channel 3's 2x2 patch at (1, 0).
        assert_eq!(packed[[1, 5, 3 * 4 + 2]], latents[[1, 3, 3, 4]]);
        assert_eq!(unpack(&packed, 4, 6), latents);
        let ids = image_ids(4, 6);
        assert_eq!(ids.row(5).to_vec(), [0.0, 1.0, 2.0]);
    }
}
