//! Bytes → the graph's input: decode a JPEG or PNG to RGB, resize the shorter side to 256
//! with Pillow's antialiasing bilinear filter, center-crop 224×224 (uint8, HWC).
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images (coefficients as
//! `precompute_coeffs` + `normalize_coeffs_8bpc`, 22-bit fixed point, horizontal pass
//! first, each pass rounded to uint8), so its output is byte-identical to
//! `PIL.Image.resize(size, Image.BILINEAR)` on the same RGB pixels. Only the pixels of the
//! center crop are computed; each output pixel depends only on its own coefficients, so
//! this is the same as resizing the whole image and cropping.

use std::ffi::{c_char, c_void, CStr};
use std::io::Cursor;

use crate::error::AppError;

pub const SHORTER_SIDE: usize = 256;
pub const CROP_SIZE: usize = 224;
/// Bytes of one preprocessed image: 224 × 224 × RGB.
pub const INPUT_LEN: usize = CROP_SIZE * CROP_SIZE * 3;

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
pub fn decode_rgb(bytes: &[u8], max_pixels: u64, out: &mut RgbImage) -> Result<(), AppError> {
    match sniff(bytes) {
        Some(Format::Jpeg) => decode_jpeg(bytes, max_pixels, out),
        Some(Format::Png) => decode_png(bytes, max_pixels, out),
        None => Err(AppError::NotAnImage),
    }
}

fn check_pixels(width: usize, height: usize, max_pixels: u64) -> Result<(), AppError> {
    let pixels = (width as u64).saturating_mul(height as u64);
    if pixels > max_pixels {
        return Err(AppError::TooManyPixels {
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(AppError::CorruptImage("the image has no pixels".into()));
    }
    Ok(())
}

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

/// Hands libjpeg the output buffer: `ctx` is the `Vec<u8>` `decode_jpeg` passed in.
unsafe extern "C" fn jpeg_buffer(ctx: *mut c_void, len: usize) -> *mut u8 {
    // SAFETY: `ctx` is `&mut Vec<u8>` from `decode_jpeg`, exclusively borrowed for the
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

/// libjpeg-turbo, as Pillow uses it, so the decoded pixels are the reference pipeline's
/// (the pure-Rust decoders differ by up to 4 levels on ordinary photos, which moved
/// probabilities by up to 0.013 against the 0.02 parity tolerance). A stream cut short
/// is an error, as in Pillow. CMYK/YCCK are converted with Pillow's formula.
fn decode_jpeg(bytes: &[u8], max_pixels: u64, out: &mut RgbImage) -> Result<(), AppError> {
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
            return Err(AppError::TooManyPixels {
                pixels: width as u64 * height as u64,
                limit: max_pixels,
            })
        }
        ffi::TRUNCATED => return Err(AppError::CorruptImage("JPEG: premature end of data".into())),
        _ => {
            return Err(AppError::CorruptImage(format!(
                "JPEG: {}",
                c_message(&result.message)
            )))
        }
    }
    check_pixels(width, height, max_pixels)?;
    let components = result.components as usize;
    if out.pixels.len() != width * height * components || !matches!(components, 3 | 4) {
        return Err(AppError::CorruptImage(
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

/// Converts like Pillow's `Image.open(...).convert("RGB")`: palette and low bit depths are
/// expanded, alpha is dropped (not composited), 16-bit samples keep their high byte, except
/// 16-bit grayscale, which Pillow opens as mode `I;16` and clips to 0..255 when converting.
fn decode_png(bytes: &[u8], max_pixels: u64, out: &mut RgbImage) -> Result<(), AppError> {
    let mut options = png::DecodeOptions::default();
    options.set_ignore_crc(false);
    options.set_ignore_adler32(false);
    let mut decoder = png::Decoder::new_with_options(Cursor::new(bytes), options);
    let header = decoder.read_header_info().map_err(png_error)?;
    let (width, height) = (header.width as usize, header.height as usize);
    let (source_color, source_depth) = (header.color_type, header.bit_depth);
    check_pixels(width, height, max_pixels)?;
    // The decoder's own allocations: a few rows plus metadata; the image buffer is ours.
    decoder.set_limits(png::Limits {
        bytes: 64 * 1024 * 1024,
    });
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(png_error)?;
    let (color, depth) = reader.output_color_type();
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| AppError::CorruptImage("PNG is too large to buffer".into()))?;
    let mut raw = vec![0u8; len];
    let frame = reader.next_frame(&mut raw).map_err(png_error)?;
    // Pillow reads the image data to the end of IDAT; a stream cut inside IDAT fails above.
    let raw = &raw[..frame.buffer_size()];

    let channels = color.samples();
    let sample_bytes = if depth == png::BitDepth::Sixteen {
        2
    } else {
        1
    };
    let line = frame.line_size;
    if line < width * channels * sample_bytes || raw.len() < line * height {
        return Err(AppError::CorruptImage(
            "PNG frame is smaller than its header".into(),
        ));
    }
    let clip_gray16 =
        source_color == png::ColorType::Grayscale && source_depth == png::BitDepth::Sixteen;

    out.pixels.clear();
    out.pixels.reserve(width * height * 3);
    for row in raw.chunks_exact(line).take(height) {
        let row = &row[..width * channels * sample_bytes];
        for px in row.chunks_exact(channels * sample_bytes) {
            let sample = |i: usize| -> u8 {
                if sample_bytes == 1 {
                    px[i]
                } else if clip_gray16 {
                    let v = u16::from_be_bytes([px[2 * i], px[2 * i + 1]]);
                    u8::try_from(v).unwrap_or(u8::MAX)
                } else {
                    px[2 * i]
                }
            };
            match channels {
                1 | 2 => {
                    let g = sample(0);
                    out.pixels.extend_from_slice(&[g, g, g]);
                }
                _ => out
                    .pixels
                    .extend_from_slice(&[sample(0), sample(1), sample(2)]),
            }
        }
    }
    out.width = width;
    out.height = height;
    Ok(())
}

fn png_error(err: png::DecodingError) -> AppError {
    AppError::CorruptImage(format!("PNG: {err}"))
}

/// Size after scaling the shorter side to 256, the longer to floor(256·long/short), as
/// torchvision computes it (`int(256 * long / short)`; exact in integers).
pub fn resized_size(width: usize, height: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (SHORTER_SIDE as u128 * long as u128 / short.max(1) as u128) as usize;
    if width <= height {
        (SHORTER_SIDE, new_long)
    } else {
        (new_long, SHORTER_SIDE)
    }
}

/// Offset of the 224-wide center crop in a dimension of `size` ≥ 224:
/// `round((size - 224) / 2)` with Python's round-half-to-even, as torchvision does.
/// (`f64::round` rounds halves away from zero, which would be off by one for
/// size - 224 ≡ 2 mod 4.)
pub fn crop_offset(size: usize) -> usize {
    let excess = size.saturating_sub(CROP_SIZE);
    let half = excess / 2;
    if excess % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bilinear filter weights for output positions `first..first + count` of an
/// axis resized from `in_size` to `out_size`.
struct Coefficients {
    ksize: usize,
    /// (first input index, number of taps) per output position.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output position.
    weights: Vec<i32>,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize, first: usize, count: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        // Bilinear support is 1.0.
        let support = filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(count);
        let mut weights = vec![0i32; count * ksize];
        let mut taps = vec![0f64; ksize];
        for (i, xx) in (first..first + count).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).max(0) as usize;
            let xmin = xmin as usize;
            let mut total = 0.0;
            for (x, tap) in taps.iter_mut().enumerate().take(n) {
                let t = (((x + xmin) as f64 - center + 0.5) / filterscale).abs();
                *tap = if t < 1.0 { 1.0 - t } else { 0.0 };
                total += *tap;
            }
            let row = &mut weights[i * ksize..(i + 1) * ksize];
            for (w, &tap) in row.iter_mut().zip(&taps).take(n) {
                let normalized = if total != 0.0 { tap / total } else { tap };
                let fixed = normalized * f64::from(1u32 << PRECISION_BITS);
                *w = if fixed < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Self {
            ksize,
            bounds,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + n])
    }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Reusable intermediate buffers, so a worker does not allocate per request.
#[derive(Default)]
pub struct Scratch {
    rows: Vec<u8>,
    acc: Vec<i32>,
}

/// Resize (shorter side 256, Pillow bilinear) + center crop 224, written into `out`
/// (`INPUT_LEN` bytes, HWC RGB).
pub fn resize_and_crop(image: &RgbImage, scratch: &mut Scratch, out: &mut [u8]) {
    debug_assert_eq!(out.len(), INPUT_LEN);
    let (w, h) = (image.width, image.height);
    let (new_w, new_h) = resized_size(w, h);
    let (left, top) = (crop_offset(new_w), crop_offset(new_h));
    let need_horizontal = new_w != w;
    let need_vertical = new_h != h;
    let horizontal = Coefficients::new(w, new_w, left, CROP_SIZE);
    let vertical = Coefficients::new(h, new_h, top, CROP_SIZE);
    let row_len = CROP_SIZE * 3;

    // Source rows the crop needs (Pillow's ybox_first..ybox_last, restricted to the crop).
    let (first_row, rows) = if need_vertical {
        let (first, _) = vertical.bounds[0];
        let (last, n) = vertical.bounds[CROP_SIZE - 1];
        (first, last + n - first)
    } else {
        (top, CROP_SIZE)
    };

    // Horizontal pass into `scratch.rows` (rows × 224 pixels).
    let temp = &mut scratch.rows;
    temp.resize(rows * row_len, 0);
    for (y, dst) in temp.chunks_exact_mut(row_len).enumerate() {
        let src_row = &image.pixels[(first_row + y) * w * 3..(first_row + y + 1) * w * 3];
        if !need_horizontal {
            dst.copy_from_slice(&src_row[left * 3..(left + CROP_SIZE) * 3]);
            continue;
        }
        for (x, px) in dst.chunks_exact_mut(3).enumerate() {
            let (start, k) = horizontal.taps(x);
            let src = &src_row[start * 3..(start + k.len()) * 3];
            let mut sum = [1i32 << (PRECISION_BITS - 1); 3];
            for (p, &weight) in src.chunks_exact(3).zip(k) {
                sum[0] += i32::from(p[0]) * weight;
                sum[1] += i32::from(p[1]) * weight;
                sum[2] += i32::from(p[2]) * weight;
            }
            px[0] = clip8(sum[0]);
            px[1] = clip8(sum[1]);
            px[2] = clip8(sum[2]);
        }
    }

    if !need_vertical {
        out.copy_from_slice(&temp[..CROP_SIZE * row_len]);
        return;
    }
    // Vertical pass: one row of accumulators, rows added in with their weights.
    let acc = &mut scratch.acc;
    acc.resize(row_len, 0);
    for (y, dst) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, k) = vertical.taps(y);
        acc.fill(1 << (PRECISION_BITS - 1));
        for (i, &weight) in k.iter().enumerate() {
            let row = start - first_row + i;
            let src = &temp[row * row_len..(row + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += i32::from(p) * weight;
            }
        }
        for (o, &a) in dst.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crop rounding Python uses: round((size - 224) / 2), halves to even.
    fn python_round_half_even(x: f64) -> usize {
        let floor = x.floor();
        let diff = x - floor;
        let r = if diff > 0.5 || (diff == 0.5 && floor % 2.0 != 0.0) {
            floor + 1.0
        } else {
            floor
        };
        r as usize
    }

    #[test]
    fn resized_size_scales_shorter_side_to_256() {
        assert_eq!(resized_size(1200, 727), (422, 256));
        assert_eq!(resized_size(727, 1200), (256, 422));
        assert_eq!(resized_size(600, 400), (384, 256));
        assert_eq!(resized_size(512, 512), (256, 256));
        assert_eq!(resized_size(451, 300), (384, 256)); // 256*451/300 = 384.85
        assert_eq!(resized_size(1, 1), (256, 256));
        assert_eq!(resized_size(3, 1000), (256, 85333));
        assert_eq!(resized_size(40_000_000, 1), (10_240_000_000, 256));
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        // (size - 224) / 2 = 1.5 → 2, 2.5 → 2, 3.5 → 4, 16.5 → 16, 99 → 99
        assert_eq!(crop_offset(227), 2);
        assert_eq!(crop_offset(229), 2);
        assert_eq!(crop_offset(231), 4);
        assert_eq!(crop_offset(257), 16);
        assert_eq!(crop_offset(422), 99);
        assert_eq!(crop_offset(224), 0);
        assert_eq!(crop_offset(225), 0); // 0.5 → 0
        for size in 224..2000 {
            let expected = python_round_half_even((size as f64 - 224.0) / 2.0);
            assert_eq!(crop_offset(size), expected, "size {size}");
        }
    }

    #[test]
    fn sniff_uses_magic_bytes() {
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(Format::Png));
        assert_eq!(sniff(b"GIF89a"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn coefficients_are_pillows_for_a_downscale() {
        // Pillow, 8 → 4 bilinear: support 2, taps [1/8, 3/8, 3/8, 1/8] around each center.
        let c = Coefficients::new(8, 4, 0, 4);
        let one = f64::from(1u32 << PRECISION_BITS);
        assert_eq!(c.bounds, vec![(0, 3), (1, 4), (3, 4), (5, 3)]);
        let (_, k) = c.taps(1);
        let expected: Vec<i32> = [0.125, 0.375, 0.375, 0.125]
            .iter()
            .map(|w| (w * one + 0.5) as i32)
            .collect();
        assert_eq!(k, expected.as_slice());
        for i in 0..4 {
            let (_, k) = c.taps(i);
            let total: i64 = k.iter().map(|&w| i64::from(w)).sum();
            assert!(
                (total - (1 << PRECISION_BITS)).abs() <= 2,
                "weights sum to one"
            );
        }
    }

    #[test]
    fn uniform_image_stays_uniform() {
        for (w, h) in [(300, 500), (1200, 727), (224, 224), (10, 7), (256, 400)] {
            let image = RgbImage {
                width: w,
                height: h,
                pixels: [17u8, 130, 250].repeat(w * h),
            };
            let mut out = vec![0u8; INPUT_LEN];
            resize_and_crop(&image, &mut Scratch::default(), &mut out);
            assert!(out.chunks_exact(3).all(|p| p == [17, 130, 250]), "{w}x{h}");
        }
    }

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Byte-exact against Pillow: the expected hashes are FNV-1a of
    /// `weather.contract.prepare_pixels(Image.fromarray(px))` (Pillow 12.3), where
    /// `px[i] = (i * 7919 + row * 31) % 251` over the flat HWC array.
    #[test]
    fn resize_and_crop_match_pillow_byte_for_byte() {
        let cases = [
            ((300, 227), 0xd439_46e3_e1cd_bdff_u64), // downscale, odd crop offset
            ((50, 40), 0x3de8_deac_5245_2947),       // upscale
            ((1200, 727), 0xc0de_9a79_b469_696e),    // the benchmark's size
            ((227, 1000), 0xcb52_7ac2_29c1_a48c),    // portrait
            ((256, 300), 0x413c_2425_544b_9c7a),     // no resize at all
            ((641, 256), 0x4664_5a09_635f_bb57),     // horizontal pass only
            ((3, 500), 0xcf06_304b_ad4d_1a43),       // extreme aspect ratio
        ];
        for ((w, h), expected) in cases {
            let pixels: Vec<u8> = (0..w * h * 3)
                .map(|i| ((i as u64 * 7919 + (i / (w * 3)) as u64 * 31) % 251) as u8)
                .collect();
            let image = RgbImage {
                width: w,
                height: h,
                pixels,
            };
            let mut out = vec![0u8; INPUT_LEN];
            resize_and_crop(&image, &mut Scratch::default(), &mut out);
            assert_eq!(fnv1a(&out), expected, "{w}x{h}");
        }
    }

    #[test]
    fn crop_of_an_image_already_at_size_is_a_plain_crop() {
        // 256 × 300: the width is already the shorter side at 256, and the height becomes
        // floor(256 * 300 / 256) = 300, so Pillow resizes nothing and only the crop remains.
        let (w, h) = (256, 300);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let image = RgbImage {
            width: w,
            height: h,
            pixels,
        };
        let mut out = vec![0u8; INPUT_LEN];
        resize_and_crop(&image, &mut Scratch::default(), &mut out);
        let (left, top) = (crop_offset(256), crop_offset(300));
        assert_eq!((left, top), (16, 38));
        for y in 0..CROP_SIZE {
            let src =
                &image.pixels[((y + top) * w + left) * 3..((y + top) * w + left + CROP_SIZE) * 3];
            assert_eq!(
                &out[y * CROP_SIZE * 3..(y + 1) * CROP_SIZE * 3],
                src,
                "row {y}"
            );
        }
    }

    fn encode_png(
        width: u32,
        height: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        data: &[u8],
    ) -> Vec<u8> {
        encode_png_with(width, height, color, depth, data, |_| {})
    }

    fn encode_png_with(
        width: u32,
        height: u32,
        color: png::ColorType,
        depth: png::BitDepth,
        data: &[u8],
        configure: impl FnOnce(&mut png::Encoder<&mut Vec<u8>>),
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut bytes, width, height);
            encoder.set_color(color);
            encoder.set_depth(depth);
            configure(&mut encoder);
            let mut writer = encoder.write_header().expect("header");
            writer.write_image_data(data).expect("data");
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> RgbImage {
        let mut image = RgbImage::default();
        decode_rgb(bytes, 40_000_000, &mut image).expect("decodes");
        image
    }

    #[test]
    fn png_modes_convert_to_rgb_like_pillow() {
        // Grayscale: replicated.
        let gray = decode(&encode_png(
            2,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &[10, 200],
        ));
        assert_eq!(gray.pixels, [10, 10, 10, 200, 200, 200]);
        // 2-bit grayscale: expanded to 0, 85, 170, 255.
        let gray2 = decode(&encode_png(
            4,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Two,
            &[0b0001_1011],
        ));
        assert_eq!(
            gray2.pixels,
            [0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255]
        );
        // Gray + alpha: alpha dropped.
        let la = decode(&encode_png(
            1,
            1,
            png::ColorType::GrayscaleAlpha,
            png::BitDepth::Eight,
            &[77, 0],
        ));
        assert_eq!(la.pixels, [77, 77, 77]);
        // RGBA: alpha dropped, not composited.
        let rgba = decode(&encode_png(
            1,
            1,
            png::ColorType::Rgba,
            png::BitDepth::Eight,
            &[1, 2, 3, 0],
        ));
        assert_eq!(rgba.pixels, [1, 2, 3]);
        // 16-bit RGB: high byte (Pillow's RGB;16B).
        let rgb16 = decode(&encode_png(
            1,
            1,
            png::ColorType::Rgb,
            png::BitDepth::Sixteen,
            &[0x12, 0x34, 0xAB, 0xCD, 0x00, 0xFF],
        ));
        assert_eq!(rgb16.pixels, [0x12, 0xAB, 0x00]);
        // 16-bit grayscale: Pillow's I;16 → RGB clips to 255.
        let gray16 = decode(&encode_png(
            3,
            1,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &[0x00, 0x0C, 0x01, 0x00, 0xFF, 0xFF],
        ));
        assert_eq!(gray16.pixels, [12, 12, 12, 255, 255, 255, 255, 255, 255]);
        // Palette with a transparent entry: the palette's RGB.
        let palette = decode(&encode_png_with(
            2,
            1,
            png::ColorType::Indexed,
            png::BitDepth::Eight,
            &[1, 0],
            |e| {
                e.set_palette(vec![9, 8, 7, 40, 50, 60]);
                e.set_trns(vec![0, 255]);
            },
        ));
        assert_eq!(palette.pixels, [40, 50, 60, 9, 8, 7]);
    }

    /// Decoded JPEG pixels equal Pillow's `Image.open(f).convert("RGB")` (Pillow 12.3 with
    /// libjpeg-turbo 3.1): FNV-1a of the RGB bytes. Fixtures made by Pillow from a 40×30
    /// crop of skimage's astronaut.
    #[test]
    fn jpeg_decodes_to_pillows_pixels() {
        let cases: [(&str, &[u8], usize, usize, u64); 4] = [
            (
                "4:2:0",
                include_bytes!("../tests/fixtures/rgb_420.jpg"),
                40,
                30,
                0x3756_18ec_790c_da23,
            ),
            (
                "4:4:4 progressive",
                include_bytes!("../tests/fixtures/rgb_444_progressive.jpg"),
                40,
                30,
                0x1321_e5f0_052d_805b,
            ),
            (
                "grayscale",
                include_bytes!("../tests/fixtures/gray.jpg"),
                40,
                30,
                0x7571_e75e_693d_b9aa,
            ),
            (
                "CMYK",
                include_bytes!("../tests/fixtures/cmyk.jpg"),
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
        for bytes in [
            &include_bytes!("../tests/fixtures/rgb_420.jpg")[..],
            &include_bytes!("../tests/fixtures/rgb_444_progressive.jpg")[..],
        ] {
            for cut in [bytes.len() / 2, bytes.len() - 2, bytes.len() - 1, 100, 3] {
                let result = decode_rgb(&bytes[..cut], 40_000_000, &mut image);
                assert!(
                    matches!(result, Err(AppError::CorruptImage(_))),
                    "cut at {cut}: {result:?}"
                );
            }
        }
        let bytes = include_bytes!("../tests/fixtures/rgb_420.jpg");
        let mut garbled = bytes.to_vec();
        garbled[20..60].fill(0xFF);
        assert!(decode_rgb(&garbled, 40_000_000, &mut image).is_err());
    }

    #[test]
    fn jpeg_pixel_limit_is_checked_from_the_header() {
        // Patch the frame header (SOF0) to claim 60000 × 60000; no decoding happens.
        let mut bytes = include_bytes!("../tests/fixtures/rgb_420.jpg").to_vec();
        let sof = bytes
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline JPEG");
        bytes[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let mut image = RgbImage::default();
        match decode_rgb(&bytes, 40_000_000, &mut image) {
            Err(AppError::TooManyPixels { pixels, limit }) => {
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

    #[test]
    fn rejects_what_is_not_a_jpeg_or_png() {
        let mut image = RgbImage::default();
        assert!(matches!(
            decode_rgb(b"GIF89a\x01\x00\x01\x00", 100, &mut image),
            Err(AppError::NotAnImage)
        ));
        assert!(matches!(
            decode_rgb(b"", 100, &mut image),
            Err(AppError::NotAnImage)
        ));
    }

    #[test]
    fn truncated_png_is_corrupt() {
        let bytes = encode_png(
            64,
            64,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            &[90; 64 * 64 * 3],
        );
        let mut image = RgbImage::default();
        for cut in [bytes.len() - 12, bytes.len() / 2, 40] {
            let result = decode_rgb(&bytes[..cut], 40_000_000, &mut image);
            assert!(
                matches!(result, Err(AppError::CorruptImage(_))),
                "cut at {cut}: {result:?}"
            );
        }
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        // A header that claims 10000 × 5000 with no image data behind it: refused as too
        // large before any decoding, not as truncated.
        let bytes = encode_png(
            10_000,
            5_000,
            png::ColorType::Grayscale,
            png::BitDepth::One,
            &vec![0; 1250 * 5000],
        );
        let header_only = &bytes[..33];
        let mut image = RgbImage::default();
        match decode_rgb(header_only, 40_000_000, &mut image) {
            Err(AppError::TooManyPixels { pixels, limit }) => {
                assert_eq!((pixels, limit), (50_000_000, 40_000_000));
            }
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }
}
