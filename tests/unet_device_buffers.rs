//! The UNet's device-buffer path, run for real on the CPU: a pipeline whose UNet buffers
//! are forced to `Placement::Device { CPU, 0 }` allocates its bound tensors from the
//! session's allocator for that device, keeps host staging tensors, copies `sample` and
//! `timestep` up and `out_sample` down every step through `ort`'s identity sessions, and
//! copies the conditioning once per generation: the code a CUDA worker runs, minus the GPU.
//! Every case is generated on the host path and on that copy-through path and the images
//! must be bit-identical (same values into ONNX Runtime, same values out); the counters of
//! the device path show it ran (copies per step, one buffer set per shape, addresses that
//! do not move, one CUDA graph id per shape). No mocks: the bundled tiny models on the real
//! ONNX Runtime.

mod common;

use std::path::PathBuf;

use common::parity::{Diff, generate_case, manifest_cases, ort_runtime};
use diffusiond::pipeline::unet::{DeviceIoStats, GRAPH_WARMUP_RUNS, Placement};
use diffusiond::pipeline::{GenerateParams, Generation, Pipeline};
use diffusiond::request::ImageInput;
use ort::memory::AllocationDevice;
use serde::Deserialize;

/// The fields of a golden case (tests/golden/{pipelines,edit,fp16}/manifest.json) this test
/// needs; absent ones take the request defaults.
#[derive(Debug, Deserialize, Clone)]
struct Case {
    id: String,
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    scheduler: Option<String>,
    steps: usize,
    guidance_scale: f64,
    #[serde(default)]
    guidance_rescale: f64,
    strength: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    num_images: usize,
    seed: u64,
    rng: Option<String>,
    init_image: Option<String>,
    mask_image: Option<String>,
    images: Vec<String>,
    pngs: Vec<String>,
    unet_timesteps: Vec<f64>,
}

fn golden(set: &str) -> PathBuf {
    common::root().join("tests/golden").join(set)
}

/// The case `id` of the golden set `set`.
fn case(set: &str, id: &str) -> Case {
    manifest_cases::<Case>(&golden(set))
        .into_iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no case {id} in tests/golden/{set}/manifest.json"))
}

fn params(set: &str, case: &Case) -> GenerateParams {
    let image = |rel: &Option<String>| {
        rel.as_ref()
            .map(|r| ImageInput::new(std::fs::read(golden(set).join(r)).unwrap()))
    };
    GenerateParams {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance_scale: case.guidance_scale,
        guidance_rescale: case.guidance_rescale,
        scheduler: case.scheduler.clone(),
        seed: case.seed,
        rng: case
            .rng
            .as_deref()
            .map(|r| r.parse().unwrap())
            .unwrap_or_default(),
        width: case.width.unwrap_or(0),
        height: case.height.unwrap_or(0),
        num_images: case.num_images,
        init_image: image(&case.init_image),
        mask_image: image(&case.mask_image),
        strength: case.strength,
        ..GenerateParams::default()
    }
}

