//! Tests of the `[runtime]` settings: each bad value refused naming its key, the
//! spellings that load, the defaults.

use super::*;
use crate::config::Settings;

/// Loads `toml` through [`Settings::load`] from a temporary file; the error as shown.
fn load_err(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("diffusiond.toml");
    std::fs::write(&file, toml).unwrap();
    Settings::load(Some(&file)).unwrap_err().to_string()
}

fn load(toml: &str) -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("diffusiond.toml");
    std::fs::write(&file, toml).unwrap();
    Settings::load(Some(&file)).unwrap()
}

#[test]
fn bad_arena_extend_strategy_names_the_key() {
    let err = load_err("[runtime.cuda]\narena_extend_strategy = \"double\"\n");
    assert!(
        err.contains("`runtime.cuda.arena_extend_strategy`"),
        "{err}"
    );
    assert!(err.contains("double"), "{err}");
}

#[test]
fn bad_conv_algorithm_search_names_the_key() {
    let err = load_err("[runtime.cuda]\nconv_algorithm_search = \"fastest\"\n");
    assert!(
        err.contains("`runtime.cuda.conv_algorithm_search`"),
        "{err}"
    );
    assert!(err.contains("fastest"), "{err}");
}

#[test]
fn builder_optimization_level_above_five_names_the_key() {
    let err = load_err("[runtime.tensorrt]\nbuilder_optimization_level = 7\n");
    assert!(
        err.contains("builder optimization level 7 is above 5 (TensorRT takes 0-5)"),
        "{err}"
    );
    assert!(
        err.contains("`runtime.tensorrt.builder_optimization_level`"),
        "{err}"
    );
}

#[test]
fn builder_optimization_level_out_of_u8_names_the_key() {
    let err = load_err("[runtime.tensorrt]\nbuilder_optimization_level = 300\n");
    assert!(
        err.contains("`runtime.tensorrt.builder_optimization_level`"),
        "{err}"
    );
}

#[test]
fn existing_spellings_still_load() {
    let s = load(
        "[runtime.cuda]\n\
         arena_extend_strategy = \"same_as_requested\"\n\
         conv_algorithm_search = \"default\"\n\
         [runtime.tensorrt]\n\
         builder_optimization_level = 5\n",
    );
    assert_eq!(
        s.runtime.cuda.arena_extend_strategy,
        ArenaExtendStrategy::SameAsRequested
    );
    assert_eq!(
        s.runtime.cuda.conv_algorithm_search,
        ConvAlgorithmSearch::Default
    );
    assert_eq!(s.runtime.tensorrt.builder_optimization_level.get(), 5);
    let s = load(
        "[runtime.cuda]\n\
         arena_extend_strategy = \"next_power_of_two\"\n\
         conv_algorithm_search = \"heuristic\"\n\
         [runtime.tensorrt]\n\
         builder_optimization_level = 0\n",
    );
    assert_eq!(
        s.runtime.cuda.arena_extend_strategy,
        ArenaExtendStrategy::NextPowerOfTwo
    );
    assert_eq!(
        s.runtime.cuda.conv_algorithm_search,
        ConvAlgorithmSearch::Heuristic
    );
    assert_eq!(s.runtime.tensorrt.builder_optimization_level.get(), 0);
}

/// Environment overrides, through the same `config::Environment` settings as
/// [`Settings::load`] but fed from a map, so no process-global variable is set (that
/// would race every other test that loads a config).
#[test]
fn environment_overrides_parse() {
    let vars = [
        (
            "DIFFUSIOND_RUNTIME__CUDA__CONV_ALGORITHM_SEARCH",
            "heuristic",
        ),
        (
            "DIFFUSIOND_RUNTIME__CUDA__ARENA_EXTEND_STRATEGY",
            "same_as_requested",
        ),
        (
            "DIFFUSIOND_RUNTIME__TENSORRT__BUILDER_OPTIMIZATION_LEVEL",
            "4",
        ),
    ];
    let env = crate::config::environment().source(Some(
        vars.iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    ));
    let s: Settings = config::Config::builder()
        .add_source(env)
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap();
    let r = &s.runtime;
    assert_eq!(r.cuda.conv_algorithm_search, ConvAlgorithmSearch::Heuristic);
    assert_eq!(
        r.cuda.arena_extend_strategy,
        ArenaExtendStrategy::SameAsRequested
    );
    assert_eq!(r.tensorrt.builder_optimization_level.get(), 4);
}

