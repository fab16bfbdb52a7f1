//! ControlNet-ready model folders for the tests: a copy of a committed fixture
//! (`onnx/tiny-sd15`, ...) with what `scripts/export-model --controlnet` changed in it
//! (`onnx/tiny-controlnet/<fixture>/`: the UNet with residual inputs and the ControlNets)
//! copied over it, as `onnx/make_controlnet_references.py` checked the rest is the same.

use std::path::Path;

/// A temporary ControlNet-ready copy of `onnx/<fixture>`.
pub fn ready_model(fixture: &str) -> tempfile::TempDir {
    let root = super::root();
    let dir = tempfile::Builder::new()
        .prefix("diffusiond-controlnet-")
        .tempdir()
        .unwrap();
    super::copy_dir(&root.join("onnx").join(fixture), dir.path());
    let overlay = root.join("onnx/tiny-controlnet").join(fixture);
    assert!(
        overlay.join("unet/model.onnx").is_file(),
        "{}: missing (onnx/make_controlnet_references.py writes it)",
        overlay.display()
    );
    super::copy_dir(&overlay, dir.path());
    dir
}

/// A control image's bytes from the ControlNet goldens (`tests/golden/controlnet/…`).
pub fn control_image(relative: &str) -> Vec<u8> {
    let path = super::root().join("tests/golden/controlnet").join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `dir` is a ControlNet-ready folder (for messages).
pub fn is_ready(dir: &Path) -> bool {
    dir.join("controlnet").is_dir()
}
