//! TensorRT sessions: one optimization profile per graph that covers every request the
//! daemon accepts, and engine and timing caches keyed so that a changed model, GPU,
//! TensorRT or build setting never loads a stale engine.
//!
//! - **Profiles.** ONNX Runtime's TensorRT provider builds an engine for a range of input
//!   shapes (`trt_profile_{min,opt,max}_shapes`, `name:d0xd1x...,name2:...`). Without one it
//!   builds for the first shapes it sees and rebuilds (minutes for a UNet) whenever a larger
//!   shape arrives. [`derive_profile`] maps each dynamic input of a graph, read from the file
//!   by [`crate::model::graph_inputs`], to a range by its role in the pipeline (rows of the
//!   UNet batch, latent or pixel height and width, text tokens), from the model's sizes and
//!   the bounds in [`ProfileLimits`]. Roles are given by the input's name and the axis'
//!   position, never by the declared `dim_param` names, which exports get wrong.
//!   A graph with a dynamic input diffusiond does not know gets no explicit profile and a
//!   logged warning, rather than an error: the model still runs (the signature check refuses
//!   graphs the pipeline cannot feed), as it did before profiles existed.
//! - **Cache keys.** ONNX Runtime names cached engines after the graph's structure, not its
//!   weights, so a fine-tuned model with the same graph would load the old engine. With
//!   `engine_cache_dir` set, each session's engines go into `engine_cache_dir/<key>/`, where
//!   [`engine_key`] covers the ONNX file and its external data (SHA-256 of their contents,
//!   remembered per file by path, size and mtime in `engine_cache_dir/digests/` so a model is
//!   read in full once), the GPU's name, the TensorRT and ONNX Runtime versions, the profile,
//!   fp16 and the builder optimization level. Timing caches are shared between models:
//!   `timing_cache_dir/<key>/`, with [`timing_key`] over the GPU and TensorRT version.
//! - **Cleanup.** Each key folder records the graph it is for (`source.json`), and planning
//!   a graph removes its older key folders beyond `engine_cache_keep` (the [`cleanup`]
//!   module: what is never removed, and why).
//!
//! Nothing here runs unless TensorRT is among the providers in use; the pure parts
//! (profiles, keys, digest records) are unit-tested, the effects (reading files, asking the
//! CUDA driver and TensorRT) are gathered in [`plan`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Instant, UNIX_EPOCH};

use sha2::{Digest, Sha256};

pub mod cleanup;
mod profile;

pub use profile::{
    AcceptedRequests, Component, Profile, ProfileBatch, ProfileBatchError, ProfileError,
    ProfileLimits, ProfileSize, ProfileSizeError, SessionShapes, ShapeRange, derive_profile,
};

use super::settings::TensorRtSettings;
use crate::model::graph_inputs::{self, GraphInputsError};

/// What goes into an engine cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineKeyInputs<'a> {
    /// [`model_digest`] of the ONNX file and its external data.
    pub model: &'a [u8; 32],
    /// The GPU's name, as the CUDA driver gives it.
    pub gpu: &'a str,
    /// TensorRT's version (`getInferLibVersion`).
    pub tensorrt: &'a str,
    /// ONNX Runtime's version (it writes the cache files).
    pub onnx_runtime: &'a str,
    /// The profile, if the session has one.
    pub profile: Option<&'a Profile>,
    /// `fp16`.
    pub fp16: bool,
    /// `builder_optimization_level`.
    pub builder_optimization_level: u8,
}

