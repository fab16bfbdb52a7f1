//! Model bundles in the Hugging Face Optimum export layout.
//!
//! ```text
//! model_index.json
//! scheduler/scheduler_config.json
//! tokenizer/            (tokenizer_2/ for SDXL)
//! text_encoder/model.onnx   (text_encoder_2/ for SDXL)
//! unet/model.onnx (+ model.onnx_data)
//! vae_decoder/model.onnx, vae_decoder/config.json
//! ```
//!
//! [`ModelBundle::open`] reads and checks the JSON files; [`signature`] checks each
//! session's inputs and outputs once it is loaded. Every error names the file.

mod catalog;
pub mod controlnet;
pub mod flow;
pub mod graph_inputs;
pub mod hash;
pub mod memory;
pub mod safety;
pub mod signature;
pub mod small_file;

pub use catalog::{Catalog, CatalogEntry, ModelSpec};

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::scheduler::{self, SchedulerConfig};

/// Errors from reading a model folder or checking its graphs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The folder does not exist.
    #[error("model folder {0} does not exist")]
    MissingFolder(PathBuf),
    /// The folder's path exists but cannot be used as a folder: a symlink loop, not a
    /// folder, no permission.
    #[error("model folder {path}: {message}")]
    BadFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A required file is missing.
    #[error("{0}: file is missing")]
    MissingFile(PathBuf),
    /// A file exists but cannot be read or parsed.
    #[error("{path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A graph's inputs or outputs are not what the pipeline needs.
    #[error("{path}: {message}")]
    Signature {
        /// The ONNX file.
        path: PathBuf,
        /// The mismatch.
        message: String,
    },
    /// A graph refers to external data diffusiond will not let ONNX Runtime open.
    #[error(transparent)]
    Unsafe(#[from] safety::SafetyError),
    /// The pipeline class is not one diffusiond runs.
    #[error(
        "{path}: pipeline class '{class}' is not supported (StableDiffusionPipeline and its image-to-image, inpainting and LCM variants, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)"
    )]
    UnsupportedPipeline {
        /// model_index.json.
        path: PathBuf,
        /// The `_class_name`.
        class: String,
    },
}

/// Which family of pipeline a bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// SD 1.x / 2.x: one CLIP text encoder.
    StableDiffusion,
    /// SDXL: two text encoders, pooled embeddings and micro-conditioning.
    StableDiffusionXl,
    /// Stable Diffusion 3/3.5: two CLIP encoders, T5, an MMDiT transformer, flow matching.
    Sd3,
    /// FLUX.1: CLIP, T5, a transformer on packed latents, flow matching.
    Flux,
}

impl PipelineKind {
    /// Whether it is a transformer (flow-matching) family ([`flow`]).
    pub fn is_flow(self) -> bool {
        matches!(self, PipelineKind::Sd3 | PipelineKind::Flux)
    }

    /// Its name in `ListModels` (`sd`, `sdxl`, `sd3`, `flux`).
    pub fn name(self) -> &'static str {
        match self {
            PipelineKind::StableDiffusion => "sd",
            PipelineKind::StableDiffusionXl => "sdxl",
            PipelineKind::Sd3 => "sd3",
            PipelineKind::Flux => "flux",
        }
    }
}

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    scheduler: Option<(Option<String>, Option<String>)>,
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct VaeConfig {
    #[serde(default = "default_scaling")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default)]
    block_out_channels: Option<Vec<u32>>,
}

/// The tiny VAE decoder's folder inside a model folder (`taesd` previews).
pub const TAESD_DIR: &str = "taesd_decoder";

/// The largest VAE scale factor accepted from a config (SD models use 8).
const MAX_VAE_SCALE_FACTOR: usize = 64;
/// The largest native size accepted from a config, in pixels per side.
const MAX_DEFAULT_SIZE: usize = 16384;

fn default_scaling() -> f64 {
    0.18215
}

