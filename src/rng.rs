//! Seeded Gaussian noise streams that reproduce the Python reference pipelines.
//!
//! * [`TorchGenerator`]: `torch.Generator("cpu").manual_seed(seed)` followed by
//!   `torch.randn(shape, generator=g, dtype=torch.float32)`.
//! * [`NumpyRandomState`]: `np.random.RandomState(seed).randn(*shape)` cast to `float32`.
//!
//! Both are bit-exact against the goldens in `tests/golden/rng/` (written by
//! `onnx/golden_rng.py` with torch 2.15 and numpy 2.4).
//!
//! # How torch draws `randn` on the CPU
//!
//! `manual_seed(seed)` seeds an MT19937 with `init_genrand(seed & 0xffff_ffff)` (only the
//! low 32 bits are used, so `2**32 + 5` and `5` give the same stream) and clears the
//! cached Box-Muller value. `randn` of a float32 tensor with `n` elements then does:
//!
//! * `n < 16`: per element, `normal_distribution<double>`: two 53-bit uniforms from
//!   `random64()` (two MT outputs, first one high), `r = sqrt(-2 log1p(-u2))`,
//!   `theta = 2 pi u1`, return `r cos(theta)` and cache `r sin(theta)` in the generator.
//!   The cache survives across `randn` calls (until the next `manual_seed`).
//! * `n >= 16`: `normal_fill`: first `n` 24-bit float uniforms
//!   (`(random() & 0xffffff) * 2^-24`), then Box-Muller on each 16-block in place
//!   (`u1 = 1 - data[j]`, `u2 = data[j + 8]`, `j < 8`; cos goes to `data[j]`, sin to
//!   `data[j + 8]`). When `n` is not a multiple of 16, the last 16 elements are then
//!   overwritten with 16 fresh uniforms and transformed again. The double cache is neither
//!   read nor written.
//!
//! The Box-Muller block has two implementations in torch, selected by the CPU kernel that
//! ATen dispatches to (see [`TorchKernel`]): on x86 with AVX2 (and on AVX512 CPUs, where
//! torch produces the same bits) it is the vectorised `avx_mathfun.h` code (Cephes
//! `log256_ps` and `sincos256_ps` in float32, with the multiply-adds GCC fused into FMAs);
//! on the DEFAULT kernel it is scalar float32 glibc `logf`/`cosf`/`sinf` with `theta`
//! computed in double. The two differ by up to ~1.8e-6 (thousands of ulps near zero), so
//! both are reproduced exactly here; the default is the x86 AVX2 one.
//!
//! numpy's `RandomState` (seeded from a Python int via `init_genrand(seed)`) draws
//! 53-bit doubles `((a >> 5) * 2^26 + (b >> 6)) / 2^53` and uses the Marsaglia polar method,
//! keeping the second value for the next draw, also across `randn` calls.

use std::fmt;
use std::str::FromStr;

use rand_mt::Mt;

/// A source of standard-normal noise. One call fills one whole tensor, because the
/// reference generators draw differently depending on the element count.
pub trait NoiseSource: Send {
    /// Fills `out` exactly as one `randn(shape)` call with `numel(shape) == out.len()` would.
    fn fill_randn(&mut self, out: &mut [f32]);

    /// Returns a new vector holding one `randn` draw of `len` elements.
    fn randn(&mut self, len: usize) -> Vec<f32> {
        let mut out = vec![0.0; len];
        self.fill_randn(&mut out);
        out
    }
}

/// Errors from choosing or seeding a noise source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RngError {
    /// The name is not a known generator kind.
    #[error("unknown rng kind {0:?} (expected \"torch\" or \"numpy\")")]
    UnknownKind(String),
    /// `np.random.RandomState` only accepts seeds in `0..=2**32 - 1`.
    #[error("numpy seed {0} is out of range (must be at most 4294967295)")]
    NumpySeedOutOfRange(u64),
}

/// Which reference generator to reproduce.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RngKind {
    /// `torch.Generator("cpu").manual_seed(seed)` + `torch.randn` (diffusers' default).
    #[default]
    Torch,
    /// `np.random.RandomState(seed).randn` (legacy ONNX / OpenVINO pipelines).
    Numpy,
}

