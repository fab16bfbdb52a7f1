//! `diffusionctl batch --local`: a batch run in this process, its state kept in the output
//! folder (`DIR/.diffusiond/`, one SQLite file and one temporary folder per shard), so a
//! rerun of the same command after Ctrl-C, SIGKILL or a reboot finishes the rest, and
//! shards writing into one folder keep out of each other's way.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::files::Output;
use super::manifest::{self, Manifest, Options};
use super::runner::{Control, End, Observer, Runner};
use super::store::{BatchState, Counts, Store};
use super::{BatchError, read_checked};
use crate::config::Settings;
use crate::jobs::{Engine, OrtBackend};
use crate::model::{Catalog, ModelSpec};
use crate::request::{Limits, ModelDefaults, random_seed};
use crate::runtime::Runtime;

/// Stops a local run from another thread (Ctrl-C): holds the run's engine and control
/// while it runs.
#[derive(Clone, Default)]
pub struct Stopper(Arc<Mutex<Option<Running>>>);

/// A run going on: its engine and its control.
type Running = (Engine, Arc<Control>);

impl Stopper {
    /// Stops the run, if one is going; returns whether one was.
    pub fn stop(&self) -> bool {
        let running = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match running {
            Some((engine, control)) => {
                control.stop(&engine);
                true
            }
            None => false,
        }
    }

    fn set(&self, run: Option<Running>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = run;
    }
}

/// The batch number `--local` state uses (one batch per state file).
const LOCAL_ID: u64 = 1;

/// The hidden folder in the output folder that holds `--local` state.
pub const STATE_DIR: &str = ".diffusiond";

/// What to run.
#[derive(Debug, Clone)]
pub struct LocalBatch {
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// How to read them, the flags' defaults, the shard (its base seed is ignored).
    pub options: Options,
    /// The base seed given with `--seed`; otherwise the recorded one, or a random one.
    pub base_seed: Option<u64>,
    /// The model folder.
    pub model_dir: PathBuf,
    /// The output folder.
    pub output_dir: PathBuf,
    /// Forget the state of an earlier, different batch in this folder and start over.
    pub restart: bool,
    /// Where the LoRA files the lines and flags name are (`NAME.safetensors`), in search
    /// order: the manifest's folder, then the folders of the `--lora` files.
    pub lora_dirs: Vec<PathBuf>,
}

/// A run's result.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReport {
    /// How the run ended.
    pub end: End,
    /// Item counts afterwards.
    pub counts: Counts,
    /// The base seed used.
    pub base_seed: u64,
    /// Whether the base seed was drawn now (not given, not recorded).
    pub seed_drawn: bool,
    /// Items this run had to make (0: the batch was complete already).
    pub to_run: u64,
    /// Seconds spent making images.
    pub seconds: f64,
    /// Images made by this run.
    pub images: u64,
    /// Failed items: (name, error).
    pub failures: Vec<(String, String)>,
}

/// The state file of a shard.
pub fn state_file(output_dir: &Path, shard: manifest::Shard) -> PathBuf {
    output_dir
        .join(STATE_DIR)
        .join(format!("batch-{}-of-{}.sqlite", shard.index, shard.count))
}

fn temp_dir(output_dir: &Path, shard: manifest::Shard) -> PathBuf {
    output_dir
        .join(STATE_DIR)
        .join(format!("tmp-{}-of-{}", shard.index, shard.count))
}