/// An opened, checked model folder.
#[derive(Debug, Clone)]
pub struct ModelBundle {
    /// The folder.
    pub dir: PathBuf,
    /// Its pipeline family.
    pub kind: PipelineKind,
    /// The scheduler config the folder ships.
    pub scheduler_config: SchedulerConfig,
    /// The diffusiond name of the folder's own scheduler (the default), if it is one we know.
    pub default_scheduler: Option<&'static str>,
    /// `vae.config.scaling_factor` (0.18215 for SD1.x, 0.13025 for SDXL).
    pub vae_scaling_factor: f64,
    /// `vae.config.shift_factor`, when the VAE has one.
    pub vae_shift_factor: Option<f64>,
    /// Pixels per latent cell: 2^(number of VAE blocks − 1), 8 for every SD model.
    pub vae_scale_factor: usize,
    /// What image sides must be multiples of: the VAE factor times the UNet's own
    /// downsampling, 2^(number of down blocks − 1) (64 for SD 1.x/2.x and SDXL's 4 and 3
    /// blocks: 64 and 32; 16 for the two-block test models).
    pub size_multiple: usize,
    /// Memory figures for admission ([`memory::MemoryProfile`]).
    pub memory: memory::MemoryProfile,
    /// SDXL: use zero embeddings for an empty negative prompt.
    pub force_zeros_for_empty_prompt: bool,
    /// The default image size: `unet.config.sample_size × vae_scale_factor`, as diffusers.
    pub default_size: usize,
    /// `unet.config.in_channels`: 4, or 9 for an inpainting UNet (latents, mask and
    /// masked-image latents).
    pub unet_in_channels: usize,
    /// `unet.config.time_cond_proj_dim`: set for LCM-distilled UNets, which take the
    /// guidance scale as an embedding (`timestep_cond`) instead of a CFG batch.
    pub time_cond_proj_dim: Option<usize>,
    /// Whether the folder has a VAE encoder (image-to-image and inpainting need one).
    pub has_vae_encoder: bool,
    /// Whether the folder has an fp32 VAE decoder beside an fp16 one
    /// (`vae_decoder_fp32/model.onnx`): latents the main decoder turns into non-finite
    /// values (fp16 overflow) are decoded again with it.
    pub has_vae_decoder_fp32: bool,
    /// The tiny VAE decoder folder for `taesd` previews (diffusers' `AutoencoderTiny`
    /// decoder, `model.onnx` with its `config.json`): the folder's `taesd_decoder/`, or
    /// `[models.NAME] preview_decoder` ([`ModelBundle::with_preview_decoder`]).
    pub preview_decoder: Option<PathBuf>,
    /// The folder's [`hash::ModelHash`] (64 hex digits), once [`ModelBundle::hashed`]
    /// computed it (the catalog and `--local` do); `None` before.
    pub model_hash: Option<String>,
    /// The transformer families' facts (`None` for the UNet ones).
    pub flow: Option<flow::FlowFacts>,
    /// The folder's ControlNets (`controlnet/NAME/`), sorted by name.
    pub controlnets: Vec<controlnet::ControlNetInfo>,
    /// How many down-block residuals the UNet takes from ControlNets (0: a UNet without
    /// ControlNet inputs, as Optimum exports it).
    pub unet_residuals: usize,
    /// With ControlNet inputs: the shapes of the down-block residuals, then the mid
    /// block's (`unet_residuals + 1` of them, from `unet/config.json`); else empty.
    pub residual_shapes: Vec<controlnet::ResidualShape>,
}

#[derive(Debug, Deserialize)]
struct UnetConfig {
    #[serde(default)]
    sample_size: Option<usize>,
    #[serde(default)]
    down_block_types: Option<Vec<String>>,
    #[serde(default)]
    in_channels: Option<usize>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
}

