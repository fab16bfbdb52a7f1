//! The transformer families (SD3, FLUX) through a real daemon on a private bus and through
//! `diffusionctl generate --local`, with the real ONNX Runtime and the tiny fixtures:
//! their requests give the images `--local` gives (which are Optimum's: see
//! tests/transformer_parity.rs), `ListModels` names their kind, and what they do not
//! take is refused naming the key: a UNet scheduler, a size off their multiple, a
//! `max_sequence_length` over 512, a negative prompt on FLUX, image-to-image; and the
//! UNet model refuses the flow scheduler and `max_sequence_length`. The daemon keeps
//! serving after each refusal.

mod common;

use std::path::Path;

use common::{
    Daemon, PrivateBus, ctl_command, error_name, generate, png_rgb, request_dict, result_pngs,
    root, tokio_runtime, wait,
};
use zbus::zvariant::Value;

const INVALID_ARGUMENT: &str = "io.github.Diffusiond1.Error.InvalidArgument";

/// `[models.sd3]` and `[models.flux]` beside the tiny UNet model.
fn config() -> String {
    format!(
        "[models.sd3]\npath = \"{}\"\n\n[models.flux]\npath = \"{}\"\n",
        root().join("onnx/tiny-sd3").display(),
        root().join("onnx/tiny-flux-dev").display()
    )
}

/// `diffusionctl generate --local` of a model folder; its RGB bytes.
fn local(dir: &str, out: &Path, args: &[&str]) -> Vec<u8> {
    let model = root().join(dir).display().to_string();
    let output = out.display().to_string();
    let mut all = vec![
        "generate",
        "--local",
        "--model-dir",
        &model,
        "--output",
        &output,
    ];
    all.extend_from_slice(args);
    let o = ctl_command(&all).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    png_rgb(&std::fs::read(out).unwrap())
}

