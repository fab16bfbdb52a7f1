//! `diffusionctl verify` end to end, with the real ONNX Runtime and the tiny model: images
//! made by `generate --local` (text to image, image to image, inpainting), by `batch --local` and by
//! the daemon verify as identical; a changed model file is caught by the model hash; a
//! PNG edited by one level is `within 1 level`; a PNG without the chunk, or one whose init
//! image is not given again, is refused. The model hash matches the shell recipe in
//! docs/diffusionctl.md.

mod common;

use std::path::Path;
use std::process::Output;

use common::batch::{items, tiny, write_manifest};
use common::{Daemon, PrivateBus, copy_dir, ctl_command};

/// `diffusionctl ARGS` with its hash cache in `state` (not the user's home).
fn ctl(state: &Path, args: &[&str]) -> Output {
    ctl_command(args)
        .env("XDG_STATE_HOME", state)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The verdict: the last line of stdout.
fn verdict(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

fn generate_local(state: &Path, out: &Path, extra: &[&str]) {
    let model = tiny();
    let mut args = vec![
        "generate",
        "--local",
        "--model-dir",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox, \"quoted\"\nsecond line",
        "--negative-prompt",
        "blurry, dark",
        "--steps",
        "4",
        "--seed",
        "7",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = ctl(state, &args);
    assert!(o.status.success(), "{}", text(&o));
}

fn verify_local(state: &Path, image: &Path, model: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "verify",
        image.to_str().unwrap(),
        "--model-dir",
        model.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ctl(state, &args)
}

/// Writes RGB8 `pixels` of `size` as a PNG, with the `parameters` chunk when given.
fn write_png(path: &Path, size: (u32, u32), pixels: &[u8], parameters: Option<&str>) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), size.0, size.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if let Some(text) = parameters {
        enc.add_itxt_chunk("parameters".into(), text.into())
            .unwrap();
    }
    let mut w = enc.write_header().unwrap();
    w.write_image_data(pixels).unwrap();
    w.finish().unwrap();
}

fn rgb(path: &Path) -> ((u32, u32), Vec<u8>) {
    let img = image::open(path).unwrap().to_rgb8();
    (img.dimensions(), img.into_raw())
}

#[test]
fn text_to_image_verifies_identical_and_edits_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out.png");
    generate_local(&state, &out, &[]);
    let params = common::png_parameters(&std::fs::read(&out).unwrap()).unwrap();
    assert!(params.contains("Model hash: "), "{params}");
    assert!(params.contains("Execution provider: cpu"), "{params}");

    let o = verify_local(&state, &out, &tiny(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(verdict(&o), "identical", "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("model hash "),
        "{}",
        text(&o)
    );
    // The digests were cached in the state directory.
    assert!(state.join("diffusiond/model-hashes.json").is_file());

    // One pixel one level off, the chunk kept.
    let (size, mut pixels) = rgb(&out);
    pixels[0] = if pixels[0] == 255 { 254 } else { pixels[0] + 1 };
    let edited = tmp.path().join("edited.png");
    write_png(&edited, size, &pixels, Some(&params));
    let o = verify_local(&state, &edited, &tiny(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        verdict(&o),
        format!("within 1 level (1 of {} pixels differ)", size.0 * size.1),
        "{}",
        text(&o)
    );

    // Much changed: different, exit 1.
    for p in pixels.iter_mut().take(300) {
        *p = p.wrapping_add(128);
    }
    let changed = tmp.path().join("changed.png");
    write_png(&changed, size, &pixels, Some(&params));
    let o = verify_local(&state, &changed, &tiny(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        verdict(&o).starts_with("different (max pixel difference"),
        "{}",
        text(&o)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not match its regeneration"));

    // No chunk: refused before anything runs.
    let bare = tmp.path().join("bare.png");
    write_png(&bare, size, &pixels, None);
    let o = verify_local(&state, &bare, &tiny(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("has no 'parameters' chunk"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A chunk from before the model hash, and one that is not ours: refused, saying so.
    let old = params.replace(&format!("Model hash: {}, ", hash_of(&params)), "");
    let old_png = tmp.path().join("old.png");
    write_png(&old_png, size, &pixels, Some(&old));
    let o = verify_local(&state, &old_png, &tiny(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("records no 'Model hash'"),
        "{}",
        text(&o)
    );
    let a1111 = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 0123456789, Model: sd15";
    write_png(&old_png, size, &pixels, Some(a1111));
    let o = verify_local(&state, &old_png, &tiny(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("its parameters chunk is not diffusiond's: 'diffusiond' is missing"),
        "{}",
        text(&o)
    );

    // Made with --local: without --model-dir there is no model to ask the daemon for.
    let o = ctl(&state, &["verify", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("give --model-dir DIR"),
        "{}",
        text(&o)
    );

    // A text-to-image image takes no init image.
    let o = verify_local(
        &state,
        &out,
        &tiny(),
        &["--init-image", out.to_str().unwrap()],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--init-image is not used"));
}

#[test]
fn a_changed_model_file_is_caught_by_the_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("out.png");
    generate_local(&state, &out, &[]);
    let copy = tmp.path().join("model");
    copy_dir(&tiny(), &copy);
    // A copy hashes the same: the hash is of the contents, not the place.
    let o = verify_local(&state, &out, &copy, &[]);
    assert_eq!(verdict(&o), "identical", "{}", text(&o));
    // One byte of a config, same length.
    let config = copy.join("scheduler/scheduler_config.json");
    let t = std::fs::read_to_string(&config).unwrap();
    assert!(t.contains("\"0.39.0\""));
    std::fs::write(&config, t.replacen("\"0.39.0\"", "\"0.39.1\"", 1)).unwrap();
    let o = verify_local(&state, &out, &copy, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("model hash mismatch"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "refused before generating: {}",
        text(&o)
    );
}

#[test]
fn edits_verify_with_the_init_image_and_mask_given_again() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let init = tmp.path().join("init.png");
    let pixels: Vec<u8> = (0..80 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
    write_png(&init, (80, 64), &pixels, None);
    let out = tmp.path().join("edit.png");
    let init_arg = init.to_str().unwrap();
    generate_local(
        &state,
        &out,
        &["--init-image", init_arg, "--strength", "0.75"],
    );
    let o = verify_local(&state, &out, &tiny(), &["--init-image", init_arg]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(verdict(&o), "identical", "{}", text(&o));
    // Without it, or with another file: refused, naming the flag.
    let o = verify_local(&state, &out, &tiny(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("give it again with --init-image"),
        "{}",
        text(&o)
    );
    // Inpainting: the init image and the mask, both checked.
    let mask = tmp.path().join("mask.png");
    let half: Vec<u8> = (0..80 * 64)
        .flat_map(|i| if i % 80 < 40 { [255u8; 3] } else { [0u8; 3] })
        .collect();
    write_png(&mask, (80, 64), &half, None);
    let inpainted = tmp.path().join("inpaint.png");
    let mask_arg = mask.to_str().unwrap();
    generate_local(
        &state,
        &inpainted,
        &["--init-image", init_arg, "--mask-image", mask_arg],
    );
    let o = verify_local(
        &state,
        &inpainted,
        &tiny(),
        &["--init-image", init_arg, "--mask-image", mask_arg],
    );
    assert_eq!(verdict(&o), "identical", "{}", text(&o));
    let o = verify_local(&state, &inpainted, &tiny(), &["--init-image", init_arg]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("give the mask again with --mask-image"),
        "{}",
        text(&o)
    );
    let other = tmp.path().join("other.png");
    write_png(&other, (80, 64), &vec![9; 80 * 64 * 3], None);
    let o = verify_local(
        &state,
        &out,
        &tiny(),
        &["--init-image", other.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("its hash"),
        "{}",
        text(&o)
    );
}

#[test]
fn batch_items_verify_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let list = items(3, 4);
    let manifest = write_manifest(tmp.path(), &list);
    let out = tmp.path().join("out");
    let model = tiny();
    let o = ctl(
        &state,
        &[
            "batch",
            manifest.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--local",
            "--model-dir",
            model.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // The second image of a two-image item (Batch pos 1) and a named one.
    for name in ["00002-1.png", "named.png"] {
        let image = out.join(name);
        let p = common::png_parameters(&std::fs::read(&image).unwrap()).unwrap();
        assert!(p.contains("Model hash: "), "{p}");
        let o = verify_local(&state, &image, &model, &[]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert_eq!(verdict(&o), "identical", "{name}: {}", text(&o));
    }
}

#[test]
fn daemon_images_verify_through_the_daemon() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = tmp.path().join("d.png");
    let o = ctl(
        &state,
        &[
            "generate",
            "--address",
            bus.address(),
            "--prompt",
            "a lighthouse, at night",
            "--steps",
            "4",
            "--seed",
            "11",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // The model the image names ("tiny"), then named explicitly.
    for extra in [&[][..], &["--model", "tiny"][..]] {
        let mut args = vec!["verify", out.to_str().unwrap(), "--address", bus.address()];
        args.extend_from_slice(extra);
        let o = ctl(&state, &args);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(verdict(&o), "identical", "{}", text(&o));
    }
    // The same image checked in-process against the folder the daemon serves.
    let o = verify_local(&state, &out, &tiny(), &[]);
    assert!(o.status.success(), "{}", text(&o));
}

/// The `Model hash` value of a parameters text.
fn hash_of(params: &str) -> String {
    params
        .split(", ")
        .find_map(|kv| kv.strip_prefix("Model hash: "))
        .unwrap()
        .to_string()
}

/// The recipe docs/diffusionctl.md gives for the model hash, run by the shell.
#[test]
fn the_documented_shell_recipe_gives_the_model_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    generate_local(&tmp.path().join("state"), &out, &[]);
    let params = common::png_parameters(&std::fs::read(&out).unwrap()).unwrap();
    let recorded = hash_of(&params);
    let recipe = "{ echo model_index.json; find -L scheduler text_encoder text_encoder_2 text_encoder_3 tokenizer tokenizer_2 tokenizer_3 transformer unet vae_decoder vae_decoder_fp32 vae_encoder -maxdepth 1 -type f ! -name '.*' 2>/dev/null; } | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-10";
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(recipe)
        .current_dir(tiny())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), recorded);
}
