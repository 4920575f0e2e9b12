//! JPEG through libjpeg-turbo, as Pillow uses it, so the decoded pixels are the reference
//! pipeline's (the pure-Rust decoders differ by up to 4 levels on ordinary photos, which
//! moved probabilities by up to 0.013 against the 0.02 parity tolerance). libjpeg reports
//! errors with setjmp/longjmp, which must not cross Rust frames, so a small C shim
//! (`csrc/jpeg_shim.c`, built by build.rs) owns the whole decode and returns a status.

use std::ffi::{c_char, c_void, CStr};

use super::{check_pixels, ImageError, RgbImage};

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    pub const OK: c_int = 0;
    pub const TRUNCATED: c_int = 2;
    pub const TOO_MANY_PIXELS: c_int = 3;

    /// `struct shim_jpeg_result` in csrc/jpeg_shim.h.
    #[repr(C)]
    pub struct JpegResult {
        pub width: u32,
        pub height: u32,
        pub components: u32,
        pub message: [c_char; 200],
    }

    pub type GetBuffer = unsafe extern "C" fn(ctx: *mut c_void, len: usize) -> *mut u8;

    extern "C" {
        pub fn shim_jpeg_decode(
            data: *const u8,
            len: usize,
            max_pixels: u64,
            get_buffer: GetBuffer,
            ctx: *mut c_void,
            result: *mut JpegResult,
        ) -> c_int;
    }
}

/// Hands libjpeg the output buffer: `ctx` is the `Vec<u8>` `decode` passed in.
unsafe extern "C" fn jpeg_buffer(ctx: *mut c_void, len: usize) -> *mut u8 {
    // SAFETY: `ctx` is `&mut Vec<u8>` from `decode`, exclusively borrowed for the
    // duration of `shim_jpeg_decode`, which is the only caller.
    let buffer = unsafe { &mut *ctx.cast::<Vec<u8>>() };
    if buffer
        .try_reserve(len.saturating_sub(buffer.len()))
        .is_err()
    {
        return std::ptr::null_mut();
    }
    buffer.resize(len, 0);
    buffer.as_mut_ptr()
}

/// Decodes with Pillow's settings. A stream cut short is an error, as in Pillow.
/// CMYK/YCCK are converted with Pillow's formula.
pub(super) fn decode(bytes: &[u8], max_pixels: u64, out: &mut RgbImage) -> Result<(), ImageError> {
    let mut result = ffi::JpegResult {
        width: 0,
        height: 0,
        components: 0,
        message: [0; 200],
    };
    // SAFETY: `bytes` outlives the call and is only read; `out.pixels` is only touched
    // through `jpeg_buffer` during the call; `result` is a valid, writable struct. The C
    // side never unwinds (libjpeg errors are caught there with setjmp/longjmp).
    let status = unsafe {
        ffi::shim_jpeg_decode(
            bytes.as_ptr(),
            bytes.len(),
            max_pixels,
            jpeg_buffer,
            std::ptr::from_mut(&mut out.pixels).cast::<c_void>(),
            &mut result,
        )
    };
    let (width, height) = (result.width as usize, result.height as usize);
    match status {
        ffi::OK => {}
        ffi::TOO_MANY_PIXELS => {
            return Err(ImageError::TooManyPixels {
                pixels: width as u64 * height as u64,
                limit: max_pixels,
            })
        }
        ffi::TRUNCATED => return Err(ImageError::Corrupt("JPEG: premature end of data".into())),
        _ => {
            return Err(ImageError::Corrupt(format!(
                "JPEG: {}",
                c_message(&result.message)
            )))
        }
    }
    check_pixels(width, height, max_pixels)?;
    let components = result.components as usize;
    if out.pixels.len() != width * height * components || !matches!(components, 3 | 4) {
        return Err(ImageError::Corrupt(
            "JPEG: unexpected decoder output".into(),
        ));
    }
    if components == 4 {
        cmyk_to_rgb_in_place(&mut out.pixels);
    }
    out.width = width;
    out.height = height;
    Ok(())
}

