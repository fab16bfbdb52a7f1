//! The configured models: each folder opened and checked once (when the daemon starts),
//! then held as shared, immutable data. Requests are resolved against it without touching
//! the disk.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::ModelBundle;
use super::hash::HashCache;
use crate::lora::{LoraCatalog, LoraShelf};
use crate::request::{
    self, GenerateRequest, Limits, ModelDefaults, ModelRef, RequestError, ResolvedRequest,
};

/// One configured model.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    /// Its folder, as configured (relative paths already joined to the config's folder).
    pub path: PathBuf,
    /// The opened bundle, or why it could not be opened or its defaults are unusable (the
    /// message names the file or the key).
    pub bundle: Result<Arc<ModelBundle>, String>,
    /// The `[models.NAME]` defaults for requests that leave keys out.
    pub defaults: ModelDefaults,
    /// Its LoRA folders (`defaults.lora_dirs`) and their last scan.
    pub loras: Arc<LoraShelf>,
}

/// A model to open: its name, folder and configured defaults.
pub struct ModelSpec {
    /// The configured name.
    pub name: String,
    /// The folder.
    pub path: PathBuf,
    /// The configured defaults.
    pub defaults: ModelDefaults,
}

/// The configured models by name, and the default.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: BTreeMap<String, CatalogEntry>,
    default: Option<String>,
}

impl Catalog {
    /// [`Catalog::open_cached`] with a model hash cache in memory only.
    pub fn open(
        models: impl IntoIterator<Item = ModelSpec>,
        default: Option<String>,
        limits: &Limits,
    ) -> Catalog {
        Catalog::open_cached(models, default, limits, &HashCache::in_memory())
    }

