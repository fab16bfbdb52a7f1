//! LoRA support through `diffusionctl` without a daemon, with the real ONNX Runtime, the
//! tiny SD 1.5 model and the committed LoRA fixtures (tests/golden/lora/loras/):
//! - `diffusionctl generate --local --lora` meets diffusers' fused-LoRA reference, and
//!   `diffusionctl verify` needs the LoRA file again and checks its hash;
//! - `diffusionctl batch --local` applies the LoRAs a manifest line names;
//! - with `--lora-dir`, `<lora:NAME:WEIGHT>` prompt tags name its files.

mod common;

use common::batch::assert_close;
use common::lora::*;
use common::{ctl_command, png_rgb, root};

#[test]
fn cli_generate_and_verify_with_a_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out.png");
    let out_s = out.display().to_string();
    let model = tiny().display().to_string();
    let lora = fixture("sd15_kohya").display().to_string();
    let lora_arg = format!("{lora}:0.5");
    let o = ctl(
        &state,
        &[
            "generate",
            "--local",
            "--model-dir",
            &model,
            "--lora",
            &lora_arg,
            "--prompt",
            "a photograph of an astronaut riding a horse",
            "--negative-prompt",
            "blurry, low quality",
            "--seed",
            "8001",
            "--steps",
            "4",
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            &out_s,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // The manifest's case sd15_kohya-s0.5 (the folder's scheduler, guidance 7.5, torch
    // RNG: the defaults).
    let golden = root().join("tests/golden/lora/sd15_kohya-s0.5/image0.png");
    assert_close(
        &common::batch::rgb(&out),
        &common::batch::rgb(&golden),
        "sd15_kohya-s0.5",
    );

    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", out_s.as_str(), "--model-dir", model.as_str()];
        args.extend_from_slice(extra);
        ctl(&state, &args)
    };
    let o = verify(&["--lora", &lora]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().last(),
        Some("identical"),
        "{}",
        text(&o)
    );

    let o = verify(&[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("sd15_kohya") && text(&o).contains("--lora"),
        "names the LoRA to give: {}",
        text(&o)
    );

    // A LoRA file that cannot be used: one line naming the file, no image.
    let sdxl = fixture("sdxl_kohya").display().to_string();
    let missing = tmp.path().join("missing.safetensors").display().to_string();
    for (bad, what) in [
        (&sdxl, "sdxl_kohya.safetensors"),
        (&missing, "missing.safetensors"),
    ] {
        let none = tmp.path().join("none.png");
        let none_s = none.display().to_string();
        let o = ctl(
            &state,
            &[
                "generate",
                "--local",
                "--model-dir",
                &model,
                "--lora",
                bad,
                "--prompt",
                "a cat",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--output",
                &none_s,
            ],
        );
        assert!(!o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{what}: {}", text(&o));
        assert_eq!(err.trim().lines().count(), 1, "one line: {}", text(&o));
        assert!(!none.exists());
    }

    // Another file under the name the image records.
    let impostor_dir = tmp.path().join("impostor");
    std::fs::create_dir(&impostor_dir).unwrap();
    let impostor = impostor_dir.join("sd15_kohya.safetensors");
    std::fs::copy(fixture("sd15_peft"), &impostor).unwrap();
    let o = verify(&["--lora", impostor.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("LoRA hash mismatch"),
        "a file of another hash: {}",
        text(&o)
    );
}

#[test]
fn a_local_batch_applies_manifest_loras() {
    let dir = lora_folder(&["sd15_kohya"]);
    let manifest = dir.path().join("manifest.jsonl");
    std::fs::write(
        &manifest,
        format!(
            concat!(
                r#"{{"name":"styled","prompt":"a red fox","seed":321,"steps":{s},"width":64,"height":64,"loras":[["sd15_kohya",0.5]]}}"#,
                "\n",
                r#"{{"name":"plain","prompt":"a red fox","seed":321,"steps":{s},"width":64,"height":64}}"#,
                "\n"
            ),
            s = STEPS
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = ctl_command(&[
        "batch",
        manifest.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--local",
        "--model-dir",
        tiny().to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let refs = tempfile::tempdir().unwrap();
    let want_styled = generate_local(
        &refs.path().join("styled.png"),
        "a red fox",
        321,
        &[(fixture("sd15_kohya"), 0.5)],
    );
    let want_plain = generate_local(&refs.path().join("plain.png"), "a red fox", 321, &[]);
    let styled = std::fs::read(out.join("styled.png")).unwrap();
    let plain = std::fs::read(out.join("plain.png")).unwrap();
    assert_close(&png_rgb(&styled), &want_styled, "the line with loras");
    assert_close(&png_rgb(&plain), &want_plain, "the line without");
    assert_ne!(want_styled, want_plain);
    let params = parameters(&styled);
    assert!(params.contains("Lora hashes: "), "{params}");
}

#[test]
fn local_prompt_tags_name_the_files_of_lora_dir() {
    let dir = tempfile::tempdir().unwrap();
    let folder = lora_folder(&["sd15_kohya"]);
    let folder_arg = folder.path().display().to_string();
    let tagged = generate_local_with(
        &dir.path().join("tagged.png"),
        "a cat <lora:sd15_kohya:0.8>",
        11,
        &[],
        &["--prompt-syntax", "a1111", "--lora-dir", &folder_arg],
    );
    let keyed = generate_local_with(
        &dir.path().join("keyed.png"),
        "a cat",
        11,
        &[(fixture("sd15_kohya"), 0.8)],
        &["--prompt-syntax", "a1111"],
    );
    let plain = generate_local_with(
        &dir.path().join("plain.png"),
        "a cat",
        11,
        &[],
        &["--prompt-syntax", "a1111"],
    );
    assert_eq!(tagged, keyed, "the tag and --lora give one image");
    assert_ne!(tagged, plain, "the tag applied the LoRA");
    // Through the daemon the folders are the daemon's own.
    let o = ctl_command(&[
        "generate",
        "--lora-dir",
        &folder_arg,
        "--prompt",
        "x",
        "--output",
        "x.png",
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--lora-dir needs --local"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
