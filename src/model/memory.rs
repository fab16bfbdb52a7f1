//! Peak memory of a generation, estimated from the model's configs before it runs, so the
//! daemon can refuse what would not fit instead of being killed by the kernel.
//!
//! ONNX Runtime's CPU attention holds each head's `tokens × tokens` scores and their
//! softmax at once, so the peak grows with the square of the latent token count: a 25 MB
//! model needs 2.4 GB at 512×512. The estimate is the largest of
//!
//! * UNet attention: `ATTENTION_COPIES × rows × heads × tokens² × 4` bytes at the level
//!   with attention that has the most (rows: images, doubled by classifier-free guidance;
//!   tokens: latent cells at that level);
//! * the VAE decoder: its mid-block attention at latent resolution (one head, per image)
//!   and its widest feature maps at full resolution;
//!
//! plus feature maps and the model's resident size (its weights on disk, plus what ONNX
//! Runtime and the process need). docs/memory.md compares it with measured peaks.

use std::path::Path;

use serde::Deserialize;

/// A batch whose working set is over this many bytes hands its memory back when it ends
/// (ONNX Runtime's arena shrunk, then `malloc_trim`); smaller ones keep it for the next.
pub const RELEASE_ABOVE: u64 = 64 << 20;

/// How many `tokens × tokens` float tensors per head are alive at the attention peak
/// (scores and softmax, plus the allocator's slack): fitted to measured peaks (2.15–2.5).
const ATTENTION_COPIES: f64 = 2.5;
/// How many feature maps of the widest level are alive at once (input, normalised,
/// convolved, residual, and the allocator's slack).
const FEATURE_MAPS: f64 = 6.0;
/// The daemon besides the model's weights and a batch's working set: ONNX Runtime, the
/// bus connection, the worker and async threads' heaps and the sessions' small buffers.
/// Measured on the daemon (`VmHWM`) at up to 111 MiB at small sizes, where the working set
/// is a few MiB (docs/memory.md); `diffusionctl generate --local` needs 55–65 MiB.
pub const PROCESS_BYTES: u64 = 128 << 20;

/// What the estimate needs from `unet/config.json`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UnetShape {
    #[serde(default)]
    down_block_types: Option<Vec<String>>,
    #[serde(default)]
    mid_block_type: Option<String>,
    #[serde(default)]
    block_out_channels: Option<Vec<u64>>,
    /// diffusers reads this as the head count when `num_attention_heads` is absent.
    #[serde(default)]
    attention_head_dim: Option<IntOrList>,
    #[serde(default)]
    num_attention_heads: Option<IntOrList>,
}

/// What the estimate needs from `vae_decoder/config.json`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct VaeShape {
    #[serde(default)]
    block_out_channels: Option<Vec<u64>>,
    #[serde(default)]
    mid_block_add_attention: Option<bool>,
}

/// A config value that is one number for every level, or one per level.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum IntOrList {
    One(u64),
    PerLevel(Vec<u64>),
}

impl IntOrList {
    fn at(&self, level: usize) -> u64 {
        match self {
            IntOrList::One(n) => *n,
            IntOrList::PerLevel(v) => v.get(level).or(v.last()).copied().unwrap_or(8),
        }
    }
}

/// A model's memory figures, derived once when its folder is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryProfile {
    /// Bytes of the graphs' weights on disk: what the loaded model keeps resident.
    pub weights_bytes: u64,
    /// Per UNet level, from full latent resolution down: channels, and attention heads
    /// when the level has attention.
    unet_levels: Vec<(u64, Option<u64>)>,
    /// VAE decoder channels from full resolution down, and whether its mid block attends.
    vae_channels: Vec<u64>,
    vae_mid_attention: bool,
    vae_factor: u64,
}