impl RngKind {
    /// The lowercase name accepted by [`FromStr`] and printed by [`Display`](fmt::Display).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Torch => "torch",
            Self::Numpy => "numpy",
        }
    }
}

impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RngKind {
    type Err = RngError;

    /// Parses `"torch"` or `"numpy"` (ASCII case-insensitive, surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("torch") {
            Ok(Self::Torch)
        } else if t.eq_ignore_ascii_case("numpy") {
            Ok(Self::Numpy)
        } else {
            Err(RngError::UnknownKind(s.to_owned()))
        }
    }
}

/// Builds the noise source for `kind` seeded with `seed`.
///
/// Torch uses the x86 AVX2 kernel ([`TorchGenerator::new`]). Numpy seeds must fit in `u32`,
/// as `np.random.RandomState` rejects larger ones; torch accepts any `u64` (only its low 32
/// bits matter).
pub fn noise_source(kind: RngKind, seed: u64) -> Result<Box<dyn NoiseSource>, RngError> {
    match kind {
        RngKind::Torch => Ok(Box::new(TorchGenerator::new(seed))),
        RngKind::Numpy => {
            let seed = u32::try_from(seed).map_err(|_| RngError::NumpySeedOutOfRange(seed))?;
            Ok(Box::new(NumpyRandomState::new(seed)))
        }
    }
}

// ---------------------------------------------------------------------------------------
// torch
// ---------------------------------------------------------------------------------------

/// Which of torch's CPU `normal_fill` Box-Muller kernels to reproduce (float32, `n >= 16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TorchKernel {
    /// `CPU_CAPABILITY_AVX2` vectorised kernel (`avx_mathfun.h`): what torch uses on any x86
    /// CPU with AVX2, including AVX512 ones (`torch.backends.cpu.get_cpu_capability()` of
    /// `"AVX2"` or `"AVX512"`; the latter was checked to give the same bits). Emulated with
    /// plain IEEE f32 arithmetic, so it is exact on any host.
    #[default]
    X86Avx2,
    /// Scalar kernel with libm `logf`/`cosf`/`sinf`: `ATEN_CPU_CAPABILITY=default` or a
    /// CPU without AVX2. Exact only where this process and torch use the same libm (glibc
    /// 2.28+ float functions on Linux).
    Scalar,
}

/// Reproduces `torch.Generator("cpu").manual_seed(seed)` and successive
/// `torch.randn(shape, generator=g, dtype=torch.float32)` calls.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Mt,
    /// `CPUGeneratorImpl::next_double_normal_sample_`, used by the `n < 16` path.
    next_double_normal: Option<f64>,
    kernel: TorchKernel,
    seed: u64,
}

impl fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("kernel", &self.kernel)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`, with the x86 AVX2 Box-Muller kernel.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, TorchKernel::X86Avx2)
    }

    /// `torch.Generator("cpu").manual_seed(seed)`, with the given Box-Muller kernel.
    pub fn with_kernel(seed: u64, kernel: TorchKernel) -> Self {
        Self {
            // at::mt19937(seed) -> init_with_uint32: state[0] = seed & 0xffffffff.
            mt: Mt::new(seed as u32),
            next_double_normal: None,
            kernel,
            seed,
        }
    }

    /// The seed given to the constructor (as `g.initial_seed()` reports it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The Box-Muller kernel being reproduced.
    pub fn kernel(&self) -> TorchKernel {
        self.kernel
    }

    /// `CPUGeneratorImpl::random()`: one 32-bit MT19937 output.
    #[inline]
    fn random(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// `CPUGeneratorImpl::random64()`: two outputs, the first in the high half.
    #[inline]
    fn random64(&mut self) -> u64 {
        let hi = u64::from(self.mt.next_u32());
        let lo = u64::from(self.mt.next_u32());
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2^-24 (exact).
    #[inline]
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled by 2^-53 (exact).
    #[inline]
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>(0, 1)` with the generator's cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v * 1.0 + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() * 1.0 + 0.0
    }

    /// `normal_fill` for `out.len() >= 16`.
    fn normal_fill(&mut self, out: &mut [f32]) {
        debug_assert!(out.len() >= 16);
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        let n = out.len();
        let full = n - n % 16;
        box_muller_blocks(self.kernel, &mut out[..full]);
        if full != n {
            // Recompute the last 16 values from 16 fresh uniforms.
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_blocks(self.kernel, tail);
        }
    }
}

