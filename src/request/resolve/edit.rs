//! The edit part of the resolve step: an image-to-image or inpainting request's init
//! image and mask (sizes read from their headers), its strength and its default, and what
//! the model can do.

use super::{
    Edit, GenerateRequest, ImageInput, Limits, ModelBundle, RequestError, defaults, short_float,
};
use crate::model::PipelineKind;

/// An edit and the output size its init image gives.
pub(super) type EditAndSize = (Edit, (usize, usize));

/// The edit part of a request: the init image's size from its header (rounded down to
/// the VAE factor), the mask's size against it, the strength and its default, and what
/// the model can do. `None` for text to image (which a 9-channel inpainting UNet refuses).
pub(super) fn resolve_edit(
    req: &GenerateRequest,
    bundle: &ModelBundle,
    limits: &Limits,
) -> Result<Option<EditAndSize>, RequestError> {
    fn invalid(key: &'static str, message: impl Into<String>) -> RequestError {
        RequestError::invalid(key, message)
    }
    let Some(init) = &req.init_image else {
        if req.mask_image.is_some() {
            return Err(invalid(
                "mask_image",
                "needs init_image: the mask says which part of the init image to repaint",
            ));
        }
        if req.strength.is_some() {
            return Err(invalid("strength", "applies only with init_image"));
        }
        if bundle.unet_in_channels == 9 {
            return Err(invalid(
                "init_image",
                "this model is an inpainting model (9-channel UNet): give init_image and mask_image",
            ));
        }
        return Ok(None);
    };
    for key in ["width", "height"] {
        let given = if key == "width" {
            req.width
        } else {
            req.height
        };
        if given.is_some() {
            return Err(invalid(
                key,
                "the size comes from init_image (rounded down to a multiple of 8); leave width and height out",
            ));
        }
    }
    if !bundle.has_vae_encoder {
        return Err(invalid(
            "init_image",
            format!(
                "the model folder {} has no vae_encoder/model.onnx, which image-to-image needs",
                bundle.dir.display()
            ),
        ));
    }
    let header = |key: &'static str, image: &ImageInput| -> Result<(usize, usize), RequestError> {
        if image.bytes().len() > limits.max_image_bytes {
            return Err(invalid(
                key,
                format!(
                    "{} bytes is above the limit of {}",
                    image.bytes().len(),
                    limits.max_image_bytes
                ),
            ));
        }
        let (w, h) = image.dimensions().map_err(|e| invalid(key, e))?;
        let (w, h) = (w as usize, h as usize);
        // The size from the header alone: the caller checks it against the limits
        // before anything decodes the pixels.
        Ok((w, h))
    };
    let (w, h) = header("init_image", init)?;
    if let Some(mask) = &req.mask_image {
        let (mw, mh) = header("mask_image", mask)?;
        if (mw, mh) != (w, h) {
            return Err(invalid(
                "mask_image",
                format!("is {mw}x{mh} but init_image is {w}x{h}; they must be the same size"),
            ));
        }
    } else if bundle.unet_in_channels == 9 {
        return Err(invalid(
            "mask_image",
            "this model is an inpainting model (9-channel UNet): give a mask_image with init_image",
        ));
    }
    // The transformer families' patches need their own multiple (16).
    let f = if bundle.kind.is_flow() {
        bundle.size_multiple
    } else {
        bundle.vae_scale_factor
    };
    let (rw, rh) = (w - w % f, h - h % f);
    if rw == 0 || rh == 0 {
        return Err(invalid(
            "init_image",
            format!("{w}x{h} is smaller than {f} pixels on a side"),
        ));
    }
    let strength = match req.strength {
        Some(s) => s,
        // diffusers' SD3 image-to-image and inpainting pipelines both default to 0.6.
        None if bundle.kind == PipelineKind::Sd3 => defaults::SD3_EDIT_STRENGTH,
        None if req.mask_image.is_some() => defaults::INPAINT_STRENGTH,
        None if bundle.kind == PipelineKind::StableDiffusionXl => defaults::SDXL_IMG2IMG_STRENGTH,
        None => defaults::IMG2IMG_STRENGTH,
    };
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(invalid(
            "strength",
            format!("{} is not in (0, 1]", short_float(strength)),
        ));
    }
    Ok(Some((
        Edit {
            init: init.clone(),
            mask: req.mask_image.clone(),
            strength,
        },
        (rw, rh),
    )))
}
