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
    /// $XDG_CONFIG_HOME/diffusiond/diffusiond.toml when it exists).
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
    let file = args
        .config
        .clone()
        .or_else(|| config::default_file(args.system));
    let settings = Settings::load(file.as_deref()).map_err(|e| e.to_string())?;
    if args.version {
        let runtime = Runtime::init(settings.runtime).map_err(|e| e.to_string())?;
        print!("{}", diffusiond::version_report(&runtime));
        return Ok(());
    }
    let bus = match (args.system, args.address) {
        (true, _) => Bus::System,
        (_, Some(a)) => Bus::Address(a),
        _ => Bus::Session,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(daemon::run(settings, bus, stop_signal()))
        .map_err(|e| e.to_string())
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
