//! From decoded VAE output to pixels and PNG files, exactly as diffusers does it.

use std::io::Write;

use ndarray::{Array3, ArrayViewD, Axis};

use super::PipelineError;

/// One generated image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// `[H, W, 3]` floats in [0, 1]: diffusers' `output_type="np"`.
    pub float: Array3<f32>,
    /// `[H, W, 3]` bytes: `(float * 255).round()` as numpy rounds (half to even).
    pub rgb: Array3<u8>,
}

/// VAE output `[B,3,H,W]` in [-1,1] → images, via diffusers' `VaeImageProcessor.postprocess`:
/// `(x / 2 + 0.5).clamp(0, 1)`, NCHW → NHWC, then `numpy_to_pil`'s `(x * 255).round()`.
pub fn postprocess(decoded: ArrayViewD<'_, f32>) -> Vec<GeneratedImage> {
    decoded
        .axis_iter(Axis(0))
        .map(|chw| {
            let hwc = chw.permuted_axes(vec![1, 2, 0]);
            let float = hwc
                .mapv(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
                .into_dimensionality()
                .unwrap_or_else(|_| Array3::zeros((0, 0, 3)));
            let rgb = float.mapv(|x| (x * 255.0).round_ties_even() as u8);
            GeneratedImage { float, rgb }
        })
        .collect()
}

/// Encodes RGB8 pixels as PNG with a `parameters` text chunk (the generation settings).
pub fn encode_png(rgb: &Array3<u8>, parameters: &str) -> Result<Vec<u8>, PipelineError> {
    let (h, w, _) = rgb.dim();
    let to_err = |e: png::EncodingError| PipelineError::Image(e.to_string());
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, w as u32, h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .add_itxt_chunk("parameters".to_string(), parameters.to_string())
            .map_err(to_err)?;
        let mut writer = encoder.write_header().map_err(to_err)?;
        let data = rgb.as_standard_layout();
        writer
            .write_image_data(data.as_slice().unwrap_or(&[]))
            .map_err(to_err)?;
        writer.finish().map_err(to_err)?;
    }
    Ok(bytes)
}

/// Writes PNG bytes to a file.
pub fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), PipelineError> {
    let mut f = std::fs::File::create(path)
        .map_err(|e| PipelineError::Image(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| PipelineError::Image(format!("{}: {e}", path.display())))
}