impl ModelBundle {
    /// Reads `model_index.json`, the scheduler and VAE configs, checks that the
    /// component folders exist and that their graphs' external data is safe
    /// ([`safety::check_file`]).
    pub fn open(dir: &Path) -> Result<ModelBundle, ModelError> {
        check_folder(dir)?;
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        let kind = match index.class_name.as_str() {
            // Transformer (MMDiT) families: transformer/ in place of unet/.
            c if c.starts_with("StableDiffusion3") || c.starts_with("ORTStableDiffusion3") => {
                PipelineKind::Sd3
            }
            c if c.starts_with("Flux") || c.starts_with("ORTFlux") => PipelineKind::Flux,
            "StableDiffusionXLPipeline" | "ORTStableDiffusionXLPipeline" => {
                PipelineKind::StableDiffusionXl
            }
            c if c.starts_with("StableDiffusion")
                || c.starts_with("ORTStableDiffusion")
                || c.starts_with("LatentConsistencyModel")
                || c.starts_with("ORTLatentConsistencyModel")
                || c.starts_with("OnnxStableDiffusion") =>
            {
                PipelineKind::StableDiffusion
            }
            other => {
                return Err(ModelError::UnsupportedPipeline {
                    path: index_path,
                    class: other.to_string(),
                });
            }
        };
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let scheduler_config =
            SchedulerConfig::from_file(&sched_path).map_err(|e| ModelError::Malformed {
                path: sched_path.clone(),
                message: e.to_string(),
            })?;
        let default_scheduler = index
            .scheduler
            .and_then(|(_, class)| class)
            .and_then(|class| scheduler::name_for_class(&class));
        let vae: VaeConfig = read_json(&dir.join("vae_decoder/config.json"))?;
        let unet_config = dir.join("unet/config.json");
        let unet: UnetConfig = read_optional_json(&unet_config)?.unwrap_or(UnetConfig {
            sample_size: None,
            down_block_types: None,
            in_channels: None,
            time_cond_proj_dim: None,
        });
        let vae_path = dir.join("vae_decoder/config.json");
        let vae_scale_factor = match &vae.block_out_channels {
            None => 8,
            Some(b) => halvings(b.len(), &vae_path, "block_out_channels")?,
        };
        let unet_downsampling = match &unet.down_block_types {
            None => 1,
            Some(blocks) => halvings(blocks.len(), &unet_config, "down_block_types")?,
        };
        let vae_shape: memory::VaeShape = read_json(&vae_path)?;
        if kind.is_flow() {
            let shape = flow::read(dir, kind, &vae_shape, vae_scale_factor)?;
            let bundle = ModelBundle {
                dir: dir.to_path_buf(),
                kind,
                scheduler_config,
                // The flow families' one scheduler.
                default_scheduler: Some(crate::scheduler::flow_match::FLOW_EULER),
                vae_scaling_factor: vae.scaling_factor,
                vae_shift_factor: vae.shift_factor,
                vae_scale_factor,
                size_multiple: shape.size_multiple,
                memory: shape.memory,
                force_zeros_for_empty_prompt: false,
                default_size: shape.default_size,
                unet_in_channels: flow::LATENT_CHANNELS,
                time_cond_proj_dim: None,
                has_vae_encoder: dir.join("vae_encoder/model.onnx").is_file(),
                has_vae_decoder_fp32: false,
                preview_decoder: None,
                model_hash: None,
                flow: Some(shape.facts),
                controlnets: Vec::new(),
                unet_residuals: 0,
                residual_shapes: Vec::new(),
            };
            bundle.check_files()?;
            return Ok(bundle);
        }
        let size_multiple = vae_scale_factor * unet_downsampling;
        let sample_size = unet.sample_size.unwrap_or(64);
        let default_size = sample_size
            .checked_mul(vae_scale_factor)
            .filter(|&s| s > 0 && s <= MAX_DEFAULT_SIZE)
            .ok_or_else(|| ModelError::Malformed {
                path: unet_config.clone(),
                message: format!(
                    "sample_size {sample_size} x VAE factor {vae_scale_factor} is not a size between 1 and {MAX_DEFAULT_SIZE} pixels"
                ),
            })?;
        let unet_shape: memory::UnetShape = read_optional_json(&unet_config)?.unwrap_or_default();
        let mut components: Vec<&str> = bundle_text_encoders(kind).to_vec();
        components.extend(["unet", "vae_decoder"]);
        let taesd = dir.join(TAESD_DIR);
        let preview_decoder = taesd.join("model.onnx").is_file().then_some(taesd);
        if preview_decoder.is_some() {
            components.push(TAESD_DIR);
        }
        let controlnets = controlnet::list(dir)?;
        let unet_residuals = match controlnet::unet_residuals(&dir.join("unet/model.onnx")) {
            Ok(n) => n,
            // A missing UNet is reported by check_files, naming the file.
            Err(_) if !dir.join("unet/model.onnx").is_file() => 0,
            Err(e) => return Err(e),
        };
        let residual_shapes = if unet_residuals > 0 {
            let shapes = controlnet::residual_shapes(&unet_config)?;
            if shapes.len() != unet_residuals + 1 {
                return Err(ModelError::Signature {
                    path: dir.join("unet/model.onnx"),
                    message: format!(
                        "the UNet takes {unet_residuals} down-block residuals, and unet/config.json \
                         gives {}",
                        shapes.len() - 1
                    ),
                });
            }
            shapes
        } else {
            Vec::new()
        };
        let controlnet_dirs: Vec<String> = controlnets
            .iter()
            .map(|c| format!("{}/{}", controlnet::DIR, c.name))
            .collect();
        components.extend(controlnet_dirs.iter().map(String::as_str));
        let weights = memory::weights_on_disk(dir, &components);
        let memory = memory::MemoryProfile::new(&unet_shape, &vae_shape, vae_scale_factor, weights);
        let bundle = ModelBundle {
            dir: dir.to_path_buf(),
            kind,
            scheduler_config,
            default_scheduler,
            vae_scaling_factor: vae.scaling_factor,
            vae_shift_factor: vae.shift_factor,
            vae_scale_factor,
            size_multiple,
            memory,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
            default_size,
            unet_in_channels: unet.in_channels.unwrap_or(4),
            time_cond_proj_dim: unet.time_cond_proj_dim,
            has_vae_encoder: dir.join("vae_encoder/model.onnx").is_file(),
            has_vae_decoder_fp32: dir.join("vae_decoder_fp32/model.onnx").is_file(),
            preview_decoder,
            model_hash: None,
            flow: None,
            controlnets,
            unet_residuals,
            residual_shapes,
        };
        bundle.check_files()?;
        Ok(bundle)
    }

