//! A port of Pillow's `ImagingResample` for 8-bit images (coefficients as
//! `precompute_coeffs` + `normalize_coeffs_8bpc`, 22-bit fixed point, horizontal pass
//! first, each pass rounded to uint8), so its output is byte-identical to
//! `PIL.Image.resize(size, Image.BILINEAR)` on the same RGB pixels. Only the pixels of the
//! center crop are computed; each output pixel depends only on its own coefficients, so
//! this is the same as resizing the whole image and cropping.

use super::RgbImage;

pub const SHORTER_SIDE: usize = 256;
pub const CROP_SIZE: usize = 224;
/// Bytes of one preprocessed image: 224 × 224 × RGB.
pub const INPUT_LEN: usize = CROP_SIZE * CROP_SIZE * 3;

/// Size after scaling the shorter side to 256, the longer to floor(256·long/short), as
/// torchvision computes it (`int(256 * long / short)`; exact in integers).
fn resized_size(width: usize, height: usize) -> (usize, usize) {
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
fn crop_offset(size: usize) -> usize {
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
    use crate::image::test_support::fnv1a;

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

    /// `resize_and_crop` of a `width × height` image with these pixels.
    fn resize_and_crop_pixels(width: usize, height: usize, pixels: &[u8]) -> Vec<u8> {
        let image = RgbImage {
            width,
            height,
            pixels: pixels.to_vec(),
        };
        let mut out = vec![0u8; INPUT_LEN];
        resize_and_crop(&image, &mut Scratch::default(), &mut out);
        out
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
            let out = resize_and_crop_pixels(w, h, &[17u8, 130, 250].repeat(w * h));
            assert!(out.chunks_exact(3).all(|p| p == [17, 130, 250]), "{w}x{h}");
        }
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
            let out = resize_and_crop_pixels(w, h, &pixels);
            assert_eq!(fnv1a(&out), expected, "{w}x{h}");
        }
    }

    #[test]
    fn crop_of_an_image_already_at_size_is_a_plain_crop() {
        // 256 × 300: the width is already the shorter side at 256, and the height becomes
        // floor(256 * 300 / 256) = 300, so Pillow resizes nothing and only the crop remains.
        let (w, h) = (256, 300);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let out = resize_and_crop_pixels(w, h, &pixels);
        let (left, top) = (crop_offset(256), crop_offset(300));
        assert_eq!((left, top), (16, 38));
        for y in 0..CROP_SIZE {
            let src = &pixels[((y + top) * w + left) * 3..((y + top) * w + left + CROP_SIZE) * 3];
            assert_eq!(
                &out[y * CROP_SIZE * 3..(y + 1) * CROP_SIZE * 3],
                src,
                "row {y}"
            );
        }
    }
}
