//! The image files a manifest names: read relative to the manifest's folder while it is
//! parsed (each file once per manifest), and read again from a stored item's canonical
//! line, checked against the hash it had when the batch was submitted.

use crate::request::{GenerateRequest, ImageInput};
use crate::wire::error::echo;

/// Image files already read while parsing one manifest (lines often share an image).
pub type ImageCache = std::collections::HashMap<std::path::PathBuf, ImageInput>;

/// An image path of a manifest line (`init_image`, `mask_image`, `controls[i].image`):
/// relative to the manifest's folder, read; `base` is `None` for a daemon batch, which
/// takes no image paths.
pub fn read_image(
    value: &serde_json::Value,
    base: Option<&std::path::Path>,
    cache: &mut ImageCache,
) -> Result<(std::path::PathBuf, ImageInput), String> {
    let serde_json::Value::String(rel) = value else {
        return Err(format!(
            "expected a path (a string), got {}",
            echo(&value.to_string())
        ));
    };
    let base = base.ok_or(
        "image paths are read by `diffusionctl batch --local` only (a daemon batch gets the manifest as bytes, without its folder)",
    )?;
    let path = std::fs::canonicalize(base.join(rel)).map_err(|e| {
        let shown = base.join(rel).display().to_string();
        format!("cannot read {}: {e}", echo(&shown))
    })?;
    if let Some(image) = cache.get(&path) {
        return Ok((path, image.clone()));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let image = ImageInput::new(bytes);
    cache.insert(path.clone(), image.clone());
    Ok((path, image))
}

/// Reads the images a stored canonical line names back into `request`, checking that each
/// file still has the hash it had when the batch was submitted.
pub fn read_stored_images(
    object: &serde_json::Map<String, serde_json::Value>,
    request: &mut GenerateRequest,
) -> Result<(), String> {
    for slot in super::manifest::IMAGE_KEYS {
        let Some(serde_json::Value::String(path)) = object.get(slot.key()) else {
            continue;
        };
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let image = ImageInput::new(bytes);
        let want = object.get(&format!("{}_sha256", slot.key()));
        if want.and_then(|w| w.as_str()) != Some(image.sha256_hex().as_str()) {
            return Err(format!(
                "{path} ({}) changed since the batch was submitted",
                slot.key()
            ));
        }
        *slot.field(request) = Some(image);
    }
    super::controls::read_stored(object, request)
}
