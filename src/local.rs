//! In-process generation for `diffusionctl generate --local`: load, generate, write PNGs.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;

use crate::pipeline::{GenerateParams, Pipeline, PipelineError, image};
use crate::runtime::{Runtime, RuntimeSettings};

/// Loads the model, generates, and writes `OUT.png` (or `OUT-0.png`, `OUT-1.png`, ... when
/// more than one image). A width or height of 0 means the model's native size.
/// Returns the files written.
pub fn generate_to_files(
    settings: RuntimeSettings,
    model_dir: &Path,
    mut params: GenerateParams,
    output: &Path,
) -> Result<Vec<PathBuf>, PipelineError> {
    if !model_dir.is_dir() {
        return Err(crate::model::ModelError::MissingFolder(model_dir.to_path_buf()).into());
    }
    if let Some(name) = &params.scheduler
        && !crate::scheduler::NAMES.contains(&name.as_str())
    {
        return Err(crate::scheduler::SchedulerError::Unknown(name.clone()).into());
    }
    // Cheap checks first, so a bad flag fails before models load.
    let probe = GenerateParams {
        width: params.width.max(8),
        height: params.height.max(8),
        latents: None,
        ..params.clone()
    };
    probe.validate_shape(8)?;
    let runtime = Runtime::init(settings)?;
    let mut pipeline = Pipeline::load(&runtime, model_dir)?;
    let native = pipeline.bundle().default_size;
    if params.width == 0 {
        params.width = native;
    }
    if params.height == 0 {
        params.height = native;
    }
    let result = pipeline.generate(&params, &mut |_, _| true)?;
    let model = model_dir.display().to_string();
    let text = params.png_parameters(result.scheduler, &model, pipeline.ort_version());
    let paths = output_paths(output, result.images.len());
    for (img, path) in result.images.iter().zip(&paths) {
        image::write_file(path, &image::encode_png(&img.rgb, &text)?)?;
    }
    Ok(paths)
}

/// `OUT.png` for one image; `OUT-0.png`, `OUT-1.png`, ... for several.
pub fn output_paths(output: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let ext = output
        .extension()
        .map_or_else(|| "png".into(), |s| s.to_string_lossy().into_owned());
    (0..n)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
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

/// A seed from the clock and process id, for requests that give none.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 32)) & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_images_get_numbered_names() {
        assert_eq!(
            output_paths(Path::new("/t/out.png"), 1),
            vec![PathBuf::from("/t/out.png")]
        );
        assert_eq!(
            output_paths(Path::new("/t/out.png"), 2),
            vec![PathBuf::from("/t/out-0.png"), PathBuf::from("/t/out-1.png")]
        );
    }
}
