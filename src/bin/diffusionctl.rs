//! diffusionctl: the command-line client. `generate --local` runs the pipeline in-process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use diffusiond::config::{self, Settings};
use diffusiond::local;
use diffusiond::pipeline::GenerateParams;
use diffusiond::rng::RngKind;

/// Client for the diffusiond image-generation daemon.
#[derive(Debug, Parser)]
#[command(name = "diffusionctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(GenerateArgs),
}

/// Flags of `generate` (a contract: scripts call them by these names).
#[derive(Debug, Args)]
struct GenerateArgs {
    /// Run the pipeline in this process instead of asking the daemon.
    #[arg(long)]
    local: bool,
    /// Model folder (Optimum ONNX layout), with --local.
    #[arg(long, value_name = "DIR", required_if_eq("local", "true"))]
    model_dir: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    guidance: f64,
    /// Guidance rescale, 0..1 (diffusers' guidance_rescale).
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// Scheduler (default: the model folder's own).
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    /// Seed (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Which reference generator the seed follows.
    #[arg(long, default_value = "torch", value_name = "torch|numpy")]
    rng: RngKind,
    /// Initial latents from a .npy file (float32, [K,4,H/8,W/8]), instead of the seed's.
    #[arg(long, value_name = "FILE.npy")]
    latents: Option<PathBuf>,
    /// Width in pixels (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (default: the model's native size).
    #[arg(long)]
    height: Option<usize>,
    /// Number of images; with K > 1, files are OUT-0.png, OUT-1.png, ...
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Output PNG path.
    #[arg(long, value_name = "OUT.png")]
    output: PathBuf,
    /// Config file (runtime settings).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    diffusiond::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("diffusionctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn generate(args: GenerateArgs) -> Result<(), String> {
    if !args.local {
        return Err("talking to the daemon is not part of this build yet; use --local".into());
    }
    let model_dir = args
        .model_dir
        .clone()
        .ok_or("--model-dir is required with --local")?;
    let latents = match &args.latents {
        Some(path) => Some(local::read_latents(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let params = GenerateParams {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        steps: args.steps,
        guidance_scale: args.guidance,
        guidance_rescale: args.guidance_rescale,
        scheduler: args.scheduler,
        seed: args.seed.unwrap_or_else(local::random_seed),
        rng: args.rng,
        latents,
        width: args.width.unwrap_or(0),
        height: args.height.unwrap_or(0),
        num_images: args.num_images,
    };
    let file = args.config.or_else(|| config::default_file(false));
    let settings = Settings::load(file.as_deref()).map_err(|e| e.to_string())?;
    let written = local::generate_to_files(settings.runtime, &model_dir, params, &args.output)
        .map_err(|e| e.to_string())?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}
