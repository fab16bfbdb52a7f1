//! Configuration: a TOML file plus `DIFFUSIOND_*` environment overrides, read with the
//! `config` crate and validated into typed settings in one step. [`daemon_settings`]
//! chooses what the daemon serves: the given or default config file, else the bundled
//! demo model (`origin`).

mod origin;

pub use origin::{BUNDLED_NAME, Origin, bundled_model_candidates, daemon_settings};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::request::{Limits, ModelDefaults};
use crate::runtime::RuntimeSettings;

/// Errors from reading or validating the configuration. Each names the key or file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read or parsed, or a key has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but is not allowed.
    #[error("configuration: {0}")]
    Invalid(String),
    /// No config file names a model, and no bundled model was found.
    #[error(
        "configuration: nothing to serve: no config file (looked for {files}) and no bundled model (looked in {models}); write a config with [models.NAME] path = \"DIR\" (README, \"Configuration\")"
    )]
    NothingToServe {
        /// The config files looked for, comma-separated.
        files: String,
        /// The bundled-model folders looked in, comma-separated.
        models: String,
    },
    /// A config file names no model.
    #[error("configuration: {0} has no [models] table; add [models.NAME] path = \"DIR\"")]
    NoModels(PathBuf),
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// ONNX Runtime: library, execution providers, session options.
    pub runtime: RuntimeSettings,
    /// The model used when a request names none.
    pub default_model: Option<String>,
    /// Models by name. Relative paths are relative to the config file's folder.
    pub models: BTreeMap<String, ModelEntry>,
    /// Models loaded at startup, before the daemon reports ready (others load on first use).
    pub preload: Vec<String>,
    /// Request limits.
    pub limits: Limits,
    /// Queue and job lifetime.
    pub jobs: JobSettings,
    /// The metrics file for node_exporter's textfile collector.
    pub metrics: MetricsSettings,
    /// LoRA folders every model may use.
    pub loras: LoraSettings,
}

/// The `[loras]` table: LoRA folders shared by every model (after each model's own
/// `[models.NAME] loras`). Requests name a file of these folders without its
/// `.safetensors`; the daemon never opens a path a caller sends.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    /// The folders, searched in order. Relative paths are relative to the config file's
    /// folder.
    pub path: Vec<PathBuf>,
}

/// The `[metrics]` table: where and how often the daemon writes its metrics in the
/// Prometheus text format (`crate::metrics`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// The file rewritten atomically every `interval_secs` and at exit (node_exporter's
    /// textfile collector reads `*.prom` files in its folder). Unset: no file.
    pub textfile: Option<PathBuf>,
    /// Seconds between rewrites.
    pub interval_secs: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            textfile: None,
            interval_secs: 15,
        }
    }
}

impl Settings {
    /// The `[runtime]` settings for an engine that serves these settings' requests: TensorRT
    /// profiles then cover what `[limits]` and `jobs.max_batch_images` accept.
    pub fn engine_runtime(&self) -> RuntimeSettings {
        let mut runtime = self.runtime.clone();
        runtime.tensorrt = runtime
            .tensorrt
            .accepting(&self.limits, self.jobs.max_batch_images);
        runtime
    }
}

/// One `[models.NAME]` table: the folder, and defaults for requests that leave keys out
/// (a request's own values win; then these; then the folder's own size and scheduler and
/// the built-in defaults).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The model folder (Optimum ONNX layout).
    pub path: PathBuf,
    /// Default denoising steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Default guidance scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// Default scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Default width in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Default height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Widest image for this model (default: 8 × its native size; `[limits]` still caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_width: Option<u32>,
    /// Tallest image for this model (default: 8 × its native size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_height: Option<u32>,
    /// Default of the `a1111_pad_cond_uncond` request key (webui's "Pad prompt/negative
    /// prompt" option; false, webui's default, when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a1111_pad_cond_uncond: Option<bool>,
    /// The tiny VAE decoder folder for `taesd` previews (diffusers' `AutoencoderTiny`
    /// decoder: `model.onnx` and `config.json`), instead of the model folder's own
    /// `taesd_decoder/`. Relative paths are relative to the config file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_decoder: Option<PathBuf>,
    /// This model's LoRA folder, searched before the global `[loras] path`. Relative
    /// paths are relative to the config file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<PathBuf>,
}

impl ModelEntry {
    /// The request defaults this table sets; `shared_loras` are the global `[loras]`
    /// folders, searched after the model's own.
    pub fn defaults(&self, shared_loras: &[PathBuf]) -> ModelDefaults {
        ModelDefaults {
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler.clone(),
            width: self.width,
            height: self.height,
            max_width: self.max_width,
            max_height: self.max_height,
            a1111_pad_cond_uncond: self.a1111_pad_cond_uncond,
            preview_decoder: self.preview_decoder.clone(),
            lora_dirs: self.loras.iter().chain(shared_loras).cloned().collect(),
        }
    }
}

