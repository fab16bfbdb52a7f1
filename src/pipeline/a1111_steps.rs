//! The denoise loop of AUTOMATIC1111 prompts that one fixed UNet batch cannot run, as
//! webui's CFG denoiser (`modules/sd_samplers_cfg_denoiser.py`, default settings) runs
//! them at every step:
//!
//! - the conditioning in force at the step: each `AND` part's and the negative prompt's
//!   schedule entry (`reconstruct_multicond_batch` / `reconstruct_cond_batch`; the step
//!   counts the steps that run, from 0, so image-to-image uses the start of the schedule of
//!   the full step count, as webui does);
//! - the parts padded to the longest by repeating their last token vector (`stack_conds`);
//!   with `a1111_pad_cond_uncond`, the shorter of parts and negative padded with the empty
//!   prompt's chunks (`pad_cond_uncond`);
//! - one UNet run for the negative and the parts when their lengths agree, else one for
//!   the parts and one for the negative, each at its own length (webui's default);
//! - `uncond + Σ (part − uncond) · (weight · guidance_scale)` (`combine_denoised`), in the
//!   parts' order, then diffusers' `guidance_rescale` for a single part of weight 1.
//!
//! Each UNet run keeps its input and conditioning buffers for the whole generation; a
//! schedule's conditioning is copied into them only at the steps where it changes.

use ndarray::{Array2, Array3, Array4, ArrayD, Axis, Zip, s};
use ort::session::RunOptions;

use super::a1111::{A1111Cond, Encoded};
use super::components::AddedCond;
use super::denoise_loop::{Start, finish_step};
use super::guidance::{Guidance, rescale_row};
use super::text::time_ids;
use super::unet::Unet;
use super::{Pipeline, PipelineError, StageTimings, shape_err};
use crate::request::ResolvedRequest;
use crate::rng::NoiseSource;
use crate::scheduler::Scheduler;

/// The buffers of one UNet run.
struct Run {
    /// `[rows, unet channels, h, w]`.
    input: Array4<f32>,
    /// `[rows, L, D]`.
    hidden: Array3<f32>,
    /// SDXL: `[rows, P]` pooled embeddings and `[rows, 6]` time ids.
    added: Option<(Array2<f32>, Array2<f32>)>,
}

/// Where one block of `n` rows (the negative, or one `AND` part) sits.
#[derive(Clone, Copy)]
struct Place {
    run: usize,
    row: usize,
}

/// A generation's conditioning by step, its UNet runs and their buffers.
pub(super) struct Steps {
    cond: A1111Cond,
    /// Images in the batch (rows per block).
    n: usize,
    runs: Vec<Run>,
    /// The negative's block, with classifier-free guidance.
    uncond: Option<Place>,
    /// Each part's block.
    parts: Vec<Place>,
    /// Every block: the negative's first, then the parts'.
    places: Vec<Place>,
    /// The parts' common length before padding against the negative.
    parts_len: usize,
    /// Per part, per image: `weight × guidance_scale` as webui multiplies it (f32).
    factors: Vec<Vec<f32>>,
    /// The schedule entry each block holds now (negative first).
    current: Vec<Option<usize>>,
    /// The scaled latents of the step, `[n, c, h, w]`.
    scaled: ArrayD<f32>,
}

