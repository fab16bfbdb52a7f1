//! Unit tests of the resolve step: defaults, every refusal naming its key, model defaults
//! and limits, the memory budget, latents, PNG metadata.

use super::*;

pub(super) fn bundle() -> ModelBundle {
    crate::model::test_bundle()
}

fn run(req: GenerateRequest, limits: &Limits) -> Result<ResolvedRequest, RequestError> {
    let b = bundle();
    resolve(
        &req,
        ModelRef {
            name: "tiny",
            bundle: &b,
            defaults: &ModelDefaults::NONE,
            loras: crate::lora::LoraCatalog::none(),
        },
        limits,
        || 99,
    )
}

pub(super) fn prompt() -> GenerateRequest {
    GenerateRequest {
        prompt: "a cat".into(),
        ..Default::default()
    }
}

#[test]
fn defaults_come_from_the_model_and_the_defaults_table() {
    let r = run(prompt(), &Limits::default()).unwrap();
    assert_eq!((r.width, r.height), (64, 64));
    assert_eq!(r.scheduler, "pndm");
    assert_eq!(r.steps, 20);
    assert_eq!(r.seed, 99);
    assert_eq!(r.guidance_scale, 7.5);
    assert_eq!((r.num_images, r.priority), (1, 0));
    assert_eq!(r.rng, RngKind::Torch);
    assert_eq!(r.model, "tiny");
}

#[test]
fn given_values_win() {
    let req = GenerateRequest {
        width: Some(96),
        height: Some(32),
        steps: Some(4),
        seed: Some(7),
        scheduler: Some("ddim".into()),
        rng: Some(RngKind::Numpy),
        num_images: Some(2),
        priority: Some(-3),
        ..prompt()
    };
    let r = run(req, &Limits::default()).unwrap();
    assert_eq!((r.width, r.height, r.steps, r.seed), (96, 32, 4, 7));
    assert_eq!((r.scheduler, r.num_images, r.priority), ("ddim", 2, -3));
    let keys = r.to_request();
    assert_eq!(keys.scheduler.as_deref(), Some("ddim"));
    assert_eq!(keys.model.as_deref(), Some("tiny"));
}

#[test]
fn a_size_suggestion_is_within_the_limits() {
    let e = run(
        GenerateRequest {
            width: Some(u32::MAX),
            ..prompt()
        },
        &Limits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("'width': 4294967295 is not a multiple of 8"),
        "{e}"
    );
    assert!(
        !e.contains("4294967296") && !e.contains("4294967288"),
        "{e}"
    );
    // The model's own limit is 64 x 8 = 512 here (the global one 2048).
    assert!(e.contains("(e.g. 512, the largest allowed)"), "{e}");
    let e = run(
        GenerateRequest {
            height: Some(70),
            ..prompt()
        },
        &Limits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("(e.g. 64 or 72)"), "{e}");
}

#[test]
fn caller_text_in_errors_is_cut_short() {
    let long = "s".repeat(100_000);
    let e = run(
        GenerateRequest {
            scheduler: Some(long.clone()),
            ..prompt()
        },
        &Limits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("'scheduler': unknown scheduler 'sss"), "{e}");
    assert!(e.len() < 400, "{} bytes", e.len());
    let e = long.parse::<PromptSyntax>().unwrap_err().to_string();
    assert!(e.len() < 200, "{} bytes", e.len());
    let weight = format!("(a:1.{}.2)", "1".repeat(100_000));
    let e = prompt_syntax::parse_attention(&weight)
        .unwrap_err()
        .to_string();
    assert!(e.len() < 400, "{} bytes", e.len());
}