/// Removes a shard's state (and SQLite's side files).
fn remove_state(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(PathBuf::from(p)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Validates the whole manifest, then runs what is left of the batch in this process.
/// `on_start` is called once the work is known (items to run), before any model loads.
pub fn run(
    settings: &Settings,
    batch: &LocalBatch,
    observer: &dyn Observer,
    stopper: &Stopper,
    on_start: &mut dyn FnMut(&LocalReport),
) -> Result<LocalReport, BatchError> {
    let io = |what: &str, e: std::io::Error| BatchError::Io(format!("{what}: {e}"));
    let shard = batch.options.shard;
    let state = state_file(&batch.output_dir, shard);
    if batch.restart {
        remove_state(&state).map_err(|e| io(&format!("cannot remove {}", state.display()), e))?;
    }
    // Nothing is created in the folder before the manifest has been checked.
    let existing = match state.is_file() {
        true => Store::open(&state)?.batch(LOCAL_ID)?,
        false => None,
    };

    let recorded = existing.as_ref().map(|r| r.base_seed);
    let base_seed = batch.base_seed.or(recorded).unwrap_or_else(random_seed);
    let options = Options {
        base_seed,
        ..batch.options.clone()
    };
    let name = batch.model_dir.display().to_string();
    let spec = ModelSpec {
        name: name.clone(),
        path: batch.model_dir.clone(),
        defaults: ModelDefaults {
            lora_dirs: batch.lora_dirs.clone(),
            ..ModelDefaults::default()
        },
    };
    let limits = Limits::unbounded();
    let hashes = crate::model::hash::HashCache::for_user();
    let catalog = Arc::new(Catalog::open_cached([spec], Some(name), &limits, &hashes));
    let manifest: Manifest = read_checked(&batch.manifest, &options, &catalog, &limits)?;
    std::fs::create_dir_all(state.parent().unwrap_or(&batch.output_dir)).map_err(|e| {
        io(
            &format!(
                "cannot create {}",
                batch.output_dir.join(STATE_DIR).display()
            ),
            e,
        )
    })?;
    let mut store = Store::open(&state)?;

    let resumed = match &existing {
        Some(row) if row.identity != manifest.identity => {
            return Err(BatchError::Changed(format!(
                "{} holds batch state for a different manifest or different settings (shard {}, base seed {}); \
                 rerun with the same manifest and flags to finish it, or add --restart to start over",
                batch.output_dir.display(),
                shard,
                row.base_seed
            )));
        }
        Some(_) => true,
        None => {
            let items: Vec<_> = manifest.selected().cloned().collect();
            let label = batch.output_dir.display().to_string();
            let owner = own_uid();
            store.create(
                LOCAL_ID,
                owner,
                &manifest.identity,
                &label,
                base_seed,
                &items,
            )?;
            false
        }
    };
    let before = store.counts(LOCAL_ID)?;
    let mut report = LocalReport {
        end: End::Finished(BatchState::Succeeded),
        counts: before,
        base_seed,
        seed_drawn: batch.base_seed.is_none() && recorded.is_none(),
        to_run: before.total - before.done - before.failed,
        seconds: 0.0,
        images: 0,
        failures: Vec::new(),
    };
    report.failures = failures(&store)?;
    on_start(&report);
    if report.to_run == 0 {
        report.end = End::Finished(if before.failed > 0 {
            BatchState::Failed
        } else {
            BatchState::Succeeded
        });
        return Ok(report);
    }
    store.set_state(LOCAL_ID, BatchState::Running, "")?;

    let output = Output::open(&batch.output_dir, &temp_dir(&batch.output_dir, shard))
        .map_err(|e| io(&format!("cannot use {}", batch.output_dir.display()), e))?;
    let runtime = Runtime::init(settings.engine_runtime())
        .map(Arc::new)
        .map_err(|e| BatchError::Model(e.to_string()))?;
    let backend = Arc::new(OrtBackend::new(&runtime));
    // Nothing listens to the engine's events here: each outcome goes to the runner.
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    let (engine, worker) = Engine::start(
        backend,
        catalog.clone(),
        settings.jobs.clone(),
        settings.limits.budget(),
        events,
    )
    .map_err(|e| BatchError::Model(format!("cannot start the worker thread: {e}")))?;
    let run_control = Arc::new(Control::default());
    stopper.set(Some((engine.clone(), run_control.clone())));
    let store = Mutex::new(store);
    let runner = Runner {
        engine: &engine,
        catalog: &catalog,
        limits: &limits,
        store: &store,
        output: &output,
        observer,
        control: &run_control,
        // About two UNet batches per worker, so every worker has a batch to take.
        window: 2 * settings.jobs.max_batch_images.max(1) * engine.devices().len(),
        // The folder is the caller's own.
        stored_bytes_limit: u64::MAX,
    };
    let started = std::time::Instant::now();
    let end = runner.run(LOCAL_ID, own_uid(), resumed);
    report.seconds = started.elapsed().as_secs_f64();
    engine.shutdown(std::time::Duration::ZERO);
    worker.join();
    stopper.set(None);
    output.close();
    let store = store.into_inner().unwrap_or_else(|e| e.into_inner());
    report.end = end?;
    report.counts = store.counts(LOCAL_ID)?;
    report.images = report.counts.images_done - before.images_done;
    report.failures = failures(&store)?;
    Ok(report)
}

fn failures(store: &Store) -> Result<Vec<(String, String)>, BatchError> {
    Ok(store
        .finished(LOCAL_ID)?
        .into_iter()
        .filter(|f| f.files.is_empty())
        .map(|f| (f.name, f.error))
        .collect())
}

/// This process's uid (the owner recorded for `--local` batches).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}
