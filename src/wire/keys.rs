//! The request keys of `Manager.Generate`: one row per key, with its D-Bus type and its
//! conversion both ways. The daemon reads an `a{sv}` into a [`GenerateRequest`] with
//! [`parse`]; the client writes one with [`to_dict`]; the Job's `Request` property is
//! [`to_owned_dict`] of the resolved request.
//!
//! This layer checks types and names only. Values are checked by the one resolve step
//! (`crate::request::resolve`).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use zbus::zvariant::{OwnedValue, Value};

use super::controls;
use super::images::{self, Slot};
pub use super::raw::{Field, RawDict, Sent, SentDict};
use crate::prompt_syntax::PromptSyntax;
use crate::request::{GenerateRequest, PreviewMethod};
use crate::rng::RngKind;

/// A request as read from the wire: the generation keys, plus how the result is delivered.
#[derive(Debug)]
pub struct Incoming {
    /// The generation keys.
    pub request: GenerateRequest,
    /// Caller-owned fds for the PNGs (`output_fds`), one per image.
    pub output_fds: Vec<OwnedFd>,
    /// Cancel the job when the caller leaves the bus (`cancel_on_disconnect`, default true).
    pub cancel_on_disconnect: bool,
    /// Images sent as file descriptors (`init_image_fd`, `mask_image_fd`,
    /// `controls[i].image_fd`), to read with [`super::images::finish`] before the request
    /// is resolved.
    pub image_fds: Vec<(Slot, OwnedFd)>,
    /// Images sent as bytes (`init_image`, `mask_image`, `controls[i].image`), copied out
    /// of the message and within `limits.max_image_bytes`; [`super::images::finish`] (off
    /// the async threads: it hashes them) puts them in the request.
    pub image_bytes: Vec<(Slot, std::sync::Arc<[u8]>)>,
}

impl Incoming {
    /// Whether images still have to be read or hashed ([`super::images::finish`]).
    pub fn has_pending_images(&self) -> bool {
        !self.image_fds.is_empty() || !self.image_bytes.is_empty()
    }
}

impl Incoming {
    /// `output_fds`, when given, holds one fd per image.
    pub fn check_delivery(&self, num_images: usize) -> Result<(), String> {
        if !self.output_fds.is_empty() && self.output_fds.len() != num_images {
            return Err(format!(
                "'output_fds': {} descriptors for {} images; give one per image",
                self.output_fds.len(),
                num_images
            ));
        }
        Ok(())
    }
}

/// A dict being built for the client side.
pub type Dict<'a> = HashMap<&'static str, Value<'a>>;

/// One request key.
pub struct Key {
    /// Its name in the `a{sv}`.
    pub name: &'static str,
    /// Its D-Bus type signature.
    pub signature: &'static str,
    read: fn(&mut Parsing, &Field<'_>) -> Result<(), String>,
    write: for<'a> fn(&'a GenerateRequest, &mut Dict<'a>),
}

/// Parsing state: the request, plus whether the required prompt was seen.
struct Parsing {
    incoming: Incoming,
    prompt: bool,
    /// Largest image sent as bytes (`limits.max_image_bytes`): checked before the bytes
    /// are copied out of the message.
    max_image_bytes: usize,
}

impl Parsing {
    /// Nothing read yet: every key at its default.
    fn new(max_image_bytes: usize) -> Parsing {
        Parsing {
            incoming: Incoming {
                request: GenerateRequest::default(),
                output_fds: Vec::new(),
                cancel_on_disconnect: true,
                image_fds: Vec::new(),
                image_bytes: Vec::new(),
            },
            prompt: false,
            max_image_bytes,
        }
    }
}

/// A Rust type as a D-Bus basic type.
trait Wire: Sized {
    const SIGNATURE: &'static str;
    fn read(key: &str, v: &Field<'_>) -> Result<Self, String>;
    fn write(&self) -> Value<'_>;
}

/// The message for a value of the wrong D-Bus type.
pub(crate) fn type_error(key: &str, want: &str, got: &Field<'_>) -> String {
    format!(
        "'{key}' must have D-Bus type '{want}', got '{}'",
        got.signature()
    )
}

macro_rules! basic {
    ($ty:ty, $sig:literal, $variant:ident) => {
        impl Wire for $ty {
            const SIGNATURE: &'static str = $sig;
            fn read(key: &str, v: &Field<'_>) -> Result<Self, String> {
                match v {
                    Field::Basic(Value::$variant(x)) => Ok(*x),
                    other => Err(type_error(key, $sig, other)),
                }
            }
            fn write(&self) -> Value<'_> {
                Value::$variant(*self)
            }
        }
    };
}
basic!(u32, "u", U32);
basic!(u64, "t", U64);
basic!(i32, "i", I32);
basic!(f64, "d", F64);
basic!(bool, "b", Bool);

impl Wire for String {
    const SIGNATURE: &'static str = "s";
    fn read(key: &str, v: &Field<'_>) -> Result<Self, String> {
        match v {
            Field::Basic(Value::Str(s)) => Ok(s.to_string()),
            other => Err(type_error(key, "s", other)),
        }
    }
    fn write(&self) -> Value<'_> {
        Value::from(self.as_str())
    }
}

