//! Benchmark of LoRA sets on one model folder: what a new set costs (merging its files
//! into the weights, building its sessions: what the daemon's loading thread does when
//! a request names a set not loaded yet), what a generation costs on the base model and
//! on a loaded set (timed in turns, after one warm-up each), and the resident memory a
//! loaded set adds.
//!
//! ```sh
//! cargo run --release --example lora_switch -- --model-dir onnx/build/small \
//!     --rank 16 --steps 10 --size 256 --repeats 3
//! ```
//!
//! The LoRA is made here, seeded: a kohya file with a rank-`--rank` layer on every
//! attention projection and feed-forward layer of the UNet and on every attention and
//! MLP layer of the text encoders (the layers a typical trained LoRA has). Prints one
//! JSON object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use diffusiond::lora::{self, Graph, LoraSpec, WeightMap};
use diffusiond::model::ModelBundle;
use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::runtime::{Runtime, RuntimeSettings};
use serde_json::json;

#[derive(Debug, Parser)]
struct Cli {
    /// The model folder.
    #[arg(long)]
    model_dir: PathBuf,
    /// The LoRA's rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Denoising steps per generation.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Timed generations per pipeline (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Intra-op threads (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 0)]
    intra: usize,
    /// Also put a (LoCon) layer on every resnet's 3×3 convolutions.
    #[arg(long)]
    conv: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lora_switch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// This process's resident set, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A seeded value in [-1, 1) (splitmix64).
fn noise(i: u64, seed: u64) -> f32 {
    let mut z = i.wrapping_add(seed).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Whether a module is one a trained LoRA usually has (with `conv`, a LoCon's resnet
/// convolutions too).
fn targeted(module: &str, conv: bool) -> bool {
    let unet = [
        ".to_q",
        ".to_k",
        ".to_v",
        ".to_out.0",
        ".ff.net.0.proj",
        ".ff.net.2",
    ];
    let text = ["_proj", ".fc1", ".fc2"];
    (module.contains("transformer_blocks") && unet.iter().any(|s| module.ends_with(s)))
        || (module.starts_with("text_model.encoder.layers")
            && text.iter().any(|s| module.ends_with(s)))
        || (conv
            && module.contains(".resnets.")
            && (module.ends_with(".conv1") || module.ends_with(".conv2")))
}

/// Writes the kohya LoRA file; returns its layer count.
fn write_lora(model_dir: &Path, rank: usize, conv: bool, out: &Path) -> Result<usize, String> {
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (folder, prefix) in [
        ("unet", "lora_unet"),
        ("text_encoder", "lora_te1"),
        ("text_encoder_2", "lora_te2"),
    ] {
        let graph = model_dir.join(folder).join("model.onnx");
        if !graph.exists() {
            continue;
        }
        let prefix = if folder == "text_encoder" && !model_dir.join("text_encoder_2").exists() {
            "lora_te"
        } else {
            prefix
        };
        let map = WeightMap::from_graph(&Graph::open(&graph).map_err(|e| e.to_string())?);
        for w in map.iter().filter(|w| targeted(&w.module, conv)) {
            let shape = w.torch_shape();
            let (out_f, in_f) = (shape[0] as usize, shape[1] as usize);
            let kernel: Vec<usize> = shape[2..].iter().map(|&d| d as usize).collect();
            let fan_in = in_f * kernel.iter().product::<usize>();
            let key = format!("{prefix}_{}", w.module.replace('.', "_"));
            let seed = tensors.len() as u64 * 7919;
            let scale_a = 1.0 / (fan_in as f32).sqrt();
            let down = (0..rank * fan_in)
                .map(|i| noise(i as u64, seed) * scale_a)
                .collect();
            let up = (0..out_f * rank)
                .map(|i| noise(i as u64, seed + 1) * 0.5 / (rank as f32).sqrt())
                .collect();
            let mut down_shape = vec![rank, in_f];
            down_shape.extend(&kernel);
            let mut up_shape = vec![out_f, rank];
            up_shape.extend(kernel.iter().map(|_| 1));
            tensors.insert(format!("{key}.lora_down.weight"), (down_shape, down));
            tensors.insert(format!("{key}.lora_up.weight"), (up_shape, up));
            tensors.insert(format!("{key}.alpha"), (vec![], vec![rank as f32 / 2.0]));
        }
    }
    let layers = tensors.len() / 3;
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, values)) in &tensors {
        let begin = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let header =
        serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| e.to_string())?;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&data);
    std::fs::write(out, bytes).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(layers)
}

