//! Round trips of the `parameters` text over many requests, and what [`parse`] refuses.

use super::*;
use crate::request::{ImageInput, Limits, ModelDefaults, ModelRef, resolve};

fn png(w: u32, h: u32) -> ImageInput {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    ImageInput::new(out.into_inner())
}

const PROMPTS: &[&str] = &[
    "a cat",
    "",
    "a red circle, on a blue background",
    "line one\nline two\n\nline four",
    "trailing newline\n",
    "  spaces at both ends  ",
    "quotes \"double\" and 'single', \\backslash\\",
    "Steps: 5, Seed: 1, Model: x",
    "mentions Negative prompt: inside a line",
    "unicode: ü 東京 🐱, tabs\there",
    "(weighted:1.2) [less] BREAK next",
];

const NEGATIVES: &[Option<&str>] = &[
    None,
    Some(""),
    Some("blurry, low quality"),
    Some("two\nlines"),
    Some("ends with newline\n"),
    Some("\"quoted\""),
];

const MODELS: &[&str] = &[
    "tiny",
    "/srv/models/my model, v2: \"final\"",
    " padded ",
    "a\nb",
];

/// Every combination over a spread of settings: the parsed request is the resolved one's.
#[test]
fn parse_reads_back_what_format_writes() {
    let b = crate::model::test_bundle();
    let init = png(64, 48);
    let mask = png(64, 48);
    let mut checked = 0;
    for (i, prompt) in PROMPTS.iter().enumerate() {
        for (j, negative) in NEGATIVES.iter().enumerate() {
            let n = i * NEGATIVES.len() + j;
            let model = MODELS[n % MODELS.len()];
            let edit = n % 5;
            let mut req = GenerateRequest {
                prompt: prompt.to_string(),
                negative_prompt: negative.map(str::to_string),
                steps: Some(4 + (n as u32 % 47)),
                guidance_scale: Some([7.5, 1.0, 0.0, -3.25, -12.3456789012345, 0.1 + 0.2][n % 6]),
                guidance_rescale: Some([0.0, 0.7, 1.0 / 3.0][n % 3]),
                seed: Some([0, 42, u64::from(u32::MAX), u64::MAX][n % 4]),
                scheduler: Some(crate::scheduler::NAMES[n % crate::scheduler::NAMES.len()].into()),
                num_images: Some(1 + (n as u32 % 3)),
                prompt_syntax: Some(if n.is_multiple_of(2) {
                    PromptSyntax::Diffusers
                } else {
                    PromptSyntax::A1111
                }),
                ..GenerateRequest::default()
            };
            match edit {
                0 | 1 => {
                    req.init_image = Some(init.clone());
                    req.strength = Some([0.8, 0.923456789012345][edit]);
                }
                2 => {
                    req.init_image = Some(init.clone());
                    req.mask_image = Some(mask.clone());
                }
                _ => {
                    req.width = Some(64 + 8 * (n as u32 % 4));
                    req.height = Some(48);
                    if n % 4 == 1 {
                        req.rng = Some(RngKind::Numpy);
                        req.seed = Some(7);
                    }
                }
            }
            let model_ref = ModelRef {
                name: model,
                bundle: &b,
                defaults: &ModelDefaults::NONE,
                loras: crate::lora::LoraCatalog::none(),
            };
            let Ok(r) = resolve(&req, model_ref, &Limits::unbounded(), || 0) else {
                // A scheduler/step pair the scheduler refuses, or an a1111 prompt that
                // does not parse: not a request anyone could have made.
                continue;
            };
            let provenance = Provenance {
                ort_version: "1.32.0",
                model_hash: Some("0123456789"),
                execution_provider: ["cpu", "cuda", "tensorrt"][n % 3],
                loras: &[],
            };
            let image = r.num_images - 1;
            let text = format(&r, &provenance, image);
            let got = parse(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            let edit = r.edit.is_some();
            // Like the priority, previews do not change the image: not recorded.
            let want = GenerateRequest {
                priority: None,
                preview_every: None,
                preview_method: None,
                init_image: None,
                mask_image: None,
                width: if edit { None } else { Some(r.width as u32) },
                height: if edit { None } else { Some(r.height as u32) },
                ..r.to_request()
            };
            assert_eq!(got.request, want, "{text:?}");
            assert_eq!(got.mode, r.mode());
            assert_eq!(got.size, (r.width as u32, r.height as u32));
            assert_eq!(got.model, model);
            assert_eq!(got.model_hash.as_deref(), Some("0123456789"));
            assert_eq!(
                got.execution_provider.as_deref(),
                Some(provenance.execution_provider)
            );
            assert_eq!(got.onnx_runtime.as_deref(), Some("1.32.0"));
            assert_eq!(got.diffusiond, crate::VERSION);
            assert_eq!(got.batch_pos, image);
            assert_eq!(
                got.init_image_hash,
                r.edit.as_ref().map(|e| e.init.short_hash())
            );
            assert_eq!(
                got.mask_hash,
                r.edit
                    .as_ref()
                    .and_then(|e| e.mask.as_ref().map(ImageInput::short_hash))
            );
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} requests resolved");
}

#[test]
fn the_text_is_a1111s_layout() {
    let b = crate::model::test_bundle();
    let req = GenerateRequest {
        prompt: "a cat".into(),
        seed: Some(5),
        ..GenerateRequest::default()
    };
    let model = ModelRef {
        name: "tiny",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let r = resolve(&req, model, &Limits::default(), || 0).unwrap();
    let p = Provenance {
        ort_version: "1.32.0",
        model_hash: Some("abcdef0123"),
        execution_provider: "cpu",
        loras: &[],
    };
    assert_eq!(
        format(&r, &p, 0),
        format!(
            "a cat\nSteps: 20, Sampler: pndm, CFG scale: 7.5, Guidance rescale: 0, Seed: 5, RNG: torch, Size: 64x64, Mode: txt2img, Prompt syntax: diffusers, Model hash: abcdef0123, Model: tiny, ONNX Runtime: 1.32.0, Execution provider: cpu, diffusiond: {}",
            crate::VERSION
        )
    );
}

#[test]
fn latents_given_are_recorded_by_their_hash() {
    let b = crate::model::test_bundle();
    let req = GenerateRequest {
        prompt: "p".into(),
        seed: Some(1),
        ..GenerateRequest::default()
    };
    let model = ModelRef {
        name: "tiny",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let latents = ndarray::ArrayD::<f32>::ones(ndarray::IxDyn(&[1, 4, 8, 8]));
    let r = resolve(&req, model, &Limits::default(), || 0)
        .unwrap()
        .with_latents(Some(latents.clone()), &b)
        .unwrap();
    let p = Provenance {
        ort_version: "1",
        model_hash: None,
        execution_provider: "cpu",
        loras: &[],
    };
    let got = parse(&format(&r, &p, 0)).unwrap();
    assert_eq!(got.latents_hash, Some(latents_hash(&latents)));
    assert_eq!(got.model_hash, None);
}

#[test]
fn texts_that_are_not_ours_are_refused_naming_what_is_missing() {
    assert_eq!(parse("just a prompt"), Err(InfotextError::NoSettings));
    // AUTOMATIC1111's own text: no `diffusiond` key.
    let a1111 = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: sd15";
    assert_eq!(parse(a1111), Err(InfotextError::Missing("diffusiond")));
    let bad = "p\nSteps: many, Sampler: pndm, CFG scale: 7, Seed: 1, Size: 64x64, Model: m, diffusiond: 0.1.0";
    assert_eq!(
        parse(bad).unwrap_err().to_string(),
        "'Steps': 'many' is not a step count"
    );
    let broken = "p\nSteps: 2, Model: \"unterminated, diffusiond: 0.1.0";
    assert!(matches!(parse(broken), Err(InfotextError::Syntax { .. })));
}

#[test]
fn controlnets_are_recorded_as_sd_webui_controlnet_writes_them() {
    use crate::model::controlnet::ControlNetInfo;
    use crate::request::ControlInput;
    let mut b = crate::model::test_bundle();
    b.unet_residuals = 12;
    b.controlnets = ["canny", "depth"]
        .map(|n| ControlNetInfo {
            name: n.into(),
            dir: format!("/m/controlnet/{n}").into(),
        })
        .to_vec();
    let control = |name: &str, scale, start, end| ControlInput {
        controlnet: Some(name.into()),
        image: Some(png(64, 64)),
        scale,
        start,
        end,
    };
    let req = GenerateRequest {
        prompt: "a cat".into(),
        seed: Some(5),
        controls: Some(vec![
            control("canny", None, None, None),
            control("depth", Some(0.8), Some(0.1), Some(0.75)),
        ]),
        ..GenerateRequest::default()
    };
    let model = ModelRef {
        name: "tiny",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let r = resolve(&req, model, &Limits::default(), || 0).unwrap();
    let p = Provenance {
        ort_version: "1.32.0",
        model_hash: Some("abcdef0123"),
        execution_provider: "cpu",
        loras: &[],
    };
    let text = format(&r, &p, 0);
    assert_eq!(
        text,
        format!(
            "a cat\nSteps: 20, Sampler: pndm, CFG scale: 7.5, Guidance rescale: 0, Seed: 5, RNG: torch, Size: 64x64, Mode: txt2img, Prompt syntax: diffusers, Model hash: abcdef0123, Model: tiny, \
             ControlNet 0: \"Module: none, Model: canny, Weight: 1, Guidance Start: 0, Guidance End: 1\", \
             ControlNet 1: \"Module: none, Model: depth, Weight: 0.8, Guidance Start: 0.1, Guidance End: 0.75\", \
             ONNX Runtime: 1.32.0, Execution provider: cpu, diffusiond: {}",
            crate::VERSION
        )
    );
    // Read back: the ControlNets with their values, without their images.
    let got = parse(&text).unwrap();
    let without_image = |name: &str, scale, start, end| ControlInput {
        image: None,
        ..control(name, Some(scale), Some(start), Some(end))
    };
    assert_eq!(
        got.request.controls,
        Some(vec![
            without_image("canny", 1.0, 0.0, 1.0),
            without_image("depth", 0.8, 0.1, 0.75),
        ])
    );
    assert_eq!(got.model, "tiny");
    assert_eq!(got.diffusiond, crate::VERSION);
    assert_eq!(got.request.control_guess_mode, None);
    // Guess mode: diffusiond's own key after the ControlNets, read back.
    let guessed = GenerateRequest {
        control_guess_mode: Some(true),
        ..req.clone()
    };
    let model = ModelRef {
        name: "tiny",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let g = format(
        &resolve(&guessed, model, &Limits::default(), || 0).unwrap(),
        &p,
        0,
    );
    assert!(
        g.contains("Guidance End: 0.75\", Control guess mode: True, ONNX Runtime"),
        "{g}"
    );
    assert_eq!(parse(&g).unwrap().request.control_guess_mode, Some(true));
    // A text without ControlNets reads as none.
    let plain = text
        .replace(", ControlNet 0: ", ", X0: ")
        .replace(", ControlNet 1: ", ", X1: ");
    assert_eq!(parse(&plain).unwrap().request.controls, None);
    // A gap, and a value that is not a number, are named.
    let gap = text.replace("ControlNet 0: ", "ControlNet 2: ");
    let e = parse(&gap).unwrap_err().to_string();
    assert!(e.starts_with("'ControlNet': "), "{e}");
    assert!(e.contains("ControlNet 0 is missing"), "{e}");
    let bad = text.replace("Weight: 0.8", "Weight: heavy");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.contains("Weight that is not a number"), "{e}");
}
