//! The daemon: loads the runtime, starts the job engine, serves the D-Bus API, and stops
//! cleanly when its shutdown future resolves (SIGTERM/SIGINT in the binary).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use zbus::Connection;
use zbus::fdo::{RequestNameFlags, RequestNameReply};

use crate::config::JobSettings;
use crate::config::Settings;
use crate::dbus::{self, Manager, Registry};
use crate::jobs::{Engine, OrtBackend};
use crate::model::{Catalog, ModelSpec};
use crate::runtime::{ProviderKind, Runtime, RuntimeError};
pub use crate::wire::Bus;
use crate::wire::{BUS_NAME, MANAGER_PATH};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// ONNX Runtime could not be set up.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The bus could not be reached or the name taken.
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    /// Another process owns the bus name.
    #[error("another process already owns {BUS_NAME} on this bus")]
    NameTaken,
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A thread or task could not be started.
    #[error("cannot start the job engine: {0}")]
    Start(String),
}

/// Tells systemd (when started by it) what the service is doing.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(false, state)
    {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Starts sending WATCHDOG=1 at half the interval systemd asked for (`WatchdogSec=`, seen
/// as `WATCHDOG_USEC`/`WATCHDOG_PID`). The pings come from a task on the daemon's tokio
/// runtime, so a stalled runtime stops them and systemd restarts the service.
fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(1));
    tracing::info!(?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

/// Loads the `preload` models before the daemon reports ready, extending systemd's start
/// timeout (EXTEND_TIMEOUT_USEC) every few seconds while a load runs (with `tensorrt`, the
/// status says engines are being built: minutes for a UNet the first time). A model that
/// fails to load is logged; the daemon still serves the others.
async fn preload(engine: &Engine, names: &[String], tensorrt: bool) {
    const EXTEND: Duration = Duration::from_secs(30);
    for name in names {
        let status = if tensorrt {
            format!("loading model '{name}': building TensorRT engines (unless cached)")
        } else {
            format!("loading model '{name}'")
        };
        let ping = || {
            notify(&[
                sd_notify::NotifyState::Status(&status),
                sd_notify::NotifyState::ExtendTimeoutUsec(EXTEND.as_micros() as u32),
            ])
        };
        let rx = match engine.load_model(name) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "cannot preload");
                continue;
            }
        };
        tokio::pin!(rx);
        let mut tick = tokio::time::interval(EXTEND / 3);
        let result = loop {
            tokio::select! {
                r = &mut rx => break r,
                _ = tick.tick() => ping(),
            }
        };
        match result {
            Ok(Ok(())) => tracing::info!(model = %name, "preloaded"),
            Ok(Err(e)) => tracing::error!(model = %name, error = %e, "preload failed"),
            Err(_) => tracing::error!(model = %name, "preload abandoned"),
        }
    }
}

/// sd_notify's `STATUS=` while serving: ready, and the models loading now (building
/// TensorRT engines, with TensorRT), so `systemctl status` shows why a first job waits.
pub fn serving_status(loading: &[String], tensorrt: bool) -> String {
    let ready = format!("ready: serving {BUS_NAME}");
    if loading.is_empty() {
        return ready;
    }
    let names: Vec<String> = loading.iter().map(|n| format!("'{n}'")).collect();
    let what = if tensorrt {
        "building TensorRT engines (unless cached) for"
    } else {
        "loading"
    };
    let noun = if loading.len() == 1 {
        "model"
    } else {
        "models"
    };
    format!("{ready}; {what} {noun} {}", names.join(", "))
}

/// Says in `STATUS=` which models load, each time that changes (loads a job or
/// `LoadModel` started after the daemon became ready).
async fn report_loads(mut loads: tokio::sync::watch::Receiver<Vec<String>>, tensorrt: bool) {
    while loads.changed().await.is_ok() {
        let status = serving_status(&loads.borrow_and_update(), tensorrt);
        notify(&[sd_notify::NotifyState::Status(&status)]);
    }
}

async fn connect(bus: &Bus, manager: Manager) -> Result<Connection, DaemonError> {
    let builder = bus.builder()?;
    // Serve the objects first, then take the name: activated callers arrive at once.
    let conn = builder.serve_at(MANAGER_PATH, manager)?.build().await?;
    let reply = conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await?;
    if reply != RequestNameReply::PrimaryOwner {
        return Err(DaemonError::NameTaken);
    }
    Ok(conn)
}