#[test]
fn bad_values_name_the_key() {
    let limits = Limits {
        max_steps: 60,
        max_prompt_bytes: 10,
        ..Limits::default()
    };
    let cases: Vec<(GenerateRequest, &str, &str)> = vec![
        (
            GenerateRequest {
                width: Some(65),
                ..prompt()
            },
            "width",
            "not a multiple of 8",
        ),
        (
            GenerateRequest {
                height: Some(0),
                ..prompt()
            },
            "height",
            "at least 1",
        ),
        (
            GenerateRequest {
                width: Some(4096),
                ..prompt()
            },
            "width",
            "above the limit",
        ),
        (
            GenerateRequest {
                steps: Some(0),
                ..prompt()
            },
            "steps",
            "at least 1",
        ),
        (
            GenerateRequest {
                steps: Some(61),
                ..prompt()
            },
            "steps",
            "above the limit of 60",
        ),
        (
            GenerateRequest {
                scheduler: Some("lcm".into()),
                steps: Some(55),
                ..prompt()
            },
            "steps",
            "cannot run 55 steps",
        ),
        (
            GenerateRequest {
                num_images: Some(0),
                ..prompt()
            },
            "num_images",
            "at least 1",
        ),
        (
            GenerateRequest {
                num_images: Some(17),
                ..prompt()
            },
            "num_images",
            "above",
        ),
        (
            GenerateRequest {
                guidance_scale: Some(f64::INFINITY),
                ..prompt()
            },
            "guidance_scale",
            "not finite",
        ),
        (
            GenerateRequest {
                guidance_scale: Some(-1e20),
                ..prompt()
            },
            "guidance_scale",
            "-1e20 is beyond the limit of 100",
        ),
        (
            GenerateRequest {
                guidance_rescale: Some(1.5),
                ..prompt()
            },
            "guidance_rescale",
            "between 0 and 1",
        ),
        (
            GenerateRequest {
                rng: Some(RngKind::Numpy),
                seed: Some(1 << 40),
                ..prompt()
            },
            "seed",
            "2^32-1",
        ),
        (
            GenerateRequest {
                scheduler: Some("warp".into()),
                ..prompt()
            },
            "scheduler",
            "unknown scheduler 'warp'",
        ),
        (
            GenerateRequest {
                prompt: "x".repeat(11),
                ..prompt()
            },
            "prompt",
            "above the limit",
        ),
    ];
    for (req, key, needle) in cases {
        let err = run(req.clone(), &limits).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, RequestError::Invalid { key: k, .. } if *k == key),
            "{req:?}: {err:?}"
        );
        assert!(text.starts_with(&format!("'{key}': ")), "{text}");
        assert!(text.contains(needle), "{req:?}: {text}");
    }
}

#[test]
fn an_unknown_model_scheduler_must_be_named() {
    let mut b = bundle();
    b.default_scheduler = None;
    let err = resolve(
        &prompt(),
        ModelRef {
            name: "m",
            bundle: &b,
            defaults: &ModelDefaults::NONE,
            loras: crate::lora::LoraCatalog::none(),
        },
        &Limits::default(),
        || 1,
    )
    .unwrap_err();
    assert!(err.to_string().contains("name one"), "{err}");
}

#[test]
fn latents_must_fit_the_resolved_shape() {
    let b = bundle();
    let r = run(prompt(), &Limits::default()).unwrap();
    let ok = ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 4, 8, 8]));
    assert!(r.clone().with_latents(Some(ok), &b).is_ok());
    let bad = ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 4, 8, 9]));
    let err = r.with_latents(Some(bad), &b).unwrap_err();
    assert!(
        err.to_string().starts_with("'latents': expected shape"),
        "{err}"
    );
}

#[test]
fn png_parameters_name_every_setting() {
    let r = run(
        GenerateRequest {
            seed: Some(5),
            ..prompt()
        },
        &Limits::default(),
    )
    .unwrap();
    let provenance = crate::request::Provenance {
        ort_version: "1.32.0",
        model_hash: Some("0123456789"),
        execution_provider: "cpu",
        loras: &[],
    };
    let text = r.png_parameters(&provenance, 0);
    assert!(
        text.starts_with("a cat\nSteps: 20, Sampler: pndm"),
        "{text}"
    );
    assert!(text.contains(
        "Seed: 5, RNG: torch, Size: 64x64, Mode: txt2img, Prompt syntax: diffusers, Model hash: 0123456789, Model: tiny, ONNX Runtime: 1.32.0, Execution provider: cpu"
    ));
}

