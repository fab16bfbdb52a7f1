//! webui's extra-network tags in a prompt: `<lora:NAME:WEIGHT>`, `<lora:NAME>`.
//!
//! webui (modules/extra_networks.py) removes every match of `<(\w+):([^>]+)>` from the
//! prompt before the prompt is parsed, and hands each to the network type named first,
//! with its arguments split on `:`. Here `lora` tags become LoRAs (NAME, WEIGHT; a
//! missing weight is 1.0); a tag of another type, or a `lora` tag with separate text
//! encoder and UNet weights (`<lora:NAME:TE:UNET>`, named `te=`/`unet=`/`dyn=`
//! arguments), is refused rather than dropped: diffusiond has no such network to apply.
//! The pattern is matched by hand (the crate has no regex dependency of its own).

/// A tag found in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    /// The LoRA's name (webui's first argument).
    pub name: String,
    /// Its weight (1.0 when the tag gives none).
    pub weight: f64,
}

/// Why a prompt's tags cannot be applied; the message quotes the tag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TagError {
    /// A network type other than `lora`.
    #[error("<{kind}:{args}>: only <lora:NAME:WEIGHT> extra networks are supported")]
    Kind {
        /// The tag's type.
        kind: String,
        /// Its arguments.
        args: String,
    },
    /// A `lora` tag whose arguments are not NAME or NAME:WEIGHT.
    #[error("<lora:{args}>: {what}")]
    Args {
        /// The tag's arguments.
        args: String,
        /// What is wrong.
        what: String,
    },
}

/// One `<(\w+):([^>]+)>` match: its byte range, the type and the arguments.
struct Match<'a> {
    range: std::ops::Range<usize>,
    kind: &'a str,
    args: &'a str,
}

/// Python's `\w` for `str` patterns: Unicode letters, digits and the underscore.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The leftmost non-overlapping matches, as `re.sub` finds them.
fn matches(prompt: &str) -> Vec<Match<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(off) = prompt[at..].find('<') {
        let start = at + off;
        let rest = &prompt[start + 1..];
        let word_len: usize = rest
            .chars()
            .take_while(|&c| is_word(c))
            .map(char::len_utf8)
            .sum();
        let after = &rest[word_len..];
        if word_len > 0
            && let Some(args) = after.strip_prefix(':')
            && let Some(close) = args.find('>')
            && close > 0
        {
            let end = start + 1 + word_len + 1 + close + 1;
            out.push(Match {
                range: start..end,
                kind: &rest[..word_len],
                args: &args[..close],
            });
            at = end;
        } else {
            at = start + 1;
        }
    }
    out
}

/// The prompt with every tag removed, as webui encodes it.
pub fn strip(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    let mut last = 0;
    for m in matches(prompt) {
        out.push_str(&prompt[last..m.range.start]);
        last = m.range.end;
    }
    out.push_str(&prompt[last..]);
    out
}

/// Whether the prompt has any tag.
pub fn has_tags(prompt: &str) -> bool {
    !matches(prompt).is_empty()
}

/// The prompt's `lora` tags, in order; any other tag is an error.
pub fn lora_tags(prompt: &str) -> Result<Vec<LoraTag>, TagError> {
    matches(prompt)
        .into_iter()
        .map(|m| {
            if m.kind != "lora" {
                return Err(TagError::Kind {
                    kind: m.kind.to_string(),
                    args: m.args.to_string(),
                });
            }
            let args = || m.args.to_string();
            let items: Vec<&str> = m.args.split(':').collect();
            let bad = |what: &str| TagError::Args {
                args: args(),
                what: what.to_string(),
            };
            if items.iter().any(|i| i.contains('=')) {
                return Err(bad("named arguments (te=, unet=, dyn=) are not supported"));
            }
            let weight = match items[..] {
                [_] => 1.0,
                [_, w] => w
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite())
                    .ok_or_else(|| bad(&format!("weight '{w}' is not a number")))?,
                _ => {
                    return Err(bad(
                        "separate text encoder and UNet weights are not supported; give one weight",
                    ));
                }
            };
            Ok(LoraTag {
                name: items[0].to_string(),
                weight,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_removed_as_webui_removes_them() {
        let p = "a cat <lora:style_v2:0.8>, <lora:char> in snow";
        assert_eq!(strip(p), "a cat ,  in snow");
        assert_eq!(
            lora_tags(p).unwrap(),
            [
                LoraTag {
                    name: "style_v2".into(),
                    weight: 0.8
                },
                LoraTag {
                    name: "char".into(),
                    weight: 1.0
                }
            ]
        );
        // Not tags: no word before the colon, nothing after it, no closing bracket.
        for p in [
            "a <:x> b",
            "a <lora:> b",
            "<lora:x",
            "x < y > z",
            "<lo-ra:x>",
        ] {
            assert_eq!(strip(p), p, "{p}");
            assert!(lora_tags(p).unwrap().is_empty(), "{p}");
        }
        // The first '>' ends the tag; a '<' inside the arguments is part of them.
        assert_eq!(strip("<lora:a<b:1>>"), ">");
        // Unicode word characters, as Python's \w.
        assert_eq!(lora_tags("<lora:猫:0.5>").unwrap()[0].name, "猫");
        assert_eq!(strip("x<ｌｏｒａ:y>z"), "xz");
    }

    #[test]
    fn other_networks_and_split_weights_are_refused() {
        let err = lora_tags("<hypernet:anime:1>").unwrap_err().to_string();
        assert!(err.contains("<hypernet:anime:1>"), "{err}");
        let err = lora_tags("<lora:x:0.5:1>").unwrap_err().to_string();
        assert!(err.contains("separate text encoder and UNet"), "{err}");
        let err = lora_tags("<lora:x:te=1>").unwrap_err().to_string();
        assert!(err.contains("named arguments"), "{err}");
        let err = lora_tags("<lora:x:heavy>").unwrap_err().to_string();
        assert!(err.contains("'heavy' is not a number"), "{err}");
    }
}
