//! Benchmark helper for `bench/run.py`: warm per-stage timings of diffusiond's pipeline,
//! in-process or through the daemon over D-Bus, printed as one JSON object on stdout.
//!
//! ```sh
//! # in-process: load the model folder once, then N warm generations (+ PNG encoding)
//! cargo run --release --example bench_pipeline -- local --config bench.toml \
//!     --model-dir onnx/tiny-sd15 --steps 20 --repeats 5 --png-out /tmp/a.png
//! # through a running daemon: N Generate()+Wait() round trips, with the job's timings
//! cargo run --release --example bench_pipeline -- dbus --address unix:path=/tmp/bus \
//!     --model bench --steps 20 --repeats 5
//! ```
//!
//! Every run reports wall seconds and the pipeline's stage timings; `local` also reports
//! the load time, the time of the first (cold-cache) generation, and peak RSS (`VmHWM`).
//! `local --control NAME=IMAGE` (repeatable) runs the model folder's ControlNet NAME with
//! that control image (`bench/controlnet_ab.py`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use diffusiond::client::JobResult;
use diffusiond::config::Settings;
use diffusiond::pipeline::{GenerateParams, Pipeline, image};
use diffusiond::runtime::Runtime;
use serde_json::{Value as Json, json};
use zbus::zvariant::{OwnedObjectPath, Value};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Generate in this process.
    Local {
        /// Model folder.
        #[arg(long)]
        model_dir: PathBuf,
        /// Config file: only its `[runtime]` table is used.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        req: Request,
    },
    /// Ask a running daemon.
    Dbus {
        /// D-Bus address of the bus the daemon is on.
        #[arg(long)]
        address: String,
        /// Model name from the daemon's config.
        #[arg(long)]
        model: String,
        #[command(flatten)]
        req: Request,
    },
}

#[derive(Debug, Args)]
struct Request {
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    prompt: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    width: usize,
    #[arg(long, default_value_t = 0)]
    height: usize,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Timed generations (after the first, which is reported separately).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Write the first generation's images here (OUT.png or OUT-0.png, OUT-1.png, ...).
    #[arg(long)]
    png_out: Option<PathBuf>,
    /// A ControlNet of the model folder and its control image, `NAME=IMAGE` (local only;
    /// repeatable).
    #[arg(long = "control")]
    controls: Vec<String>,
}

/// The `--control NAME=IMAGE` values as request controls (scale 1, all steps).
fn controls(specs: &[String]) -> Result<Vec<diffusiond::request::ControlInput>, String> {
    specs
        .iter()
        .map(|s| {
            let (name, path) = s
                .split_once('=')
                .ok_or_else(|| format!("--control {s}: expected NAME=IMAGE"))?;
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            Ok(diffusiond::request::ControlInput {
                controlnet: Some(name.to_string()),
                image: Some(diffusiond::request::ImageInput::new(bytes)),
                ..Default::default()
            })
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Local {
            model_dir,
            config,
            req,
        } => local(&model_dir, config, &req),
        Mode::Dbus {
            address,
            model,
            req,
        } => dbus(&address, &model, &req),
    };
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("bench_pipeline: {message}");
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

fn local(
    model_dir: &std::path::Path,
    config: Option<PathBuf>,
    req: &Request,
) -> Result<Json, String> {
    let settings = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
    let session = settings.runtime.session.clone();
    let t0 = Instant::now();
    let runtime = Runtime::init(settings.runtime).map_err(|e| e.to_string())?;
    let mut pipeline = Pipeline::load(&runtime, model_dir).map_err(|e| e.to_string())?;
    let load_s = t0.elapsed().as_secs_f64();
    let native = pipeline.bundle().default_size;
    let params = GenerateParams {
        prompt: req.prompt.clone(),
        steps: req.steps,
        guidance_scale: req.guidance,
        seed: req.seed,
        width: if req.width == 0 { native } else { req.width },
        height: if req.height == 0 { native } else { req.height },
        num_images: req.num_images,
        controls: controls(&req.controls)?,
        ..GenerateParams::default()
    };
    let provider = diffusiond::jobs::backend::execution_provider(&runtime);
    let provenance = diffusiond::request::Provenance {
        ort_version: pipeline.ort_version(),
        model_hash: pipeline.bundle().short_hash(),
        execution_provider: &provider,
        loras: pipeline.loras(),
    };
    let text = pipeline
        .resolve(&params)
        .map_err(|e| e.to_string())?
        .png_parameters(&provenance, 0);
    let mut runs = Vec::new();
    for i in 0..=req.repeats {
        let t = Instant::now();
        let g = pipeline
            .generate(&params, &mut |_, _| true)
            .map_err(|e| e.to_string())?;
        let gen_s = t.elapsed().as_secs_f64();
        let tp = Instant::now();
        let pngs = g
            .images
            .iter()
            .map(|img| image::encode_png(&img.rgb, &text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let png_s = tp.elapsed().as_secs_f64();
        let total_s = t.elapsed().as_secs_f64();
        if i == 0
            && let Some(out) = &req.png_out
        {
            let paths = output_paths(out, pngs.len());
            for (bytes, path) in pngs.iter().zip(&paths) {
                image::write_file(path, bytes).map_err(|e| e.to_string())?;
            }
        }
        let tm = &g.timings;
        runs.push(json!({
            "first": i == 0,
            "total_s": total_s,
            "generate_s": gen_s,
            "text_encoder_s": tm.text_encoder.as_secs_f64(),
            "unet_s": tm.unet.as_secs_f64(),
            "unet_calls": tm.unet_calls,
            "controlnet_s": tm.controlnet.as_secs_f64(),
            "scheduler_s": tm.scheduler.as_secs_f64(),
            "vae_s": tm.vae.as_secs_f64(),
            "postprocess_s": tm.postprocess.as_secs_f64(),
            "png_s": png_s,
        }));
    }
    Ok(json!({
        "runner": "diffusiond-inprocess",
        "ort_version": pipeline.ort_version(),
        "intra_threads": session.intra_threads,
        "inter_threads": session.inter_threads,
        "providers": runtime.providers().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "width": params.width,
        "height": params.height,
        "load_s": load_s,
        "runs": runs,
        "vm_hwm_kib": vm_hwm_kib(),
    }))
}

#[zbus::proxy(
    interface = "io.github.Diffusiond1.Manager",
    default_service = "io.github.Diffusiond1",
    default_path = "/io/github/Diffusiond1"
)]
trait Manager {
    fn generate(&self, request: HashMap<&str, Value<'_>>) -> zbus::Result<OwnedObjectPath>;
}

#[zbus::proxy(
    interface = "io.github.Diffusiond1.Job",
    default_service = "io.github.Diffusiond1"
)]
trait Job {
    fn wait(&self) -> zbus::Result<JobResult>;
}

fn dbus(address: &str, model: &str, req: &Request) -> Result<Json, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(dbus_runs(address, model, req))
}

