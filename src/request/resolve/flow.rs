//! The resolve step's rules for the transformer (flow-matching) families, SD3/SD3.5 and
//! FLUX.1: their scheduler (`flow-euler`; a UNet scheduler asked of them, or the
//! reverse, is refused), their T5 sequence length (`max_sequence_length`), and what their
//! pipelines do not take (yet): image-to-image and inpainting on FLUX, LoRAs, live previews,
//! given latents, numpy's generator, `guidance_rescale`, the AUTOMATIC1111 prompt syntax
//! (its weights scale CLIP token embeddings; with T5 in the conditioning webui has no
//! rule to follow).

use super::{GenerateRequest, ModelBundle, RequestError};
use crate::model::PipelineKind;
use crate::model::flow::MAX_SEQUENCE_LENGTH;
use crate::prompt_syntax::PromptSyntax;
use crate::rng::RngKind;
use crate::scheduler::flow_match::{FLOW_EULER, FLOW_HEUN};

fn invalid(key: &'static str, message: impl Into<String>) -> RequestError {
    RequestError::invalid(key, message)
}

/// Whether `name` is one of the flow-matching schedulers.
pub(super) fn is_flow_scheduler(name: &str) -> bool {
    name == FLOW_EULER || name == FLOW_HEUN
}

/// The scheduler of a flow model's request (`requested`, else `flow-euler`).
pub(super) fn scheduler(
    requested: Option<&str>,
    model: &str,
) -> Result<&'static str, RequestError> {
    match requested {
        None | Some(FLOW_EULER) => Ok(FLOW_EULER),
        Some(FLOW_HEUN) => Err(invalid(
            "scheduler",
            "flow-heun is not supported yet; use flow-euler",
        )),
        Some(other) => Err(invalid(
            "scheduler",
            format!(
                "'{}' is a UNet scheduler; model '{model}' is a flow-matching transformer model: use flow-euler",
                crate::wire::error::echo(other)
            ),
        )),
    }
}

/// A flow scheduler asked of a UNet model.
pub(super) fn refuse_on_unet(name: &str, model: &str) -> RequestError {
    invalid(
        "scheduler",
        format!(
            "'{name}' is a flow-matching scheduler, for SD3 and FLUX models; model '{model}' is a UNet model"
        ),
    )
}

/// `max_sequence_length`: the model's default (256; 512 for dev-style FLUX), at most 512
/// (the pipelines raise above it); a UNet model (no T5) takes none.
pub(super) fn sequence_length(
    req: &GenerateRequest,
    bundle: &ModelBundle,
) -> Result<Option<usize>, RequestError> {
    let Some(facts) = &bundle.flow else {
        return match req.max_sequence_length {
            Some(_) => Err(invalid(
                "max_sequence_length",
                "only models with a T5 text encoder (SD3, FLUX) take it",
            )),
            None => Ok(None),
        };
    };
    let n = req
        .max_sequence_length
        .map_or(facts.max_sequence_length, |n| n as usize);
    if n == 0 || n > MAX_SEQUENCE_LENGTH {
        return Err(invalid(
            "max_sequence_length",
            format!("{n} is outside 1..={MAX_SEQUENCE_LENGTH}"),
        ));
    }
    Ok(Some(n))
}

/// What a flow model's pipeline does not take, each refused naming its key.
pub(super) fn check(
    req: &GenerateRequest,
    model: &str,
    kind: PipelineKind,
) -> Result<(), RequestError> {
    if kind == PipelineKind::Flux && req.negative_prompt.is_some() {
        return Err(invalid(
            "negative_prompt",
            format!(
                "model '{model}' is a FLUX model: it runs no classifier-free guidance, so a negative prompt would have no effect"
            ),
        ));
    }
    let unsupported = |key: &'static str, what: &str| {
        invalid(
            key,
            format!(
                "{what} is not supported on model '{model}' (a flow-matching transformer model)"
            ),
        )
    };
    // SD3 runs diffusers' image-to-image and inpainting pipelines; FLUX has no reference
    // for them in Optimum.
    if kind == PipelineKind::Flux && req.init_image.is_some() {
        return Err(unsupported("init_image", "image-to-image"));
    }
    if kind == PipelineKind::Flux && req.mask_image.is_some() {
        return Err(unsupported("mask_image", "inpainting"));
    }
    if req.loras.as_ref().is_some_and(|l| !l.is_empty()) {
        return Err(unsupported("loras", "LoRA"));
    }
    if req.preview_every.unwrap_or(0) > 0 {
        return Err(unsupported("preview_every", "a live preview"));
    }
    if req.rng == Some(RngKind::Numpy) {
        return Err(unsupported(
            "rng",
            "numpy's generator (the SD3 and FLUX pipelines draw with torch)",
        ));
    }
    if req.guidance_rescale.is_some_and(|r| r != 0.0) {
        return Err(unsupported("guidance_rescale", "guidance_rescale"));
    }
    if req.prompt_syntax == Some(PromptSyntax::A1111) {
        return Err(unsupported(
            "prompt_syntax",
            "the a1111 prompt syntax (its weights scale CLIP embeddings; T5 has no webui rule)",
        ));
    }
    Ok(())
}
