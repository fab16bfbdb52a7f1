//! Tests of the profile derivation: SD 1.5-, SDXL- and LCM-like graphs, overrides, the
//! AUTOMATIC1111 chunk range, and the committed tiny fixtures.

use super::*;
use std::path::Path;

fn input(name: &str, dims: &[&str]) -> GraphInput {
    GraphInput {
        name: name.into(),
        elem_type: 1,
        dims: Some(
            dims.iter()
                .map(|d| match d.parse() {
                    Ok(v) => Dim::Value(v),
                    Err(_) if d.is_empty() => Dim::Any,
                    Err(_) => Dim::Param(d.to_string()),
                })
                .collect(),
        ),
    }
}

fn sd15(component: Component) -> SessionShapes {
    SessionShapes {
        component,
        native_size: 512,
        size_multiple: 64,
        vae_scale_factor: 8,
        tokens: 77,
        unet_in_channels: 4,
        time_cond_proj_dim: None,
    }
}

fn sdxl(component: Component) -> SessionShapes {
    SessionShapes {
        native_size: 1024,
        size_multiple: 32,
        ..sd15(component)
    }
}

fn defaults() -> ProfileLimits {
    ProfileLimits::from_settings(&TensorRtSettings::default())
}

/// (min, opt, max) shape strings.
fn strings(p: &Profile) -> [String; 3] {
    [p.min_shapes(), p.opt_shapes(), p.max_shapes()]
}

fn unet_inputs(hidden: &str, sdxl: bool) -> Vec<GraphInput> {
    let mut v = vec![
        input("sample", &["batch", "4", "height", "width"]),
        input("timestep", &[]),
        input("encoder_hidden_states", &["batch", "sequence", hidden]),
    ];
    if sdxl {
        v.push(input("text_embeds", &["batch", "1280"]));
        v.push(input("time_ids", &["batch", "6"]));
    }
    v
}

#[test]
fn default_limits_are_the_daemon_defaults() {
    let l = defaults();
    assert_eq!(
        l.accepted,
        AcceptedRequests {
            max_width: 2048,
            max_height: 2048,
            max_images: 16,
            max_prompt_chunks: 8
        }
    );
    assert_eq!(
        (l.max_images, l.min_size, l.opt_size, l.max_size),
        (16, None, None, None)
    );
}

#[test]
fn sd15_unet_covers_every_accepted_request() {
    let p = derive_profile(
        &unet_inputs("768", false),
        &sd15(Component::Unet),
        &defaults(),
    )
    .unwrap()
    .unwrap();
    // 64..2048 px (min(limits 2048, 8 x 512)) in latents, opt at 512 px; rows 1..2x16;
    // text 77..77x8; the rank-0 timestep is static and left out.
    assert_eq!(
        strings(&p),
        [
            "sample:1x4x8x8,encoder_hidden_states:1x77x768",
            "sample:2x4x64x64,encoder_hidden_states:2x77x768",
            "sample:32x4x256x256,encoder_hidden_states:32x616x768",
        ]
    );
}

