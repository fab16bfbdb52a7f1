//! Diffusion schedulers: pure functions on `ndarray`, configured from a model's
//! `scheduler/scheduler_config.json` exactly as diffusers' `from_config` reads it.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD};

use crate::rng::NoiseSource;

pub mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod flow_match;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod unipc;

pub use config::{ConfigError, PredictionType, ResolvedConfig, SchedulerClass, SchedulerConfig};

/// Errors raised while configuring or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The scheduler name is not one diffusiond knows.
    #[error("unknown scheduler '{0}' (known: {known})", known = NAMES.join(", "))]
    Unknown(String),
    /// A configuration value is outside what the scheduler supports.
    #[error("scheduler '{scheduler}': {message}")]
    InvalidConfig {
        /// The scheduler's diffusiond name.
        scheduler: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// The requested number of inference steps cannot be used with this configuration.
    #[error("scheduler '{scheduler}' cannot run {steps} steps: {message}")]
    InvalidSteps {
        /// The scheduler's diffusiond name.
        scheduler: &'static str,
        /// The number of steps asked for.
        steps: usize,
        /// Why not.
        message: String,
    },
    /// The scheduler config could not be read or holds unsupported values.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `step` was called with a step index out of order or past the last timestep.
    #[error("scheduler '{scheduler}': bad step index {step_index}: {message}")]
    BadStep {
        /// The scheduler's diffusiond name.
        scheduler: &'static str,
        /// The step index passed.
        step_index: usize,
        /// What is wrong.
        message: String,
    },
}

/// Every scheduler name diffusiond accepts.
pub const NAMES: &[&str] = &[
    "pndm",
    "ddim",
    "ddpm",
    "euler",
    "euler-a",
    "heun",
    "lms",
    "dpm++2m",
    "dpm++2m-karras",
    "unipc",
    "lcm",
];

/// One configured scheduler for one generation (`set_timesteps` already applied).
///
/// The pipeline drives it exactly as diffusers' `StableDiffusionPipeline` does:
/// ```text
/// latents *= init_noise_sigma()
/// for (i, t) in timesteps().enumerate():
///     input = scale_model_input(latents (duplicated for CFG), i)
///     noise_pred = unet(input, t)            // then CFG
///     step(noise_pred, i, &mut latents, noise)
/// ```
pub trait Scheduler: Send {
    /// The timesteps the UNet is evaluated at, in order: one entry per UNet call
    /// (Heun and PNDM repeat entries). Values are what diffusers passes to the UNet.
    fn timesteps(&self) -> &[f64];

    /// The factor diffusers multiplies the initial noise by (1 unless the scheduler
    /// works in sigma space).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// Scales the UNet input for step `step_index`, in place (diffusers' `scale_model_input`);
    /// the identity unless the scheduler works in sigma space.
    fn scale_model_input(&self, sample: ArrayViewMutD<'_, f32>, step_index: usize) {
        let _ = (sample, step_index);
    }

    /// Advances `sample` by one step, given the guided model output for step `step_index`.
    /// Stochastic schedulers draw their noise from `noise`, one `randn(sample.shape)` call
    /// per step, as diffusers does with the pipeline's generator.
    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError>;

    /// The scheduler's float32 sigma schedule (diffusers' `scheduler.sigmas`), for the
    /// schedulers that have one; `None` otherwise.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// diffusers' `scheduler.order`: UNet calls per step (2 for Heun, 1 otherwise).
    fn order(&self) -> usize {
        1
    }

    /// Starts the run at timestep index `begin` instead of 0 (image-to-image and
    /// inpainting skip the noisiest steps), as diffusers' `set_begin_index(begin)` does;
    /// `step` then takes indices from `begin` on. PNDM, which has no begin index in
    /// diffusers, counts its steps from the start of the shortened list, as there.
    fn set_begin_index(&mut self, begin: usize);

    /// The noise level of timestep index `index`, for diffusers' `add_noise`: what the
    /// image latents are noised to before the first step (index `begin`), and, in
    /// 4-channel inpainting, after each step (the next index).
    fn noise_level(&self, index: usize) -> NoiseLevel;

    /// What the UNet predicts (the config's `prediction_type`).
    fn prediction_type(&self) -> PredictionType {
        PredictionType::Epsilon
    }

