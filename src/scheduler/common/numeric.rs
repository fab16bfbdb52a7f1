//! numpy and torch primitives with their exact dtypes and rounding: `torch.linspace`
//! in float32, `np.linspace`, `np.arange`, `np.interp` and numpy's float32 `np.log`.

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
///
/// torch rounds `start`/`end` to float32, computes `step = (end - start) / (steps - 1)`
/// in float32 and fills the first half as `start + step * i` and the second half as
/// `end - step * (steps - 1 - i)`; its vectorised kernel evaluates both with a fused
/// multiply-add, which `mul_add` reproduces bit for bit.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `np.linspace(start, stop, num)` in float64 (endpoint included).
///
/// numpy computes `arange(num) * step + start` and then sets the last element to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (num - 1) as f64;
            let delta = stop - start;
            let step = delta / div;
            let mut out: Vec<f64> = if step == 0.0 {
                (0..num).map(|i| i as f64 / div * delta + start).collect()
            } else {
                (0..num).map(|i| i as f64 * step + start).collect()
            };
            out[num - 1] = stop;
            out
        }
    }
}

/// `np.linspace(start, stop, num, endpoint=False)` in float64.
pub fn np_linspace_no_endpoint(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num as f64;
    let delta = stop - start;
    let step = delta / div;
    if step == 0.0 {
        (0..num).map(|i| i as f64 / div * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    }
}

/// `np.arange(start, stop, step)` for float64 arguments.
///
/// numpy sizes the result as `ceil((stop - start) / step)` and fills it as
/// `start + i * ((start + step) - start)`.
pub fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one float64 `x` and float32 `fp`.
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last {
        return f64::from(fp[n - 1]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = (y1 - y0) / 1.0;
    let res = slope * (x - j as f64) + y0;
    if res.is_nan() {
        slope * (x - (j + 1) as f64) + y1
    } else {
        res
    }
}

/// numpy's float32 `np.log` (its SIMD kernel, which is not correctly rounded: up to
/// about 4 ulp off). The input is split as `x = m * 2^e` with `m` in `(sqrt(1/2), sqrt(2)]`,
/// `log(m)` comes from a (5,5) rational approximation in `m - 1` evaluated with fused
/// multiply-adds, and `e * ln 2` is added with one more fused multiply-add.
pub fn log_f32(x: f32) -> f32 {
    // numpy's NPY_COEFF_{P,Q}{0..5}_LOGf, rounded to float32.
    const P: [f32; 6] = [
        f32::from_bits(0x00000000), // 0.000000000000000000000e+00
        f32::from_bits(0x3F800000), // 9.999999999999998702752e-01
        f32::from_bits(0x4007361C), // 2.112677543073053063722e+00
        f32::from_bits(0x3FBD70A9), // 1.480000633576506585156e+00
        f32::from_bits(0x3EC30333), // 3.808837741388407920751e-01
        f32::from_bits(0x3CD42BCD), // 2.589979117907922693523e-02
    ];
    const Q: [f32; 6] = [
        f32::from_bits(0x3F800000), // 1.000000000000000000000e+00
        f32::from_bits(0x4027361C), // 2.612677543073109236779e+00
        f32::from_bits(0x401CFE0D), // 2.453006071784736363091e+00
        f32::from_bits(0x3F7C8AE4), // 9.864942958519418960339e-01
        f32::from_bits(0x3E1E5BF3), // 1.546476374983906719538e-01
        f32::from_bits(0x3BC083DF), // 5.875095403124574342950e-03
    ];
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    if !x.is_normal() {
        // Subnormals: numpy's kernel treats them specially; float64 is close enough.
        return f64::from(x).ln() as f32;
    }
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1.0;
    }
    let y = m - 1.0;
    let num = P[..5].iter().rev().fold(P[5], |acc, &p| acc.mul_add(y, p));
    let den = Q[..5].iter().rev().fold(Q[5], |acc, &q| acc.mul_add(y, q));
    e.mul_add(std::f32::consts::LN_2, num / den)
}