/// Hashes labelled, length-prefixed fields, so no two field lists hash alike.
fn keyed(fields: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (label, value) in fields {
        for part in [label.as_bytes(), value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    hex(&h.finalize())[..16].to_string()
}

/// The engine cache folder name: the first 16 hex digits of a SHA-256 over every input.
pub fn engine_key(k: &EngineKeyInputs<'_>) -> String {
    let (min, opt, max) = k.profile.map_or_else(Default::default, |p| {
        (p.min_shapes(), p.opt_shapes(), p.max_shapes())
    });
    keyed(&[
        ("engine-key", b"v1"),
        ("model", k.model),
        ("gpu", k.gpu.as_bytes()),
        ("tensorrt", k.tensorrt.as_bytes()),
        ("onnxruntime", k.onnx_runtime.as_bytes()),
        ("profile", &[u8::from(k.profile.is_some())]),
        ("min", min.as_bytes()),
        ("opt", opt.as_bytes()),
        ("max", max.as_bytes()),
        ("fp16", &[u8::from(k.fp16)]),
        ("level", &[k.builder_optimization_level]),
    ])
}

/// The timing cache folder name: GPU and TensorRT version only (timing caches are shared
/// between models).
pub fn timing_key(gpu: &str, tensorrt: &str) -> String {
    keyed(&[
        ("timing-key", b"v1"),
        ("gpu", gpu.as_bytes()),
        ("tensorrt", tensorrt.as_bytes()),
    ])
}

/// The digest of a model: its ONNX file's digest, then each external-data file's name and
/// digest, in the order given (sorted by [`graph_inputs::read`]).
pub fn model_digest(onnx: &[u8; 32], external: &[(String, [u8; 32])]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"model-digest v1\0");
    h.update(onnx);
    for (name, digest) in external {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(digest);
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file's identity for the digest record: its size and mtime in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u128,
}

const RECORD_HEADER: &str = "diffusiond file digest v1";

/// The digest record of `path`, as written to `digests/`.
pub fn format_record(path: &Path, stamp: FileStamp, digest: &[u8; 32]) -> String {
    format!(
        "{RECORD_HEADER}\n{}\n{}\n{}\n{}\n",
        stamp.size,
        stamp.mtime_ns,
        hex(digest),
        path.display()
    )
}

/// The digest a record holds, if it is for `path` with this `stamp`.
pub fn parse_record(text: &str, path: &Path, stamp: FileStamp) -> Option<[u8; 32]> {
    let mut lines = text.lines();
    (lines.next()? == RECORD_HEADER).then_some(())?;
    (lines.next()?.parse::<u64>().ok()? == stamp.size).then_some(())?;
    (lines.next()?.parse::<u128>().ok()? == stamp.mtime_ns).then_some(())?;
    let digest = lines.next()?;
    (lines.next()? == path.display().to_string()).then_some(())?;
    if digest.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(digest.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Why a TensorRT session could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum TensorRtError {
    /// The graph's inputs could not be read.
    #[error(transparent)]
    Graph(#[from] GraphInputsError),
    /// A model file could not be hashed for the engine cache key.
    #[error("{file}: cannot hash it for the TensorRT engine cache key: {source}")]
    Hash {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A cache folder could not be created.
    #[error("cannot create the TensorRT cache folder {dir} (runtime.tensorrt.{key}): {source}")]
    CacheDir {
        /// The folder.
        dir: PathBuf,
        /// `engine_cache_dir` or `timing_cache_dir`.
        key: &'static str,
        /// The I/O error.
        source: io::Error,
    },
}

/// What one TensorRT session gets beyond the options all sessions share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionPlan {
    /// The optimization profile (`None`: ONNX Runtime infers shape ranges as it runs).
    pub profile: Option<Profile>,
    /// `engine_cache_dir/<key>/`, when the engine cache is on.
    pub engine_cache_dir: Option<PathBuf>,
    /// `timing_cache_dir/<key>/`, when the timing cache is on.
    pub timing_cache_dir: Option<PathBuf>,
}

/// The GPU and TensorRT a key is for.
#[derive(Debug, Clone)]
struct Host {
    device: i32,
    gpu: Result<String, String>,
    tensorrt: Result<String, String>,
}

/// Asks the CUDA driver and TensorRT once per process (per device).
fn host(device: i32) -> Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    let read = || Host {
        device,
        gpu: gpu_name(device),
        tensorrt: tensorrt_version(),
    };
    let cached = HOST.get_or_init(read);
    if cached.device == device {
        cached.clone()
    } else {
        read()
    }
}

/// Prepares a TensorRT session for the graph at `path`: its profile (when `shapes` says
/// which component it is) and its keyed cache folders, created. Reads the graph's inputs;
/// with `engine_cache_dir` set, hashes the graph and its external data (once per file
/// version, see the module docs), records the key folder's graph and removes the graph's
/// stale key folders ([`cleanup`]). Runs on the model-loading thread.
pub fn plan(
    path: &Path,
    shapes: Option<&SessionShapes>,
    settings: &TensorRtSettings,
    onnx_runtime: &str,
) -> Result<SessionPlan, TensorRtError> {
    let wants_cache = settings.engine_cache_dir.is_some() || settings.timing_cache_dir.is_some();
    let host = if wants_cache {
        Some(host(settings.device_id))
    } else {
        None
    };
    let identity = match host.as_ref().map(|h| (&h.gpu, &h.tensorrt)) {
        Some((Ok(gpu), Ok(trt))) => Some(HostIdentity { gpu, tensorrt: trt }),
        Some((gpu, trt)) => {
            let reason = gpu.as_ref().err().or(trt.as_ref().err());
            tracing::warn!(
                reason = reason.map_or("", String::as_str),
                "the GPU or TensorRT version is unknown, so no cache key can be made: TensorRT caches are off"
            );
            None
        }
        None => None,
    };
    let planned = cleanup::Planned::process();
    plan_on(path, shapes, settings, onnx_runtime, identity, planned)
}

/// The GPU name and TensorRT version a cache key is made for.
#[derive(Debug, Clone, Copy)]
struct HostIdentity<'a> {
    gpu: &'a str,
    tensorrt: &'a str,
}

/// [`plan`] for a known host (`None`: caches off), with the key folders this process has
/// planned in `planned`.
fn plan_on(
    path: &Path,
    shapes: Option<&SessionShapes>,
    settings: &TensorRtSettings,
    onnx_runtime: &str,
    host: Option<HostIdentity<'_>>,
    planned: &cleanup::Planned,
) -> Result<SessionPlan, TensorRtError> {
    let info = graph_inputs::read(path)?;
    let limits = ProfileLimits::from_settings(settings);
    let profile = match shapes.map(|s| derive_profile(&info.inputs, s, &limits)) {
        None => None,
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            tracing::warn!(
                file = %path.display(),
                reason = %e,
                "no TensorRT optimization profile for this graph: its engine is built for the first shapes it \
                 runs and rebuilt when larger ones come"
            );
            None
        }
    };
    if let Some(p) = &profile {
        tracing::debug!(
            file = %path.display(),
            min = %p.min_shapes(),
            opt = %p.opt_shapes(),
            max = %p.max_shapes(),
            "TensorRT optimization profile"
        );
    }
    let mut plan = SessionPlan {
        profile,
        ..SessionPlan::default()
    };
    let Some(HostIdentity { gpu, tensorrt: trt }) = host else {
        return Ok(plan);
    };
    if let Some(root) = &settings.timing_cache_dir {
        let dir = root.join(timing_key(gpu, trt));
        create_dir(&dir, "timing_cache_dir")?;
        plan.timing_cache_dir = Some(dir);
    }
    if let Some(root) = &settings.engine_cache_dir {
        let records = root.join("digests");
        create_dir(&records, "engine_cache_dir")?;
        let onnx = file_digest(path, &records)?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let external = info
            .external_files
            .iter()
            .map(|name| Ok((name.clone(), file_digest(&folder.join(name), &records)?)))
            .collect::<Result<Vec<_>, TensorRtError>>()?;
        let key = engine_key(&EngineKeyInputs {
            model: &model_digest(&onnx, &external),
            gpu,
            tensorrt: trt,
            onnx_runtime,
            profile: plan.profile.as_ref(),
            fp16: settings.fp16,
            builder_optimization_level: settings.builder_optimization_level.get(),
        });
        let dir = root.join(&key);
        create_dir(&dir, "engine_cache_dir")?;
        tracing::info!(file = %path.display(), dir = %dir.display(), "TensorRT engine cache");
        cleanup::after_plan(root, &key, path, settings.engine_cache_keep, planned);
        plan.engine_cache_dir = Some(dir);
    }
    Ok(plan)
}

fn create_dir(dir: &Path, key: &'static str) -> Result<(), TensorRtError> {
    std::fs::create_dir_all(dir).map_err(|source| TensorRtError::CacheDir {
        dir: dir.to_path_buf(),
        key,
        source,
    })
}

/// SHA-256 of a file's contents, from its record in `records` when the file's size and
/// mtime still match, else read in full (and the record rewritten).
fn file_digest(path: &Path, records: &Path) -> Result<[u8; 32], TensorRtError> {
    let err = |source| TensorRtError::Hash {
        file: path.to_path_buf(),
        source,
    };
    let real = path.canonicalize().map_err(err)?;
    let meta = std::fs::metadata(&real).map_err(err)?;
    let mtime = meta.modified().map_err(err)?;
    let stamp = FileStamp {
        size: meta.len(),
        mtime_ns: mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    };
    let name = hex(&Sha256::digest(real.as_os_str().as_encoded_bytes()))[..32].to_string();
    let record = records.join(format!("{name}.txt"));
    if let Some(d) = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| parse_record(&t, &real, stamp))
    {
        return Ok(d);
    }
    let started = Instant::now();
    let mut file = File::open(&real).map_err(err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest: [u8; 32] = h.finalize().into();
    tracing::info!(
        file = %real.display(),
        bytes = stamp.size,
        seconds = started.elapsed().as_secs_f64(),
        "hashed for the TensorRT engine cache key"
    );
    // Best effort: without the record the file is hashed again next time.
    let tmp = records.join(format!("{name}.tmp"));
    let written = std::fs::write(&tmp, format_record(&real, stamp, &digest))
        .and_then(|()| std::fs::rename(&tmp, &record));
    if let Err(e) = written {
        tracing::warn!(record = %record.display(), error = %e, "cannot write the digest record");
    }
    Ok(digest)
}

/// The name of CUDA device `device` (`cuDeviceGetName` from `libcuda.so.1`).
fn gpu_name(device: i32) -> Result<String, String> {
    // SAFETY: libcuda.so.1 is NVIDIA's driver library (gpu.rs opens it the same way); it
    // stays loaded while `lib` lives, past the last call below.
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    // SAFETY: the CUDA driver API declares `CUresult cuInit(unsigned)`,
    // `CUresult cuDeviceGet(CUdevice *, int)` and `CUresult cuDeviceGetName(char *, int,
    // CUdevice)` with the C ABI (CUresult and CUdevice are ints); `buf` outlives the call
    // and its length is passed.
    unsafe {
        let init: libloading::Symbol<unsafe extern "C" fn(u32) -> i32> =
            lib.get(b"cuInit").map_err(|e| e.to_string())?;
        let get: libloading::Symbol<unsafe extern "C" fn(*mut i32, i32) -> i32> =
            lib.get(b"cuDeviceGet").map_err(|e| e.to_string())?;
        let name: libloading::Symbol<unsafe extern "C" fn(*mut u8, i32, i32) -> i32> =
            lib.get(b"cuDeviceGetName").map_err(|e| e.to_string())?;
        let status = init(0);
        if status != 0 {
            return Err(super::gpu::cuda_error(status));
        }
        let mut dev = 0i32;
        let status = get(&mut dev, device);
        if status != 0 {
            return Err(super::gpu::cuda_error(status));
        }
        let status = name(buf.as_mut_ptr(), buf.len() as i32 - 1, dev);
        if status != 0 {
            return Err(super::gpu::cuda_error(status));
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// TensorRT's version, `getInferLibVersion()` of `libnvinfer.so.10` (which gpu.rs
/// preloaded when it is installed), e.g. `100700` for 10.7.0.
fn tensorrt_version() -> Result<String, String> {
    // SAFETY: the TensorRT library; opening it by soname returns the preloaded copy, and
    // it stays loaded while `lib` lives.
    let lib = unsafe { libloading::Library::new("libnvinfer.so.10") }.map_err(|e| e.to_string())?;
    // SAFETY: TensorRT declares `int32_t getInferLibVersion()` with the C ABI.
    let version = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn() -> i32> =
            lib.get(b"getInferLibVersion").map_err(|e| e.to_string())?;
        get()
    };
    Ok(version.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(max_rows: i64) -> Profile {
        Profile {
            ranges: vec![ShapeRange {
                input: "sample".into(),
                min: vec![1, 4, 8, 8],
                opt: vec![2, 4, 64, 64],
                max: vec![max_rows, 4, 256, 256],
            }],
        }
    }

    #[test]
    fn engine_key_is_stable_and_changes_with_every_input() {
        let p = profile(32);
        let other = profile(16);
        let base = EngineKeyInputs {
            model: &[1; 32],
            gpu: "NVIDIA GeForce RTX 4090",
            tensorrt: "100700",
            onnx_runtime: "1.31.1",
            profile: Some(&p),
            fp16: true,
            builder_optimization_level: 3,
        };
        let key = engine_key(&base);
        assert_eq!(key.len(), 16);
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(engine_key(&base.clone()), key, "same inputs, same key");
        assert_eq!(
            engine_key(&EngineKeyInputs {
                profile: Some(&profile(32)),
                ..base
            }),
            key
        );
        let changed = [
            EngineKeyInputs {
                model: &[2; 32],
                ..base
            },
            EngineKeyInputs {
                gpu: "NVIDIA H200",
                ..base
            },
            EngineKeyInputs {
                tensorrt: "100800",
                ..base
            },
            EngineKeyInputs {
                onnx_runtime: "1.32.0",
                ..base
            },
            EngineKeyInputs {
                profile: Some(&other),
                ..base
            },
            EngineKeyInputs {
                profile: None,
                ..base
            },
            EngineKeyInputs {
                fp16: false,
                ..base
            },
            EngineKeyInputs {
                builder_optimization_level: 5,
                ..base
            },
        ];
        let mut keys: Vec<String> = changed.iter().map(engine_key).collect();
        keys.push(key);
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "each change gives its own key");
    }

    #[test]
    fn timing_key_covers_gpu_and_tensorrt_only() {
        let k = timing_key("NVIDIA H200", "100700");
        assert_eq!(k, timing_key("NVIDIA H200", "100700"));
        assert_eq!(k.len(), 16);
        assert_ne!(k, timing_key("NVIDIA H100", "100700"));
        assert_ne!(k, timing_key("NVIDIA H200", "100800"));
        // Fields are length-prefixed: moving text between them changes the key.
        assert_ne!(timing_key("ab", "c"), timing_key("a", "bc"));
    }

    #[test]
    fn model_digest_covers_every_file_and_its_name() {
        let d = model_digest(&[1; 32], &[("model.onnx_data".into(), [2; 32])]);
        assert_eq!(
            d,
            model_digest(&[1; 32], &[("model.onnx_data".into(), [2; 32])])
        );
        for other in [
            model_digest(&[9; 32], &[("model.onnx_data".into(), [2; 32])]),
            model_digest(&[1; 32], &[("model.onnx_data".into(), [3; 32])]),
            model_digest(&[1; 32], &[("weights.bin".into(), [2; 32])]),
            model_digest(&[1; 32], &[]),
        ] {
            assert_ne!(d, other);
        }
    }

    #[test]
    fn digest_records_round_trip_and_go_stale() {
        let path = Path::new("/models/sd15/unet/model.onnx_data");
        let stamp = FileStamp {
            size: 3_438_167_536,
            mtime_ns: 1_733_000_000_123_456_789,
        };
        let digest = [0xab; 32];
        let text = format_record(path, stamp, &digest);
        assert_eq!(parse_record(&text, path, stamp), Some(digest));
        let newer = FileStamp {
            mtime_ns: stamp.mtime_ns + 1,
            ..stamp
        };
        let grown = FileStamp {
            size: stamp.size + 1,
            ..stamp
        };
        assert_eq!(parse_record(&text, path, newer), None);
        assert_eq!(parse_record(&text, path, grown), None);
        assert_eq!(parse_record(&text, Path::new("/other"), stamp), None);
        assert_eq!(parse_record("garbage", path, stamp), None);
        assert_eq!(parse_record(&text.replace("abab", "zz"), path, stamp), None);
    }

    #[test]
    fn file_digest_is_remembered_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.onnx_data");
        let records = dir.path().join("digests");
        std::fs::create_dir(&records).unwrap();
        std::fs::write(&file, b"abc").unwrap();
        let abc: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(file_digest(&file, &records).unwrap(), abc);
        // The record is used while size and mtime match: prove it by editing the record.
        let record = std::fs::read_dir(&records)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let text = std::fs::read_to_string(&record).unwrap();
        std::fs::write(&record, text.replace(&hex(&abc), &hex(&[7; 32]))).unwrap();
        assert_eq!(file_digest(&file, &records).unwrap(), [7; 32]);
        // A changed file is read again.
        std::fs::write(&file, b"abcd").unwrap();
        let abcd: [u8; 32] = Sha256::digest(b"abcd").into();
        assert_eq!(file_digest(&file, &records).unwrap(), abcd);
        let err = file_digest(&dir.path().join("gone"), &records).unwrap_err();
        assert!(err.to_string().contains("gone: cannot hash it"), "{err}");
    }

    /// On a machine without the NVIDIA driver the GPU is unknown, so no key can be made:
    /// the caches stay off (nothing is hashed) and the profile is still derived.
    #[test]
    fn without_a_gpu_name_caches_are_off_and_nothing_is_hashed() {
        if gpu_name(0).is_ok() {
            return;
        }
        let cache = tempfile::tempdir().unwrap();
        let settings = TensorRtSettings {
            engine_cache_dir: Some(cache.path().join("engines")),
            timing_cache_dir: Some(cache.path().join("timing")),
            ..TensorRtSettings::default()
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sd15");
        let bundle = crate::model::ModelBundle::open(&dir).unwrap();
        let shapes = SessionShapes::new(Component::VaeDecoder, &bundle, 77);
        let made = plan(
            &bundle.onnx("vae_decoder"),
            Some(&shapes),
            &settings,
            "1.32.0",
        )
        .unwrap();
        assert_eq!(made.engine_cache_dir, None);
        assert_eq!(made.timing_cache_dir, None);
        assert_eq!(
            made.profile.map(|p| p.max_shapes()),
            Some("latent_sample:16x4x64x64".to_string())
        );
        assert!(!cache.path().join("engines").exists());
        // A graph session() makes (no shapes) gets no profile.
        let made = plan(&bundle.onnx("unet"), None, &settings, "1.32.0").unwrap();
        assert_eq!(made, SessionPlan::default());
    }
}
