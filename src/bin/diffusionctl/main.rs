//! diffusionctl: the command-line client of diffusiond. The library's `client` module
//! does the D-Bus work; this binary parses flags, shows progress and tables
//! ([`progress`], [`output`]) and names the output files. `generate --local` runs the
//! pipeline in-process (`diffusiond::local`); [`batch`] runs manifests; [`verify`]
//! generates an image again from its `parameters` chunk; [`controls`] pairs the ControlNet
//! flags.

mod batch;
mod controls;
mod output;
mod progress;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use diffusiond::client::{
    Bus, Client, ClientError, GenerateRequest, OnInterrupt, printable, printable_lines,
};
use diffusiond::config::{self, Settings};
use diffusiond::local;
use diffusiond::pipeline::preview::PreviewSink;
use diffusiond::request::ImageInput;
use diffusiond::rng::RngKind;

/// Client for the diffusiond image-generation daemon.
#[derive(Debug, Parser)]
#[command(name = "diffusionctl", version, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt (through the daemon, or in-process with --local).
    Generate(Box<GenerateArgs>),
    /// Show the daemon's version, ONNX Runtime, execution providers, queue and models.
    Status(BusArgs),
    /// List the configured models.
    Models(BusArgs),
    /// List the LoRA files a model may use: name, hash, base model, whether it fits,
    /// trigger words.
    Loras(LorasArgs),
    /// List the jobs with their state and progress.
    Jobs(BusArgs),
    /// Print the daemon's metrics in the Prometheus text format (root, the service user
    /// and members of jobs.priority_group).
    Metrics(BusArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
    /// Wait for a job to end, optionally writing its images.
    Wait(WaitArgs),
    /// Generate a manifest of requests into a folder, resumably (`batch MANIFEST
    /// --output-dir DIR`), or show, list or cancel daemon batches.
    Batch(Box<batch::BatchArgs>),
    /// Generate an image again from its `parameters` chunk and compare: identical,
    /// within N levels, or different.
    Verify(Box<verify::VerifyArgs>),
}

/// Which bus the daemon is on (at most one).
#[derive(Debug, Clone, Args)]
#[group(id = "bus", multiple = false)]
struct BusArgs {
    /// Use the session bus (the default).
    #[arg(long)]
    session: bool,
    /// Use the system bus.
    #[arg(long)]
    system: bool,
    /// Use the bus at this D-Bus address.
    #[arg(long, value_name = "ADDR")]
    address: Option<String>,
}

impl BusArgs {
    fn bus(&self) -> Bus {
        match (&self.address, self.system) {
            (Some(a), _) => Bus::Address(a.clone()),
            (None, true) => Bus::System,
            (None, false) => Bus::Session,
        }
    }

    fn given(&self) -> bool {
        self.session || self.system || self.address.is_some()
    }
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
    /// Model name from the daemon's config (default: the daemon's default model).
    #[arg(long, value_name = "NAME", conflicts_with = "local")]
    model: Option<String>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Seed (default: a random one).
    #[arg(long)]
    seed: Option<u64>,
    /// Initial latents from a .npy file (float32, [K,4,H/8,W/8]), instead of the seed's
    /// (--local only).
    #[arg(long, value_name = "FILE.npy")]
    latents: Option<PathBuf>,
    #[command(flatten)]
    flags: RequestFlags,
    /// Start from this image (PNG or JPEG; alpha is dropped): image-to-image, or
    /// inpainting with --mask-image. The output has its size, rounded down to a multiple
    /// of 8; --width and --height are refused with it.
    #[arg(long, value_name = "FILE")]
    init_image: Option<PathBuf>,
    /// Repaint where this mask is white (level 128 or more), with --init-image: inpainting.
    /// Same size as the init image.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    mask_image: Option<PathBuf>,
    #[command(flatten)]
    controls: controls::ControlFlags,
    /// Job priority: higher runs first (daemon only) [default: 0].
    #[arg(long, allow_negative_numbers = true, conflicts_with = "local")]
    priority: Option<i32>,
    /// Output PNG path.
    #[arg(long, value_name = "OUT.png")]
    output: PathBuf,
    /// Live previews of the first image: this PNG is rewritten with each one (written to
    /// FILE.tmp, then renamed over FILE, so a viewer watching it never reads half a file).
    #[arg(long, value_name = "FILE.png")]
    preview: Option<PathBuf>,
    /// A preview every N steps, and after the last [default: 1].
    #[arg(long, value_name = "N", requires = "preview")]
    preview_every: Option<u32>,
    /// How previews are decoded: `latent2rgb` (a linear map of the latents, almost free)
    /// or `taesd` (the model's tiny VAE decoder) [default: latent2rgb].
    #[arg(long, value_name = "latent2rgb|taesd", requires = "preview")]
    preview_method: Option<diffusiond::request::PreviewMethod>,
    /// Config file (runtime settings), with --local.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    bus: BusArgs,
}

