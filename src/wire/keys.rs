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

use crate::request::GenerateRequest;
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
    read: fn(&mut Parsing, &Value<'_>) -> Result<(), String>,
    write: for<'a> fn(&'a GenerateRequest, &mut Dict<'a>),
}

/// Parsing state: the request, plus whether the required prompt was seen.
struct Parsing {
    incoming: Incoming,
    prompt: bool,
}

/// A Rust type as a D-Bus basic type.
trait Wire: Sized {
    const SIGNATURE: &'static str;
    fn read(key: &str, v: &Value<'_>) -> Result<Self, String>;
    fn write(&self) -> Value<'_>;
}

fn type_error(key: &str, want: &str, got: &Value<'_>) -> String {
    format!(
        "'{key}' must have D-Bus type '{want}', got '{}'",
        got.value_signature()
    )
}

macro_rules! basic {
    ($ty:ty, $sig:literal, $variant:ident) => {
        impl Wire for $ty {
            const SIGNATURE: &'static str = $sig;
            fn read(key: &str, v: &Value<'_>) -> Result<Self, String> {
                match v {
                    Value::$variant(x) => Ok(*x),
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
    fn read(key: &str, v: &Value<'_>) -> Result<Self, String> {
        match v {
            Value::Str(s) => Ok(s.to_string()),
            other => Err(type_error(key, "s", other)),
        }
    }
    fn write(&self) -> Value<'_> {
        Value::from(self.as_str())
    }
}

impl Wire for RngKind {
    const SIGNATURE: &'static str = "s";
    fn read(key: &str, v: &Value<'_>) -> Result<Self, String> {
        String::read(key, v)?
            .parse()
            .map_err(|e| format!("'{key}': {e}"))
    }
    fn write(&self) -> Value<'_> {
        Value::from(self.as_str())
    }
}

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

fn fds(key: &str, v: &Value<'_>) -> Result<Vec<OwnedFd>, String> {
    let Value::Array(items) = v else {
        return Err(type_error(key, "ah", v));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Fd(fd) => fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("'{key}': cannot use the file descriptor: {e}")),
            other => Err(type_error(key, "ah", other)),
        })
        .collect()
}

/// An `a{sv}` as sent, every entry in order: a key sent twice stays twice, so it can be
/// refused (a map would keep one of them silently).
#[derive(Debug, Default)]
pub struct RawDict(pub Vec<(String, OwnedValue)>);

impl zbus::zvariant::Type for RawDict {
    const SIGNATURE: &'static zbus::zvariant::Signature =
        <HashMap<String, OwnedValue> as zbus::zvariant::Type>::SIGNATURE;
}

impl<'de> serde::Deserialize<'de> for RawDict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = RawDict;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an a{sv} dictionary")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawDict, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<String, OwnedValue>()? {
                    entries.push(entry);
                }
                Ok(RawDict(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

impl From<HashMap<String, OwnedValue>> for RawDict {
    fn from(map: HashMap<String, OwnedValue>) -> Self {
        RawDict(map.into_iter().collect())
    }
}

/// Reads a `Generate` request: unknown keys, keys given twice and wrong types are errors
/// naming the key; `prompt` is required.
pub fn parse(raw: &RawDict) -> Result<Incoming, String> {
    let mut p = Parsing {
        incoming: Incoming {
            request: GenerateRequest::default(),
            output_fds: Vec::new(),
            cancel_on_disconnect: true,
        },
        prompt: false,
    };
    let mut seen: Vec<&str> = Vec::with_capacity(raw.0.len());
    for (name, value) in &raw.0 {
        if seen.contains(&name.as_str()) {
            return Err(format!("'{name}' is given more than once"));
        }
        seen.push(name);
        let key = KEYS.iter().find(|k| k.name == name).ok_or_else(|| {
            let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
            format!("unknown key '{name}' (known: {})", known.join(", "))
        })?;
        (key.read)(&mut p, value)?;
    }
    if !p.prompt {
        return Err("'prompt' is required".into());
    }
    Ok(p.incoming)
}

/// The `a{sv}` for `Generate`, with only the keys that are set.
pub fn to_dict(request: &GenerateRequest) -> Dict<'_> {
    let mut d = Dict::new();
    for key in KEYS {
        (key.write)(request, &mut d);
    }
    d
}

/// [`to_dict`] as owned values (a property's value).
pub fn to_owned_dict(request: &GenerateRequest) -> HashMap<String, OwnedValue> {
    to_dict(request)
        .into_iter()
        .filter_map(|(k, v)| v.try_to_owned().ok().map(|v| (k.to_string(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: Vec<(&str, Value<'static>)>) -> RawDict {
        RawDict(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
                .collect(),
        )
    }

    #[test]
    fn every_key_round_trips() {
        let req = GenerateRequest {
            prompt: "p".into(),
            negative_prompt: Some("n".into()),
            model: Some("tiny".into()),
            width: Some(64),
            height: Some(96),
            steps: Some(4),
            guidance_scale: Some(5.0),
            guidance_rescale: Some(0.5),
            seed: Some(7),
            rng: Some(RngKind::Numpy),
            scheduler: Some("ddim".into()),
            num_images: Some(2),
            priority: Some(-3),
        };
        let owned = to_owned_dict(&req);
        // Every generation key is written; the delivery keys are the daemon's to read only.
        assert_eq!(owned.len(), KEYS.len() - 2);
        for (k, v) in &owned {
            let key = KEYS.iter().find(|key| key.name == k).unwrap();
            assert_eq!(v.value_signature().to_string(), key.signature, "{k}");
        }
        let back = parse(&RawDict::from(owned)).unwrap();
        assert_eq!(back.request, req);
        assert!(back.output_fds.is_empty());
        assert!(back.cancel_on_disconnect);
    }

    #[test]
    fn only_set_keys_are_sent() {
        let r = GenerateRequest {
            prompt: "a cat".into(),
            steps: Some(4),
            seed: Some(5),
            guidance_scale: Some(1.0),
            ..Default::default()
        };
        let d = to_dict(&r);
        let mut keys: Vec<&str> = d.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["guidance_scale", "prompt", "seed", "steps"]);
        assert_eq!(d["steps"], Value::U32(4));
        assert_eq!(d["seed"], Value::U64(5));
    }

    #[test]
    fn bad_keys_and_types_name_the_key() {
        let cases: Vec<(Vec<(&str, Value<'static>)>, &str)> = vec![
            (vec![], "'prompt' is required"),
            (
                vec![("prompt", Value::U32(1))],
                "'prompt' must have D-Bus type 's', got 'u'",
            ),
            (
                vec![("prompt", Value::from("p")), ("width", Value::from("64"))],
                "'width' must have D-Bus type 'u'",
            ),
            (
                vec![("prompt", Value::from("p")), ("seed", Value::U32(3))],
                "'seed' must have D-Bus type 't'",
            ),
            (
                vec![("prompt", Value::from("p")), ("colour", Value::from("red"))],
                "unknown key 'colour'",
            ),
            (
                vec![("prompt", Value::from("p")), ("rng", Value::from("dice"))],
                "'rng'",
            ),
            (
                vec![
                    ("prompt", Value::from("p")),
                    ("output_fds", Value::from("x")),
                ],
                "'output_fds' must have D-Bus type 'ah'",
            ),
            (
                vec![
                    ("prompt", Value::from("p")),
                    ("cancel_on_disconnect", Value::U32(1)),
                ],
                "'cancel_on_disconnect'",
            ),
        ];
        for (pairs, needle) in cases {
            let err = parse(&raw(pairs)).unwrap_err();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        let twice = raw(vec![
            ("prompt", Value::from("p")),
            ("steps", Value::U32(201)),
            ("steps", Value::U32(4)),
        ]);
        assert_eq!(
            parse(&twice).unwrap_err(),
            "'steps' is given more than once"
        );
        // As the wire carries it: both entries reach the parser.
        let ctxt = zbus::zvariant::serialized::Context::new_dbus(zbus::zvariant::LE, 0);
        let sent: Vec<(&str, Value<'_>)> =
            vec![("steps", Value::U32(201)), ("steps", Value::U32(4))];
        let bytes = zbus::zvariant::to_bytes(ctxt, &PairsAsDict(sent)).unwrap();
        let (read, _): (RawDict, _) = bytes.deserialize().unwrap();
        assert_eq!(read.0.len(), 2);
        let ok = parse(&raw(vec![
            ("prompt", Value::from("p")),
            ("cancel_on_disconnect", Value::Bool(false)),
        ]))
        .unwrap();
        assert!(!ok.cancel_on_disconnect);
    }

    /// Pairs written as an `a{sv}` with repeats, as a hostile client can send them.
    struct PairsAsDict<'a>(Vec<(&'a str, Value<'a>)>);

    impl zbus::zvariant::Type for PairsAsDict<'_> {
        const SIGNATURE: &'static zbus::zvariant::Signature =
            <HashMap<String, OwnedValue> as zbus::zvariant::Type>::SIGNATURE;
    }

    impl serde::Serialize for PairsAsDict<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }
}
