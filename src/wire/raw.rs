//! Request dicts (`a{sv}`) as the daemon reads them off the wire, decoded into compact
//! values before any key is looked at.
//!
//! zvariant's generic [`Value`] turns an array into one `Value` per element: a 30 MiB
//! `ay` becomes about 30 million enum values (over a gigabyte), before the key is known
//! or a size limit is checked. [`RawDict`] decodes each entry by its signature instead:
//!
//! * basic types (numbers, strings, fds) as a [`Value`]: their size is their wire size;
//! * `ay` under a key that carries bytes ([`BYTE_KEYS`]) as a slice borrowed from the
//!   message, copied only once the key's size limit has passed;
//! * `ah` as the list of fds (a message carries a handful; the bus bounds them);
//! * `a{sv}` (batch `defaults`) as a nested [`RawDict`], read by the same rules;
//! * `aa{sv}` (`controls`) as a list of such dicts (a control dict's `image` is one of
//!   [`BYTE_KEYS`]);
//! * `a(sd)` (`loras`) as its (string, double) pairs;
//! * a variant inside a variant as what it holds;
//! * anything else (an unknown key's `ay`, an `as`, a struct) is skipped without being
//!   built, and only its signature is kept for the error message.
//!
//! Written by hand because zvariant's `Value` has no way to decode by signature into
//! compact forms; the visitor follows zvariant's own variant encoding (a signature, then
//! the value), as `Value`'s `Deserialize` reads it.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use zbus::zvariant::{self, Fd, OwnedFd, Signature, Value};

/// Keys whose `ay` values are kept (the images of `Generate`, and a ControlNet's control
/// image, `image` in its dict). Bytes under any other key are never copied; kept ones are
/// borrowed from the message until their key's row has checked their size.
pub const BYTE_KEYS: &[&str] = &["init_image", "mask_image", "image"];

/// An `a{sv}` as sent, every entry in order: a key sent twice stays twice, so it can be
/// refused (a map would keep one of them silently). Values borrow from the message.
#[derive(Debug, Default)]
pub struct RawDict<'m>(pub Vec<(String, Field<'m>)>);

/// One value of a [`RawDict`], decoded by its signature (module docs).
#[derive(Debug)]
pub enum Field<'m> {
    /// A basic-type value (`y b n q i u x t d s o g h`).
    Basic(Value<'m>),
    /// An `ay` under one of [`BYTE_KEYS`], borrowed from the message.
    Bytes(&'m [u8]),
    /// An `ah`.
    Fds(Vec<OwnedFd>),
    /// An `a{sv}`.
    Dict(RawDict<'m>),
    /// An `aa{sv}` (`controls`).
    Dicts(Vec<RawDict<'m>>),
    /// An `a(sd)`: (name, number) pairs (`loras`).
    Pairs(Vec<(String, f64)>),
    /// Any other value: not decoded; its D-Bus signature.
    Skipped(String),
}

impl Field<'_> {
    /// The D-Bus signature of what was sent.
    pub fn signature(&self) -> String {
        match self {
            Field::Basic(v) => v.value_signature().to_string(),
            Field::Bytes(_) => "ay".into(),
            Field::Fds(_) => "ah".into(),
            Field::Dict(_) => "a{sv}".into(),
            Field::Dicts(_) => "aa{sv}".into(),
            Field::Pairs(_) => "a(sd)".into(),
            Field::Skipped(s) => s.clone(),
        }
    }

    /// The basic value, if this is one.
    pub fn basic(&self) -> Option<&Value<'_>> {
        match self {
            Field::Basic(v) => Some(v),
            _ => None,
        }
    }
}

impl zvariant::Type for RawDict<'_> {
    const SIGNATURE: &'static Signature =
        <std::collections::HashMap<String, zvariant::OwnedValue> as zvariant::Type>::SIGNATURE;
}

impl<'de: 'm, 'm> de::Deserialize<'de> for RawDict<'m> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<'m>(PhantomData<&'m ()>);
        impl<'de: 'm, 'm> Visitor<'de> for Entries<'m> {
            type Value = RawDict<'m>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an a{sv} dictionary")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawDict<'m>, A::Error> {
                // The size hint is the caller's word: do not reserve from it.
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let bytes = BYTE_KEYS.contains(&key.as_str());
                    let value = map.next_value_seed(FieldSeed {
                        bytes,
                        phantom: PhantomData,
                    })?;
                    entries.push((key, value));
                }
                Ok(RawDict(entries))
            }
        }
        d.deserialize_map(Entries(PhantomData))
    }
}

/// Reads one variant into a [`Field`]; `bytes`: whether an `ay` here is kept.
struct FieldSeed<'m> {
    bytes: bool,
    phantom: PhantomData<&'m ()>,
}