impl Steps {
    /// Lays out the runs of a batch (`dims` = `[n, c, h, w]` latents, `unet_c` channels
    /// in) and writes the inputs that never change (inpainting's mask and masked image).
    pub(super) fn new(
        cond: A1111Cond,
        batch: &[&ResolvedRequest],
        guidance: &Guidance,
        (dims, unet_c): ([usize; 4], usize),
        masked: Option<(&Array4<f32>, &Array4<f32>)>,
    ) -> Result<Steps, PipelineError> {
        let [n, c, h, w] = dims;
        let parts_len = cond
            .parts
            .iter()
            .map(|(_, s)| s.seq_len())
            .max()
            .unwrap_or(77);
        let uncond_len = cond.uncond.as_ref().map(|u| u.seq_len());
        // Padding against the negative: whole empty chunks up to the longer.
        let (cond_len, uncond_len) = match (uncond_len, &cond.empty) {
            (Some(lu), Some(_)) => (parts_len.max(lu), Some(parts_len.max(lu))),
            _ => (parts_len, uncond_len),
        };
        let k = cond.parts.len();
        let (_, (first, first_pooled)) = cond.parts[0].1.at(0);
        let pooled_dim = first_pooled.as_ref().map(|p| p.len_of(Axis(1)));
        let dim = first.len_of(Axis(2));
        let run = |rows: usize, len: usize| Run {
            input: Array4::zeros((rows, unet_c, h, w)),
            hidden: Array3::zeros((rows, len, dim)),
            added: pooled_dim.map(|p| (Array2::zeros((rows, p)), time_ids(batch[0], rows))),
        };
        let (runs, uncond, parts) = match uncond_len {
            None => (
                vec![run(k * n, cond_len)],
                None,
                (0..k).map(|j| Place { run: 0, row: j * n }).collect(),
            ),
            Some(lu) if lu == cond_len => (
                vec![run((k + 1) * n, cond_len)],
                Some(Place { run: 0, row: 0 }),
                (0..k)
                    .map(|j| Place {
                        run: 0,
                        row: (j + 1) * n,
                    })
                    .collect(),
            ),
            Some(lu) => (
                vec![run(n, lu), run(k * n, cond_len)],
                Some(Place { run: 0, row: 0 }),
                (0..k).map(|j| Place { run: 1, row: j * n }).collect(),
            ),
        };
        let mut steps = Steps {
            factors: cond
                .parts
                .iter()
                .map(|(weight, _)| {
                    (0..n)
                        .map(|row| (weight * guidance.scale(row)) as f32)
                        .collect()
                })
                .collect(),
            current: vec![None; k + 1],
            places: uncond.iter().chain(&parts).copied().collect(),
            cond,
            n,
            runs,
            uncond,
            parts,
            parts_len,
            scaled: ArrayD::zeros(ndarray::IxDyn(&[n, c, h, w])),
        };
        if let Some((mask, masked_latents)) = masked {
            for &place in &steps.places {
                let rows = place.row..place.row + n;
                let input = &mut steps.runs[place.run].input;
                input
                    .slice_mut(s![rows.clone(), c..c + 1, .., ..])
                    .assign(mask);
                input
                    .slice_mut(s![rows, c + 1.., .., ..])
                    .assign(masked_latents);
            }
        }
        Ok(steps)
    }

    /// Copies the conditioning in force at `step` into the runs' buffers where it changed.
    fn refill(&mut self, step: usize) {
        let n = self.n;
        if let (Some(place), Some(schedule)) = (self.uncond, &self.cond.uncond) {
            let (i, encoded) = schedule.at(step);
            if self.current[0] != Some(i) {
                let run = &mut self.runs[place.run];
                write_block(run, place.row, n, encoded, None, self.cond.empty.as_ref());
                self.current[0] = Some(i);
            }
        }
        for (j, (place, (_, schedule))) in self.parts.iter().zip(&self.cond.parts).enumerate() {
            let (i, encoded) = schedule.at(step);
            if self.current[j + 1] != Some(i) {
                let run = &mut self.runs[place.run];
                let stacked = Some(self.parts_len);
                write_block(
                    run,
                    place.row,
                    n,
                    encoded,
                    stacked,
                    self.cond.empty.as_ref(),
                );
                self.current[j + 1] = Some(i);
            }
        }
    }

