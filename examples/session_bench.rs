//! Benchmark helper for `bench/session_ab.py`: times one ONNX file's session run through
//! diffusiond's runtime wrapper, with no pipeline around it, so a gap between diffusiond
//! and Python can be placed inside or outside ONNX Runtime.
//!
//! ```sh
//! cargo run --release --example session_bench -- --model onnx/build/small/unet/model.onnx \
//!     --inputs /tmp/unet-inputs --repeats 5 --intra 1 --inter 1
//! ```
//!
//! `--inputs` holds one `NAME.npy` per graph input (f32 or i64). Prints one JSON object:
//! the session load time and the wall time of every run in milliseconds (the first run,
//! which plans memory, is reported apart).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use diffusiond::runtime::{Runtime, RuntimeSettings};
use ndarray::ArrayD;
use ort::memory::Allocator;
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use serde_json::json;

#[derive(Debug, Parser)]
struct Cli {
    /// The ONNX file.
    #[arg(long)]
    model: PathBuf,
    /// Folder with one NAME.npy per graph input.
    #[arg(long)]
    inputs: PathBuf,
    /// Timed runs after the first.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Intra-op threads (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 1)]
    intra: usize,
    /// Inter-op threads (0: ONNX Runtime's default).
    #[arg(long, default_value_t = 1)]
    inter: usize,
    /// Bind inputs and outputs once with an IoBinding (as the pipeline's UNet does).
    #[arg(long)]
    io_binding: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let mut settings = RuntimeSettings::default();
    settings.session.intra_threads = cli.intra;
    settings.session.inter_threads = cli.inter;
    let runtime = Runtime::init(settings).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut session = runtime.session(&cli.model).map_err(|e| e.to_string())?;
    let load_s = started.elapsed().as_secs_f64();
    let inputs = read_inputs(&session, &cli.inputs)?;
    let mut times = if cli.io_binding {
        time_bound(&mut session, &inputs, cli.repeats + 1)?
    } else {
        time_plain(&mut session, &inputs, cli.repeats + 1)?
    };
    let first = times.remove(0);
    let out = json!({
        "ort_version": runtime.version(),
        "load_s": load_s,
        "first_ms": first,
        "run_ms": times,
        "io_binding": cli.io_binding,
    });
    println!("{out}");
    Ok(())
}

/// Reads `NAME.npy` for each input of the session, as an ONNX Runtime tensor.
fn read_inputs(session: &Session, dir: &Path) -> Result<Vec<(String, DynValue)>, String> {
    let mut out = Vec::new();
    for input in session.inputs() {
        let name = input.name().to_string();
        let path = dir.join(format!("{name}.npy"));
        let value: DynValue = match ndarray_npy::read_npy::<_, ArrayD<f32>>(&path) {
            Ok(a) => Tensor::from_array(a).map_err(|e| e.to_string())?.into_dyn(),
            Err(_) => {
                let a: ArrayD<i64> =
                    ndarray_npy::read_npy(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                Tensor::from_array(a).map_err(|e| e.to_string())?.into_dyn()
            }
        };
        out.push((name, value));
    }
    Ok(out)
}

/// The inputs as `Session::run` arguments, by reference.
fn borrowed(inputs: &[(String, DynValue)]) -> Vec<(String, SessionInputValue<'_>)> {
    inputs
        .iter()
        .map(|(n, v)| (n.clone(), SessionInputValue::from(v.view())))
        .collect()
}

/// `Session::run` with the inputs passed by reference each time; outputs allocated by ORT.
fn time_plain(
    session: &mut Session,
    inputs: &[(String, DynValue)],
    runs: usize,
) -> Result<Vec<f64>, String> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let args = borrowed(inputs);
        let started = Instant::now();
        let outputs = session.run(args).map_err(|e| e.to_string())?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        drop(outputs);
    }
    Ok(times)
}

/// Inputs and outputs (allocated once, ORT's default allocator) bound once, then run repeatedly.
fn time_bound(
    session: &mut Session,
    inputs: &[(String, DynValue)],
    runs: usize,
) -> Result<Vec<f64>, String> {
    let mut binding: IoBinding = session.create_binding().map_err(|e| e.to_string())?;
    for (name, value) in inputs {
        binding.bind_input(name, value).map_err(|e| e.to_string())?;
    }
    // One plain run gives the output shapes; the outputs are then allocated once and bound.
    let args = borrowed(inputs);
    let shapes: Vec<(String, Vec<usize>)> = session
        .run(args)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|(name, v)| {
            let dims = v.shape().iter().map(|&d| d as usize).collect();
            (name.to_string(), dims)
        })
        .collect();
    let mut outputs = Vec::new();
    for (name, dims) in shapes {
        let mut t = Tensor::<f32>::new(&Allocator::default(), dims).map_err(|e| e.to_string())?;
        binding
            .bind_output(&name, &mut t)
            .map_err(|e| e.to_string())?;
        outputs.push(t);
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        session.run_binding(&binding).map_err(|e| e.to_string())?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}
