//! The bundled demo model draws what it is told: the checker (tests/common/checker.rs, a
//! port of onnx/demo/checker.py) reads shape and colours back from each image.
//! (a) offline, `diffusionctl generate --local` on the 60 evaluation captions meets the
//!     committed accuracy; (b) through the daemon, 4 clients send different captions at
//!     the same time, 5 times over, and every image matches its own caption.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use common::checker::{Attributes, Checker};
use common::{Daemon, PrivateBus, root};
use serde::Deserialize;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

#[derive(Deserialize)]
struct Captions {
    colors_rgb: HashMap<String, [f32; 3]>,
    checker: CheckerSpec,
    evaluation: Evaluation,
    accuracy_onnx: HashMap<String, f64>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct CheckerSpec {
    thresholds: Thresholds,
}

#[derive(Deserialize)]
struct Thresholds {
    corner_patch: usize,
    centre_patch: usize,
    fill_triangle_below: f32,
    fill_square_from: f32,
}

#[derive(Deserialize)]
struct Evaluation {
    steps: u32,
    guidance: f64,
    width: u32,
    height: u32,
}

#[derive(Deserialize, Clone)]
struct Case {
    seed: u64,
    prompt: String,
    shape: String,
    fg: String,
    bg: String,
    ok: bool,
}

impl Case {
    fn expected(&self) -> Attributes {
        Attributes {
            shape: self.shape.clone(),
            fg: self.fg.clone(),
            bg: self.bg.clone(),
        }
    }
}

fn model_dir() -> PathBuf {
    root().join("onnx/tiny-demo")
}

fn captions() -> (Captions, Checker) {
    let text = std::fs::read_to_string(root().join("onnx/demo/captions.json")).unwrap();
    let c: Captions = serde_json::from_str(&text).unwrap();
    let t = &c.checker.thresholds;
    let mut colors: Vec<(String, [f32; 3])> =
        c.colors_rgb.iter().map(|(k, v)| (k.clone(), *v)).collect();
    colors.sort_by(|a, b| a.0.cmp(&b.0));
    let checker = Checker {
        colors,
        corner_patch: t.corner_patch,
        centre_patch: t.centre_patch,
        triangle_below: t.fill_triangle_below,
        square_from: t.fill_square_from,
    };
    (c, checker)
}

fn rgb(png: &[u8]) -> (Vec<u8>, usize) {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    (img.as_raw().clone(), img.width() as usize)
}

#[test]
fn offline_accuracy_on_the_sixty_captions_meets_the_committed_figure() {
    let (c, checker) = captions();
    assert_eq!(c.cases.len(), 60);
    let dir = tempfile::tempdir().unwrap();
    let mut right = 0;
    for (i, case) in c.cases.iter().enumerate() {
        let out = dir.path().join(format!("{i}.png"));
        let status = Command::new(env!("CARGO_BIN_EXE_diffusionctl"))
            .args(["generate", "--local", "--model-dir"])
            .arg(model_dir())
            .args(["--prompt", &case.prompt, "--seed", &case.seed.to_string()])
            .args(["--steps", &c.evaluation.steps.to_string()])
            .args(["--guidance", &c.evaluation.guidance.to_string()])
            .args([
                "--width",
                &c.evaluation.width.to_string(),
                "--height",
                &c.evaluation.height.to_string(),
            ])
            .arg("--output")
            .arg(&out)
            .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{}", case.prompt);
        let (pixels, size) = rgb(&std::fs::read(&out).unwrap());
        let got = checker.analyse(&pixels, size);
        right += usize::from(got == case.expected());
    }
    let accuracy = right as f64 / c.cases.len() as f64;
    let committed = c.accuracy_onnx["all"];
    eprintln!("demo accuracy through diffusionctl --local: {accuracy:.4} (committed {committed})");
    assert!(
        accuracy >= committed,
        "accuracy {accuracy} below the committed {committed}"
    );
    assert!(accuracy >= 0.9, "accuracy {accuracy} below the 90% goal");
}

/// Four correctly drawn captions with different foreground colours, so a prompt that
/// crossed to another job would be caught.
fn distinct_four(cases: &[Case], start: usize) -> Vec<Case> {
    let mut chosen: Vec<Case> = Vec::new();
    for case in cases.iter().cycle().skip(start).take(cases.len()) {
        let differs = chosen
            .iter()
            .all(|o| o.prompt != case.prompt && o.fg != case.fg);
        if case.ok && differs {
            chosen.push(case.clone());
            if chosen.len() == 4 {
                break;
            }
        }
    }
    assert_eq!(chosen.len(), 4, "not enough distinct correct captions");
    chosen
}

#[test]
fn four_clients_at_once_each_get_the_image_of_their_own_caption() {
    let (c, checker) = captions();
    let bus = PrivateBus::start();
    let extra = format!(
        "[models.demo]\npath = \"{}\"\n\n[jobs]\nmax_batch_images = 4\n",
        model_dir().display()
    );
    let _d = Daemon::start(&bus, &extra);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let clients = [bus.connect().await, bus.connect().await, bus.connect().await, bus.connect().await];
        let mut largest_batch = 0;
        let mut results = 0;
        for round in 0..5 {
            let four = distinct_four(&c.cases, round * 11);
            let mut tasks = Vec::new();
            for (conn, case) in clients.iter().cloned().zip(four) {
                let (steps, guidance) = (c.evaluation.steps, c.evaluation.guidance);
                let (w, h) = (c.evaluation.width, c.evaluation.height);
                tasks.push(tokio::spawn(async move {
                    let req: HashMap<String, OwnedValue> = [
                        ("prompt", Value::from(case.prompt.as_str())),
                        ("model", Value::from("demo")),
                        ("seed", Value::U64(case.seed)),
                        ("steps", Value::U32(steps)),
                        ("guidance_scale", Value::F64(guidance)),
                        ("width", Value::U32(w)),
                        ("height", Value::U32(h)),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
                    .collect();
                    let reply = conn
                        .call_method(
                            Some("io.github.Diffusiond1"),
                            "/io/github/Diffusiond1",
                            Some("io.github.Diffusiond1.Manager"),
                            "Generate",
                            &(req,),
                        )
                        .await
                        .unwrap();
                    let path: OwnedObjectPath = reply.body().deserialize().unwrap();
                    let reply = conn
                        .call_method(Some("io.github.Diffusiond1"), path.as_str(), Some("io.github.Diffusiond1.Job"), "Wait", &())
                        .await
                        .unwrap();
                    let result: HashMap<String, OwnedValue> = reply.body().deserialize().unwrap();
                    (case, result)
                }));
            }
            for t in tasks {
                let (case, result) = t.await.unwrap();
                let images = Vec::<Vec<u8>>::try_from(result["images"].try_clone().unwrap()).unwrap();
                let (pixels, size) = rgb(&images[0]);
                let got = checker.analyse(&pixels, size);
                assert_eq!(got, case.expected(), "round {round}: {:?} drew {got:?}", case.prompt);
                let text = common::png_parameters(&images[0]).unwrap_or_default();
                assert!(text.starts_with(&case.prompt), "the PNG's parameters name another prompt: {text}");
                largest_batch = largest_batch.max(u32::try_from(&result["batch_size"]).unwrap());
                results += 1;
            }
        }
        assert_eq!(results, 20);
        assert!(largest_batch > 1, "no two clients' jobs were batched together");
        eprintln!("cross-client batching: 20/20 images match their own captions, largest batch {largest_batch}");
    });
}
