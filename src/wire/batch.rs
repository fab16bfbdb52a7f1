//! The batch part of the wire contract: the Batch object's names, and the options of
//! `Manager.SubmitBatch(ay manifest, a{sv} options) → o`, read by the daemon with
//! [`parse_submission`] and written by the client with [`submission_dict`].

use std::collections::HashMap;

use zbus::zvariant::{OwnedObjectPath, Value};

use super::keys::{self, Dict, Field, RawDict};
use crate::batch::manifest::{Format, Shard};
use crate::batch::service::Submission;
use crate::batch::store::BatchId;
use crate::request::GenerateRequest;

/// The Batch interface.
pub const BATCH_INTERFACE: &str = "io.github.Diffusiond1.Batch";

/// Batch object paths: this prefix and the batch number.
pub const BATCH_PATH_PREFIX: &str = "/io/github/Diffusiond1/batch/";

/// The object path of batch `id`.
pub fn batch_path(id: BatchId) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{BATCH_PATH_PREFIX}{id}"))
        .expect("a batch path is a valid object path")
}

/// A batch number from its number or object path.
pub fn batch_id(text: &str) -> Option<BatchId> {
    text.strip_prefix(BATCH_PATH_PREFIX)
        .unwrap_or(text)
        .parse()
        .ok()
}

/// `SubmitBatch` option keys.
pub mod options {
    /// `s`: `jsonl` (default) or `txt`.
    pub const FORMAT: &str = "format";
    /// `a{sv}`: `Generate` keys, the values for keys lines leave out.
    pub const DEFAULTS: &str = "defaults";
    /// `t`: base seed of lines without a seed (default: random, recorded).
    pub const SEED: &str = "seed";
    /// `s`: `I/N`, the items whose index modulo N is I (default `0/1`).
    pub const SHARD: &str = "shard";
    /// `s`: a label for listings (diffusionctl sends its output folder).
    pub const LABEL: &str = "label";
    /// Every option.
    pub const ALL: &[&str] = &[FORMAT, DEFAULTS, SEED, SHARD, LABEL];
}

/// Longest `label`, in bytes (a path: Linux's `PATH_MAX`). Labels are stored with the
/// batch and shown in listings.
pub const MAX_LABEL_BYTES: usize = 4096;

/// A `label` within [`MAX_LABEL_BYTES`].
fn label(text: String) -> Result<String, String> {
    if text.len() > MAX_LABEL_BYTES {
        return Err(format!(
            "'{}' is {} bytes long; the most is {MAX_LABEL_BYTES}",
            options::LABEL,
            text.len()
        ));
    }
    Ok(text)
}

fn string(key: &str, v: &Field<'_>) -> Result<String, String> {
    match v {
        Field::Basic(Value::Str(s)) => Ok(s.to_string()),
        other => Err(format!(
            "'{key}' must have D-Bus type 's', got '{}'",
            other.signature()
        )),
    }
}

/// Reads `SubmitBatch`'s options; errors name the option.
pub fn parse_submission(raw: &RawDict<'_>) -> Result<Submission, String> {
    let mut s = Submission {
        format: Format::Jsonl,
        defaults: GenerateRequest::default(),
        base_seed: None,
        shard: Shard::ALL,
        label: String::new(),
    };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &raw.0 {
        if seen.contains(&name.as_str()) {
            return Err(format!("'{name}' is given more than once"));
        }
        seen.push(name);
        match name.as_str() {
            options::FORMAT => s.format = string(name, value)?.parse()?,
            options::SHARD => {
                s.shard = string(name, value)?
                    .parse()
                    .map_err(|e| format!("'{name}': {e}"))?
            }
            options::LABEL => s.label = label(string(name, value)?)?,
            options::SEED => match value {
                Field::Basic(Value::U64(n)) => s.base_seed = Some(*n),
                other => {
                    return Err(format!(
                        "'seed' must have D-Bus type 't', got '{}'",
                        other.signature()
                    ));
                }
            },
            options::DEFAULTS => s.defaults = defaults(value)?,
            other => {
                return Err(format!(
                    "unknown option '{other}' (known: {})",
                    options::ALL.join(", ")
                ));
            }
        }
    }
    Ok(s)
}

/// The `defaults` dict, read through the manifest rules of the key table.
fn defaults(value: &Field<'_>) -> Result<GenerateRequest, String> {
    let Field::Dict(dict) = value else {
        return Err(format!(
            "'defaults' must have D-Bus type 'a{{sv}}', got '{}'",
            value.signature()
        ));
    };
    keys::parse_defaults(dict).map_err(|e| format!("'defaults': {e}"))
}

/// `SubmitBatch`'s options for a submission (the client side).
pub fn submission_dict(s: &Submission) -> HashMap<&'static str, Value<'_>> {
    let mut d: HashMap<&'static str, Value<'_>> = HashMap::new();
    d.insert(options::FORMAT, Value::from(s.format.as_str()));
    d.insert(options::SHARD, Value::from(s.shard.to_string()));
    d.insert(options::LABEL, Value::from(s.label.as_str()));
    if let Some(seed) = s.base_seed {
        d.insert(options::SEED, Value::U64(seed));
    }
    let mut defaults: Dict<'_> = keys::to_dict(&s.defaults);
    // Each line gives its own prompt.
    defaults.remove("prompt");
    d.insert(options::DEFAULTS, Value::from(defaults));
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::raw::through_wire;

    #[test]
    fn submissions_round_trip() {
        let sub = Submission {
            format: Format::Text,
            defaults: GenerateRequest {
                steps: Some(3),
                width: Some(64),
                ..GenerateRequest::default()
            },
            base_seed: Some(42),
            shard: "1/3".parse().unwrap(),
            label: "/out".into(),
        };
        let dict = submission_dict(&sub);
        let back = through_wire(dict.into_iter().collect(), |raw| parse_submission(&raw)).unwrap();
        assert_eq!(back.format, Format::Text);
        assert_eq!(back.defaults, sub.defaults);
        assert_eq!(back.base_seed, Some(42));
        assert_eq!(back.shard, sub.shard);
        assert_eq!(back.label, "/out");
        assert_eq!(batch_id(batch_path(17).as_str()), Some(17));
        assert_eq!(batch_id("17"), Some(17));
    }

    #[test]
    fn bad_options_are_named() {
        let parse =
            |k: &str, v: Value<'_>| through_wire(vec![(k, v)], |raw| parse_submission(&raw));
        let e = parse("shard", Value::from("3/2")).unwrap_err();
        assert!(e.starts_with("'shard': '3/2' is not a shard"), "{e}");
        let e = parse("seed", Value::U32(1)).unwrap_err();
        assert_eq!(e, "'seed' must have D-Bus type 't', got 'u'");
        let e = parse("colour", Value::U32(1)).unwrap_err();
        assert!(e.starts_with("unknown option 'colour'"), "{e}");
        let e = parse("format", Value::from("csv")).unwrap_err();
        assert!(e.contains("csv"), "{e}");
        // Bytes in a batch's options are skipped, never built, and named by type.
        let e = parse("label", Value::from(&[0u8; 4096][..])).unwrap_err();
        assert_eq!(e, "'label' must have D-Bus type 's', got 'ay'");
        let e = parse("label", Value::from("x".repeat(4097))).unwrap_err();
        assert_eq!(e, "'label' is 4097 bytes long; the most is 4096");
        let ok = parse("label", Value::from("x".repeat(4096))).unwrap();
        assert_eq!(ok.label.len(), 4096);
    }
}
