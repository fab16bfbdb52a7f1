//! Pixel parity of image-to-image, inpainting (4- and 9-channel UNets), LCM-distilled UNets
//! (text and image to image), Turbo settings and
//! '!' prompts with Optimum: every case in tests/golden/edit/manifest.json (written by
//! onnx/make_edit_references.py with Optimum's ORT pipelines) is generated in-process from
//! its seed and compared with today's tolerances: float images within 1e-3, PNG bytes
//! within 1 level on ≥ 99.9% of values and never more than 2 apart.

mod common;

use std::path::{Path, PathBuf};

use common::parity::{Diff, ort_runtime};
use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::request::ImageInput;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
struct Case {
    id: String,
    mode: String,
    model: String,
    strip_tokenizer_json: bool,
    prompt: String,
    negative_prompt: Option<String>,
    scheduler: Option<String>,
    steps: usize,
    guidance_scale: f64,
    strength: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    num_images: usize,
    seed: u64,
    init_image: Option<String>,
    mask_image: Option<String>,
    images: Vec<String>,
    pngs: Vec<String>,
    unet_timesteps: Vec<f64>,
}

fn root() -> &'static Path {
    common::root()
}

fn golden() -> PathBuf {
    root().join("tests/golden/edit")
}

fn cases() -> Vec<Case> {
    common::parity::manifest_cases(&golden())
}

fn image(rel: &Option<String>) -> Option<ImageInput> {
    rel.as_ref()
        .map(|r| ImageInput::new(std::fs::read(golden().join(r)).unwrap()))
}

fn params(case: &Case) -> GenerateParams {
    GenerateParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance_scale: case.guidance_scale,
        scheduler: case.scheduler.clone(),
        seed: case.seed,
        width: case.width.unwrap_or(0),
        height: case.height.unwrap_or(0),
        num_images: case.num_images,
        init_image: image(&case.init_image),
        mask_image: image(&case.mask_image),
        strength: case.strength,
        ..GenerateParams::default()
    }
}

/// The model folder of a case; a copy without tokenizer.json when the case says so.
fn model_dir(case: &Case, scratch: &Path) -> PathBuf {
    let dir = root().join(&case.model);
    if !case.strip_tokenizer_json {
        return dir;
    }
    let copy = scratch.join("model");
    common::copy_dir(&dir, &copy);
    for tok in ["tokenizer", "tokenizer_2"] {
        let _ = std::fs::remove_file(copy.join(tok).join("tokenizer.json"));
    }
    copy
}

/// Runs every case `select` picks and checks it against the reference.
fn check(select: impl Fn(&Case) -> bool) {
    let selected: Vec<Case> = cases().into_iter().filter(|c| select(c)).collect();
    assert!(!selected.is_empty(), "no golden cases selected");
    let mut failures = Vec::new();
    let mut loaded: Option<(String, Pipeline)> = None;
    for case in &selected {
        let scratch = tempfile::tempdir().unwrap();
        let dir = model_dir(case, scratch.path());
        let key = format!("{}:{}", case.model, case.strip_tokenizer_json);
        if loaded.as_ref().is_none_or(|(k, _)| *k != key) {
            loaded = Some((key, Pipeline::load(ort_runtime(), &dir).unwrap()));
        }
        let pipeline = &mut loaded.as_mut().unwrap().1;
        let result = match common::parity::generate_case(
            pipeline,
            &params(case),
            &case.id,
            &case.unet_timesteps,
            case.num_images,
        ) {
            Ok(r) => r,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let diff = Diff::of_images(&result.images, &golden(), &case.images, &case.pngs);
        eprintln!("{}: {diff}", case.id);
        if !diff.within_bar() {
            failures.push(format!("{}: {diff}", case.id));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn model(case: &Case, name: &str) -> bool {
    case.model == format!("onnx/{name}")
}

#[test]
fn img2img_sd15_matches_optimum() {
    check(|c| c.mode == "img2img" && model(c, "tiny-sd15"));
}

#[test]
fn img2img_sdxl_matches_optimum() {
    check(|c| c.mode == "img2img" && model(c, "tiny-sdxl"));
}

#[test]
fn inpaint_with_a_4_channel_unet_matches_optimum() {
    check(|c| c.mode == "inpaint" && model(c, "tiny-sd15"));
}

#[test]
fn inpaint_with_a_9_channel_unet_matches_optimum() {
    check(|c| c.mode == "inpaint" && model(c, "tiny-sd15-inpaint"));
}

#[test]
fn turbo_settings_match_optimum() {
    check(|c| model(c, "tiny-turbo"));
}

#[test]
fn exclamation_prompts_match_optimum_with_and_without_tokenizer_json() {
    check(|c| model(c, "tiny-sd2-v") || (c.mode == "txt2img" && model(c, "tiny-sdxl")));
}

#[test]
fn lcm_distilled_txt2img_and_img2img_match_optimum() {
    check(|c| model(c, "tiny-lcm"));
}
