//! What the daemon serves when started: the config file it is given, else the default
//! config file, else — with no config at all — the bundled demo model, found beside the
//! install or the source checkout. A config file, when there is one, is authoritative.

use std::path::{Path, PathBuf};

use super::{ConfigError, ModelEntry, Settings, default_file_candidates};

/// The name the bundled model is served under when no config names models.
pub const BUNDLED_NAME: &str = "demo";

/// Where the daemon's settings came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A config file (given with `--config`, or the default one).
    File(PathBuf),
    /// `DIFFUSIOND_*` environment variables alone.
    Environment,
    /// No config: the bundled model in this folder.
    Bundled(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Environment => f.write_str("DIFFUSIOND_* environment variables"),
            Origin::Bundled(p) => write!(f, "no config file: the bundled model at {}", p.display()),
        }
    }
}

/// Where the bundled model is looked for, in order: the install's data folder relative to
/// the executable (`PREFIX/bin/diffusiond` → `PREFIX/share/diffusiond/models/demo`), the
/// usual prefixes, then the source checkout this binary was built from.
pub fn bundled_model_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let tail = Path::new("share/diffusiond/models").join(BUNDLED_NAME);
    if let Some(prefix) = exe.and_then(Path::parent).and_then(Path::parent) {
        out.push(prefix.join(&tail));
    }
    for prefix in ["/usr/local", "/usr"] {
        let p = Path::new(prefix).join(&tail);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-demo"));
    out
}

/// The settings `diffusiond` runs with: `explicit` (`--config`), else the default config
/// file for the bus, else the environment's models, else the bundled model as
/// `demo` (20 steps, guidance 5: the settings it was measured at).
pub fn daemon_settings(
    explicit: Option<&Path>,
    system: bool,
) -> Result<(Settings, Origin), ConfigError> {
    let candidates = default_file_candidates(system);
    let file = explicit
        .map(Path::to_path_buf)
        .or_else(|| candidates.iter().find(|p| p.is_file()).cloned());
    if let Some(file) = file {
        let settings = Settings::load(Some(&file))?;
        if settings.models.is_empty() {
            return Err(ConfigError::NoModels(file));
        }
        return Ok((settings, Origin::File(file)));
    }
    let mut settings = Settings::load(None)?;
    if !settings.models.is_empty() {
        return Ok((settings, Origin::Environment));
    }
    let exe = std::env::current_exe().ok();
    let tried = bundled_model_candidates(exe.as_deref());
    let Some(model) = tried.iter().find(|p| p.join("model_index.json").is_file()) else {
        let list = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(ConfigError::NothingToServe {
            files: list(&candidates),
            models: list(&tried),
        });
    };
    let path = std::fs::canonicalize(model).unwrap_or_else(|_| model.clone());
    settings.models.insert(
        BUNDLED_NAME.to_string(),
        ModelEntry {
            path: path.clone(),
            steps: Some(20),
            guidance_scale: Some(5.0),
            ..ModelEntry::default()
        },
    );
    settings.default_model = Some(BUNDLED_NAME.to_string());
    settings.validate()?;
    Ok((settings, Origin::Bundled(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_prefix_comes_first_then_the_checkout() {
        let c = bundled_model_candidates(Some(Path::new("/opt/dd/bin/diffusiond")));
        assert_eq!(c[0], Path::new("/opt/dd/share/diffusiond/models/demo"));
        assert_eq!(c[1], Path::new("/usr/local/share/diffusiond/models/demo"));
        assert_eq!(c[2], Path::new("/usr/share/diffusiond/models/demo"));
        assert!(c[3].ends_with("onnx/tiny-demo"));
        let c = bundled_model_candidates(Some(Path::new("/usr/bin/diffusiond")));
        assert_eq!(c.len(), 3, "{c:?}");
    }

    #[test]
    fn a_config_without_models_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.toml");
        std::fs::write(&file, "[limits]\nmax_steps = 9\n").unwrap();
        let err = daemon_settings(Some(&file), false).unwrap_err().to_string();
        assert!(err.contains("d.toml has no [models] table"), "{err}");
        let file = dir.path().join("missing.toml");
        let err = daemon_settings(Some(&file), false).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
