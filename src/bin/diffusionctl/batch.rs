//! `diffusionctl batch`: a manifest in, a folder of PNGs out, in this process (`--local`,
//! state in the folder) or through the daemon (state in its state directory; this client
//! copies each finished image into the folder). Rerunning the same command finishes what
//! is left; `batch status | list | cancel | remove` manage daemon batches. Text the daemon
//! sends (labels, item names, errors: another user's, for root) is printed through
//! [`printable`].

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use diffusiond::batch::files::Output;
use diffusiond::batch::local::{self, LocalBatch, LocalReport, STATE_DIR};
use diffusiond::batch::service::Submission;
use diffusiond::batch::{BatchState, End, Format, Observer, Options, Progress, Shard, manifest};
use diffusiond::client::{BatchInfo, Client, ClientError, FetchEvent, batch_path, printable};
use diffusiond::config::{self, Settings};
use diffusiond::request::{GenerateRequest, random_seed};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{BusArgs, Failure, RequestFlags, daemon};

/// `diffusionctl batch` (a contract: scripts call these flags by name).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BatchArgs {
    #[command(subcommand)]
    action: Option<BatchAction>,
    /// The manifest: .jsonl (one Generate request per line, plus an optional "name"), or
    /// .txt (one prompt per line).
    #[arg(value_name = "MANIFEST", required = true)]
    manifest: Option<PathBuf>,
    /// Where the PNGs go: NAME.png, or NAME-K.png for items with several images.
    #[arg(long, value_name = "DIR", required = true)]
    output_dir: Option<PathBuf>,
    /// Run the pipeline in this process instead of asking the daemon.
    #[arg(long)]
    local: bool,
    /// Model folder (Optimum ONNX layout), with --local.
    #[arg(long, value_name = "DIR", required_if_eq("local", "true"))]
    model_dir: Option<PathBuf>,
    /// Model name from the daemon's config, for lines that name none.
    #[arg(long, value_name = "NAME", conflicts_with = "local")]
    model: Option<String>,
    /// Run only the items whose line index modulo N is I (one shard of a fleet).
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Base seed: a line without a seed gets BASE + its line index (default: random,
    /// printed and recorded; a rerun reuses it).
    #[arg(long, value_name = "BASE")]
    seed: Option<u64>,
    /// Submit to the daemon, print the batch number and exit.
    #[arg(long, conflicts_with = "local")]
    detach: bool,
    /// Forget the state of a different, earlier batch in DIR and start over.
    #[arg(long)]
    restart: bool,
    /// Config file (runtime and job settings), with --local.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: RequestFlags,
    #[command(flatten)]
    bus: BusArgs,
}

