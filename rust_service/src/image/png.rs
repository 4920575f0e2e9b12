//! PNG through the `png` crate, converted to RGB with Pillow's rules.

use std::io::Cursor;

use png::{BitDepth, ColorType, DecodeOptions, Decoder, DecodingError, Limits, Transformations};

use super::{check_pixels, ImageError, RgbImage};

/// Converts like Pillow's `Image.open(...).convert("RGB")`: palette and low bit depths are
/// expanded, alpha is dropped (not composited), 16-bit samples keep their high byte, except
/// 16-bit grayscale, which Pillow opens as mode `I;16` and clips to 0..255 when converting.
pub(super) fn decode(bytes: &[u8], max_pixels: u64, out: &mut RgbImage) -> Result<(), ImageError> {
    let mut options = DecodeOptions::default();
    options.set_ignore_crc(false);
    options.set_ignore_adler32(false);
    let mut decoder = Decoder::new_with_options(Cursor::new(bytes), options);
    let header = decoder.read_header_info().map_err(corrupt)?;
    let (width, height) = (header.width as usize, header.height as usize);
    let (source_color, source_depth) = (header.color_type, header.bit_depth);
    check_pixels(width, height, max_pixels)?;
    // The decoder's own allocations: a few rows plus metadata; the image buffer is ours.
    decoder.set_limits(Limits {
        bytes: 64 * 1024 * 1024,
    });
    decoder.set_transformations(Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let (color, depth) = reader.output_color_type();
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| ImageError::Corrupt("PNG is too large to buffer".into()))?;
    let mut raw = vec![0u8; len];
    let frame = reader.next_frame(&mut raw).map_err(corrupt)?;
    // Pillow reads the image data to the end of IDAT; a stream cut inside IDAT fails above.
    let raw = &raw[..frame.buffer_size()];

    let channels = color.samples();
    let sample_bytes = if depth == BitDepth::Sixteen { 2 } else { 1 };
    let line = frame.line_size;
    if line < width * channels * sample_bytes || raw.len() < line * height {
        return Err(ImageError::Corrupt(
            "PNG frame is smaller than its header".into(),
        ));
    }
    let clip_gray16 = source_color == ColorType::Grayscale && source_depth == BitDepth::Sixteen;

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

fn corrupt(err: DecodingError) -> ImageError {
    ImageError::Corrupt(format!("PNG: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::decode_rgb;
    use crate::image::test_support::{decode, MAX_PIXELS};

    fn encode_png(
        width: u32,
        height: u32,
        color: ColorType,
        depth: BitDepth,
        data: &[u8],
    ) -> Vec<u8> {
        encode_png_with(width, height, color, depth, data, |_| {})
    }

    fn encode_png_with(
        width: u32,
        height: u32,
        color: ColorType,
        depth: BitDepth,
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

    #[test]
    fn png_modes_convert_to_rgb_like_pillow() {
        // Grayscale: replicated.
        let gray = decode(&encode_png(
            2,
            1,
            ColorType::Grayscale,
            BitDepth::Eight,
            &[10, 200],
        ));
        assert_eq!(gray.pixels, [10, 10, 10, 200, 200, 200]);
        // 2-bit grayscale: expanded to 0, 85, 170, 255.
        let gray2 = decode(&encode_png(
            4,
            1,
            ColorType::Grayscale,
            BitDepth::Two,
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
            ColorType::GrayscaleAlpha,
            BitDepth::Eight,
            &[77, 0],
        ));
        assert_eq!(la.pixels, [77, 77, 77]);
        // RGBA: alpha dropped, not composited.
        let rgba = decode(&encode_png(
            1,
            1,
            ColorType::Rgba,
            BitDepth::Eight,
            &[1, 2, 3, 0],
        ));
        assert_eq!(rgba.pixels, [1, 2, 3]);
        // 16-bit RGB: high byte (Pillow's RGB;16B).
        let rgb16 = decode(&encode_png(
            1,
            1,
            ColorType::Rgb,
            BitDepth::Sixteen,
            &[0x12, 0x34, 0xAB, 0xCD, 0x00, 0xFF],
        ));
        assert_eq!(rgb16.pixels, [0x12, 0xAB, 0x00]);
        // 16-bit grayscale: Pillow's I;16 → RGB clips to 255.
        let gray16 = decode(&encode_png(
            3,
            1,
            ColorType::Grayscale,
            BitDepth::Sixteen,
            &[0x00, 0x0C, 0x01, 0x00, 0xFF, 0xFF],
        ));
        assert_eq!(gray16.pixels, [12, 12, 12, 255, 255, 255, 255, 255, 255]);
        // Palette with a transparent entry: the palette's RGB.
        let palette = decode(&encode_png_with(
            2,
            1,
            ColorType::Indexed,
            BitDepth::Eight,
            &[1, 0],
            |e| {
                e.set_palette(vec![9, 8, 7, 40, 50, 60]);
                e.set_trns(vec![0, 255]);
            },
        ));
        assert_eq!(palette.pixels, [40, 50, 60, 9, 8, 7]);
    }

    #[test]
    fn truncated_png_is_corrupt() {
        let bytes = encode_png(64, 64, ColorType::Rgb, BitDepth::Eight, &[90; 64 * 64 * 3]);
        let mut image = RgbImage::default();
        for cut in [bytes.len() - 12, bytes.len() / 2, 40] {
            let result = decode_rgb(&bytes[..cut], MAX_PIXELS, &mut image);
            assert!(
                matches!(result, Err(ImageError::Corrupt(_))),
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
            ColorType::Grayscale,
            BitDepth::One,
            &vec![0; 1250 * 5000],
        );
        let header_only = &bytes[..33];
        let mut image = RgbImage::default();
        match decode_rgb(header_only, 40_000_000, &mut image) {
            Err(ImageError::TooManyPixels { pixels, limit }) => {
                assert_eq!((pixels, limit), (50_000_000, 40_000_000));
            }
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }
}