    /// The bundle with `dir` as its tiny VAE decoder for previews (`[models.NAME]
    /// preview_decoder`), instead of its own `taesd_decoder/`; its weights count in the
    /// model's memory, and its graph is checked like the others.
    pub fn with_preview_decoder(mut self, dir: &Path) -> Result<ModelBundle, ModelError> {
        check_folder(dir)?;
        if let Some(own) = &self.preview_decoder {
            let own = memory::weights_on_disk(own, &["."]);
            self.memory.weights_bytes = self.memory.weights_bytes.saturating_sub(own);
        }
        self.memory.weights_bytes += memory::weights_on_disk(dir, &["."]);
        self.preview_decoder = Some(dir.to_path_buf());
        self.check_files()?;
        Ok(self)
    }

    /// The bundle with its model hash computed ([`hash::model_hash`]: file I/O, call it
    /// off async threads), each file's digest taken from `cache` when the file is
    /// unchanged. The caller saves the cache.
    pub fn hashed(mut self, cache: &hash::HashCache) -> Result<ModelBundle, ModelError> {
        let h = hash::model_hash(&self.dir, cache)?;
        if h.bytes_read > 0 {
            tracing::info!(
                folder = %self.dir.display(),
                files = h.files,
                bytes = h.bytes_read,
                model_hash = h.short(),
                "model folder hashed"
            );
        }
        self.model_hash = Some(h.hex);
        Ok(self)
    }

    /// The first 10 hex digits of the model hash (the PNG's `Model hash`), if computed.
    pub fn short_hash(&self) -> Option<&str> {
        self.model_hash.as_deref().map(|h| &h[..10.min(h.len())])
    }

    /// Checks that every graph the pipeline loads exists and that its external data is
    /// safe ([`safety::check_file`]). [`ModelBundle::open`] runs it; a model load runs it
    /// again, so a folder changed since it was opened is never loaded unchecked.
    pub fn check_files(&self) -> Result<(), ModelError> {
        for f in self.required_files() {
            match small_file::open_regular(&f) {
                Ok(_) => {}
                Err(small_file::SmallFileError::Missing) => return Err(ModelError::MissingFile(f)),
                Err(e) => {
                    return Err(ModelError::Malformed {
                        path: f,
                        message: e.to_string(),
                    });
                }
            }
        }
        // Only ever files inside the configured folder: refuse unsafe external data.
        for f in self.required_files() {
            safety::check_file(&f)?;
        }
        Ok(())
    }

