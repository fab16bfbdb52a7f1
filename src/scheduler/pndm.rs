//! `pndm`: diffusers' `PNDMScheduler` (pseudo numerical methods, Liu et al. 2022).
//!
//! With `skip_prk_steps` (Stable Diffusion's configs) it runs PLMS only, with one extra
//! UNet call at the start (`timesteps()` repeats the second timestep). Without it, the
//! first three steps are Runge–Kutta (four UNet calls each). The UNet gets integer
//! timesteps (int64 in diffusers). Deterministic: no noise is drawn.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::common::{
    NoiseSchedule, ZeroSnrTail, check_shapes, check_step_index, check_steps,
    linspace_timesteps_rounded, np_arange_f64,
};
use super::config::{PredictionType, ResolvedConfig, TimestepSpacing};
use super::{Scheduler, SchedulerError};
use crate::rng::NoiseSource;

const NAME: &str = "pndm";
/// diffusers' `pndm_order`.
const ORDER: usize = 4;

/// Builds `PNDMScheduler` with `set_timesteps(num_inference_steps)` applied.
pub fn create(
    config: &ResolvedConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(Box::new(Pndm::new(config, num_inference_steps)?))
}

/// `PNDMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Pndm {
    timesteps: Vec<f64>,
    ts: Vec<i64>,
    /// How many leading entries of `ts` are Runge–Kutta calls.
    prk_len: usize,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    prediction: PredictionType,
    skip_prk_steps: bool,
    /// The last (up to 4) model outputs, oldest first within `ets_len` entries of the ring.
    ets: Vec<ArrayD<f32>>,
    /// Number of model outputs appended to `ets` so far.
    ets_count: usize,
    /// The combined model output of the current step (PRK accumulator / PLMS mix).
    combined: ArrayD<f32>,
    /// The sample a multi-call step started from.
    cur_sample: ArrayD<f32>,
    counter: usize,
    /// The index of the first step run (image-to-image); `counter` counts from it.
    begin: usize,
    /// The index of the step running.
    index: usize,
}

impl Pndm {
    /// `PNDMScheduler.from_config(config)` then `set_timesteps(n)`.
    pub fn new(cfg: &ResolvedConfig, n: usize) -> Result<Self, SchedulerError> {
        check_steps(cfg, NAME, n)?;
        if cfg.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::InvalidConfig {
                scheduler: NAME,
                message: "prediction_type \"sample\" is not supported by PNDM".into(),
            });
        }
        let schedule = NoiseSchedule::new(cfg, ZeroSnrTail::Keep)?;
        let step_ratio = (cfg.num_train_timesteps / n) as i64;
        let base = ascending_timesteps(cfg, n);
        let (prk, plms) = if cfg.skip_prk_steps {
            (Vec::new(), plms_only_timesteps(&base))
        } else {
            if n < ORDER {
                return Err(SchedulerError::InvalidSteps {
                    scheduler: NAME,
                    steps: n,
                    message: format!("Runge-Kutta warm-up needs at least {ORDER} steps"),
                });
            }
            let prk = prk_timesteps(&base, step_ratio / 2);
            let plms = base[..base.len() - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        let prk_len = prk.len();
        let ts: Vec<i64> = prk.into_iter().chain(plms).collect();
        schedule.check_timesteps(&ts, NAME)?;
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            prk_len,
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                schedule.alphas_cumprod[0]
            },
            schedule,
            step_ratio,
            prediction: cfg.prediction_type,
            skip_prk_steps: cfg.skip_prk_steps,
            ets: Vec::with_capacity(ORDER),
            ets_count: 0,
            combined: ArrayD::zeros(ndarray::IxDyn(&[0])),
            cur_sample: ArrayD::zeros(ndarray::IxDyn(&[0])),
            counter: 0,
            begin: 0,
            index: 0,
        })
    }

    /// `ets[-k]` (k = 1 is the newest).
    fn et(&self, k: usize) -> &ArrayD<f32> {
        &self.ets[(self.ets_count - k) % ORDER]
    }

    /// `self.ets.append(model_output)`, keeping the last four.
    fn push_et(&mut self, model_output: &ArrayViewD<'_, f32>) {
        let slot = self.ets_count % ORDER;
        if self.ets.len() <= slot {
            self.ets.push(model_output.to_owned());
        } else {
            copy_into(&mut self.ets[slot], model_output);
        }
        self.ets_count += 1;
    }

    /// `_get_prev_sample(sample, timestep, prev_timestep, model_output)`, in place on
    /// `sample` (which holds the step's start sample on entry).
    fn prev_sample(
        &self,
        sample: &mut ArrayD<f32>,
        model_output: ArrayViewD<'_, f32>,
        t: i64,
        prev_t: i64,
    ) -> Result<(), SchedulerError> {
        let alpha = self.schedule.alpha_prod(t, NAME)?;
        let alpha_prev = if prev_t >= 0 {
            self.schedule.alpha_prod(prev_t, NAME)?
        } else {
            self.final_alpha_cumprod
        };
        let beta = 1.0 - alpha;
        let beta_prev = 1.0 - alpha_prev;
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), beta.sqrt());
        let sample_coeff = (alpha_prev / alpha).sqrt();
        let denom = alpha * beta_prev.sqrt() + (alpha * beta * alpha_prev).sqrt();
        let diff = alpha_prev - alpha;
        let v = self.prediction == PredictionType::VPrediction;
        Zip::from(sample).and(model_output).for_each(|x, &m| {
            let eps = if v {
                sqrt_alpha * m + sqrt_beta * *x
            } else {
                m
            };
            *x = sample_coeff * *x - diff * eps / denom;
        });
        Ok(())
    }

    fn step_prk(
        &mut self,
        model_output: &ArrayViewD<'_, f32>,
        sample: &mut ArrayD<f32>,
    ) -> Result<(), SchedulerError> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_t = self.ts[self.index] - diff_to_prev;
        let t = self.ts[self.counter / 4 * 4];
        let (sixth, third) = ((1.0f64 / 6.0) as f32, (1.0f64 / 3.0) as f32);
        match self.counter % 4 {
            0 => {
                copy_into(&mut self.combined, model_output);
                self.combined.mapv_inplace(|m| sixth * m);
                self.push_et(model_output);
                self.cur_sample.clone_from(sample);
            }
            1 | 2 => Zip::from(&mut self.combined)
                .and(model_output)
                .for_each(|acc, &m| *acc += third * m),
            _ => Zip::from(&mut self.combined)
                .and(model_output)
                .for_each(|acc, &m| *acc += sixth * m),
        }
        sample.assign(&self.cur_sample);
        if self.counter % 4 == 3 {
            self.prev_sample(sample, self.combined.view(), t, prev_t)
        } else {
            self.prev_sample(sample, model_output.view(), t, prev_t)
        }
    }

    fn step_plms(
        &mut self,
        model_output: &ArrayViewD<'_, f32>,
        sample: &mut ArrayD<f32>,
    ) -> Result<(), SchedulerError> {
        let mut t = self.ts[self.index];
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            self.push_et(model_output);
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let n_ets = self.ets_count.min(ORDER);
        let mut combined = std::mem::take(&mut self.combined);
        copy_into(&mut combined, model_output);
        if n_ets == 1 && self.counter == 0 {
            self.cur_sample.clone_from(sample);
        } else if n_ets == 1 && self.counter == 1 {
            Zip::from(&mut combined)
                .and(self.et(1))
                .for_each(|m, &e1| *m = (*m + e1) / 2.0);
            sample.assign(&self.cur_sample);
        } else if n_ets == 2 {
            Zip::from(&mut combined)
                .and(self.et(1))
                .and(self.et(2))
                .for_each(|m, &e1, &e2| *m = (3.0 * e1 - e2) / 2.0);
        } else if n_ets == 3 {
            Zip::from(&mut combined)
                .and(self.et(1))
                .and(self.et(2))
                .and(self.et(3))
                .for_each(|m, &e1, &e2, &e3| *m = (23.0 * e1 - 16.0 * e2 + 5.0 * e3) / 12.0);
        } else {
            let c = (1.0f64 / 24.0) as f32;
            Zip::from(&mut combined)
                .and(self.et(1))
                .and(self.et(2))
                .and(self.et(3))
                .and(self.et(4))
                .for_each(|m, &e1, &e2, &e3, &e4| {
                    *m = c * (55.0 * e1 - 59.0 * e2 + 37.0 * e3 - 9.0 * e4);
                });
        }
        let result = self.prev_sample(sample, combined.view(), t, prev_t);
        self.combined = combined;
        result
    }
}

