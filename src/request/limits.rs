//! Upper bounds a daemon holds requests to (`[limits]` in the config).

/// Upper bounds a daemon enforces on requests.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Widest image.
    pub max_width: usize,
    /// Tallest image.
    pub max_height: usize,
    /// Most pixels per image (width × height).
    pub max_pixels: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Most images per request.
    pub max_images: usize,
    /// Longest prompt, in bytes.
    pub max_prompt_bytes: usize,
    /// Largest guidance scale, in absolute value: far beyond any useful value, a scale only
    /// turns the image into garbage.
    pub max_guidance_scale: f64,
    /// Bytes a request's estimated peak (model resident plus working set) may reach.
    /// Unset in the config: derived when the daemon starts from its cgroup's memory limit,
    /// else the memory available then, less a tenth. 0: no memory check.
    pub memory_budget: Option<u64>,
    /// Most items (manifest lines) in one batch. A batch is one entry in the queue,
    /// whatever its size: only a window of its items is in the engine at once.
    pub max_batch_items: usize,
    /// Most unfinished batches one caller (Unix user) may have.
    pub max_batches_per_caller: usize,
    /// Most batches one caller may keep stored in the daemon, ended ones included (they
    /// go after `jobs.batch_retention_secs` / `jobs.unfetched_batch_retention_secs`, or
    /// on `Remove`).
    pub max_stored_batches_per_caller: usize,
    /// Most bytes one caller's stored batches may take in the state directory (images
    /// plus their rows in the database): past it no batch is accepted, and a running one
    /// pauses after its current items.
    pub max_stored_bytes_per_caller: u64,
    /// Most 75-token chunks an AUTOMATIC1111-syntax prompt (or its negative) may take on
    /// any text encoder: each chunk lengthens the text conditioning every UNet step
    /// attends to.
    pub max_prompt_chunks: usize,
    /// Largest init image or mask, in encoded bytes (the pixel size is held to
    /// `max_width`, `max_height` and `max_pixels`, read from the header).
    pub max_image_bytes: usize,
    /// Most LoRAs one request may apply at once.
    pub max_loras: usize,
    /// Largest LoRA scale, in absolute value: past a few, a LoRA only breaks the image.
    pub max_lora_scale: f64,
}

/// Most ControlNets one request may use (`controls`): each runs every step beside the
/// UNet. The wire reads no image of a longer list; the resolve step refuses it too.
pub const MAX_CONTROLS: usize = 4;

/// The default bound on a LoRA's scale.
pub const DEFAULT_MAX_LORA_SCALE: f64 = 4.0;

/// The default bound on `guidance_scale` (useful values are about 1 to 30).
pub const DEFAULT_MAX_GUIDANCE_SCALE: f64 = 100.0;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_width: 2048,
            max_height: 2048,
            max_pixels: 2048 * 2048,
            max_steps: 200,
            max_images: 16,
            max_prompt_bytes: 4096,
            max_guidance_scale: DEFAULT_MAX_GUIDANCE_SCALE,
            memory_budget: None,
            max_batch_items: 100_000,
            max_batches_per_caller: 4,
            max_stored_batches_per_caller: 32,
            max_stored_bytes_per_caller: 8 << 30,
            max_prompt_chunks: 8,
            max_image_bytes: 32 << 20,
            max_loras: 8,
            max_lora_scale: DEFAULT_MAX_LORA_SCALE,
        }
    }
}

impl Limits {
    /// No bounds on sizes, steps, images or prompts: for in-process use, where the caller
    /// owns the machine. The guidance and LoRA scale bounds stay (past them there are only
    /// garbage images).
    pub fn unbounded() -> Limits {
        Limits {
            max_width: usize::MAX,
            max_height: usize::MAX,
            max_pixels: usize::MAX,
            max_steps: usize::MAX,
            max_images: usize::MAX,
            max_prompt_bytes: usize::MAX,
            max_guidance_scale: DEFAULT_MAX_GUIDANCE_SCALE,
            memory_budget: None,
            max_batch_items: usize::MAX,
            max_batches_per_caller: usize::MAX,
            max_stored_batches_per_caller: usize::MAX,
            max_stored_bytes_per_caller: u64::MAX,
            max_prompt_chunks: usize::MAX,
            max_image_bytes: usize::MAX,
            max_loras: usize::MAX,
            max_lora_scale: DEFAULT_MAX_LORA_SCALE,
        }
    }
}

impl Limits {
    /// The memory budget in force: `None` when there is none (unset, or 0).
    pub fn budget(&self) -> Option<u64> {
        self.memory_budget.filter(|&b| b > 0)
    }
}
