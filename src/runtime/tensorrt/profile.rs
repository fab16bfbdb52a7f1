//! TensorRT optimization profiles: the (min, opt, max) shape of every dynamic input of a
//! graph, by the role each axis plays in the pipeline, and the `[runtime.tensorrt]` values
//! that bound them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::super::settings::TensorRtSettings;
use crate::model::ModelBundle;
use crate::model::graph_inputs::{Dim, GraphInput};

/// An image side for a TensorRT optimization profile, in pixels: 8 to 16384, a multiple
/// of 8 (`runtime.tensorrt.min_size`, `opt_size`, `max_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ProfileSize(u32);

impl ProfileSize {
    /// The largest side taken.
    pub const MAX: u32 = 16384;

    /// The side in pixels.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A profile size that is not a multiple of 8 between 8 and 16384.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("image side {0} is not a multiple of 8 from 8 to 16384 pixels")]
pub struct ProfileSizeError(pub u32);

impl TryFrom<u32> for ProfileSize {
    type Error = ProfileSizeError;

    fn try_from(side: u32) -> Result<Self, Self::Error> {
        if side == 0 || !side.is_multiple_of(8) || side > Self::MAX {
            Err(ProfileSizeError(side))
        } else {
            Ok(ProfileSize(side))
        }
    }
}

impl From<ProfileSize> for u32 {
    fn from(side: ProfileSize) -> u32 {
        side.0
    }
}

/// The most images a TensorRT engine takes in one batch, 1 to 256
/// (`runtime.tensorrt.max_batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ProfileBatch(u32);

impl ProfileBatch {
    /// The largest batch taken.
    pub const MAX: u32 = 256;

    /// The number of images.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A profile batch outside 1 to 256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("batch of {0} images is not from 1 to 256")]
pub struct ProfileBatchError(pub u32);

impl TryFrom<u32> for ProfileBatch {
    type Error = ProfileBatchError;

    fn try_from(images: u32) -> Result<Self, Self::Error> {
        if images == 0 || images > Self::MAX {
            Err(ProfileBatchError(images))
        } else {
            Ok(ProfileBatch(images))
        }
    }
}

impl From<ProfileBatch> for u32 {
    fn from(images: ProfileBatch) -> u32 {
        images.0
    }
}

/// Which pipeline component a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// A CLIP text encoder (`input_ids`).
    TextEncoder,
    /// The UNet (`sample`, `timestep`, `encoder_hidden_states`, SDXL's `text_embeds` and
    /// `time_ids`, LCM's `timestep_cond`).
    Unet,
    /// The VAE encoder (`sample`, in pixels).
    VaeEncoder,
    /// The VAE decoder (`latent_sample`).
    VaeDecoder,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::TextEncoder => "text encoder",
            Component::Unet => "UNet",
            Component::VaeEncoder => "VAE encoder",
            Component::VaeDecoder => "VAE decoder",
        })
    }
}

/// What a component's graph is fed, from its model: the facts a TensorRT profile needs.
/// Build it with [`SessionShapes::new`]; pass it to [`crate::runtime::Runtime::session_for`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionShapes {
    /// The component.
    pub component: Component,
    /// The model's native image side in pixels (`ModelBundle::default_size`): the profile's
    /// optimum.
    pub native_size: usize,
    /// What image sides are multiples of (`ModelBundle::size_multiple`): the smallest side.
    pub size_multiple: usize,
    /// Pixels per latent cell (`ModelBundle::vae_scale_factor`).
    pub vae_scale_factor: usize,
    /// Tokens per text-encoder run (the tokenizer's `model_max_length`, 77 for CLIP).
    pub tokens: usize,
    /// The UNet's input channels (4; 9 for inpainting).
    pub unet_in_channels: usize,
    /// LCM-distilled UNets: the width of `timestep_cond`. Such UNets take guidance as an
    /// embedding and never run a doubled classifier-free-guidance batch.
    pub time_cond_proj_dim: Option<usize>,
}