#[test]
fn sdxl_unet_lists_its_added_conditioning() {
    let p = derive_profile(
        &unet_inputs("2048", true),
        &sdxl(Component::Unet),
        &defaults(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        strings(&p),
        [
            "sample:1x4x4x4,encoder_hidden_states:1x77x2048,text_embeds:1x1280,time_ids:1x6",
            "sample:2x4x128x128,encoder_hidden_states:2x77x2048,text_embeds:2x1280,time_ids:2x6",
            "sample:32x4x256x256,encoder_hidden_states:32x616x2048,text_embeds:32x1280,time_ids:32x6",
        ]
    );
}

#[test]
fn overrides_bound_sizes_and_batch() {
    let mut t = TensorRtSettings {
        min_size: Some(ProfileSize::try_from(512).unwrap()),
        opt_size: Some(ProfileSize::try_from(768).unwrap()),
        max_size: Some(ProfileSize::try_from(1024).unwrap()),
        max_batch: Some(ProfileBatch::try_from(2).unwrap()),
        ..TensorRtSettings::default()
    };
    let p = derive_profile(
        &unet_inputs("2048", true),
        &sdxl(Component::Unet),
        &ProfileLimits::from_settings(&t),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        p.ranges[0],
        ShapeRange {
            input: "sample".into(),
            min: vec![1, 4, 64, 64],
            opt: vec![2, 4, 96, 96],
            max: vec![4, 4, 128, 128],
        }
    );
    // The daemon's own limits (accepting): sizes follow limits.max_*, the batch stays
    // max_batch while it is set.
    let limits = crate::request::Limits {
        max_width: 1280,
        max_height: 768,
        max_images: 3,
        max_prompt_chunks: 3,
        ..crate::request::Limits::default()
    };
    t.max_size = None;
    t.opt_size = None;
    let t = t.accepting(&limits, 1);
    let p = derive_profile(
        &unet_inputs("2048", true),
        &sdxl(Component::Unet),
        &ProfileLimits::from_settings(&t),
    )
    .unwrap()
    .unwrap();
    assert_eq!(p.ranges[0].max, [4, 4, 96, 160]);
    assert_eq!(p.ranges[0].opt, [2, 4, 96, 128]);
    // AUTOMATIC1111 prompts: 3 chunks of 77.
    assert_eq!(p.ranges[1].max, [4, 231, 2048]);
    assert_eq!(p.ranges[1].min, [1, 77, 2048]);
}

#[test]
fn a1111_chunk_range_follows_the_limit() {
    let t = TensorRtSettings::default().accepting(
        &crate::request::Limits {
            max_prompt_chunks: 1,
            ..crate::request::Limits::default()
        },
        4,
    );
    let p = derive_profile(
        &unet_inputs("768", false),
        &sd15(Component::Unet),
        &ProfileLimits::from_settings(&t),
    )
    .unwrap()
    .unwrap();
    assert_eq!(p.ranges[1].max, [32, 77, 768]);
    // Unbounded in-process limits stay finite.
    let t = TensorRtSettings::default().accepting(&crate::request::Limits::unbounded(), 4);
    let p = derive_profile(
        &unet_inputs("768", false),
        &sd15(Component::Unet),
        &ProfileLimits::from_settings(&t),
    )
    .unwrap()
    .unwrap();
    assert_eq!(p.ranges[0].max, [2048, 4, 512, 512]);
    assert_eq!(p.ranges[1].max, [2048, 77 * 256, 768]);
}

#[test]
fn text_encoder_and_vae_ranges() {
    let l = defaults();
    let te = derive_profile(
        &[input("input_ids", &["batch_size", "sequence_length"])],
        &sd15(Component::TextEncoder),
        &l,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        strings(&te),
        ["input_ids:1x77", "input_ids:1x77", "input_ids:32x77"]
    );
    let dec = derive_profile(
        &[input("latent_sample", &["batch", "4", "h", "w"])],
        &sd15(Component::VaeDecoder),
        &l,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        strings(&dec),
        [
            "latent_sample:1x4x8x8",
            "latent_sample:1x4x64x64",
            "latent_sample:16x4x256x256"
        ]
    );
    let enc = derive_profile(
        &[input("sample", &["batch", "3", "h", "w"])],
        &sd15(Component::VaeEncoder),
        &l,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        strings(&enc),
        [
            "sample:1x3x64x64",
            "sample:1x3x512x512",
            "sample:16x3x2048x2048"
        ]
    );
}

#[test]
fn lcm_batch_is_not_doubled_and_timestep_cond_is_fixed() {
    let shapes = SessionShapes {
        time_cond_proj_dim: Some(256),
        ..sd15(Component::Unet)
    };
    let inputs = [
        input("sample", &["b", "4", "h", "w"]),
        input("timestep", &["b"]),
        input("encoder_hidden_states", &["b", "s", "768"]),
        input("timestep_cond", &["b", "d"]),
    ];
    let p = derive_profile(&inputs, &shapes, &defaults())
        .unwrap()
        .unwrap();
    assert_eq!(
        strings(&p)[2],
        "sample:16x4x256x256,timestep:16,encoder_hidden_states:16x616x768,timestep_cond:16x256"
    );
    assert_eq!(p.ranges[1].opt, [1]);
}

#[test]
fn static_dims_stay_static_and_static_graphs_get_no_profile() {
    let inputs = [
        input("sample", &["batch", "9", "64", "64"]),
        input("timestep", &["1"]),
        input("encoder_hidden_states", &["batch", "77", "768"]),
    ];
    let shapes = SessionShapes {
        unet_in_channels: 9,
        ..sd15(Component::Unet)
    };
    let p = derive_profile(&inputs, &shapes, &defaults())
        .unwrap()
        .unwrap();
    assert_eq!(
        strings(&p),
        [
            "sample:1x9x64x64,encoder_hidden_states:1x77x768",
            "sample:2x9x64x64,encoder_hidden_states:2x77x768",
            "sample:32x9x64x64,encoder_hidden_states:32x77x768",
        ]
    );
    let fixed = [input("sample", &["2", "4", "64", "64"])];
    assert_eq!(derive_profile(&fixed, &shapes, &defaults()), Ok(None));
}

#[test]
fn graphs_diffusiond_cannot_size_are_named() {
    let l = defaults();
    let unet = sd15(Component::Unet);
    let err = derive_profile(
        &[input("controlnet_cond", &["b", "3", "h", "w"])],
        &unet,
        &l,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "input 'controlnet_cond' [b, 3, h, w] is not one diffusiond feeds a UNet"
    );
    let err = derive_profile(&unet_inputs("hidden", false), &unet, &l).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input 'encoder_hidden_states' axis 2 ('hidden') is dynamic and its size is unknown to diffusiond"
    );
    let err = derive_profile(&[input("sample", &["b", "4", "h"])], &unet, &l).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input 'sample' [b, 4, h] has rank 3; diffusiond feeds it rank 4"
    );
    let no_shape = GraphInput {
        name: "sample".into(),
        elem_type: 1,
        dims: None,
    };
    assert!(matches!(
        derive_profile(&[no_shape], &unet, &l),
        Err(ProfileError::UnknownInput { .. })
    ));
    // A text encoder's inputs are not a VAE's.
    assert!(
        derive_profile(
            &[input("input_ids", &["b", "s"])],
            &sd15(Component::VaeDecoder),
            &l
        )
        .is_err()
    );
}