impl NoiseSource for TorchGenerator {
    fn fill_randn(&mut self, out: &mut [f32]) {
        if out.len() >= 16 {
            self.normal_fill(out);
        } else {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
        }
    }
}

/// Box-Muller in place on each 16-element block of `data` (`data.len() % 16 == 0`).
fn box_muller_blocks(kernel: TorchKernel, data: &mut [f32]) {
    debug_assert_eq!(data.len() % 16, 0);
    match kernel {
        TorchKernel::Scalar => {
            for block in data.as_chunks_mut::<16>().0 {
                box_muller_16_scalar(block);
            }
        }
        TorchKernel::X86Avx2 => {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports FMA, checked just above.
                unsafe { box_muller_blocks_avx2_fma(data) };
                return;
            }
            box_muller_blocks_avx2(data);
        }
    }
}

/// [`box_muller_16_avx2`] over all blocks. Results are identical with or without hardware
/// FMA (`f32::mul_add` is always fused); this is only the slow, portable build.
fn box_muller_blocks_avx2(data: &mut [f32]) {
    for block in data.as_chunks_mut::<16>().0 {
        box_muller_16_avx2(block);
    }
}

/// [`box_muller_blocks_avx2`] compiled with FMA so `mul_add` is one instruction instead of
/// a libm `fmaf` call (16384 elements: ~66 µs instead of ~1.1 ms in a release build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn box_muller_blocks_avx2_fma(data: &mut [f32]) {
    for block in data.as_chunks_mut::<16>().0 {
        box_muller_16_avx2(block);
    }
}

