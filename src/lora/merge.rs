//! The LoRA merge itself, as pure functions over f32 slices: W += factor · (B @ A), in the
//! layout the graph stores W, with factor = scale · alpha / rank.
//!
//! This is PEFT's `get_delta_weight` followed by its merge (`base_layer.weight.data +=
//! delta`), which diffusers' `fuse_lora` runs: the product B @ A is summed over the rank
//! in f32, multiplied by the scaling once, and added to the weight. A conv LoRA's down
//! weight [rank, in, kh, kw] is read as [rank, in·kh·kw] and its up weight
//! [out, rank, 1, 1] as [out, rank]: peft's composition `conv2d(A.T, B).T` for a 1×1 up
//! conv is exactly that matrix product, so a 3×3 LoCon merges like a Linear layer.

use super::targets::Layout;

/// One layer's delta: B [out, rank] and A [rank, rest], row-major, and its factor.
#[derive(Debug, Clone, Copy)]
pub struct Delta<'a> {
    /// B, `lora_up`: `out × rank` values.
    pub up: &'a [f32],
    /// A, `lora_down`: `rank × rest` values (rest = in · kh · kw).
    pub down: &'a [f32],
    /// Output features (B's rows).
    pub out: usize,
    /// The rank.
    pub rank: usize,
    /// Input features times the kernel's size (A's columns).
    pub rest: usize,
    /// scale · alpha / rank, as f32.
    pub factor: f32,
}

/// The factor a layer's B @ A is multiplied by: `scale · alpha / rank`, computed in f64
/// and rounded once to f32, as torch multiplies an f32 tensor by a Python float.
pub fn factor(scale: f64, alpha: f64, rank: usize) -> f32 {
    (alpha / rank as f64 * scale) as f32
}

/// Adds the delta to `weight`, stored as `layout` says: [out, rest] as torch holds it, or
/// [rest, out] (a MatMul's pre-transposed weight). `row` is scratch space of `rest`
/// values, reused across layers so the merge allocates nothing per layer.
///
/// # Panics
/// When the slices' lengths do not match the delta's dimensions (the caller checked the
/// shapes against the graph's weight).
pub fn add_delta(weight: &mut [f32], layout: Layout, delta: &Delta, row: &mut Vec<f32>) {
    let Delta {
        up,
        down,
        out,
        rank,
        rest,
        factor,
    } = *delta;
    assert_eq!(weight.len(), out * rest, "weight size");
    assert_eq!(up.len(), out * rank, "up size");
    assert_eq!(down.len(), rank * rest, "down size");
    row.clear();
    row.resize(rest, 0.0);
    for o in 0..out {
        row.fill(0.0);
        for r in 0..rank {
            let b = up[o * rank + r];
            let a = &down[r * rest..(r + 1) * rest];
            for (acc, &x) in row.iter_mut().zip(a) {
                *acc += b * x;
            }
        }
        match layout {
            Layout::AsTorch => {
                let w = &mut weight[o * rest..(o + 1) * rest];
                for (w, &d) in w.iter_mut().zip(row.iter()) {
                    *w += d * factor;
                }
            }
            Layout::Transposed => {
                for (j, &d) in row.iter().enumerate() {
                    weight[j * out + o] += d * factor;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A naive reference: delta[o][j] = Σ_r B[o][r]·A[r][j], then W += factor·delta.
    fn reference(w: &[f32], d: &Delta) -> Vec<f32> {
        let mut out = w.to_vec();
        for o in 0..d.out {
            for j in 0..d.rest {
                let s: f32 = (0..d.rank)
                    .map(|r| d.up[o * d.rank + r] * d.down[r * d.rest + j])
                    .sum();
                out[o * d.rest + j] += s * d.factor;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn a_non_square_layer_merges_as_torch_and_transposed() {
        let (out, rank, rest) = (5, 2, 3);
        let (up, down) = (values(out * rank, 1), values(rank * rest, 2));
        let delta = Delta {
            up: &up,
            down: &down,
            out,
            rank,
            rest,
            factor: factor(0.5, 4.0, 2),
        };
        let w = values(out * rest, 3);
        let want = reference(&w, &delta);
        let mut row = Vec::new();
        let mut torch = w.clone();
        add_delta(&mut torch, Layout::AsTorch, &delta, &mut row);
        assert_eq!(torch, want);
        // The transposed weight holds W.T: after the merge it is the reference, transposed.
        let mut t: Vec<f32> = (0..rest)
            .flat_map(|j| (0..out).map(move |o| (o, j)))
            .map(|(o, j)| w[o * rest + j])
            .collect();
        add_delta(&mut t, Layout::Transposed, &delta, &mut row);
        for o in 0..out {
            for j in 0..rest {
                assert_eq!(t[j * out + o], want[o * rest + j], "({o}, {j})");
            }
        }
        // Merging the delta without the transpose gives another weight: the layout matters.
        let mut wrong: Vec<f32> = (0..rest)
            .flat_map(|j| (0..out).map(move |o| (o, j)))
            .map(|(o, j)| w[o * rest + j])
            .collect();
        add_delta(&mut wrong, Layout::AsTorch, &delta, &mut row);
        assert_ne!(wrong, t);
    }

    #[test]
    fn the_factor_is_scale_times_alpha_over_rank() {
        assert_eq!(factor(1.0, 4.0, 4), 1.0);
        assert_eq!(factor(1.0, 2.0, 4), 0.5);
        assert_eq!(factor(-1.0, 8.0, 4), -2.0);
        assert_eq!(factor(0.8, 1.0, 3), (1.0f64 / 3.0 * 0.8) as f32);
    }

    #[test]
    fn a_3x3_conv_lora_is_the_matrix_product_over_the_flattened_kernel() {
        // peft: conv2d(A.permute(1,0,2,3), B).permute(1,0,2,3) for B [out, r, 1, 1]:
        // delta[o, i, y, x] = Σ_r B[o, r] · A[r, i, y, x].
        let (out, rank, inp, k) = (3, 2, 2, 3);
        let rest = inp * k * k;
        let (up, down) = (values(out * rank, 7), values(rank * rest, 8));
        let mut w = vec![0.0; out * rest];
        let delta = Delta {
            up: &up,
            down: &down,
            out,
            rank,
            rest,
            factor: 1.0,
        };
        add_delta(&mut w, Layout::AsTorch, &delta, &mut Vec::new());
        for o in 0..out {
            for i in 0..inp {
                for y in 0..k {
                    for x in 0..k {
                        let conv: f32 = (0..rank)
                            .map(|r| up[o * rank + r] * down[((r * inp + i) * k + y) * k + x])
                            .sum();
                        assert_eq!(w[((o * inp + i) * k + y) * k + x], conv);
                    }
                }
            }
        }
    }
}