#[test]
fn configured_defaults_come_between_the_request_and_the_built_in_ones() {
    let b = bundle();
    let configured = ModelDefaults {
        steps: Some(12),
        guidance_scale: Some(5.0),
        scheduler: Some("ddim".into()),
        width: Some(96),
        height: None,
        max_width: None,
        max_height: None,
        a1111_pad_cond_uncond: Some(true),
        preview_decoder: None,
        lora_dirs: Vec::new(),
    };
    let model = ModelRef {
        name: "demo",
        bundle: &b,
        defaults: &configured,
        loras: crate::lora::LoraCatalog::none(),
    };
    let r = resolve(&prompt(), model, &Limits::default(), || 1).unwrap();
    assert_eq!((r.steps, r.guidance_scale, r.scheduler), (12, 5.0, "ddim"));
    assert_eq!((r.width, r.height), (96, 64));
    assert!(r.a1111_pad_cond_uncond);
    let req = GenerateRequest {
        a1111_pad_cond_uncond: Some(false),
        steps: Some(3),
        guidance_scale: Some(1.0),
        scheduler: Some("euler".into()),
        width: Some(32),
        ..prompt()
    };
    let r = resolve(&req, model, &Limits::default(), || 1).unwrap();
    assert_eq!((r.steps, r.guidance_scale, r.scheduler), (3, 1.0, "euler"));
    assert_eq!((r.width, r.height), (32, 64));
    assert!(!r.a1111_pad_cond_uncond);
}

#[test]
fn floats_are_written_short() {
    assert_eq!(short_float(7.5), "7.5");
    assert_eq!(short_float(5.0), "5");
    assert_eq!(short_float(0.7), "0.7");
    assert_eq!(short_float(1e20), "1e20");
    assert_eq!(short_float(3e38), "3e38");
    assert_eq!(short_float(1.0 / 3.0), "3.333333333333333e-1");
}