impl SessionShapes {
    /// The shapes of `component` of `bundle`; `tokens` is the tokenizers' sequence length.
    pub fn new(component: Component, bundle: &ModelBundle, tokens: usize) -> SessionShapes {
        SessionShapes {
            component,
            native_size: bundle.default_size,
            size_multiple: bundle.size_multiple,
            vae_scale_factor: bundle.vae_scale_factor,
            tokens,
            unet_in_channels: bundle.unet_in_channels,
            time_cond_proj_dim: bundle.time_cond_proj_dim,
        }
    }

    /// Whether the UNet batch is doubled for classifier-free guidance.
    fn cfg(&self) -> bool {
        self.time_cond_proj_dim.is_none()
    }
}

/// What the daemon accepts, as far as shapes go: the `[limits]` and `[jobs]` values a
/// profile must cover. Not a config key: [`TensorRtSettings::accepting`] sets it from those
/// tables; unset, it is their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRequests {
    /// `limits.max_width`.
    pub max_width: usize,
    /// `limits.max_height`.
    pub max_height: usize,
    /// The most images in one UNet batch before classifier-free guidance doubles it: the
    /// worker batches up to `jobs.max_batch_images`, or one request's `num_images` (up to
    /// `limits.max_images`) when that is more.
    pub max_images: usize,
    /// `limits.max_prompt_chunks` (AUTOMATIC1111-syntax prompts concatenate chunks of
    /// `tokens` along the sequence axis).
    pub max_prompt_chunks: usize,
}

impl AcceptedRequests {
    /// From the daemon's `[limits]` and `jobs.max_batch_images`.
    pub fn new(limits: &crate::request::Limits, max_batch_images: usize) -> AcceptedRequests {
        AcceptedRequests {
            max_width: limits.max_width,
            max_height: limits.max_height,
            max_images: max_batch_images.max(limits.max_images),
            max_prompt_chunks: limits.max_prompt_chunks,
        }
    }
}

impl Default for AcceptedRequests {
    /// What a daemon with the default `[limits]` and `[jobs]` accepts.
    fn default() -> Self {
        AcceptedRequests::new(
            &crate::request::Limits::default(),
            crate::config::JobSettings::default().max_batch_images,
        )
    }
}

/// The bounds a profile covers: the `[runtime.tensorrt]` overrides over what the daemon
/// accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileLimits {
    /// Smallest image side in pixels (`min_size`); unset: the model's size multiple.
    pub min_size: Option<usize>,
    /// Image side to optimize for (`opt_size`); unset: the model's native size.
    pub opt_size: Option<usize>,
    /// Largest image side (`max_size`); unset: `max_width`/`max_height`, at most the
    /// model's own limit.
    pub max_size: Option<usize>,
    /// What the daemon accepts.
    pub accepted: AcceptedRequests,
    /// Most images per UNet batch before guidance doubling (`max_batch`, else
    /// `accepted.max_images`).
    pub max_images: usize,
}

impl ProfileLimits {
    /// The limits `[runtime.tensorrt]` sets.
    pub fn from_settings(t: &TensorRtSettings) -> ProfileLimits {
        let accepted = t.accepted.clone().unwrap_or_default();
        ProfileLimits {
            min_size: t.min_size.map(|s| s.get() as usize),
            opt_size: t.opt_size.map(|s| s.get() as usize),
            max_size: t.max_size.map(|s| s.get() as usize),
            max_images: t
                .max_batch
                .map_or(accepted.max_images, |b| b.get() as usize),
            accepted,
        }
    }
}

/// One input's shape range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeRange {
    /// The input's name.
    pub input: String,
    /// Smallest shape.
    pub min: Vec<i64>,
    /// Shape TensorRT picks kernels for.
    pub opt: Vec<i64>,
    /// Largest shape.
    pub max: Vec<i64>,
}

/// An optimization profile: a range for every dynamic input, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The ranges.
    pub ranges: Vec<ShapeRange>,
}

