//! Init images and masks, from file bytes to the tensors the pipeline needs, as diffusers'
//! `VaeImageProcessor.preprocess` makes them from a PIL image:
//!
//! * decode to 8-bit RGB (alpha dropped, as PIL's `convert("RGB")` drops it);
//! * resize to the size rounded down to a multiple of the VAE factor with PIL's Lanczos
//!   filter (no resize when the size is already a multiple);
//! * init image: `x / 255 * 2 - 1` in float32, `[1, 3, H, W]`;
//! * mask: PIL's `convert("L")`, the same resize, `x / 255`, binarised at 0.5 (a level of
//!   128 or more is 1, repainted), `[1, 1, H, W]`.
//!
//! The resize is PIL's `ImagingResample` (Pillow's `Resample.c`) written out, because the
//! result must match PIL's byte for byte: coefficients in double, normalised, turned into
//! 22-bit fixed point, a horizontal pass into an 8-bit image, then a vertical pass. The
//! `image` crate's Lanczos filter computes in float and rounds differently.

use ndarray::{Array2, Array3, Array4};

/// PIL's fixed-point precision for 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// The Lanczos filter's support (PIL: `LANCZOS` has support 3).
const LANCZOS_SUPPORT: f64 = 3.0;

/// Bytes a decode may allocate beyond its pixels (16 bytes a pixel covers 16-bit RGBA and
/// the RGB copy): room for a real ICC profile or text chunk, never a decompression bomb's.
const DECODE_SLACK_BYTES: u64 = 16 << 20;

/// Decodes PNG or JPEG bytes to `[H, W, 3]` RGB, dropping alpha. What the decoder may
/// allocate is bounded by the size the header gives (ancillary chunks included).
pub fn decode_rgb(bytes: &[u8]) -> Result<Array3<u8>, String> {
    let (w, h) = crate::request::header_dimensions(bytes)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot decode: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 16 + DECODE_SLACK_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    Array3::from_shape_vec((h as usize, w as usize, 3), rgb.into_raw()).map_err(|e| e.to_string())
}

/// The size diffusers works at for an image of `width` × `height`: each side rounded down
/// to a multiple of `factor` (`VaeImageProcessor.get_default_height_width`).
pub fn rounded_size(width: usize, height: usize, factor: usize) -> (usize, usize) {
    (width - width % factor, height - height % factor)
}

