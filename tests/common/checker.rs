//! The demo model's automatic checker, ported from onnx/demo/checker.py: reads shape,
//! foreground and background colour back from a generated image. Colours and thresholds
//! come from onnx/demo/captions.json, which the Python side writes.

use serde::Deserialize;

/// What the checker reads from an image (or what a caption asks for).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attributes {
    /// circle, square or triangle.
    pub shape: String,
    /// Foreground colour name.
    pub fg: String,
    /// Background colour name.
    pub bg: String,
}

/// The checker's fixed parameters.
#[derive(Debug, Clone)]
pub struct Checker {
    /// Named colours and their RGB centres.
    pub colors: Vec<(String, [f32; 3])>,
    /// Side of each corner patch, in pixels.
    pub corner_patch: usize,
    /// Side of the centre patch, in pixels.
    pub centre_patch: usize,
    /// Fill ratio below which the shape is a triangle.
    pub triangle_below: f32,
    /// Fill ratio from which the shape is a square.
    pub square_from: f32,
}

/// numpy's median: the mean of the two middle values for an even count.
fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum()
}

impl Checker {
    fn nearest(&self, rgb: [f32; 3]) -> String {
        self.colors
            .iter()
            .min_by(|a, b| dist2(a.1, rgb).total_cmp(&dist2(b.1, rgb)))
            .map(|c| c.0.clone())
            .unwrap_or_default()
    }

    fn patch_median(&self, rgb: &[u8], size: usize, cells: &[(usize, usize)]) -> [f32; 3] {
        let mut out = [0f32; 3];
        for (ch, o) in out.iter_mut().enumerate() {
            let values = cells
                .iter()
                .map(|&(y, x)| f32::from(rgb[(y * size + x) * 3 + ch]))
                .collect();
            *o = median(values);
        }
        out
    }

    /// Reads an RGB8 square image of side `size`.
    pub fn analyse(&self, rgb: &[u8], size: usize) -> Attributes {
        let k = self.corner_patch;
        let mut corners = Vec::new();
        for (y0, x0) in [(0, 0), (0, size - k), (size - k, 0), (size - k, size - k)] {
            for y in y0..y0 + k {
                for x in x0..x0 + k {
                    corners.push((y, x));
                }
            }
        }
        let bg_rgb = self.patch_median(rgb, size, &corners);
        let c = self.centre_patch;
        let o = (size - c) / 2;
        let centre: Vec<_> = (o..o + c)
            .flat_map(|y| (o..o + c).map(move |x| (y, x)))
            .collect();
        let fg_rgb = self.patch_median(rgb, size, &centre);
        let (mut n, mut y0, mut y1, mut x0, mut x1) = (0usize, usize::MAX, 0, usize::MAX, 0);
        for y in 0..size {
            for x in 0..size {
                let i = (y * size + x) * 3;
                let p = [
                    f32::from(rgb[i]),
                    f32::from(rgb[i + 1]),
                    f32::from(rgb[i + 2]),
                ];
                if dist2(p, fg_rgb) < dist2(p, bg_rgb) {
                    n += 1;
                    (y0, y1, x0, x1) = (y0.min(y), y1.max(y), x0.min(x), x1.max(x));
                }
            }
        }
        let fill = if n == 0 {
            0.0
        } else {
            n as f32 / ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32
        };
        let shape = if fill < self.triangle_below {
            "triangle"
        } else if fill < self.square_from {
            "circle"
        } else {
            "square"
        };
        Attributes {
            shape: shape.into(),
            fg: self.nearest(fg_rgb),
            bg: self.nearest(bg_rgb),
        }
    }
}