    /// The predicted clean latents x0 (diffusers' `pred_original_sample`) at timestep index
    /// `index`, from the latents the UNet saw there (before `scale_model_input`) and its
    /// (guided) output: [`pred_original_sample`] at [`Scheduler::noise_level`]. `out`,
    /// `sample` and `model_output` have the same length.
    fn pred_original_sample(
        &self,
        index: usize,
        sample: &[f32],
        model_output: &[f32],
        out: &mut [f32],
    ) {
        pred_original_sample(
            self.noise_level(index),
            self.prediction_type(),
            sample,
            model_output,
            out,
        );
    }
}

/// How `add_noise` mixes a clean sample with noise at one timestep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseLevel {
    /// `sample + noise * sigma` (schedulers in sigma space: Euler, Heun, LMS).
    Sigma(f32),
    /// `alpha * sample + sigma * noise` (DDPM-family schedulers from `alphas_cumprod`,
    /// DPM-Solver and UniPC from their sigma).
    Vp {
        /// `sqrt(alphas_cumprod[t])`, or `1 / sqrt(sigma^2 + 1)`.
        alpha: f32,
        /// `sqrt(1 - alphas_cumprod[t])`, or `sigma * alpha`.
        sigma: f32,
    },
}

/// The predicted clean latents x0 from latents `sample` at noise level `level` and a model
/// output `model_output` of kind `prediction`, as diffusers' schedulers compute
/// `pred_original_sample` (no clipping or thresholding):
///
/// * sigma-scaled samples (Euler, Heun, LMS: x = x0 + σ·ε, the UNet sees x/√(σ²+1)):
///   epsilon x0 = x − σ·m; v_prediction x0 = m·(−σ/√(σ²+1)) + x/(σ²+1);
/// * alpha-scaled samples (DDIM, DDPM, PNDM, LCM, DPM-Solver, UniPC: x = α·x0 + σ·ε with
///   α = √ᾱ, σ = √(1−ᾱ)): epsilon x0 = (x − σ·m)/α; v_prediction x0 = α·x − σ·m;
/// * `sample` prediction: x0 = m.
pub fn pred_original_sample(
    level: NoiseLevel,
    prediction: PredictionType,
    sample: &[f32],
    model_output: &[f32],
    out: &mut [f32],
) {
    let parts = out.iter_mut().zip(sample).zip(model_output);
    match (level, prediction) {
        (_, PredictionType::Sample) => parts.for_each(|((o, _), &m)| *o = m),
        (NoiseLevel::Sigma(s), PredictionType::Epsilon) => {
            parts.for_each(|((o, &x), &m)| *o = x - s * m)
        }
        (NoiseLevel::Sigma(s), PredictionType::VPrediction) => {
            let c_out = -s / (s * s + 1.0).sqrt();
            let c_skip = 1.0 / (s * s + 1.0);
            parts.for_each(|((o, &x), &m)| *o = m * c_out + x * c_skip)
        }
        (NoiseLevel::Vp { alpha, sigma }, PredictionType::Epsilon) => {
            let inv = 1.0 / alpha.max(f32::MIN_POSITIVE);
            parts.for_each(|((o, &x), &m)| *o = (x - sigma * m) * inv)
        }
        (NoiseLevel::Vp { alpha, sigma }, PredictionType::VPrediction) => {
            parts.for_each(|((o, &x), &m)| *o = alpha * x - sigma * m)
        }
    }
}

impl NoiseLevel {
    /// From `alphas_cumprod[t]`, as the DDPM-family `add_noise` computes it in float32.
    pub fn from_alpha_prod(alpha_prod: f32) -> NoiseLevel {
        NoiseLevel::Vp {
            alpha: alpha_prod.sqrt(),
            sigma: (1.0 - alpha_prod).sqrt(),
        }
    }

    /// From a VP sigma, as DPM-Solver's and UniPC's `add_noise` compute it in float32.
    pub fn from_vp_sigma(sigma: f32) -> NoiseLevel {
        let (alpha, sigma) = dpm_solver::alpha_sigma(sigma);
        NoiseLevel::Vp { alpha, sigma }
    }

    /// `add_noise(sample, noise)` into `out`, elementwise in diffusers' operation order.
    pub fn add_noise(self, sample: &[f32], noise: &[f32], out: &mut [f32]) {
        let parts = out.iter_mut().zip(sample).zip(noise);
        match self {
            NoiseLevel::Sigma(s) => parts.for_each(|((o, &x), &n)| *o = x + n * s),
            NoiseLevel::Vp { alpha, sigma } => {
                parts.for_each(|((o, &x), &n)| *o = alpha * x + sigma * n)
            }
        }
    }
}

