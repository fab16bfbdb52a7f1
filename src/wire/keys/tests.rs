//! Tests of the key table: round trips, type and name errors, image byte limits, manifest lines.
use super::*;

use crate::wire::raw::through_wire;

/// `parse` of `pairs` as the daemon reads them off the wire.
fn parse_pairs(pairs: Vec<(&str, Value<'_>)>) -> Result<Incoming, String> {
    through_wire(pairs, |raw| parse(&raw, 1 << 20))
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
        strength: Some(0.5),
        init_image: None,
        mask_image: None,
        prompt_syntax: Some(PromptSyntax::A1111),
        a1111_pad_cond_uncond: Some(true),
        preview_every: Some(2),
        preview_method: Some(PreviewMethod::Taesd),
        keep_alive: Some(30.0),
        loras: Some(vec![("style".into(), 0.8), ("char".into(), -1.0)]),
        max_sequence_length: Some(77),
        // Without its image, the property's form reads back as sent.
        controls: Some(vec![crate::request::ControlInput {
            controlnet: Some("canny".into()),
            image: None,
            scale: Some(0.8),
            start: Some(0.25),
            end: Some(1.0),
        }]),
        control_guess_mode: Some(true),
    };
    let owned = to_owned_dict(&req);
    // Every generation key is written but the images (bytes, never in a property);
    // the delivery keys and the image fds are the daemon's to read only.
    assert_eq!(owned.len(), KEYS.len() - 6);
    for (k, v) in &owned {
        let key = KEYS.iter().find(|key| key.name == k).unwrap();
        assert_eq!(v.value_signature().to_string(), key.signature, "{k}");
    }
    let pairs: Vec<(&str, Value<'_>)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), Value::from(v.try_clone().unwrap())))
        .collect();
    let back = parse_pairs(pairs).unwrap();
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
        let err = parse_pairs(pairs).unwrap_err();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    // As the wire carries it: both entries reach the parser.
    let twice = vec![
        ("prompt", Value::from("p")),
        ("steps", Value::U32(201)),
        ("steps", Value::U32(4)),
    ];
    assert_eq!(
        parse_pairs(twice).unwrap_err(),
        "'steps' is given more than once"
    );
    let ok = parse_pairs(vec![
        ("prompt", Value::from("p")),
        ("cancel_on_disconnect", Value::Bool(false)),
    ])
    .unwrap();
    assert!(!ok.cancel_on_disconnect);
}

#[test]
fn images_are_held_to_the_byte_limit_and_other_bytes_are_refused_by_key() {
    let image = vec![1u8; 4096];
    let err = through_wire(
        vec![
            ("prompt", Value::from("p")),
            ("init_image", Value::from(&image[..])),
        ],
        |raw| parse(&raw, 4095),
    )
    .unwrap_err();
    assert_eq!(
        err,
        "'init_image': 4096 bytes is above the limit of 4095 (limits.max_image_bytes)"
    );
    let ok = through_wire(
        vec![
            ("prompt", Value::from("p")),
            ("init_image", Value::from(&image[..])),
        ],
        |raw| parse(&raw, 4096),
    )
    .unwrap();
    assert_eq!(&*ok.image_bytes[0].1, &image[..]);
    assert_eq!(ok.image_bytes[0].0, Slot::Init);
    // Bytes under any other key are not read, and named.
    let err = parse_pairs(vec![
        ("prompt", Value::from("p")),
        ("prompt_syntax", Value::from(&image[..])),
    ])
    .unwrap_err();
    assert_eq!(err, "'prompt_syntax' must have D-Bus type 's', got 'ay'");
    let long = "k".repeat(10_000) + "\u{1b}";
    let err = parse_pairs(vec![("prompt", Value::from("p")), (&long, Value::U32(1))]).unwrap_err();
    assert!(
        err.starts_with(&format!("unknown key '{}...'", "k".repeat(64))),
        "{err}"
    );
    assert!(err.len() < 1000, "{}", err.len());
}

#[test]
fn batch_defaults_refuse_images_by_name() {
    let mut inner = HashMap::new();
    inner.insert("init_image", Value::from(&[1u8, 2][..]));
    let err = through_wire(vec![("defaults", Value::from(inner))], |raw| {
        let Field::Dict(d) = &raw.0[0].1 else {
            panic!("not a dict")
        };
        parse_defaults(d)
    })
    .unwrap_err();
    assert!(
        err.starts_with("'init_image' cannot be a batch default"),
        "{err}"
    );
    let mut inner = HashMap::new();
    inner.insert(
        "controls",
        Value::from(vec![HashMap::from([("controlnet", Value::from("canny"))])]),
    );
    let err = through_wire(vec![("defaults", Value::from(inner))], |raw| {
        let Field::Dict(d) = &raw.0[0].1 else {
            panic!("not a dict")
        };
        parse_defaults(d)
    })
    .unwrap_err();
    assert!(
        err.starts_with("'controls' cannot be a batch default: daemon batches take no images"),
        "{err}"
    );
}

#[test]
fn the_request_property_never_builds_the_images() {
    let req = GenerateRequest {
        prompt: "p".into(),
        init_image: Some(crate::request::ImageInput::new(vec![0u8; 16])),
        ..Default::default()
    };
    let owned = to_owned_dict(&req);
    assert!(!owned.contains_key("init_image"));
    assert!(owned.contains_key("prompt"));
}

#[test]
fn manifest_lines_read_through_the_same_rows() {
    let line: serde_json::Value = serde_json::json!({
        "prompt": "a cat", "steps": 4, "guidance_scale": 5, "seed": 7,
        "rng": "numpy", "name": "cat"
    });
    let (req, prompt, errors) = from_json(line.as_object().unwrap(), &["name"]);
    assert!(prompt);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(req.steps, Some(4));
    assert_eq!(req.guidance_scale, Some(5.0));
    assert_eq!(req.rng, Some(RngKind::Numpy));
    let back = to_json(&req);
    let text = serde_json::Value::Object(back).to_string();
    // serde_json's map keeps keys sorted: the same request always gives the same text.
    assert_eq!(
        text,
        r#"{"guidance_scale":5.0,"prompt":"a cat","rng":"numpy","seed":7,"steps":4}"#
    );
}

#[test]
fn manifest_lines_name_each_bad_key() {
    let line = serde_json::json!({
        "prompt": 3, "steps": -1, "width": 1.5, "seed": "x", "rng": "mt",
        "priority": 2, "colour": "red", "guidance_scale": "high"
    });
    let (_, _, mut errors) = from_json(line.as_object().unwrap(), &["name"]);
    errors.sort();
    let keys: Vec<&str> = errors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "colour",
            "guidance_scale",
            "priority",
            "prompt",
            "rng",
            "seed",
            "steps",
            "width"
        ]
    );
    let message = |k: &str| &errors.iter().find(|(key, _)| key == k).unwrap().1;
    assert_eq!(
        message("steps"),
        "expected an integer from 0 to 4294967295, got -1"
    );
    assert_eq!(message("prompt"), "expected a string, got 3");
    assert!(message("colour").starts_with("unknown key (known: prompt,"));
    assert!(message("colour").ends_with(", name)"));
    // A key both in the table and among the extras is listed once.
    let (_, _, errors) = from_json(line.as_object().unwrap(), &["name", "controls"]);
    let colour = &errors.iter().find(|(k, _)| k == "colour").unwrap().1;
    assert_eq!(colour.matches("controls").count(), 1, "{colour}");
    assert!(message("rng").contains("mt"), "{}", message("rng"));
}
