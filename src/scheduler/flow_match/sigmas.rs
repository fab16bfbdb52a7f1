//! Shaping the flow sigma schedule as numpy does, in float64 or float32: the static
//! and dynamic shift, `shift_terminal`, the respacing, and the training range.

use super::config::{FlowMatchConfig, FlowSigmaSpacing};
use crate::scheduler::common::{exponential_sigmas, karras_sigmas};
use crate::scheduler::config::TimeShiftType;

/// A float type numpy computes the schedule in (float64 arrays, or float32 arrays
/// combined with Python scalars rounded to float32).
pub(super) trait Real:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
        }
    };
}
real!(f32);
real!(f64);

/// `shift * s / (1 + (shift - 1) * s)`.
pub(super) fn static_shift<T: Real>(shift: f64, s: &mut [T]) {
    let (a, b, one) = (T::of(shift), T::of(shift - 1.0), T::of(1.0));
    s.iter_mut().for_each(|x| *x = a * *x / (one + b * *x));
}

/// The shift, `shift_terminal` stretch and respacing of `set_timesteps`, steps 2 to 4,
/// in the float type of the input; returns float32 sigmas.
pub(super) fn shape_sigmas<T: Real>(cfg: &FlowMatchConfig, mut s: Vec<T>, mu: f64) -> Vec<f32> {
    if cfg.use_dynamic_shifting {
        let one = T::of(1.0);
        // `(1 / t - 1) ** 1.0` is `1 / t - 1` exactly.
        let m = T::of(match cfg.time_shift_type {
            TimeShiftType::Exponential => mu.exp(),
            TimeShiftType::Linear => mu,
        });
        s.iter_mut().for_each(|t| *t = m / (m + (one / *t - one)));
    } else {
        static_shift(cfg.shift, &mut s);
    }
    if let (Some(terminal), Some(&last)) = (cfg.shift_terminal, s.last()) {
        let one = T::of(1.0);
        let scale = (one - last) / T::of(1.0 - terminal);
        s.iter_mut().for_each(|t| *t = one - (one - *t) / scale);
    }
    let n = s.len();
    let (first, last) = match (s.first(), s.last()) {
        (Some(f), Some(l)) => (f.f64(), l.f64()),
        _ => return Vec::new(),
    };
    let respaced = match cfg.spacing {
        FlowSigmaSpacing::Shifted => s.into_iter().map(T::f64).collect(),
        FlowSigmaSpacing::Karras => karras_sigmas(last, first, n),
        FlowSigmaSpacing::Exponential => exponential_sigmas(last, first, n),
    };
    respaced.into_iter().map(|x| x as f32).collect()
}

/// The `__init__` training schedule's first and last sigma (float32, shifted unless
/// dynamic shifting is on): the ends of the default `set_timesteps` linspace.
pub(super) fn train_sigma_range(num_train: usize, shift: Option<f64>) -> (f32, f32) {
    let n = num_train as f32;
    // `linspace(1, N, N)[::-1] / N`: N / N is exactly 1.
    let mut ends = [1.0, 1.0 / n];
    if let Some(shift) = shift {
        static_shift(shift, &mut ends);
    }
    (ends[0], ends[1])
}
