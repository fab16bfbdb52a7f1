//! `lms`: diffusers' `LMSDiscreteScheduler` (linear multistep, order 4).
//!
//! diffusers obtains each multistep coefficient with `scipy.integrate.quad` over the
//! Lagrange basis polynomial of the last `order` sigmas (tolerance `epsrel=1e-4`). The
//! integrand is a polynomial of degree `order - 1 <= 3`, so here it is integrated
//! exactly with 3-point Gauss–Legendre quadrature (exact up to degree 5) in float64;
//! quad's result agrees with the exact integral to float32 rounding of its integrand.

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Zip};

use super::common::{
    NoiseSchedule, SigmaSpacing, ZeroSnrTail, check_shapes, check_step_index, check_steps,
    euler_init_noise_sigma, interp_sigmas, log_sigmas, scale_by_sigma, sigma_to_t,
    spaced_timesteps_f32,
};
use super::config::{PredictionType, ResolvedConfig};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "lms";
/// diffusers' default `order` argument of `LMSDiscreteScheduler.step`.
const ORDER: usize = 4;

/// Builds `LMSDiscreteScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(LmsDiscrete::new(config, num_inference_steps)?))
}

/// `LMSDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct LmsDiscrete {
    timesteps: Vec<f64>,
    /// `n + 1` sigmas, the last one 0.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    init_noise_sigma: f32,
    /// The last `ORDER` derivatives, newest at `history[(next_step - 1) % ORDER]`.
    history: Vec<ArrayD<f32>>,
    next_step: usize,
    /// The first step index run (image-to-image); derivatives are counted from it.
    begin: usize,
}

impl LmsDiscrete {
    /// `LMSDiscreteScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, NAME, n)?;
        let spacing = SigmaSpacing::from_config(cfg)?;
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Keep)?;
        let train_sigmas = schedule.train_sigmas();
        let ts32 = spaced_timesteps_f32(cfg, n);
        let mut timesteps: Vec<f64> = ts32.iter().map(|&t| f64::from(t)).collect();
        let mut sigmas = interp_sigmas(&ts32, &train_sigmas);
        if spacing != SigmaSpacing::Interpolated {
            let log_train = log_sigmas(&train_sigmas);
            // LMS's Karras conversion ignores config sigma_min/sigma_max; the exponential
            // one honours them.
            let (lo, hi) = match spacing {
                SigmaSpacing::Karras => (None, None),
                _ => (cfg.sigma_min, cfg.sigma_max),
            };
            sigmas = spacing.convert(sigmas, lo, hi, n);
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &log_train) as f32))
                .collect();
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            init_noise_sigma: euler_init_noise_sigma(&sigmas, cfg.timestep_spacing),
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            history: Vec::with_capacity(ORDER),
            next_step: 0,
            begin: 0,
        })
    }

    /// `get_lms_coefficient(order, t, current_order)`: the integral over
    /// `[sigmas[t], sigmas[t + 1]]` of the Lagrange basis polynomial through
    /// `sigmas[t - k]`, `k < order`, that is 1 at `sigmas[t - current_order]`.
    fn coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let node = |k: usize| f64::from(self.sigmas[t - k]);
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current_order)
                .map(|k| (tau - node(k)) / (node(current_order) - node(k)))
                .product::<f64>()
        };
        gauss_legendre_3(basis, node(0), f64::from(self.sigmas[t + 1]))
    }
}

/// 3-point Gauss–Legendre quadrature of `f` over `[a, b]`: exact for polynomials of
/// degree <= 5.
fn gauss_legendre_3(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let half = (b - a) / 2.0;
    let mid = (a + b) / 2.0;
    let x = (3.0f64 / 5.0).sqrt();
    half * (5.0 / 9.0 * f(mid - half * x) + 8.0 / 9.0 * f(mid) + 5.0 / 9.0 * f(mid + half * x))
}

impl Scheduler for LmsDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.next_step = begin;
        self.begin = begin;
    }

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        crate::scheduler::NoiseLevel::Sigma(self.sigmas[index.min(self.sigmas.len() - 1)])
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: ArrayViewMutD<'_, f32>, step_index: usize) {
        scale_by_sigma(sample, &self.sigmas, step_index);
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(NAME, step_index, Some(self.next_step), self.timesteps.len())?;
        check_shapes(NAME, step_index, &model_output, sample)?;
        let sigma = self.sigmas[step_index];
        // Store the new derivative in the ring slot of the oldest one (allocation reused).
        let taken = step_index - self.begin;
        let slot = taken % ORDER;
        if self.history.len() <= slot {
            self.history.push(sample.clone());
        } else {
            self.history[slot].clone_from(sample);
        }
        let c_in = sigma * sigma + 1.0;
        let c_out = -sigma / c_in.sqrt();
        let prediction = self.prediction;
        Zip::from(&mut self.history[slot])
            .and(&model_output)
            .for_each(|d, &m| {
                let x = *d;
                let x0 = match prediction {
                    PredictionType::Epsilon => x - sigma * m,
                    PredictionType::VPrediction => m * c_out + x / c_in,
                    PredictionType::Sample => m,
                };
                *d = (x - x0) / sigma;
            });
        // diffusers picks the order from the absolute step index, but zips the
        // coefficients with the derivatives it has: a run that began later uses fewer.
        let order = (step_index + 1).min(ORDER);
        let terms = order.min(taken + 1);
        let mut coeffs = [0.0f32; ORDER];
        for (k, c) in coeffs.iter_mut().enumerate().take(order) {
            *c = self.coefficient(order, step_index, k) as f32;
        }
        // prev = sample + sum(coeff_k * derivative_{newest - k}), summed in that order.
        let derivative = |k: usize| &self.history[(taken - k) % ORDER];
        let newest = derivative(0);
        match terms {
            1 => Zip::from(sample)
                .and(newest)
                .for_each(|x, &d0| *x += coeffs[0] * d0),
            2 => Zip::from(sample)
                .and(newest)
                .and(derivative(1))
                .for_each(|x, &d0, &d1| *x += coeffs[0] * d0 + coeffs[1] * d1),
            3 => Zip::from(sample)
                .and(newest)
                .and(derivative(1))
                .and(derivative(2))
                .for_each(|x, &d0, &d1, &d2| {
                    *x += coeffs[0] * d0 + coeffs[1] * d1 + coeffs[2] * d2;
                }),
            _ => Zip::from(sample)
                .and(newest)
                .and(derivative(1))
                .and(derivative(2))
                .and(derivative(3))
                .for_each(|x, &d0, &d1, &d2, &d3| {
                    *x += coeffs[0] * d0 + coeffs[1] * d1 + coeffs[2] * d2 + coeffs[3] * d3;
                }),
        }
        self.next_step += 1;
        Ok(())
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check_all, check_refusals};
    use super::gauss_legendre_3;

    #[test]
    fn lms_matches_diffusers() {
        check_all("lms", 1e-5);
        check_refusals("lms");
    }

    #[test]
    fn gauss_legendre_is_exact_for_cubics() {
        let f = |x: f64| 2.0 * x * x * x - x + 0.5;
        // integral over [1, 3] = [x^4/2 - x^2/2 + x/2] = (40.5 - 4.5 + 1.5) - (0.5 - 0.5 + 0.5)
        assert!((gauss_legendre_3(f, 1.0, 3.0) - 37.0).abs() < 1e-12);
    }
}
