//! A minimal diffusiond client in Rust with zbus: asks the daemon on the session bus for one
//! image and writes the PNG.
//!
//! ```sh
//! cargo run --example generate -- "a yellow triangle on a black background" triangle.png [WIDTH HEIGHT]
//! ```
//!
//! The bus is the session bus (`DBUS_SESSION_BUS_ADDRESS`). Prints the path of the PNG.
//! The API is in docs/dbus-api.md; the `diffusiond::client` module has the full client.

use std::collections::HashMap;
use std::process::ExitCode;

use zbus::zvariant::{DeserializeDict, OwnedObjectPath, Type, Value};

/// The daemon's manager object.
#[zbus::proxy(
    interface = "io.github.Diffusiond1.Manager",
    default_service = "io.github.Diffusiond1",
    default_path = "/io/github/Diffusiond1"
)]
trait Manager {
    fn generate(&self, request: HashMap<&str, Value<'_>>) -> zbus::Result<OwnedObjectPath>;
}

/// One job.
#[zbus::proxy(
    interface = "io.github.Diffusiond1.Job",
    default_service = "io.github.Diffusiond1"
)]
trait Job {
    fn wait(&self) -> zbus::Result<WaitResult>;
}

/// The keys of `Wait()`'s `a{sv}` this example reads; the others are ignored. Reading the
/// dict into a struct decodes each PNG as one byte array (a `HashMap<String, OwnedValue>`
/// would hold one `Value` per byte).
#[derive(DeserializeDict, Type)]
#[zvariant(signature = "a{sv}")]
struct WaitResult {
    images: Option<Vec<Vec<u8>>>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(path) => {
            println!("{path}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("generate: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (prompt, output, size) = match args.as_slice() {
        [prompt, output] => (prompt, output, None),
        [prompt, output, w, h] => {
            let parse = |s: &str| s.parse::<u32>().map_err(|e| format!("bad size '{s}': {e}"));
            (prompt, output, Some((parse(w)?, parse(h)?)))
        }
        _ => return Err("usage: generate PROMPT OUTPUT.png [WIDTH HEIGHT]".into()),
    };

    // The session bus; zbus reads DBUS_SESSION_BUS_ADDRESS. zbus sets no method timeout
    // by default, so Wait() below may take as long as the job does.
    let connection = zbus::Connection::session()
        .await
        .map_err(|e| format!("cannot connect to the session bus: {e}"))?;

    // Only the keys we set; the daemon fills in the rest (docs/dbus-api.md).
    let mut request: HashMap<&str, Value<'_>> = HashMap::new();
    request.insert("prompt", Value::from(prompt.as_str()));
    if let Some((width, height)) = size {
        request.insert("width", Value::from(width));
        request.insert("height", Value::from(height));
    }

    let manager = ManagerProxy::new(&connection)
        .await
        .map_err(|e| e.to_string())?;
    let job_path = manager.generate(request).await.map_err(describe)?;
    // Stay connected until the job ends: the daemon cancels the jobs of callers that leave.
    let job = JobProxy::builder(&connection)
        .path(job_path)
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let result = job.wait().await.map_err(describe)?;

    let images = result.images.unwrap_or_default();
    let png = images.first().ok_or("the result has no images")?;
    std::fs::write(output, png).map_err(|e| format!("{output}: {e}"))?;
    Ok(output.clone())
}

/// `UnknownModel: ...` for the daemon's errors (`io.github.Diffusiond1.Error.UnknownModel`).
fn describe(e: zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, message, _) => {
            let name = name.as_str();
            let short = name
                .strip_prefix("io.github.Diffusiond1.Error.")
                .unwrap_or(name);
            format!("{short}: {}", message.unwrap_or_default())
        }
        other => other.to_string(),
    }
}
