//! The denoise loop of a generation with one fixed UNet batch per step (diffusers' loop:
//! scale the latents, run the UNet on the CFG batch, guide, step the scheduler, blend for
//! inpainting), its buffers allocated once; what the loops share ([`Start`],
//! [`finish_step`]); and the interlude between two steps, after which a suspended
//! generation restores its UNet state; and the VAE decode that follows.

use std::time::Instant;

use ndarray::{Array4, ArrayD, Axis, IxDyn, s};
use ort::session::RunOptions;

use super::arrays::{all_finite, shape_err};
use super::components::AddedCond;
use super::controlnet::{Controls, ResidualFn, owned_residuals};
use super::guidance::{Guidance, guide};
use super::latents::{self, Inpaint};
use super::text::Conditioning;
use super::{Pipeline, PipelineError, ProgressFn, StageTimings, preview};
use crate::rng::NoiseSource;
use crate::scheduler::Scheduler;

/// Where the denoise loop starts (the first timestep index), inpainting's inputs, and the
/// previews it reports.
#[derive(Clone, Copy)]
pub(super) struct Start<'a> {
    pub(super) begin: usize,
    pub(super) inpaint: Option<&'a Inpaint>,
    pub(super) previews: &'a preview::Plan,
    /// An LCM UNet's guidance embedding, set again after an interlude.
    pub(super) embedding: Option<&'a ArrayD<f32>>,
    /// The generation's ControlNets (none for most).
    pub(super) controls: &'a Controls,
}

impl<'a> Start<'a> {
    /// A 9-channel UNet's extra inputs: the mask and the masked image's latents.
    pub(super) fn masked(&self) -> Option<(&'a Array4<f32>, &'a Array4<f32>)> {
        self.inpaint
            .and_then(|i| Some((&i.mask, i.masked_latents.as_ref()?)))
    }
}

/// Writes a 9-channel UNet's mask and masked-image latents after the `c` latent channels of
/// every `n`-row half of its input.
fn write_masked(
    mut unet_in: ndarray::ArrayViewMutD<'_, f32>,
    n: usize,
    c: usize,
    (mask, masked_latents): (&Array4<f32>, &Array4<f32>),
) {
    let rows = unet_in.len_of(Axis(0));
    for half in 0..rows / n {
        let r = half * n..(half + 1) * n;
        unet_in
            .slice_mut(s![r.clone(), c..c + 1, .., ..])
            .assign(mask);
        unet_in
            .slice_mut(s![r, c + 1.., .., ..])
            .assign(masked_latents);
    }
}