async fn dbus_runs(address: &str, model: &str, req: &Request) -> Result<Json, String> {
    let e = |e: zbus::Error| e.to_string();
    let conn = zbus::connection::Builder::address(address)
        .map_err(e)?
        .build()
        .await
        .map_err(e)?;
    let manager = ManagerProxy::new(&conn).await.map_err(e)?;
    let mut runs = Vec::new();
    for i in 0..=req.repeats {
        let mut request: HashMap<&str, Value<'_>> = HashMap::new();
        request.insert("prompt", Value::from(req.prompt.as_str()));
        request.insert("model", Value::from(model));
        request.insert("steps", Value::U32(req.steps as u32));
        request.insert("guidance_scale", Value::F64(req.guidance));
        request.insert("seed", Value::U64(req.seed));
        request.insert("num_images", Value::U32(req.num_images as u32));
        if req.width > 0 {
            request.insert("width", Value::U32(req.width as u32));
        }
        if req.height > 0 {
            request.insert("height", Value::U32(req.height as u32));
        }
        let t = Instant::now();
        let path = manager.generate(request).await.map_err(e)?;
        let job = JobProxy::builder(&conn)
            .path(path)
            .map_err(e)?
            .build()
            .await
            .map_err(e)?;
        let result = job.wait().await.map_err(e)?;
        let total_s = t.elapsed().as_secs_f64();
        let timings = result.timings.unwrap_or_default();
        let images = result.images.unwrap_or_default();
        if i == 0
            && let Some(out) = &req.png_out
        {
            let paths = output_paths(out, images.len());
            for (bytes, path) in images.iter().zip(&paths) {
                std::fs::write(path, bytes).map_err(|e| e.to_string())?;
            }
        }
        let get = |k: &str| timings.get(k).copied().unwrap_or(f64::NAN);
        runs.push(json!({
            "first": i == 0,
            "total_s": total_s,
            "job_total_s": get("total"),
            "queued_s": get("queued"),
            "text_encoder_s": get("text_encoder"),
            "unet_s": get("unet"),
            "scheduler_s": get("scheduler"),
            "vae_s": get("vae"),
            "png_s": get("png"),
            "images": images.len(),
        }));
    }
    Ok(json!({ "runner": "diffusiond-dbus", "runs": runs }))
}

/// `OUT.png` for one image; `OUT-0.png`, `OUT-1.png`, ... for several (as diffusionctl).
fn output_paths(output: &std::path::Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}-{i}.png")))
        .collect()
}