/// The diffusers class behind each diffusiond scheduler name, and whether the
/// scheduler is that class with `use_karras_sigmas=True`.
fn class_for_name(name: &str) -> Option<(SchedulerClass, bool)> {
    let class = match name {
        "pndm" => SchedulerClass::Pndm,
        "ddim" => SchedulerClass::Ddim,
        "ddpm" => SchedulerClass::Ddpm,
        "euler" => SchedulerClass::EulerDiscrete,
        "euler-a" => SchedulerClass::EulerAncestralDiscrete,
        "heun" => SchedulerClass::HeunDiscrete,
        "lms" => SchedulerClass::LmsDiscrete,
        "dpm++2m" => SchedulerClass::DpmSolverMultistep,
        "dpm++2m-karras" => return Some((SchedulerClass::DpmSolverMultistep, true)),
        "unipc" => SchedulerClass::UniPcMultistep,
        "lcm" => SchedulerClass::Lcm,
        _ => return None,
    };
    Some((class, false))
}

/// The diffusiond scheduler name for a diffusers class name (as in `model_index.json`,
/// e.g. `"PNDMScheduler"` -> `"pndm"`); `None` for classes diffusiond does not implement.
pub fn name_for_class(class_name: &str) -> Option<&'static str> {
    let class = SchedulerClass::from_class_name(class_name)?;
    NAMES
        .iter()
        .copied()
        .find(|n| class_for_name(n) == Some((class, false)))
}

/// Configures scheduler `name` from the model's scheduler config as
/// `Class.from_config(config, **extra)` followed by `set_timesteps(num_inference_steps)`
/// would: keys in the file win (when the class takes them), missing keys take that
/// class's own defaults; `dpm++2m-karras` adds `use_karras_sigmas=True`.
pub fn create(
    name: &str,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let (class, karras) =
        class_for_name(name).ok_or_else(|| SchedulerError::Unknown(name.to_owned()))?;
    let mut resolved = config.resolve(class)?;
    if karras {
        resolved.use_karras_sigmas = true;
    }
    match class {
        SchedulerClass::Pndm => pndm::create(&resolved, num_inference_steps),
        SchedulerClass::Ddim => ddim::create(&resolved, num_inference_steps),
        SchedulerClass::Ddpm => ddpm::create(&resolved, num_inference_steps),
        SchedulerClass::EulerDiscrete => euler::create_euler(&resolved, num_inference_steps),
        SchedulerClass::EulerAncestralDiscrete => {
            euler::create_euler_ancestral(&resolved, num_inference_steps)
        }
        SchedulerClass::HeunDiscrete => heun::create(&resolved, num_inference_steps),
        SchedulerClass::LmsDiscrete => lms::create(&resolved, num_inference_steps),
        SchedulerClass::DpmSolverMultistep => dpm_solver::create(&resolved, num_inference_steps),
        SchedulerClass::UniPcMultistep => unipc::create(&resolved, num_inference_steps),
        SchedulerClass::Lcm => lcm::create(&resolved, num_inference_steps),
    }
}

/// Scheduler `name` with the strength in its schedule, as diffusers' LCM image-to-image
/// pipeline configures it (`set_timesteps(n, strength=...)`); only `lcm` takes one.
pub fn create_with_strength(
    name: &str,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    strength: f64,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    match class_for_name(name) {
        Some((SchedulerClass::Lcm, _)) => lcm::create_with_strength(
            &config.resolve(SchedulerClass::Lcm)?,
            num_inference_steps,
            strength,
        ),
        Some(_) => Err(SchedulerError::InvalidConfig {
            scheduler: NAMES.iter().copied().find(|n| *n == name).unwrap_or("?"),
            message: "only the lcm scheduler takes the strength into its schedule".into(),
        }),
        None => Err(SchedulerError::Unknown(name.to_owned())),
    }
}

