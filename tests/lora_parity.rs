//! LoRA parity with diffusers: every case of tests/golden/lora/manifest.json (written by
//! onnx/make_lora_references.py: the LoRA files fused into the torch pipeline with
//! diffusers' `fuse_lora`, exported with Optimum, run with Optimum's ORT pipeline) is
//! generated from the base export with the LoRA files merged at load
//! (`diffusiond::lora::prepare`) and held to the parity bar: float images within 1e-3,
//! PNG bytes within 1 level on ≥ 99.9% of values and never more than 2 apart. Kohya and
//! PEFT files, UNet and text-encoder layers, non-square Linear layers, 1×1 and 3×3 conv
//! LoRAs, SD1.x, SD2-v and SDXL (SGM block names), scales 0.5, 1, -1 and two LoRAs at
//! once. Controls: the same LoRA at a scale 10% off, or merged without the transpose a
//! MatMul weight needs, misses the bar.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::parity::{Diff, Golden, check_case, generate_case, ort_runtime};
use diffusiond::lora::{self, LoraSpec, Overrides};
use diffusiond::model::ModelBundle;
use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::rng::RngKind;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
struct LoraRef {
    file: String,
    name: String,
    scale: f64,
}

#[derive(Debug, Deserialize, Clone)]
struct Case {
    id: String,
    model: String,
    loras: Vec<LoraRef>,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    guidance_scale: f64,
    seed: u64,
    width: usize,
    height: usize,
    num_images: usize,
    unet_timesteps: Vec<f64>,
    images: Vec<String>,
    pngs: Vec<String>,
}

fn golden_dir() -> PathBuf {
    common::root().join("tests/golden/lora")
}

fn cases() -> Vec<Case> {
    common::parity::manifest_cases(&golden_dir())
}

/// The case's LoRA files at their scales times `scale_factor` (ONNX Runtime loaded
/// first: the merged weights are its tensors).
fn specs(case: &Case, scale_factor: f64) -> Vec<LoraSpec> {
    ort_runtime();
    case.loras
        .iter()
        .map(|l| LoraSpec {
            name: l.name.clone(),
            path: golden_dir().join(&l.file),
            scale: l.scale * scale_factor,
        })
        .collect()
}

fn params(case: &Case) -> GenerateParams {
    GenerateParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        rng: RngKind::Torch,
        width: case.width,
        height: case.height,
        num_images: case.num_images,
        ..GenerateParams::default()
    }
}

fn pipeline(case: &Case, merged: &Overrides) -> Pipeline {
    let dir = common::root().join(&case.model);
    let bundle = Arc::new(ModelBundle::open(&dir).unwrap());
    Pipeline::with_loras(ort_runtime(), bundle, merged).unwrap()
}

fn golden(case: &Case) -> Golden<'_> {
    Golden {
        id: &case.id,
        unet_timesteps: &case.unet_timesteps,
        images: &case.images,
        pngs: &case.pngs,
    }
}

fn model_dir(case: &Case) -> PathBuf {
    common::root().join(&case.model)
}

#[test]
fn every_case_matches_diffusers_fused_lora() {
    let cases = cases();
    assert!(cases.len() >= 8, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let merged = lora::prepare(&model_dir(case), &specs(case, 1.0))
            .unwrap_or_else(|e| panic!("{}: {e}", case.id));
        assert!(!merged.is_empty(), "{}: nothing merged", case.id);
        eprintln!(
            "{}: {} initializers replaced, {} KiB",
            case.id,
            merged.len(),
            merged.bytes() >> 10
        );
        let mut p = pipeline(case, &merged);
        let names: Vec<&str> = p.loras().iter().map(|a| a.name.as_str()).collect();
        let want: Vec<&str> = case.loras.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, want, "{}", case.id);
        if let Err(e) = check_case(&mut p, &params(case), &golden(case), &golden_dir()) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "cases off the bar:\n{}",
        failures.join("\n")
    );
}

/// Generates `case` with `merged` and returns its difference from the reference.
fn diff_with(case: &Case, merged: &Overrides) -> Diff {
    let mut p = pipeline(case, merged);
    let g = golden(case);
    let result = generate_case(&mut p, &params(case), g.id, g.unet_timesteps, 1).unwrap();
    Diff::of_images(&result.images, &golden_dir(), &case.images, &case.pngs)
}