/// The committed fixtures, through their real bundles and graphs.
fn fixture_unet(model: &str) -> Profile {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("onnx")
        .join(model);
    let bundle = ModelBundle::open(&dir).unwrap();
    let info = crate::model::graph_inputs::read(&bundle.onnx("unet")).unwrap();
    let shapes = SessionShapes::new(Component::Unet, &bundle, 77);
    derive_profile(&info.inputs, &shapes, &defaults())
        .unwrap()
        .unwrap()
}

#[test]
fn tiny_fixture_unets_with_default_limits() {
    // 64 px native, sides multiples of 16 (VAE 8 x 2 UNet levels), at most 8 x 64 px.
    assert_eq!(
        strings(&fixture_unet("tiny-sd15")),
        [
            "sample:1x4x2x2,encoder_hidden_states:1x77x32",
            "sample:2x4x8x8,encoder_hidden_states:2x77x32",
            "sample:32x4x64x64,encoder_hidden_states:32x616x32",
        ]
    );
    assert_eq!(
        strings(&fixture_unet("tiny-sdxl")),
        [
            "sample:1x4x2x2,encoder_hidden_states:1x77x48,text_embeds:1x32,time_ids:1x6",
            "sample:2x4x8x8,encoder_hidden_states:2x77x48,text_embeds:2x32,time_ids:2x6",
            "sample:32x4x64x64,encoder_hidden_states:32x616x48,text_embeds:32x32,time_ids:32x6",
        ]
    );
}

#[test]
fn profile_values_are_checked() {
    for ok in [8u32, 64, 512, 16384] {
        assert_eq!(ProfileSize::try_from(ok).map(u32::from), Ok(ok));
    }
    for bad in [0u32, 7, 100, 16392] {
        assert_eq!(ProfileSize::try_from(bad), Err(ProfileSizeError(bad)));
    }
    assert_eq!(
        ProfileSizeError(100).to_string(),
        "image side 100 is not a multiple of 8 from 8 to 16384 pixels"
    );
    assert_eq!(ProfileBatch::try_from(1).map(u32::from), Ok(1));
    assert_eq!(ProfileBatch::try_from(256).map(u32::from), Ok(256));
    assert_eq!(ProfileBatch::try_from(0), Err(ProfileBatchError(0)));
    assert_eq!(ProfileBatch::try_from(257), Err(ProfileBatchError(257)));
}
