//! A model folder's ControlNets: `controlnet/NAME/model.onnx` (with its diffusers
//! `config.json`) per ControlNet, and whether the folder's UNet takes their residuals.
//!
//! The layout is the one `scripts/export-model --controlnet` writes (docs/controlnet.md):
//! the UNet keeps Optimum's inputs and adds `down_block_additional_residual_0` …
//! `down_block_additional_residual_{N-1}` and `mid_block_additional_residual` (the
//! residuals diffusers' `UNet2DConditionModel` adds to its skip connections and its mid
//! block); each ControlNet graph returns `down_block_res_sample_0` …
//! `down_block_res_sample_{N-1}` and `mid_block_res_sample`. A plain request feeds the
//! UNet zeros there (adding zeros is exact), so one UNet serves any number of
//! ControlNets and plain requests alike.

use std::path::{Path, PathBuf};

use super::ModelError;
use super::graph_inputs;

/// The UNet input that takes down-block residual `i`.
pub fn down_input(i: usize) -> String {
    format!("down_block_additional_residual_{i}")
}

/// The UNet input that takes the mid-block residual.
pub const MID_INPUT: &str = "mid_block_additional_residual";

/// The ControlNet output that gives down-block residual `i`.
pub fn down_output(i: usize) -> String {
    format!("down_block_res_sample_{i}")
}

/// The ControlNet output that gives the mid-block residual.
pub const MID_OUTPUT: &str = "mid_block_res_sample";

/// Folder of the ControlNets inside a model folder.
pub const DIR: &str = "controlnet";

/// Most ControlNets a folder may list (a folder with more is refused as malformed).
const MAX_CONTROLNETS: usize = 64;

/// One ControlNet of a model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetInfo {
    /// Its name: the folder's name under `controlnet/`.
    pub name: String,
    /// Its folder (with `model.onnx` and `config.json`).
    pub dir: PathBuf,
}

impl ControlNetInfo {
    /// Its graph.
    pub fn onnx(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }
}

