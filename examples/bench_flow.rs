//! Benchmark helper for `bench/transformer_ab.py`: warm text-to-image timings of diffusiond's
//! flow-matching transformer pipeline (SD3, FLUX) in this process, printed as one JSON
//! object on stdout.
//!
//! ```sh
//! cargo run --release --example bench_flow -- --model-dir onnx/build/small-sd3 \
//!     --size 256 --steps 10 --repeats 3 --guidance 7 --intra 1 --inter 1 --png-out /tmp/a.png
//! ```
//!
//! The folder is loaded once (`load_s`), then one warm-up generation runs (reported as the
//! first run) and `--repeats` timed ones; `median_s` is the median of the timed runs. Each
//! run is `TransformerPipeline::generate` (text encoders, the denoising loop, VAE decode
//! and pixel conversion); PNG encoding is not timed. `float_sha256` is the SHA-256 of the
//! warm-up generation's float images (every value's f32 bits, little-endian, image after
//! image): two builds that print the same digest made bit-identical images.
//! `allocs_per_run` and `alloc_bytes_per_run` count the Rust heap allocations of each timed
//! generation (a counting global allocator; ONNX Runtime's own C++ allocations are not
//! seen): two runs with different `--steps` give the allocations per denoising step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use diffusiond::pipeline::flow::{FlowParams, TransformerPipeline};
use diffusiond::pipeline::image;
use diffusiond::runtime::{Runtime, RuntimeSettings};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};

/// The system allocator, counting allocations (and reallocations) and their bytes.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    ALLOC_BYTES.fetch_add(size as u64, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counters are atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: `ptr` came from `System` with `layout`; the rest is the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Debug, Parser)]
struct Cli {
    /// Optimum export of a `StableDiffusion3Pipeline` or `FluxPipeline`.
    #[arg(long)]
    model_dir: PathBuf,
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    prompt: String,
    /// Width and height in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// SD3: classifier-free guidance scale; FLUX schnell-style models ignore it.
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// The negative prompt (SD3 with guidance; FLUX with `--true-cfg-scale` above 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// FLUX: true classifier-free guidance with the negative prompt (two runs a step).
    #[arg(long, default_value_t = 1.0)]
    true_cfg_scale: f64,
    /// Images per generation (one batch).
    #[arg(long, default_value_t = 1)]
    images: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// T5 tokens; 0: the pipeline's default (SD3 256, FLUX 512).
    #[arg(long, default_value_t = 0)]
    max_sequence_length: usize,
    /// Timed generations after the warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// ONNX Runtime intra-op threads (0: its default).
    #[arg(long, default_value_t = 1)]
    intra: usize,
    /// ONNX Runtime inter-op threads (0: its default).
    #[arg(long, default_value_t = 1)]
    inter: usize,
    /// Write the warm-up generation's first image here as PNG.
    #[arg(long)]
    png_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench(&cli) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("bench_flow: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Peak resident set size of this process, in KiB.
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pipeline class named by the folder's `model_index.json`.
fn family(dir: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(dir.join("model_index.json")).map_err(|e| e.to_string())?;
    let index: Json = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(index
        .get("_class_name")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string())
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn bench(cli: &Cli) -> Result<Json, String> {
    let class = family(&cli.model_dir)?;
    let is_sd3 = class.contains("StableDiffusion3");
    let mut settings = RuntimeSettings::default();
    settings.session.intra_threads = cli.intra;
    settings.session.inter_threads = cli.inter;
    let t0 = Instant::now();
    let runtime = Runtime::init(settings).map_err(|e| e.to_string())?;
    let mut pipeline =
        TransformerPipeline::load(&runtime, &cli.model_dir).map_err(|e| e.to_string())?;
    let load_s = t0.elapsed().as_secs_f64();
    let max_sequence_length = match cli.max_sequence_length {
        0 if is_sd3 => 256,
        0 => 512,
        n => n,
    };
    let params = FlowParams {
        prompt: cli.prompt.clone(),
        negative_prompt: cli.negative_prompt.clone(),
        steps: cli.steps,
        guidance_scale: cli.guidance,
        seed: cli.seed,
        width: cli.size,
        height: cli.size,
        num_images: cli.images,
        max_sequence_length,
        true_cfg_scale: cli.true_cfg_scale,
        edit: None,
    };
    let mut first_s = 0.0;
    let mut digest = String::new();
    let mut runs = Vec::with_capacity(cli.repeats);
    let mut allocs = Vec::with_capacity(cli.repeats);
    let mut alloc_bytes = Vec::with_capacity(cli.repeats);
    for i in 0..=cli.repeats {
        let (a0, b0) = (
            ALLOCS.load(Ordering::Relaxed),
            ALLOC_BYTES.load(Ordering::Relaxed),
        );
        let t = Instant::now();
        let images = pipeline.generate(&params).map_err(|e| e.to_string())?;
        let s = t.elapsed().as_secs_f64();
        let (a1, b1) = (
            ALLOCS.load(Ordering::Relaxed),
            ALLOC_BYTES.load(Ordering::Relaxed),
        );
        if i == 0 {
            first_s = s;
            let mut sha = Sha256::new();
            for img in &images {
                for v in &img.float {
                    sha.update(v.to_le_bytes());
                }
            }
            digest = format!("{:x}", sha.finalize());
            if let Some(path) = &cli.png_out {
                let img = images.first().ok_or("no image generated")?;
                let png = image::encode_png(&img.rgb, "").map_err(|e| e.to_string())?;
                image::write_file(path, &png).map_err(|e| e.to_string())?;
            }
        } else {
            runs.push(s);
            allocs.push(a1 - a0);
            alloc_bytes.push(b1 - b0);
        }
    }
    Ok(json!({
        "runner": "diffusiond",
        "model_dir": cli.model_dir.display().to_string(),
        "pipeline_class": class,
        "ort_version": runtime.version(),
        "intra_threads": cli.intra,
        "inter_threads": cli.inter,
        "size": cli.size,
        "steps": cli.steps,
        "guidance": cli.guidance,
        "negative_prompt": cli.negative_prompt,
        "true_cfg_scale": cli.true_cfg_scale,
        "images": cli.images,
        "seed": cli.seed,
        "max_sequence_length": max_sequence_length,
        "load_s": load_s,
        "first_s": first_s,
        "runs_s": runs,
        "median_s": median(&runs),
        "vm_hwm_kib": vm_hwm_kib(),
        "allocs_per_run": allocs,
        "alloc_bytes_per_run": alloc_bytes,
        "float_sha256": digest,
    }))
}