    /// The guided model output of one step into `out` (`[n, c, h, w]`): the step's
    /// conditioning, the UNet runs on the scaled latents, the weighted combination.
    #[allow(clippy::too_many_arguments)]
    fn predict(
        &mut self,
        unet: &mut Unet,
        sample: &ArrayD<f32>,
        sched: &dyn Scheduler,
        (index, step, t): (usize, usize, f64),
        guidance: &Guidance,
        options: &RunOptions,
        out: &mut ArrayD<f32>,
        timings: &mut StageTimings,
    ) -> Result<(), PipelineError> {
        self.refill(step);
        let (n, c) = (self.n, self.scaled.shape()[1]);
        self.scaled.assign(sample);
        sched.scale_model_input(self.scaled.view_mut(), index);
        for place in &self.places {
            let input = &mut self.runs[place.run].input;
            input
                .slice_mut(s![place.row..place.row + n, ..c, .., ..])
                .assign(&self.scaled);
        }
        let t0 = std::time::Instant::now();
        let mut outputs = Vec::with_capacity(self.runs.len());
        for run in &self.runs {
            let added = run.added.as_ref().map(|(te, ti)| AddedCond {
                text_embeds: te.view().into_dyn(),
                time_ids: ti.view().into_dyn(),
            });
            outputs.push(unet.run(
                run.input.view().into_dyn(),
                t,
                run.hidden.view().into_dyn(),
                added.as_ref(),
                None,
                options,
            )?);
        }
        timings.unet += t0.elapsed();
        timings.unet_calls += outputs.len();
        let block = |place: Place| {
            outputs[place.run].slice_axis(Axis(0), (place.row..place.row + n).into())
        };
        let Some(uncond) = self.uncond.map(block) else {
            // No guidance: one part of weight 1 (composable prompts are refused).
            out.assign(&block(self.parts[0]));
            return Ok(());
        };
        out.assign(&uncond);
        for (place, factors) in self.parts.iter().zip(&self.factors) {
            let part = block(*place);
            for (row, &f) in factors.iter().enumerate() {
                Zip::from(out.index_axis_mut(Axis(0), row))
                    .and(part.index_axis(Axis(0), row))
                    .and(uncond.index_axis(Axis(0), row))
                    .for_each(|o, &p, &u| *o += (p - u) * f);
            }
        }
        if let [place] = self.parts[..] {
            let part = block(place);
            for row in 0..n {
                let rescale = guidance.rescale(row);
                if rescale > 0.0 {
                    rescale_row(
                        out.index_axis_mut(Axis(0), row),
                        part.index_axis(Axis(0), row),
                        rescale,
                    );
                }
            }
        }
        Ok(())
    }
}

/// Writes one block's `n` rows of conditioning: `encoded` `[1, L, D]`, then (for a part,
/// `stacked` = the parts' common length) its last vector repeated up to that length, then
/// the empty prompt's chunks up to the run's length.
fn write_block(
    run: &mut Run,
    row: usize,
    n: usize,
    (hidden, pooled): &Encoded,
    stacked: Option<usize>,
    empty: Option<&Array3<f32>>,
) {
    let len = hidden.len_of(Axis(1));
    let stacked = stacked.unwrap_or(len);
    let total = run.hidden.len_of(Axis(1));
    for r in row..row + n {
        let mut dst = run.hidden.index_axis_mut(Axis(0), r);
        dst.slice_mut(s![..len, ..])
            .assign(&hidden.index_axis(Axis(0), 0));
        let last = hidden.slice(s![0, len - 1, ..]);
        for pos in len..stacked {
            dst.index_axis_mut(Axis(0), pos).assign(&last);
        }
        if let Some(empty) = empty {
            let chunk = empty.len_of(Axis(1));
            for pos in stacked..total {
                dst.index_axis_mut(Axis(0), pos).assign(&empty.slice(s![
                    0,
                    (pos - stacked) % chunk,
                    ..
                ]));
            }
        }
        if let (Some((te, _)), Some(p)) = (run.added.as_mut(), pooled) {
            te.index_axis_mut(Axis(0), r)
                .assign(&p.index_axis(Axis(0), 0));
        }
    }
}