#[test]
fn bad_tensorrt_profile_values_name_the_key() {
    for (key, value, says) in [
        ("min_size", "100", "image side 100 is not a multiple of 8"),
        ("opt_size", "0", "image side 0 is not a multiple of 8"),
        (
            "max_size",
            "20000",
            "image side 20000 is not a multiple of 8",
        ),
        ("max_batch", "0", "batch of 0 images is not from 1 to 256"),
        (
            "max_batch",
            "300",
            "batch of 300 images is not from 1 to 256",
        ),
    ] {
        let err = load_err(&format!("[runtime.tensorrt]\n{key} = {value}\n"));
        assert!(err.contains(&format!("`runtime.tensorrt.{key}`")), "{err}");
        assert!(err.contains(says), "{err}");
    }
    let err = load_err("[runtime.tensorrt]\nmin_size = 1024\nmax_size = 512\n");
    assert!(
        err.contains("runtime.tensorrt.min_size: 1024 is above runtime.tensorrt.max_size (512)"),
        "{err}"
    );
    let err = load_err("[runtime.tensorrt]\nopt_size = 1024\nmax_size = 768\n");
    assert!(
        err.contains("runtime.tensorrt.opt_size: 1024 is above"),
        "{err}"
    );
    let err = load_err("[runtime.tensorrt]\nmin_size = 768\nopt_size = 512\n");
    assert!(
        err.contains("runtime.tensorrt.min_size: 768 is above"),
        "{err}"
    );
}

#[test]
fn tensorrt_profile_values_load() {
    let t = load(
        "[runtime.tensorrt]\nmin_size = 512\nopt_size = 1024\nmax_size = 1536\nmax_batch = 2\n",
    )
    .runtime
    .tensorrt;
    let got = [t.min_size, t.opt_size, t.max_size].map(|s| s.map(|s| s.get()));
    assert_eq!(got, [Some(512), Some(1024), Some(1536)]);
    assert_eq!(t.max_batch.map(|b| b.get()), Some(2));
    assert_eq!(t.accepted, None);
    let t = load("").runtime.tensorrt;
    assert_eq!(t, TensorRtSettings::default());
    assert!(t.validate().is_ok());
}

#[test]
fn engine_cache_keep_defaults_to_two() {
    assert_eq!(load("").runtime.tensorrt.engine_cache_keep, 2);
    let t = load("[runtime.tensorrt]\nengine_cache_keep = 0\n")
        .runtime
        .tensorrt;
    assert_eq!(t.engine_cache_keep, 0);
    let err = load_err("[runtime.tensorrt]\nengine_cache_keep = -1\n");
    assert!(err.contains("engine_cache_keep"), "{err}");
}

#[test]
fn builder_optimization_level_range() {
    assert_eq!(BuilderOptimizationLevel::default().get(), 3);
    for level in 0..=5u8 {
        assert_eq!(
            BuilderOptimizationLevel::try_from(level).map(u8::from),
            Ok(level)
        );
    }
    assert_eq!(
        BuilderOptimizationLevel::try_from(6),
        Err(BuilderOptimizationLevelError(6))
    );
    assert_eq!(
        BuilderOptimizationLevelError(7).to_string(),
        "builder optimization level 7 is above 5 (TensorRT takes 0-5)"
    );
}

#[test]
fn display_is_the_config_spelling() {
    for (v, s) in [
        (ArenaExtendStrategy::NextPowerOfTwo, "next_power_of_two"),
        (ArenaExtendStrategy::SameAsRequested, "same_as_requested"),
    ] {
        assert_eq!(v.to_string(), s);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(
            serde_json::from_str::<ArenaExtendStrategy>(&json).unwrap(),
            v
        );
    }
    for (v, s) in [
        (ConvAlgorithmSearch::Exhaustive, "exhaustive"),
        (ConvAlgorithmSearch::Heuristic, "heuristic"),
        (ConvAlgorithmSearch::Default, "default"),
    ] {
        assert_eq!(v.to_string(), s);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(
            serde_json::from_str::<ConvAlgorithmSearch>(&json).unwrap(),
            v
        );
    }
    assert_eq!(BuilderOptimizationLevel::default().to_string(), "3");
}

#[test]
fn defaults_are_onnx_runtime_defaults() {
    let c = CudaSettings::default();
    assert_eq!(c.arena_extend_strategy, ArenaExtendStrategy::NextPowerOfTwo);
    assert_eq!(c.conv_algorithm_search, ConvAlgorithmSearch::Exhaustive);
    assert_eq!(
        TensorRtSettings::default().builder_optimization_level.get(),
        3
    );
}

#[test]
fn arena_extend_strategy_maps_to_ort() {
    use ort::ep::ArenaExtendStrategy as Ort;
    assert!(matches!(
        ArenaExtendStrategy::NextPowerOfTwo.to_ort(),
        Ort::NextPowerOfTwo
    ));
    assert!(matches!(
        ArenaExtendStrategy::SameAsRequested.to_ort(),
        Ort::SameAsRequested
    ));
}

#[cfg(feature = "cuda")]
#[test]
fn conv_algorithm_search_maps_to_ort() {
    use ort::ep::cuda::ConvAlgorithmSearch as Ort;
    assert!(matches!(
        ConvAlgorithmSearch::Exhaustive.to_ort(),
        Ort::Exhaustive
    ));
    assert!(matches!(
        ConvAlgorithmSearch::Heuristic.to_ort(),
        Ort::Heuristic
    ));
    assert!(matches!(
        ConvAlgorithmSearch::Default.to_ort(),
        Ort::Default
    ));
}
