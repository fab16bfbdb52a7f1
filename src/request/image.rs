//! Images a request carries (the init image and the mask of image-to-image and
//! inpainting): their bytes as sent, their SHA-256, and their size read from the header
//! alone, so that an image over the limits is refused before anything decodes it.

use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Encoded image bytes (PNG or JPEG) as a caller sent them, shared, with their hash.
#[derive(Clone)]
pub struct ImageInput {
    bytes: Arc<[u8]>,
    sha256: [u8; 32],
}

impl ImageInput {
    /// Takes the bytes of a PNG or JPEG file.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> ImageInput {
        let bytes = bytes.into();
        let sha256 = Sha256::digest(&bytes).into();
        ImageInput { bytes, sha256 }
    }

    /// The bytes as sent.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The SHA-256 of the bytes, in hex (recorded in PNG parameters).
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 10 hex digits of the hash, as PNG parameters show it.
    pub fn short_hash(&self) -> String {
        self.sha256_hex()[..10].to_string()
    }

    /// Width and height from the header, without decoding the pixels.
    pub fn dimensions(&self) -> Result<(u32, u32), String> {
        image::ImageReader::new(std::io::Cursor::new(self.bytes()))
            .with_guessed_format()
            .map_err(|e| e.to_string())?
            .into_dimensions()
            .map_err(|e| format!("not a PNG or JPEG image diffusiond can read: {e}"))
    }
}

impl PartialEq for ImageInput {
    fn eq(&self, other: &Self) -> bool {
        self.sha256 == other.sha256
    }
}

impl std::fmt::Debug for ImageInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageInput({} bytes, sha256 {})",
            self.bytes.len(),
            self.short_hash()
        )
    }
}
