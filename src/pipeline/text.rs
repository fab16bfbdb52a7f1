//! Text conditioning: each request's prompt and negative prompt through the tokenizers
//! and text encoders (diffusers' `encode_prompt`, or AUTOMATIC1111's syntax in
//! [`super::a1111`]), repeated for its images and stacked as the UNet batch wants them;
//! or, for AUTOMATIC1111 prompts that change by step, combine `AND` parts or differ in
//! length from their negative, the schedules [`super::a1111_steps`] runs.

use ndarray::{Array2, Array3, ArrayD, Axis, concatenate};

use super::a1111::{A1111Cond, Encoded as TextEncoded};
use super::arrays::repeat_rows;
use super::{Pipeline, PipelineError, shape_err};
use crate::model::PipelineKind;
use crate::prompt_syntax::PromptSyntax;
use crate::request::ResolvedRequest;

/// Text conditioning for the UNet, already laid out as the UNet batch wants it.
pub(super) struct Conditioning {
    /// `[2N or N, 77, D]`: uncond rows first when CFG is on.
    pub(super) hidden: ArrayD<f32>,
    /// SDXL: pooled embeddings `[2N or N, P]` and time ids `[2N or N, 6]`.
    pub(super) added: Option<(ArrayD<f32>, ArrayD<f32>)>,
}

/// What the denoise loop is given.
pub(super) enum TextConditioning {
    /// One UNet batch per step, with the same conditioning at every step.
    Fixed(Conditioning),
    /// AUTOMATIC1111 prompts run as webui's CFG denoiser runs them ([`super::a1111_steps`]).
    Scheduled(A1111Cond),
}

/// One request's embeddings, each repeated for its images.
struct Encoded {
    cond: ArrayD<f32>,
    cond_pooled: Option<ArrayD<f32>>,
    uncond: Option<(ArrayD<f32>, Option<ArrayD<f32>>)>,
}

impl Encoded {
    /// A request's prompt and negative (with classifier-free guidance) encodings, each
    /// repeated for its `n` images.
    fn repeated((cond, uncond): (&TextEncoded, Option<&TextEncoded>), n: usize) -> Encoded {
        let rep3 = |a: &Array3<f32>| repeat_rows(a.view().into_dyn(), n);
        let rep2 = |a: &Array2<f32>| repeat_rows(a.view().into_dyn(), n);
        Encoded {
            cond: rep3(&cond.0),
            cond_pooled: cond.1.as_ref().map(rep2),
            uncond: uncond.map(|(u, up)| (rep3(u), up.as_ref().map(rep2))),
        }
    }
}

/// The requests' encodings stacked as the UNet batch wants them: all uncond rows, then all
/// cond rows; SDXL's pooled embeddings likewise, and its time ids.
fn stack(encoded: &[Encoded], batch: &[&ResolvedRequest]) -> Result<Conditioning, PipelineError> {
    let stack =
        |parts: Vec<ndarray::ArrayViewD<'_, f32>>| concatenate(Axis(0), &parts).map_err(shape_err);
    let mut hidden_parts = Vec::new();
    let mut pooled_parts = Vec::new();
    for e in encoded {
        if let Some((u, up)) = &e.uncond {
            hidden_parts.push(u.view());
            pooled_parts.extend(up.as_ref().map(|a| a.view()));
        }
    }
    for e in encoded {
        hidden_parts.push(e.cond.view());
        pooled_parts.extend(e.cond_pooled.as_ref().map(|a| a.view()));
    }
    let hidden = stack(hidden_parts)?;
    let added = if pooled_parts.is_empty() {
        None
    } else {
        let pooled = stack(pooled_parts)?;
        let rows = pooled.len_of(Axis(0));
        let ids = time_ids(batch[0], rows);
        Some((pooled, ids.into_dyn()))
    };
    Ok(Conditioning { hidden, added })
}

/// SDXL's `time_ids` rows: original size, crop (0, 0) and target size, the request's.
pub(super) fn time_ids(request: &ResolvedRequest, rows: usize) -> Array2<f32> {
    let (h, w) = (request.height as f32, request.width as f32);
    Array2::from_shape_fn((rows, 6), |(_, j)| [h, w, 0.0, 0.0, h, w][j])
}

impl Pipeline {
    /// Encodes every request's prompt and negative prompt as diffusers' `encode_prompt`
    /// does, repeats each for its images, and stacks them: all uncond rows, then all cond.
    pub(super) fn encode_prompts(
        &mut self,
        batch: &[&ResolvedRequest],
    ) -> Result<TextConditioning, PipelineError> {
        let encoded = if batch[0].prompt_syntax == PromptSyntax::A1111 {
            // The requests of a batch share their texts (the batch key says so).
            let a1111 = self.a1111_conditioning(batch[0])?;
            let Some((cond, uncond)) = a1111.as_constant() else {
                return Ok(TextConditioning::Scheduled(a1111));
            };
            batch
                .iter()
                .map(|p| Encoded::repeated((&cond, uncond.as_ref()), p.num_images))
                .collect()
        } else {
            batch
                .iter()
                .map(|p| self.encode_request(p))
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(TextConditioning::Fixed(stack(&encoded, batch)?))
    }

    fn encode_request(&mut self, params: &ResolvedRequest) -> Result<Encoded, PipelineError> {
        let zero_uncond = self.bundle.kind == PipelineKind::StableDiffusionXl
            && self.bundle.force_zeros_for_empty_prompt
            && params.negative_prompt.is_none();
        let cond = self.encode_text(&params.text_prompt())?;
        let uncond = if !params.do_cfg() {
            None
        } else if zero_uncond {
            Some((
                Array3::zeros(cond.0.raw_dim()),
                cond.1.as_ref().map(|p| Array2::zeros(p.raw_dim())),
            ))
        } else {
            Some(self.encode_text(params.negative_prompt.as_deref().unwrap_or(""))?)
        };
        Ok(Encoded::repeated(
            (&cond, uncond.as_ref()),
            params.num_images,
        ))
    }

    /// One prompt through every tokenizer and text encoder; SDXL concatenates the two
    /// encoders' hidden states and takes the pooled output of the second. Recent texts
    /// come from the cache.
    fn encode_text(
        &mut self,
        text: &str,
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), PipelineError> {
        if let Some(hit) = self.text_cache.get(text) {
            return Ok(hit);
        }
        let encoded = self.encode_text_uncached(text)?;
        self.text_cache.put(text, &encoded);
        Ok(encoded)
    }

    fn encode_text_uncached(
        &mut self,
        text: &str,
    ) -> Result<(Array3<f32>, Option<Array2<f32>>), PipelineError> {
        let mut hiddens = Vec::new();
        let mut pooled = None;
        for (tok, enc) in self.tokenizers.iter().zip(self.encoders.iter_mut()) {
            let ids = tok.encode(text)?;
            let (h, p) = enc.encode(&[ids])?;
            hiddens.push(h);
            pooled = p.or(pooled);
        }
        let views: Vec<_> = hiddens.iter().map(|h| h.view()).collect();
        let hidden = concatenate(Axis(2), &views).map_err(shape_err)?;
        Ok((hidden, pooled))
    }
}
