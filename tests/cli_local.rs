//! `diffusionctl generate --local`, the CLI contract: golden cases through the real
//! binary, numbered outputs, given latents, PNG metadata, and one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::batch::{assert_close, rgb};
use common::root;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
struct Case {
    id: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    scheduler: String,
    steps: usize,
    guidance_scale: f64,
    width: usize,
    height: usize,
    num_images: usize,
    seed: u64,
    rng: String,
    latents: String,
    pngs: Vec<String>,
    init_noise_sigma: f64,
    guidance_rescale: f64,
}

#[derive(Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

fn golden(rel: &str) -> PathBuf {
    root().join("tests/golden/pipelines").join(rel)
}

fn find(pred: impl Fn(&Case) -> bool) -> Case {
    let text = std::fs::read_to_string(golden("manifest.json")).unwrap();
    let m: Manifest = serde_json::from_str(&text).unwrap();
    m.cases
        .into_iter()
        .find(|c| pred(c))
        .expect("a matching golden case")
}

fn ctl(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffusionctl"))
        .args(args)
        .env("RUST_LOG", "off")
        .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
        .output()
        .unwrap()
}

fn case_args(c: &Case, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["generate", "--local", "--model-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(root().join(&c.model).display().to_string());
    for (flag, value) in [
        ("--prompt", c.prompt.clone()),
        ("--steps", c.steps.to_string()),
        ("--guidance", c.guidance_scale.to_string()),
        ("--guidance-rescale", c.guidance_rescale.to_string()),
        ("--scheduler", c.scheduler.clone()),
        ("--seed", c.seed.to_string()),
        ("--rng", c.rng.clone()),
        ("--width", c.width.to_string()),
        ("--height", c.height.to_string()),
        ("--num-images", c.num_images.to_string()),
        ("--output", out.display().to_string()),
    ] {
        a.push(flag.into());
        a.push(value);
    }
    if let Some(n) = &c.negative_prompt {
        a.push("--negative-prompt".into());
        a.push(n.clone());
    }
    a
}

fn png_text(path: &Path) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    info.utf8_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.get_text().unwrap())
        .expect("a parameters chunk")
}

#[test]
fn seeded_case_matches_reference_png_and_records_parameters() {
    let c =
        find(|c| c.scheduler == "unipc" && c.rng == "torch" && c.steps == 13 && c.num_images == 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let o = ctl(&case_args(&c, &out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&rgb(&out), &rgb(&golden(&c.pngs[0])), &c.id);
    let text = png_text(&out);
    for needle in [
        c.prompt.as_str(),
        &format!("Seed: {}", c.seed),
        "Sampler: unipc",
        &format!("Steps: {}", c.steps),
        "ONNX Runtime: 1.32.0",
        "RNG: torch",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text:?}");
    }
}

#[test]
fn debug_logging_shows_each_stage_as_a_timed_span() {
    let c = find(|c| c.scheduler == "pndm" && c.steps == 4 && c.num_images == 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let o = Command::new(env!("CARGO_BIN_EXE_diffusionctl"))
        .args(case_args(&c, &out))
        .env("RUST_LOG", "diffusiond=trace")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        !log.contains('\x1b'),
        "no colour codes when stderr is not a terminal"
    );
    let closed = |span: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("{span}: ")) && l.contains("close time.busy="))
            .count()
    };
    for stage in ["text_encoder", "denoise", "vae", "postprocess"] {
        assert_eq!(closed(stage), 1, "one closed {stage} span in:\n{log}");
    }
    // PNDM runs steps + 1 UNet calls, each in a step span holding a unet span.
    assert_eq!(closed("unet"), c.steps + 1, "{log}");
    assert!(
        log.contains("stage timings") && log.contains("unet_calls=5"),
        "{log}"
    );
}

#[test]
fn several_images_are_numbered_and_match() {
    let c = find(|c| c.num_images == 2 && c.scheduler == "euler-a" && c.rng == "numpy");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("batch.png");
    let o = ctl(&case_args(&c, &out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for i in 0..2 {
        let file = dir.path().join(format!("batch-{i}.png"));
        assert_close(&rgb(&file), &rgb(&golden(&c.pngs[i])), &c.id);
    }
    assert!(!out.exists());
}

#[test]
fn given_latents_replace_the_seed() {
    // With init_noise_sigma = 1 the recorded latents are exactly what diffusers was given.
    let c = find(|c| {
        c.scheduler == "dpm++2m" && c.init_noise_sigma == 1.0 && c.num_images == 1 && c.steps > 1
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lat.png");
    let mut args = case_args(&c, &out);
    let seed_at = args.iter().position(|a| a == "--seed").unwrap();
    args[seed_at + 1] = "999999".into();
    args.push("--latents".into());
    args.push(golden(&c.latents).display().to_string());
    let o = ctl(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(&rgb(&out), &rgb(&golden(&c.pngs[0])), &c.id);
}

#[test]
fn invalid_values_exit_nonzero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png").display().to_string();
    let model = root().join("onnx/tiny-sd15").display().to_string();
    let base = |extra: &[&str], model: &str| {
        let mut a: Vec<String> = [
            "generate",
            "--local",
            "--model-dir",
            model,
            "--prompt",
            "a cat",
            "--output",
            &out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let missing = dir.path().join("no-such-model").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (base(&["--width", "65"], &model), "width"),
        (base(&["--height", "100"], &model), "height"),
        (base(&["--width", "0"], &model), "width"),
        (base(&["--steps", "0"], &model), "steps"),
        (
            base(&["--scheduler", "warp-drive"], &model),
            "unknown scheduler",
        ),
        (base(&[], &missing), "does not exist"),
        (base(&["--guidance", "nan"], &model), "not finite"),
        (base(&["--guidance", "inf"], &model), "not finite"),
        (base(&["--rng", "dice"], &model), "rng"),
        (base(&["--latents", "/nonexistent.npy"], &model), "latents"),
    ];
    for (args, needle) in cases {
        let o = ctl(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!Path::new(&out).exists());
}