/// The request flags `generate` and `batch` share (a contract: scripts call them by
/// these names). In a batch they are the defaults for keys a manifest line leaves out.
#[derive(Debug, Clone, Args)]
pub struct RequestFlags {
    /// The negative prompt.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps [default: 20].
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (≤ 1 turns guidance off) [default: 7.5].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Guidance rescale, 0..1 (diffusers' guidance_rescale) [default: 0].
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// Scheduler (default: the model's own).
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// Which reference generator the seed follows [default: torch].
    #[arg(long, value_name = "torch|numpy")]
    pub rng: Option<RngKind>,
    /// Width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<u32>,
    /// Number of images; with K > 1, files are OUT-0.png, OUT-1.png, ... [default: 1].
    #[arg(long)]
    pub num_images: Option<u32>,
    /// Image-to-image / inpainting strength in (0, 1]: the share of the steps that run
    /// [default: 0.8 for image-to-image (0.3 on SDXL), 1.0 for inpainting].
    #[arg(long)]
    pub strength: Option<f64>,
    /// How the prompt is read: `diffusers` (plain text, truncated at 77 tokens, as
    /// diffusers) or `a1111` (AUTOMATIC1111's (weights), [weights], BREAK and long prompts
    /// in 75-token chunks) [default: diffusers].
    #[arg(long, value_name = "diffusers|a1111")]
    pub prompt_syntax: Option<diffusiond::prompt_syntax::PromptSyntax>,
    /// With `--prompt-syntax a1111`: webui's "Pad prompt/negative prompt" option (pad the
    /// shorter with empty chunks, one UNet batch) instead of webui's default (separate
    /// UNet runs when their lengths differ) [default: the model's a1111_pad_cond_uncond,
    /// else false].
    #[arg(long)]
    pub a1111_pad_cond_uncond: bool,
    /// Seconds the model stays loaded after the job (-1: until unloaded, 0: unloaded after
    /// it) [default: the daemon's jobs.idle_unload_secs].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub keep_alive: Option<f64>,
    /// A LoRA merged into the model's weights, at SCALE [default: 1.0] (repeatable). With
    /// --local, a .safetensors file; through the daemon, a LoRA's name from its LoRA
    /// folders (`diffusionctl loras` lists them).
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,
    /// With --local: a folder of .safetensors LoRA files that `<lora:NAME:WEIGHT>` prompt
    /// tags (`--prompt-syntax a1111`) and manifest lines may name (repeatable; the
    /// daemon's LoRAs are its configured folders).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Vec<PathBuf>,
    /// SD3 and FLUX: T5 tokens of the text conditioning (at most 512) [default: 256 for
    /// SD3 and schnell-style FLUX, 512 for dev-style FLUX].
    #[arg(long, value_name = "N")]
    pub max_sequence_length: Option<u32>,
}

impl RequestFlags {
    /// The `--lora` flags as (file or name, scale).
    pub fn loras(&self) -> Result<Vec<(String, f64)>, String> {
        self.lora
            .iter()
            .map(|a| diffusiond::lora::catalog::split_scale(a).map_err(|e| format!("--lora {e}")))
            .collect()
    }

    /// `--local`: the `--lora` files as a catalog, and the request's `loras` naming them.
    pub fn local_loras(&self) -> Result<LocalLoras, String> {
        let given = self.loras()?;
        let paths: Vec<PathBuf> = given.iter().map(|(f, _)| PathBuf::from(f)).collect();
        let files = diffusiond::lora::LoraCatalog::from_files(&paths)
            .map_err(|e| format!("--lora: {e}"))?;
        // The --lora-dir folders' files, under the files given by path.
        let (mut catalog, warnings) = diffusiond::lora::LoraCatalog::scan(&self.lora_dir);
        if let Some(w) = warnings.into_iter().find(|w| w.starts_with("LoRA folder")) {
            return Err(format!("--lora-dir: {w}"));
        }
        for entry in files.iter() {
            catalog.insert(entry.clone());
        }
        let named = given
            .iter()
            .zip(&paths)
            .map(|((_, scale), path)| {
                let name = diffusiond::lora::catalog::name_of(path).unwrap_or_default();
                (name, *scale)
            })
            .collect();
        Ok((catalog, named))
    }

