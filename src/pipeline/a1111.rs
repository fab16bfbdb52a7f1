//! Prompts in AUTOMATIC1111's syntax (`prompt_syntax = a1111`), encoded as webui 1.10 does
//! with its default settings (emphasis "Original", comma back-off 20, clip skip 1):
//!
//! - the prompt is split at `AND` into weighted parts (`get_multicond_prompt_list`), and
//!   each part, like the negative prompt, becomes a schedule of texts by its prompt
//!   editing and alternation (`get_learned_conditioning_prompt_schedules`), both in
//!   [`crate::prompt_syntax`];
//! - the texts of one schedule are encoded as one batch, as webui's
//!   `get_learned_conditioning` does (`modules/sd_hijack_clip.py`, rules pinned in
//!   `onnx/golden_a1111.py`): each text is parsed into weighted pieces, each encoder's
//!   tokenizer lays them out in chunks of 75 tokens (with comma back-off and `BREAK`), the
//!   chunk lists are padded with empty chunks to the longest of the batch (and, on SDXL,
//!   of both encoders), every chunk runs through the encoder on its own, its hidden states
//!   are multiplied by the token weights with the chunk's mean restored, and the chunks are
//!   concatenated along the sequence axis. SDXL takes the pooled output of the second
//!   encoder's first chunk (unweighted);
//! - on SDXL a negative prompt whose texts are all empty is zeros (webui's
//!   `force_zero_negative_prompt`), whatever the request said.
//!
//! How the parts and the negative meet in the UNet (one batch or separate runs, padding,
//! the weighted combination) is [`super::a1111_steps`]'s.

use ndarray::{Array2, Array3, Axis, concatenate};

use super::{Pipeline, PipelineError, shape_err};
use crate::model::PipelineKind;
use crate::prompt_syntax::{self, Chunk, ChunkSpec, PromptSyntaxError};
use crate::request::ResolvedRequest;

/// One text's hidden states `[1, 77k, D]` and pooled output `[1, P]`.
pub(super) type Encoded = (Array3<f32>, Option<Array2<f32>>);

/// One prompt's conditioning over the steps: the text in force up to each step, encoded.
pub(super) struct TextSchedule {
    /// `(last 0-based step, index into encoded)`, in step order.
    entries: Vec<(usize, usize)>,
    /// The distinct texts' encodings, all of one sequence length.
    encoded: Vec<Encoded>,
}

impl TextSchedule {
    /// The index and encoding in force at 0-based step `step` (webui's
    /// `reconstruct_cond_batch`: the first entry whose end is at or after the step, else the
    /// first).
    pub(super) fn at(&self, step: usize) -> (usize, &Encoded) {
        let i = self
            .entries
            .iter()
            .find(|(end, _)| step <= *end)
            .map_or(self.entries[0].1, |&(_, i)| i);
        (i, &self.encoded[i])
    }

    /// The sequence length of every encoding (77 × chunks).
    pub(super) fn seq_len(&self) -> usize {
        self.encoded[0].0.len_of(Axis(1))
    }

    /// The one encoding of a schedule that never changes.
    fn constant(&self) -> Option<&Encoded> {
        (self.encoded.len() == 1).then(|| &self.encoded[0])
    }
}

/// A request's conditioning in webui's terms: the `AND` parts with their weights, the
/// negative prompt (with classifier-free guidance), and the empty prompt's encoding for
/// `a1111_pad_cond_uncond`.
pub(super) struct A1111Cond {
    /// `(weight, schedule)` per `AND` part, in prompt order.
    pub(super) parts: Vec<(f64, TextSchedule)>,
    /// The negative prompt's schedule; `None` without classifier-free guidance.
    pub(super) uncond: Option<TextSchedule>,
    /// The empty prompt's hidden states `[1, 77, D]` when the request pads (webui's
    /// `cond_stage_model_empty_prompt`).
    pub(super) empty: Option<Array3<f32>>,
}

impl A1111Cond {
    /// The prompt and negative of a request that needs nothing beyond one UNet batch with
    /// classifier-free guidance: one part of weight 1, no schedule, and equal lengths (the
    /// shorter padded when the request asks for it). `None` otherwise.
    pub(super) fn as_constant(&self) -> Option<(Encoded, Option<Encoded>)> {
        let [(weight, part)] = &self.parts[..] else {
            return None;
        };
        if *weight != 1.0 {
            return None;
        }
        let cond = part.constant()?.clone();
        let Some(uncond) = &self.uncond else {
            return Some((cond, None));
        };
        let uncond = uncond.constant()?.clone();
        let (lc, lu) = (cond.0.len_of(Axis(1)), uncond.0.len_of(Axis(1)));
        if lc == lu {
            return Some((cond, Some(uncond)));
        }
        let empty = self.empty.as_ref()?;
        let pad = |(h, p): Encoded, to: usize| -> Option<Encoded> {
            Some((pad_with_empty(&h, empty, to)?, p))
        };
        let to = lc.max(lu);
        Some((pad(cond, to)?, Some(pad(uncond, to)?)))
    }
}