/// `sin(pi x) / (pi x)`, 1 at 0.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` to
/// `out_size`: per output pixel, its first input pixel and fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..count)
                .map(|x| lanczos(((x + xmin) as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = k
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// PIL's `clip8`: a fixed-point sum back to a byte.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes `[H, W, C]` bytes to `width` × `height` as PIL's `Image.resize(size, LANCZOS)`.
pub fn resize_lanczos(src: &Array3<u8>, width: usize, height: usize) -> Array3<u8> {
    let (h, w, c) = src.dim();
    if (w, h) == (width, height) {
        return src.clone();
    }
    let half = 1i64 << (PRECISION_BITS - 1);
    let vert = coefficients(h, height);
    // Only the rows the vertical pass reads go through the horizontal pass.
    let first_row = vert.first().map_or(0, |(m, _)| *m);
    let last_row = vert.last().map_or(0, |(m, k)| m + k.len());
    let tmp = if w != width {
        let horiz = coefficients(w, width);
        let mut tmp = Array3::<u8>::zeros((last_row - first_row, width, c));
        for y in first_row..last_row {
            for (xx, (xmin, k)) in horiz.iter().enumerate() {
                for ch in 0..c {
                    let mut ss = half;
                    for (x, &kx) in k.iter().enumerate() {
                        ss += i64::from(src[[y, xmin + x, ch]]) * i64::from(kx);
                    }
                    tmp[[y - first_row, xx, ch]] = clip8(ss);
                }
            }
        }
        tmp
    } else {
        src.slice(ndarray::s![first_row..last_row, .., ..])
            .to_owned()
    };
    if h == height {
        return tmp;
    }
    let mut out = Array3::<u8>::zeros((height, width, c));
    for (yy, (ymin, k)) in vert.iter().enumerate() {
        let ymin = ymin - first_row;
        for xx in 0..width {
            for ch in 0..c {
                let mut ss = half;
                for (y, &ky) in k.iter().enumerate() {
                    ss += i64::from(tmp[[ymin + y, xx, ch]]) * i64::from(ky);
                }
                out[[yy, xx, ch]] = clip8(ss);
            }
        }
    }
    out
}

/// An init image as the VAE encoder takes it: `[1, 3, H, W]` in [-1, 1], at `width` ×
/// `height` (resized when the decoded size differs).
pub fn init_tensor(rgb: &Array3<u8>, width: usize, height: usize) -> Array4<f32> {
    let rgb = resize_lanczos(rgb, width, height);
    Array4::from_shape_fn((1, 3, height, width), |(_, ch, y, x)| {
        let v = f32::from(rgb[[y, x, ch]]) / 255.0;
        2.0 * v - 1.0
    })
}

/// PIL's `convert("L")` of RGB: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn luminance(rgb: &Array3<u8>) -> Array3<u8> {
    let (h, w, _) = rgb.dim();
    Array3::from_shape_fn((h, w, 1), |(y, x, _)| {
        let (r, g, b) = (
            u32::from(rgb[[y, x, 0]]),
            u32::from(rgb[[y, x, 1]]),
            u32::from(rgb[[y, x, 2]]),
        );
        ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
    })
}

/// A mask as diffusers' mask processor makes it: grey, resized to `width` × `height`,
/// binarised (`x / 255 >= 0.5` is 1, repaint). `[H, W]` of 0.0 or 1.0.
pub fn mask_pixels(rgb: &Array3<u8>, width: usize, height: usize) -> Array2<f32> {
    let grey = resize_lanczos(&luminance(rgb), width, height);
    Array2::from_shape_fn((height, width), |(y, x)| {
        if f32::from(grey[[y, x, 0]]) / 255.0 < 0.5 {
            0.0
        } else {
            1.0
        }
    })
}

/// The masked image the 9-channel UNet's VAE input is made from: `init * (mask < 0.5)`, so
/// repainted pixels become 0, not -1.
pub fn masked_init(init: &Array4<f32>, mask: &Array2<f32>) -> Array4<f32> {
    let mut out = init.clone();
    out.indexed_iter_mut().for_each(|((_, _, y, x), v)| {
        if mask[[y, x]] >= 0.5 {
            *v *= 0.0;
        }
    });
    out
}

/// The latent mask: `interpolate(mask, size=(H/f, W/f))` (nearest), which takes pixel
/// `(f*i, f*j)` of each `f`×`f` block. `[1, 1, H/f, W/f]`.
pub fn latent_mask(mask: &Array2<f32>, factor: usize) -> Array4<f32> {
    let (h, w) = mask.dim();
    Array4::from_shape_fn((1, 1, h / factor, w / factor), |(_, _, i, j)| {
        mask[[i * factor, j * factor]]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_down_to_the_factor() {
        assert_eq!(rounded_size(100, 70, 8), (96, 64));
        assert_eq!(rounded_size(64, 64, 8), (64, 64));
    }

    #[test]
    fn resize_to_the_same_size_is_a_copy_and_weights_sum_to_one() {
        let src = Array3::from_shape_fn((5, 7, 3), |(y, x, c)| (y * 31 + x * 7 + c) as u8);
        assert_eq!(resize_lanczos(&src, 7, 5), src);
        for (in_size, out_size) in [(100, 96), (70, 64), (64, 128), (3, 1)] {
            for (_, k) in coefficients(in_size, out_size) {
                let sum: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{sum}"
                );
            }
        }
        // A flat image stays flat.
        let flat = Array3::from_elem((70, 100, 3), 200u8);
        assert!(resize_lanczos(&flat, 96, 64).iter().all(|&v| v == 200));
    }

    #[test]
    fn masks_binarise_at_128_and_take_the_top_left_of_each_block() {
        let rgb = Array3::from_shape_fn((16, 16, 3), |(y, _, _)| if y < 8 { 127 } else { 128 });
        let mask = mask_pixels(&rgb, 16, 16);
        assert_eq!(mask[[0, 0]], 0.0);
        assert_eq!(mask[[8, 0]], 1.0);
        let latent = latent_mask(&mask, 8);
        assert_eq!(latent.shape(), &[1, 1, 2, 2]);
        assert_eq!(latent[[0, 0, 0, 0]], 0.0);
        assert_eq!(latent[[0, 0, 1, 1]], 1.0);
        let init = Array4::from_elem((1, 3, 16, 16), -1.0f32);
        let masked = masked_init(&init, &mask);
        assert_eq!(masked[[0, 0, 0, 0]], -1.0);
        assert_eq!(masked[[0, 2, 15, 15]], 0.0);
    }
}