fn case(id: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no case {id}"))
}

#[test]
fn the_bar_catches_a_wrong_scale_and_a_missing_transpose() {
    let c = case("sd15_kohya-s1");
    let right = diff_with(&c, &lora::prepare(&model_dir(&c), &specs(&c, 1.0)).unwrap());
    assert!(right.within_bar(), "right: {right}");
    let off = diff_with(&c, &lora::prepare(&model_dir(&c), &specs(&c, 0.9)).unwrap());
    eprintln!("scale 0.9 instead of 1: {off}");
    assert!(!off.within_bar(), "a 10% scale error passed the bar: {off}");

    // The same file with each MatMul weight taking the delta untransposed.
    let wrong = lora::apply::prepare_untransposed(&model_dir(&c), &specs(&c, 1.0)).unwrap();
    let untransposed = diff_with(&c, &wrong);
    eprintln!("without the transpose: {untransposed}");
    assert!(
        !untransposed.within_bar(),
        "a merge without the transpose passed the bar: {untransposed}"
    );
}

#[test]
fn an_fp16_export_takes_the_lora_rounded_once_to_float16() {
    // tiny-sd15-fp16 is tiny-sd15 cast to float16 (onnx/make_fp16.py, names kept): each
    // merged float16 weight is the float32 merge rounded to float16, give or take what the
    // base weight's own rounding added (at most one float16 step at the tensor's largest
    // magnitude); and the sessions use them (the image moves as far from the base image
    // as the float32 one does).
    let c = case("sd15_kohya-s1");
    let fp16 = common::root().join("onnx/tiny-sd15-fp16");
    let fp32 = model_dir(&c);
    let merged16 = lora::prepare(&fp16, &specs(&c, 1.0)).unwrap();
    let merged32 = lora::prepare(&fp32, &specs(&c, 1.0)).unwrap();
    assert_eq!(merged16.len(), 21);
    for folder in ["unet", "text_encoder"] {
        let f32s: std::collections::HashMap<&str, _> = merged32
            .for_folder(folder)
            .initializers
            .iter()
            .map(|(n, v)| (n.as_str(), v))
            .collect();
        let replaced = merged16.for_folder(folder);
        assert!(replaced.float16, "{folder}");
        assert_eq!(replaced.conv_weights, folder == "unet", "{folder}");
        for (name, value) in &replaced.initializers {
            let (_, got) = value
                .try_extract_tensor::<half::f16>()
                .unwrap_or_else(|e| panic!("{folder}/{name} is not float16: {e}"));
            let (_, want) = f32s[name.as_str()].try_extract_tensor::<f32>().unwrap();
            let largest = want.iter().fold(0f32, |m, w| m.max(w.abs()));
            let base_step = largest / 1024.0;
            for (g, w) in got.iter().zip(want) {
                let rounded = half::f16::from_f32(*w);
                let step =
                    (half::f16::from_bits(rounded.to_bits() + 1).to_f32() - rounded.to_f32()).abs();
                assert!(
                    (g.to_f32() - rounded.to_f32()).abs() <= step + base_step,
                    "{folder}/{name}: {g} against {w}"
                );
            }
        }
    }
    let image = |dir: &std::path::Path, merged: &Overrides| {
        let bundle = Arc::new(ModelBundle::open(dir).unwrap());
        let mut p = Pipeline::with_loras(ort_runtime(), bundle, merged).unwrap();
        let g = p.generate(&params(&c), &mut |_, _| true).unwrap();
        g.images[0].float.clone()
    };
    let mean = |a: &ndarray::Array3<f32>, b: &ndarray::Array3<f32>| {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / a.len() as f32
    };
    let moved16 = mean(&image(&fp16, &merged16), &image(&fp16, &Overrides::none()));
    let moved32 = mean(&image(&fp32, &merged32), &image(&fp32, &Overrides::none()));
    eprintln!("mean change the LoRA makes: fp16 {moved16:.2e}, fp32 {moved32:.2e}");
    assert!(
        moved16 > moved32 / 2.0 && moved16 < moved32 * 2.0,
        "fp16 {moved16}, fp32 {moved32}"
    );
}
