//! The DPM-Solver(++) multistep update: the float32 per-step coefficients and the
//! first-, second- and third-order elementwise updates.

use super::convert::VpPoint;
use super::torch_f32;

/// Per-step scalars: `x_t = a*x - b*D0 - c1*D1 - c2*D2`, with
/// `D1 = inv_r0*(m0 - m1)` (second order) or the third-order combinations.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Coefficients {
    pub(super) a: f32,
    pub(super) b: f32,
    pub(super) c1: f32,
    pub(super) c2: f32,
    pub(super) inv_r0: f32,
    pub(super) inv_r1: f32,
    pub(super) k1: f32,
    pub(super) k2: f32,
}

/// `(a, b)` of the first-order update (`dpm_solver_first_order_update`).
pub(super) fn first_order_coefficients(t: VpPoint, s0: VpPoint, h: f32, plus: bool) -> (f32, f32) {
    if plus {
        (t.sigma / s0.sigma, t.alpha * (torch_f32::exp(-h) - 1.0))
    } else {
        (t.alpha / s0.alpha, t.sigma * (torch_f32::exp(h) - 1.0))
    }
}

/// `c1` of the second-order update (subtracted; Heun's `+` term is negated).
pub(super) fn second_order_d1(t: VpPoint, h: f32, b: f32, plus: bool, heun: bool) -> f32 {
    match (plus, heun) {
        (_, false) => 0.5 * b,
        (true, true) => -(t.alpha * ((torch_f32::exp(-h) - 1.0) / h + 1.0)),
        (false, true) => t.sigma * ((torch_f32::exp(h) - 1.0) / h - 1.0),
    }
}

/// `(c1, c2)` of the third-order update (both subtracted).
pub(super) fn third_order_d1_d2(t: VpPoint, h: f32, plus: bool) -> (f32, f32) {
    if plus {
        let e = torch_f32::exp(-h) - 1.0;
        (
            -(t.alpha * (e / h + 1.0)),
            t.alpha * ((e + h) / (h * h) - 0.5),
        )
    } else {
        let e = torch_f32::exp(h) - 1.0;
        (t.sigma * (e / h - 1.0), t.sigma * ((e - h) / (h * h) - 0.5))
    }
}

/// `x = a*x - b*m0`.
pub(super) fn update_first(x: &mut [f32], m0: &[f32], c: &Coefficients) {
    for (x, &m0) in x.iter_mut().zip(m0) {
        *x = c.a * *x - c.b * m0;
    }
}

/// `x = a*x - b*m0 - c1*(inv_r0*(m0 - m1))`.
pub(super) fn update_second(x: &mut [f32], m0: &[f32], m1: &[f32], c: &Coefficients) {
    for ((x, &m0), &m1) in x.iter_mut().zip(m0).zip(m1) {
        let d1 = c.inv_r0 * (m0 - m1);
        *x = c.a * *x - c.b * m0 - c.c1 * d1;
    }
}

/// The third-order multistep update.
pub(super) fn update_third(x: &mut [f32], m0: &[f32], m1: &[f32], m2: &[f32], c: &Coefficients) {
    for (((x, &m0), &m1), &m2) in x.iter_mut().zip(m0).zip(m1).zip(m2) {
        let d1_0 = c.inv_r0 * (m0 - m1);
        let d1_1 = c.inv_r1 * (m1 - m2);
        let d1 = d1_0 + c.k1 * (d1_0 - d1_1);
        let d2 = c.k2 * (d1_0 - d1_1);
        *x = c.a * *x - c.b * m0 - c.c1 * d1 - c.c2 * d2;
    }
}
