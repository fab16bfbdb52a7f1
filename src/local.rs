//! In-process generation for `diffusionctl generate --local`: the model folder opened,
//! its model hash computed (cached in the user's state directory), the request resolved
//! by the same step as the daemon's, the pipeline run here.

use std::path::Path;
use std::sync::Arc;

use ndarray::ArrayD;

use crate::lora::LoraCatalog;
use crate::model::ModelBundle;
use crate::pipeline::flow::TransformerPipeline;
use crate::pipeline::preview::PreviewSink;
use crate::pipeline::{Pipeline, PipelineError, image};
use crate::request::{self, GenerateRequest, Limits, ModelDefaults, ModelRef};
use crate::runtime::{Runtime, RuntimeSettings};

/// Opens `model_dir`, resolves `request` against it (no daemon limits: the caller owns
/// the machine), loads the pipeline (with the request's LoRAs, named from `loras`,
/// merged into its weights) and generates. `latents` replace the seed's draw; `preview`
/// receives the request's live previews (`preview_every`), on this thread. Returns one
/// PNG per image, with the `parameters` chunk. Bad values fail before any session loads.
pub fn generate(
    settings: RuntimeSettings,
    model_dir: &Path,
    request: &GenerateRequest,
    loras: &LoraCatalog,
    latents: Option<ArrayD<f32>>,
    preview: Option<PreviewSink>,
) -> Result<Vec<Vec<u8>>, PipelineError> {
    let hashes = crate::model::hash::HashCache::for_user();
    let bundle = Arc::new(ModelBundle::open(model_dir)?.hashed(&hashes)?);
    hashes.save();
    let name = model_dir.display().to_string();
    let model = ModelRef {
        name: &name,
        bundle: &bundle,
        defaults: &ModelDefaults::NONE,
        loras,
    };
    let resolved = request::resolve(request, model, &Limits::unbounded(), request::random_seed)?
        .with_latents(latents, &bundle)?;
    let runtime = Runtime::init(settings)?;
    let run_options = ort::session::RunOptions::new().map_err(|e| PipelineError::Inference {
        component: "runtime".into(),
        message: e.to_string(),
    })?;
    let generation = if bundle.kind.is_flow() {
        TransformerPipeline::load(&runtime, model_dir)?
            .run(&[&resolved], &run_options, &mut |_, _| true)?
            .remove(0)
    } else {
        let merged = crate::lora::prepare(model_dir, &resolved.loras)?;
        let mut pipeline = Pipeline::with_loras(&runtime, bundle.clone(), &merged)?;
        drop(merged);
        pipeline.set_preview_sink(preview);
        pipeline
            .run(&[&resolved], &run_options, &mut |_, _| true)?
            .remove(0)
    };
    let provider = crate::jobs::backend::execution_provider(&runtime);
    let provenance = request::Provenance {
        ort_version: runtime.version(),
        model_hash: bundle.short_hash(),
        execution_provider: &provider,
        loras: &generation.loras,
    };
    generation
        .images
        .iter()
        .enumerate()
        .map(|(i, img)| image::encode_png(&img.rgb, &resolved.png_parameters(&provenance, i)))
        .collect()
}

/// Reads float32 latents from a `.npy` file.
pub fn read_latents(path: &Path) -> Result<ArrayD<f32>, PipelineError> {
    let invalid = |message: String| PipelineError::InvalidArgument {
        param: "latents",
        message: format!("{}: {message}", path.display()),
    };
    let file = std::fs::File::open(path).map_err(|e| invalid(e.to_string()))?;
    ndarray_npy::ReadNpyExt::read_npy(file)
        .map_err(|e: ndarray_npy::ReadNpyError| invalid(e.to_string()))
}