impl MemoryProfile {
    pub(crate) fn new(
        unet: &UnetShape,
        vae: &VaeShape,
        vae_factor: usize,
        weights_bytes: u64,
    ) -> MemoryProfile {
        let channels = unet
            .block_out_channels
            .clone()
            .unwrap_or_else(|| vec![320, 640, 1280, 1280]);
        let heads = unet
            .num_attention_heads
            .clone()
            .or_else(|| unet.attention_head_dim.clone())
            .unwrap_or(IntOrList::One(8));
        let down = unet.down_block_types.clone().unwrap_or_default();
        let mid_attends = unet
            .mid_block_type
            .as_deref()
            .is_none_or(|t| t.contains("CrossAttn"));
        let levels = channels.len().max(1);
        let unet_levels = (0..levels)
            .map(|l| {
                let attends = down.get(l).is_some_and(|t| t.contains("Attn"))
                    || (l + 1 == levels && mid_attends);
                (
                    channels.get(l).copied().unwrap_or(320),
                    attends.then(|| heads.at(l)),
                )
            })
            .collect();
        MemoryProfile {
            weights_bytes,
            unet_levels,
            vae_channels: vae
                .block_out_channels
                .clone()
                .unwrap_or_else(|| vec![128, 256, 512, 512]),
            vae_mid_attention: vae.mid_block_add_attention.unwrap_or(true),
            vae_factor: vae_factor as u64,
        }
    }

    /// The figures of a transformer (flow) model: its joint attention as one level of
    /// `inner` channels and `heads` heads over the image's tokens (`packing` x `packing`
    /// latent cells each; the text tokens it attends to as well are left out), and its VAE.
    pub(crate) fn transformer(
        inner: u64,
        heads: u64,
        packing: u64,
        vae: &VaeShape,
        vae_factor: usize,
        weights_bytes: u64,
    ) -> MemoryProfile {
        // Level l of the estimate holds tokens / 4^l: a 2x2 packing is level 1.
        let levels = packing.max(1).ilog2() as usize;
        let mut unet_levels = vec![(0, None); levels];
        unet_levels.push((inner, Some(heads)));
        MemoryProfile {
            weights_bytes,
            unet_levels,
            vae_channels: vae
                .block_out_channels
                .clone()
                .unwrap_or_else(|| vec![128, 256, 512, 512]),
            vae_mid_attention: vae.mid_block_add_attention.unwrap_or(true),
            vae_factor: vae_factor as u64,
        }
    }

    /// What the process needs resident with this model loaded and idle.
    pub fn baseline(&self) -> u64 {
        PROCESS_BYTES.saturating_add(self.weights_bytes)
    }

    /// The peak, in bytes, of one batch of `images` images at `width × height`, with
    /// classifier-free guidance or without, on top of [`MemoryProfile::baseline`].
    pub fn working_set(&self, width: usize, height: usize, images: usize, cfg: bool) -> u64 {
        let f = self.vae_factor.max(1) as f64;
        let tokens = (width as f64 / f) * (height as f64 / f);
        let images = images as f64;
        let rows = images * if cfg { 2.0 } else { 1.0 };
        let mut unet_attention: f64 = 0.0;
        let mut unet_maps: f64 = 0.0;
        for (l, &(channels, heads)) in self.unet_levels.iter().enumerate() {
            let t = tokens / 4f64.powi(l as i32);
            if let Some(heads) = heads {
                unet_attention =
                    unet_attention.max(ATTENTION_COPIES * rows * heads as f64 * t * t * 4.0);
            }
            unet_maps = unet_maps.max(FEATURE_MAPS * rows * channels as f64 * t * 4.0);
        }
        let vae_attention = if self.vae_mid_attention {
            ATTENTION_COPIES * images * tokens * tokens * 4.0
        } else {
            0.0
        };
        // Decoder level l (0 = full resolution) has the channels of block l.
        let pixels = tokens * f * f;
        let vae_maps = self
            .vae_channels
            .iter()
            .enumerate()
            .map(|(l, &c)| FEATURE_MAPS * images * c as f64 * pixels / 4f64.powi(l as i32) * 4.0)
            .fold(0.0, f64::max);
        let peak = (unet_attention + unet_maps).max(vae_attention + vae_maps);
        if peak >= u64::MAX as f64 {
            u64::MAX
        } else {
            peak as u64
        }
    }

    /// [`MemoryProfile::baseline`] plus [`MemoryProfile::working_set`].
    pub fn peak(&self, width: usize, height: usize, images: usize, cfg: bool) -> u64 {
        self.baseline()
            .saturating_add(self.working_set(width, height, images, cfg))
    }