/// Copies `src` into `dst`, reusing `dst`'s buffer when the shapes agree.
fn copy_into(dst: &mut ArrayD<f32>, src: &ArrayViewD<'_, f32>) {
    if dst.shape() == src.shape() {
        dst.assign(src);
    } else {
        *dst = src.to_owned();
    }
}

/// `_timesteps` before PRK/PLMS arrangement (ascending).
fn ascending_timesteps(cfg: &ResolvedConfig, n: usize) -> Vec<i64> {
    let n_train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut t = linspace_timesteps_rounded(n_train, n);
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = (n_train / n) as i64;
            (0..n as i64)
                .map(|i| i * ratio + cfg.steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            let mut t: Vec<i64> = np_arange_f64(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect();
            t.reverse();
            t
        }
    }
}

/// `concat([_t[:-1], _t[-2:-1], _t[-1:]])[::-1]`.
fn plms_only_timesteps(base: &[i64]) -> Vec<i64> {
    let k = base.len();
    let mut t: Vec<i64> = base[..k - 1].to_vec();
    if k >= 2 {
        t.push(base[k - 2]);
    }
    t.push(base[k - 1]);
    t.reverse();
    t
}

/// `(_t[-4:].repeat(2) + tile([0, half], 4))[:-1].repeat(2)[1:-1][::-1]`.
fn prk_timesteps(base: &[i64], half: i64) -> Vec<i64> {
    let tail = &base[base.len() - ORDER..];
    let pairs: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
    let doubled: Vec<i64> = pairs[..pairs.len() - 1]
        .iter()
        .flat_map(|&t| [t, t])
        .collect();
    doubled[1..doubled.len() - 1]
        .iter()
        .rev()
        .copied()
        .collect()
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, begin: usize) {
        self.begin = begin;
    }

    fn noise_level(&self, index: usize) -> crate::scheduler::NoiseLevel {
        self.schedule.noise_level(&self.ts, index)
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        step_index: usize,
        sample: &mut ArrayD<f32>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<(), SchedulerError> {
        check_step_index(
            NAME,
            step_index,
            Some(self.begin + self.counter),
            self.ts.len(),
        )?;
        self.index = step_index;
        check_shapes(NAME, step_index, &model_output, sample)?;
        if !self.skip_prk_steps && self.counter < self.prk_len {
            self.step_prk(&model_output, sample)?;
        } else {
            self.step_plms(&model_output, sample)?;
        }
        self.counter += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{check_all, check_refusals};

    #[test]
    fn pndm_matches_diffusers() {
        check_all("pndm", 1e-5);
        check_refusals("pndm");
    }
}