    /// The ONNX file of a component folder (`unet`, `text_encoder`, ...).
    pub fn onnx(&self, component: &str) -> PathBuf {
        self.dir.join(component).join("model.onnx")
    }

    /// The tokenizer folders, in text-encoder order.
    pub fn tokenizer_dirs(&self) -> Vec<PathBuf> {
        match self.kind {
            PipelineKind::StableDiffusion => vec![self.dir.join("tokenizer")],
            _ => vec![self.dir.join("tokenizer"), self.dir.join("tokenizer_2")],
        }
    }

    /// The text-encoder components, in order.
    pub fn text_encoders(&self) -> &'static [&'static str] {
        match (self.kind, &self.flow) {
            (PipelineKind::Sd3, Some(f)) if f.has_t5 => {
                &["text_encoder", "text_encoder_2", "text_encoder_3"]
            }
            (kind, _) => bundle_text_encoders(kind),
        }
    }

    /// The denoiser's component: `unet`, or `transformer` for the flow families.
    pub fn denoiser(&self) -> &'static str {
        if self.kind.is_flow() {
            "transformer"
        } else {
            "unet"
        }
    }

    fn required_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.text_encoders().iter().map(|c| self.onnx(c)).collect();
        files.push(self.onnx(self.denoiser()));
        files.push(self.onnx("vae_decoder"));
        if self.has_vae_encoder {
            files.push(self.onnx("vae_encoder"));
        }
        if self.has_vae_decoder_fp32 {
            files.push(self.onnx("vae_decoder_fp32"));
        }
        if let Some(d) = &self.preview_decoder {
            files.push(d.join("model.onnx"));
        }
        files.extend(
            self.controlnets
                .iter()
                .map(controlnet::ControlNetInfo::onnx),
        );
        files
    }
}

/// The factor `levels` blocks shrink an image by, 2^(levels − 1), as read from a config list
/// of `levels` entries under `key`: checked, and at most [`MAX_VAE_SCALE_FACTOR`].
fn halvings(levels: usize, path: &Path, key: &str) -> Result<usize, ModelError> {
    u32::try_from(levels.saturating_sub(1))
        .ok()
        .and_then(|shift| 1usize.checked_shl(shift))
        .filter(|&f| f <= MAX_VAE_SCALE_FACTOR)
        .ok_or_else(|| ModelError::Malformed {
            path: path.to_path_buf(),
            message: format!(
                "{key} has {levels} entries: a scale factor above {MAX_VAE_SCALE_FACTOR}"
            ),
        })
}