/// How long without jobs before the daemon exits: `jobs.idle_exit_secs` (0 = never), else
/// 300 s when the bus started the daemon on a session bus (D-Bus activation sets
/// `DBUS_STARTER_BUS_TYPE`), else never.
fn idle_exit_after(jobs: &JobSettings) -> Option<Duration> {
    let activated = std::env::var("DBUS_STARTER_BUS_TYPE").is_ok_and(|t| t == "session");
    let secs = jobs
        .idle_exit_secs
        .unwrap_or(if activated { DEFAULT_IDLE_EXIT_SECS } else { 0 });
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// The idle exit of a session-activated daemon.
pub const DEFAULT_IDLE_EXIT_SECS: u64 = 300;

/// Resolves once no job has existed on the bus and no batch has run for `after` (never
/// when `None`): woken by every change of either count, never polled.
async fn idle(
    mut jobs: tokio::sync::watch::Receiver<usize>,
    mut batches: tokio::sync::watch::Receiver<usize>,
    after: Option<Duration>,
) {
    let Some(after) = after else {
        return std::future::pending().await;
    };
    loop {
        if jobs.wait_for(|n| *n == 0).await.is_err() || batches.wait_for(|n| *n == 0).await.is_err()
        {
            return std::future::pending().await;
        }
        if *jobs.borrow() != 0 {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(after) => return,
            changed = jobs.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
            changed = batches.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
        }
    }
}

/// Runs the daemon until `shutdown` resolves (or, with an idle exit, until it has had no
/// jobs for that long), then drains: queued jobs are cancelled, running ones get
/// `jobs.shutdown_grace_secs` to finish, final signals go out.
pub async fn run(
    settings: Settings,
    bus: Bus,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    if settings.models.is_empty() {
        return Err(DaemonError::Config(
            "no [models] configured; add [models.NAME] path = \"DIR\"".into(),
        ));
    }
    if !crate::heap::tune() {
        tracing::debug!("the allocator's mmap threshold is left as it is (not glibc)");
    }
    let idle_exit = idle_exit_after(&settings.jobs);
    let priority_gid = match &settings.jobs.priority_group {
        None => None,
        Some(name) => {
            let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
            Some(crate::config::group_id(name, &groups).ok_or_else(|| {
                DaemonError::Config(format!(
                    "jobs.priority_group: no group '{name}' in /etc/group (give its number)"
                ))
            })?)
        }
    };
    let watchdog = spawn_watchdog();
    notify(&[sd_notify::NotifyState::Status("loading ONNX Runtime")]);
    let runtime = Arc::new(Runtime::init(settings.engine_runtime())?);
    let providers: Vec<String> = runtime.providers().iter().map(|p| p.to_string()).collect();
    notify(&[sd_notify::NotifyState::Status("opening the model folders")]);
    // Each folder is read and checked once, off the async threads; requests are resolved
    // against this catalog without touching the disk.
    let models: Vec<_> = settings
        .models
        .iter()
        .map(|(name, entry)| ModelSpec {
            name: name.clone(),
            path: entry.path.clone(),
            defaults: entry.defaults(&settings.loras.path),
        })
        .collect();
    let default = settings.default_model.clone();
    let mut settings = settings;
    if settings.limits.memory_budget.is_none() {
        let cgroup = crate::model::memory::read_cgroup_limit();
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        settings.limits.memory_budget =
            crate::model::memory::derive_budget(cgroup.as_deref(), meminfo.as_deref());
    }
    match settings.limits.budget() {
        Some(b) => tracing::info!(
            budget = %crate::request::resolve_gib(b),
            "memory budget: requests whose estimated peak is larger are refused (TooLarge)"
        ),
        None => tracing::warn!("no memory budget: requests are not checked against memory"),
    }
    let limits = settings.limits.clone();
    // Model hashes are cached in the state directory, so a restart reads no graph again.
    let hashes = crate::config::state_dir(
        settings.jobs.state_dir.as_deref(),
        matches!(bus, Bus::System),
        |k| std::env::var(k).ok(),
    );
    let catalog = tokio::task::spawn_blocking(move || {
        let hashes = hashes.map_or_else(crate::model::hash::HashCache::in_memory, |dir| {
            crate::model::hash::HashCache::in_dir(&dir)
        });
        Catalog::open_cached(models, default, &limits, &hashes)
    })
    .await
    .map(Arc::new)
    .map_err(|e| DaemonError::Start(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Arc::new(OrtBackend::new(&runtime));
    let budget = settings.limits.budget();
    let (engine, worker) =
        Engine::start(backend, catalog.clone(), settings.jobs.clone(), budget, tx)
            .map_err(|e| DaemonError::Start(e.to_string()))?;
    let settings = Arc::new(settings);
    let (batch_tx, batch_rx) = tokio::sync::mpsc::unbounded_channel();
    let batches = open_batches(&settings, &bus, &engine, &catalog, batch_tx).await;
    let registry = Registry::default();
    let metrics = crate::metrics::source::Source {
        engine: engine.clone(),
        catalog: catalog.clone(),
        memory_budget: budget,
        providers: providers.clone(),
        batches: batches.clone().ok(),
    };
    let manager = Manager::new(
        engine.clone(),
        catalog,
        settings.limits.clone(),
        registry.clone(),
        dbus::RuntimeInfo {
            version: runtime.version().to_string(),
            providers,
        },
        priority_gid,
        batches.clone(),
    )
    .serving_metrics(metrics.clone());
    notify(&[sd_notify::NotifyState::Status("taking the bus name")]);
    let conn = connect(&bus, manager).await?;
    let tensorrt = runtime.providers().contains(&ProviderKind::Tensorrt);
    preload(&engine, &settings.preload, tensorrt).await;
    let retention = Duration::from_secs(settings.jobs.retention_secs);
    let jobs = registry.job_count();
    let previews = tokio::spawn(dbus::pump_previews(
        conn.clone(),
        registry.clone(),
        engine.preview_hub(),
    ));
    let pump = tokio::spawn(dbus::pump_events(conn.clone(), registry, rx, retention));
    let watcher = tokio::spawn(dbus::watch_disconnects(conn.clone(), engine.clone()));
    let batch_pump = tokio::spawn(dbus::pump_batch_events(conn.clone(), batch_rx));
    let batches_running = match &batches {
        Ok(service) => {
            serve_batches(&conn, service).await?;
            service.running()
        }
        Err(_) => tokio::sync::watch::Sender::new(0).subscribe(),
    };
    tracing::info!(bus = ?bus, "serving {BUS_NAME}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&serving_status(&[], tensorrt)),
    ]);
    let status = tokio::spawn(report_loads(engine.loads(), tensorrt));
    let textfile = settings.metrics.textfile.clone();
    let metrics_writer = textfile.clone().map(|path| {
        let every = Duration::from_secs(settings.metrics.interval_secs);
        tokio::spawn(crate::metrics::textfile::every(
            metrics.clone(),
            path,
            every,
        ))
    });

    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        () = idle(jobs, batches_running, idle_exit) => tracing::info!(
            secs = idle_exit.map_or(0, |d| d.as_secs()),
            "no jobs for jobs.idle_exit_secs: exiting"
        ),
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("finishing running jobs"),
    ]);
    let grace = Duration::from_secs(settings.jobs.shutdown_grace_secs);
    let stop_budget = grace + Duration::from_secs(15);
    notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(
        u32::try_from(stop_budget.as_micros()).unwrap_or(u32::MAX),
    )]);
    let draining = engine.clone();
    let _ = tokio::task::spawn_blocking(move || {
        // Batch items stop first (they stay pending and resume at the next start).
        if let Ok(service) = &batches {
            service.stop_all();
        }
        draining.shutdown(grace);
        worker.join();
    })
    .await;
    engine.flush_events().await;
    if let Some(writer) = metrics_writer {
        writer.abort();
    }
    if let Some(path) = &textfile
        && let Err(e) = crate::metrics::textfile::write(&metrics, path).await
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics file at exit");
    }
    status.abort();
    watcher.abort();
    pump.abort();
    previews.abort();
    batch_pump.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = conn.release_name(BUS_NAME).await;
    Ok(())
}

