//! Helpers of the LoRA end-to-end tests (tests/lora_daemon.rs, tests/lora_cli.rs): the
//! committed LoRA fixtures, LoRA folders and daemons serving them, request dicts with
//! `loras`, and `diffusionctl generate --local --lora`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use super::{
    Daemon, Dict, PrivateBus, config_with_model_keys, ctl_command, error_name, generate, png_rgb,
    request_dict, result_pngs, root, wait,
};
use zbus::zvariant::{OwnedValue, Value};

pub const INVALID_ARGUMENT: &str = "io.github.Diffusiond1.Error.InvalidArgument";

/// Steps of every image here (PNDM: steps + 1 UNet calls).
pub const STEPS: u32 = 3;

/// A committed LoRA fixture.
pub fn fixture(name: &str) -> PathBuf {
    root()
        .join("tests/golden/lora/loras")
        .join(format!("{name}.safetensors"))
}

/// The tiny SD 1.5 model folder.
pub fn tiny() -> PathBuf {
    root().join("onnx/tiny-sd15")
}

/// A request's LoRAs: (name, scale) pairs.
pub type LoraSet<'a> = &'a [(&'a str, f64)];

/// A temp folder holding copies of the named fixtures.
pub fn lora_folder(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        std::fs::copy(
            fixture(name),
            dir.path().join(format!("{name}.safetensors")),
        )
        .unwrap();
    }
    dir
}

/// A daemon serving `tiny` with `dir` as its `[models.tiny] loras` folder.
pub fn daemon_with_model_folder(bus: &PrivateBus, dir: &Path) -> Daemon {
    let keys = format!("loras = \"{}\"", dir.display());
    Daemon::start_with_config(bus, &config_with_model_keys(&keys, ""))
}

/// The `loras` request value (`a(sd)`).
pub fn loras_value(pairs: &[(&str, f64)]) -> Value<'static> {
    Value::new(
        pairs
            .iter()
            .map(|(n, s)| (n.to_string(), *s))
            .collect::<Vec<(String, f64)>>(),
    )
}

/// A 64×64 request of `STEPS` steps; `loras` set when not empty.
pub fn request(
    prompt: &str,
    seed: u64,
    loras: &[(&str, f64)],
    extra: &[(&str, Value<'_>)],
) -> Dict {
    let mut pairs: Vec<(&str, Value<'_>)> = vec![
        ("prompt", Value::from(prompt)),
        ("seed", Value::from(seed)),
        ("steps", Value::from(STEPS)),
        ("width", Value::from(64u32)),
        ("height", Value::from(64u32)),
    ];
    if !loras.is_empty() {
        pairs.push(("loras", loras_value(loras)));
    }
    pairs.extend(extra.iter().map(|(k, v)| (*k, v.try_clone().unwrap())));
    request_dict(&pairs)
}

/// `Generate` then `Wait`: the job's only PNG, and the wall time between the call and
/// the result.
pub async fn run_job(conn: &zbus::Connection, req: Dict) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    let path = generate(conn, req).await.expect("Generate");
    let result = wait(conn, &path).await.expect("Wait");
    let elapsed = t.elapsed();
    let mut pngs = result_pngs(&result);
    assert_eq!(pngs.len(), 1);
    (pngs.remove(0), elapsed)
}

/// A `Generate` that must be refused: its error name and message.
pub async fn refused(conn: &zbus::Connection, req: Dict) -> (String, String) {
    let e = generate(conn, req)
        .await
        .expect_err("the request should be refused");
    (error_name(&e), e.to_string())
}

/// The `Manager` object.
pub async fn manager(conn: &zbus::Connection) -> zbus::Proxy<'static> {
    zbus::Proxy::new(
        conn,
        "io.github.Diffusiond1",
        "/io/github/Diffusiond1",
        "io.github.Diffusiond1.Manager",
    )
    .await
    .unwrap()
}

/// `ListModels`' `lora_sets` of `tiny`.
pub async fn lora_sets(conn: &zbus::Connection) -> Vec<String> {
    let models: Vec<HashMap<String, OwnedValue>> =
        manager(conn).await.call("ListModels", &()).await.unwrap();
    let tiny = models
        .into_iter()
        .find(|m| <&str>::try_from(&m["name"]).unwrap() == "tiny")
        .unwrap();
    Vec::<String>::try_from(tiny["lora_sets"].try_clone().unwrap()).unwrap()
}

/// `ListLoras(model)`.
pub async fn list_loras(conn: &zbus::Connection, model: &str) -> Vec<HashMap<String, OwnedValue>> {
    manager(conn)
        .await
        .call("ListLoras", &(model,))
        .await
        .unwrap()
}

pub fn field_str(d: &HashMap<String, OwnedValue>, key: &str) -> String {
    String::try_from(d[key].try_clone().unwrap()).unwrap()
}

pub fn field_bool(d: &HashMap<String, OwnedValue>, key: &str) -> bool {
    bool::try_from(&d[key]).unwrap()
}

pub fn field_u64(d: &HashMap<String, OwnedValue>, key: &str) -> u64 {
    u64::try_from(&d[key]).unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `diffusionctl ARGS` with its hash cache in `state` (not the user's home).
pub fn ctl(state: &Path, args: &[&str]) -> Output {
    ctl_command(args)
        .env("XDG_STATE_HOME", state)
        .output()
        .unwrap()
}

/// `diffusionctl generate --local` of the same 64×64 image as [`request`], with the
/// LoRA files `loras` (path, scale); writes `out` and returns its RGB pixels.
pub fn generate_local(out: &Path, prompt: &str, seed: u64, loras: &[(PathBuf, f64)]) -> Vec<u8> {
    generate_local_with(out, prompt, seed, loras, &[])
}

/// [`generate_local`] with more flags.
pub fn generate_local_with(
    out: &Path,
    prompt: &str,
    seed: u64,
    loras: &[(PathBuf, f64)],
    extra: &[&str],
) -> Vec<u8> {
    let model = tiny().display().to_string();
    let seed = seed.to_string();
    let steps = STEPS.to_string();
    let output = out.display().to_string();
    let mut args: Vec<String> = [
        "generate",
        "--local",
        "--model-dir",
        &model,
        "--prompt",
        prompt,
        "--seed",
        &seed,
        "--steps",
        &steps,
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        &output,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (path, scale) in loras {
        args.push("--lora".into());
        args.push(format!("{}:{scale}", path.display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = ctl_command(&args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    png_rgb(&std::fs::read(out).unwrap())
}

/// A PNG's `parameters` text.
pub fn parameters(png: &[u8]) -> String {
    super::png_parameters(png).expect("a parameters chunk")
}