    /// Opens every model folder and computes its model hash (file I/O: call it off async
    /// threads), each file's digest from `hashes` when unchanged (the cache is saved
    /// after). A folder that fails to open is kept with its error, so requests for it say
    /// why; so is one whose configured defaults a request could not use (checked by
    /// resolving an empty request against `limits`).
    pub fn open_cached(
        models: impl IntoIterator<Item = ModelSpec>,
        default: Option<String>,
        limits: &Limits,
        hashes: &HashCache,
    ) -> Catalog {
        let entries = models
            .into_iter()
            .map(|m| {
                let bundle = ModelBundle::open(&m.path)
                    .and_then(|b| match &m.defaults.preview_decoder {
                        Some(d) => b.with_preview_decoder(d),
                        None => Ok(b),
                    })
                    .and_then(|b| b.hashed(hashes))
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        let probe = GenerateRequest {
                            seed: Some(0),
                            ..GenerateRequest::default()
                        };
                        let model = ModelRef {
                            name: &m.name,
                            bundle: &b,
                            defaults: &m.defaults,
                            loras: LoraCatalog::none(),
                        };
                        let probed = match request::resolve(&probe, model, limits, || 0) {
                            // An inpainting model takes no text-to-image request: the
                            // probe checks its other defaults only.
                            Err(request::RequestError::Invalid {
                                key: "init_image", ..
                            }) if b.unet_in_channels == 9 => Ok(()),
                            other => other.map(drop),
                        };
                        probed
                            .map(|()| b)
                            .map_err(|e| format!("[models.{}] defaults: {e}", m.name))
                    });
                if let Err(e) = &bundle {
                    tracing::error!(model = %m.name, error = %e, "model refused");
                }
                let loras = Arc::new(LoraShelf::open(m.defaults.lora_dirs.clone()));
                let entry = CatalogEntry {
                    path: m.path,
                    bundle,
                    defaults: m.defaults,
                    loras,
                };
                (m.name, entry)
            })
            .collect();
        hashes.save();
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
                    // Caller text: repeated in the error cut short.
                    name: crate::wire::error::echo(name).into_owned(),
                    known: self.names().collect::<Vec<_>>().join(", "),
                })?;
        match &entry.bundle {
            Ok(bundle) => Ok(ModelRef {
                name,
                bundle,
                defaults: &entry.defaults,
                loras: LoraCatalog::none(),
            }),
            Err(message) => Err(RequestError::ModelUnavailable {
                name: name.clone(),
                message: message.clone(),
            }),
        }
    }

    /// Resolves a request against the model it names: the daemon's one resolve step.
    /// LoRA names are looked up in the model's last folder scan
    /// ([`Catalog::rescan_loras`] reads the folders again).
    pub fn resolve(
        &self,
        req: &GenerateRequest,
        limits: &Limits,
    ) -> Result<ResolvedRequest, RequestError> {
        let model = self.lookup(req.model.as_deref())?;
        let loras = self
            .entries
            .get(model.name)
            .map_or_else(|| Arc::new(LoraCatalog::default()), |e| e.loras.snapshot());
        let model = ModelRef {
            loras: &loras,
            ..model
        };
        request::resolve(req, model, limits, request::random_seed)
    }

    /// Scans the LoRA folders of the model a request names again (file I/O: call it off
    /// async threads); false when there is no such model or it has no LoRA folder.
    pub fn rescan_loras(&self, requested: Option<&str>) -> bool {
        let name = requested.or_else(|| self.default_name());
        match name.and_then(|n| self.entries.get(n)) {
            Some(e) if !e.loras.dirs().is_empty() => {
                e.loras.rescan();
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let spec = |name: &str, path: &str, defaults: ModelDefaults| ModelSpec {
            name: name.into(),
            path: root.join(path),
            defaults,
        };
        let bad = ModelDefaults {
            width: Some(100),
            ..ModelDefaults::default()
        };
        Catalog::open(
            [
                spec("tiny", "onnx/tiny-sd15", ModelDefaults::default()),
                spec("gone", "onnx/no-such-model", ModelDefaults::default()),
                spec("odd", "onnx/tiny-sd15", bad),
            ],
            Some("tiny".into()),
            &Limits::default(),
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
            "unknown model 'nope' (configured: gone, odd, tiny)"
        );
        let err = c.lookup(Some("gone")).unwrap_err();
        assert!(
            matches!(err, RequestError::ModelUnavailable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = c.lookup(Some("odd")).unwrap_err().to_string();
        assert!(
            err.contains("[models.odd] defaults: 'width': 100 is not a multiple of 16"),
            "{err}"
        );
    }

    #[test]
    fn opened_models_carry_their_hash_and_a_second_open_reads_no_file() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let hashes = HashCache::in_memory();
        let spec = || ModelSpec {
            name: "tiny".into(),
            path: root.join("onnx/tiny-sd15"),
            defaults: ModelDefaults::default(),
        };
        let c = Catalog::open_cached([spec()], None, &Limits::default(), &hashes);
        let bundle = c.lookup(None).unwrap().bundle;
        let hex = bundle.model_hash.clone().unwrap();
        assert_eq!(hex.len(), 64);
        assert_eq!(bundle.short_hash(), Some(&hex[..10]));
        // The committed files are older than the racy window: all cached.
        let again = super::super::hash::model_hash(&root.join("onnx/tiny-sd15"), &hashes).unwrap();
        assert_eq!((again.bytes_read, again.hex), (0, hex));
    }

    #[test]
    fn an_unknown_name_is_echoed_cut_short() {
        let long = "m".repeat(100_000);
        let err = catalog().lookup(Some(&long)).unwrap_err().to_string();
        assert!(err.starts_with("unknown model 'mmm"), "{err}");
        assert!(err.contains("… (100000 characters)"), "{err}");
        assert!(err.len() < 300, "{} bytes", err.len());
    }

    #[test]
    fn the_only_model_is_the_default() {
        let mut entries = BTreeMap::new();
        entries.insert(
            "solo".to_string(),
            CatalogEntry {
                path: PathBuf::from("/x"),
                bundle: Err("unreadable".into()),
                defaults: ModelDefaults::default(),
                loras: Default::default(),
            },
        );
        let c = Catalog::from_entries(entries, None);
        assert_eq!(c.default_name(), Some("solo"));
        assert!(Catalog::default().lookup(None).is_err());
    }
}