fn c_message(message: &[c_char]) -> String {
    let bytes: Vec<u8> = message.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(text) => text.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Pillow's path for a CMYK JPEG: it reads the samples as Adobe-inverted ("CMYK;I"), then
/// `convert("RGB")` computes `255 - K' - C'·(255 - K')/255` per channel, with C' = 255 - c
/// and K' = 255 - k for the stored samples c, k.
fn cmyk_to_rgb_in_place(pixels: &mut Vec<u8>) {
    let n = pixels.len() / 4;
    for i in 0..n {
        let [c, m, y, k] = [
            pixels[4 * i],
            pixels[4 * i + 1],
            pixels[4 * i + 2],
            pixels[4 * i + 3],
        ];
        let nk = i32::from(k); // 255 - K'
        let channel = |v: u8| -> u8 {
            let ink = 255 - i32::from(v); // C'
            let t = ink * nk + 128;
            let muldiv = ((t >> 8) + t) >> 8;
            (nk - muldiv).clamp(0, 255) as u8
        };
        pixels[3 * i] = channel(c);
        pixels[3 * i + 1] = channel(m);
        pixels[3 * i + 2] = channel(y);
    }
    pixels.truncate(n * 3);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::decode_rgb;
    use crate::image::test_support::{decode, fnv1a, MAX_PIXELS};

    const RGB_420: &[u8] = include_bytes!("../../tests/fixtures/rgb_420.jpg");
    const RGB_444_PROGRESSIVE: &[u8] =
        include_bytes!("../../tests/fixtures/rgb_444_progressive.jpg");

    /// Decoded JPEG pixels equal Pillow's `Image.open(f).convert("RGB")` (Pillow 12.3 with
    /// libjpeg-turbo 3.1): FNV-1a of the RGB bytes. Fixtures made by Pillow from a 40×30
    /// crop of skimage's astronaut.
    #[test]
    fn jpeg_decodes_to_pillows_pixels() {
        let cases: [(&str, &[u8], usize, usize, u64); 4] = [
            ("4:2:0", RGB_420, 40, 30, 0x3756_18ec_790c_da23),
            (
                "4:4:4 progressive",
                RGB_444_PROGRESSIVE,
                40,
                30,
                0x1321_e5f0_052d_805b,
            ),
            (
                "grayscale",
                include_bytes!("../../tests/fixtures/gray.jpg"),
                40,
                30,
                0x7571_e75e_693d_b9aa,
            ),
            (
                "CMYK",
                include_bytes!("../../tests/fixtures/cmyk.jpg"),
                40,
                30,
                0x3878_dfc1_d9b9_f6de,
            ),
        ];
        for (name, bytes, w, h, expected) in cases {
            let image = decode(bytes);
            assert_eq!((image.width, image.height), (w, h), "{name}");
            assert_eq!(image.pixels.len(), w * h * 3, "{name}");
            assert_eq!(fnv1a(&image.pixels), expected, "{name}");
        }
    }

    #[test]
    fn truncated_jpeg_is_corrupt() {
        // As in Pillow ("image file is truncated"): cut in the scan data, just before EOI,
        // inside the headers, baseline and progressive.
        let mut image = RgbImage::default();
        for bytes in [RGB_420, RGB_444_PROGRESSIVE] {
            for cut in [bytes.len() / 2, bytes.len() - 2, bytes.len() - 1, 100, 3] {
                let result = decode_rgb(&bytes[..cut], MAX_PIXELS, &mut image);
                assert!(
                    matches!(result, Err(ImageError::Corrupt(_))),
                    "cut at {cut}: {result:?}"
                );
            }
        }
        let mut garbled = RGB_420.to_vec();
        garbled[20..60].fill(0xFF);
        assert!(decode_rgb(&garbled, MAX_PIXELS, &mut image).is_err());
    }

    #[test]
    fn jpeg_pixel_limit_is_checked_from_the_header() {
        // Patch the frame header (SOF0) to claim 60000 × 60000; no decoding happens.
        let mut bytes = RGB_420.to_vec();
        let sof = bytes
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline JPEG");
        bytes[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let mut image = RgbImage::default();
        match decode_rgb(&bytes, 40_000_000, &mut image) {
            Err(ImageError::TooManyPixels { pixels, limit }) => {
                assert_eq!((pixels, limit), (3_600_000_000, 40_000_000));
            }
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn cmyk_conversion_is_pillows() {
        // Stored (Adobe-inverted) samples → Pillow's RGB: k = 255 means no black ink.
        let mut pixels = vec![
            255, 255, 255, 255, 0, 255, 128, 255, 200, 100, 50, 0, 10, 20, 30, 128,
        ];
        cmyk_to_rgb_in_place(&mut pixels);
        assert_eq!(pixels, [255, 255, 255, 0, 255, 128, 0, 0, 0, 5, 10, 15]);
    }
}