    /// The largest square side, a multiple of `multiple`, whose peak fits `budget` for
    /// `images` images; `None` when not even the smallest fits.
    pub fn largest_square(
        &self,
        budget: u64,
        images: usize,
        cfg: bool,
        multiple: usize,
    ) -> Option<usize> {
        let mut best = None;
        let mut side = multiple.max(1);
        while side <= 16384 && self.peak(side, side, images, cfg) <= budget {
            best = Some(side);
            side += multiple.max(1);
        }
        best
    }
}

/// Bytes of a folder's graphs and their external data (`*.onnx`, `*.onnx_data`, `*.data`).
pub(crate) fn weights_on_disk(dir: &Path, components: &[&str]) -> u64 {
    components
        .iter()
        .filter_map(|c| std::fs::read_dir(dir.join(c)).ok())
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.ends_with(".onnx") || name.ends_with(".onnx_data") || name.ends_with(".data")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The memory a daemon may plan with: the cgroup's limit (cgroup v2 `memory.max`, or v1
/// `memory.limit_in_bytes`) when it has one, else the memory available at start, less a
/// tenth for everything else. Inputs are the files' contents, gathered by the caller.
pub fn derive_budget(cgroup_limit: Option<&str>, meminfo: Option<&str>) -> Option<u64> {
    let limit = cgroup_limit
        .map(str::trim)
        .and_then(|s| s.parse::<u64>().ok())
        // cgroup v1 writes "no limit" as a number near 2^63.
        .filter(|&n| n < 1 << 60);
    let available = || {
        meminfo?.lines().find_map(|l| {
            let kb = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
            kb.trim().parse::<u64>().ok().map(|k| k * 1024)
        })
    };
    limit.or_else(available).map(|b| b / 10 * 9)
}

/// This process's cgroup memory limit file's contents (v2, then v1), if any.
pub fn read_cgroup_limit() -> Option<String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(file) {
            return Some(text);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_demo() -> MemoryProfile {
        let unet: UnetShape = serde_json::from_str(
            r#"{"down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [32, 64],
                "attention_head_dim": 8}"#,
        )
        .unwrap();
        let vae: VaeShape = serde_json::from_str(
            r#"{"block_out_channels": [16, 32, 64, 64], "mid_block_add_attention": false}"#,
        )
        .unwrap();
        MemoryProfile::new(&unet, &vae, 8, 25 << 20)
    }

    #[test]
    fn attention_grows_with_the_square_of_the_tokens() {
        let m = tiny_demo();
        // 512²: 4096 tokens, 2 rows x 8 heads x 4096² floats x 2.5 copies = 2.5 GiB, plus
        // 6 maps x 2 rows x 32 channels x 4096 floats = 6 MiB.
        let w = m.working_set(512, 512, 1, true);
        assert_eq!(w / (1 << 20), 2560 + 6, "{w}");
        assert!(m.working_set(1024, 1024, 1, true) > 15 * w);
        assert!(m.working_set(512, 512, 1, false) < w / 2 + (8 << 20));
        assert!(m.working_set(512, 512, 2, true) > 2 * w - (8 << 20));
    }

    #[test]
    fn the_largest_square_that_fits() {
        let m = tiny_demo();
        let budget = m.peak(384, 384, 1, true);
        assert_eq!(m.largest_square(budget, 1, true, 16), Some(384));
        assert_eq!(m.largest_square(budget - 1, 1, true, 16), Some(368));
        assert_eq!(m.largest_square(1, 1, true, 16), None);
    }

    #[test]
    fn the_budget_comes_from_the_cgroup_else_available_memory() {
        let meminfo = "MemTotal: 24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(
            derive_budget(Some("4294967296\n"), Some(meminfo)),
            Some(4294967296 / 10 * 9)
        );
        assert_eq!(
            derive_budget(Some("max\n"), Some(meminfo)),
            Some(20000000 * 1024 / 10 * 9)
        );
        assert_eq!(
            derive_budget(Some("9223372036854771712"), Some(meminfo)),
            Some(20000000 * 1024 / 10 * 9)
        );
        assert_eq!(derive_budget(None, None), None);
    }
}
