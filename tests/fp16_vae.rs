//! The guard against an fp16 VAE decoder's non-finite output (fp16 overflow, which gives
//! black or NaN images with real fp16 VAEs, SDXL's above all): a model folder whose
//! `vae_decoder/` is a stand-in fp16 decoder that overflows (tests/data/overflow_vae_decoder,
//! from onnx/make_overflow_vae.py) decodes again with its `vae_decoder_fp32/` and gives the
//! image the fp32 decoder gives; without that folder the job fails with the typed
//! non-finite error naming the VAE, never a garbage image.

mod common;

use std::path::Path;

use common::parity::ort_runtime;
use diffusiond::pipeline::{GenerateParams, Pipeline, PipelineError};

/// tiny-sd15 with the overflowing decoder as `vae_decoder/` and, when `fallback`, its own
/// fp32 decoder as `vae_decoder_fp32/`.
fn folder(dir: &Path, fallback: bool) {
    let tiny = common::root().join("onnx/tiny-sd15");
    common::copy_dir(&tiny, dir);
    if fallback {
        common::copy_dir(&tiny.join("vae_decoder"), &dir.join("vae_decoder_fp32"));
    }
    std::fs::copy(
        common::root().join("tests/data/overflow_vae_decoder/model.onnx"),
        dir.join("vae_decoder/model.onnx"),
    )
    .unwrap();
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: "a lighthouse".into(),
        steps: 3,
        seed: 11,
        num_images: 2,
        ..GenerateParams::default()
    }
}

#[test]
fn an_overflowing_fp16_vae_falls_back_to_the_fp32_one() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), true);
    let mut guarded = Pipeline::load(ort_runtime(), dir.path()).unwrap();
    let got = guarded.generate(&params(), &mut |_, _| true).unwrap();
    let mut plain = Pipeline::load(ort_runtime(), &common::root().join("onnx/tiny-sd15")).unwrap();
    let want = plain.generate(&params(), &mut |_, _| true).unwrap();
    assert_eq!(got.images.len(), 2);
    for (g, w) in got.images.iter().zip(&want.images) {
        assert_eq!(g.rgb, w.rgb, "the fp32 decoder's image");
    }
}

#[test]
fn without_an_fp32_vae_the_job_fails_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), false);
    let mut pipeline = Pipeline::load(ort_runtime(), dir.path()).unwrap();
    let err = pipeline.generate(&params(), &mut |_, _| true).unwrap_err();
    assert!(
        matches!(err, PipelineError::NonFinite { stage: "vae", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("vae"), "{err}");
}