impl Profile {
    fn shapes(&self, pick: impl Fn(&ShapeRange) -> &[i64]) -> String {
        let dims = |d: &[i64]| d.iter().map(i64::to_string).collect::<Vec<_>>().join("x");
        self.ranges
            .iter()
            .map(|r| format!("{}:{}", r.input, dims(pick(r))))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `trt_profile_min_shapes`.
    pub fn min_shapes(&self) -> String {
        self.shapes(|r| &r.min)
    }

    /// `trt_profile_opt_shapes`.
    pub fn opt_shapes(&self) -> String {
        self.shapes(|r| &r.opt)
    }

    /// `trt_profile_max_shapes`.
    pub fn max_shapes(&self) -> String {
        self.shapes(|r| &r.max)
    }
}

/// Why no profile could be derived for a graph (the session is then built without one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// A dynamic input the pipeline does not feed to this component.
    #[error("input '{input}' [{dims}] is not one diffusiond feeds a {component}")]
    UnknownInput {
        /// The input.
        input: String,
        /// Its declared dims.
        dims: String,
        /// The component.
        component: Component,
    },
    /// An input whose rank is not the one the pipeline feeds.
    #[error("input '{input}' [{dims}] has rank {rank}; diffusiond feeds it rank {want}")]
    Rank {
        /// The input.
        input: String,
        /// Its declared dims.
        dims: String,
        /// Its rank.
        rank: usize,
        /// The rank fed.
        want: usize,
    },
    /// A dynamic axis whose size diffusiond cannot tell.
    #[error(
        "input '{input}' axis {axis} ('{dim}') is dynamic and its size is unknown to diffusiond"
    )]
    UnknownAxis {
        /// The input.
        input: String,
        /// The axis.
        axis: usize,
        /// The declared dimension.
        dim: String,
    },
}

/// What an axis holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Rows of the UNet batch (images, doubled for guidance).
    Rows,
    /// Rows of a text-encoder run.
    TextRows,
    /// Images (VAE).
    Images,
    LatentH,
    LatentW,
    PixelH,
    PixelW,
    /// One text-encoder run's tokens.
    Tokens,
    /// The UNet's text sequence: tokens × prompt chunks.
    Sequence,
    /// A size the model fixes.
    Fixed(i64),
    /// A size diffusiond cannot tell (a hidden width the configs do not carry).
    Unknown,
}

/// The roles of an input's axes, when the pipeline feeds it to `shapes.component`.
fn roles(shapes: &SessionShapes, input: &str, rank: usize) -> Option<Vec<Role>> {
    use Role::*;
    let v = match (shapes.component, input) {
        (Component::TextEncoder, "input_ids") => vec![TextRows, Tokens],
        (Component::Unet, "sample") => {
            vec![
                Rows,
                Fixed(shapes.unet_in_channels as i64),
                LatentH,
                LatentW,
            ]
        }
        // A rank-0 timestep has no axes; older exports take `[1]` or `[B]`.
        (Component::Unet, "timestep") if rank == 0 => vec![],
        (Component::Unet, "timestep") => vec![Rows],
        (Component::Unet, "encoder_hidden_states") => vec![Rows, Sequence, Unknown],
        (Component::Unet, "text_embeds") => vec![Rows, Unknown],
        (Component::Unet, "time_ids") => vec![Rows, Fixed(6)],
        (Component::Unet, "timestep_cond") => vec![
            Rows,
            shapes
                .time_cond_proj_dim
                .map_or(Unknown, |d| Fixed(d as i64)),
        ],
        (Component::VaeDecoder, "latent_sample") => vec![Images, Fixed(4), LatentH, LatentW],
        (Component::VaeEncoder, "sample") => vec![Images, Fixed(3), PixelH, PixelW],
        _ => return None,
    };
    Some(v)
}

/// Most images per batch and prompt chunks a profile is built for, whatever the limits
/// say (unbounded in-process limits would otherwise overflow).
const MAX_IMAGES: usize = 1024;
const MAX_CHUNKS: usize = 256;
/// A model's own size limit as a multiple of its native size: the request resolver's
/// `NATIVE_SIZE_FACTOR` (src/request/resolve.rs), which applies unless `[models.NAME]`
/// sets `max_width`/`max_height`.
const NATIVE_SIZE_FACTOR: usize = 8;
/// Largest side in pixels a profile is built for.
const MAX_SIDE: usize = 16384;

