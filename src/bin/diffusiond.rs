//! The diffusiond daemon binary: parses flags, reads the config, hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use diffusiond::config::{self, Settings};
use diffusiond::daemon::{self, Bus};
use diffusiond::runtime::Runtime;

/// Local image-generation daemon: Stable Diffusion ONNX pipelines served over D-Bus.
#[derive(Debug, Parser)]
#[command(name = "diffusiond", disable_version_flag = true)]
struct Args {
    /// Print diffusiond's version, the ONNX Runtime version and the available execution providers.
    #[arg(short = 'V', long)]
    version: bool,
    /// Config file (default: /etc/diffusiond/diffusiond.toml with --system, else
    /// $XDG_CONFIG_HOME/diffusiond/diffusiond.toml when it exists; with neither, the
    /// bundled demo model is served).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve on the system bus.
    #[arg(long, conflicts_with_all = ["session", "address"])]
    system: bool,
    /// Serve on the session bus (the default).
    #[arg(long, conflicts_with = "address")]
    session: bool,
    /// Serve on this D-Bus address.
    #[arg(long, value_name = "ADDR")]
    address: Option<String>,
}

fn main() -> ExitCode {
    diffusiond::logging::init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("diffusiond: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.version {
        let file = args
            .config
            .clone()
            .or_else(|| config::default_file(args.system));
        let settings = Settings::load(file.as_deref()).map_err(|e| e.to_string())?;
        let runtime = Runtime::init(settings.runtime).map_err(|e| e.to_string())?;
        print!("{}", diffusiond::version_report(&runtime));
        return Ok(());
    }
    let (settings, origin) =
        config::daemon_settings(args.config.as_deref(), args.system).map_err(|e| e.to_string())?;
    tracing::info!(%origin, "configuration");
    if let config::Origin::Bundled(path) = &origin {
        tracing::warn!(
            model = config::BUNDLED_NAME,
            path = %path.display(),
            "no config file: serving the bundled model"
        );
    }
    let bus = match (args.system, args.address) {
        (true, _) => Bus::System,
        (_, Some(a)) => Bus::Address(a),
        // Started by a session bus (D-Bus activation): serve on the bus that started us.
        (false, None) => activation_address().map_or(Bus::Session, Bus::Address),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(daemon::run(settings, bus, stop_signal()))
        .map_err(|e| e.to_string())
}

/// The address of the session bus that activated this process, if one did
/// (`DBUS_STARTER_ADDRESS` with `DBUS_STARTER_BUS_TYPE=session`).
fn activation_address() -> Option<String> {
    let kind = std::env::var("DBUS_STARTER_BUS_TYPE").ok()?;
    let address = std::env::var("DBUS_STARTER_ADDRESS").ok()?;
    (kind == "session" && !address.is_empty()).then_some(address)
}

/// Resolves on SIGTERM (what systemd sends) or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