#[derive(Debug, Subcommand)]
enum BatchAction {
    /// Show a daemon batch's progress (every batch of yours without ID).
    Status {
        /// The batch: its number or its object path.
        id: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// List your daemon batches with their state and disk use.
    List(BusArgs),
    /// Cancel a daemon batch (finished images stay).
    Cancel {
        /// The batch: its number or its object path.
        id: String,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Remove a daemon batch: cancel it if it runs, delete its images and state in the
    /// daemon (files already copied into your folder stay).
    Remove {
        /// The batch: its number or its object path.
        id: String,
        #[command(flatten)]
        bus: BusArgs,
    },
}

/// Runs `diffusionctl batch ...`.
pub fn run(args: BatchArgs) -> Result<(), Failure> {
    match args.action {
        Some(BatchAction::Status { id, bus }) => daemon(&bus.bus(), |c| status(c, id)),
        Some(BatchAction::List(bus)) => daemon(&bus.bus(), list),
        Some(BatchAction::Cancel { id, bus }) => daemon(&bus.bus(), |c| cancel(c, id)),
        Some(BatchAction::Remove { id, bus }) => daemon(&bus.bus(), |c| remove(c, id)),
        None if args.local => run_local(&args),
        None => {
            if args.model_dir.is_some() {
                return Err(
                    "--model-dir needs --local; with the daemon, name a model with --model".into(),
                );
            }
            if args.config.is_some() {
                return Err(
                    "--config needs --local (the daemon reads its own configuration)".into(),
                );
            }
            if !args.flags.lora_dir.is_empty() {
                return Err(
                    "--lora-dir needs --local (the daemon's LoRAs are its configured folders)"
                        .into(),
                );
            }
            let bus = args.bus.bus();
            daemon(&bus, |c| run_daemon(c, &args))
        }
    }
}

/// The manifest, its format, and how to read it (the base seed is filled in later).
struct Read {
    bytes: Vec<u8>,
    options: Options,
    manifest_path: PathBuf,
    output_dir: PathBuf,
}

fn read(args: &BatchArgs) -> Result<Read, Failure> {
    let manifest_path = args.manifest.clone().ok_or("MANIFEST is required")?;
    let output_dir = args.output_dir.clone().ok_or("--output-dir is required")?;
    let bytes = std::fs::read(&manifest_path)
        .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
    let options = Options {
        format: Format::from_path(&manifest_path),
        defaults: GenerateRequest {
            model: args.model.clone(),
            ..args.flags.request()
        },
        base_seed: 0,
        shard: args.shard.unwrap_or(Shard::ALL),
        max_items: usize::MAX,
        // Image paths are relative to the manifest, and read here, with --local only.
        base_dir: args.local.then(|| {
            manifest_path
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        }),
    };
    Ok(Read {
        bytes,
        options,
        manifest_path,
        output_dir,
    })
}

/// A bar of items on stderr (hidden unless stderr is a terminal).
fn bar(total: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    let style = ProgressStyle::with_template(
        "[{bar:40.cyan/blue}] {pos}/{len} items {msg} {elapsed_precise}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

fn rate_message(images_per_second: f64, eta_seconds: f64) -> String {
    if images_per_second > 0.0 {
        format!("{images_per_second:.2} img/s, ETA {eta_seconds:.0} s")
    } else {
        String::new()
    }
}

struct BarObserver(ProgressBar);

impl Observer for BarObserver {
    fn item_finished(&self, _: u64, name: &str, error: Option<&str>, p: &Progress) {
        self.0.set_position(p.counts.done + p.counts.failed);
        self.0
            .set_message(rate_message(p.images_per_second, p.eta_seconds));
        if let Some(e) = error {
            self.0
                .println(format!("{}: failed: {}", printable(name), printable(e)));
        }
    }
}

fn seed_note(base: u64, drawn: bool) -> String {
    if drawn {
        format!("base seed {base} (random; recorded, so a rerun reuses it)")
    } else {
        format!("base seed {base}")
    }
}

fn run_local(args: &BatchArgs) -> Result<(), Failure> {
    if args.bus.given() {
        return Err(
            "--session, --system and --address choose the daemon's bus; not with --local".into(),
        );
    }
    let mut read = read(args)?;
    let file = args.config.clone().or_else(|| config::default_file(false));
    let settings = Settings::load(file.as_deref()).map_err(|e| e.to_string())?;
    // LoRAs by name: the files of the manifest's folder (its lines name them), then the
    // folders of the --lora files (the flags name them by their file names).
    let mut lora_dirs = vec![
        read.manifest_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    ];
    let (_, named) = args.flags.local_loras()?;
    for dir in &args.flags.lora_dir {
        if !lora_dirs.contains(dir) {
            lora_dirs.push(dir.clone());
        }
    }
    for (file, _) in args.flags.loras()? {
        let dir = Path::new(&file)
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        if !lora_dirs.contains(&dir) {
            lora_dirs.push(dir);
        }
    }
    if !named.is_empty() {
        read.options.defaults.loras = Some(named);
    }
    let batch = LocalBatch {
        manifest: read.bytes,
        options: read.options,
        lora_dirs,
        base_seed: args.seed,
        model_dir: args
            .model_dir
            .clone()
            .ok_or("--model-dir is required with --local")?,
        output_dir: read.output_dir.clone(),
        restart: args.restart,
    };
    let stopper = local::Stopper::default();
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    watch_ctrl_c(stopper.clone(), interrupted.clone());
    let b = bar(0);
    let progress = BarObserver(b.clone());
    let mut on_start = |r: &LocalReport| {
        let done = r.counts.done + r.counts.failed;
        eprintln!(
            "batch: {} items in {} (shard {}), {} done, {} to run; {}",
            r.counts.total,
            read.manifest_path.display(),
            batch.options.shard,
            done,
            r.to_run,
            seed_note(r.base_seed, r.seed_drawn)
        );
        b.set_length(r.counts.total);
        b.set_position(done);
    };
    let report = local::run(&settings, &batch, &progress, &stopper, &mut on_start)
        .map_err(|e| e.to_string())?;
    b.finish_and_clear();
    finish_local(&report, &read.output_dir, &interrupted)
}

/// Stops the local run on Ctrl-C: the items in flight are dropped (they run again next
/// time); what is done stays done.
fn watch_ctrl_c(stopper: local::Stopper, interrupted: Arc<std::sync::atomic::AtomicBool>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
                if !stopper.stop() {
                    eprintln!("diffusionctl: interrupted; rerun the same command to finish");
                    std::process::exit(130);
                }
            });
        });
}