impl<'de: 'm, 'm> DeserializeSeed<'de> for FieldSeed<'m> {
    type Value = Field<'m>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field<'m>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de: 'm, 'm> Visitor<'de> for FieldSeed<'m> {
    type Value = Field<'m>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a variant")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'m>, A::Error> {
        let signature = seq
            .next_element::<Signature>()?
            .ok_or_else(|| de::Error::custom("a variant without a signature"))?;
        let sig = signature.to_string();
        let missing = || de::Error::custom("a variant without a value");
        macro_rules! basic {
            ($ty:ty, $variant:ident) => {
                Field::Basic(Value::$variant(
                    seq.next_element::<$ty>()?.ok_or_else(missing)?,
                ))
            };
        }
        let field = match sig.as_str() {
            "y" => basic!(u8, U8),
            "b" => basic!(bool, Bool),
            "n" => basic!(i16, I16),
            "q" => basic!(u16, U16),
            "i" => basic!(i32, I32),
            "u" => basic!(u32, U32),
            "x" => basic!(i64, I64),
            "t" => basic!(u64, U64),
            "d" => basic!(f64, F64),
            "s" => Field::Basic(Value::from(
                seq.next_element::<&'de str>()?.ok_or_else(missing)?,
            )),
            "o" => Field::Basic(Value::ObjectPath(
                seq.next_element::<zvariant::ObjectPath<'de>>()?
                    .ok_or_else(missing)?,
            )),
            "g" => Field::Basic(Value::Signature(
                seq.next_element::<Signature>()?.ok_or_else(missing)?,
            )),
            "h" => Field::Basic(Value::Fd(
                seq.next_element::<Fd<'de>>()?.ok_or_else(missing)?,
            )),
            "v" => seq
                .next_element_seed(FieldSeed {
                    bytes: self.bytes,
                    phantom: PhantomData,
                })?
                .ok_or_else(missing)?,
            "ay" => {
                // Borrowed either way: skipping a byte array costs nothing.
                let bytes = seq.next_element::<&'de [u8]>()?.ok_or_else(missing)?;
                if self.bytes {
                    Field::Bytes(bytes)
                } else {
                    Field::Skipped(sig)
                }
            }
            "ah" => Field::Fds(seq.next_element::<Vec<OwnedFd>>()?.ok_or_else(missing)?),
            "a{sv}" => Field::Dict(seq.next_element::<RawDict<'m>>()?.ok_or_else(missing)?),
            "aa{sv}" => Field::Dicts(
                seq.next_element::<Vec<RawDict<'m>>>()?
                    .ok_or_else(missing)?,
            ),
            "a(sd)" => Field::Pairs(
                seq.next_element::<Vec<(String, f64)>>()?
                    .ok_or_else(missing)?,
            ),
            _ => {
                seq.next_element::<IgnoredAny>()?.ok_or_else(missing)?;
                Field::Skipped(sig)
            }
        };
        Ok(field)
    }
}

/// A value a client sends in an `a{sv}`: a [`Value`], or bytes written as an `ay` variant
/// straight from the slice (a `Value` would hold one `Value` per byte: 1.5 GB of client
/// memory for a 30 MB image).
#[derive(Debug)]
pub enum Sent<'a> {
    /// Any value.
    Value(Value<'a>),
    /// An `ay`.
    Bytes(&'a [u8]),
    /// An `a{sv}` of such values.
    Dict(SentDict<'a>),
    /// An `aa{sv}` of such values (`controls`).
    Dicts(Vec<SentDict<'a>>),
}

/// The `a{sv}` a client sends.
pub type SentDict<'a> = std::collections::HashMap<&'static str, Sent<'a>>;

impl zvariant::Type for Sent<'_> {
    const SIGNATURE: &'static Signature = &Signature::Variant;
}

impl serde::Serialize for Sent<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        /// Bytes serialized as one byte string (an `ay` under the D-Bus serializer).
        struct ByteString<'a>(&'a [u8]);
        impl serde::Serialize for ByteString<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        match self {
            Sent::Value(v) => v.serialize(s),
            // zvariant's own variant encoding (as `Value` writes it): the signature, then
            // the value under it.
            Sent::Bytes(b) => {
                let mut st = s.serialize_struct("Variant", 2)?;
                st.serialize_field("signature", &Signature::Array(Signature::U8.into()))?;
                st.serialize_field("value", &ByteString(b))?;
                st.end()
            }
            Sent::Dict(d) => {
                let mut st = s.serialize_struct("Variant", 2)?;
                st.serialize_field("signature", <SentDict<'_> as zvariant::Type>::SIGNATURE)?;
                st.serialize_field("value", d)?;
                st.end()
            }
            Sent::Dicts(d) => {
                let mut st = s.serialize_struct("Variant", 2)?;
                st.serialize_field(
                    "signature",
                    <Vec<SentDict<'_>> as zvariant::Type>::SIGNATURE,
                )?;
                st.serialize_field("value", d)?;
                st.end()
            }
        }
    }
}

/// Serializes `pairs` as an `a{sv}` the way a client sends it (repeats kept) and reads it
/// back through [`RawDict`]: the daemon's exact path, for tests. `f` sees the dict.
#[cfg(test)]
pub fn through_wire<R>(pairs: Vec<(&str, Value<'_>)>, f: impl FnOnce(RawDict<'_>) -> R) -> R {
    let ctxt = zvariant::serialized::Context::new_dbus(zvariant::LE, 0);
    let bytes = zvariant::to_bytes(ctxt, &PairsAsDict(pairs)).expect("serializable pairs");
    let (read, _): (RawDict<'_>, _) = bytes.deserialize().expect("an a{sv}");
    f(read)
}

/// Pairs written as an `a{sv}` with repeats, as a hostile client can send them.
#[cfg(test)]
pub struct PairsAsDict<'a>(pub Vec<(&'a str, Value<'a>)>);

#[cfg(test)]
impl zvariant::Type for PairsAsDict<'_> {
    const SIGNATURE: &'static Signature =
        <std::collections::HashMap<String, zvariant::OwnedValue> as zvariant::Type>::SIGNATURE;
}

#[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_signature_is_decoded_compactly() {
        let big = vec![7u8; 1 << 20];
        let pairs = vec![
            ("prompt", Value::from("a cat")),
            ("steps", Value::U32(4)),
            ("seed", Value::U64(9)),
            ("init_image", Value::from(&big[..])),
            ("unknown", Value::from(&big[..])),
            ("words", Value::from(vec!["a", "b"])),
            ("nested", Value::Value(Box::new(Value::U32(3)))),
        ];
        through_wire(pairs, |raw| {
            let get = |k: &str| &raw.0.iter().find(|(n, _)| n == k).unwrap().1;
            assert!(matches!(get("prompt"), Field::Basic(Value::Str(s)) if s.as_str() == "a cat"));
            assert!(matches!(get("steps"), Field::Basic(Value::U32(4))));
            assert!(matches!(get("seed"), Field::Basic(Value::U64(9))));
            assert!(matches!(get("init_image"), Field::Bytes(b) if b.len() == 1 << 20));
            assert!(matches!(get("unknown"), Field::Skipped(s) if s == "ay"));
            assert!(matches!(get("words"), Field::Skipped(s) if s == "as"));
            // A variant in a variant is read as what it holds.
            assert!(matches!(get("nested"), Field::Basic(Value::U32(3))));
            assert_eq!(get("words").signature(), "as");
            assert_eq!(get("init_image").signature(), "ay");
        });
    }

    #[test]
    fn sent_bytes_are_the_same_message_as_a_value_array() {
        let image: Vec<u8> = (0..=255).cycle().take(100_003).collect();
        let ctxt = zvariant::serialized::Context::new_dbus(zvariant::LE, 0);
        let mut sent = SentDict::new();
        sent.insert("init_image", Sent::Bytes(&image));
        sent.insert("prompt", Sent::Value(Value::from("p")));
        let a = zvariant::to_bytes(ctxt, &sent).unwrap();
        // One entry each (a hash map's order, and so the padding, may differ): the very
        // same bytes.
        let one = |d: SentDict<'_>| zvariant::to_bytes(ctxt, &d).unwrap().to_vec();
        let mut only_image = SentDict::new();
        only_image.insert("init_image", Sent::Bytes(&image));
        let mut as_value = SentDict::new();
        as_value.insert("init_image", Sent::Value(Value::from(&image[..])));
        assert_eq!(one(only_image), one(as_value));
        let (read, _): (RawDict<'_>, _) = a.deserialize().unwrap();
        let get = |k: &str| &read.0.iter().find(|(n, _)| n == k).unwrap().1;
        assert!(matches!(get("init_image"), Field::Bytes(b) if *b == &image[..]));
        assert!(matches!(get("prompt"), Field::Basic(Value::Str(s)) if s.as_str() == "p"));
        // Nested: a dict of byte strings reads as the same dict.
        let mut inner = SentDict::new();
        inner.insert("init_image", Sent::Bytes(&image));
        let mut outer = SentDict::new();
        outer.insert("defaults", Sent::Dict(inner));
        let c = zvariant::to_bytes(ctxt, &outer).unwrap();
        let (read, _): (RawDict<'_>, _) = c.deserialize().unwrap();
        let Field::Dict(d) = &read.0[0].1 else {
            panic!("{:?}", read.0[0].1)
        };
        assert!(matches!(&d.0[0].1, Field::Bytes(b) if *b == &image[..]));
    }

    #[test]
    fn nested_dicts_follow_the_same_rules() {
        let mut inner = std::collections::HashMap::new();
        inner.insert("steps", Value::U32(3));
        inner.insert("init_image", Value::from(&[1u8, 2, 3][..]));
        inner.insert("junk", Value::from(&[0u8; 64][..]));
        through_wire(vec![("defaults", Value::from(inner))], |raw| {
            let Field::Dict(d) = &raw.0[0].1 else {
                panic!("{:?}", raw.0[0].1)
            };
            assert_eq!(d.0.len(), 3);
            for (k, v) in &d.0 {
                match k.as_str() {
                    "steps" => assert!(matches!(v, Field::Basic(Value::U32(3)))),
                    "init_image" => assert!(matches!(v, Field::Bytes([1, 2, 3]))),
                    "junk" => assert!(matches!(v, Field::Skipped(_))),
                    other => panic!("{other}"),
                }
            }
        });
    }
}
