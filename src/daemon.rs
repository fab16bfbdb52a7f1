//! The daemon: loads the runtime, starts the job engine, serves the D-Bus API, and stops
//! cleanly when its shutdown future resolves (SIGTERM/SIGINT in the binary).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use zbus::Connection;
use zbus::fdo::{RequestNameFlags, RequestNameReply};

use crate::config::Settings;
use crate::dbus::{self, BUS_NAME, MANAGER_PATH, Manager, Registry};
use crate::jobs::Engine;
use crate::runtime::{Runtime, RuntimeError};

/// Which bus to serve on.
#[derive(Debug, Clone)]
pub enum Bus {
    /// The user's session bus.
    Session,
    /// The system bus.
    System,
    /// Any D-Bus address.
    Address(String),
}

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
}

/// Tells systemd (when started by it) what the service is doing.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

async fn connect(bus: &Bus, manager: Manager) -> Result<Connection, DaemonError> {
    let builder = match bus {
        Bus::Session => zbus::connection::Builder::session()?,
        Bus::System => zbus::connection::Builder::system()?,
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
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

/// Runs the daemon until `shutdown` resolves, then drains: queued jobs are cancelled,
/// running ones get `jobs.shutdown_grace_secs` to finish, final signals go out.
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
    notify(&[sd_notify::NotifyState::Status("loading ONNX Runtime")]);
    let runtime = Arc::new(Runtime::init(settings.runtime.clone())?);
    let providers = runtime.providers().iter().map(|p| p.to_string()).collect();
    let models: HashMap<_, _> = settings
        .models
        .iter()
        .map(|(k, v)| (k.clone(), v.path.clone()))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (engine, worker) = Engine::start(runtime.clone(), models, settings.jobs.clone(), tx);
    let settings = Arc::new(settings);
    let registry = Registry::default();
    let manager = Manager::new(
        engine.clone(),
        settings.clone(),
        registry.clone(),
        runtime.version().to_string(),
        providers,
    );
    let conn = connect(&bus, manager).await?;
    let retention = Duration::from_secs(settings.jobs.retention_secs);
    let pump = tokio::spawn(dbus::pump_events(conn.clone(), registry, rx, retention));
    let watcher = tokio::spawn(dbus::watch_disconnects(conn.clone(), engine.clone()));
    tracing::info!(bus = ?bus, "serving {BUS_NAME}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("ready"),
    ]);

    shutdown.await;
    tracing::info!("shutting down");
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("finishing running jobs"),
    ]);
    let grace = Duration::from_secs(settings.jobs.shutdown_grace_secs);
    let draining = engine.clone();
    let _ = tokio::task::spawn_blocking(move || {
        draining.shutdown(grace);
        let _ = worker.join();
    })
    .await;
    engine.flush_events().await;
    watcher.abort();
    pump.abort();
    let _ = conn.release_name(BUS_NAME).await;
    Ok(())
}