fn finish_local(
    report: &LocalReport,
    dir: &Path,
    interrupted: &std::sync::atomic::AtomicBool,
) -> Result<(), Failure> {
    let c = &report.counts;
    if report.to_run == 0 {
        println!(
            "batch already complete: {} done, {} failed, in {}; nothing to run",
            c.done,
            c.failed,
            dir.display()
        );
    } else if report.images > 0 {
        println!(
            "{} images in {:.1} s ({:.2} images/s); {} of {} items done, {} failed, in {}",
            report.images,
            report.seconds,
            report.images as f64 / report.seconds.max(1e-9),
            c.done,
            c.total,
            c.failed,
            dir.display()
        );
    }
    for (name, error) in &report.failures {
        eprintln!("{}: failed: {}", printable(name), printable(error));
    }
    match &report.end {
        End::Finished(BatchState::Succeeded) => Ok(()),
        End::Finished(_) => Err(format!("{} of {} items failed", c.failed, c.total).into()),
        End::Paused(message) => Err(format!(
            "batch paused: {message}; nothing is lost: fix it and rerun the same command to resume"
        )
        .into()),
        End::Stopped if interrupted.load(std::sync::atomic::Ordering::SeqCst) => {
            Err(Failure::Interrupted(format!(
                "interrupted: {} of {} items done; rerun the same command to finish",
                c.done, c.total
            )))
        }
        End::Stopped | End::Cancelled => Err(format!(
            "stopped: {} of {} items done; rerun the same command to finish",
            c.done, c.total
        )
        .into()),
    }
}

/// What a daemon batch's client keeps in the output folder: the batch, its identity and
/// its base seed, so a rerun reattaches and reuses the seed.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    batch: String,
    identity: String,
    base_seed: u64,
}

fn marker_file(dir: &Path, shard: Shard) -> PathBuf {
    dir.join(STATE_DIR)
        .join(format!("daemon-{}-of-{}.json", shard.index, shard.count))
}

