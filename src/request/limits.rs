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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_width: 2048,
            max_height: 2048,
            max_pixels: 2048 * 2048,
            max_steps: 200,
            max_images: 16,
            max_prompt_bytes: 4096,
        }
    }
}

impl Limits {
    /// No bounds: for in-process use, where the caller owns the machine.
    pub fn unbounded() -> Limits {
        Limits {
            max_width: usize::MAX,
            max_height: usize::MAX,
            max_pixels: usize::MAX,
            max_steps: usize::MAX,
            max_images: usize::MAX,
            max_prompt_bytes: usize::MAX,
        }
    }
}