/// Whether scheduler `name` can run `num_inference_steps` with `config`: the request
/// resolver's check. The scheduler's own constructor decides (a few microseconds of
/// timestep arithmetic); the pipeline builds its own scheduler per batch, since a
/// scheduler holds the state of one denoising run.
pub fn check_steps(
    name: &str,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<(), SchedulerError> {
    create(name, config, num_inference_steps).map(drop)
}

/// Golden-trajectory checks shared by the scheduler tests: replays the fixed fake-model
/// trajectories recorded by `onnx/golden_schedulers.py` from diffusers.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};

    use ndarray::{ArrayD, Axis};
    use ndarray_npy::read_npy;

    use super::{SchedulerConfig, SchedulerError, create};
    use crate::rng::NoiseSource;

    /// `tests/golden/schedulers`.
    pub(crate) fn golden_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/schedulers")
    }

    fn read_json(path: &Path) -> serde_json::Value {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("valid golden json")
    }

    fn npy(path: &Path) -> ArrayD<f32> {
        read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Replays the noise tensors diffusers drew, in order.
    pub(crate) struct ReplayNoise {
        draws: Option<ArrayD<f32>>,
        /// How many draws were taken so far.
        pub(crate) taken: usize,
    }

    impl NoiseSource for ReplayNoise {
        fn fill_randn(&mut self, out: &mut [f32]) {
            let draws = self
                .draws
                .as_ref()
                .expect("scheduler drew noise but diffusers did not");
            let draw = draws.index_axis(Axis(0), self.taken);
            assert_eq!(draw.len(), out.len(), "noise draw size");
            for (o, v) in out.iter_mut().zip(draw.iter()) {
                *o = *v;
            }
            self.taken += 1;
        }
    }

    fn max_abs_diff(a: ndarray::ArrayViewD<'_, f32>, b: ndarray::ArrayViewD<'_, f32>) -> f32 {
        assert_eq!(a.shape(), b.shape());
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Runs one golden case and returns the largest abs difference seen over sigmas,
    /// init_noise_sigma, every scaled model input and every step output.
    /// Timesteps must match exactly.
    pub(crate) fn run_case(config: &str, name: &str, steps: usize) -> f32 {
        let dir = golden_dir().join(config);
        let cfg = SchedulerConfig::from_file(&dir.join("scheduler_config.json")).expect("config");
        let meta = read_json(&dir.join(format!("{name}_{steps}.json")));
        let label = format!("{name} {config}/{steps}");
        if meta.get("error").is_some() {
            assert!(
                create(name, &cfg, steps).is_err(),
                "{label}: diffusers refuses, we accept"
            );
            return 0.0;
        }
        let mut sched = create(name, &cfg, steps).unwrap_or_else(|e| panic!("{label}: {e}"));
        let want_ts: Vec<f64> = meta["timesteps"]
            .as_array()
            .expect("timesteps")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        check_timesteps(&label, &cfg, sched.timesteps(), &want_ts, &meta);
        let mut worst = 0.0f32;
        if let Some(sigmas) = meta.get("sigmas").and_then(|v| v.as_array()) {
            let got = sched
                .sigmas()
                .unwrap_or_else(|| panic!("{label}: no sigmas"));
            assert_eq!(got.len(), sigmas.len(), "{label}: sigma count");
            for (g, w) in got.iter().zip(sigmas) {
                worst = worst.max((g - w.as_f64().expect("number") as f32).abs());
            }
        }
        let init = meta["init_noise_sigma"].as_f64().expect("init_noise_sigma") as f32;
        worst = worst.max((sched.init_noise_sigma() - init).abs());

        let root = golden_dir();
        let c = npy(&root.join("c.npy"));
        let mut sample = npy(&root.join("x0.npy")) * sched.init_noise_sigma();
        let prev = npy(&dir.join(format!("{name}_{steps}_prev.npy")));
        let scaled_is_input = meta["scaled_is_input"].as_bool().expect("scaled_is_input");
        let scaled_golden =
            (!scaled_is_input).then(|| npy(&dir.join(format!("{name}_{steps}_scaled.npy"))));
        let noise_path = dir.join(format!("{name}_{steps}_noise.npy"));
        let mut noise = ReplayNoise {
            draws: noise_path.exists().then(|| npy(&noise_path)),
            taken: 0,
        };
        let noise_calls: Vec<usize> = meta["noise_calls"]
            .as_array()
            .expect("noise_calls")
            .iter()
            .map(|v| v.as_u64().expect("index") as usize)
            .collect();
        let mut scaled = sample.clone();
        for i in 0..want_ts.len() {
            scaled.assign(&sample);
            sched.scale_model_input(scaled.view_mut(), i);
            match &scaled_golden {
                Some(g) => worst = worst.max(max_abs_diff(scaled.view(), g.index_axis(Axis(0), i))),
                None => assert_eq!(scaled, sample, "{label}: scale_model_input is the identity"),
            }
            let model_output = scaled.mapv(|v| 0.1f32 * v) + &c.index_axis(Axis(0), i);
            sched
                .step(model_output.view(), i, &mut sample, &mut noise)
                .unwrap_or_else(|e| panic!("{label}: step {i}: {e}"));
            let want_draws = noise_calls.iter().filter(|&&k| k <= i).count();
            assert_eq!(
                noise.taken, want_draws,
                "{label}: noise draws after step {i}"
            );
            let d = max_abs_diff(sample.view(), prev.index_axis(Axis(0), i));
            assert!(d.is_finite(), "{label}: step {i} not finite");
            worst = worst.max(d);
        }
        worst
    }

    /// Timesteps must match exactly (integer ones as f64, float32 ones as float32: the
    /// golden JSON holds exact float32 values but serde_json's default float parsing may
    /// be one f64 ulp off). The one exception: timesteps derived from Karras/exponential
    /// sigmas through `_sigma_to_t` depend on `log(train_sigmas)`, and torch's float32
    /// `sqrt` behind `train_sigmas` is not correctly rounded (about 0.6% of values are one
    /// ulp low), so there they may differ by 1e-6 relative.
    fn check_timesteps(
        label: &str,
        cfg: &SchedulerConfig,
        got: &[f64],
        want: &[f64],
        meta: &serde_json::Value,
    ) {
        assert_eq!(got.len(), want.len(), "{label}: number of timesteps");
        let float32 = meta["timesteps_dtype"] == "float32";
        let converted =
            cfg.use_karras_sigmas == Some(true) || cfg.use_exponential_sigmas == Some(true);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let (g, w) = if float32 {
                (f64::from(g as f32), f64::from(w as f32))
            } else {
                (g, w)
            };
            if converted {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs(),
                    "{label}: timestep {i}: {g} vs {w}"
                );
            } else {
                assert_eq!(g, w, "{label}: timestep {i}");
            }
        }
    }

    /// Runs every golden case of scheduler `name` and asserts max abs diff <= `tol`;
    /// returns the largest difference seen.
    pub(crate) fn check_all(name: &str, tol: f32) -> f32 {
        let index = read_json(&golden_dir().join("index.json"));
        let mut worst = 0.0f32;
        let mut cases = 0;
        for (config, list) in index["configs"].as_object().expect("configs") {
            for case in list.as_array().expect("cases") {
                if case["name"] != name {
                    continue;
                }
                let steps = case["steps"].as_u64().expect("steps") as usize;
                let d = run_case(config, name, steps);
                if std::env::var_os("SCHEDULER_GOLDEN_VERBOSE").is_some() {
                    eprintln!("{name} {config}/{steps}: max abs diff {d:e}");
                }
                assert!(
                    d <= tol,
                    "{name} {config}/{steps}: max abs diff {d} > {tol}"
                );
                worst = worst.max(d);
                cases += 1;
            }
        }
        assert!(cases > 0, "no golden cases for {name}");
        eprintln!("{name}: {cases} golden cases, max abs diff {worst:e}");
        worst
    }

    /// Checks that `create` refuses exactly the step counts diffusers refuses
    /// (`refusals.json`, base config), and otherwise gives the same number of UNet calls.
    /// diffusiond also refuses counts above `num_train_timesteps` (see each scheduler).
    pub(crate) fn check_refusals(name: &str) {
        let refusals = read_json(&golden_dir().join("refusals.json"));
        let cfg = SchedulerConfig::from_file(&golden_dir().join("base/scheduler_config.json"))
            .expect("config");
        for (steps, row) in refusals[name].as_object().expect("scheduler row") {
            let steps: usize = steps.parse().expect("step count");
            let ours = create(name, &cfg, steps);
            // diffusers accepts some schedules that index past the training timesteps
            // and fail at step time; diffusiond refuses those up front.
            let past_training = matches!(
                &ours,
                Err(SchedulerError::InvalidSteps { message, .. }) if message.contains("outside the")
            );
            if row["ok"].as_bool() == Some(true) && steps > 0 && steps <= 1000 && !past_training {
                let calls = row["calls"].as_u64().expect("calls") as usize;
                let ours = ours.unwrap_or_else(|e| panic!("{name} {steps}: {e}"));
                assert_eq!(ours.timesteps().len(), calls, "{name} {steps}: calls");
            } else if row["ok"].as_bool() == Some(false) {
                assert!(
                    ours.is_err(),
                    "{name} {steps}: diffusers refuses, we accept"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_maps_to_a_class_and_back() {
        for name in NAMES {
            let (class, karras) = class_for_name(name).expect("known name");
            if !karras {
                assert_eq!(name_for_class(class.class_name()), Some(*name));
            }
        }
        assert_eq!(name_for_class("PNDMScheduler"), Some("pndm"));
        assert_eq!(
            name_for_class("DPMSolverMultistepScheduler"),
            Some("dpm++2m")
        );
        assert_eq!(name_for_class("KDPM2DiscreteScheduler"), None);
        assert!(matches!(
            create("nope", &SchedulerConfig::default(), 4),
            Err(SchedulerError::Unknown(_))
        ));
    }

    /// SD's `scaled_linear` training schedule, by hand in f64: ᾱ_t for t in 0..1000.
    fn sd_alphas_cumprod() -> Vec<f64> {
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut prod = 1.0;
        (0..1000)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
                prod *= 1.0 - beta;
                prod
            })
            .collect()
    }

    fn sd_config(prediction: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(&format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "{prediction}", "steps_offset": 1}}"#
        ))
        .unwrap()
    }

    /// x0 from each scheduler at one step against a hand computation from the training
    /// schedule: sigma-scaled families (x = x0 + σε, σ interpolated at the timestep as
    /// diffusers' `np.interp` does) and alpha-scaled ones (x = √ᾱ x0 + √(1−ᾱ) ε), for
    /// epsilon and v_prediction.
    #[test]
    fn pred_original_sample_matches_a_hand_computation_per_family() {
        let ac = sd_alphas_cumprod();
        let train_sigma = |t: f64| {
            let lo = t.floor() as usize;
            let hi = (lo + 1).min(999);
            let s = |i: usize| ((1.0 - ac[i]) / ac[i]).sqrt();
            s(lo) + (s(hi) - s(lo)) * (t - lo as f64)
        };
        let x = [1.0f32, -0.5, 0.25];
        let m = [0.2f32, 0.3, -1.5];
        let sigma_scaled = ["euler", "euler-a", "heun", "lms"];
        let alpha_scaled = ["ddim", "ddpm", "pndm", "dpm++2m", "unipc", "lcm"];
        for prediction in ["epsilon", "v_prediction"] {
            for name in sigma_scaled.iter().chain(&alpha_scaled) {
                let s = create(name, &sd_config(prediction), 10).unwrap();
                assert_eq!(
                    s.prediction_type() == PredictionType::VPrediction,
                    prediction == "v_prediction"
                );
                let i = 3;
                let t = s.timesteps()[i];
                let want: Vec<f64> = x
                    .iter()
                    .zip(&m)
                    .map(|(&x, &m)| {
                        let (x, m) = (f64::from(x), f64::from(m));
                        if sigma_scaled.contains(name) {
                            let sigma = train_sigma(t);
                            match prediction {
                                "epsilon" => x - sigma * m,
                                _ => {
                                    m * (-sigma / (sigma * sigma + 1.0).sqrt())
                                        + x / (sigma * sigma + 1.0)
                                }
                            }
                        } else {
                            let a = ac[t.round() as usize];
                            let (alpha, sigma) = (a.sqrt(), (1.0 - a).sqrt());
                            match prediction {
                                "epsilon" => (x - sigma * m) / alpha,
                                _ => alpha * x - sigma * m,
                            }
                        }
                    })
                    .collect();
                let mut got = [0.0f32; 3];
                s.pred_original_sample(i, &x, &m, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (f64::from(*g) - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{name} {prediction} at t {t}: {got:?} vs {want:?}"
                    );
                }
            }
        }
        // `sample` prediction: x0 is the model output.
        let mut out = [0.0f32; 3];
        pred_original_sample(
            NoiseLevel::Sigma(3.0),
            PredictionType::Sample,
            &x,
            &m,
            &mut out,
        );
        assert_eq!(out, m);
    }
}