/// (name, number) pairs: `loras`.
impl Wire for Vec<(String, f64)> {
    const SIGNATURE: &'static str = "a(sd)";
    fn read(key: &str, v: &Field<'_>) -> Result<Self, String> {
        match v {
            Field::Pairs(p) => Ok(p.clone()),
            other => Err(type_error(key, "a(sd)", other)),
        }
    }
    fn write(&self) -> Value<'_> {
        Value::new(self.clone())
    }
}

/// A value sent as its name (`s`) and parsed back with `FromStr`.
macro_rules! named {
    ($ty:ty, $name:ident) => {
        impl Wire for $ty {
            const SIGNATURE: &'static str = "s";
            fn read(key: &str, v: &Field<'_>) -> Result<Self, String> {
                String::read(key, v)?
                    .parse()
                    .map_err(|e| format!("'{key}': {e}"))
            }
            fn write(&self) -> Value<'_> {
                Value::from(self.$name())
            }
        }
    };
}
named!(RngKind, as_str);
named!(PromptSyntax, name);
named!(PreviewMethod, name);

/// A row for an optional field of [`GenerateRequest`] of the same name.
macro_rules! key {
    ($field:ident: $ty:ty) => {
        Key {
            name: stringify!($field),
            signature: <$ty as Wire>::SIGNATURE,
            read: |p, v| {
                p.incoming.request.$field = Some(<$ty as Wire>::read(stringify!($field), v)?);
                Ok(())
            },
            write: |r, d| {
                if let Some(x) = &r.$field {
                    d.insert(stringify!($field), x.write());
                }
            },
        }
    };
}

/// A row for an image sent as bytes (`ay`).
macro_rules! image_key {
    ($slot:expr) => {
        Key {
            name: $slot.key(),
            signature: "ay",
            read: |p, v| {
                let bytes = images::bytes($slot.key(), v, p.max_image_bytes)?;
                p.incoming.image_bytes.push(($slot, bytes));
                Ok(())
            },
            write: |r, d| {
                if let Some(image) = $slot.field_ref(r) {
                    d.insert($slot.key(), images::write(image));
                }
            },
        }
    };
}

/// A row for an image sent as a file descriptor (`h`); the daemon reads it.
macro_rules! image_fd_key {
    ($slot:expr) => {
        Key {
            name: $slot.fd_key(),
            signature: "h",
            read: |p, v| {
                let fd = images::fd($slot.fd_key(), v)?;
                p.incoming.image_fds.push(($slot, fd));
                Ok(())
            },
            write: |_, _| {},
        }
    };
}