#[test]
fn a_request_over_the_memory_budget_is_refused_naming_what_fits() {
    let b = bundle();
    let model = ModelRef {
        name: "m",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let budget = b.memory.peak(256, 256, 1, true);
    let limits = Limits {
        memory_budget: Some(budget),
        ..Limits::default()
    };
    let at = |side: u32, images: u32| GenerateRequest {
        width: Some(side),
        height: Some(side),
        num_images: Some(images),
        ..prompt()
    };
    assert!(resolve(&at(256, 1), model, &limits, || 1).is_ok());
    let err = resolve(&at(512, 1), model, &limits, || 1).unwrap_err();
    assert!(matches!(err, RequestError::TooLarge { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("'width*height': 512x512 with 1 image(s) needs about"),
        "{text}"
    );
    assert!(
        text.contains("at most 256x256 fits for 1 image(s)"),
        "{text}"
    );
    // Without guidance (half the UNet rows) no more is needed.
    assert!(b.memory.peak(512, 512, 1, false) <= b.memory.peak(512, 512, 1, true));
    // A budget of 0 turns the check off.
    let off = Limits {
        memory_budget: Some(0),
        ..Limits::default()
    };
    assert!(resolve(&at(512, 1), model, &off, || 1).is_ok());
}

#[test]
fn each_model_has_a_size_limit_from_its_native_size_that_the_config_can_raise() {
    let b = bundle(); // native 64: limit 512
    let at = |side: u32| GenerateRequest {
        width: Some(side),
        ..prompt()
    };
    let none = ModelDefaults::NONE;
    let model = |defaults| ModelRef {
        name: "m",
        bundle: &b,
        defaults,
        loras: crate::lora::LoraCatalog::none(),
    };
    assert!(resolve(&at(512), model(&none), &Limits::default(), || 1).is_ok());
    let err = resolve(&at(520), model(&none), &Limits::default(), || 1).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("'width': 520 is above this model's limit of 512 (8 x its native 64"),
        "{err}"
    );
    let raised = ModelDefaults {
        max_width: Some(1024),
        ..ModelDefaults::default()
    };
    assert!(resolve(&at(1024), model(&raised), &Limits::default(), || 1).is_ok());
    // The global limits still cap it.
    let err = resolve(&at(4096), model(&raised), &Limits::default(), || 1).unwrap_err();
    assert!(err.to_string().contains("above the limit of 2048"), "{err}");
}

#[test]
fn composable_a1111_prompts_are_checked_before_they_queue() {
    let a1111 = |text: &str, guidance: f64, rescale: f64| GenerateRequest {
        prompt: text.into(),
        prompt_syntax: Some(PromptSyntax::A1111),
        guidance_scale: Some(guidance),
        guidance_rescale: Some(rescale),
        ..prompt()
    };
    let r = run(a1111("a cat AND a dog :1.2", 7.5, 0.0), &Limits::default()).unwrap();
    assert_eq!(r.a1111_parts, 2);
    // Two parts and the negative: three UNet rows per image, 1.5 images of guided rows
    // (rounded up).
    assert_eq!(memory_images(2, r.a1111_parts, 0), 3);
    assert_eq!(memory_images(2, r.a1111_parts, 1), 6);
    assert_eq!(r.memory_images(), 2);
    let e = run(a1111("a cat AND a dog", 1.0, 0.0), &Limits::default()).unwrap_err();
    assert!(
        e.to_string().starts_with("'prompt': AND, or a weight ':N'"),
        "{e}"
    );
    let e = run(a1111("a cat :1.3", 7.5, 0.7), &Limits::default()).unwrap_err();
    assert!(e.to_string().starts_with("'guidance_rescale': "), "{e}");
    // Without composition, rescale and no guidance are fine.
    run(a1111("a [cat:dog:0.5]", 1.0, 0.7), &Limits::default()).unwrap();
    let many = vec!["x"; a1111::MAX_PARTS + 1].join(" AND ");
    let e = run(a1111(&many, 7.5, 0.0), &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("AND parts; at most 32"), "{e}");
    // Alternations multiply: 6 x 6 distinct texts over 40 steps.
    let texts = "[a|b|c|d|e|f] [g|h|i|j|k|l|m]";
    let req = GenerateRequest {
        steps: Some(42),
        ..a1111(texts, 7.5, 0.0)
    };
    let e = run(req, &Limits::default()).unwrap_err();
    assert!(
        e.to_string().contains("distinct texts over 42 steps"),
        "{e}"
    );
}

#[test]
fn previews_are_off_by_default_and_taesd_needs_a_tiny_decoder() {
    use crate::request::PreviewMethod;
    let r = run(prompt(), &Limits::default()).unwrap();
    assert_eq!(
        (r.preview_every, r.preview_method),
        (0, PreviewMethod::Latent2Rgb)
    );
    // More than the steps is fine: only the last step's preview is sent.
    let every = GenerateRequest {
        steps: Some(4),
        preview_every: Some(9),
        ..prompt()
    };
    assert_eq!(run(every, &Limits::default()).unwrap().preview_every, 9);
    let taesd = GenerateRequest {
        preview_every: Some(1),
        preview_method: Some(PreviewMethod::Taesd),
        ..prompt()
    };
    let e = run(taesd.clone(), &Limits::default()).unwrap_err();
    assert!(e.to_string().starts_with("'preview_method': "), "{e}");
    let mut b = bundle();
    b.preview_decoder = Some("/test-model/taesd_decoder".into());
    let model = ModelRef {
        name: "tiny",
        bundle: &b,
        defaults: &ModelDefaults::NONE,
        loras: crate::lora::LoraCatalog::none(),
    };
    let r = resolve(&taesd, model, &Limits::default(), || 1).unwrap();
    assert_eq!(r.preview_method, PreviewMethod::Taesd);
    assert_eq!(r.to_request().preview_every, Some(1));
}