    /// The keys these flags set (no prompt; `--lora` read as names, as the daemon takes
    /// them).
    pub fn request(&self) -> GenerateRequest {
        GenerateRequest {
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance,
            guidance_rescale: self.guidance_rescale,
            rng: self.rng,
            scheduler: self.scheduler.clone(),
            num_images: self.num_images,
            strength: self.strength,
            prompt_syntax: self.prompt_syntax,
            a1111_pad_cond_uncond: self.a1111_pad_cond_uncond.then_some(true),
            keep_alive: self.keep_alive,
            max_sequence_length: self.max_sequence_length,
            loras: match self.loras() {
                Ok(l) if !l.is_empty() => Some(l),
                _ => None,
            },
            ..GenerateRequest::default()
        }
    }
}

/// `--local`'s LoRA files by name, and the (name, scale) pairs a request gives.
pub type LocalLoras = (diffusiond::lora::LoraCatalog, Vec<(String, f64)>);

#[derive(Debug, Args)]
struct LorasArgs {
    /// The model (default: the daemon's default model).
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    #[command(flatten)]
    bus: BusArgs,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// The job: its number or its object path.
    job: String,
    #[command(flatten)]
    bus: BusArgs,
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// The job: its number or its object path.
    job: String,
    /// Write the job's images here (OUT.png, or OUT-0.png, OUT-1.png, ... for several).
    #[arg(long, value_name = "OUT.png")]
    output: Option<PathBuf>,
    #[command(flatten)]
    bus: BusArgs,
}

fn main() -> ExitCode {
    diffusiond::logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // A bare `diffusionctl`: the command list.
            eprint!("{}", e.render());
            return ExitCode::from(2);
        }
        Err(e) => {
            use clap::error::ErrorKind;
            let text = e.render().to_string();
            let text = text.trim_start_matches("error: ");
            if matches!(
                e.kind(),
                ErrorKind::InvalidValue | ErrorKind::ValueValidation
            ) {
                // A bad value: one line that names the flag, like every other error of ours.
                eprintln!("diffusionctl: {}", text.lines().next().unwrap_or_default());
            } else {
                // A usage error: clap's whole message, naming the missing or conflicting
                // argument, then the usage line.
                eprint!("diffusionctl: {text}");
            }
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Generate(args) if args.local => generate_local(*args),
        Command::Generate(args) => match check_daemon_flags(&args) {
            Ok(()) => match args.flags.loras().and_then(|_| request(&args)) {
                Ok(request) => daemon(&args.bus.bus(), |c| {
                    generate(c, request, args.output, args.preview)
                }),
                Err(message) => Err(Failure::Other(message)),
            },
            Err(message) => Err(Failure::Other(message)),
        },
        Command::Status(bus) => daemon(&bus.bus(), status),
        Command::Models(bus) => daemon(&bus.bus(), models),
        Command::Loras(args) => daemon(&args.bus.bus(), |c| loras(c, args.model)),
        Command::Jobs(bus) => daemon(&bus.bus(), jobs),
        Command::Metrics(bus) => daemon(&bus.bus(), metrics),
        Command::Cancel(args) => daemon(&args.bus.bus(), |c| cancel(c, args.job)),
        Command::Wait(args) => daemon(&args.bus.bus(), |c| wait(c, args.job, args.output)),
        Command::Batch(args) => batch::run(*args),
        Command::Verify(args) => verify::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Messages can quote the daemon (and what a caller sent it): escaped.
        Err(Failure::Interrupted(message)) => {
            eprintln!("diffusionctl: {}", printable_lines(&message));
            ExitCode::from(130)
        }
        Err(Failure::Other(message)) => {
            eprintln!("diffusionctl: {}", printable_lines(&message));
            ExitCode::FAILURE
        }
    }
}

/// How a command failed: the line to print, and whether the user interrupted.
enum Failure {
    Interrupted(String),
    Other(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::Other(message.to_string())
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Interrupted { .. } => Failure::Interrupted(e.to_string()),
            e => Failure::Other(e.to_string()),
        }
    }
}

/// A daemon command: connects to `bus` on a small tokio runtime and runs `command`.
fn daemon<F>(bus: &Bus, command: impl FnOnce(Client) -> F) -> Result<(), Failure>
where
    F: Future<Output = Result<(), Failure>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let client = Client::connect(bus).await?;
        command(client).await
    })
}