/// Opens the batch state in the state directory, on a blocking thread. A daemon whose
/// state directory cannot be used still serves `Generate`; batch calls say why not.
async fn open_batches(
    settings: &Settings,
    bus: &Bus,
    engine: &Engine,
    catalog: &Arc<Catalog>,
    events: tokio::sync::mpsc::UnboundedSender<dbus::BatchEvent>,
) -> Result<crate::batch::service::Service, String> {
    use crate::batch::quota::{Quota, Retention};
    use crate::batch::service::{BatchSettings, Service};
    let Some(root) = crate::config::state_dir(
        settings.jobs.state_dir.as_deref(),
        matches!(bus, Bus::System),
        |k| std::env::var(k).ok(),
    ) else {
        let message = "no state directory: set jobs.state_dir, XDG_STATE_HOME or HOME".to_string();
        tracing::warn!("{message}; batches are unavailable");
        return Err(message);
    };
    let batch_settings = BatchSettings {
        max_items: settings.limits.max_batch_items,
        quota: Quota {
            unfinished: settings.limits.max_batches_per_caller as u64,
            batches: settings.limits.max_stored_batches_per_caller as u64,
            bytes: settings.limits.max_stored_bytes_per_caller,
        },
        retention: Retention {
            fetched_secs: settings.jobs.batch_retention_secs,
            unfetched_secs: settings.jobs.unfetched_batch_retention_secs,
        },
        // About two UNet batches per worker, so every worker has a batch to take.
        window: 2 * settings.jobs.max_batch_images.max(1) * engine.devices().len(),
    };
    let (engine, catalog, limits) = (engine.clone(), catalog.clone(), settings.limits.clone());
    let events = Arc::new(dbus::ChannelEvents(events));
    let opened = tokio::task::spawn_blocking(move || {
        Service::open(&root, engine, catalog, limits, batch_settings, events)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    if let Err(e) = &opened {
        tracing::warn!(error = %e, "batches are unavailable");
    }
    opened
}

/// Removes ended batches whose retention time has passed (those that end while the
/// daemon runs), every [`crate::batch::service::Service::sweep_interval`].
async fn sweep_batches(conn: zbus::Connection, service: crate::batch::service::Service) {
    loop {
        tokio::time::sleep(service.sweep_interval()).await;
        let s = service.clone();
        let expired = tokio::task::spawn_blocking(move || s.expired()).await;
        let Ok(Ok(ids)) = expired else { continue };
        for id in ids {
            dbus::schedule_expiry(conn.clone(), service.clone(), id, Duration::ZERO);
        }
    }
}

/// Puts every stored batch on the bus, schedules the removal of fetched ones, then
/// resumes those a stopped daemon left unfinished.
async fn serve_batches(
    conn: &zbus::Connection,
    service: &crate::batch::service::Service,
) -> Result<(), DaemonError> {
    let s = service.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let rows = s.batches()?;
        let snapshots = rows
            .iter()
            .map(|r| s.snapshot(r.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, crate::batch::BatchError>((snapshots, s.expiring()?))
    })
    .await
    .map_err(|e| DaemonError::Start(e.to_string()))?;
    let (snapshots, expiring) = match listed {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the stored batches");
            return Ok(());
        }
    };
    for snapshot in snapshots {
        let path = crate::wire::batch::batch_path(snapshot.row.id);
        conn.object_server()
            .at(&path, dbus::Batch::new(service.clone(), snapshot))
            .await?;
    }
    for (id, after) in expiring {
        dbus::schedule_expiry(conn.clone(), service.clone(), id, after);
    }
    tokio::spawn(sweep_batches(conn.clone(), service.clone()));
    let s = service.clone();
    match tokio::task::spawn_blocking(move || s.resume_unfinished()).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(batches = n, "unfinished batches resumed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not resume the stored batches"),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::serving_status;

    #[test]
    fn status_names_the_models_loading() {
        assert_eq!(
            serving_status(&[], false),
            "ready: serving io.github.Diffusiond1"
        );
        assert_eq!(
            serving_status(&["tiny".into()], false),
            "ready: serving io.github.Diffusiond1; loading model 'tiny'"
        );
        assert_eq!(
            serving_status(&["a".into(), "b".into()], true),
            "ready: serving io.github.Diffusiond1; building TensorRT engines (unless cached) \
             for models 'a', 'b'"
        );
    }
}