#[test]
fn sd3_and_flux_requests_equal_local_and_bad_ones_are_refused_by_key() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, &config());
    let dir = tempfile::tempdir().unwrap();
    let sd3_local = local(
        "onnx/tiny-sd3",
        &dir.path().join("sd3.png"),
        &[
            "--prompt",
            "a photograph of an astronaut riding a horse",
            "--negative-prompt",
            "blurry, low quality",
            "--seed",
            "100",
            "--steps",
            "4",
            "--guidance",
            "7",
            "--width",
            "64",
            "--height",
            "64",
        ],
    );
    let flux_local = local(
        "onnx/tiny-flux-dev",
        &dir.path().join("flux.png"),
        &[
            "--prompt",
            "a photograph of an astronaut riding a horse",
            "--seed",
            "300",
            "--steps",
            "4",
            "--guidance",
            "3.5",
            "--width",
            "64",
            "--height",
            "64",
            "--max-sequence-length",
            "256",
        ],
    );
    // --local matches Optimum's references (their PNGs, bit for bit).
    let reference = |case: &str| {
        png_rgb(
            &std::fs::read(root().join(format!("tests/golden/transformers/{case}/image0.png")))
                .unwrap(),
        )
    };
    assert_eq!(sd3_local, reference("txt2img-sd3-s4-g7-neg-64x64-n1-100"));
    assert_eq!(
        flux_local,
        reference("txt2img-flux-dev-s4-g3.5-msl256-64x64-n1-300")
    );

    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let sd3 = request_dict(&[
            ("model", Value::from("sd3")),
            (
                "prompt",
                Value::from("a photograph of an astronaut riding a horse"),
            ),
            ("negative_prompt", Value::from("blurry, low quality")),
            ("seed", Value::U64(100)),
            ("steps", Value::U32(4)),
            ("guidance_scale", Value::F64(7.0)),
            ("width", Value::U32(64)),
            ("height", Value::U32(64)),
        ]);
        let path = generate(&conn, sd3).await.unwrap();
        let result = wait(&conn, &path).await.unwrap();
        assert_eq!(png_rgb(&result_pngs(&result)[0]), sd3_local);

        let flux = request_dict(&[
            ("model", Value::from("flux")),
            (
                "prompt",
                Value::from("a photograph of an astronaut riding a horse"),
            ),
            ("seed", Value::U64(300)),
            ("steps", Value::U32(4)),
            ("guidance_scale", Value::F64(3.5)),
            ("width", Value::U32(64)),
            ("height", Value::U32(64)),
            ("max_sequence_length", Value::U32(256)),
        ]);
        let path = generate(&conn, flux).await.unwrap();
        let result = wait(&conn, &path).await.unwrap();
        let png = &result_pngs(&result)[0];
        assert_eq!(png_rgb(png), flux_local);
        let params = common::png_parameters(png).unwrap();
        assert!(params.contains("Max sequence length: 256"), "{params}");
        assert!(params.contains("Sampler: flow-euler"), "{params}");

        let init = std::fs::read(root().join("tests/golden/edit/inputs/init-64x64.png")).unwrap();
        let mask =
            std::fs::read(root().join("tests/golden/edit/inputs/mask-64x64-hard.png")).unwrap();
        // SD3 image-to-image and inpainting through the daemon: Optimum's images.
        for (case, keys) in [
            (
                "img2img-sd3-s5-g7-st0.6-init64x64-n1-110",
                vec![("seed", Value::U64(110)), ("steps", Value::U32(5))],
            ),
            (
                "inpaint-sd3-s5-g7-st0.8-neg-init64x64-n1-113",
                vec![
                    ("seed", Value::U64(113)),
                    ("steps", Value::U32(5)),
                    ("strength", Value::F64(0.8)),
                    ("mask_image", Value::from(&mask[..])),
                    ("negative_prompt", Value::from("blurry, low quality")),
                ],
            ),
        ] {
            let mut pairs = vec![
                ("model", Value::from("sd3")),
                (
                    "prompt",
                    Value::from("a photograph of an astronaut riding a horse"),
                ),
                ("guidance_scale", Value::F64(7.0)),
                ("init_image", Value::from(&init[..])),
            ];
            pairs.extend(keys);
            let path = generate(&conn, request_dict(&pairs)).await.unwrap();
            let result = wait(&conn, &path).await.unwrap();
            let got = png_rgb(&result_pngs(&result)[0]);
            let want = reference(case);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(worst <= 1, "{case}: {worst} levels off");
        }
        let refused: &[(&[(&str, Value<'_>)], &str)] = &[
            (
                &[
                    ("model", Value::from("sd3")),
                    ("scheduler", Value::from("ddim")),
                ],
                "'scheduler': 'ddim' is a UNet scheduler",
            ),
            (
                &[("model", Value::from("sd3")), ("width", Value::U32(72))],
                "'width'",
            ),
            (
                &[
                    ("model", Value::from("flux")),
                    ("max_sequence_length", Value::U32(600)),
                ],
                "'max_sequence_length': 600 is outside 1..=512",
            ),
            (
                &[
                    ("model", Value::from("flux")),
                    ("negative_prompt", Value::from("blurry")),
                ],
                "'negative_prompt'",
            ),
            (
                &[
                    ("model", Value::from("flux")),
                    ("init_image", Value::from(&init[..])),
                ],
                "'init_image': image-to-image is not supported on model 'flux'",
            ),
            (
                &[("scheduler", Value::from("flow-euler"))],
                "'scheduler': 'flow-euler' is a flow-matching scheduler",
            ),
            (
                &[("max_sequence_length", Value::U32(77))],
                "'max_sequence_length': only models with a T5 text encoder",
            ),
        ];
        for (keys, want) in refused {
            let mut pairs = vec![("prompt", Value::from("x"))];
            pairs.extend(keys.iter().map(|(k, v)| (*k, v.try_clone().unwrap())));
            let err = generate(&conn, request_dict(&pairs)).await.unwrap_err();
            assert_eq!(error_name(&err), INVALID_ARGUMENT, "{want}: {err}");
            assert!(err.to_string().contains(want), "{err} should say {want}");
        }

        // Still serving, and the kinds are listed.
        let models: Vec<std::collections::HashMap<String, zbus::zvariant::OwnedValue>> =
            zbus::Proxy::new(
                &conn,
                "io.github.Diffusiond1",
                "/io/github/Diffusiond1",
                "io.github.Diffusiond1.Manager",
            )
            .await
            .unwrap()
            .call("ListModels", &())
            .await
            .unwrap();
        let kind = |name: &str| {
            models
                .iter()
                .find(|m| <&str>::try_from(&m["name"]).unwrap() == name)
                .map(|m| <&str>::try_from(&m["kind"]).unwrap().to_string())
                .unwrap()
        };
        assert_eq!(kind("sd3"), "sd3");
        assert_eq!(kind("flux"), "flux");
        assert_eq!(kind("tiny"), "sd");
    });
}
