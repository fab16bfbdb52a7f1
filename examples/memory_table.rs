//! Estimated against measured peak memory of one generation, per model and size: the
//! validation table of docs/memory.md.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/memory_table onnx/tiny-demo onnx/tiny-sd15 > bench/results/memory.json
//! ```
//!
//! Each size runs `diffusionctl generate --local` (1 step, guidance 7.5, one ONNX Runtime
//! thread) in a process of its own under `/usr/bin/time`, whose maximum resident set size
//! is the measured peak. Prints a Markdown table on stderr and JSON on stdout.
//!
//! `--control NAME=IMAGE` (before the folders) adds that ControlNet to every run, and the
//! estimate counts it as the resolve step does (the images once more per ControlNet):
//!
//! ```sh
//! target/release/examples/memory_table --control canny=edges.png /tmp/tiny-sd15-controlnet
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use diffusiond::model::ModelBundle;

const SIDES: [usize; 6] = [64, 128, 256, 384, 512, 640];

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut control: Option<(String, String)> = None;
    if args.first().is_some_and(|a| a == "--control") && args.len() > 1 {
        let spec = args.remove(1);
        args.remove(0);
        let (name, image) = spec.split_once('=').expect("--control NAME=IMAGE");
        control = Some((name.to_string(), image.to_string()));
    }
    let models: Vec<PathBuf> = args.into_iter().map(PathBuf::from).collect();
    let images = 1 + usize::from(control.is_some());
    let exe = std::env::current_exe().expect("own path");
    let ctl = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("diffusionctl"))
        .expect("diffusionctl beside the examples folder");
    let mut rows = Vec::new();
    eprintln!(
        "| model | size | estimated peak (MiB) | measured peak (MiB) | estimate / measured |"
    );
    eprintln!("|---|---|---|---|---|");
    for dir in &models {
        let bundle = ModelBundle::open(dir).expect("model folder");
        // Sizes the model takes (8 x its native size unless configured otherwise).
        for side in SIDES.into_iter().filter(|&s| s <= 8 * bundle.default_size) {
            let estimated = bundle.memory.peak(side, side, images, true);
            let out = std::env::temp_dir().join("memory-table.png");
            let mut cmd = Command::new("/usr/bin/time");
            cmd.args(["-f", "%M"])
                .arg(&ctl)
                .args(["generate", "--local", "--model-dir"])
                .arg(dir)
                .args([
                    "--prompt",
                    "a red circle on a blue background",
                    "--steps",
                    "1",
                ])
                .args(["--seed", "1", "--guidance", "7.5"])
                .args(["--width", &side.to_string(), "--height", &side.to_string()])
                .arg("--output")
                .arg(&out)
                .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
                .env("DIFFUSIOND_RUNTIME__SESSION__INTER_THREADS", "1");
            if let Some((name, image)) = &control {
                cmd.args(["--controlnet", name, "--control-image", image]);
            }
            let run = cmd.output().expect("run diffusionctl");
            assert!(
                run.status.success(),
                "{}",
                String::from_utf8_lossy(&run.stderr)
            );
            let stderr = String::from_utf8_lossy(&run.stderr);
            let kb: u64 = stderr
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
                .expect("max RSS from /usr/bin/time");
            let measured = kb * 1024;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            eprintln!(
                "| {name} | {side}x{side} | {:.0} | {:.0} | {:.2} |",
                mib(estimated),
                mib(measured),
                estimated as f64 / measured as f64
            );
            rows.push(format!(
                "{{\"model\": \"{name}\", \"side\": {side}, \"estimated_bytes\": {estimated}, \"measured_bytes\": {measured}}}"
            ));
        }
    }
    println!("[\n  {}\n]", rows.join(",\n  "));
}