/// After the model output of step `i`: the scheduler step, inpainting's blend and the
/// check that the latents are finite.
pub(super) fn finish_step(
    sched: &mut dyn Scheduler,
    model_output: ndarray::ArrayViewD<'_, f32>,
    i: usize,
    (start, end): (Start<'_>, usize),
    sample: &mut ArrayD<f32>,
    noise: &mut dyn NoiseSource,
    scratch: &mut Vec<f32>,
) -> Result<(), PipelineError> {
    sched.step(model_output, i, sample, noise)?;
    if let Some(inpaint) = start.inpaint {
        latents::blend(inpaint, sched, i, i + 1 == end, sample, scratch);
    }
    if !all_finite(sample.view()) {
        return Err(PipelineError::NonFinite {
            stage: "denoise",
            step: Some((i + 1 - start.begin, end - start.begin)),
        });
    }
    Ok(())
}

impl Pipeline {
    /// The denoise loop. The UNet input and guidance buffers are allocated once and
    /// refilled each step.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn denoise(
        &mut self,
        cond: &Conditioning,
        guidance: &Guidance,
        sched: &mut dyn Scheduler,
        start: Start<'_>,
        latents: &mut Array4<f32>,
        noise: &mut dyn NoiseSource,
        run_options: &RunOptions,
        shrink_after: bool,
        timings: &mut StageTimings,
        progress: &mut ProgressFn<'_>,
    ) -> Result<(), PipelineError> {
        let cfg = guidance.cfg;
        let (n, c, h, w) = latents.dim();
        let rows = if cfg { 2 * n } else { n };
        // A 9-channel UNet takes the mask and the masked image's latents after the latents.
        let masked = start.masked();
        let unet_c = if masked.is_some() { 9 } else { c };
        let added = cond.added.as_ref().map(|(te, ti)| AddedCond {
            text_embeds: te.view(),
            time_ids: ti.view(),
        });
        // f32 graphs: ONNX Runtime's own input/output buffers, bound once (no per-step
        // allocation or copy). Other graphs: our input buffer, converted per run.
        let bound = self
            .unet
            .bind(&[rows, unet_c, h, w], cond.hidden.view(), added.as_ref())?;
        let mut own_in = (!bound).then(|| Array4::<f32>::zeros((rows, unet_c, h, w)));
        // A ControlNet-ready UNet run on our buffers: its residual inputs are ours too.
        let residuals = self.unet.takes_residuals();
        let mut own_res = (residuals && !bound)
            .then(|| owned_residuals(&self.bundle.residual_shapes, rows, (h, w)));
        let mut own_res_zero = true;
        // The ControlNets' inputs and outputs, bound once for this generation (its own: a
        // generation in an interlude binds its own and leaves these as they are).
        let mut cn_io = start.controls.bind(
            &self.controlnets,
            [rows, c, h, w],
            &self.bundle.residual_shapes,
            (cond.hidden.view(), added.as_ref()),
            bound,
        )?;
        if let Some(masked) = masked {
            // The same for every step (and both CFG halves): written once.
            let unet_in = match (self.unet.input_mut(), own_in.as_mut()) {
                (Some(v), _) => v,
                (None, Some(a)) => a.view_mut().into_dyn(),
                (None, None) => unreachable!("one UNet input buffer exists"),
            };
            write_masked(unet_in, n, c, masked);
        }
        let mut scratch = Vec::new();
        let mut guided = ArrayD::<f32>::zeros(IxDyn(&[n, c, h, w]));
        let mut sample = std::mem::take(latents).into_dyn();
        let timesteps = sched.timesteps().to_vec();
        let end = timesteps.len();
        let total = end - start.begin;
        // Everything ONNX Runtime keys the UNet's memory pattern by.
        let shape = [&[rows, unet_c, h, w][..], cond.hidden.shape()].concat();
        let new_shape = !self.arena.has_run(&shape);
        let mut steps = || -> Result<(), PipelineError> {
            for (i, &t) in timesteps.iter().enumerate().skip(start.begin) {
                let _step = tracing::trace_span!("step", i).entered();
                let t0 = Instant::now();
                {
                    let mut unet_in = match (self.unet.input_mut(), own_in.as_mut()) {
                        (Some(v), _) => v,
                        (None, Some(a)) => a.view_mut().into_dyn(),
                        (None, None) => unreachable!("one UNet input buffer exists"),
                    };
                    // The scaling is elementwise with one factor: scale the first half, then
                    // duplicate it for the unconditional rows.
                    let mut unet_in = unet_in.slice_mut(s![.., ..c, .., ..]).into_dyn();
                    let (mut first, second) = unet_in.view_mut().split_at(Axis(0), n);
                    first.assign(&sample);
                    sched.scale_model_input(first.view_mut(), i);
                    if cfg {
                        let mut second = second;
                        second.assign(&first);
                    }
                }
                let tc = Instant::now();
                if residuals {
                    let step = (i - start.begin, end - start.begin);
                    let mut active = false;
                    if let Some(io) = cn_io.as_mut().filter(|_| start.controls.any_active(step)) {
                        let _span = tracing::trace_span!("controlnet").entered();
                        // Their `sample`: the UNet's latent channels, copied in place.
                        match (self.unet.input_mut(), own_in.as_ref()) {
                            (Some(v), _) => io.fill_sample(v.view()),
                            (None, Some(a)) => io.fill_sample(a.view().into_dyn()),
                            (None, None) => unreachable!("one UNet input buffer exists"),
                        }
                        // The residuals go into the UNet's buffers, visited in place.
                        let unet = &mut self.unet;
                        let mut sink = |f: &mut ResidualFn<'_>| match own_res.as_mut() {
                            Some(r) => r
                                .iter_mut()
                                .enumerate()
                                .try_for_each(|(i, a)| f(i, a.view_mut())),
                            None => unet.for_each_residual(f).map(drop),
                        };
                        active = start.controls.run_step(
                            &mut self.controlnets,
                            io,
                            step,
                            t,
                            (cond.hidden.view(), added.as_ref()),
                            &mut sink,
                            run_options,
                        )?;
                        own_res_zero &= !active || bound;
                    }
                    if !active {
                        if bound {
                            self.unet.zero_residuals();
                        } else if let (Some(r), false) = (own_res.as_mut(), own_res_zero) {
                            r.iter_mut().for_each(|a| a.fill(0.0));
                            own_res_zero = true;
                        }
                    }
                    timings.controlnet += tc.elapsed();
                }
                let t1 = Instant::now();
                let unet_span = tracing::trace_span!("unet").entered();
                let owned_out;
                let step_options = self.arena.for_step(
                    i,
                    (start.begin, end),
                    (shrink_after, new_shape),
                    run_options,
                );
                let out = if bound {
                    self.unet.run_bound(t, step_options)?
                } else {
                    let input = own_in.as_ref().map(|a| a.view().into_dyn());
                    owned_out = self.unet.run(
                        input.ok_or_else(|| {
                            shape_err(ndarray::ShapeError::from_kind(
                                ndarray::ErrorKind::IncompatibleShape,
                            ))
                        })?,
                        t,
                        cond.hidden.view(),
                        added.as_ref(),
                        own_res.as_deref(),
                        step_options,
                    )?;
                    owned_out.view()
                };
                drop(unet_span);
                if i == start.begin && new_shape {
                    self.arena.ran_at(&shape);
                }
                let t2 = Instant::now();
                timings.unet += t2 - t1;
                timings.unet_calls += 1;
                let model_output = if cfg {
                    guide(out.view(), guidance, &mut guided);
                    guided.view()
                } else {
                    out.view()
                };
                let done = i + 1 - start.begin;
                self.preview.after_step(
                    start.previews,
                    sched,
                    i,
                    (done, total),
                    sample.view(),
                    model_output.view(),
                )?;
                finish_step(
                    sched,
                    model_output,
                    i,
                    (start, end),
                    &mut sample,
                    noise,
                    &mut scratch,
                )?;
                timings.scheduler += (tc - t0) + t2.elapsed();
                if !progress(done, total) {
                    return Err(PipelineError::Cancelled);
                }
                if i + 1 < end && self.interlude()? {
                    // Another generation ran on this pipeline: its conditioning (and, if it
                    // had this shape, its latents) are in the UNet's bound buffers now. The
                    // ControlNets' bindings are this generation's own and kept theirs.
                    self.unet.set_guidance_embedding(start.embedding.cloned());
                    if bound {
                        let dims = [rows, unet_c, h, w];
                        self.unet.bind(&dims, cond.hidden.view(), added.as_ref())?;
                        if let (Some(masked), Some(unet_in)) = (masked, self.unet.input_mut()) {
                            write_masked(unet_in, n, c, masked);
                        }
                    }
                }
            }
            Ok(())
        };
        if let Err(e) = steps() {
            // Ended early (cancelled, terminated, failed): the last step's shrink never
            // ran, so the arena would keep this batch's peak.
            if shrink_after {
                let t = timesteps.get(start.begin).copied().unwrap_or_default();
                self.release_unet(bound, own_in.as_ref(), t, cond, added.as_ref());
            }
            return Err(e);
        }
        *latents = sample.into_dimensionality().map_err(shape_err)?;
        Ok(())
    }

    /// `latents / scaling_factor (+ shift)` → VAE decoder.
    pub(super) fn decode(
        &mut self,
        mut latents: Array4<f32>,
        run_options: &RunOptions,
        shrink_after: bool,
    ) -> Result<ArrayD<f32>, PipelineError> {
        let scale = self.bundle.vae_scaling_factor as f32;
        let shift = self.bundle.vae_shift_factor.unwrap_or(0.0) as f32;
        latents.mapv_inplace(|x| x / scale + shift);
        let options = self.arena.for_vae(shrink_after, run_options);
        let mut decoded = self.vae.decode(latents.view().into_dyn(), options)?;
        if !all_finite(decoded.view())
            && let Some(fp32) = self.vae_fp32.as_mut()
        {
            // fp16 VAE decoders overflow on some latents (SDXL's above all): decode again
            // in fp32, as diffusers' `force_upcast` does.
            tracing::warn!(
                "the VAE decoder produced non-finite values; decoding again with vae_decoder_fp32"
            );
            decoded = fp32.decode(latents.view().into_dyn(), options)?;
        }
        if !all_finite(decoded.view()) {
            return Err(PipelineError::NonFinite {
                stage: "vae",
                step: None,
            });
        }
        Ok(decoded)
    }
}
