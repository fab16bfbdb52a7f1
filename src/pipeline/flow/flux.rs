//! FLUX.1 behind [`Denoiser`]: diffusers' `FluxPipeline`.
//!
//! Conditioning (`encode_prompt`): CLIP's `pooler_output` as the pooled projections and
//! T5's last hidden states (`max_sequence_length` tokens) as the text; `txt_ids` are zeros
//! `[L, 3]`. No classifier-free batch: a guidance-distilled (dev-style) transformer, with a
//! `guidance` input, gets `guidance_scale` there; a schnell-style one ignores it. The
//! latents are packed into 2×2 patches (`[n, h/2 · w/2, 64]`) for the transformer, with
//! `img_ids` holding each patch's row and column, and its prediction unpacked again; the
//! timestep goes in as `t / 1000`. The scheduler uses FLUX's sigmas and `mu`.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, Array4, Axis, concatenate};
use ort::session::{RunOptions, Session};

use super::{Denoiser, FlowParams, LATENT_CHANNELS, shapes};
use crate::model::signature::{self, FLOATS, Side, Spec};
use crate::pipeline::PipelineError;
use crate::pipeline::components::{TextEncoder, float_input, float_output, ort_err};
use crate::runtime::tensorrt::Component;
use crate::runtime::{Replacements, Runtime};
use crate::scheduler::flow_match::FlowPipeline;
use crate::tokenizer::ClipTokenizer;
use crate::tokenizer::t5::T5Tokenizer;

/// One prompt's conditioning for a batch: `[n, L, D]` and `[n, P]`.
struct Text {
    hidden: Array3<f32>,
    pooled: Array2<f32>,
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

/// A loaded FLUX folder's text encoders and transformer.
pub struct Flux {
    clip_tokenizer: ClipTokenizer,
    clip: TextEncoder,
    t5_tokenizer: T5Tokenizer,
    t5: TextEncoder,
    transformer: Session,
    path: PathBuf,
    hidden_spec: Spec,
    /// Whether the transformer takes `guidance` (dev-style).
    guidance_input: Option<Spec>,
    /// Whether `img_ids`/`txt_ids` are int64 (Optimum's export) rather than float.
    int_ids: bool,
    cond: Option<Cond>,
}

/// `[n, 16, h, w]` → `[n, h/2 · w/2, 64]` (diffusers' `_pack_latents`).
pub fn pack(latents: &Array4<f32>) -> Array3<f32> {
    let (n, c, h, w) = latents.dim();
    let mut out = Array3::<f32>::zeros((n, (h / 2) * (w / 2), c * 4));
    for b in 0..n {
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                let token = y * (w / 2) + x;
                for ch in 0..c {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            out[[b, token, ch * 4 + dy * 2 + dx]] =
                                latents[[b, ch, 2 * y + dy, 2 * x + dx]];
                        }
                    }
                }
            }
        }
    }
    out
}