/// Every key `Generate` accepts. Adding one: a field in [`GenerateRequest`], a row here.
pub const KEYS: &[Key] = &[
    Key {
        name: "prompt",
        signature: "s",
        read: |p, v| {
            p.incoming.request.prompt = String::read("prompt", v)?;
            p.prompt = true;
            Ok(())
        },
        write: |r, d| {
            d.insert("prompt", r.prompt.write());
        },
    },
    key!(negative_prompt: String),
    key!(model: String),
    key!(width: u32),
    key!(height: u32),
    key!(steps: u32),
    key!(guidance_scale: f64),
    key!(guidance_rescale: f64),
    key!(seed: u64),
    key!(rng: RngKind),
    key!(scheduler: String),
    key!(num_images: u32),
    key!(priority: i32),
    key!(strength: f64),
    key!(prompt_syntax: PromptSyntax),
    key!(a1111_pad_cond_uncond: bool),
    key!(preview_every: u32),
    key!(preview_method: PreviewMethod),
    key!(keep_alive: f64),
    key!(loras: Vec<(String, f64)>),
    key!(max_sequence_length: u32),
    key!(control_guess_mode: bool),
    image_key!(Slot::Init),
    image_key!(Slot::Mask),
    image_fd_key!(Slot::Init),
    image_fd_key!(Slot::Mask),
    Key {
        name: controls::KEY,
        signature: controls::SIGNATURE,
        read: |p, v| {
            let read = controls::read(v, p.max_image_bytes)?;
            p.incoming.request.controls = Some(read.controls);
            p.incoming.image_bytes.extend(read.bytes);
            p.incoming.image_fds.extend(read.fds);
            Ok(())
        },
        // The property's form (images as their SHA-256); a client sends the images
        // themselves ([`to_sent_dict`]).
        write: |r, d| {
            if let Some(c) = &r.controls {
                d.insert(controls::KEY, controls::property(c));
            }
        },
    },
    Key {
        name: "output_fds",
        signature: "ah",
        read: |p, v| {
            p.incoming.output_fds = fds("output_fds", v)?;
            Ok(())
        },
        write: |_, _| {},
    },
    Key {
        name: "cancel_on_disconnect",
        signature: "b",
        read: |p, v| {
            p.incoming.cancel_on_disconnect = bool::read("cancel_on_disconnect", v)?;
            Ok(())
        },
        write: |_, _| {},
    },
];

fn fds(key: &str, v: &Field<'_>) -> Result<Vec<OwnedFd>, String> {
    let Field::Fds(items) = v else {
        return Err(type_error(key, "ah", v));
    };
    items
        .iter()
        .map(|fd| {
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("'{key}': cannot use the file descriptor: {e}"))
        })
        .collect()
}

/// Reads a `Generate` request: unknown keys, keys given twice and wrong types are errors
/// naming the key; `prompt` is required; an image sent as bytes may have at most
/// `max_image_bytes` (`limits.max_image_bytes`).
pub fn parse(raw: &RawDict<'_>, max_image_bytes: usize) -> Result<Incoming, String> {
    let p = read_keys(raw, max_image_bytes)?;
    if !p.prompt {
        return Err("'prompt' is required".into());
    }
    Ok(p.incoming)
}

/// Reads every entry through its row.
fn read_keys(raw: &RawDict<'_>, max_image_bytes: usize) -> Result<Parsing, String> {
    let mut p = Parsing::new(max_image_bytes);
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &raw.0 {
        if seen.contains(&name.as_str()) {
            return Err(format!("'{}' is given more than once", shown_key(name)));
        }
        seen.push(name);
        let key = KEYS.iter().find(|k| k.name == name).ok_or_else(|| {
            let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
            format!(
                "unknown key '{}' (known: {})",
                shown_key(name),
                known.join(", ")
            )
        })?;
        (key.read)(&mut p, value)?;
    }
    Ok(p)
}

/// A key name a caller chose, as an error message shows it: at most 64 characters, control
/// characters escaped.
fn shown_key(name: &str) -> String {
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

/// The `a{sv}` for `Generate`, with only the keys that are set.
pub fn to_dict(request: &GenerateRequest) -> Dict<'_> {
    let mut d = Dict::new();
    for key in KEYS {
        (key.write)(request, &mut d);
    }
    d
}

