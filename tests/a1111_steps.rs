//! AUTOMATIC1111 prompts as webui 1.10.1 runs them by default, held to the parity bar
//! (tests/common/parity.rs) against tests/golden/a1111/steps/ (written by
//! onnx/make_a1111_step_references.py, which imports webui's own prompt_parser.py and runs
//! its CFG denoiser's steps through Optimum's pipelines):
//!
//! - a prompt and a negative prompt of different lengths: separate UNet runs, or with
//!   `a1111_pad_cond_uncond` the shorter padded with empty chunks;
//! - SDXL with an empty negative prompt: zeros;
//! - prompt editing (`[a:b:0.5]`, `[a:b:2]`, `[a::0.4]`, `[:b:4]`), alternation
//!   (`[a|b]`), `AND` with weights and a trailing `:weight`, in the prompt and the negative
//!   prompt, image-to-image included (the schedule of the full step count, from its start).
//!
//! Controls show that the bar tells webui's behaviours apart: the padded run misses the
//! unpadded reference, and a prompt-editing run with the schedule taken as literal words
//! misses its reference.

mod common;

use common::parity::{Diff, ort_runtime};
use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::prompt_syntax::PromptSyntax;
use diffusiond::request::ImageInput;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
struct Case {
    id: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    guidance_scale: f64,
    width: usize,
    height: usize,
    num_images: usize,
    seed: u64,
    pad: bool,
    init_image: Option<String>,
    strength: Option<f64>,
    images: Vec<String>,
    pngs: Vec<String>,
    unet_timesteps: Vec<f64>,
}

impl Case {
    fn golden(&self) -> common::parity::Golden<'_> {
        common::parity::Golden {
            id: &self.id,
            unet_timesteps: &self.unet_timesteps,
            images: &self.images,
            pngs: &self.pngs,
        }
    }
}

fn golden() -> std::path::PathBuf {
    common::root().join("tests/golden/a1111/steps")
}

fn cases() -> Vec<Case> {
    common::parity::manifest_cases(&golden())
}

fn case(prefix: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.id.starts_with(prefix))
        .unwrap_or_else(|| panic!("no golden case {prefix}"))
}

fn params(case: &Case) -> GenerateParams {
    GenerateParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        width: case.width,
        height: case.height,
        num_images: case.num_images,
        prompt_syntax: PromptSyntax::A1111,
        a1111_pad_cond_uncond: case.pad,
        init_image: case
            .init_image
            .as_ref()
            .map(|p| ImageInput::new(std::fs::read(common::root().join(p)).expect("init image"))),
        strength: case.strength,
        ..GenerateParams::default()
    }
}

fn load(model: &str) -> Pipeline {
    Pipeline::load(ort_runtime(), &common::root().join(model)).expect("fixture model")
}

/// Runs every case of one model and checks it against the reference.
fn check(model: &str) {
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.model == format!("onnx/{model}"))
        .collect();
    assert!(!selected.is_empty(), "no golden cases for {model}");
    let mut pipeline = load(&format!("onnx/{model}"));
    let failures: Vec<String> = selected
        .iter()
        .filter_map(|case| {
            common::parity::check_case(&mut pipeline, &params(case), &case.golden(), &golden())
                .err()
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn editing_alternation_and_unequal_lengths_on_a_trained_sd15_encoder_match_webui() {
    check("tiny-demo");
}

#[test]
fn a_long_prompt_without_negative_on_sd15_runs_apart_as_webui() {
    check("tiny-sd15");
}

#[test]
fn sdxl_unequal_lengths_empty_negative_editing_and_and_match_webui() {
    check("tiny-sdxl");
}

/// Generates `params` and compares it with `reference`'s images.
fn against(pipeline: &mut Pipeline, params: &GenerateParams, reference: &Case) -> Diff {
    let got = pipeline.generate(params, &mut |_, _| true).unwrap();
    Diff::of_images(&got.images, &golden(), &reference.images, &reference.pngs)
}

/// webui's default and its padded option differ, and the bar tells them apart both ways.
#[test]
fn padding_misses_the_unpadded_reference_and_the_reverse() {
    for (plain, padded) in [
        ("demo-long-short-neg-s", "demo-long-short-neg-pad-s"),
        ("sdxl-long-short-neg-s", "sdxl-long-short-neg-pad-s"),
    ] {
        let (plain, padded) = (case(plain), case(padded));
        let mut pipeline = load(&plain.model);
        let mut p = params(&plain);
        p.a1111_pad_cond_uncond = true;
        let diff = against(&mut pipeline, &p, &plain);
        eprintln!("padded against {}: {diff}", plain.id);
        assert!(!diff.within_bar(), "padding made no difference: {diff}");
        let diff = against(&mut pipeline, &params(&plain), &padded);
        eprintln!("unpadded against {}: {diff}", padded.id);
        assert!(!diff.within_bar(), "padding made no difference: {diff}");
    }
}

/// Prompt editing taken as words (escaped, so the text is what an unaware parser would
/// encode) misses the reference.
#[test]
fn editing_taken_as_words_misses_the_reference() {
    let reference = case("demo-edit-s");
    let mut pipeline = load(&reference.model);
    let mut p = params(&reference);
    p.prompt = "a \\[red:green:0.5\\] circle on a \\[black:blue:2\\] background".into();
    let diff = against(&mut pipeline, &p, &reference);
    eprintln!("literal against {}: {diff}", reference.id);
    assert!(!diff.within_bar(), "{diff}");
}

/// On SDXL an empty negative is zeros, not the empty prompt encoded (diffusers' reading).
#[test]
fn sdxl_empty_negative_as_diffusers_encodes_it_misses_the_reference() {
    let reference = case("sdxl-empty-neg-s");
    let mut pipeline = load(&reference.model);
    let mut p = params(&reference);
    // The prompt has no syntax: both readings encode it alike.
    p.prompt_syntax = PromptSyntax::Diffusers;
    let diff = against(&mut pipeline, &p, &reference);
    eprintln!("encoded empty negative against {}: {diff}", reference.id);
    assert!(!diff.within_bar(), "{diff}");
}
