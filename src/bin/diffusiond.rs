//! The diffusiond daemon binary: parses flags, reads the config, hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use diffusiond::config::{self, Settings};
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
    /// Use the system configuration file location.
    #[arg(long)]
    system: bool,
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
    let runtime = Runtime::init(settings.runtime).map_err(|e| e.to_string())?;
    if args.version {
        print!("{}", diffusiond::version_report(&runtime));
        return Ok(());
    }
    Err("the D-Bus service is not part of this build yet; use --version".into())
}
