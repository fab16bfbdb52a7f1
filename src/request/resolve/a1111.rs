//! The resolve step's checks of an AUTOMATIC1111-syntax request (`prompt_syntax` `a1111`):
//! its `AND` parts and prompt-editing schedules parse (a construct diffusiond cannot
//! reproduce exactly is refused, never read as words), and composable prompts get what
//! they need. The pipeline encodes the texts (`crate::pipeline`'s a1111 module).

use std::collections::HashSet;

use super::ResolvedRequest;
use crate::prompt_syntax;
use crate::request::RequestError;

/// Most distinct texts a request's prompt editing, alternation and `AND` parts (with its
/// negative prompt) may give: each is encoded and kept for the whole generation.
pub const MAX_TEXTS: usize = 32;

/// Most `AND` parts: each adds a UNet row per image at every step.
pub const MAX_PARTS: usize = 32;

/// The prompt's `AND` parts (webui's composable prompts), for the memory estimate; a
/// prompt whose split fails is refused.
pub(super) fn parts(prompt: &str) -> Result<usize, RequestError> {
    let parts = prompt_syntax::split_and(prompt)
        .map_err(|e| RequestError::invalid("prompt", e.to_string()))?
        .len();
    if parts > MAX_PARTS {
        return Err(RequestError::invalid(
            "prompt",
            format!("has {parts} AND parts; at most {MAX_PARTS}"),
        ));
    }
    Ok(parts)
}

/// Refuses what the pipeline could not run as webui does, naming the key.
pub(super) fn check(r: &ResolvedRequest) -> Result<(), RequestError> {
    let invalid = |key: &'static str| {
        move |e: prompt_syntax::PromptSyntaxError| RequestError::invalid(key, e.to_string())
    };
    let parts = prompt_syntax::split_and(&r.text_prompt()).map_err(invalid("prompt"))?;
    let mut texts = HashSet::new();
    for part in &parts {
        let schedule = prompt_syntax::schedule(&part.text, r.steps).map_err(invalid("prompt"))?;
        texts.extend(schedule.into_iter().map(|s| s.text));
    }
    if let Some(negative) = &r.negative_prompt {
        let schedule =
            prompt_syntax::schedule(negative, r.steps).map_err(invalid("negative_prompt"))?;
        texts.extend(schedule.into_iter().map(|s| s.text));
    }
    if texts.len() > MAX_TEXTS {
        return Err(RequestError::invalid(
            "prompt",
            format!(
                "prompt editing, alternation and AND give {} distinct texts over {} steps \
                 (with the negative prompt); at most {MAX_TEXTS}",
                texts.len(),
                r.steps
            ),
        ));
    }
    let composed = parts.len() > 1 || parts.iter().any(|c| c.weight != 1.0);
    if composed && !r.do_cfg() {
        return Err(RequestError::invalid(
            "prompt",
            "AND, or a weight ':N' at the end of the prompt, composes guided predictions \
             (webui's composable diffusion): it needs guidance_scale > 1 on a model with \
             classifier-free guidance",
        ));
    }
    if composed && r.guidance_rescale > 0.0 {
        return Err(RequestError::invalid(
            "guidance_rescale",
            "is not defined for AND or a weight ':N' at the end of the prompt (composable \
             diffusion); leave it at 0",
        ));
    }
    Ok(())
}