/// The `a{sv}` a client sends for `Generate`: [`to_dict`], with the images written as
/// byte strings ([`Sent::Bytes`]), the control images too (in `controls`).
pub fn to_sent_dict(request: &GenerateRequest) -> SentDict<'_> {
    let mut sent: SentDict<'_> = to_dict_without_images(request)
        .into_iter()
        .filter(|(k, _)| *k != controls::KEY)
        .map(|(k, v)| (k, Sent::Value(v)))
        .collect();
    for slot in [Slot::Init, Slot::Mask] {
        if let Some(image) = slot.field_ref(request) {
            sent.insert(slot.key(), Sent::Bytes(image.bytes()));
        }
    }
    if let Some(c) = &request.controls {
        sent.insert(controls::KEY, controls::sent(c));
    }
    sent
}

/// [`to_dict`] without the image rows.
fn to_dict_without_images(request: &GenerateRequest) -> Dict<'_> {
    let mut d = Dict::new();
    for key in KEYS {
        if key.name != Slot::Init.key() && key.name != Slot::Mask.key() {
            (key.write)(request, &mut d);
        }
    }
    d
}

/// [`to_dict`] as owned values (a property's value), without the images: their rows are
/// not even written (a `Value` array holds one `Value` per byte); `controls` shows each
/// control image as its SHA-256 (`image_sha256`).
pub fn to_owned_dict(request: &GenerateRequest) -> HashMap<String, OwnedValue> {
    to_dict_without_images(request)
        .into_iter()
        .filter_map(|(k, v)| v.try_to_owned().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Keys of `Generate` that a batch manifest line may not hold: delivery goes to the batch's
/// folder, and batch items run after interactive jobs whatever their priority.
pub const NOT_IN_MANIFEST: &[&str] = &[
    "output_fds",
    "cancel_on_disconnect",
    "priority",
    "init_image_fd",
    "mask_image_fd",
];

/// Keys a batch's `defaults` may not hold, besides [`NOT_IN_MANIFEST`]: the images (and
/// the ControlNets, which carry images), which a daemon batch does not take (a default
/// would be silently ignored otherwise).
pub const NOT_A_BATCH_DEFAULT: &[&str] = &["prompt", "init_image", "mask_image", "controls"];

/// Reads the defaults of a batch (`SubmitBatch`'s `defaults`): the keys a manifest line
/// may hold, but not `prompt`, which each line gives, nor images.
pub fn parse_defaults(raw: &RawDict<'_>) -> Result<GenerateRequest, String> {
    for (name, _) in &raw.0 {
        if name == "init_image" || name == "mask_image" || name == controls::KEY {
            return Err(format!(
                "'{name}' cannot be a batch default: daemon batches take no images \
                 (run image-to-image batches with diffusionctl batch --local)"
            ));
        }
        if NOT_A_BATCH_DEFAULT.contains(&name.as_str()) || NOT_IN_MANIFEST.contains(&name.as_str())
        {
            return Err(format!("'{name}' cannot be a batch default"));
        }
    }
    // Images are refused above: no bytes are read.
    read_keys(raw, 0).map(|p| p.incoming.request)
}

/// Reads a manifest line (one JSON object) through the same rows as [`parse`]: each JSON
/// value is taken as its key's D-Bus type. Keys in `extra` are left to the caller.
/// Returns the request, whether `prompt` was given, and one `(key, message)` per bad key.
pub fn from_json(
    object: &serde_json::Map<String, serde_json::Value>,
    extra: &[&str],
) -> (GenerateRequest, bool, Vec<(String, String)>) {
    let mut p = Parsing::new(usize::MAX);
    let mut errors = Vec::new();
    for (name, json) in object {
        if extra.contains(&name.as_str()) {
            continue;
        }
        let key = KEYS
            .iter()
            .find(|k| k.name == name && !NOT_IN_MANIFEST.contains(&k.name));
        let Some(key) = key else {
            let mut known: Vec<&str> = KEYS
                .iter()
                .map(|k| k.name)
                .filter(|k| !NOT_IN_MANIFEST.contains(k))
                .collect();
            for e in extra {
                if !known.contains(e) {
                    known.push(e);
                }
            }
            errors.push((
                name.clone(),
                format!("unknown key (known: {})", known.join(", ")),
            ));
            continue;
        };
        let read = json_field(key.signature, json).and_then(|v| {
            (key.read)(&mut p, &v).map_err(|e| {
                // The row's message is about D-Bus types; keep what it says of the value.
                e.trim_start_matches(&format!("'{name}': ")).to_string()
            })
        });
        if let Err(message) = read {
            errors.push((name.clone(), message));
        }
    }
    (p.incoming.request, p.prompt, errors)
}

/// A JSON value as the field of D-Bus type `signature`: `a(sd)` from `[["name", 0.8],
/// …]`, the basic types by [`json_value`].
fn json_field(signature: &str, json: &serde_json::Value) -> Result<Field<'static>, String> {
    use serde_json::Value as J;
    if signature != "a(sd)" {
        return json_value(signature, json).map(Field::Basic);
    }
    let expected = || format!("expected [[\"name\", scale], ...], got {}", echo_json(json));
    let J::Array(items) = json else {
        return Err(expected());
    };
    items
        .iter()
        .map(|item| match item.as_array().map(Vec::as_slice) {
            Some([J::String(n), J::Number(s)]) => {
                s.as_f64().map(|s| (n.clone(), s)).ok_or_else(expected)
            }
            _ => Err(expected()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Field::Pairs)
}

/// A JSON value as an error message shows it: at most 40 characters.
fn echo_json(json: &serde_json::Value) -> String {
    let mut s = json.to_string();
    if s.len() > 40 {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// A JSON value as the D-Bus basic type `signature`, or what was expected.
fn json_value(signature: &str, json: &serde_json::Value) -> Result<Value<'static>, String> {
    use serde_json::Value as J;
    let shown = |j: &J| {
        let mut s = j.to_string();
        if s.len() > 40 {
            s.truncate(40);
            s.push_str("...");
        }
        s
    };
    let int = |lo: i128, hi: i128, what: &str| -> Result<i128, String> {
        let n = match json {
            J::Number(n) => n
                .as_u64()
                .map(i128::from)
                .or_else(|| n.as_i64().map(i128::from)),
            _ => None,
        };
        n.filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("expected {what} from {lo} to {hi}, got {}", shown(json)))
    };
    match signature {
        "s" => match json {
            J::String(s) => Ok(Value::from(s.clone())),
            other => Err(format!("expected a string, got {}", shown(other))),
        },
        "u" => int(0, u32::MAX.into(), "an integer").map(|n| Value::U32(n as u32)),
        "t" => int(0, u64::MAX.into(), "an integer").map(|n| Value::U64(n as u64)),
        "i" => int(i32::MIN.into(), i32::MAX.into(), "an integer").map(|n| Value::I32(n as i32)),
        "d" => match json {
            J::Number(n) => n
                .as_f64()
                .map(Value::F64)
                .ok_or_else(|| format!("expected a number, got {n}")),
            other => Err(format!("expected a number, got {}", shown(other))),
        },
        "b" => match json {
            J::Bool(b) => Ok(Value::Bool(*b)),
            other => Err(format!("expected true or false, got {}", shown(other))),
        },
        other => Err(format!("D-Bus type '{other}' has no JSON form")),
    }
}

/// The keys a request sets, as one JSON object (a manifest line; the inverse of
/// [`from_json`]).
pub fn to_json(request: &GenerateRequest) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value as J;
    let mut object = serde_json::Map::new();
    let dict = to_dict(request);
    for key in KEYS {
        if key.name == "loras" {
            if let Some(l) = &request.loras {
                let pairs: Vec<J> = l
                    .iter()
                    .map(|(n, s)| J::from(vec![J::from(n.as_str()), J::from(*s)]))
                    .collect();
                object.insert(key.name.to_string(), J::Array(pairs));
            }
            continue;
        }
        let Some(v) = dict.get(key.name) else {
            continue;
        };
        let json = match v {
            Value::Str(s) => J::from(s.as_str()),
            Value::U32(n) => J::from(*n),
            Value::U64(n) => J::from(*n),
            Value::I32(n) => J::from(*n),
            Value::F64(x) => J::from(*x),
            Value::Bool(b) => J::from(*b),
            _ => continue,
        };
        object.insert(key.name.to_string(), json);
    }
    object
}

#[cfg(test)]
mod tests;
