//! torch's float32 `exp`, `log` and `expm1` on the CPU (0-d tensors included).
//!
//! * `exp` and `log` go through MKL's VML (high-accuracy mode) in torch's x86 builds;
//!   those results are correctly rounded except in about 1% (`exp`) and 0.02% (`log`)
//!   of inputs, where they are one ulp off in a way only MKL itself reproduces. These
//!   ports are correctly rounded (evaluated in float64).
//! * `expm1` goes through SLEEF's `Sleef_expm1f16_u10`, which is not correctly rounded;
//!   [`exp_m1`] ports its FMA code path bit for bit.

/// SLEEF's `R_LN2f` (`1 / ln 2`).
const R_LN2: f32 = std::f32::consts::LOG2_E;
const L2U: f32 = 0.693145751953125;
const L2L: f32 = 1.428606765330187045e-06;

/// A double-float: the unevaluated sum `x + y`.
#[derive(Clone, Copy)]
struct Df {
    x: f32,
    y: f32,
}

/// `torch.exp` on a float32 tensor.
pub fn exp(x: f32) -> f32 {
    #[cfg(test)]
    if let Some(y) = overrides::exp(x) {
        return y;
    }
    f64::from(x).exp() as f32
}

/// `torch.log` on a float32 tensor.
pub fn ln(x: f32) -> f32 {
    f64::from(x).ln() as f32
}

/// `vrint_vi2_vf`: round half to even.
fn rint(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `2^q` for `q` in the normal exponent range.
fn pow2i(q: i32) -> f32 {
    f32::from_bits(((q + 0x7f) << 23) as u32)
}

/// `vldexp2_vf_vf_vi2`.
fn ldexp2(d: f32, e: i32) -> f32 {
    d * pow2i(e >> 1) * pow2i(e - (e >> 1))
}

/// `x*y - z` with one rounding.
fn fmapn(x: f32, y: f32, z: f32) -> f32 {
    x.mul_add(y, -z)
}

fn add2_df_f(x: Df, y: f32) -> Df {
    let s = x.x + y;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y - v);
    Df { x: s, y: t + x.y }
}

fn add2_df_df(x: Df, y: Df) -> Df {
    let s = x.x + y.x;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y.x - v);
    Df {
        x: s,
        y: t + (x.y + y.y),
    }
}

fn add_f_df(x: f32, y: Df) -> Df {
    let s = x + y.x;
    Df {
        x: s,
        y: ((x - s) + y.x) + y.y,
    }
}

fn mul_df_f(x: Df, y: f32) -> Df {
    let s = x.x * y;
    Df {
        x: s,
        y: x.y.mul_add(y, fmapn(x.x, y, s)),
    }
}

fn mul_df_df(x: Df, y: Df) -> Df {
    let s = x.x * y.x;
    Df {
        x: s,
        y: x.x.mul_add(y.y, x.y.mul_add(y.x, fmapn(x.x, y.x, s))),
    }
}

fn squ(x: Df) -> Df {
    let s = x.x * x.x;
    Df {
        x: s,
        y: (x.x + x.x).mul_add(x.y, fmapn(x.x, x.x, s)),
    }
}

/// `torch.expm1` on a float32 tensor (SLEEF `xexpm1f`).
pub fn exp_m1(a: f32) -> f32 {
    if a.is_nan() {
        return a;
    }
    if a > 88.72283172607421875 {
        return f32::INFINITY;
    }
    if a < -16.635532333438687426013570 {
        return -1.0;
    }
    if a == 0.0 && a.is_sign_negative() {
        return -0.0;
    }
    let d = add2_df_f(expk2(Df { x: a, y: 0.0 }), -1.0);
    d.x + d.y
}

/// SLEEF `expk2f`: `exp` of a double-float, as a double-float.
fn expk2(d: Df) -> Df {
    let q = rint((d.x + d.y) * R_LN2);
    let qf = q as f32;
    let mut s = add2_df_f(d, qf * -L2U);
    s = add2_df_f(s, qf * -L2L);
    let mut u: f32 = 0.1980960224e-3;
    u = u.mul_add(s.x, 0.1394256484e-2);
    u = u.mul_add(s.x, 0.8333456703e-2);
    u = u.mul_add(s.x, 0.4166637361e-1);
    let mut t = add2_df_f(mul_df_f(s, u), 0.166666659414234244790680580464);
    t = add2_df_f(mul_df_df(s, t), 0.5);
    t = add2_df_df(s, mul_df_df(squ(s), t));
    t = add_f_df(1.0, t);
    if d.x < -104.0 {
        return Df { x: 0.0, y: 0.0 };
    }
    Df {
        x: ldexp2(t.x, q),
        y: ldexp2(t.y, q),
    }
}

/// Test-only substitutes for MKL results that are not correctly rounded.
#[cfg(test)]
pub mod overrides {
    use std::cell::RefCell;

    thread_local! {
        static EXP: RefCell<Vec<(u32, u32)>> = const { RefCell::new(Vec::new()) };
    }

    /// Makes `exp(x)` return `y` on this thread (bit patterns).
    pub fn set_exp(x: u32, y: u32) {
        EXP.with(|t| t.borrow_mut().push((x, y)));
    }

    /// The substitute for `exp(x)`, if one is set.
    pub(super) fn exp(x: f32) -> Option<f32> {
        EXP.with(|t| {
            t.borrow()
                .iter()
                .find(|(k, _)| *k == x.to_bits())
                .map(|(_, v)| f32::from_bits(*v))
        })
    }
}
