//! Tests of the `controls` key: dicts read off the wire (bytes and descriptors), every bad
//! field refused naming `controls[i].FIELD`, the property's form, and a client's dict read
//! back by the daemon's parser.

use std::collections::HashMap;
use std::io::Write;

use zbus::zvariant::{self, Value};

use super::*;
use crate::request::{GenerateRequest, ImageInput};
use crate::wire::keys::{self, parse, to_owned_dict, to_sent_dict};
use crate::wire::raw::through_wire;

/// A 2×2 PNG.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(2, 2, image::Rgb([9, 8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A control dict as a client builds one.
fn dict(fields: Vec<(&'static str, Value<'static>)>) -> HashMap<&'static str, Value<'static>> {
    fields.into_iter().collect()
}

/// `Generate`'s parse of a request with these control dicts, as the daemon reads it.
fn parse_controls(
    dicts: Vec<HashMap<&'static str, Value<'static>>>,
    max_image_bytes: usize,
) -> Result<keys::Incoming, String> {
    through_wire(
        vec![("prompt", Value::from("p")), (KEY, Value::from(dicts))],
        |raw| parse(&raw, max_image_bytes),
    )
}

#[test]
fn control_dicts_are_read_with_their_images_as_bytes_and_as_fds() {
    let image = png();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&image).unwrap();
    let fd = zvariant::Fd::from(OwnedFd::from(file));
    let dicts = vec![
        dict(vec![
            ("controlnet", Value::from("canny")),
            ("image", Value::from(image.clone())),
            ("scale", Value::F64(0.8)),
            ("start", Value::F64(0.1)),
            ("end", Value::F64(0.9)),
        ]),
        dict(vec![
            ("controlnet", Value::from("depth")),
            ("image_fd", Value::from(fd)),
        ]),
    ];
    let mut incoming = parse_controls(dicts, 1 << 20).unwrap();
    let controls = incoming.request.controls.clone().unwrap();
    assert_eq!(controls.len(), 2);
    assert_eq!(controls[0].controlnet.as_deref(), Some("canny"));
    assert_eq!(
        (controls[0].scale, controls[0].start, controls[0].end),
        (Some(0.8), Some(0.1), Some(0.9))
    );
    assert_eq!(controls[1].controlnet.as_deref(), Some("depth"));
    assert_eq!((controls[1].scale, controls[1].end), (None, None));
    assert!(controls.iter().all(|c| c.image.is_none()), "not read yet");
    assert!(incoming.has_pending_images());
    assert_eq!(incoming.image_bytes.len(), 1);
    assert_eq!(incoming.image_bytes[0].0, Slot::Control(0));
    assert_eq!(incoming.image_fds.len(), 1);
    assert_eq!(incoming.image_fds[0].0, Slot::Control(1));
    // What the daemon does off its async threads.
    let bytes = std::mem::take(&mut incoming.image_bytes);
    let fds = std::mem::take(&mut incoming.image_fds);
    images::finish(&mut incoming.request, bytes, fds, 1 << 20).unwrap();
    let controls = incoming.request.controls.unwrap();
    let want = Some(ImageInput::new(image));
    assert_eq!(controls[0].image, want);
    assert_eq!(controls[1].image, want);
    assert_eq!(controls.len(), 2, "the images fill the dicts, add none");
}

#[test]
fn every_bad_field_is_refused_naming_it() {
    let image = png();
    let fd = || {
        let file = tempfile::tempfile().unwrap();
        Value::from(zvariant::Fd::from(OwnedFd::from(file)))
    };
    let ok = || {
        vec![
            ("controlnet", Value::from("canny")),
            ("image", Value::from(image.clone())),
        ]
    };
    let with = |extra: Vec<(&'static str, Value<'static>)>| {
        let mut fields = ok();
        fields.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        fields.extend(extra);
        dict(fields)
    };
    let cases: Vec<(Vec<(&'static str, Value<'static>)>, &str)> = vec![
        (
            vec![("controlnet", Value::U32(1))],
            "'controls[1].controlnet' must have D-Bus type 's', got 'u'",
        ),
        (
            vec![("controlnet", Value::from(image.clone()))],
            "'controls[1].controlnet' must have D-Bus type 's', got 'ay'",
        ),
        (
            vec![("image", Value::from("edges.png"))],
            "'controls[1].image' must have D-Bus type 'ay', got 's'",
        ),
        (
            vec![("image", Value::from(vec![image.clone()]))],
            "'controls[1].image' must have D-Bus type 'ay', got 'aay'",
        ),
        (
            vec![("image_fd", Value::U32(3))],
            "'controls[1].image_fd' must have D-Bus type 'h', got 'u'",
        ),
        (
            vec![("scale", Value::from("0.8"))],
            "'controls[1].scale' must have D-Bus type 'd', got 's'",
        ),
        (
            vec![("start", Value::U32(0))],
            "'controls[1].start' must have D-Bus type 'd', got 'u'",
        ),
        (
            vec![("end", Value::I32(1))],
            "'controls[1].end' must have D-Bus type 'd', got 'i'",
        ),
        (
            vec![("weight", Value::F64(1.0))],
            "'controls[1].weight': unknown field (known: controlnet, image, image_fd, scale, start, end)",
        ),
        (
            vec![("image_fd", fd())],
            "'controls[1].image': give 'image' or 'image_fd', not both",
        ),
    ];
    for (extra, want) in cases {
        let err = parse_controls(vec![dict(ok()), with(extra)], 1 << 20).unwrap_err();
        assert_eq!(err, want);
    }
    // Over the byte limit: refused before the copy, naming the ControlNet's image.
    let err = parse_controls(vec![dict(ok())], image.len() - 1).unwrap_err();
    assert_eq!(
        err,
        format!(
            "'controls[0].image': {} bytes is above the limit of {} (limits.max_image_bytes)",
            image.len(),
            image.len() - 1
        )
    );
    // The key's own type, and the number of dicts.
    let err = through_wire(
        vec![("prompt", Value::from("p")), (KEY, Value::from(dict(ok())))],
        |raw| parse(&raw, 1 << 20),
    )
    .unwrap_err();
    assert_eq!(err, "'controls' must have D-Bus type 'aa{sv}', got 'a{sv}'");
    let err = through_wire(
        vec![
            ("prompt", Value::from("p")),
            (KEY, Value::from(vec!["canny"])),
        ],
        |raw| parse(&raw, 1 << 20),
    )
    .unwrap_err();
    assert_eq!(err, "'controls' must have D-Bus type 'aa{sv}', got 'as'");
    let many = (0..=MAX_CONTROLS).map(|_| dict(ok())).collect();
    let err = parse_controls(many, 1 << 20).unwrap_err();
    assert_eq!(
        err,
        format!(
            "'controls': {} ControlNets is above the limit of {MAX_CONTROLS}",
            MAX_CONTROLS + 1
        )
    );
    // Missing fields are the resolve step's: the wire takes an empty dict.
    let incoming = parse_controls(vec![dict(vec![])], 1 << 20).unwrap();
    assert_eq!(
        incoming.request.controls,
        Some(vec![ControlInput::default()])
    );
}

