//! The building blocks against diffusers, numpy and torch: betas and `alphas_cumprod`,
//! numpy's float32 log, the numpy helpers, `_sigma_to_t` and thresholding.

use super::*;
use crate::scheduler::config::{SchedulerClass, SchedulerConfig};

fn common_golden() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/schedulers/common.json"
    );
    let text = std::fs::read_to_string(path).expect("golden common.json");
    serde_json::from_str(&text).expect("valid json")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}

#[test]
fn betas_and_alphas_cumprod_match_diffusers() {
    let golden = common_golden();
    // (golden key, beta_schedule, rescale_betas_zero_snr, allowed abs difference)
    // torch's `Tensor.sqrt()` (MKL VML) is not always correctly rounded; the zero-SNR
    // rescale uses it, so its sqrt(alphas_cumprod) may be one float32 ulp off, which
    // moves `1 - ratio` by about one ulp of 1.0. Everything else is bit-exact.
    for (name, schedule, zero_snr, tol) in [
        ("linear", "linear", false, 0.0),
        ("scaled_linear", "scaled_linear", false, 0.0),
        ("squaredcos_cap_v2", "squaredcos_cap_v2", false, 0.0),
        (
            "scaled_linear_zero_snr",
            "scaled_linear",
            true,
            2.0 * f32::EPSILON,
        ),
    ] {
        let json = format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "{schedule}",
                    "rescale_betas_zero_snr": {zero_snr}}}"#
        );
        let cfg = SchedulerConfig::from_json_str(&json)
            .unwrap()
            .resolve(SchedulerClass::Ddim)
            .unwrap();
        let s = NoiseSchedule::new(&cfg, ZeroSnrTail::Keep).unwrap();
        let g = &golden[name];
        let b = max_abs_diff(&s.betas, &floats(&g["betas"]));
        assert!(b <= tol, "{name} betas differ by {b}");
        let a = max_abs_diff(&s.alphas_cumprod, &floats(&g["alphas_cumprod"]));
        assert!(a <= tol, "{name} alphas_cumprod differ by {a}");
    }
}

#[test]
fn log_f32_matches_numpy_bit_for_bit() {
    let g = &common_golden()["numpy_log_f32"];
    let (x, want) = (floats(&g["x"]), floats(&g["log"]));
    let got: Vec<f32> = x.iter().map(|&v| log_f32(v)).collect();
    let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(bad, 0, "{bad} of {} differ", want.len());
}

#[test]
fn numpy_helpers() {
    assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
    assert_eq!(leading_timesteps(1000, 4, 1), vec![751, 501, 251, 1]);
    assert_eq!(
        trailing_timesteps(1000.0, 1000, 4),
        vec![999, 749, 499, 249]
    );
    assert_eq!(linspace_timesteps_rounded(1000, 3), vec![999, 500, 0]);
    assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
    let fp = [1.0f32, 3.0, 7.0];
    assert_eq!(np_interp(0.5, &fp), 2.0);
    assert_eq!(np_interp(1.25, &fp), 4.0);
    assert_eq!(np_interp(5.0, &fp), 7.0);
    assert_eq!(np_interp(-1.0, &fp), 1.0);
}

#[test]
fn sigma_to_t_inverts_training_sigmas() {
    let ls: Vec<f32> = [0.1f32, 0.5, 1.0, 5.0]
        .iter()
        .map(|&s| log_f32(s))
        .collect();
    assert!((sigma_to_t(f64::from(0.5f32), &ls) - 1.0).abs() < 1e-6);
    assert_eq!(sigma_to_t(100.0, &ls), 3.0);
    assert_eq!(sigma_to_t(0.0, &ls), 0.0);
}

#[test]
fn thresholding_clamps_per_item() {
    let mut a =
        ndarray::Array::from_shape_vec(vec![2, 4], vec![0.5, -3.0, 2.0, 1.0, 0.1, 0.2, -0.3, 0.4])
            .unwrap()
            .into_dyn();
    let mut scratch = Vec::new();
    threshold_sample(a.view_mut(), 0.5, 10.0, &mut scratch);
    // item 0: |x| sorted = [0.5, 1, 2, 3], q=0.5 -> rank 1.5 -> 1.5; item 1: s clamps to 1.
    assert_eq!(
        a.as_slice().unwrap()[..4],
        [0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5]
    );
    assert_eq!(a.as_slice().unwrap()[4..], [0.1, 0.2, -0.3, 0.4]);
}