/// `hidden` `[1, L, D]` followed by copies of `empty` `[1, 77, D]` up to length `to`
/// (webui's `pad_cond`).
fn pad_with_empty(hidden: &Array3<f32>, empty: &Array3<f32>, to: usize) -> Option<Array3<f32>> {
    let len = hidden.len_of(Axis(1));
    let step = empty.len_of(Axis(1));
    if to < len || !(to - len).is_multiple_of(step) {
        return None;
    }
    let mut views = vec![hidden.view()];
    views.extend(std::iter::repeat_n(empty.view(), (to - len) / step));
    concatenate(Axis(1), &views).ok()
}

/// A refusal of `param`'s text, as every `InvalidArgument` reads.
fn invalid(param: &'static str) -> impl Fn(PromptSyntaxError) -> PipelineError {
    move |e| PipelineError::InvalidArgument {
        param,
        message: e.to_string(),
    }
}

impl Pipeline {
    /// The request's conditioning in webui's terms ([`A1111Cond`]); the requests of one
    /// batch share their texts (their batch key says so), so the first one's serves all.
    pub(super) fn a1111_conditioning(
        &mut self,
        p: &ResolvedRequest,
    ) -> Result<A1111Cond, PipelineError> {
        // The resolve step refused what cannot run (composable prompts without guidance...).
        let parts = prompt_syntax::split_and(&p.text_prompt()).map_err(invalid("prompt"))?;
        let mut schedules = Vec::with_capacity(parts.len());
        for part in &parts {
            let schedule =
                prompt_syntax::schedule(&part.text, p.steps).map_err(invalid("prompt"))?;
            schedules.push((
                part.weight,
                self.encode_schedule(&schedule, false, p.max_prompt_chunks, "prompt")?,
            ));
        }
        let uncond = if p.do_cfg() {
            let text = p.negative_prompt.as_deref().unwrap_or("");
            let schedule =
                prompt_syntax::schedule(text, p.steps).map_err(invalid("negative_prompt"))?;
            Some(self.encode_schedule(&schedule, true, p.max_prompt_chunks, "negative_prompt")?)
        } else {
            None
        };
        let empty = if p.a1111_pad_cond_uncond && uncond.is_some() {
            let (h, _) = self.encode_texts(&[""], false, 1, "prompt")?.remove(0);
            Some(h)
        } else {
            None
        };
        Ok(A1111Cond {
            parts: schedules,
            uncond,
            empty,
        })
    }

    /// One prompt's schedule, its distinct texts encoded as one batch.
    fn encode_schedule(
        &mut self,
        schedule: &[prompt_syntax::Scheduled],
        negative: bool,
        max_chunks: usize,
        param: &'static str,
    ) -> Result<TextSchedule, PipelineError> {
        let mut texts: Vec<&str> = Vec::new();
        let entries = schedule
            .iter()
            .map(|s| {
                let i = texts.iter().position(|t| *t == s.text).unwrap_or_else(|| {
                    texts.push(&s.text);
                    texts.len() - 1
                });
                (s.end_at_step, i)
            })
            .collect();
        let encoded = self.encode_texts(&texts, negative, max_chunks, param)?;
        Ok(TextSchedule { entries, encoded })
    }

