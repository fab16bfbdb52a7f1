//! The bound buffers against the converted inputs: on the tiny SD3 and FLUX fixtures
//! (`onnx/tiny-*`), a generation on the transformer's bound f32 buffers makes the same
//! float images, bit for bit, as one with its inputs converted per run (the path of graphs
//! that are not all-f32, and the per-step path this replaced); a second generation on the
//! same pipeline as well (the buffers are refilled, nothing carries over).

use std::path::Path;
use std::sync::OnceLock;

use super::{FlowParams, TransformerPipeline};
use crate::runtime::{Runtime, RuntimeSettings};

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let mut s = RuntimeSettings::default();
        s.session.intra_threads = 1;
        s.session.inter_threads = 1;
        Runtime::init(s).expect("ONNX Runtime (run scripts/setup)")
    })
}

fn params(guidance: f64, negative: Option<&str>, true_cfg: f64, images: usize) -> FlowParams {
    FlowParams {
        prompt: "a red cube on a table".into(),
        negative_prompt: negative.map(str::to_string),
        steps: 3,
        guidance_scale: guidance,
        seed: 7,
        width: 64,
        height: 48,
        num_images: images,
        max_sequence_length: 64,
        true_cfg_scale: true_cfg,
        edit: None,
    }
}

/// Every float of the images, as bits.
fn bits(p: &mut TransformerPipeline, params: &FlowParams) -> Vec<u32> {
    let images = p.generate(params).unwrap();
    assert_eq!(images.len(), params.num_images);
    images
        .iter()
        .flat_map(|i| i.float.iter().map(|v| v.to_bits()))
        .collect()
}

#[test]
fn bound_buffers_make_the_converted_paths_images_bit_for_bit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx");
    let cases = [
        // SD3: classifier-free guidance (a batch of 2n) and without.
        ("tiny-sd3", params(7.0, Some("blurry"), 1.0, 2)),
        ("tiny-sd3", params(1.0, None, 1.0, 1)),
        // FLUX: schnell-style; dev-style with its guidance input and true CFG.
        ("tiny-flux", params(0.0, None, 1.0, 2)),
        ("tiny-flux-dev", params(3.5, Some("blurry"), 2.0, 2)),
    ];
    for (model, params) in &cases {
        let mut p = TransformerPipeline::load(runtime(), &root.join(model)).unwrap();
        let bound = bits(&mut p, params);
        assert_eq!(bits(&mut p, params), bound, "{model}: second generation");
        p.force_converted(true);
        assert_eq!(bits(&mut p, params), bound, "{model}: converted inputs");
    }
}
