//! Golden-trajectory checks against diffusers, shared with [`crate::scheduler::unipc`]'s tests.

use std::path::{Path, PathBuf};

use ndarray::{Array4, Array5, ArrayD, Axis};
use ndarray_npy::read_npy;
use serde_json::Value;

use crate::rng::NoiseSource;
use crate::scheduler::config::{SchedulerClass, SchedulerConfig};
use crate::scheduler::{Scheduler, SchedulerError};

/// A noise source the deterministic schedulers must never draw from.
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn fill_randn(&mut self, _out: &mut [f32]) {
        panic!("a deterministic scheduler drew noise");
    }
}

/// For a case diffusers refused: checks that we refuse it too when diffusers
/// refused the configuration, and returns `true` (nothing more to compare).
pub fn skip_refused(case: &Case, we_refuse: impl FnOnce() -> bool) -> bool {
    let Some(error) = case.meta.get("error") else {
        return false;
    };
    if error["stage"] == "set_timesteps" || error["stage"] == "init" {
        assert!(
            we_refuse(),
            "{}/{}: diffusers refuses: {error}",
            case.config,
            case.steps
        );
    } else {
        println!(
            "{}/{}: diffusers fails mid-run ({error}); skipped",
            case.config, case.steps
        );
    }
    true
}

/// `tests/golden/schedulers`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/schedulers")
}

/// One golden case: a config directory and a step count.
pub struct Case {
    /// The config directory name (`base`, `vpred`, ...).
    pub config: String,
    /// The number of inference steps.
    pub steps: usize,
    /// The case's JSON metadata.
    pub meta: Value,
}

/// Every golden case of scheduler `name`, from `index.json`.
pub fn cases(name: &str) -> Vec<Case> {
    let index: Value = read_json(&dir().join("index.json"));
    let configs = index["configs"].as_object().expect("configs");
    let mut out = Vec::new();
    for (config, list) in configs {
        for case in list.as_array().expect("cases") {
            if case["name"] != name {
                continue;
            }
            let steps = case["steps"].as_u64().expect("steps") as usize;
            let meta = read_json(&dir().join(config).join(format!("{name}_{steps}.json")));
            out.push(Case {
                config: config.clone(),
                steps,
                meta,
            });
        }
    }
    assert!(!out.is_empty(), "no golden cases for {name}");
    out
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("valid json")
}

/// The case's scheduler config, resolved for `class`.
pub fn resolved(case: &Case, class: SchedulerClass) -> crate::scheduler::ResolvedConfig {
    let path = dir().join(&case.config).join("scheduler_config.json");
    let cfg = SchedulerConfig::from_file(&path).expect("golden config");
    cfg.resolve(class).expect("resolves")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Checks timesteps (exactly) and sigmas; returns the max abs sigma difference.
pub fn check_schedule(case: &Case, sched: &dyn Scheduler, sigmas: &[f32]) -> f64 {
    let label = format!("{}/{}", case.config, case.steps);
    assert_eq!(
        sched.timesteps(),
        floats(&case.meta["timesteps"]),
        "{label} timesteps"
    );
    assert_eq!(case.meta["sigmas_dtype"], "float32", "{label}");
    let want = floats(&case.meta["sigmas"]);
    assert_eq!(sigmas.len(), want.len(), "{label} sigma count");
    let diff = sigmas
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff <= 1e-6, "{label} sigmas differ by {diff}");
    assert_eq!(
        f64::from(sched.init_noise_sigma()),
        case.meta["init_noise_sigma"]
            .as_f64()
            .expect("init_noise_sigma")
    );
    diff
}

/// Runs the golden trajectory (`model_output = 0.1 * input + c_i`) and returns
/// the max abs difference to diffusers' `prev_sample` over all steps.
///
/// With `forced`, every step starts from diffusers' own previous sample (teacher
/// forcing), so the difference measures one step's arithmetic, not its propagation.
pub fn run_trajectory(case: &Case, name: &str, sched: &mut dyn Scheduler, forced: bool) -> f64 {
    let x0: Array4<f32> = read_npy(dir().join("x0.npy")).expect("x0.npy");
    let c: Array5<f32> = read_npy(dir().join("c.npy")).expect("c.npy");
    let prev_path = dir()
        .join(&case.config)
        .join(format!("{name}_{}_prev.npy", case.steps));
    let prev: Array5<f32> = read_npy(prev_path).expect("prev.npy");
    assert_eq!(case.meta["scaled_is_input"], true);
    let calls = sched.timesteps().len();
    assert_eq!(prev.len_of(Axis(0)), calls);
    let mut sample: ArrayD<f32> = x0.into_dyn() * sched.init_noise_sigma();
    let mut worst = 0.0f64;
    for i in 0..calls {
        if forced && i > 0 {
            sample.assign(&prev.index_axis(Axis(0), i - 1));
        }
        let mut input = sample.clone();
        sched.scale_model_input(input.view_mut(), i);
        assert_eq!(input, sample, "scale_model_input is the identity");
        let ci = c.index_axis(Axis(0), i);
        let model_output = input.mapv(|v| 0.1f32 * v) + ci;
        sched
            .step(model_output.view(), i, &mut sample, &mut NoNoise)
            .expect("step");
        let want = prev.index_axis(Axis(0), i);
        let diff = sample
            .iter()
            .zip(want.iter())
            .map(|(&a, &b)| match (a.is_nan(), b.is_nan()) {
                (true, true) => 0.0,
                (false, false) => (a - b).abs(),
                _ => f32::INFINITY,
            })
            .fold(0.0f32, f32::max);
        worst = worst.max(f64::from(diff));
    }
    worst
}

/// Asserts the step-ordering and shape checks.
pub fn check_step_errors(sched: &mut dyn Scheduler) {
    let mut sample = ArrayD::<f32>::zeros(vec![1, 4, 8, 8]);
    let out = ArrayD::<f32>::zeros(vec![1, 4, 8, 8]);
    let bad = ArrayD::<f32>::zeros(vec![1, 3, 8, 8]);
    let err = sched.step(out.view(), 1, &mut sample, &mut NoNoise);
    assert!(matches!(err, Err(SchedulerError::BadStep { .. })));
    let err = sched.step(bad.view(), 0, &mut sample, &mut NoNoise);
    assert!(matches!(err, Err(SchedulerError::BadStep { .. })));
    let n = sched.timesteps().len();
    let err = sched.step(out.view(), n, &mut sample, &mut NoNoise);
    assert!(matches!(err, Err(SchedulerError::BadStep { .. })));
}