/// (min, opt, max) of a role.
type Range = (i64, i64, i64);

/// The ranges of each role for `shapes` under `limits`.
fn range(role: Role, shapes: &SessionShapes, limits: &ProfileLimits) -> Option<Range> {
    let m = shapes.size_multiple.max(1);
    let f = shapes.vae_scale_factor.max(1);
    let min_px = limits.min_size.unwrap_or(m).clamp(m, MAX_SIDE).div_ceil(m) * m;
    let model_max = shapes.native_size.saturating_mul(NATIVE_SIZE_FACTOR);
    let side = |accepted: usize| -> Range {
        let max = limits
            .max_size
            .unwrap_or(accepted.min(model_max))
            .min(MAX_SIDE);
        let max = (max / m * m).max(min_px);
        let opt = limits.opt_size.unwrap_or(shapes.native_size) / m * m;
        (min_px as i64, opt.clamp(min_px, max) as i64, max as i64)
    };
    let latent = |(a, b, c): Range| (a / f as i64, b / f as i64, c / f as i64);
    let images = limits.max_images.clamp(1, MAX_IMAGES) as i64;
    let rows = if shapes.cfg() { 2 * images } else { images };
    let tokens = shapes.tokens as i64;
    let chunks = limits.accepted.max_prompt_chunks.clamp(1, MAX_CHUNKS) as i64;
    Some(match role {
        Role::Rows => (1, if shapes.cfg() { 2 } else { 1 }, rows),
        Role::TextRows => (1, 1, 2 * images),
        Role::Images => (1, 1, images),
        Role::PixelH => side(limits.accepted.max_height),
        Role::PixelW => side(limits.accepted.max_width),
        Role::LatentH => latent(side(limits.accepted.max_height)),
        Role::LatentW => latent(side(limits.accepted.max_width)),
        Role::Tokens => (tokens, tokens, tokens),
        Role::Sequence => (tokens, tokens, tokens * chunks),
        Role::Fixed(v) => (v, v, v),
        Role::Unknown => return None,
    })
}

fn describe_dims(dims: Option<&[Dim]>) -> String {
    dims.map_or("unknown rank".to_string(), |d| {
        d.iter().map(Dim::to_string).collect::<Vec<_>>().join(", ")
    })
}

/// The optimization profile of a graph with `inputs` (initializers already left out) run
/// as `shapes.component`: `None` when no input is dynamic. Static axes keep their size.
pub fn derive_profile(
    inputs: &[GraphInput],
    shapes: &SessionShapes,
    limits: &ProfileLimits,
) -> Result<Option<Profile>, ProfileError> {
    let mut ranges = Vec::new();
    for input in inputs.iter().filter(|i| i.is_dynamic()) {
        let dims_text = describe_dims(input.dims.as_deref());
        let unknown = || ProfileError::UnknownInput {
            input: input.name.clone(),
            dims: dims_text.clone(),
            component: shapes.component,
        };
        let dims = input.dims.as_ref().ok_or_else(unknown)?;
        let roles = roles(shapes, &input.name, dims.len()).ok_or_else(unknown)?;
        if roles.len() != dims.len() {
            return Err(ProfileError::Rank {
                input: input.name.clone(),
                dims: dims_text,
                rank: dims.len(),
                want: roles.len(),
            });
        }
        let mut r = ShapeRange {
            input: input.name.clone(),
            min: Vec::new(),
            opt: Vec::new(),
            max: Vec::new(),
        };
        for (axis, (dim, &role)) in dims.iter().zip(&roles).enumerate() {
            let (lo, mid, hi) = match dim.value() {
                Some(v) => (v, v, v),
                None => range(role, shapes, limits).ok_or_else(|| ProfileError::UnknownAxis {
                    input: input.name.clone(),
                    axis,
                    dim: dim.to_string(),
                })?,
            };
            r.min.push(lo);
            r.opt.push(mid);
            r.max.push(hi);
        }
        ranges.push(r);
    }
    Ok((!ranges.is_empty()).then_some(Profile { ranges }))
}

#[cfg(test)]
#[path = "profile_tests.rs"]
mod tests;
