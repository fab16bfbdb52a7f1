//! The flow-matching schedulers (`flow-euler`, `flow-heun`) against diffusers 0.39.0,
//! from the goldens `onnx/golden_flow_schedulers.py` writes to
//! `tests/golden/schedulers/flow/`: for SD3, SD3.5, FLUX.1-schnell and FLUX.1-dev configs
//! (and configs exercising the remaining options), driven as their pipelines drive them,
//! the sigmas, timesteps, `mu`, img2img truncation, `scale_noise` and step trajectories
//! must all be bit-identical to diffusers' float32 values.

use std::path::{Path, PathBuf};

use serde_json::Value;

use diffusiond::scheduler::flow_match::{
    FlowMatchEuler, FlowMatchHeun, FlowPipeline, image_seq_len,
};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/schedulers/flow")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid golden json")
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float array")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

/// Asserts bit equality (printing the worst difference on failure).
fn assert_bits(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    let same = got
        .iter()
        .zip(want)
        .all(|(g, w)| g.to_bits() == w.to_bits());
    assert!(
        same,
        "{label}: differs by up to {worst:e}\n got {got:?}\nwant {want:?}"
    );
}

struct Inputs {
    x0: Vec<f32>,
    noise: Vec<f32>,
    c: Vec<Vec<f32>>,
}

fn inputs() -> Inputs {
    let v = read_json(&golden_dir().join("inputs.json"));
    Inputs {
        x0: f32s(&v["x0"]),
        noise: f32s(&v["noise"]),
        c: v["c"].as_array().expect("c").iter().map(f32s).collect(),
    }
}

/// One of the two schedulers, behind the calls the goldens exercise.
enum Flow {
    Euler(FlowMatchEuler),
    Heun(FlowMatchHeun),
}

impl Flow {
    fn timesteps(&self) -> &[f32] {
        match self {
            Flow::Euler(s) => s.timesteps(),
            Flow::Heun(s) => s.timesteps(),
        }
    }

    fn sigmas(&self) -> &[f32] {
        match self {
            Flow::Euler(s) => s.sigmas(),
            Flow::Heun(s) => s.sigmas(),
        }
    }

    fn step(&mut self, m: &[f32], x: &mut [f32]) {
        match self {
            Flow::Euler(s) => s.step(m, x),
            Flow::Heun(s) => s.step(m, x),
        }
        .expect("step")
    }
}

/// A fresh scheduler configured as the golden's pipeline does; `Err` if refused.
fn configure(golden: &Value, case: &Value) -> Result<Flow, String> {
    let config = &golden["config"];
    let steps = case["steps"].as_u64().expect("steps") as usize;
    if golden["class"] == "FlowMatchHeunDiscreteScheduler" {
        let mut s = FlowMatchHeun::from_config(config).map_err(|e| e.to_string())?;
        s.set_timesteps(steps).map_err(|e| e.to_string())?;
        return Ok(Flow::Heun(s));
    }
    let pipeline = match golden["pipeline"].as_str() {
        Some("flux") => FlowPipeline::Flux,
        _ => FlowPipeline::Sd3,
    };
    let mut s = FlowMatchEuler::from_config(config).map_err(|e| e.to_string())?;
    let size = case["size"].as_u64().map_or(1024, |s| s as usize);
    let mu = s.config().pipeline_mu(pipeline, size, size);
    assert_eq!(mu, case["mu"].as_f64(), "mu for {size}x{size}");
    if let Some(seq) = case["image_seq_len"].as_u64() {
        assert_eq!(image_seq_len(size, size), seq as usize);
    }
    s.set_timesteps_for(pipeline, steps, size, size)
        .map_err(|e| e.to_string())?;
    Ok(Flow::Euler(s))
}

/// Steps from `latents` with the fake model outputs `c[0], c[1], ...` for `calls` calls
/// and compares the recorded checkpoints.
fn check_trajectory(label: &str, s: &mut Flow, mut latents: Vec<f32>, calls: usize, prev: &Value) {
    let c = &inputs().c;
    let prev = prev.as_object().expect("prev");
    assert!(
        calls <= c.len(),
        "{label}: {calls} calls need more fake outputs"
    );
    for (i, ci) in c.iter().take(calls).enumerate() {
        s.step(ci, &mut latents);
        if let Some(want) = prev.get(&i.to_string()) {
            assert_bits(&format!("{label} after step {i}"), &latents, &f32s(want));
        }
    }
    assert!(
        prev.contains_key(&(calls - 1).to_string()),
        "{label}: final step recorded"
    );
}