fn load(model: &str) -> Pipeline {
    Pipeline::load(ort_runtime(), &common::root().join(model))
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// A pipeline whose UNet runs the device path on host memory (`graphs`: one CUDA graph id
/// per shape in the run options, which the CPU provider ignores).
fn copy_through(model: &str, graphs: bool) -> Pipeline {
    let mut p = load(model);
    let unet = p.unet_mut();
    assert_eq!(unet.placement(), Placement::Host, "{model}: a CPU runtime");
    unet.force_placement(
        Placement::Device {
            device: AllocationDevice::CPU,
            id: 0,
        },
        graphs,
    )
    .unwrap();
    assert_eq!(unet.cuda_graphs(), graphs);
    assert_eq!(
        unet.device_io_stats(),
        Some(DeviceIoStats::default()),
        "{model}: nothing allocated before the first generation"
    );
    p
}

fn generate(pipeline: &mut Pipeline, set: &str, case: &Case) -> Generation {
    generate_case(
        pipeline,
        &params(set, case),
        &case.id,
        &case.unet_timesteps,
        case.num_images,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Every float and byte of every image equal.
fn assert_bit_identical(id: &str, host: &Generation, device: &Generation) {
    assert_eq!(host.images.len(), device.images.len(), "{id}: image count");
    for (i, (h, d)) in host.images.iter().zip(&device.images).enumerate() {
        assert_eq!(h.float.shape(), d.float.shape(), "{id} image {i}: shape");
        let differ = h
            .float
            .iter()
            .zip(d.float.iter())
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{id} image {i}: {differ} float values differ");
        assert_eq!(h.rgb, d.rgb, "{id} image {i}: PNG bytes differ");
    }
}

fn stats(pipeline: &mut Pipeline) -> DeviceIoStats {
    pipeline
        .unet_mut()
        .device_io_stats()
        .expect("the device path is in use")
}

/// UNet runs of a case: one per timestep (Heun and friends are not used here).
fn runs(case: &Case) -> usize {
    case.unet_timesteps.len()
}

/// Text to image with classifier-free guidance (two images, ancestral noise): bit-identical
/// to the host path and within the Optimum reference's bar; two uploads and one download
/// per step, the conditioning once per generation, and a second generation of the same
/// shape with other prompts reuses the buffers where they are, with its own conditioning.
#[test]
fn txt2img_with_cfg_is_bit_identical_on_the_copy_through_path() {
    let set = "pipelines";
    let c = case(set, "sd15-euler-a-s4-g7.5-64x64-n2-torch-1035");
    let mut host = load(&c.model);
    let mut device = copy_through(&c.model, false);
    let want = generate(&mut host, set, &c);
    let got = generate(&mut device, set, &c);
    assert_bit_identical(&c.id, &want, &got);
    let diff = Diff::of_images(&got.images, &golden(set), &c.images, &c.pngs);
    assert!(diff.within_bar(), "{}: {diff}", c.id);

    let first = stats(&mut device);
    let steps = runs(&c);
    assert_eq!(first.allocations, 1);
    assert_eq!(first.condition_uploads, 1);
    assert_eq!(first.step_uploads, 2 * steps);
    assert_eq!(first.step_downloads, steps);
    assert_eq!(first.shapes.len(), 1);
    // Two images, each with its unconditional row: [4, 4, 64/8, 64/8].
    assert_eq!(first.shapes[0].sample, vec![4, 4, 8, 8]);
    assert_eq!(first.shapes[0].graph_id, None);
    assert_eq!(first.shapes[0].runs, steps);

    // Same shape, other prompt and negative prompt: stale conditioning would show.
    let other = case(set, "sd15-pndm-s4-g7.5-64x64-n2-torch-1034");
    assert_ne!(
        (&other.prompt, &other.negative_prompt),
        (&c.prompt, &c.negative_prompt)
    );
    let want_other = generate(&mut host, set, &other);
    let got_other = generate(&mut device, set, &other);
    assert_bit_identical(&other.id, &want_other, &got_other);
    let second = stats(&mut device);
    assert_eq!(second.allocations, 1, "same shape: no new buffers");
    assert_eq!(
        second.condition_uploads, 2,
        "conditioning once per generation"
    );
    assert_eq!(second.step_downloads, steps + runs(&other));
    assert_eq!(
        second.shapes[0].sample_address, first.shapes[0].sample_address,
        "the bound sample did not move"
    );
}

/// Two batch shapes in a row and back (64x64 with CFG: 2 rows; 96x64 without: 1 row; then
/// 64x64 with another prompt), with CUDA graph ids on: each shape gets its own id and keeps
/// its buffers at the same address, so going back to the first shape allocates and rebinds
/// nothing; only its conditioning is copied in.
#[test]
fn two_batch_shapes_in_a_row_get_their_own_graph_ids_and_keep_their_buffers() {
    let set = "pipelines";
    let a = case(set, "sd15-ddim-s4-g7.5-64x64-n1-torch-1036");
    let b = case(set, "sd15-ddim-s4-g1-96x64-n1-torch-1005");
    let mut host = load(&a.model);
    let mut device = copy_through(&a.model, true);
    // The first shape again, with another prompt: its conditioning is copied into the
    // buffers graph 1 was captured with.
    let a2 = case(set, "sd15-ddim-s1-g7.5-64x64-n1-torch-1004");
    assert_ne!(a2.prompt, a.prompt);
    let want_a = generate(&mut host, set, &a);
    let want_b = generate(&mut host, set, &b);
    let want_a2 = generate(&mut host, set, &a2);

    assert_bit_identical(&a.id, &want_a, &generate(&mut device, set, &a));
    let after_a = stats(&mut device);
    assert_bit_identical(&b.id, &want_b, &generate(&mut device, set, &b));
    let after_b = stats(&mut device);
    assert_bit_identical(&a2.id, &want_a2, &generate(&mut device, set, &a2));
    let after_a2 = stats(&mut device);

    assert_eq!(after_a.shapes.len(), 1);
    assert_eq!(
        after_b.shapes.len(),
        2,
        "a captured shape keeps its buffers"
    );
    let (sa, sb) = (&after_b.shapes[0], &after_b.shapes[1]);
    assert_eq!(
        (sa.sample.clone(), sa.graph_id),
        (vec![2, 4, 8, 8], Some(1))
    );
    assert_eq!(
        (sb.sample.clone(), sb.graph_id),
        (vec![1, 4, 8, 12], Some(2))
    );
    assert_eq!(
        after_a2.allocations, 2,
        "back to the first shape: no new buffers"
    );
    assert_eq!(after_a2.condition_uploads, 3);
    assert_eq!(after_a2.shapes.len(), 2);
    assert_eq!(after_a2.shapes[0].graph_id, Some(1));
    assert_eq!(
        after_a2.shapes[0].sample_address, after_a.shapes[0].sample_address,
        "graph 1's buffers stayed where it was captured"
    );
    assert_eq!(after_a2.shapes[0].runs, runs(&a) + runs(&a2));
    assert_eq!(after_a2.shapes[1].runs, runs(&b));
    // Enough runs of the first shape that some ran under its own graph id, after the
    // warm-up ones.
    assert!(after_a2.shapes[0].runs > GRAPH_WARMUP_RUNS);
}

/// Without CUDA graphs nothing replays old addresses: a new shape replaces the buffer set
/// (one held at a time, as on the host path), and the results stay bit-identical.
#[test]
fn without_graphs_a_new_shape_replaces_the_buffers() {
    let set = "pipelines";
    let a = case(set, "sd15-ddim-s4-g7.5-64x64-n1-torch-1036");
    let b = case(set, "sd15-ddim-s4-g1-96x64-n1-torch-1005");
    let mut host = load(&a.model);
    let mut device = copy_through(&a.model, false);
    let (want_a, want_b) = (generate(&mut host, set, &a), generate(&mut host, set, &b));
    for (c, want) in [(&a, &want_a), (&b, &want_b), (&a, &want_a)] {
        assert_bit_identical(&c.id, want, &generate(&mut device, set, c));
        let s = stats(&mut device);
        assert_eq!(s.shapes.len(), 1, "{}: one buffer set held", c.id);
        assert_eq!(s.shapes[0].graph_id, None);
    }
    assert_eq!(stats(&mut device).allocations, 3);
}

/// SDXL: `text_embeds` and `time_ids` are device buffers too, uploaded with the hidden
/// states once per generation.
#[test]
fn sdxl_added_conditioning_is_bit_identical_on_the_copy_through_path() {
    check_edit_case("txt2img-sdxl-default-s4-g5-64x64-n1-2044");
}

/// LCM-distilled UNet: the guidance embedding (`timestep_cond`) is bound on the device.
#[test]
fn lcm_guidance_embedding_is_bit_identical_on_the_copy_through_path() {
    check_edit_case("txt2img-lcm-default-s4-g8-64x64-n1-2033");
}

/// 9-channel inpainting UNet with CFG and two images: the mask channels, written once into
/// the host staging `sample` before the loop, go up with every step.
#[test]
fn inpainting_unet_is_bit_identical_on_the_copy_through_path() {
    check_edit_case("inpaint-sd15-inpaint-euler-s4-st0.75-g7.5-96x64-m96x64-soft-n2-2030");
}

fn check_edit_case(id: &str) {
    let set = "edit";
    let c = case(set, id);
    let mut host = load(&c.model);
    let mut device = copy_through(&c.model, false);
    let want = generate(&mut host, set, &c);
    let got = generate(&mut device, set, &c);
    assert_bit_identical(&c.id, &want, &got);
    let s = stats(&mut device);
    assert_eq!(s.step_downloads, runs(&c), "{id}: one download per step");
    assert_eq!(s.condition_uploads, 1, "{id}");
}

/// An fp16 UNet, which the host path runs unbound (converted inputs each step), runs bound
/// on the device path with fp16 staging tensors: the same f16 values reach ONNX Runtime, so
/// the images are bit-identical.
#[test]
fn fp16_unet_is_bit_identical_on_the_copy_through_path() {
    let set = "fp16";
    let c = case(set, "txt2img-sd15-fp16-default-s4-g7.5-64x64-n1-3001");
    let mut host = load(&c.model);
    assert_eq!(
        host.unet_mut().device_io_stats(),
        None,
        "the host path has no device buffers"
    );
    let mut device = copy_through(&c.model, false);
    let want = generate(&mut host, set, &c);
    let got = generate(&mut device, set, &c);
    assert_bit_identical(&c.id, &want, &got);
    let s = stats(&mut device);
    assert_eq!(s.allocations, 1);
    assert_eq!(s.step_uploads, 2 * runs(&c));
}

/// CUDA graphs need the device placement: asking for them on host buffers is refused.
#[test]
fn cuda_graphs_on_host_buffers_are_refused() {
    let mut p = load("onnx/tiny-sd15");
    let err = p
        .unet_mut()
        .force_placement(Placement::Host, true)
        .unwrap_err();
    assert!(err.to_string().contains("device memory"), "{err}");
}