    /// webui's `get_learned_conditioning` of a batch of texts: every text laid out in chunks
    /// per encoder, all padded to the largest chunk count (over the texts and the encoders),
    /// encoded. On SDXL a negative batch of empty texts is zeros.
    fn encode_texts(
        &mut self,
        texts: &[&str],
        negative: bool,
        max_chunks: usize,
        param: &'static str,
    ) -> Result<Vec<Encoded>, PipelineError> {
        let pieces = texts
            .iter()
            .map(|t| prompt_syntax::parse_attention(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid(param))?;
        // Per encoder: its chunk spec and every text's chunks.
        let mut laid_out = Vec::with_capacity(self.tokenizers.len());
        for tok in &self.tokenizers {
            let ids = tok.special_ids();
            let comma = tok.encode_raw(",")?.first().copied();
            let spec = ChunkSpec::new(ids.bos, ids.eos, ids.pad, comma);
            let chunks = pieces
                .iter()
                .map(|p| prompt_syntax::chunk_segments(p, &spec, |t| tok.encode_raw(t)))
                .collect::<Result<Vec<_>, _>>()?;
            laid_out.push((spec, chunks));
        }
        let count = laid_out
            .iter()
            .flat_map(|(_, texts)| texts.iter().map(Vec::len))
            .max()
            .unwrap_or(1);
        if count > max_chunks {
            return Err(too_many_chunks(param, count, max_chunks));
        }
        let zeros = negative
            && self.bundle.kind == PipelineKind::StableDiffusionXl
            && texts.iter().all(|t| t.is_empty());
        // Per text: each encoder's hidden states, concatenated on the feature axis.
        let mut hidden: Vec<Vec<Array3<f32>>> = vec![Vec::new(); texts.len()];
        let mut pooled: Vec<Option<Array2<f32>>> = vec![None; texts.len()];
        for (encoder, (spec, per_text)) in self.encoders.iter_mut().zip(laid_out) {
            for (i, mut chunks) in per_text.into_iter().enumerate() {
                prompt_syntax::pad_chunks(&mut chunks, count, &spec);
                let (h, p) = encode_chunks(encoder, &chunks)?;
                hidden[i].push(h);
                pooled[i] = p.or(pooled[i].take());
            }
        }
        hidden
            .into_iter()
            .zip(pooled)
            .map(|(parts, p)| {
                let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
                let mut h = concatenate(Axis(2), &views).map_err(shape_err)?;
                let mut p = p;
                if zeros {
                    h.fill(0.0);
                    if let Some(p) = p.as_mut() {
                        p.fill(0.0);
                    }
                }
                Ok((h, p))
            })
            .collect()
    }
}

/// The refusal of a text that takes `count` chunks where `max_chunks` are allowed
/// (`InvalidArgument` on the wire, starting with the key like every such error).
fn too_many_chunks(param: &'static str, count: usize, max_chunks: usize) -> PipelineError {
    PipelineError::InvalidArgument {
        param,
        message: format!(
            "takes {count} chunks of 75 tokens (BREAKs and every text of its prompt editing \
             included); at most {max_chunks} (limits.max_prompt_chunks)"
        ),
    }
}

/// Each chunk through the encoder on its own, weighted, then concatenated:
/// `[1, 77 * chunks, D]`, and the first chunk's pooled output.
fn encode_chunks(
    encoder: &mut super::components::TextEncoder,
    chunks: &[Chunk],
) -> Result<Encoded, PipelineError> {
    let mut hidden = Vec::with_capacity(chunks.len());
    let mut pooled = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let (mut h, p) = encoder.encode(std::slice::from_ref(&chunk.ids))?;
        prompt_syntax::apply_weights(h.index_axis_mut(Axis(0), 0), &chunk.weights)
            .map_err(invalid("prompt"))?;
        if i == 0 {
            pooled = p;
        }
        hidden.push(h);
    }
    let views: Vec<_> = hidden.iter().map(|a| a.view()).collect();
    let joined = concatenate(Axis(1), &views).map_err(shape_err)?;
    Ok((joined, pooled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn the_chunk_limit_error_starts_with_the_key_on_the_wire() {
        let e = too_many_chunks("negative_prompt", 9, 8);
        assert_eq!(
            e.to_string(),
            "'negative_prompt': takes 9 chunks of 75 tokens (BREAKs and every text of its \
             prompt editing included); at most 8 (limits.max_prompt_chunks)"
        );
        // The worker fails the job with the message; Wait() returns it as InvalidArgument.
        let wire = crate::wire::Error::from(crate::jobs::Failure::InvalidArgument(e.to_string()));
        assert_eq!(
            wire.name().as_str(),
            "io.github.Diffusiond1.Error.InvalidArgument"
        );
        assert!(
            wire.description()
                .unwrap()
                .starts_with("'negative_prompt': "),
            "{wire:?}"
        );
    }

    #[test]
    fn padding_appends_whole_empty_chunks() {
        let hidden = Array3::from_shape_fn((1, 2, 3), |(_, t, d)| (t * 3 + d) as f32);
        let empty = Array3::from_elem((1, 2, 3), -1.0);
        let padded = pad_with_empty(&hidden, &empty, 6).unwrap();
        assert_eq!(padded.shape(), &[1, 6, 3]);
        assert_eq!(padded.slice(ndarray::s![.., ..2, ..]), hidden);
        assert!(
            padded
                .slice(ndarray::s![.., 2.., ..])
                .iter()
                .all(|&x| x == -1.0)
        );
        // Not a whole number of chunks, or shorter: no padding.
        assert!(pad_with_empty(&hidden, &empty, 5).is_none());
        assert!(pad_with_empty(&hidden, &empty, 1).is_none());
    }
}
