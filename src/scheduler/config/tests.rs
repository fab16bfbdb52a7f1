//! Reading and resolving configs: the golden configs per class, class defaults, ignored
//! keys, Python's `Infinity` and `_use_default_values`, and malformed input.

use std::path::Path;

use super::*;

fn golden_config(name: &str) -> SchedulerConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/schedulers")
        .join(name)
        .join("scheduler_config.json");
    SchedulerConfig::from_file(&path).expect("golden config parses")
}

#[test]
fn base_config_resolves_per_class() {
    let cfg = golden_config("base");
    assert_eq!(cfg.class_name.as_deref(), Some("PNDMScheduler"));
    let pndm = cfg.resolve(SchedulerClass::Pndm).unwrap();
    assert!(pndm.skip_prk_steps);
    assert_eq!(pndm.steps_offset, 1);
    assert_eq!(pndm.beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!(pndm.timestep_spacing, TimestepSpacing::Leading);
    // The saved config carries timestep_spacing "leading"; Euler takes it.
    let euler = cfg.resolve(SchedulerClass::EulerDiscrete).unwrap();
    assert_eq!(euler.timestep_spacing, TimestepSpacing::Leading);
    let ddim = cfg.resolve(SchedulerClass::Ddim).unwrap();
    assert!(!ddim.clip_sample);
    assert!(!ddim.set_alpha_to_one);
}

#[test]
fn missing_keys_take_class_defaults() {
    let cfg = golden_config("minimal");
    let ddim = cfg.resolve(SchedulerClass::Ddim).unwrap();
    assert!(ddim.clip_sample);
    assert!(ddim.set_alpha_to_one);
    assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
    let euler = cfg.resolve(SchedulerClass::EulerDiscrete).unwrap();
    assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
    assert_eq!(euler.beta_start, 0.00085);
    let lcm = cfg.resolve(SchedulerClass::Lcm).unwrap();
    assert!(lcm.set_alpha_to_one);
    assert!(!lcm.clip_sample);
    let ddpm = cfg.resolve(SchedulerClass::Ddpm).unwrap();
    assert_eq!(ddpm.variance_type, Some(VarianceType::FixedSmall));
    assert!(ddpm.clip_sample);
}

#[test]
fn keys_a_class_does_not_take_are_ignored() {
    let cfg = SchedulerConfig::from_json_str(
        r#"{"set_alpha_to_one": false, "clip_sample": false, "algorithm_type": "bogus"}"#,
    )
    .unwrap();
    // LCM takes set_alpha_to_one, Heun does not take algorithm_type.
    assert!(!cfg.resolve(SchedulerClass::Lcm).unwrap().set_alpha_to_one);
    assert!(cfg.resolve(SchedulerClass::HeunDiscrete).is_ok());
    assert!(matches!(
        cfg.resolve(SchedulerClass::DpmSolverMultistep),
        Err(ConfigError::Unsupported {
            key: "algorithm_type",
            ..
        })
    ));
}

#[test]
fn python_infinity_and_use_default_values() {
    let cfg = SchedulerConfig::from_json_str(
        r#"{"lambda_min_clipped": -Infinity, "note": "Infinity \" NaN",
                "solver_order": 3, "_use_default_values": ["solver_order"]}"#,
    )
    .unwrap();
    let r = cfg.resolve(SchedulerClass::DpmSolverMultistep).unwrap();
    assert_eq!(r.lambda_min_clipped, f64::NEG_INFINITY);
    assert_eq!(r.solver_order, 2);
}

#[test]
fn malformed_input_is_an_error() {
    assert!(matches!(
        SchedulerConfig::from_json_str("[1]"),
        Err(ConfigError::NotAnObject)
    ));
    assert!(matches!(
        SchedulerConfig::from_json_str("{"),
        Err(ConfigError::Json(_))
    ));
    assert!(matches!(
        SchedulerConfig::from_json_str(r#"{"num_train_timesteps": "many"}"#),
        Err(ConfigError::Json(_))
    ));
    let cfg = SchedulerConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#).unwrap();
    assert!(matches!(
        cfg.resolve(SchedulerClass::Pndm),
        Err(ConfigError::Unsupported {
            key: "beta_schedule",
            ..
        })
    ));
    let cfg = SchedulerConfig::from_json_str(r#"{"solver_p": {"x": 1}}"#).unwrap();
    assert!(cfg.resolve(SchedulerClass::UniPcMultistep).is_err());
    assert!(cfg.resolve(SchedulerClass::DpmSolverMultistep).is_ok());
    assert!(matches!(
        SchedulerConfig::from_file(Path::new("/nonexistent/scheduler_config.json")),
        Err(ConfigError::Io { .. })
    ));
}