async fn run_daemon(client: Client, args: &BatchArgs) -> Result<(), Failure> {
    let read = read(args)?;
    let shard = read.options.shard;
    let state = read.output_dir.join(STATE_DIR);
    std::fs::create_dir_all(&state)
        .map_err(|e| format!("cannot create {}: {e}", state.display()))?;
    let marker_path = marker_file(&read.output_dir, shard);
    let mut marker: Option<Marker> = std::fs::read(&marker_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if args.restart {
        // Starting over: the earlier batch for this folder goes, with its images in the
        // daemon (those already in DIR stay until overwritten).
        if let Some(m) = marker.take()
            && let Ok(path) = batch_path(&m.batch)
        {
            match client.remove_batch(&path).await {
                Ok(()) | Err(ClientError::InvalidArgument(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let drawn = args.seed.is_none() && marker.is_none();
    let base_seed = args
        .seed
        .or(marker.as_ref().map(|m| m.base_seed))
        .unwrap_or_else(random_seed);
    let options = Options {
        base_seed,
        ..read.options.clone()
    };
    let parsed = manifest::parse(&read.bytes, &options).map_err(|e| e.to_string())?;
    if let Some(m) = &marker
        && m.identity != parsed.identity
    {
        return Err(format!(
            "{} holds batch {} of a different manifest or different settings (shard {shard}, base seed {}); \
             rerun with the same manifest and flags to finish it, or add --restart to start over",
            read.output_dir.display(),
            m.batch,
            m.base_seed
        )
        .into());
    }
    if args.restart {
        // The same manifest and settings submitted before would be found and reused.
        for b in client.batches().await? {
            if b.manifest_hash == parsed.identity {
                client.remove_batch(&batch_path(&b.path)?).await?;
            }
        }
    }
    let files: HashMap<String, Vec<String>> = parsed
        .selected()
        .map(|i| (i.name.clone(), i.files()))
        .collect();
    let total = files.len();
    let output = Output::open(
        &read.output_dir,
        &state.join(format!("fetch-{}-of-{}", shard.index, shard.count)),
    )
    .map_err(|e| format!("cannot use {}: {e}", read.output_dir.display()))?;
    if marker.is_some() && !args.restart && files.values().flatten().all(|f| output.exists(f)) {
        output.close();
        println!(
            "batch already complete: {total} items in {}; nothing to run",
            read.output_dir.display()
        );
        return Ok(());
    }
    let label = std::fs::canonicalize(&read.output_dir)
        .unwrap_or_else(|_| read.output_dir.clone())
        .display()
        .to_string();
    let submission = Submission {
        format: options.format,
        defaults: options.defaults.clone(),
        base_seed: Some(base_seed),
        shard,
        label,
    };
    let path = client.submit_batch(&read.bytes, &submission).await?;
    let marker = Marker {
        batch: path.to_string(),
        identity: parsed.identity.clone(),
        base_seed,
    };
    let text = serde_json::to_vec(&marker).map_err(|e| e.to_string())?;
    Output::open(&state, &state.join("marker-tmp"))
        .and_then(|o| {
            let r = o.write(
                marker_path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("marker.json"),
                &text,
            );
            o.close();
            r
        })
        .map_err(|e| format!("cannot write {}: {e}", marker_path.display()))?;
    let id = path
        .as_str()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "batch {id}: {total} items in {} (shard {shard}); {}",
        read.manifest_path.display(),
        seed_note(base_seed, drawn)
    );
    if args.detach {
        println!("{id}");
        return Ok(());
    }
    let info = client.batch_info(&path).await?;
    if info.state == "paused" {
        client.resume_batch(&path).await?;
    }
    let b = bar(u64::from(info.total));
    let started = std::time::Instant::now();
    let mut copied = 0usize;
    let result = client
        .fetch_batch(
            &path,
            &output,
            &files,
            |event| match event {
                FetchEvent::Progress(i) => {
                    b.set_length(u64::from(i.total));
                    b.set_position(u64::from(i.done + i.failed));
                    b.set_message(rate_message(i.images_per_second, i.eta_seconds));
                }
                FetchEvent::Copied(_) => copied += 1,
            },
            crate::progress::ctrl_c(),
        )
        .await;
    b.finish_and_clear();
    output.close();
    let info = match result {
        Err(ClientError::Interrupted { .. }) => {
            return Err(Failure::Interrupted(format!(
                "detached: batch {id} goes on in the daemon (not cancelled); `diffusionctl batch status {id}` shows it, \
                 rerunning the same command fetches its images, `diffusionctl batch cancel {id}` cancels it"
            )));
        }
        other => other?,
    };
    println!(
        "{copied} files copied in {:.1} s; {} of {} items done, {} failed, in {}",
        started.elapsed().as_secs_f64(),
        info.done,
        info.total,
        info.failed,
        read.output_dir.display()
    );
    match info.state.as_str() {
        "succeeded" => Ok(()),
        "failed" => {
            for (name, error) in client.batch_failures(&path).await? {
                eprintln!("{}: failed: {}", printable(&name), printable(&error));
            }
            Err(format!("{} of {} items failed", info.failed, info.total).into())
        }
        "paused" => Err(format!(
            "batch {id} paused: {}; nothing is lost: fix it and rerun the same command to resume",
            printable(&info.error)
        )
        .into()),
        other => Err(format!("batch {id} {}", printable(other)).into()),
    }
}

fn describe(i: &BatchInfo) -> String {
    let id = i.path.rsplit('/').next().unwrap_or_default();
    let mut s = format!(
        "batch {}: {}; {}/{} items done, {} failed",
        printable(id),
        printable(&i.state),
        i.done,
        i.total,
        i.failed
    );
    if i.images_per_second > 0.0 {
        s.push_str(&format!(
            "; {:.2} images/s, ETA {:.0} s",
            i.images_per_second, i.eta_seconds
        ));
    }
    s.push_str(&format!(
        "; {} on disk (images and state); {}",
        diffusiond::request::resolve_gib(i.disk_bytes),
        printable(&i.label)
    ));
    if !i.error.is_empty() {
        s.push_str(&format!("; error: {}", printable(&i.error)));
    }
    s
}

async fn status(client: Client, id: Option<String>) -> Result<(), Failure> {
    let infos = match id {
        Some(id) => vec![client.batch_info(&batch_path(&id)?).await?],
        None => client.batches().await?,
    };
    if infos.is_empty() {
        println!("no batches");
    }
    for i in infos {
        println!("{}", describe(&i));
    }
    Ok(())
}

async fn list(client: Client) -> Result<(), Failure> {
    let infos = client.batches().await?;
    println!(
        "{:<18} {:<10} {:>13} {:>7} {:>8} {:>9}  FOLDER",
        "BATCH", "STATE", "DONE", "FAILED", "IMG/S", "DISK"
    );
    let mut bytes = 0;
    for i in &infos {
        bytes += i.disk_bytes;
        println!(
            "{:<18} {:<10} {:>13} {:>7} {:>8.2} {:>9}  {}",
            printable(i.path.rsplit('/').next().unwrap_or_default()),
            printable(&i.state),
            format!("{}/{}", i.done, i.total),
            i.failed,
            i.images_per_second,
            diffusiond::request::resolve_gib(i.disk_bytes),
            printable(&i.label)
        );
    }
    println!(
        "{} batches, {} on disk (images and their state in the daemon's database)",
        infos.len(),
        diffusiond::request::resolve_gib(bytes)
    );
    Ok(())
}

async fn cancel(client: Client, id: String) -> Result<(), Failure> {
    let path = batch_path(&id)?;
    client.cancel_batch(&path).await?;
    println!("cancelled {path}");
    Ok(())
}

async fn remove(client: Client, id: String) -> Result<(), Failure> {
    let path = batch_path(&id)?;
    client.remove_batch(&path).await?;
    println!("removed {path}");
    Ok(())
}
