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
        header_dimensions(self.bytes())
    }
}

/// Width and height of PNG or JPEG bytes, read from the image header alone: a PNG's
/// `IHDR` (always the first chunk), a JPEG's first frame header (`SOFn`), walking the
/// segments before it by their lengths. Nothing is decompressed: ancillary chunks (an
/// `iCCP` profile, text) are never looked at, so no bomb in them costs memory here.
///
/// Written by hand because the `image` crate's `into_dimensions` reads (and inflates)
/// every PNG chunk before the first `IDAT`.
pub fn header_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    let bad = |what: &str| format!("not a PNG or JPEG image diffusiond can read: {what}");
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if let Some(rest) = bytes.strip_prefix(PNG) {
        if rest.len() < 8 + 13 || &rest[4..8] != b"IHDR" || be32(&rest[..4]) != 13 {
            return Err(bad("the PNG does not start with its IHDR header"));
        }
        let (w, h) = (be32(&rest[8..12]), be32(&rest[12..16]));
        if w == 0 || h == 0 || w > i32::MAX as u32 || h > i32::MAX as u32 {
            return Err(bad("the PNG header gives an impossible size"));
        }
        return Ok((w, h));
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut i = 2;
        loop {
            // Markers may be preceded by fill bytes (0xFF).
            while bytes.get(i) == Some(&0xFF) && bytes.get(i + 1) == Some(&0xFF) {
                i += 1;
            }
            let (Some(&0xFF), Some(&marker)) = (bytes.get(i), bytes.get(i + 1)) else {
                return Err(bad("no JPEG frame header before the data ends"));
            };
            i += 2;
            // Markers without a length: TEM, RSTn, SOI.
            if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
                continue;
            }
            if marker == 0xD9 || marker == 0xDA {
                return Err(bad("no JPEG frame header before the scan data"));
            }
            let Some(len) = bytes.get(i..i + 2) else {
                return Err(bad("a JPEG segment is cut short"));
            };
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            // SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC).
            if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
                let Some(sof) = bytes.get(i..i + 7) else {
                    return Err(bad("the JPEG frame header is cut short"));
                };
                let h = u32::from(u16::from_be_bytes([sof[3], sof[4]]));
                let w = u32::from(u16::from_be_bytes([sof[5], sof[6]]));
                if w == 0 || h == 0 {
                    return Err(bad("the JPEG frame header gives no size"));
                }
                return Ok((w, h));
            }
            if len < 2 {
                return Err(bad("a JPEG segment has an impossible length"));
            }
            i += len;
        }
    }
    Err(bad("neither a PNG nor a JPEG signature"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(format: image::ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn header_sizes_agree_with_the_image_crate() {
        for (w, h) in [(1, 1), (64, 48), (333, 17)] {
            for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg] {
                let bytes = encode(format, w, h);
                assert_eq!(header_dimensions(&bytes), Ok((w, h)), "{format:?}");
                let theirs = image::ImageReader::new(std::io::Cursor::new(&bytes))
                    .with_guessed_format()
                    .unwrap()
                    .into_dimensions()
                    .unwrap();
                assert_eq!(theirs, (w, h));
            }
        }
    }

    /// A PNG whose `iCCP` chunk inflates to 256 MiB: the header read never inflates it,
    /// and the decode stops at its allocation bound.
    #[test]
    fn a_compression_bomb_in_an_ancillary_chunk_costs_nothing() {
        use std::io::Write;
        let png = encode(image::ImageFormat::Png, 8, 8);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            z.write_all(&zeros).unwrap();
        }
        let mut data = b"icc\0\0".to_vec();
        data.extend(z.finish().unwrap());
        let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
        chunk.extend_from_slice(b"iCCP");
        chunk.extend_from_slice(&data);
        let crc = crc32fast::hash(&chunk[4..]);
        chunk.extend_from_slice(&crc.to_be_bytes());
        // After the signature (8) and IHDR (4 + 4 + 13 + 4).
        let mut bomb = png[..33].to_vec();
        bomb.extend(chunk);
        bomb.extend_from_slice(&png[33..]);
        assert!(bomb.len() < 2 << 20, "{}", bomb.len());
        assert_eq!(header_dimensions(&bomb), Ok((8, 8)));
        // The decode reads the pixels and gives up the profile at its allocation bound
        // (measured: 17 MB at most, where the image crate's defaults inflate 263 MB;
        // tests/soak.rs holds the daemon to it).
        let decoded = crate::pipeline::preprocess::decode_rgb(&bomb).unwrap();
        assert_eq!(decoded.dim(), (8, 8, 3));
    }

    #[test]
    fn broken_headers_are_refused_with_a_reason() {
        let png = encode(image::ImageFormat::Png, 4, 4);
        assert!(header_dimensions(&png[..20]).is_err());
        assert!(
            header_dimensions(b"GIF89a")
                .unwrap_err()
                .contains("signature")
        );
        let jpeg = encode(image::ImageFormat::Jpeg, 4, 4);
        assert!(header_dimensions(&jpeg[..6]).is_err());
        // A segment length that runs past the end.
        assert!(header_dimensions(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF]).is_err());
    }
}
