//! Unit tests of the ControlNet part of the resolve step: defaults, the batch key and the
//! memory count, the step range, and every refusal naming `controls[i].FIELD`.

use super::tests::{bundle, prompt};
use super::*;

/// A bundle with ControlNet inputs and one ControlNet, `canny`.
fn controlnet_bundle() -> ModelBundle {
    let mut b = bundle();
    b.unet_residuals = 4;
    b.controlnets = vec![crate::model::controlnet::ControlNetInfo {
        name: "canny".into(),
        dir: "/test-model/controlnet/canny".into(),
    }];
    b
}

fn png(w: usize, h: usize) -> ImageInput {
    let rgb = ndarray::Array3::<u8>::zeros((h, w, 3));
    ImageInput::new(crate::pipeline::image::encode_png(&rgb, "").unwrap())
}

fn control(name: &str) -> crate::request::ControlInput {
    crate::request::ControlInput {
        controlnet: Some(name.into()),
        image: Some(png(64, 64)),
        ..Default::default()
    }
}

fn run_on(
    b: &ModelBundle,
    req: GenerateRequest,
    limits: &Limits,
) -> Result<ResolvedRequest, RequestError> {
    resolve(
        &req,
        ModelRef {
            name: "tiny",
            bundle: b,
            defaults: &ModelDefaults::NONE,
            loras: crate::lora::LoraCatalog::none(),
        },
        limits,
        || 99,
    )
}

#[test]
fn controls_get_their_defaults_and_go_into_the_batch_key() {
    let b = controlnet_bundle();
    let with = |c: crate::request::ControlInput| GenerateRequest {
        controls: Some(vec![c]),
        ..prompt()
    };
    let r = run_on(&b, with(control("canny")), &Limits::default()).unwrap();
    assert_eq!(r.controls.len(), 1);
    let c = &r.controls[0];
    assert_eq!((c.scale, c.start, c.end), (1.0, 0.0, 1.0));
    assert!(!r.control_guess_mode);
    let plain = run_on(&b, prompt(), &Limits::default()).unwrap();
    assert_ne!(r.batch_key(), plain.batch_key());
    let other_scale = run_on(
        &b,
        with(crate::request::ControlInput {
            scale: Some(0.5),
            ..control("canny")
        }),
        &Limits::default(),
    )
    .unwrap();
    assert_ne!(r.batch_key(), other_scale.batch_key());
    let again = run_on(&b, with(control("canny")), &Limits::default()).unwrap();
    assert_eq!(r.batch_key(), again.batch_key());
    // Each ControlNet counts the images once more in the memory estimate.
    assert_eq!(r.memory_images(), 2 * plain.memory_images());
    // The Request property gives the values back.
    let back = r.to_request().controls.unwrap();
    assert_eq!(back[0].scale, Some(1.0));
    // ControlNet steps: off before start and after end, as diffusers' controlnet_keep.
    let window = Control {
        start: 0.2,
        end: 0.8,
        ..c.clone()
    };
    let on: Vec<bool> = (0..10).map(|i| window.active_at(i, 10)).collect();
    assert_eq!(
        on,
        [
            false, false, true, true, true, true, true, true, false, false
        ]
    );
}

#[test]
fn every_bad_control_field_is_refused_by_name() {
    let b = controlnet_bundle();
    let limits = Limits::default();
    let with = |cs: Vec<crate::request::ControlInput>| GenerateRequest {
        controls: Some(cs),
        ..prompt()
    };
    let err =
        |b: &ModelBundle, req: GenerateRequest| run_on(b, req, &limits).unwrap_err().to_string();
    let field = |f: fn(&mut crate::request::ControlInput)| {
        let mut c = control("canny");
        f(&mut c);
        with(vec![control("canny"), c])
    };
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            field(|c| c.controlnet = None),
            "'controls[1].controlnet': missing",
        ),
        (
            field(|c| c.controlnet = Some("depth".into())),
            "'controls[1].controlnet': model 'tiny' has no ControlNet 'depth' (it has: canny)",
        ),
        (field(|c| c.image = None), "'controls[1].image': missing"),
        (
            field(|c| c.image = Some(ImageInput::new(b"not an image".to_vec()))),
            "'controls[1].image': not a PNG or JPEG",
        ),
        (
            field(|c| c.scale = Some(2.5)),
            "'controls[1].scale': 2.5 is not between 0 and 2",
        ),
        (
            field(|c| c.scale = Some(f64::NAN)),
            "'controls[1].scale': NaN is not between 0 and 2",
        ),
        (
            field(|c| c.start = Some(-0.1)),
            "'controls[1].start': -0.1 is not between 0 and 1",
        ),
        (
            field(|c| c.end = Some(1.5)),
            "'controls[1].end': 1.5 is not between 0 and 1",
        ),
        (
            field(|c| {
                c.start = Some(0.5);
                c.end = Some(0.5);
            }),
            "'controls[1].end': 0.5 is not after start 0.5",
        ),
        (
            with(vec![control("canny"); 5]),
            "'controls': 5 ControlNets is above the limit of 4",
        ),
        (
            GenerateRequest {
                control_guess_mode: Some(true),
                ..prompt()
            },
            "'control_guess_mode': applies only with controls",
        ),
        (
            GenerateRequest {
                prompt_syntax: Some(PromptSyntax::A1111),
                ..with(vec![control("canny")])
            },
            "'controls': ControlNets run with prompt_syntax 'diffusers' only",
        ),
        (
            GenerateRequest {
                init_image: Some(png(64, 64)),
                mask_image: Some(png(64, 64)),
                ..with(vec![control("canny")])
            },
            "'controls': inpainting with a ControlNet is not supported",
        ),
    ];
    for (req, want) in cases {
        let got = err(&b, req);
        assert!(got.starts_with(want), "got: {got}\nwant: {want}");
    }
    // An image over the limits, by its header.
    let small = Limits {
        max_width: 100,
        ..Limits::default()
    };
    let big = crate::request::ControlInput {
        image: Some(png(128, 128)),
        ..control("canny")
    };
    let got = run_on(&b, with(vec![big]), &small).unwrap_err().to_string();
    assert!(
        got.starts_with("'controls[0].image': 128x128 is above the limit"),
        "{got}"
    );
    // A stock export: says how to export one.
    let got = err(&bundle(), with(vec![control("canny")]));
    assert!(
        got.starts_with("'controls[0].controlnet': model 'tiny' has a UNet without ControlNet inputs; export the model with scripts/export-model"),
        "{got}"
    );
}
