//! Pixel parity with the Python reference: every case in tests/golden/pipelines/manifest.json
//! (written by onnx/make_references.py with Optimum's ORTDiffusionPipeline) is generated
//! in-process from its seed (torch or numpy mode, no given latents) and compared:
//! float images within 1e-3, PNG bytes within 1 level on ≥ 99.9% of values and never
//! more than 2 apart, and the initial latents within 1e-6.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use common::parity::{Diff, ort_runtime, read_png};
use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::rng::{self, RngKind};
use diffusiond::scheduler;
use ndarray::ArrayD;
use ndarray_npy::read_npy;
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
    guidance_rescale: f64,
    width: usize,
    height: usize,
    num_images: usize,
    seed: u64,
    rng: String,
    latents: String,
    images: Vec<String>,
    pngs: Vec<String>,
    unet_timesteps: Vec<f64>,
}

fn root() -> &'static Path {
    common::root()
}

fn golden_dir() -> PathBuf {
    root().join("tests/golden/pipelines")
}

fn cases() -> Vec<Case> {
    common::parity::manifest_cases(&golden_dir())
}

fn pipelines() -> &'static Mutex<HashMap<String, Pipeline>> {
    static P: OnceLock<Mutex<HashMap<String, Pipeline>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

fn params(case: &Case) -> GenerateParams {
    GenerateParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance_scale: case.guidance_scale,
        guidance_rescale: case.guidance_rescale,
        scheduler: Some(case.scheduler.clone()),
        seed: case.seed,
        rng: case.rng.parse().unwrap(),
        latents: None,
        width: case.width,
        height: case.height,
        num_images: case.num_images,
        ..GenerateParams::default()
    }
}

fn run_case(case: &Case) -> Diff {
    let mut map = pipelines().lock().unwrap_or_else(|e| e.into_inner());
    let pipeline = map
        .entry(case.model.clone())
        .or_insert_with(|| Pipeline::load(ort_runtime(), &root().join(&case.model)).unwrap());
    let result = pipeline
        .generate(&params(case), &mut |_, _| true)
        .unwrap_or_else(|e| panic!("{}: {e}", case.id));
    assert_eq!(
        result.timesteps, case.unet_timesteps,
        "{}: UNet timesteps",
        case.id
    );
    assert_eq!(result.images.len(), case.num_images);
    Diff::of_images(&result.images, &golden_dir(), &case.images, &case.pngs)
}

fn check_scheduler(name: &str) {
    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.scheduler == name)
        .collect();
    assert!(!selected.is_empty(), "no golden cases for {name}");
    for case in &selected {
        let d = run_case(case);
        eprintln!("{}: {d}", case.id);
        assert!(d.within_bar(), "{}: {d}", case.id);
    }
}

macro_rules! parity_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { check_scheduler($name); })*

        #[test]
        fn every_scheduler_has_a_parity_test() {
            let covered = [$($name),*];
            for name in scheduler::NAMES {
                assert!(covered.contains(name), "{name} has no parity test");
            }
        }
    };
}

parity_tests! {
    parity_pndm => "pndm",
    parity_ddim => "ddim",
    parity_ddpm => "ddpm",
    parity_euler => "euler",
    parity_euler_ancestral => "euler-a",
    parity_heun => "heun",
    parity_lms => "lms",
    parity_dpmpp_2m => "dpm++2m",
    parity_dpmpp_2m_karras => "dpm++2m-karras",
    parity_unipc => "unipc",
    parity_lcm => "lcm",
}

/// The initial latents the pipeline draws equal the reference's, in both seed modes.
#[test]
fn initial_latents_match_reference_draws() {
    for case in cases().iter().filter(|c| c.num_images >= 1) {
        let want: ArrayD<f32> = read_npy(golden_dir().join(&case.latents)).unwrap();
        let mut got = vec![0f32; want.len()];
        let kind: RngKind = case.rng.parse().unwrap();
        rng::noise_source(kind, case.seed)
            .unwrap()
            .fill_randn(&mut got);
        let sigma = scheduler_sigma(case);
        let max = got
            .iter()
            .zip(want.iter())
            .fold(0f32, |m, (g, w)| m.max((g * sigma - w).abs()));
        assert!(max <= 1e-6, "{}: latents differ by {max}", case.id);
    }
}

fn scheduler_sigma(case: &Case) -> f32 {
    let config = scheduler::SchedulerConfig::from_file(
        &root()
            .join(&case.model)
            .join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    scheduler::create(&case.scheduler, &config, case.steps)
        .unwrap()
        .init_noise_sigma()
}

/// Requests batched into one UNet run get the images each gets alone: two euler-a
/// requests (ancestral, so step noise must stay per request), torch and numpy seeds.
#[test]
fn batched_requests_match_their_references() {
    let all = cases();
    let pick = |rng: &str| {
        all.iter()
            .find(|c| c.scheduler == "euler-a" && c.num_images == 2 && c.rng == rng)
            .cloned()
            .expect("golden case")
    };
    let (a, b) = (pick("torch"), pick("numpy"));
    let (pa, pb) = (params(&a), params(&b));
    assert_eq!(pa.batch_key(), pb.batch_key());
    let mut map = pipelines().lock().unwrap_or_else(|e| e.into_inner());
    let pipeline = map
        .entry(a.model.clone())
        .or_insert_with(|| Pipeline::load(ort_runtime(), &root().join(&a.model)).unwrap());
    let run_options = ort::session::RunOptions::new().unwrap();
    let out = pipeline
        .generate_batch(&[&pa, &pb], &run_options, &mut |_, _| true)
        .unwrap();
    for (case, generation) in [(&a, &out[0]), (&b, &out[1])] {
        assert_eq!(generation.images.len(), 2);
        for (i, img) in generation.images.iter().enumerate() {
            let png = read_png(&golden_dir().join(&case.pngs[i]));
            let max = img
                .rgb
                .iter()
                .zip(png.iter())
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap();
            assert!(max <= 2, "{} image {i}: pixel diff {max}", case.id);
        }
    }
}