impl Pipeline {
    /// The denoise loop with [`Steps`]: the scheduler and inpainting as in
    /// [`Pipeline::denoise`], the model output from webui's CFG denoiser.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn denoise_scheduled(
        &mut self,
        steps: &mut Steps,
        guidance: &Guidance,
        sched: &mut dyn Scheduler,
        start: Start<'_>,
        latents: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
        (run_options, shrink_after): (&RunOptions, bool),
        timings: &mut StageTimings,
        progress: &mut super::ProgressFn<'_>,
    ) -> Result<(), PipelineError> {
        if self.unet.takes_guidance_embedding()
            && steps
                .runs
                .iter()
                .any(|r| r.input.len_of(Axis(0)) != steps.n)
        {
            return Err(PipelineError::InvalidArgument {
                param: "prompt",
                message: "this model's UNet takes a guidance embedding per image; it cannot run \
                          the prompt and the negative prompt apart"
                    .into(),
            });
        }
        let mut sample = std::mem::take(latents).into_dyn();
        let mut guided = ArrayD::<f32>::zeros(sample.raw_dim());
        let mut scratch = Vec::new();
        let timesteps = sched.timesteps().to_vec();
        let end = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate().skip(start.begin) {
            let _step = tracing::trace_span!("step", i).entered();
            let t0 = std::time::Instant::now();
            let unet_before = timings.unet;
            let options =
                self.arena
                    .for_step(i, (start.begin, end), (shrink_after, false), run_options);
            steps.predict(
                &mut self.unet,
                &sample,
                sched,
                (i, i - start.begin, t),
                guidance,
                options,
                &mut guided,
                timings,
            )?;
            let steps_run = (i + 1 - start.begin, end - start.begin);
            self.preview.after_step(
                start.previews,
                sched,
                i,
                steps_run,
                sample.view(),
                guided.view(),
            )?;
            finish_step(
                sched,
                guided.view(),
                i,
                (start, end),
                &mut sample,
                noise,
                &mut scratch,
            )?;
            timings.scheduler += t0.elapsed() - (timings.unet - unet_before);
            if !progress(i + 1 - start.begin, end - start.begin) {
                return Err(PipelineError::Cancelled);
            }
            // Another generation may run here; these runs use no bound buffer, only the
            // guidance embedding is set again.
            if i + 1 < end && self.interlude()? {
                self.unet.set_guidance_embedding(start.embedding.cloned());
            }
        }
        *latents = sample.into_dimensionality().map_err(shape_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of `rows` rows of length `len`, width 2, with pooled embeddings of width 1.
    fn run(rows: usize, len: usize) -> Run {
        Run {
            input: Array4::zeros((rows, 4, 1, 1)),
            hidden: Array3::from_elem((rows, len, 2), f32::NAN),
            added: Some((Array2::zeros((rows, 1)), Array2::zeros((rows, 6)))),
        }
    }

    fn encoded(len: usize, base: f32) -> Encoded {
        let hidden = Array3::from_shape_fn((1, len, 2), |(_, t, d)| base + (t * 2 + d) as f32);
        (hidden, Some(Array2::from_elem((1, 1), base)))
    }

    #[test]
    fn a_part_is_padded_with_its_last_vector_then_with_empty_chunks() {
        // Part of length 2 stacked with a part of length 4, the run padded to 6 with empty
        // "chunks" of length 1 (webui: stack_conds, then pad_cond_uncond).
        let mut r = run(3, 6);
        let empty = Array3::from_elem((1, 1, 2), -1.0);
        write_block(&mut r, 1, 2, &encoded(2, 10.0), Some(4), Some(&empty));
        for row in 1..3 {
            let h = r.hidden.index_axis(Axis(0), row);
            let rows: Vec<Vec<f32>> = h.outer_iter().map(|v| v.to_vec()).collect();
            assert_eq!(
                rows,
                [
                    vec![10.0, 11.0],
                    vec![12.0, 13.0],
                    vec![12.0, 13.0],
                    vec![12.0, 13.0],
                    vec![-1.0, -1.0],
                    vec![-1.0, -1.0]
                ]
            );
            assert_eq!(r.added.as_ref().unwrap().0[[row, 0]], 10.0);
        }
        // Row 0 is another block's: untouched.
        assert!(r.hidden.index_axis(Axis(0), 0).iter().all(|x| x.is_nan()));
    }

    #[test]
    fn a_negative_is_padded_with_empty_chunks_only() {
        let mut r = run(1, 4);
        let empty = Array3::from_shape_fn((1, 2, 2), |(_, t, _)| -(t as f32) - 1.0);
        write_block(&mut r, 0, 1, &encoded(2, 0.0), None, Some(&empty));
        let rows: Vec<Vec<f32>> = r
            .hidden
            .index_axis(Axis(0), 0)
            .outer_iter()
            .map(|v| v.to_vec())
            .collect();
        assert_eq!(
            rows,
            [
                vec![0.0, 1.0],
                vec![2.0, 3.0],
                vec![-1.0, -1.0],
                vec![-2.0, -2.0]
            ]
        );
    }
}
