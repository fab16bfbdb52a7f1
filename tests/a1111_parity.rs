//! Image parity of `prompt_syntax = a1111` with webui's rules run through Optimum: every
//! case in tests/golden/a1111/images/manifest.json (written by
//! onnx/make_a1111_references.py, which builds the chunked, weighted prompt embeddings
//! with onnx/golden_a1111.py's rules and hands them to Optimum's ORT pipelines) is
//! generated in-process from its prompt text and seed and held to the parity bar of
//! tests/common/parity.rs. The cases cover prompts and negatives longer than 75 tokens,
//! BREAK, '!' on SDXL's second tokenizer (unequal chunk counts per encoder), nested,
//! explicit and escaped weights, and weighted negatives, on SD1.x and SDXL.
//!
//! These references pad the shorter of the prompt and the negative prompt with empty
//! chunks (webui's "Pad prompt/negative prompt" option): cases whose encoded prompt and
//! negative differ in chunk count run with `a1111_pad_cond_uncond`. webui's default
//! (separate UNet runs) is held to tests/golden/a1111/steps/ in tests/a1111_steps.rs.

mod common;

use common::parity::{Diff, ort_runtime};
use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::prompt_syntax::PromptSyntax;
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
    images: Vec<String>,
    pngs: Vec<String>,
    weighted: bool,
    unet_timesteps: Vec<f64>,
    /// Per text encoder: the prompt's and the negative's chunk counts before padding.
    chunks: std::collections::BTreeMap<String, Chunks>,
}

#[derive(Debug, Deserialize, Clone)]
struct Chunks {
    prompt: usize,
    negative: Option<usize>,
}

impl Case {
    /// Whether the reference padded an encoded negative prompt and the prompt to one
    /// chunk count (SDXL's null negative is zeros: any length gives the same UNet output).
    fn padded(&self) -> bool {
        let max = |f: fn(&Chunks) -> Option<usize>| self.chunks.values().filter_map(f).max();
        let negative = max(|c| c.negative);
        negative.is_some() && negative != max(|c| Some(c.prompt))
    }
}

fn golden_dir() -> std::path::PathBuf {
    common::root().join("tests/golden/a1111/images")
}

fn cases() -> Vec<Case> {
    common::parity::manifest_cases(&golden_dir())
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
        a1111_pad_cond_uncond: case.padded(),
        ..GenerateParams::default()
    }
}

/// Runs every case of one model and checks it against the reference.
fn check(model: &str) {
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.model == format!("onnx/{model}"))
        .collect();
    assert!(!selected.is_empty(), "no golden cases for {model}");
    let mut pipeline = Pipeline::load(ort_runtime(), &common::root().join("onnx").join(model))
        .expect("fixture model");
    let mut failures = Vec::new();
    for case in &selected {
        eprintln!(
            "{} (weighted: {}, padded: {})",
            case.id,
            case.weighted,
            case.padded()
        );
        let golden = common::parity::Golden {
            id: &case.id,
            unet_timesteps: &case.unet_timesteps,
            images: &case.images,
            pngs: &case.pngs,
        };
        if let Err(e) =
            common::parity::check_case(&mut pipeline, &params(case), &golden, &golden_dir())
        {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn long_prompts_and_break_on_sd15_match_the_reference() {
    check("tiny-sd15");
}

#[test]
fn long_weighted_and_bang_prompts_on_sdxl_match_the_reference() {
    check("tiny-sdxl");
}

#[test]
fn weighted_prompts_on_a_trained_encoder_match_the_reference() {
    check("tiny-demo");
}

/// The weights are not a no-op and the bar tells them apart: the weighted reference
/// is not met by the same words generated without weights, with the same seed.
#[test]
fn the_same_words_without_weights_miss_the_weighted_reference() {
    let case = cases()
        .into_iter()
        .find(|c| c.id.starts_with("demo-explicit"))
        .unwrap();
    assert!(case.weighted);
    let mut pipeline =
        Pipeline::load(ort_runtime(), &common::root().join("onnx/tiny-demo")).unwrap();
    let mut unweighted = params(&case);
    unweighted.prompt = "a red circle on a blue background".into();
    let got = pipeline.generate(&unweighted, &mut |_, _| true).unwrap();
    let diff = Diff::of_images(&got.images, &golden_dir(), &case.images, &case.pngs);
    eprintln!("unweighted against {}: {diff}", case.id);
    assert!(
        !diff.within_bar(),
        "weights made no visible difference: {diff}"
    );
}
