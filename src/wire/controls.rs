//! The `controls` key of `Generate` (`aa{sv}`): one dict per ControlNet, with
//! `controlnet` (`s`), the control image as bytes (`image`, `ay`) or as a file descriptor
//! (`image_fd`, `h`), and `scale`, `start`, `end` (`d`).
//!
//! Read by type and name only, like every key ([`super::keys`]): an unknown field, a
//! field given twice, a wrong type, and both `image` and `image_fd` are refused here,
//! naming `controls[i].FIELD`; missing fields and values out of range are the resolve
//! step's (`crate::request::resolve`). Control images sent as bytes are held to
//! `limits.max_image_bytes` before their one copy and, like the ones sent as descriptors,
//! put into the request off the async threads ([`super::images::finish`]). At most
//! [`MAX_CONTROLS`] dicts are read: no image of a longer list is copied or read.
//!
//! The Job's `Request` property shows each ControlNet without its image: the image's
//! SHA-256 (`image_sha256`, hex) stands in for it ([`property`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use zbus::zvariant::Value;

use super::images::{self, Slot};
use super::keys::type_error;
use super::raw::{Field, RawDict, Sent, SentDict};
use crate::request::ControlInput;

pub use crate::request::MAX_CONTROLS;

/// The request key.
pub const KEY: &str = "controls";

/// Its D-Bus type.
pub const SIGNATURE: &str = "aa{sv}";

/// The fields of one ControlNet's dict, with their D-Bus types.
pub const FIELDS: &[(&str, &str)] = &[
    ("controlnet", "s"),
    ("image", "ay"),
    ("image_fd", "h"),
    ("scale", "d"),
    ("start", "d"),
    ("end", "d"),
];

/// The `controls` of a request as read off the wire: the ControlNets (without their
/// images), and the images still to put into them.
#[derive(Debug, Default)]
pub struct Read {
    /// One per dict, in order; `image` is `None` until [`super::images::finish`] runs.
    pub controls: Vec<ControlInput>,
    /// Images sent as bytes, copied out of the message.
    pub bytes: Vec<(Slot, Arc<[u8]>)>,
    /// Images sent as file descriptors, to read off the async threads.
    pub fds: Vec<(Slot, OwnedFd)>,
}

/// Reads the `controls` value; `max_image_bytes` bounds each image sent as bytes.
pub fn read(v: &Field<'_>, max_image_bytes: usize) -> Result<Read, String> {
    let Field::Dicts(dicts) = v else {
        return Err(type_error(KEY, SIGNATURE, v));
    };
    if dicts.len() > MAX_CONTROLS {
        return Err(format!(
            "'{KEY}': {} ControlNets is above the limit of {MAX_CONTROLS}",
            dicts.len()
        ));
    }
    let mut out = Read::default();
    for (index, dict) in dicts.iter().enumerate() {
        let control = read_one(index, dict, max_image_bytes, &mut out)?;
        out.controls.push(control);
    }
    Ok(out)
}

/// One ControlNet's dict; its image goes to `out`.
fn read_one(
    index: usize,
    dict: &RawDict<'_>,
    max_image_bytes: usize,
    out: &mut Read,
) -> Result<ControlInput, String> {
    let name = |field: &str| format!("{KEY}[{index}].{field}");
    let slot = Slot::Control(index);
    let mut control = ControlInput::default();
    let mut seen: Vec<&str> = Vec::new();
    let mut bytes = None;
    let mut fd = None;
    for (field, value) in &dict.0 {
        if seen.contains(&field.as_str()) {
            return Err(format!(
                "'{}' is given more than once",
                name(&shown_field(field))
            ));
        }
        seen.push(field);
        match field.as_str() {
            "controlnet" => control.controlnet = Some(string(&name(field), value)?),
            "image" => bytes = Some(images::bytes(&name(field), value, max_image_bytes)?),
            "image_fd" => fd = Some(images::fd(&name(field), value)?),
            "scale" => control.scale = Some(number(&name(field), value)?),
            "start" => control.start = Some(number(&name(field), value)?),
            "end" => control.end = Some(number(&name(field), value)?),
            other => {
                let known: Vec<&str> = FIELDS.iter().map(|(f, _)| *f).collect();
                return Err(format!(
                    "'{}': unknown field (known: {})",
                    name(&shown_field(other)),
                    known.join(", ")
                ));
            }
        }
    }
    match (bytes, fd) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "'{}': give 'image' or 'image_fd', not both",
                name("image")
            ));
        }
        (Some(b), None) => out.bytes.push((slot, b)),
        (None, Some(f)) => out.fds.push((slot, f)),
        (None, None) => {}
    }
    Ok(control)
}

/// A field name a caller chose, as a message shows it: at most 64 characters, control
/// characters escaped.
fn shown_field(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect();
    if name.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out
}

fn string(key: &str, v: &Field<'_>) -> Result<String, String> {
    match v {
        Field::Basic(Value::Str(s)) => Ok(s.to_string()),
        other => Err(type_error(key, "s", other)),
    }
}

fn number(key: &str, v: &Field<'_>) -> Result<f64, String> {
    match v {
        Field::Basic(Value::F64(x)) => Ok(*x),
        other => Err(type_error(key, "d", other)),
    }
}

/// The fields a ControlNet sets, but its image.
fn plain_fields(c: &ControlInput) -> Vec<(&'static str, Value<'_>)> {
    let mut fields = Vec::new();
    if let Some(n) = &c.controlnet {
        fields.push(("controlnet", Value::from(n.as_str())));
    }
    for (field, v) in [("scale", c.scale), ("start", c.start), ("end", c.end)] {
        if let Some(v) = v {
            fields.push((field, Value::F64(v)));
        }
    }
    fields
}

/// The `controls` value of the Job's `Request` property: each ControlNet's fields, its
/// image as `image_sha256` (`s`, hex) instead of its bytes.
pub fn property(controls: &[ControlInput]) -> Value<'_> {
    let dicts: Vec<HashMap<&str, Value<'_>>> = controls
        .iter()
        .map(|c| {
            let mut d: HashMap<&str, Value<'_>> = plain_fields(c).into_iter().collect();
            if let Some(image) = &c.image {
                d.insert("image_sha256", Value::from(image.sha256_hex()));
            }
            d
        })
        .collect();
    Value::from(dicts)
}

/// The `controls` value a client sends: each image written as one `ay` block from its
/// bytes ([`Sent::Bytes`]).
pub fn sent(controls: &[ControlInput]) -> Sent<'_> {
    let dicts: Vec<SentDict<'_>> = controls
        .iter()
        .map(|c| {
            let mut d: SentDict<'_> = plain_fields(c)
                .into_iter()
                .map(|(k, v)| (k, Sent::Value(v)))
                .collect();
            if let Some(image) = &c.image {
                d.insert("image", Sent::Bytes(image.bytes()));
            }
            d
        })
        .collect();
    Sent::Dicts(dicts)
}

#[cfg(test)]
#[path = "controls_tests.rs"]
mod tests;
