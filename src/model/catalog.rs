//! The configured models: each folder opened and checked once (when the daemon starts),
//! then held as shared, immutable data. Requests are resolved against it without touching
//! the disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::ModelBundle;
use crate::request::{self, GenerateRequest, Limits, ModelRef, RequestError, ResolvedRequest};

/// One configured model.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    /// Its folder, as configured (relative paths already joined to the config's folder).
    pub path: PathBuf,
    /// The opened bundle, or why it could not be opened (the message names the file).
    pub bundle: Result<Arc<ModelBundle>, String>,
}

/// The configured models by name, and the default.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: BTreeMap<String, CatalogEntry>,
    default: Option<String>,
}

impl Catalog {
    /// Opens every model folder (file I/O: call it off async threads). A folder that
    /// fails to open is kept with its error, so requests for it say why.
    pub fn open(
        models: impl IntoIterator<Item = (String, PathBuf)>,
        default: Option<String>,
    ) -> Catalog {
        let entries = models
            .into_iter()
            .map(|(name, path)| {
                let bundle = ModelBundle::open(&path)
                    .map(Arc::new)
                    .map_err(|e| e.to_string());
                if let Err(e) = &bundle {
                    tracing::error!(model = %name, error = %e, "model folder refused");
                }
                (name, CatalogEntry { path, bundle })
            })
            .collect();
        Catalog::from_entries(entries, default)
    }

    /// A catalog of already opened entries (`default`: the model used when a request
    /// names none; with `None` and one model, that one).
    pub fn from_entries(
        entries: BTreeMap<String, CatalogEntry>,
        default: Option<String>,
    ) -> Catalog {
        Catalog { entries, default }
    }

    /// The configured names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The entries, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &CatalogEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// One entry.
    pub fn get(&self, name: &str) -> Option<&CatalogEntry> {
        self.entries.get(name)
    }

    /// Whether `name` is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The model requests without `model` use: the configured default, else the only one.
    pub fn default_name(&self) -> Option<&str> {
        self.default.as_deref().or_else(|| {
            (self.entries.len() == 1).then(|| self.entries.keys().next().map(String::as_str))?
        })
    }

    /// The model a request names (or the default), opened.
    pub fn lookup(&self, requested: Option<&str>) -> Result<ModelRef<'_>, RequestError> {
        let name = match requested {
            Some(n) => n,
            None => self.default_name().ok_or(RequestError::NoDefaultModel)?,
        };
        let (name, entry) =
            self.entries
                .get_key_value(name)
                .ok_or_else(|| RequestError::UnknownModel {
                    name: name.to_string(),
                    known: self.names().collect::<Vec<_>>().join(", "),
                })?;
        match &entry.bundle {
            Ok(bundle) => Ok(ModelRef { name, bundle }),
            Err(message) => Err(RequestError::ModelUnavailable {
                name: name.clone(),
                message: message.clone(),
            }),
        }
    }

    /// Resolves a request against the model it names: the daemon's one resolve step.
    pub fn resolve(
        &self,
        req: &GenerateRequest,
        limits: &Limits,
    ) -> Result<ResolvedRequest, RequestError> {
        let model = self.lookup(req.model.as_deref())?;
        request::resolve(req, model, limits, request::random_seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        Catalog::open(
            [
                ("tiny".to_string(), root.join("onnx/tiny-sd15")),
                ("gone".to_string(), root.join("onnx/no-such-model")),
            ],
            Some("tiny".into()),
        )
    }

    #[test]
    fn requests_resolve_against_the_opened_folders() {
        let c = catalog();
        let r = c
            .resolve(
                &GenerateRequest {
                    prompt: "p".into(),
                    seed: Some(1),
                    ..Default::default()
                },
                &Limits::default(),
            )
            .unwrap();
        assert_eq!(r.model, "tiny");
        assert_eq!((r.width, r.height), (64, 64));
        let err = c
            .resolve(
                &GenerateRequest {
                    model: Some("nope".into()),
                    ..Default::default()
                },
                &Limits::default(),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown model 'nope' (configured: gone, tiny)"
        );
        let err = c.lookup(Some("gone")).unwrap_err();
        assert!(
            matches!(err, RequestError::ModelUnavailable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn the_only_model_is_the_default() {
        let mut entries = BTreeMap::new();
        entries.insert(
            "solo".to_string(),
            CatalogEntry {
                path: PathBuf::from("/x"),
                bundle: Err("unreadable".into()),
            },
        );
        let c = Catalog::from_entries(entries, None);
        assert_eq!(c.default_name(), Some("solo"));
        assert!(Catalog::default().lookup(None).is_err());
    }
}
