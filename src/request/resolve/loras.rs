//! The resolve step's LoRA checks: the `loras` key and, with `prompt_syntax` `a1111`,
//! the prompt's `<lora:NAME:WEIGHT>` tags become one LoRA set: every name known to the
//! model's catalog, no name twice, scales finite and within `limits.max_lora_scale`, at
//! most `limits.max_loras`. Whether a LoRA fits the model's weights is known only when
//! its layers are mapped, at load time (a LoRA that does not fit fails its jobs with
//! `InvalidArgument`).

use crate::lora::{LoraCatalog, LoraSpec};
use crate::prompt_syntax::{PromptSyntax, extra_networks};
use crate::request::{GenerateRequest, Limits, RequestError};

/// A resolved LoRA set and the `loras` key as given.
type Resolved = (Vec<LoraSpec>, Vec<(String, f64)>);

/// The request's LoRA set, sorted by name (the order their deltas are added in, so one
/// set always gives the same weights), and the `loras` key as given (what the Job's
/// `Request` property and the PNG's `parameters` record; tags stay in the prompt).
pub(super) fn resolve(
    req: &GenerateRequest,
    syntax: PromptSyntax,
    catalog: &LoraCatalog,
    limits: &Limits,
) -> Result<Resolved, RequestError> {
    let key: Vec<(String, f64)> = req.loras.clone().unwrap_or_default();
    let mut wanted: Vec<(&'static str, String, f64)> =
        key.iter().map(|(n, s)| ("loras", n.clone(), *s)).collect();
    if syntax == PromptSyntax::A1111 {
        let tags = extra_networks::lora_tags(&req.prompt)
            .map_err(|e| RequestError::invalid("prompt", e.to_string()))?;
        wanted.extend(tags.into_iter().map(|t| ("prompt", t.name, t.weight)));
        if let Some(n) = &req.negative_prompt
            && extra_networks::has_tags(n)
        {
            return Err(RequestError::invalid(
                "negative_prompt",
                "extra-network tags (<lora:...>) belong in the prompt or the loras key",
            ));
        }
    }
    if wanted.len() > limits.max_loras {
        return Err(RequestError::invalid(
            "loras",
            format!(
                "{} LoRAs; at most {} at once",
                wanted.len(),
                limits.max_loras
            ),
        ));
    }
    let mut specs: Vec<LoraSpec> = Vec::with_capacity(wanted.len());
    for (key, name, scale) in wanted {
        let shown = crate::wire::error::echo(&name).into_owned();
        let max = limits.max_lora_scale;
        if !scale.is_finite() || scale.abs() > max {
            return Err(RequestError::invalid(
                key,
                format!("LoRA '{shown}': scale {scale} is outside [-{max}, {max}]"),
            ));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(RequestError::invalid(
                key,
                format!("LoRA '{shown}' is given more than once"),
            ));
        }
        let entry = catalog.get(&name).ok_or_else(|| {
            let known: Vec<&str> = catalog.iter().map(|e| e.name.as_str()).collect();
            let known = if known.is_empty() {
                "this model has no LoRA folder or file".to_string()
            } else {
                format!("known: {}", known.join(", "))
            };
            RequestError::UnknownLora {
                key,
                name: shown.clone(),
                known,
            }
        })?;
        specs.push(LoraSpec {
            name,
            path: entry.path.clone(),
            scale,
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((specs, key))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::lora::LoraEntry;

    fn catalog() -> LoraCatalog {
        let mut c = LoraCatalog::default();
        for name in ["style", "char"] {
            c.insert(LoraEntry {
                name: name.into(),
                path: PathBuf::from(format!("/loras/{name}.safetensors")),
                size: 1,
            });
        }
        c
    }

    fn request(prompt: &str, loras: &[(&str, f64)]) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            loras: (!loras.is_empty())
                .then(|| loras.iter().map(|(n, s)| (n.to_string(), *s)).collect()),
            ..GenerateRequest::default()
        }
    }

    fn run(req: &GenerateRequest, syntax: PromptSyntax) -> Result<Vec<(String, f64)>, String> {
        resolve(req, syntax, &catalog(), &Limits::default())
            .map(|(s, _)| s.into_iter().map(|s| (s.name, s.scale)).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_key_and_the_a1111_tags_make_one_set_sorted_by_name() {
        let r = request("a cat <lora:style:0.5>", &[("char", -1.0)]);
        assert_eq!(
            run(&r, PromptSyntax::A1111).unwrap(),
            [("char".to_string(), -1.0), ("style".to_string(), 0.5)]
        );
        // With diffusers' syntax the tag is plain text.
        assert_eq!(
            run(&r, PromptSyntax::Diffusers).unwrap(),
            [("char".to_string(), -1.0)]
        );
        let (specs, key) =
            resolve(&r, PromptSyntax::A1111, &catalog(), &Limits::default()).unwrap();
        assert_eq!(specs[0].path, PathBuf::from("/loras/char.safetensors"));
        assert_eq!(key, [("char".to_string(), -1.0)]);
    }

    #[test]
    fn bad_sets_are_refused_naming_the_key_and_the_lora() {
        let cases: &[(GenerateRequest, &str)] = &[
            (
                request("x", &[("nope", 1.0)]),
                "'loras': unknown LoRA 'nope' (known: char, style)",
            ),
            (
                request("x <lora:nope>", &[]),
                "'prompt': unknown LoRA 'nope'",
            ),
            (
                request("x", &[("style", 4.5)]),
                "'loras': LoRA 'style': scale 4.5 is outside [-4, 4]",
            ),
            (request("x", &[("style", f64::NAN)]), "scale NaN is outside"),
            (
                request("x <lora:style:1>", &[("style", 1.0)]),
                "'prompt': LoRA 'style' is given more than once",
            ),
            (
                request("x <hypernet:h:1>", &[]),
                "'prompt': <hypernet:h:1>: only <lora:NAME:WEIGHT>",
            ),
        ];
        for (req, want) in cases {
            let err = run(req, PromptSyntax::A1111).unwrap_err();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        let mut neg = request("x", &[]);
        neg.negative_prompt = Some("<lora:style>".into());
        let err = run(&neg, PromptSyntax::A1111).unwrap_err();
        assert!(err.contains("'negative_prompt'"), "{err}");
        let limits = Limits {
            max_loras: 1,
            ..Limits::default()
        };
        let err = resolve(
            &request("x", &[("style", 1.0), ("char", 1.0)]),
            PromptSyntax::Diffusers,
            &catalog(),
            &limits,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("2 LoRAs; at most 1 at once"), "{err}");
        let err = resolve(
            &request("x", &[("style", 1.0)]),
            PromptSyntax::Diffusers,
            LoraCatalog::none(),
            &Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no LoRA folder"), "{err}");
    }
}