/// The request the flags of `generate` make: only the keys given, for the daemon or the
/// local resolve step to fill in.
fn request(args: &GenerateArgs) -> Result<GenerateRequest, String> {
    let read = |flag: &str, path: &Option<PathBuf>| -> Result<Option<ImageInput>, String> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p)
                    .map(ImageInput::new)
                    .map_err(|e| format!("{flag} {}: {e}", p.display()))
            })
            .transpose()
    };
    Ok(GenerateRequest {
        prompt: args.prompt.clone(),
        model: args.model.clone(),
        seed: args.seed,
        priority: args.priority,
        init_image: read("--init-image", &args.init_image)?,
        mask_image: read("--mask-image", &args.mask_image)?,
        controls: args.controls.inputs()?,
        control_guess_mode: args.controls.guess_mode(),
        preview_every: args
            .preview
            .as_ref()
            .map(|_| args.preview_every.unwrap_or(1)),
        preview_method: args.preview.as_ref().and(args.preview_method),
        ..args.flags.request()
    })
}

/// Flags that only `--local` takes.
fn check_daemon_flags(args: &GenerateArgs) -> Result<(), String> {
    if args.latents.is_some() {
        return Err("--latents needs --local (the daemon draws latents from the seed)".into());
    }
    if !args.flags.lora_dir.is_empty() {
        return Err(
            "--lora-dir needs --local (the daemon's LoRAs are its configured folders)".into(),
        );
    }
    if args.model_dir.is_some() {
        return Err("--model-dir needs --local; with the daemon, name a model with --model".into());
    }
    if args.config.is_some() {
        return Err("--config needs --local (the daemon reads its own configuration)".into());
    }
    Ok(())
}

/// `generate` through the daemon: queue, show progress, write the PNGs, print their paths.
async fn generate(
    client: Client,
    request: GenerateRequest,
    output: PathBuf,
    preview: Option<PathBuf>,
) -> Result<(), Failure> {
    let (_, _, written) =
        progress::generate_to_files(&client, &request, &output, preview.as_deref()).await?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

async fn status(client: Client) -> Result<(), Failure> {
    print!("{}", output::format_status(&client.status().await?));
    Ok(())
}

async fn models(client: Client) -> Result<(), Failure> {
    print!("{}", output::format_models(&client.models().await?));
    Ok(())
}

async fn loras(client: Client, model: Option<String>) -> Result<(), Failure> {
    print!(
        "{}",
        output::format_loras(&client.loras(model.as_deref()).await?)
    );
    Ok(())
}

async fn jobs(client: Client) -> Result<(), Failure> {
    print!("{}", output::format_jobs(&client.jobs().await?));
    Ok(())
}

async fn metrics(client: Client) -> Result<(), Failure> {
    print!("{}", printable_lines(&client.metrics().await?));
    Ok(())
}

async fn cancel(client: Client, job: String) -> Result<(), Failure> {
    let path = client.cancel(&job).await?;
    println!("cancelled {path}");
    Ok(())
}

/// `wait`: Ctrl-C stops waiting but leaves the job alone (it may not be ours).
async fn wait(client: Client, job: String, output: Option<PathBuf>) -> Result<(), Failure> {
    let path = diffusiond::client::job_path(&job)?;
    let interrupt = progress::ctrl_c();
    let (result, written) = progress::wait_with_progress(
        &client,
        &path,
        output.as_deref(),
        interrupt,
        OnInterrupt::Detach,
    )
    .await?;
    if written.is_empty() {
        let state = result.state.as_deref().unwrap_or("succeeded");
        println!("{}: {}", printable(state), output::describe_result(&result));
    }
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

fn generate_local(args: GenerateArgs) -> Result<(), Failure> {
    if args.bus.given() {
        return Err(
            "--session, --system and --address choose the daemon's bus; not with --local".into(),
        );
    }
    let model_dir = args
        .model_dir
        .clone()
        .ok_or("--model-dir is required with --local")?;
    let latents = match &args.latents {
        Some(path) => Some(local::read_latents(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let file = args.config.clone().or_else(|| config::default_file(false));
    let settings = Settings::load(file.as_deref()).map_err(|e| e.to_string())?;
    let sink = args.preview.clone().map(|file| -> PreviewSink {
        Box::new(move |_, step, png| {
            if let Err(e) = output::replace_file(&file, &png) {
                eprintln!("diffusionctl: preview after step {step}: {e}");
            }
        })
    });
    let (loras, named) = args.flags.local_loras()?;
    let request = GenerateRequest {
        loras: (!named.is_empty()).then_some(named),
        ..request(&args)?
    };
    let pngs = local::generate(
        settings.runtime,
        &model_dir,
        &request,
        &loras,
        latents,
        sink,
    )
    .map_err(|e| e.to_string())?;
    let written = output::write_pngs(&pngs, &args.output)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}