#[test]
fn a_field_given_twice_is_refused() {
    // As a hostile client can send it (a dict with a repeated key).
    let dict = RawDict(vec![
        ("scale".into(), Field::Basic(Value::F64(1.0))),
        ("scale".into(), Field::Basic(Value::F64(0.5))),
    ]);
    let err = read(&Field::Dicts(vec![RawDict::default(), dict]), 1 << 20).unwrap_err();
    assert_eq!(err, "'controls[1].scale' is given more than once");
}

#[test]
fn the_request_property_shows_control_images_by_their_hash() {
    let image = ImageInput::new(png());
    let req = GenerateRequest {
        prompt: "p".into(),
        controls: Some(vec![ControlInput {
            controlnet: Some("canny".into()),
            image: Some(image.clone()),
            scale: Some(0.8),
            start: Some(0.0),
            end: Some(1.0),
        }]),
        ..Default::default()
    };
    let owned = to_owned_dict(&req);
    let v = &owned[KEY];
    assert_eq!(v.value_signature().to_string(), "aa{sv}");
    let dicts: Vec<HashMap<String, zvariant::OwnedValue>> =
        v.try_clone().unwrap().try_into().unwrap();
    let d = &dicts[0];
    let mut fields: Vec<&str> = d.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["controlnet", "end", "image_sha256", "scale", "start"]
    );
    assert_eq!(<&str>::try_from(&d["controlnet"]).unwrap(), "canny");
    assert_eq!(
        <&str>::try_from(&d["image_sha256"]).unwrap(),
        image.sha256_hex()
    );
    assert_eq!(f64::try_from(&d["scale"]).unwrap(), 0.8);
}

#[test]
fn what_a_client_sends_the_daemon_reads_back() {
    let image = ImageInput::new(png());
    let req = GenerateRequest {
        prompt: "p".into(),
        steps: Some(3),
        controls: Some(vec![
            ControlInput {
                controlnet: Some("canny".into()),
                image: Some(image.clone()),
                scale: Some(0.5),
                start: None,
                end: Some(0.75),
            },
            ControlInput {
                controlnet: Some("depth".into()),
                image: Some(image.clone()),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let ctxt = zvariant::serialized::Context::new_dbus(zvariant::LE, 0);
    let bytes = zvariant::to_bytes(ctxt, &to_sent_dict(&req)).unwrap();
    let (raw, _): (RawDict<'_>, _) = bytes.deserialize().unwrap();
    let mut incoming = parse(&raw, 1 << 20).unwrap();
    let b = std::mem::take(&mut incoming.image_bytes);
    images::finish(&mut incoming.request, b, Vec::new(), 1 << 20).unwrap();
    assert_eq!(incoming.request, req);
}

#[test]
fn the_wire_bound_on_controlnets_is_the_resolve_steps() {
    use crate::request::{Limits, ModelDefaults, ModelRef, RequestError, resolve};
    let b = crate::model::test_bundle();
    let req = GenerateRequest {
        prompt: "p".into(),
        controls: Some(vec![ControlInput::default(); MAX_CONTROLS + 1]),
        ..Default::default()
    };
    let model = ModelRef {
        name: "tiny",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let e = resolve(&req, model, &Limits::default(), || 0).unwrap_err();
    assert!(
        matches!(
            e,
            RequestError::Invalid {
                key: "controls",
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("above the limit of {MAX_CONTROLS}")),
        "{e}"
    );
}