/// The inverse of [`pack`] (diffusers' `_unpack_latents`) for latents `h` x `w`.
pub fn unpack(packed: &Array3<f32>, h: usize, w: usize) -> Array4<f32> {
    let (n, _, features) = packed.dim();
    let c = features / 4;
    let mut out = Array4::<f32>::zeros((n, c, h, w));
    for b in 0..n {
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                let token = y * (w / 2) + x;
                for ch in 0..c {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            out[[b, ch, 2 * y + dy, 2 * x + dx]] =
                                packed[[b, token, ch * 4 + dy * 2 + dx]];
                        }
                    }
                }
            }
        }
    }
    out
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
        let hidden_spec = req("hidden_states", &[3])?;
        for (name, rank) in [
            ("encoder_hidden_states", 3),
            ("pooled_projections", 2),
            ("timestep", 1),
        ] {
            req(name, &[rank])?;
        }
        let ids = [signature::Elem::I64, signature::Elem::F32];
        let img_ids = signature::require(&transformer, &path, Side::Input, "img_ids", &ids, &[2])?;
        signature::require(&transformer, &path, Side::Input, "txt_ids", &ids, &[2])?;
        let int_ids = img_ids.elem == signature::Elem::I64;
        let guidance_input = match signature::find(&transformer, Side::Input, "guidance") {
            Some(_) => Some(req("guidance", &[1])?),
            None => None,
        };
        signature::require(
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
            hidden_spec,
            guidance_input,
            int_ids,
            cond: None,
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
        Ok(Text {
            hidden: concatenate(Axis(0), &hidden_views).map_err(shape)?,
            pooled: concatenate(Axis(0), &pooled_views).map_err(shape)?,
        })
    }

    /// One transformer run on packed latents with one prompt's conditioning (`cond`
    /// gives the token count and the guidance).
    fn run(
        &mut self,
        packed: &Array3<f32>,
        (text, cond): (&Text, &Cond),
        t: f32,
        latent_hw: (usize, usize),
        run_options: &RunOptions,
    ) -> Result<Array3<f32>, PipelineError> {
        let err = ort_err(&self.path);
        let n = packed.dim().0;
        let timestep = ndarray::Array1::<f32>::from_elem(n, t / 1000.0);
        let img_ids = image_ids(latent_hw.0, latent_hw.1);
        let txt_ids = Array2::<f32>::zeros((cond.tokens, 3));
        let ids =
            |a: &Array2<f32>| -> Result<ort::session::SessionInputValue<'static>, PipelineError> {
                Ok(if self.int_ids {
                    ort::value::Tensor::from_array(a.mapv(|v| v as i64))
                        .map_err(&err)?
                        .into()
                } else {
                    ort::value::Tensor::from_array(a.clone())
                        .map_err(&err)?
                        .into()
                })
            };
        let elem = self.hidden_spec.elem;
        let mut inputs = ort::inputs![
            "hidden_states" => float_input(packed.view().into_dyn(), elem).map_err(&err)?,
            "encoder_hidden_states" => float_input(text.hidden.view().into_dyn(), elem).map_err(&err)?,
            "pooled_projections" => float_input(text.pooled.view().into_dyn(), elem).map_err(&err)?,
            "timestep" => float_input(timestep.view().into_dyn(), elem).map_err(&err)?,
            "img_ids" => ids(&img_ids)?,
            "txt_ids" => ids(&txt_ids)?,
        ];
        let guidance = ndarray::Array1::<f32>::from_elem(n, cond.guidance);
        if let Some(spec) = &self.guidance_input {
            inputs.push((
                "guidance".into(),
                float_input(guidance.view().into_dyn(), spec.elem).map_err(&err)?,
            ));
        }
        let outputs = self
            .transformer
            .run_with_options(inputs, run_options)
            .map_err(&err)?;
        float_output(&outputs["out_hidden_states"], elem)
            .map_err(&err)?
            .into_dimensionality::<ndarray::Ix3>()
            .map_err(shape)
    }
}

fn no_conditioning() -> PipelineError {
    PipelineError::Inference {
        component: "transformer".into(),
        message: "no conditioning".into(),
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

    fn predict(
        &mut self,
        latents: &Array4<f32>,
        t: f32,
        run_options: &RunOptions,
    ) -> Result<Array4<f32>, PipelineError> {
        let (_, c, h, w) = latents.dim();
        debug_assert_eq!(c, LATENT_CHANNELS);
        let packed = pack(latents);
        // The conditioning moves out while the transformer runs (it borrows `self`).
        let cond = self.cond.take().ok_or_else(no_conditioning)?;
        let result = (|| -> Result<Array3<f32>, PipelineError> {
            let mut out = self.run(&packed, (&cond.positive, &cond), t, (h, w), run_options)?;
            if let Some((negative, g)) = &cond.negative {
                // diffusers' true CFG: neg + g·(pos − neg), two separate runs.
                let neg = self.run(&packed, (negative, &cond), t, (h, w), run_options)?;
                ndarray::Zip::from(&mut out)
                    .and(&neg)
                    .for_each(|p, &n| *p = n + *g * (*p - n));
            }
            Ok(out)
        })();
        self.cond = Some(cond);
        Ok(unpack(&result?, h, w))
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
