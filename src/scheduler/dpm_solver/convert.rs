//! VP-sigma conversions: a sigma's `(alpha, sigma, lambda)` point, and the model
//! output converted to a data (x0) or noise (epsilon) prediction, with thresholding.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Zip};

use super::torch_f32;
use crate::scheduler::common;
use crate::scheduler::config::PredictionType;

/// One point of the VP noise schedule, as `_sigma_to_alpha_sigma_t` and the
/// `lambda = log(alpha) - log(sigma)` lines compute it, in float32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VpPoint {
    /// `alpha_t = 1 / sqrt(sigma^2 + 1)`.
    pub alpha: f32,
    /// `sigma_t = sigma * alpha_t`.
    pub sigma: f32,
    /// `log(alpha_t) - log(sigma_t)`.
    pub lambda: f32,
}

impl VpPoint {
    /// The point for (Karras-style) sigma `sigma`.
    pub fn new(sigma: f32) -> Self {
        let (alpha, sigma) = alpha_sigma(sigma);
        Self {
            alpha,
            sigma,
            lambda: torch_f32::ln(alpha) - torch_f32::ln(sigma),
        }
    }
}

/// `_sigma_to_alpha_sigma_t(sigma)` in float32.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Writes the data prediction x0 of `model_output` into `dst` (the `dpmsolver++` /
/// UniPC `predict_x0` branch of `convert_model_output`, before thresholding).
pub(crate) fn convert_to_x0(
    dst: ArrayViewMutD<'_, f32>,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayD<f32>,
    prediction: PredictionType,
    alpha: f32,
    sigma: f32,
) {
    let zip = Zip::from(dst).and(model_output).and(sample);
    match prediction {
        PredictionType::Epsilon => zip.for_each(|d, &m, &s| *d = (s - sigma * m) / alpha),
        PredictionType::Sample => zip.for_each(|d, &m, _| *d = m),
        PredictionType::VPrediction => zip.for_each(|d, &m, &s| *d = alpha * s - sigma * m),
    }
}

/// Writes the noise prediction of `model_output` into `dst` (the `dpmsolver` / UniPC
/// `predict_x0=False` branch of `convert_model_output`, before thresholding).
pub(crate) fn convert_to_epsilon(
    dst: ArrayViewMutD<'_, f32>,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayD<f32>,
    prediction: PredictionType,
    alpha: f32,
    sigma: f32,
) {
    let zip = Zip::from(dst).and(model_output).and(sample);
    match prediction {
        PredictionType::Epsilon => zip.for_each(|d, &m, _| *d = m),
        PredictionType::Sample => zip.for_each(|d, &m, &s| *d = (s - alpha * m) / sigma),
        PredictionType::VPrediction => zip.for_each(|d, &m, &s| *d = alpha * m + sigma * s),
    }
}

/// Thresholding for the noise-prediction solver: x0 from epsilon, threshold, back.
pub(super) fn threshold_epsilon(
    eps: &mut ArrayD<f32>,
    sample: &ArrayD<f32>,
    alpha: f32,
    sigma: f32,
    (ratio, max): (f64, f64),
    scratch: &mut Vec<f32>,
) {
    Zip::from(&mut *eps)
        .and(sample)
        .for_each(|e, &s| *e = (s - sigma * *e) / alpha);
    common::threshold_sample(eps.view_mut(), ratio, max, scratch);
    Zip::from(eps)
        .and(sample)
        .for_each(|e, &s| *e = (s - alpha * *e) / sigma);
}
