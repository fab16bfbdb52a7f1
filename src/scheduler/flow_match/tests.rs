//! Unit tests of the flow-matching schedulers: config reading and refusals, the
//! pipeline helpers, and the `Scheduler` trait view against the inherent methods.
//! The bit-exact comparison with diffusers lives in `tests/flow_schedulers.rs`.

use ndarray::{ArrayD, IxDyn};
use serde_json::{Value, json};

use super::*;
use crate::rng::NoiseSource;
use crate::scheduler::Scheduler;
use crate::scheduler::config::{ConfigError, TimeShiftType};

struct NoNoise;

impl NoiseSource for NoNoise {
    fn fill_randn(&mut self, _out: &mut [f32]) {
        panic!("flow schedulers draw no noise");
    }
}

fn unsupported_key(json: Value) -> &'static str {
    match FlowMatchEuler::from_config(&json) {
        Err(SchedulerError::Config(ConfigError::Unsupported { key, .. })) => key,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn config_defaults_and_keys() {
    let cfg = FlowMatchConfig::from_json(&json!({"_class_name": EULER_CLASS})).unwrap();
    assert_eq!(cfg, FlowMatchConfig::default());
    let cfg = FlowMatchConfig::from_json(&json!({
        "shift": 3, "use_dynamic_shifting": true, "base_shift": null,
        "max_image_seq_len": 4096.0, "time_shift_type": "linear", "shift_terminal": 0.0,
        "use_karras_sigmas": true, "_use_default_values": ["shift"], "beta_start": 0.1
    }))
    .unwrap();
    assert_eq!(cfg.shift, 1.0);
    assert!(cfg.use_dynamic_shifting);
    assert_eq!(cfg.base_shift, 0.5);
    assert_eq!(cfg.max_image_seq_len, 4096);
    assert_eq!(cfg.time_shift_type, TimeShiftType::Linear);
    assert_eq!(cfg.shift_terminal, None);
    assert_eq!(cfg.spacing, FlowSigmaSpacing::Karras);
}

#[test]
fn config_refusals_name_the_key() {
    assert_eq!(
        unsupported_key(json!({"use_beta_sigmas": true})),
        "use_beta_sigmas"
    );
    assert_eq!(
        unsupported_key(json!({"stochastic_sampling": true})),
        "stochastic_sampling"
    );
    assert_eq!(
        unsupported_key(json!({"use_karras_sigmas": true, "use_exponential_sigmas": true})),
        "use_karras_sigmas"
    );
    assert_eq!(
        unsupported_key(json!({"time_shift_type": "cubic"})),
        "time_shift_type"
    );
    assert_eq!(unsupported_key(json!({"shift": "big"})), "shift");
    assert_eq!(
        unsupported_key(json!({"num_train_timesteps": 0})),
        "num_train_timesteps"
    );
    assert!(matches!(
        FlowMatchEuler::from_config(&json!([1])),
        Err(SchedulerError::Config(ConfigError::NotAnObject))
    ));
}

#[test]
fn set_timesteps_refusals() {
    let mut dynamic = FlowMatchEuler::from_config(&json!({"use_dynamic_shifting": true})).unwrap();
    assert!(matches!(
        dynamic.set_timesteps(4, None, None),
        Err(SchedulerError::InvalidConfig { .. })
    ));
    dynamic.set_timesteps(4, None, Some(0.8)).unwrap();
    let mut s = FlowMatchEuler::new(FlowMatchConfig::default());
    assert!(s.set_timesteps(0, None, None).is_err());
    assert!(s.set_timesteps(3, Some(&[1.0, 0.5]), None).is_err());
    let mut terminal = FlowMatchEuler::from_config(&json!({"shift_terminal": 0.1})).unwrap();
    assert!(terminal.set_timesteps(1, None, None).is_err());
    terminal.set_timesteps(2, None, None).unwrap();
}

#[test]
fn pipeline_helpers() {
    // FLUX.1-dev's mu at 1024x1024: 4096 tokens hit max_shift.
    assert_eq!(calculate_shift(4096, 256, 4096, 0.5, 1.15), 1.15);
    assert_eq!(calculate_shift(256, 256, 4096, 0.5, 1.15), 0.5);
    assert_eq!(image_seq_len(1024, 768), 64 * 48);
    assert_eq!(flux_sigmas(1), vec![1.0]);
    assert_eq!(flux_sigmas(4), vec![1.0, 0.75, 0.5, 0.25]);
    let sd3 = FlowMatchConfig {
        shift: 3.0,
        ..FlowMatchConfig::default()
    };
    assert_eq!(sd3.pipeline_mu(FlowPipeline::Sd3, 1024, 1024), None);
    assert_eq!(sd3.pipeline_mu(FlowPipeline::Flux, 1024, 1024), Some(1.15));
    let start = img2img_start(FLOW_EULER, 28, 0.6, 1).unwrap();
    assert_eq!(
        (start.t_start, start.begin_index, start.steps),
        (11, 11, 17)
    );
    let start = img2img_start(FLOW_HEUN, 4, 0.3, 2).unwrap();
    assert_eq!((start.t_start, start.begin_index, start.steps), (2, 4, 2));
    assert_eq!(img2img_start(FLOW_EULER, 4, 0.1, 1).unwrap().steps, 1);
    assert!(img2img_start(FLOW_EULER, 4, 0.0, 1).is_err());
    assert!(img2img_start(FLOW_EULER, 4, 1.5, 1).is_err());
}

#[test]
fn trait_view_matches_inherent_methods() {
    let mut a = FlowMatchEuler::from_config(&json!({"shift": 3.0})).unwrap();
    a.set_timesteps(4, None, None).unwrap();
    // 4 * 0.6 is 2.4000000000000004 in float64: 1 step is skipped, not 2.
    let start = a.apply_strength(0.6).unwrap();
    assert_eq!(start.begin_index, 1);
    let mut b: Box<dyn Scheduler> = Box::new(a.clone());
    b.set_begin_index(start.begin_index);
    assert_eq!(Scheduler::timesteps(&a).len(), a.timesteps().len());
    assert_eq!(b.init_noise_sigma(), a.init_noise_sigma());

    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
    let noise: Vec<f32> = (0..8).map(|i| 0.7 - i as f32 * 0.2).collect();
    let (mut via_scale, mut via_level) = (vec![0.0; 8], vec![0.0; 8]);
    a.scale_noise(&x, 0.0, &noise, &mut via_scale).unwrap();
    b.noise_level(1).add_noise(&x, &noise, &mut via_level);
    assert_eq!(via_scale, via_level);

    let mut xa = via_scale.clone();
    let mut xb = ArrayD::from_shape_vec(IxDyn(&[2, 4]), via_scale).unwrap();
    for i in 1..4 {
        let m: Vec<f32> = (0..8).map(|j| (i * 8 + j) as f32 * 0.01).collect();
        let mut x0 = vec![0.0; 8];
        b.pred_original_sample(i, &xa, &m, &mut x0);
        let sigma = a.sigmas()[i];
        assert_eq!(x0[3], xa[3] - sigma * m[3]);
        a.step(&m, &mut xa).unwrap();
        let mv = ndarray::ArrayViewD::from_shape(IxDyn(&[2, 4]), &m).unwrap();
        b.step(mv, i, &mut xb, &mut NoNoise).unwrap();
    }
    assert_eq!(xa, xb.into_raw_vec_and_offset().0);
    assert!(a.step(&[0.0; 8], &mut [0.0; 8]).is_err());
}

#[test]
fn heun_calls_and_order() {
    let mut h =
        FlowMatchHeun::from_config(&json!({"shift": 3.0, "use_dynamic_shifting": true})).unwrap();
    h.set_timesteps(3).unwrap();
    assert_eq!(h.timesteps().len(), 5);
    assert_eq!(h.sigmas().len(), 6);
    assert_eq!(Scheduler::order(&h), 2);
    assert_eq!(h.timesteps()[1], h.timesteps()[2]);
    let mut x = vec![1.0f32; 4];
    h.step_at(0, &[0.5; 4], &mut x).unwrap();
    assert!(
        h.step_at(2, &[0.5; 4], &mut x).is_err(),
        "corrector pending"
    );
    h.step_at(1, &[0.5; 4], &mut x).unwrap();
    h.step(&[0.5; 4], &mut x).unwrap();
    // A constant velocity integrates exactly: x(σ) = 1 - 0.5 * (1 - σ).
    let sigma = h.sigmas()[3];
    assert!((x[0] - (1.0 - 0.5 * (1.0 - sigma))).abs() < 1e-6, "{x:?}");
}