/// Checks that `dir` is a folder: a missing one is [`ModelError::MissingFolder`]; a
/// symlink loop, a file or one that cannot be read is [`ModelError::BadFolder`], saying so.
fn check_folder(dir: &Path) -> Result<(), ModelError> {
    let bad = |message: String| ModelError::BadFolder {
        path: dir.to_path_buf(),
        message,
    };
    match std::fs::metadata(dir).map_err(small_file::SmallFileError::from) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(bad("is not a folder".into())),
        Err(small_file::SmallFileError::Missing) => {
            Err(ModelError::MissingFolder(dir.to_path_buf()))
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Reads and parses a JSON file of at most [`small_file::MAX_CONFIG_BYTES`] (a regular
/// file only: [`small_file::read_capped`]), naming it in every error.
/// The text encoders of a family (SD3's T5 only when the folder has it: [`ModelBundle::text_encoders`]).
fn bundle_text_encoders(kind: PipelineKind) -> &'static [&'static str] {
    match kind {
        PipelineKind::StableDiffusion => &["text_encoder"],
        _ => &["text_encoder", "text_encoder_2"],
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    read_optional_json(path)?.ok_or_else(|| ModelError::MissingFile(path.to_path_buf()))
}

/// [`read_json`], `None` when the file is not there.
fn read_optional_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, ModelError> {
    let malformed = |message: String| ModelError::Malformed {
        path: path.to_path_buf(),
        message,
    };
    let bytes = match small_file::read_capped(path, small_file::MAX_CONFIG_BYTES) {
        Ok(bytes) => bytes,
        Err(small_file::SmallFileError::Missing) => return Ok(None),
        Err(e) => return Err(malformed(e.to_string())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| malformed(e.to_string()))
}

/// A bundle that needs no folder, for unit tests of what reads bundles (64×64 SD model,
/// PNDM, VAE factor 8).
#[cfg(test)]
pub(crate) fn test_bundle() -> ModelBundle {
    ModelBundle {
        dir: PathBuf::from("/test-model"),
        kind: PipelineKind::StableDiffusion,
        scheduler_config: SchedulerConfig::default(),
        default_scheduler: Some("pndm"),
        vae_scaling_factor: 0.18215,
        vae_shift_factor: None,
        vae_scale_factor: 8,
        size_multiple: 8,
        memory: memory::MemoryProfile::new(
            &memory::UnetShape::default(),
            &memory::VaeShape::default(),
            8,
            1 << 20,
        ),
        force_zeros_for_empty_prompt: true,
        default_size: 64,
        unet_in_channels: 4,
        time_cond_proj_dim: None,
        has_vae_encoder: true,
        has_vae_decoder_fp32: false,
        preview_decoder: None,
        model_hash: None,
        flow: None,
        controlnets: Vec::new(),
        unet_residuals: 0,
        residual_shapes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_loop_folder_is_reported_as_one() {
        let tmp = tempfile::tempdir().unwrap();
        let looped = tmp.path().join("model");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let e = ModelBundle::open(&looped).unwrap_err();
        assert!(matches!(e, ModelError::BadFolder { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("symlink loop"), "{msg}");
        assert!(!msg.contains("does not exist"), "{msg}");
        let e = ModelBundle::open(&tmp.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = ModelBundle::open(&file).unwrap_err();
        assert!(e.to_string().ends_with("is not a folder"), "{e}");
    }

    #[test]
    fn transformer_folders_are_read_as_their_own_families() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx");
        let sd3 = ModelBundle::open(&root.join("tiny-sd3")).unwrap();
        assert_eq!(sd3.kind, PipelineKind::Sd3);
        assert_eq!((sd3.size_multiple, sd3.default_size), (16, 64));
        assert_eq!(sd3.default_scheduler, Some("flow-euler"));
        let facts = sd3.flow.clone().unwrap();
        assert!(facts.has_t5 && !facts.guidance_embeds);
        assert_eq!(facts.max_sequence_length, 256);
        // pos_embed_max_size 16 x patch 2 x VAE factor 8.
        assert_eq!(facts.max_side, Some(256));
        assert_eq!(sd3.text_encoders().len(), 3);
        let no_t5 = ModelBundle::open(&root.join("tiny-sd3-no-t5")).unwrap();
        assert!(!no_t5.flow.as_ref().unwrap().has_t5);
        assert_eq!(no_t5.text_encoders(), ["text_encoder", "text_encoder_2"]);
        let flux = ModelBundle::open(&root.join("tiny-flux-dev")).unwrap();
        assert_eq!(flux.kind, PipelineKind::Flux);
        let facts = flux.flow.clone().unwrap();
        assert!(facts.guidance_embeds && facts.has_t5);
        assert_eq!((facts.max_sequence_length, facts.max_side), (512, None));
        assert_eq!((flux.size_multiple, flux.default_size), (16, 1024));
        // Schnell-style (no guidance embedding): 256 T5 tokens by default.
        let schnell = ModelBundle::open(&root.join("tiny-flux")).unwrap();
        let facts = schnell.flow.clone().unwrap();
        assert!(!facts.guidance_embeds);
        assert_eq!(facts.max_sequence_length, 256);
        assert!(flux.memory.weights_bytes > 0);
        // Another family is still refused by its class.
        let tmp = tempfile::tempdir().unwrap();
        let index = r#"{"_class_name": "KandinskyV22Pipeline"}"#;
        std::fs::write(tmp.path().join("model_index.json"), index).unwrap();
        let e = ModelBundle::open(tmp.path()).unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedPipeline { .. }), "{e:?}");
    }

    #[test]
    fn a_model_index_that_is_a_device_is_refused_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("model_index.json");
        std::os::unix::fs::symlink("/dev/zero", &index).unwrap();
        let e = ModelBundle::open(tmp.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("model_index.json") && msg.contains("character device"),
            "{msg}"
        );
    }
}
