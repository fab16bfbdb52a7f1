//! Configuration: a TOML file plus `DIFFUSIOND_*` environment overrides, read with the
//! `config` crate and validated into typed settings in one step.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// ONNX Runtime: library, execution providers, session options.
    pub runtime: RuntimeSettings,
}

impl Settings {
    /// Reads `file` (if given; it must exist), then `DIFFUSIOND_*` environment variables
    /// (`DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS=2` sets `runtime.session.intra_threads`).
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file.to_path_buf()).required(true));
        }
        let env = config::Environment::with_prefix("DIFFUSIOND")
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("runtime.execution_providers")
            .try_parsing(true);
        let settings: Settings = builder.add_source(env).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::runtime::providers::validate(&self.runtime).map_err(ConfigError::Invalid)
    }
}

/// The config file used when none is given: `/etc/diffusiond/diffusiond.toml` on the
/// system bus, `$XDG_CONFIG_HOME/diffusiond/diffusiond.toml` for a user; `None` if absent.
pub fn default_file(system: bool) -> Option<PathBuf> {
    let path = if system {
        PathBuf::from("/etc/diffusiond/diffusiond.toml")
    } else {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        base.join("diffusiond/diffusiond.toml")
    };
    path.is_file().then_some(path)
}