/// The `[jobs]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSettings {
    /// Most jobs queued or running at once; more get `QueueFull`.
    pub queue_depth: usize,
    /// Most jobs one caller (Unix user) may have queued or running.
    pub jobs_per_caller: usize,
    /// Most bytes of images (init images and masks, as sent) one caller's queued and
    /// running jobs may hold; more get `QueueFull`.
    pub image_bytes_per_caller: usize,
    /// Most images in one UNet batch (1 turns batching off).
    pub max_batch_images: usize,
    /// Seconds a finished job stays on the bus before it is removed.
    pub retention_secs: u64,
    /// Seconds a loaded model may stay unused before it is unloaded (0 = never); a
    /// request's `keep_alive` sets it for the model it ran on.
    pub idle_unload_secs: u64,
    /// The longest `keep_alive` a caller other than root and the service user may ask for
    /// (seconds; longer values, and -1, are cut to it).
    pub max_keep_alive_secs: u64,
    /// Seconds running jobs get to finish on SIGTERM before they are cancelled.
    pub shutdown_grace_secs: u64,
    /// Seconds without jobs after which the daemon exits (0 = never). Unset: on (300 s)
    /// when the bus started the daemon on a session bus (D-Bus activation), off otherwise.
    pub idle_exit_secs: Option<u64>,
    /// Seconds a job may take to write its images to the caller's `output_fds`; a reader
    /// that does not read fails the job then (and `Cancel` ends it at once).
    pub output_timeout_secs: u64,
    /// Seconds a batch runs before it lets another caller's waiting job of the same
    /// priority (and model) run between two of its steps; 0: never (higher priorities and
    /// interactive jobs over batch items still go first).
    pub time_slice_secs: u64,
    /// A Unix group (name or number) whose members may ask for a priority above 0, besides
    /// root and the service user. Unset: nobody else.
    pub priority_group: Option<String>,
    /// Where the daemon keeps its batches (SQLite state and finished images). Unset:
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`, `/var/lib/diffusiond`) on the
    /// system bus, else `$XDG_STATE_HOME/diffusiond` (`~/.local/state/diffusiond`).
    pub state_dir: Option<PathBuf>,
    /// Seconds a finished batch is kept after every one of its images was fetched;
    /// `Batch.Remove` removes one at once.
    pub batch_retention_secs: u64,
    /// Seconds an ended batch whose images were not all fetched (cancelled, failed, or
    /// never collected) is kept after it ended.
    pub unfetched_batch_retention_secs: u64,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            queue_depth: 64,
            jobs_per_caller: 16,
            image_bytes_per_caller: 128 << 20,
            max_batch_images: 4,
            retention_secs: 300,
            idle_unload_secs: 600,
            max_keep_alive_secs: 3600,
            shutdown_grace_secs: 10,
            idle_exit_secs: None,
            output_timeout_secs: 60,
            time_slice_secs: 10,
            priority_group: None,
            state_dir: None,
            batch_retention_secs: 7 * 24 * 3600,
            unfetched_batch_retention_secs: 30 * 24 * 3600,
        }
    }
}

impl Settings {
    /// Reads `file` (if given; it must exist), then `DIFFUSIOND_*` environment variables
    /// (`DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS=2` sets `runtime.session.intra_threads`).
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file.to_path_buf()).required(true));
        }
        let mut settings: Settings = builder
            .add_source(environment())
            .build()?
            .try_deserialize()?;
        if let Some(dir) = file.and_then(Path::parent) {
            for entry in settings.models.values_mut() {
                if entry.path.is_relative() {
                    entry.path = dir.join(&entry.path);
                }
                for d in [entry.preview_decoder.as_mut(), entry.loras.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    if d.is_relative() {
                        *d = dir.join(&*d);
                    }
                }
            }
            for d in &mut settings.loras.path {
                if d.is_relative() {
                    *d = dir.join(&*d);
                }
            }
        }
        // Shown resolved (ListModels, logs); a folder that does not exist stays as written
        // and is refused, naming it, when it is opened.
        for entry in settings.models.values_mut() {
            if let Ok(real) = std::fs::canonicalize(&entry.path) {
                entry.path = real;
            }
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::runtime::providers::validate(&self.runtime).map_err(ConfigError::Invalid)?;
        if let Some(name) = &self.default_model
            && !self.models.contains_key(name)
        {
            return Err(ConfigError::Invalid(format!(
                "default_model: '{name}' is not one of the [models] tables"
            )));
        }
        for name in &self.preload {
            if !self.models.contains_key(name) {
                return Err(ConfigError::Invalid(format!(
                    "preload: '{name}' is not one of the [models] tables"
                )));
            }
        }
        let g = self.limits.max_guidance_scale;
        if !(g.is_finite() && g > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_guidance_scale: {g} is not a positive number"
            )));
        }
        let l = self.limits.max_lora_scale;
        if !(l.is_finite() && l > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "limits.max_lora_scale: {l} is not a positive number"
            )));
        }
        let j = &self.jobs;
        for (key, v) in [
            ("jobs.queue_depth", j.queue_depth),
            ("jobs.jobs_per_caller", j.jobs_per_caller),
            ("jobs.image_bytes_per_caller", j.image_bytes_per_caller),
            ("jobs.max_batch_images", j.max_batch_images),
            ("limits.max_steps", self.limits.max_steps),
            ("limits.max_images", self.limits.max_images),
            ("limits.max_batch_items", self.limits.max_batch_items),
            (
                "limits.max_batches_per_caller",
                self.limits.max_batches_per_caller,
            ),
            ("limits.max_image_bytes", self.limits.max_image_bytes),
            (
                "limits.max_stored_batches_per_caller",
                self.limits.max_stored_batches_per_caller,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{key}: must be at least 1")));
            }
        }
        if self.metrics.interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "metrics.interval_secs: must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The default model's name: `default_model`, else the only model configured.
    pub fn default_model_name(&self) -> Option<&str> {
        self.default_model.as_deref().or_else(|| {
            (self.models.len() == 1).then(|| self.models.keys().next().map(String::as_str))?
        })
    }
}

/// The `DIFFUSIOND_*` environment overrides: `__` separates keys, lists are comma-separated.
pub(crate) fn environment() -> config::Environment {
    config::Environment::with_prefix("DIFFUSIOND")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("runtime.execution_providers")
        .with_list_parse_key("preload")
        .try_parsing(true)
}

/// Where the config file is looked for when none is given: `/etc/diffusiond/diffusiond.toml`
/// on the system bus, `$XDG_CONFIG_HOME/diffusiond/diffusiond.toml` (default
/// `~/.config/...`) for a user.
pub fn default_file_candidates(system: bool) -> Vec<PathBuf> {
    if system {
        return vec![PathBuf::from("/etc/diffusiond/diffusiond.toml")];
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    base.map(|b| b.join("diffusiond/diffusiond.toml"))
        .into_iter()
        .collect()
}

/// The config file used when none is given (see [`default_file_candidates`]); `None` if
/// absent.
pub fn default_file(system: bool) -> Option<PathBuf> {
    default_file_candidates(system)
        .into_iter()
        .find(|p| p.is_file())
}

/// The daemon's state directory (batches): `jobs.state_dir` when set; on the system bus
/// `$STATE_DIRECTORY` (the first, when systemd gives several) or `/var/lib/diffusiond`;
/// otherwise `$XDG_STATE_HOME/diffusiond`, or `$HOME/.local/state/diffusiond`. Pure: the
/// environment comes in as `var`.
pub fn state_dir(
    configured: Option<&Path>,
    system: bool,
    var: impl Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    if let Some(dir) = configured {
        return Some(dir.to_path_buf());
    }
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    if system {
        return Some(
            set("STATE_DIRECTORY")
                .and_then(|v| v.split(':').next().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/var/lib/diffusiond")),
        );
    }
    set("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|base| base.join("diffusiond"))
}

/// The id of Unix group `name` (a number is taken as it is), from `group_file` (the
/// contents of /etc/group).
pub fn group_id(name: &str, group_file: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_found_by_name_or_number() {
        let file = "root:x:0:\nusers:x:100:alice,bob\ndiffusiond:x:998:\n";
        assert_eq!(group_id("users", file), Some(100));
        assert_eq!(group_id("diffusiond", file), Some(998));
        assert_eq!(group_id("1234", file), Some(1234));
        assert_eq!(group_id("nope", file), None);
    }

    #[test]
    fn the_state_directory_follows_the_bus_and_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            state_dir(Some(Path::new("/srv/x")), true, env(&[])),
            p("/srv/x")
        );
        assert_eq!(
            state_dir(
                None,
                true,
                env(&[("STATE_DIRECTORY", "/var/lib/diffusiond:/other")])
            ),
            p("/var/lib/diffusiond")
        );
        assert_eq!(state_dir(None, true, env(&[])), p("/var/lib/diffusiond"));
        assert_eq!(
            state_dir(
                None,
                false,
                env(&[("XDG_STATE_HOME", "/h/st"), ("HOME", "/h")])
            ),
            p("/h/st/diffusiond")
        );
        assert_eq!(
            state_dir(None, false, env(&[("XDG_STATE_HOME", ""), ("HOME", "/h")])),
            p("/h/.local/state/diffusiond")
        );
        assert_eq!(state_dir(None, false, env(&[])), None);
    }
}
