//! Bytes → the graph's input, byte-identical to the reference pipeline (Pillow +
//! torchvision): [`decode_rgb`] turns a JPEG or PNG into RGB pixels as Pillow's
//! `Image.open(...).convert("RGB")` does, and [`resize_and_crop`] scales the shorter side to
//! 256 with Pillow's antialiasing bilinear filter and cuts the 224×224 center (uint8, HWC).
//!
//! Failures are [`ImageError`]s, which know nothing of HTTP; `error.rs` turns them into
//! responses.

mod jpeg;
mod png;
mod resize;

pub use resize::{resize_and_crop, Scratch, CROP_SIZE, INPUT_LEN, SHORTER_SIDE};

/// Why bytes did not become an image. Every case is about the client's bytes, never the
/// service; the texts are what clients read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is not a JPEG or PNG")]
    NotAnImage,
    #[error("the image has {pixels} pixels, more than the limit of {limit}")]
    TooManyPixels { pixels: u64, limit: u64 },
    #[error("the image is truncated or corrupt: {0}")]
    Corrupt(String),
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved.
#[derive(Debug, Default)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
}

/// Identifies the format from the magic bytes (never from what a client claims).
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else {
        None
    }
}

/// Decodes a JPEG or PNG into `out` as RGB, refusing images over `max_pixels` from the
/// header alone. `out`'s buffer is reused.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64, out: &mut RgbImage) -> Result<(), ImageError> {
    match sniff(bytes) {
        Some(Format::Jpeg) => jpeg::decode(bytes, max_pixels, out),
        Some(Format::Png) => png::decode(bytes, max_pixels, out),
        None => Err(ImageError::NotAnImage),
    }
}

/// The size check both decoders make from the header, before they allocate the pixels.
fn check_pixels(width: usize, height: usize, max_pixels: u64) -> Result<(), ImageError> {
    let pixels = (width as u64).saturating_mul(height as u64);
    if pixels > max_pixels {
        return Err(ImageError::TooManyPixels {
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(ImageError::Corrupt("the image has no pixels".into()));
    }
    Ok(())
}

/// Helpers the decoders' and the resize's tests share.
#[cfg(test)]
mod test_support {
    use super::{decode_rgb, RgbImage};

    /// The limit the service runs with by default.
    pub const MAX_PIXELS: u64 = 40_000_000;

    /// Decodes with the default limit, or fails the test.
    pub fn decode(bytes: &[u8]) -> RgbImage {
        let mut image = RgbImage::default();
        decode_rgb(bytes, MAX_PIXELS, &mut image).expect("decodes");
        image
    }

    /// FNV-1a, 64-bit: how the expected pixels, computed with Pillow, are written down.
    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_uses_magic_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(Format::Png));
        assert_eq!(sniff(b"GIF89a"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn rejects_what_is_not_a_jpeg_or_png() {
        let mut image = RgbImage::default();
        assert!(matches!(
            decode_rgb(b"GIF89a\x01\x00\x01\x00", 100, &mut image),
            Err(ImageError::NotAnImage)
        ));
        assert!(matches!(
            decode_rgb(b"", 100, &mut image),
            Err(ImageError::NotAnImage)
        ));
    }
}