/// The scalar `NormalFill16<float>`: float32 libm `logf`/`cosf`/`sinf`, theta via double.
fn box_muller_16_scalar(data: &mut [f32; 16]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * c10::pi<double> * u2` is evaluated in double, then stored as float.
        let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
        // `std::fma(x, std = 1, mean = 0)` is `x + 0.0`.
        data[j] = radius * theta.cos() + 0.0;
        data[j + 8] = radius * theta.sin() + 0.0;
    }
}

/// The `CPU_CAPABILITY_AVX2` `NormalFill16<float>`, lane by lane, op for op.
#[inline(always)]
fn box_muller_16_avx2(data: &mut [f32; 16]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let mut radius = [0.0f32; 8];
    let mut theta = [0.0f32; 8];
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        radius[j] = (-2.0 * avx::log(u1)).sqrt();
        theta[j] = two_pi * data[j + 8];
    }
    for j in 0..8 {
        let (s, c) = avx::sincos(theta[j]);
        // `_mm256_fmadd_ps(n, std = 1, mean = 0)` is `n + 0.0`.
        data[j] = radius[j] * c + 0.0;
        data[j + 8] = radius[j] * s + 0.0;
    }
}

/// Scalar, bit-exact transcriptions of `log256_ps` and `sincos256_ps` from torch's
/// `aten/src/ATen/native/cpu/avx_mathfun.h` (Julien Pommier's Cephes-based `sse_mathfun`).
///
/// torch's AVX2 kernels are built by GCC with `-mavx2 -mfma` and the default
/// `-ffp-contract=fast`, and GCC's `_mm256_mul_ps`/`_mm256_add_ps` are plain vector `*`/`+`,
/// so GCC fuses each multiply whose only use is an add/sub into one FMA (taking, for
/// `a*b + c*d`, the multiply that comes first in the source). Each such pair is a
/// [`fma`] call below; every other op is one rounded f32 op (Rust never contracts). The
/// unfused reading disagrees with torch on ~1% of elements (1-2 ulp); each of the two
/// `a*b + c*d` choices (in `log`: `y*z + e*Q1`; in `sincos`: `y*z - z*0.5`) is pinned by
/// the goldens, and 35M elements drawn from torch matched bit for bit.
// The constants are copied verbatim from the C source, digits included.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
mod avx {
    // The C source writes these as double literals stored into float arrays, so each is
    // rounded double -> float; `as f32` on an f64 literal does the same.
    const SQRTHF: f32 = 0.707106781186547524_f64 as f32;
    const LOG_P: [f32; 9] = [
        7.0376836292E-2_f64 as f32,
        -1.1514610310E-1_f64 as f32,
        1.1676998740E-1_f64 as f32,
        -1.2420140846E-1_f64 as f32,
        1.4249322787E-1_f64 as f32,
        -1.6668057665E-1_f64 as f32,
        2.0000714765E-1_f64 as f32,
        -2.4999993993E-1_f64 as f32,
        3.3333331174E-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693359375_f64 as f32;
    const MIN_NORM_POS: f32 = f32::MIN_POSITIVE;

    const MINUS_DP1: f32 = -0.78515625_f64 as f32;
    const MINUS_DP2: f32 = -2.4187564849853515625e-4_f64 as f32;
    const MINUS_DP3: f32 = -3.77489497744594108e-8_f64 as f32;
    const SINCOF_P0: f32 = -1.9515295891E-4_f64 as f32;
    const SINCOF_P1: f32 = 8.3321608736E-3_f64 as f32;
    const SINCOF_P2: f32 = -1.6666654611E-1_f64 as f32;
    const COSCOF_P0: f32 = 2.443315711809948E-005_f64 as f32;
    const COSCOF_P1: f32 = -1.388731625493765E-003_f64 as f32;
    const COSCOF_P2: f32 = 4.166664568298827E-002_f64 as f32;
    const FOPI: f32 = 1.27323954473516_f64 as f32;

    const SIGN_MASK: u32 = 0x8000_0000;

    /// `a * b + c` with one rounding, as the GCC-contracted `vfmadd` computes it.
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    /// `_mm256_and_ps(mask, v)` for one lane: `v` if `mask`, else `+0.0`.
    #[inline(always)]
    fn select(mask: bool, v: f32) -> f32 {
        if mask { v } else { 0.0 }
    }

    /// `log256_ps` for one lane. Only called with `x` in `(0, 1]`.
    #[inline(always)]
    pub(super) fn log(x: f32) -> f32 {
        let invalid = x <= 0.0;
        // _mm256_max_ps returns the second operand when either is NaN.
        let x = if x > MIN_NORM_POS { x } else { MIN_NORM_POS };
        let imm0 = (x.to_bits() >> 23) as i32;
        let mut x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = (imm0 - 0x7f) as f32;
        e += 1.0;
        let mask = x < SQRTHF;
        let tmp = select(mask, x);
        x -= 1.0;
        e -= select(mask, 1.0);
        x += tmp;
        let z = x * x;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = fma(y, x, p);
        }
        y *= x;
        y = fma(y, z, e * LOG_Q1);
        y = fma(-z, 0.5, y);
        x += y;
        x = fma(e, LOG_Q2, x);
        if invalid {
            f32::from_bits(u32::MAX) // `_mm256_or_ps(x, all-ones mask)`: a NaN
        } else {
            x
        }
    }

    /// `sincos256_ps` for one lane: returns `(sin x, cos x)`.
    #[inline(always)]
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let bits = x.to_bits();
        let mut sign_bit_sin = bits & SIGN_MASK;
        let mut x = f32::from_bits(bits & !SIGN_MASK);
        // _mm256_cvttps_epi32 truncates; out-of-range lanes are 0x80000000, which Rust's
        // saturating `as` only differs from for |x| >= 2^31 * pi / 4 (never reached here).
        let mut imm2 = (x * FOPI) as i32;
        imm2 = imm2.wrapping_add(1) & !1;
        let y = imm2 as f32;
        let mut imm4 = imm2;
        let swap_sign_bit_sin = ((imm2 & 4) as u32) << 29;
        let poly_mask = imm2 & 2 == 0;

        x = fma(y, MINUS_DP1, x);
        x = fma(y, MINUS_DP2, x);
        x = fma(y, MINUS_DP3, x);

        imm4 = imm4.wrapping_sub(2);
        let sign_bit_cos = ((!imm4 & 4) as u32) << 29;
        sign_bit_sin ^= swap_sign_bit_sin;

        let z = x * x;
        let mut y = fma(COSCOF_P0, z, COSCOF_P1);
        y = fma(y, z, COSCOF_P2);
        y *= z;
        y = fma(y, z, -(z * 0.5));
        y += 1.0;

        let mut y2 = fma(SINCOF_P0, z, SINCOF_P1);
        y2 = fma(y2, z, SINCOF_P2);
        y2 *= z;
        y2 = fma(y2, x, x);

        let ysin2 = select(poly_mask, y2);
        let ysin1 = select(!poly_mask, y);
        let y2 = y2 - ysin2;
        let y = y - ysin1;
        let s = ysin1 + ysin2;
        let c = y + y2;
        (
            f32::from_bits(s.to_bits() ^ sign_bit_sin),
            f32::from_bits(c.to_bits() ^ sign_bit_cos),
        )
    }
}

// ---------------------------------------------------------------------------------------
// numpy
// ---------------------------------------------------------------------------------------

/// Reproduces `np.random.RandomState(seed)` and successive `.randn(*shape)` calls (the
/// legacy polar-method Gaussian with its cached second value), cast `.astype(np.float32)`.
#[derive(Clone)]
pub struct NumpyRandomState {
    mt: Mt,
    /// `has_gauss` / `gauss` of the legacy `aug_bitgen_t`.
    gauss: Option<f64>,
    seed: u32,
}

impl fmt::Debug for NumpyRandomState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NumpyRandomState")
            .field("seed", &self.seed)
            .field("gauss", &self.gauss)
            .finish_non_exhaustive()
    }
}

impl NumpyRandomState {
    /// `np.random.RandomState(seed)`: a Python int seed goes through `_legacy_seeding` to
    /// `mt19937_seed` (`init_genrand(seed)`), not `init_by_array`.
    pub fn new(seed: u32) -> Self {
        Self {
            mt: Mt::new(seed),
            gauss: None,
            seed,
        }
    }

    /// The seed given to the constructor.
    pub fn seed(&self) -> u32 {
        self.seed
    }

    /// `random_sample()`: `legacy_double`, 53 bits from two MT outputs.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        let a = self.mt.next_u32() >> 5;
        let b = self.mt.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) / 9_007_199_254_740_992.0
    }

    /// One `legacy_gauss` draw (standard normal, float64).
    pub fn next_gauss(&mut self) -> f64 {
        if let Some(g) = self.gauss.take() {
            return g;
        }
        loop {
            let x1 = 2.0 * self.next_f64() - 1.0;
            let x2 = 2.0 * self.next_f64() - 1.0;
            let r2 = x1 * x1 + x2 * x2;
            if r2 < 1.0 && r2 != 0.0 {
                let f = (-2.0 * r2.ln() / r2).sqrt();
                self.gauss = Some(f * x1);
                return f * x2;
            }
        }
    }

    /// Fills `out` exactly as `randn(*shape)` (float64) with `numel(shape) == out.len()`.
    pub fn fill_randn_f64(&mut self, out: &mut [f64]) {
        for v in out.iter_mut() {
            *v = self.next_gauss();
        }
    }
}

impl NoiseSource for NumpyRandomState {
    fn fill_randn(&mut self, out: &mut [f32]) {
        for v in out.iter_mut() {
            *v = self.next_gauss() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;
    use serde_json::Value;
    use std::path::PathBuf;

    fn golden_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/rng")
    }

    fn manifest() -> Value {
        let text = std::fs::read_to_string(golden_dir().join("manifest.json")).expect("manifest");
        serde_json::from_str(&text).expect("manifest JSON")
    }

    fn read<T: ndarray_npy::ReadableElement + Clone>(file: &Value) -> Vec<T> {
        let path = golden_dir().join(file.as_str().expect("file name"));
        let arr: Array1<T> =
            ndarray_npy::read_npy(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        arr.to_vec()
    }

    fn numels(case: &Value) -> Vec<usize> {
        case["shapes"]
            .as_array()
            .expect("shapes")
            .iter()
            .map(|s| {
                s.as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .product()
            })
            .collect()
    }

    /// Draws every call of `case` from one source, concatenated.
    fn draw(src: &mut dyn NoiseSource, case: &Value) -> Vec<f32> {
        let sizes = numels(case);
        let mut out = vec![0.0f32; sizes.iter().sum()];
        let mut rest = &mut out[..];
        for n in sizes {
            let (head, tail) = rest.split_at_mut(n);
            src.fill_randn(head);
            rest = tail;
        }
        out
    }

    /// Compares bit for bit; returns (max abs diff, number of differing elements).
    fn compare_f32(got: &[f32], want: &[f32]) -> (f32, usize) {
        assert_eq!(got.len(), want.len());
        let mut max = 0.0f32;
        let mut ndiff = 0;
        for (g, w) in got.iter().zip(want) {
            if g.to_bits() != w.to_bits() {
                ndiff += 1;
                max = max.max((g - w).abs());
            }
        }
        (max, ndiff)
    }

    fn check_torch(kernel_name: &str, kernel: TorchKernel) {
        let m = manifest();
        let mut cases = 0;
        let mut elems = 0;
        let mut failures = Vec::new();
        for case in m["torch"].as_array().unwrap() {
            if case["kernel"] != kernel_name {
                continue;
            }
            let seed = case["seed"].as_u64().unwrap();
            let want: Vec<f32> = read(&case["f32"]);
            let got = draw(&mut TorchGenerator::with_kernel(seed, kernel), case);
            let (max, ndiff) = compare_f32(&got, &want);
            cases += 1;
            elems += want.len();
            if ndiff != 0 {
                failures.push(format!(
                    "{} seed {seed}: {ndiff} differ, max |diff| {max:e}",
                    case["name"]
                ));
            }
        }
        eprintln!(
            "torch {kernel_name}: {cases} cases, {elems} elements, {} mismatching",
            failures.len()
        );
        assert!(cases >= 20, "too few {kernel_name} goldens: {cases}");
        assert!(
            failures.is_empty(),
            "torch {kernel_name} mismatches:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn torch_x86_avx2_matches_goldens_exactly() {
        check_torch("x86_avx2", TorchKernel::X86Avx2);
    }

    #[test]
    // The scalar kernel calls the host libm's logf/cosf/sinf; the goldens come from glibc.
    #[cfg_attr(
        not(all(target_os = "linux", target_env = "gnu")),
        ignore = "goldens were made with glibc's float libm"
    )]
    fn torch_scalar_matches_goldens_exactly() {
        check_torch("scalar", TorchKernel::Scalar);
    }

    #[test]
    fn numpy_matches_goldens_exactly() {
        let m = manifest();
        let mut cases = 0;
        let mut failures = Vec::new();
        for case in m["numpy"].as_array().unwrap() {
            let seed = u32::try_from(case["seed"].as_u64().unwrap()).unwrap();
            let sizes = numels(case);

            let want64: Vec<f64> = read(&case["f64"]);
            let mut rs = NumpyRandomState::new(seed);
            let mut got64 = vec![0.0f64; want64.len()];
            let mut rest = &mut got64[..];
            for &n in &sizes {
                let (head, tail) = rest.split_at_mut(n);
                rs.fill_randn_f64(head);
                rest = tail;
            }
            let bad64 = got64
                .iter()
                .zip(&want64)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();

            let want32: Vec<f32> = read(&case["f32"]);
            let got32 = draw(&mut NumpyRandomState::new(seed), case);
            let (max, bad32) = compare_f32(&got32, &want32);
            cases += 1;
            if bad64 != 0 || bad32 != 0 {
                failures.push(format!(
                    "{} seed {seed}: f64 {bad64} differ, f32 {bad32} differ (max {max:e})",
                    case["name"]
                ));
            }
        }
        eprintln!("numpy: {cases} cases, {} mismatching", failures.len());
        assert!(cases >= 20, "too few numpy goldens: {cases}");
        assert!(
            failures.is_empty(),
            "numpy mismatches:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn manifest_records_that_native_torch_uses_the_avx2_kernel() {
        let m = manifest();
        assert_eq!(m["kernel_capability"]["x86_avx2"], "avx2");
        assert_eq!(m["kernel_capability"]["scalar"], "default");
        // The goldens were made on an AVX512 CPU; unforced torch matched the AVX2 set.
        assert_eq!(m["native_matches_kernel"]["x86_avx2"], true);
    }

    #[test]
    fn kernels_differ_beyond_float_noise() {
        // Guards against both emulations collapsing onto one implementation.
        let mut a = vec![0.0f32; 4096];
        let mut b = vec![0.0f32; 4096];
        TorchGenerator::with_kernel(0, TorchKernel::X86Avx2).fill_randn(&mut a);
        TorchGenerator::with_kernel(0, TorchKernel::Scalar).fill_randn(&mut b);
        let (max, ndiff) = compare_f32(&a, &b);
        assert!(ndiff > 100, "{ndiff}");
        assert!(max < 1e-5, "{max}");
    }

    #[test]
    fn torch_uses_low_32_bits_of_seed() {
        let mut a = TorchGenerator::new(5);
        let mut b = TorchGenerator::new((1 << 32) + 5);
        assert_eq!(a.randn(40), b.randn(40));
        assert_eq!(a.randn(7), b.randn(7));
        assert_eq!(b.seed(), (1 << 32) + 5);
    }

    #[test]
    fn small_draws_share_the_cached_sample() {
        // randn(1) twice == randn(2): the second draw returns the cached sin value.
        let mut a = TorchGenerator::new(42);
        let x = [a.randn(1)[0], a.randn(1)[0]];
        assert_eq!(x.to_vec(), TorchGenerator::new(42).randn(2));
        let mut n = NumpyRandomState::new(42);
        let y = [n.randn(1)[0], n.randn(1)[0]];
        assert_eq!(y.to_vec(), NumpyRandomState::new(42).randn(2));
    }

    #[test]
    fn kind_parses_and_displays() {
        for kind in [RngKind::Torch, RngKind::Numpy] {
            assert_eq!(kind.to_string().parse::<RngKind>(), Ok(kind));
        }
        assert_eq!(" Torch ".parse::<RngKind>(), Ok(RngKind::Torch));
        assert_eq!("NUMPY".parse::<RngKind>(), Ok(RngKind::Numpy));
        assert_eq!(
            "philox".parse::<RngKind>(),
            Err(RngError::UnknownKind("philox".into()))
        );
        assert_eq!(RngKind::default(), RngKind::Torch);
        let json = serde_json::to_string(&RngKind::Numpy).unwrap();
        assert_eq!(json, "\"numpy\"");
        assert_eq!(
            serde_json::from_str::<RngKind>("\"torch\"").unwrap(),
            RngKind::Torch
        );
    }

    #[test]
    fn noise_source_builds_and_checks_numpy_seed_range() {
        let mut t = noise_source(RngKind::Torch, u64::MAX).unwrap();
        assert_eq!(t.randn(20), TorchGenerator::new(u64::MAX).randn(20));
        let mut n = noise_source(RngKind::Numpy, u64::from(u32::MAX)).unwrap();
        assert_eq!(n.randn(5), NumpyRandomState::new(u32::MAX).randn(5));
        assert_eq!(
            noise_source(RngKind::Numpy, 1 << 32).err(),
            Some(RngError::NumpySeedOutOfRange(1 << 32))
        );
    }

    #[test]
    fn portable_avx2_kernel_equals_dispatched_one() {
        // The FMA-less fallback must give the same bits as the hardware-FMA build.
        let mut a = TorchGenerator::new(3).randn(4096 + 16);
        let mut b = a.clone();
        box_muller_blocks(TorchKernel::X86Avx2, &mut a);
        box_muller_blocks_avx2(&mut b);
        assert_eq!(compare_f32(&a, &b), (0.0, 0));
    }

    #[test]
    fn empty_fill_draws_nothing() {
        let mut a = TorchGenerator::new(1);
        a.fill_randn(&mut []);
        assert_eq!(a.randn(16), TorchGenerator::new(1).randn(16));
        let mut n = NumpyRandomState::new(1);
        n.fill_randn(&mut []);
        assert_eq!(n.randn(3), NumpyRandomState::new(1).randn(3));
    }
}
