//! Prompts in AUTOMATIC1111's syntax (`prompt_syntax = a1111`), encoded as webui does
//! (`modules/sd_hijack_clip.py`, rules pinned in `onnx/golden_a1111.py`): the prompt is
//! parsed into weighted pieces, each text encoder's tokenizer lays them out in chunks of
//! 75 tokens (with comma back-off and `BREAK`), every chunk runs through the encoder on its
//! own, its hidden states are multiplied by the token weights with the chunk's mean
//! restored, and the chunks are concatenated along the sequence axis.
//!
//! The negative prompt is laid out the same way; the prompt and the negative prompt (and,
//! on SDXL, both encoders, whose tokenizers may split a text differently) are padded with
//! empty chunks to one count, so that the conditional and unconditional rows have the same
//! length. SDXL takes the pooled output of the second encoder's first chunk (unweighted).

use ndarray::{Array2, Array3, Axis, concatenate};

use super::{Pipeline, PipelineError, shape_err};
use crate::prompt_syntax::{self, Chunk, ChunkSpec};

/// One text's hidden states `[1, 77k, D]` and pooled output.
pub(super) type Encoded = (Array3<f32>, Option<Array2<f32>>);

impl Pipeline {
    /// Encodes a prompt and (when `negative` is `Some`) a negative prompt in webui's
    /// syntax, padded to one chunk count, which may not exceed `max_chunks`.
    pub(super) fn encode_a1111(
        &mut self,
        prompt: &str,
        negative: Option<&str>,
        max_chunks: usize,
    ) -> Result<(Encoded, Option<Encoded>), PipelineError> {
        let invalid = |param, e: prompt_syntax::PromptSyntaxError| PipelineError::InvalidArgument {
            param,
            message: e.to_string(),
        };
        let pieces = prompt_syntax::parse_attention(prompt).map_err(|e| invalid("prompt", e))?;
        let negative_pieces = negative
            .map(prompt_syntax::parse_attention)
            .transpose()
            .map_err(|e| invalid("negative_prompt", e))?;
        // Per encoder: its chunk spec, the prompt's chunks, the negative's chunks.
        let mut laid_out = Vec::with_capacity(self.tokenizers.len());
        for tok in &self.tokenizers {
            let ids = tok.special_ids();
            let comma = tok.encode_raw(",")?.first().copied();
            let spec = ChunkSpec::new(ids.bos, ids.eos, ids.pad, comma);
            let chunks = prompt_syntax::chunk_segments(&pieces, &spec, |t| tok.encode_raw(t))?;
            let negative_chunks = negative_pieces
                .as_ref()
                .map(|n| prompt_syntax::chunk_segments(n, &spec, |t| tok.encode_raw(t)))
                .transpose()?;
            laid_out.push((spec, chunks, negative_chunks));
        }
        let count = laid_out
            .iter()
            .flat_map(|(_, c, n)| std::iter::once(c.len()).chain(n.as_ref().map(Vec::len)))
            .max()
            .unwrap_or(1);
        if count > max_chunks {
            return Err(too_many_chunks(count, max_chunks));
        }
        let mut cond = Vec::new();
        let mut uncond = Vec::new();
        let (mut pooled, mut negative_pooled) = (None, None);
        for (encoder, (spec, mut chunks, negative_chunks)) in self.encoders.iter_mut().zip(laid_out)
        {
            prompt_syntax::pad_chunks(&mut chunks, count, &spec);
            let (h, p) = encode_chunks(encoder, &chunks)?;
            cond.push(h);
            pooled = p.or(pooled);
            if let Some(mut n) = negative_chunks {
                prompt_syntax::pad_chunks(&mut n, count, &spec);
                let (h, p) = encode_chunks(encoder, &n)?;
                uncond.push(h);
                negative_pooled = p.or(negative_pooled);
            }
        }
        let join = |parts: Vec<Array3<f32>>| -> Result<Array3<f32>, PipelineError> {
            let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
            concatenate(Axis(2), &views).map_err(shape_err)
        };
        let negative = if uncond.is_empty() {
            None
        } else {
            Some((join(uncond)?, negative_pooled))
        };
        Ok(((join(cond)?, pooled), negative))
    }
}

/// The refusal of a prompt that takes `count` chunks where `max_chunks` are allowed
/// (`InvalidArgument` on the wire, starting `'prompt':` like every such error).
fn too_many_chunks(count: usize, max_chunks: usize) -> PipelineError {
    PipelineError::InvalidArgument {
        param: "prompt",
        message: format!(
            "takes {count} chunks of 75 tokens (with the negative prompt \
             and BREAKs); at most {max_chunks} (limits.max_prompt_chunks)"
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
        prompt_syntax::apply_weights(h.index_axis_mut(Axis(0), 0), &chunk.weights).map_err(
            |e| PipelineError::InvalidArgument {
                param: "prompt",
                message: e.to_string(),
            },
        )?;
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
        let e = too_many_chunks(9, 8);
        assert_eq!(
            e.to_string(),
            "'prompt': takes 9 chunks of 75 tokens (with the negative prompt and BREAKs); \
             at most 8 (limits.max_prompt_chunks)"
        );
        // The worker fails the job with the message; Wait() returns it as InvalidArgument.
        let wire = crate::wire::Error::from(crate::jobs::Failure::InvalidArgument(e.to_string()));
        assert_eq!(
            wire.name().as_str(),
            "io.github.Diffusiond1.Error.InvalidArgument"
        );
        assert!(
            wire.description().unwrap().starts_with("'prompt': "),
            "{wire:?}"
        );
    }
}