/// Seconds of one generation.
fn time_one(p: &mut Pipeline, params: &GenerateParams) -> Result<f64, String> {
    let t = Instant::now();
    p.generate(params, &mut |_, _| true)
        .map(|_| t.elapsed().as_secs_f64())
        .map_err(|e| e.to_string())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run(cli: Cli) -> Result<(), String> {
    let mut settings = RuntimeSettings::default();
    settings.session.intra_threads = cli.intra;
    let runtime = Runtime::init(settings).map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("bench.safetensors");
    let layers = write_lora(&cli.model_dir, cli.rank, cli.conv, &file)?;
    let file_bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
    let bundle = Arc::new(ModelBundle::open(&cli.model_dir).map_err(|e| e.to_string())?);
    let params = GenerateParams {
        prompt: "a photograph of an astronaut riding a horse".into(),
        steps: cli.steps,
        width: cli.size,
        height: cli.size,
        seed: 1,
        ..GenerateParams::default()
    };

    let rss0 = rss();
    let t = Instant::now();
    let mut base = Pipeline::from_bundle(&runtime, bundle.clone()).map_err(|e| e.to_string())?;
    let base_load = t.elapsed().as_secs_f64();
    base.generate(&params, &mut |_, _| true)
        .map_err(|e| e.to_string())?;
    let rss_base = rss();

    let spec = [LoraSpec::from_path(&file, 0.8)];
    let t = Instant::now();
    let merged = lora::prepare(&cli.model_dir, &spec).map_err(|e| e.to_string())?;
    let merge = t.elapsed().as_secs_f64();
    let merged_bytes = merged.bytes();
    let replaced = merged.len();
    let t = Instant::now();
    let mut set = Pipeline::with_loras(&runtime, bundle, &merged).map_err(|e| e.to_string())?;
    drop(merged);
    let sessions = t.elapsed().as_secs_f64();
    let t = Instant::now();
    set.generate(&params, &mut |_, _| true)
        .map_err(|e| e.to_string())?;
    let first = t.elapsed().as_secs_f64();
    let rss_set = rss();
    // The base model and the set in turns, so drift affects both alike.
    let (mut base_times, mut set_times) = (Vec::new(), Vec::new());
    for _ in 0..cli.repeats {
        base_times.push(time_one(&mut base, &params)?);
        set_times.push(time_one(&mut set, &params)?);
    }

    let report = json!({
        "model_dir": cli.model_dir.display().to_string(),
        "onnx_runtime": runtime.version(),
        "intra_threads": cli.intra,
        "steps": cli.steps,
        "size": cli.size,
        "lora": {"rank": cli.rank, "conv": cli.conv, "layers": layers, "file_bytes": file_bytes,
                 "initializers_replaced": replaced, "merged_bytes": merged_bytes},
        "base": {"load_s": base_load, "generate_s": base_times, "generate_median_s": median(&base_times)},
        "new_set": {
            "merge_s": merge,
            "sessions_s": sessions,
            "first_generate_s": first,
            "first_request_s": merge + sessions + first,
        },
        "loaded_set": {"generate_s": set_times, "generate_median_s": median(&set_times)},
        "rss_bytes": {"before": rss0, "base_loaded": rss_base, "base_and_set_loaded": rss_set,
                      "set_adds": rss_set.saturating_sub(rss_base)},
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    );
    Ok(())
}
