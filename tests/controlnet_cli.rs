//! ControlNet through `diffusionctl` without a daemon, on a ControlNet-ready copy of the
//! tiny SD 1.5 model (`onnx/tiny-sd15` with `onnx/tiny-controlnet/tiny-sd15` over it):
//! - `verify --model-dir` regenerates an image made with `--controlnet` from its
//!   `ControlNet 0` record and the control image given again (`--control-image`), and
//!   names what is missing;
//! - `batch --local` runs a manifest line's `controls` (image paths relative to the
//!   manifest) to the pixels `generate --local` makes, and names a bad field with its line.

mod common;

use std::path::Path;

use common::lora::{ctl, text};
use common::{png_parameters, png_rgb, root};

fn canny() -> std::path::PathBuf {
    root().join("tests/golden/controlnet/controls/canny.png")
}

/// `generate --local` flags of the common request.
const REQUEST: [&str; 10] = [
    "--prompt",
    "a house on a hill",
    "--seed",
    "31",
    "--steps",
    "3",
    "--width",
    "64",
    "--height",
    "64",
];

fn generate_local(state: &Path, model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "generate",
        "--local",
        "--model-dir",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(REQUEST);
    args.extend_from_slice(extra);
    let o = ctl(state, &args);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn verify_regenerates_an_image_made_with_a_controlnet() {
    let model = common::controlnet::ready_model("tiny-sd15");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("cn.png");
    let canny = canny();
    let canny = canny.to_str().unwrap();
    generate_local(
        &state,
        model.path(),
        &out,
        &[
            "--controlnet",
            "canny",
            "--control-image",
            canny,
            "--control-scale",
            "0.8",
            "--control-end",
            "0.7",
        ],
    );
    let params = png_parameters(&std::fs::read(&out).unwrap()).unwrap();
    assert!(
        params.contains(
            "ControlNet 0: \"Module: none, Model: canny, Weight: 0.8, Guidance Start: 0, Guidance End: 0.7\""
        ),
        "{params}"
    );
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "verify",
            out.to_str().unwrap(),
            "--model-dir",
            model.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ctl(&state, &args)
    };
    let o = verify(&["--control-image", canny]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.lines().last() == Some("identical"), "{}", text(&o));
    let o = verify(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("was made with 1 ControlNet(s) (canny): give each one's control image again with --control-image"),
        "{err}"
    );
}

#[test]
fn batch_local_runs_a_lines_controlnets_and_names_bad_fields() {
    let model = common::controlnet::ready_model("tiny-sd15");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let want = dir.path().join("want.png");
    let canny = canny();
    generate_local(
        &state,
        model.path(),
        &want,
        &[
            "--controlnet",
            "canny",
            "--control-image",
            canny.to_str().unwrap(),
            "--control-scale",
            "0.8",
        ],
    );
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("edges")).unwrap();
    std::fs::copy(&canny, work.join("edges/001.png")).unwrap();
    let line = |controls: &str| {
        format!(
            r#"{{"prompt": "a house on a hill", "seed": 31, "steps": 3, "width": 64, "height": 64, "name": "cn", "controls": {controls}}}"#
        )
    };
    let run = |manifest_text: &str, out: &str| {
        let manifest = work.join("m.jsonl");
        std::fs::write(&manifest, manifest_text).unwrap();
        ctl(
            &state,
            &[
                "batch",
                manifest.to_str().unwrap(),
                "--output-dir",
                work.join(out).to_str().unwrap(),
                "--local",
                "--model-dir",
                model.path().to_str().unwrap(),
            ],
        )
    };
    let o = run(
        &line(
            r#"[{"controlnet": "canny", "image": "edges/001.png", "scale": 0.8, "start": 0.0, "end": 1.0}]"#,
        ),
        "out",
    );
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read(work.join("out/cn.png")).unwrap();
    assert!(
        png_rgb(&got) == png_rgb(&std::fs::read(&want).unwrap()),
        "batch --local differs from generate --local"
    );
    // A bad type, and a value the model refuses: each named with its line.
    let o = run(
        &[
            line(r#"[{"controlnet": "canny", "image": "edges/001.png", "scale": "high"}]"#),
            line(r#"[{"controlnet": "canny", "image": "edges/001.png", "scale": 3}]"#)
                .replace("\"cn\"", "\"cn2\""),
            line(r#"[{"controlnet": "pose", "image": "edges/001.png"}]"#)
                .replace("\"cn\"", "\"cn3\""),
        ]
        .join("\n"),
        "bad",
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "line 1: 'controls[0].scale': expected a number, got \"high\"",
        "line 2: 'controls[0].scale': 3 is not between 0 and 2",
        "line 3: 'controls[0].controlnet': model",
    ] {
        assert!(err.contains(needle), "{err} lacks {needle}");
    }
}