fn check_file(name: &str) -> usize {
    let golden = read_json(&golden_dir().join(format!("{name}.json")));
    let inputs = inputs();
    let mut checked = 0;
    for case in golden["cases"].as_array().expect("cases") {
        let label = format!("{name} steps {} size {}", case["steps"], case["size"]);
        if case.get("error").is_some() {
            assert!(
                configure(&golden, case).is_err(),
                "{label}: diffusers gives NaN"
            );
            continue;
        }
        let mut s = configure(&golden, case).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_bits(
            &format!("{label} sigmas"),
            s.sigmas(),
            &f32s(&case["sigmas"]),
        );
        assert_bits(
            &format!("{label} timesteps"),
            s.timesteps(),
            &f32s(&case["timesteps"]),
        );
        if let Some(prev) = case.get("prev") {
            let calls = s.timesteps().len();
            check_trajectory(&label, &mut s, inputs.x0.clone(), calls, prev);
        }
        for entry in case["img2img"].as_array().expect("img2img") {
            let strength = entry["strength"].as_f64().expect("strength");
            let label = format!("{label} strength {strength}");
            let mut s = configure(&golden, case).expect("configured above");
            let start = match &mut s {
                Flow::Euler(s) => s.apply_strength(strength),
                Flow::Heun(s) => s.apply_strength(strength),
            };
            let remaining = entry["remaining_steps"].as_u64().expect("remaining") as usize;
            let start = match start {
                Ok(start) => start,
                Err(e) => {
                    assert_eq!(remaining, 0, "{label}: {e}");
                    continue;
                }
            };
            assert_eq!(
                start.t_start as u64,
                entry["t_start"].as_u64().unwrap(),
                "{label}"
            );
            assert_eq!(
                start.begin_index as u64,
                entry["begin_index"].as_u64().unwrap(),
                "{label}"
            );
            assert_eq!(start.steps, remaining, "{label}");
            let truncated = &s.timesteps()[start.begin_index..];
            assert_bits(
                &format!("{label} timesteps"),
                truncated,
                &f32s(&entry["timesteps"]),
            );
            let Some(want) = entry.get("scale_noise") else {
                continue;
            };
            let mut latents = vec![0.0; inputs.x0.len()];
            let t = truncated[0];
            match &s {
                Flow::Euler(e) => e.scale_noise(&inputs.x0, t, &inputs.noise, &mut latents),
                Flow::Heun(h) => h.scale_noise(&inputs.x0, t, &inputs.noise, &mut latents),
            }
            .expect("scale_noise");
            assert_bits(&format!("{label} scale_noise"), &latents, &f32s(want));
            if let Some(prev) = entry.get("prev") {
                let calls = truncated.len();
                check_trajectory(&label, &mut s, latents, calls, prev);
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "{name}: no cases");
    checked
}

const EULER_GOLDENS: &[&str] = &[
    "sd3-medium",
    "sd35-large",
    "flux-schnell",
    "flux-dev",
    "sd3-dynamic",
    "flux-linear",
    "sd3-dynamic-linear",
    "sd3-terminal",
    "flux-terminal",
    "sd3-invert",
    "sd3-karras",
    "flux-karras",
    "sd3-exponential",
    "flux-exponential",
    "sd3-shift-odd",
];

#[test]
fn model_configs_match_diffusers_bit_for_bit() {
    for name in ["sd3-medium", "sd35-large", "flux-schnell", "flux-dev"] {
        eprintln!("{name}: {} cases", check_file(name));
    }
}

#[test]
fn option_configs_match_diffusers_bit_for_bit() {
    for name in &EULER_GOLDENS[4..] {
        eprintln!("{name}: {} cases", check_file(name));
    }
}

#[test]
fn heun_matches_diffusers_bit_for_bit() {
    for name in ["heun-sd3-medium", "heun-shift-odd"] {
        eprintln!("{name}: {} cases", check_file(name));
    }
}

#[test]
fn every_golden_file_is_checked() {
    let mut files: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    for file in files {
        let stem = file.trim_end_matches(".json");
        assert!(
            stem == "inputs" || stem.starts_with("heun-") || EULER_GOLDENS.contains(&stem),
            "{file} is not checked"
        );
    }
}