/// Whether `name` may name a ControlNet (a plain folder name: letters, digits, `_`, `-`,
/// `.`, not starting with a dot).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The ControlNets of the model folder `dir`, sorted by name: every `controlnet/NAME/`
/// with a `model.onnx`. Folders with other names or without a graph are skipped.
pub fn list(dir: &Path) -> Result<Vec<ControlNetInfo>, ModelError> {
    let root = dir.join(DIR);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let sub = entry.path();
        if !valid_name(&name) || !sub.join("model.onnx").is_file() {
            continue;
        }
        found.push(ControlNetInfo { name, dir: sub });
        if found.len() > MAX_CONTROLNETS {
            return Err(ModelError::Malformed {
                path: root,
                message: format!("more than {MAX_CONTROLNETS} ControlNets"),
            });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// How many down-block residuals the UNet graph at `unet` takes (its
/// `down_block_additional_residual_{i}` inputs, numbered from 0 without gaps, and the mid
/// block's), or 0 for a UNet without ControlNet inputs.
pub fn unet_residuals(unet: &Path) -> Result<usize, ModelError> {
    let info = graph_inputs::read(unet).map_err(|e| ModelError::Malformed {
        path: unet.to_path_buf(),
        message: e.message,
    })?;
    let downs = info
        .inputs
        .iter()
        .filter(|i| i.name.starts_with("down_block_additional_residual_"))
        .count();
    let mid = info.input(MID_INPUT).is_some();
    let numbered = (0..downs).all(|i| info.input(&down_input(i)).is_some());
    match (downs, mid) {
        (0, false) => Ok(0),
        (n, true) if n > 0 && numbered => Ok(n),
        _ => Err(ModelError::Signature {
            path: unet.to_path_buf(),
            message: format!(
                "the UNet has {downs} down_block_additional_residual_* inputs{} and {} \
                 {MID_INPUT}: a ControlNet-ready UNet has inputs numbered from 0 and the mid \
                 block's (export it with scripts/export-model --controlnet)",
                if numbered { "" } else { " not numbered 0.." },
                if mid { "an" } else { "no" }
            ),
        }),
    }
}

/// The shape of one residual relative to the latents: `[batch, channels, h / factor,
/// w / factor]` for latents of `h` × `w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidualShape {
    /// Its channels.
    pub channels: usize,
    /// How much smaller than the latents it is on each side.
    pub factor: usize,
}

impl ResidualShape {
    /// Its dimensions for a UNet batch of `rows` latents of `h` × `w`.
    pub fn dims(&self, rows: usize, h: usize, w: usize) -> [usize; 4] {
        [rows, self.channels, h / self.factor, w / self.factor]
    }
}

/// What the residual shapes are computed from (`unet/config.json`).
#[derive(Debug, serde::Deserialize)]
struct UnetLevels {
    block_out_channels: Vec<usize>,
    #[serde(default)]
    layers_per_block: Option<super::memory::IntOrList>,
}

/// The shapes of the UNet's residuals as diffusers' `UNet2DConditionModel` collects its
/// `down_block_res_samples`: `conv_in`'s output, then per down block one per resnet and,
/// but for the last block, one after its downsampler; then the mid block's output.
pub fn residual_shapes(unet_config: &Path) -> Result<Vec<ResidualShape>, ModelError> {
    let levels: UnetLevels = super::read_json(unet_config)?;
    let malformed = |message: String| ModelError::Malformed {
        path: unet_config.to_path_buf(),
        message,
    };
    let blocks = &levels.block_out_channels;
    if blocks.is_empty() || blocks.len() > 8 {
        return Err(malformed(format!(
            "block_out_channels has {} entries",
            blocks.len()
        )));
    }
    let layers = |b: usize| -> usize {
        match &levels.layers_per_block {
            None => 2,
            Some(super::memory::IntOrList::One(n)) => *n as usize,
            Some(super::memory::IntOrList::PerLevel(v)) => v.get(b).copied().unwrap_or(2) as usize,
        }
    };
    let mut shapes = vec![ResidualShape {
        channels: blocks[0],
        factor: 1,
    }];
    let mut factor = 1;
    for (b, &channels) in blocks.iter().enumerate() {
        let n = layers(b);
        if n > 16 {
            return Err(malformed(format!("layers_per_block {n} at level {b}")));
        }
        shapes.extend((0..n).map(|_| ResidualShape { channels, factor }));
        if b + 1 < blocks.len() {
            factor *= 2;
            shapes.push(ResidualShape { channels, factor });
        }
    }
    shapes.push(ResidualShape {
        channels: blocks[blocks.len() - 1],
        factor,
    });
    Ok(shapes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("canny"));
        assert!(valid_name("sd15_depth-v1.1"));
        assert!(!valid_name(""));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert_eq!(down_input(3), "down_block_additional_residual_3");
        assert_eq!(down_output(0), "down_block_res_sample_0");
    }

    #[test]
    fn residual_shapes_follow_the_unet_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // tiny-sd15: channels [32, 64], one layer per block: conv_in, resnet, downsample,
        // resnet, then the mid block.
        let shapes = residual_shapes(&root.join("onnx/tiny-sd15/unet/config.json")).unwrap();
        let got: Vec<(usize, usize)> = shapes.iter().map(|s| (s.channels, s.factor)).collect();
        assert_eq!(got, [(32, 1), (32, 1), (32, 2), (64, 2), (64, 2)]);
    }

    #[test]
    fn stock_unets_take_no_residuals() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for m in ["tiny-sd15", "tiny-sdxl"] {
            let unet = root.join("onnx").join(m).join("unet/model.onnx");
            assert_eq!(unet_residuals(&unet).unwrap(), 0, "{m}");
            assert!(list(&root.join("onnx").join(m)).unwrap().is_empty());
        }
    }
}
