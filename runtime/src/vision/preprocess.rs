//! Image decoding and Qwen2-VL preprocessing into pixel patches.
//!
//! Follows the Hugging Face Qwen2-VL image processor (PIL backend): transparency composited on
//! white, `smart_resize` to multiples of patch × merge, bicubic resampling as PIL computes it
//! (two separable 8-bit fixed-point passes, kernel widened when shrinking), ×1/255, normalise,
//! the frame repeated over the temporal patch, patches flattened merge group by merge group.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, ImageReader, RgbImage};
use serde::Deserialize;

/// What the server accepts before any pixel is decoded (decompression bombs stop here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded image, in bytes.
    pub max_bytes: usize,
    /// Largest decoded image, in pixels (width × height from the header).
    pub max_pixels_decoded: u64,
    /// Largest decoded side, in pixels.
    pub max_side: u32,
    /// Most memory a decoder may allocate, in bytes.
    pub max_alloc: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 20,
            max_pixels_decoded: 64 << 20,
            max_side: 32_768,
            max_alloc: 512 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty")]
    Empty,
    #[error("the image is {bytes} bytes; images up to {limit} bytes are accepted")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error("unrecognised image format; send PNG, JPEG, WebP or GIF")]
    UnknownFormat,
    #[error("{0:?} images are not supported; send PNG, JPEG, WebP or GIF")]
    UnsupportedFormat(ImageFormat),
    #[error("the image could not be decoded: {0}")]
    Undecodable(String),
    #[error(
        "the image is {width}x{height} pixels; images up to {limit} pixels \
         (and {max_side} pixels a side) are accepted"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        limit: u64,
        max_side: u32,
    },
    #[error("the image has a zero-sized side ({width}x{height})")]
    ZeroSized { width: u32, height: u32 },
    #[error(
        "the image is {width}x{height} pixels; its aspect ratio must be at most {MAX_ASPECT_RATIO}:1"
    )]
    AspectRatio { width: u32, height: u32 },
    #[error("invalid image preprocessing configuration: {0}")]
    Config(String),
}

/// Largest ratio of the long side to the short side the processor accepts.
pub const MAX_ASPECT_RATIO: u32 = 200;

/// A decoded image in 8-bit RGB, transparency already composited on white.
#[derive(Clone, PartialEq, Eq)]
pub struct DecodedImage {
    rgb: RgbImage,
}

impl std::fmt::Debug for DecodedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodedImage({}x{})", self.width(), self.height())
    }
}

impl DecodedImage {
    pub fn from_rgb(rgb: RgbImage) -> Self {
        Self { rgb }
    }
    pub fn width(&self) -> u32 {
        self.rgb.width()
    }
    pub fn height(&self) -> u32 {
        self.rgb.height()
    }
    pub fn rgb(&self) -> &RgbImage {
        &self.rgb
    }
}

/// Decodes PNG, JPEG, WebP or GIF (first frame) within `limits`.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<DecodedImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat)?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif
    ) {
        return Err(ImageError::UnsupportedFormat(format));
    }
    let reader = || {
        let mut r = ImageReader::with_format(Cursor::new(bytes), format);
        let mut l = image::Limits::default();
        l.max_image_width = Some(limits.max_side);
        l.max_image_height = Some(limits.max_side);
        l.max_alloc = Some(limits.max_alloc);
        r.limits(l);
        r
    };
    let too_many = |width, height| ImageError::TooManyPixels {
        width,
        height,
        limit: limits.max_pixels_decoded,
        max_side: limits.max_side,
    };
    // The header alone tells the size: refuse bombs before allocating pixels.
    let (width, height) = reader().into_dimensions().map_err(|e| match e {
        image::ImageError::Limits(_) => too_many(0, 0),
        e => ImageError::Undecodable(e.to_string()),
    })?;
    if u64::from(width) * u64::from(height) > limits.max_pixels_decoded
        || width > limits.max_side
        || height > limits.max_side
    {
        return Err(too_many(width, height));
    }
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSized { width, height });
    }
    let decoded = reader().decode().map_err(|e| match e {
        image::ImageError::Limits(_) => too_many(width, height),
        e => ImageError::Undecodable(e.to_string()),
    })?;
    let rgb = if decoded.color().has_alpha() {
        composite_on_white(&decoded.to_rgba8())
    } else {
        decoded.to_rgb8()
    };
    Ok(DecodedImage { rgb })
}

/// PIL's `alpha_composite` of the image over opaque white, in its integer arithmetic.
fn composite_on_white(rgba: &image::RgbaImage) -> RgbImage {
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0.map(u32::from);
        if a == 0 {
            return image::Rgb([255, 255, 255]);
        }
        // Over white: coefficients a·128 and (255 − a)·128 (7 fractional bits).
        let blend = |c: u32| {
            let t = c * a * 128 + 255 * (255 - a) * 128;
            (div255(t + (0x80 << 7)) >> 7) as u8
        };
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

/// Target size per the Qwen2-VL rules: each side rounded (half to even) to a multiple of
/// `factor`, then scaled into `[min_pixels, max_pixels]` keeping the aspect ratio.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), ImageError> {
    if height == 0 || width == 0 {
        return Err(ImageError::ZeroSized { width, height });
    }
    if factor == 0 {
        return Err(ImageError::Config("resize factor must be positive".into()));
    }
    let (h, w) = (f64::from(height), f64::from(width));
    if h.max(w) / h.min(w) > f64::from(MAX_ASPECT_RATIO) {
        return Err(ImageError::AspectRatio { width, height });
    }
    let f = f64::from(factor);
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    let side = |v: f64| -> Result<u32, ImageError> {
        if v >= 1.0 && v <= f64::from(u32::MAX) {
            Ok(v as u32)
        } else {
            Err(ImageError::Config(format!(
                "{width}x{height} resizes to an invalid side {v}"
            )))
        }
    };
    Ok((side(h_bar)?, side(w_bar)?))
}

/// The processor's settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub patch_size: u32,
    pub temporal_patch_size: u32,
    pub merge_size: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 65_536,
            max_pixels: 16_777_216,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

#[derive(Deserialize)]
struct RawPreprocessConfig {
    patch_size: Option<u32>,
    temporal_patch_size: Option<u32>,
    merge_size: Option<u32>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    size: Option<RawSize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

impl PreprocessConfig {
    /// Reads `preprocessor_config.json` from a checkpoint; defaults when the file is absent.
    /// Explicit `min_pixels`/`max_pixels` win over `size`, as in the reference processor.
    pub fn from_checkpoint(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("preprocessor_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(ImageError::Config(format!("{}: {e}", path.display()))),
        };
        Self::from_json(&text).map_err(|e| ImageError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Self, ImageError> {
        let raw: RawPreprocessConfig =
            serde_json::from_str(text).map_err(|e| ImageError::Config(e.to_string()))?;
        let d = Self::default();
        let size = raw.size.as_ref();
        let config = Self {
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            min_pixels: raw
                .min_pixels
                .or(size.and_then(|s| s.shortest_edge))
                .unwrap_or(d.min_pixels),
            max_pixels: raw
                .max_pixels
                .or(size.and_then(|s| s.longest_edge))
                .unwrap_or(d.max_pixels),
            image_mean: raw.image_mean.unwrap_or(d.image_mean),
            image_std: raw.image_std.unwrap_or(d.image_std),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ImageError> {
        if self.patch_size == 0 || self.temporal_patch_size == 0 || self.merge_size == 0 {
            return Err(ImageError::Config(
                "patch, temporal patch and merge sizes must be positive".into(),
            ));
        }
        if self.min_pixels > self.max_pixels || self.max_pixels == 0 {
            return Err(ImageError::Config(format!(
                "min_pixels {} / max_pixels {} are inconsistent",
                self.min_pixels, self.max_pixels
            )));
        }
        if self.image_std.contains(&0.0) {
            return Err(ImageError::Config("image_std must be non-zero".into()));
        }
        Ok(())
    }

    /// Side multiple of the resized image (patch × merge).
    pub fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Length of one patch row: channels × temporal patch × patch².
    pub fn row_len(&self) -> usize {
        (3 * self.temporal_patch_size * self.patch_size * self.patch_size) as usize
    }

    /// Resized (height, width) of an image of the given size.
    pub fn resized_size(&self, height: u32, width: u32) -> Result<(u32, u32), ImageError> {
        smart_resize(
            height,
            width,
            self.factor(),
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// Language-model tokens an image of the given size becomes.
    pub fn token_count(&self, height: u32, width: u32) -> Result<usize, ImageError> {
        let (h, w) = self.resized_size(height, width)?;
        let f = self.factor() as usize;
        Ok((h as usize / f) * (w as usize / f))
    }
}

/// Patch rows for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelPatches {
    /// `rows × row_len` values; each 2×2 merge group is 4 consecutive rows.
    pub data: Vec<f32>,
    pub rows: usize,
    /// (temporal, height, width) in patches.
    pub grid_thw: [u32; 3],
}

impl PixelPatches {
    /// Tokens the language model sees for this image.
    pub fn token_count(&self, merge: u32) -> usize {
        self.rows / (merge as usize * merge as usize)
    }
}

/// Resizes, normalises and patchifies one image.
pub fn preprocess(
    image: &DecodedImage,
    config: &PreprocessConfig,
) -> Result<PixelPatches, ImageError> {
    config.validate()?;
    let (height, width) = config.resized_size(image.height(), image.width())?;
    let resized = resize_bicubic(&image.rgb, width, height);

    // Rescale in f64 then store f32, normalise in f32: the reference's arithmetic.
    let scale = 1.0f64 / 255.0;
    let lut: Vec<[f32; 3]> = (0..=255u8)
        .map(|v| {
            let x = (f64::from(v) * scale) as f32;
            std::array::from_fn(|c| (x - config.image_mean[c]) / config.image_std[c])
        })
        .collect();

    let (p, t, m) = (
        config.patch_size as usize,
        config.temporal_patch_size as usize,
        config.merge_size as usize,
    );
    let (gh, gw) = (height as usize / p, width as usize / p);
    let row_len = config.row_len();
    let rows = gh * gw;
    let mut data = vec![0f32; rows * row_len];
    let mut row = 0;
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    let out = &mut data[row * row_len..(row + 1) * row_len];
                    // Row layout: channel, temporal frame, patch y, patch x.
                    for c in 0..3 {
                        for ti in 0..t {
                            for py in 0..p {
                                let base = ((c * t + ti) * p + py) * p;
                                for px in 0..p {
                                    let v = resized.get_pixel((x0 + px) as u32, (y0 + py) as u32);
                                    out[base + px] = lut[v.0[c] as usize][c];
                                }
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
    Ok(PixelPatches {
        data,
        rows,
        grid_thw: [1, gh as u32, gw as u32],
    })
}

/// Bits of fraction in PIL's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = −0.5 (PIL's BICUBIC), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output sample's source window and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Per-output-sample windows for resampling `in_size` samples to `out_size`: the kernel is
/// stretched by the shrink factor (antialiasing), clipped to the input and renormalised.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C casts truncate toward zero.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (lo..hi)
                .map(|i| bicubic((i as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (k * one - 0.5) as i32
                    } else {
                        (k * one + 0.5) as i32
                    }
                })
                .collect();
            Taps { start: lo, weights }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    if acc <= 0 {
        0
    } else if acc >= 256 << PRECISION_BITS {
        255
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

fn convolve(samples: impl Iterator<Item = (u8, i32)>) -> u8 {
    let acc = samples.fold(1i64 << (PRECISION_BITS - 1), |acc, (v, w)| {
        acc + i64::from(v) * i64::from(w)
    });
    clip8(acc)
}

/// PIL's `Image.resize(..., BICUBIC)` on 8-bit RGB: a horizontal then a vertical pass, each
/// rounded to 8 bits; a pass is skipped when its side does not change.
fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let (w, h) = (width as usize, height as usize);
    let horizontal = if w != sw {
        let taps = taps(sw, w);
        RgbImage::from_fn(width, src.height(), |x, y| {
            let t = &taps[x as usize];
            image::Rgb(std::array::from_fn(|c| {
                convolve(
                    t.weights
                        .iter()
                        .enumerate()
                        .map(|(i, &k)| (src.get_pixel((t.start + i) as u32, y).0[c], k)),
                )
            }))
        })
    } else {
        src.clone()
    };
    if h == sh {
        return horizontal;
    }
    let taps = taps(sh, h);
    RgbImage::from_fn(width, height, |x, y| {
        let t = &taps[y as usize];
        image::Rgb(std::array::from_fn(|c| {
            convolve(
                t.weights
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| (horizontal.get_pixel(x, (t.start + i) as u32).0[c], k)),
            )
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_the_documented_examples() {
        let c = PreprocessConfig::default();
        assert_eq!(c.resized_size(1080, 1920).unwrap(), (1088, 1920));
        assert_eq!(c.token_count(1080, 1920).unwrap(), 2040);
        assert_eq!(c.token_count(480, 640).unwrap(), 300);
        assert_eq!(c.resized_size(224, 224).unwrap(), (256, 256));
        assert_eq!(c.token_count(1024, 1024).unwrap(), 1024);
        // 48 / 32 = 1.5 rounds to 2, 80 / 32 = 2.5 rounds to 2 (half to even).
        assert_eq!(
            smart_resize(48 * 4, 80 * 4, 32, 0, u64::MAX).unwrap(),
            (192, 320)
        );
        assert_eq!(smart_resize(48, 80, 32, 0, u64::MAX).unwrap(), (64, 64));
    }

    #[test]
    fn extreme_aspect_ratios_are_rejected() {
        let c = PreprocessConfig::default();
        assert!(matches!(
            c.resized_size(1, 4000),
            Err(ImageError::AspectRatio { .. })
        ));
        assert!(c.resized_size(1, 200).is_ok());
        assert!(c.resized_size(1, 201).is_err());
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
    }

    #[test]
    fn constant_images_stay_constant_through_resampling() {
        let img = RgbImage::from_pixel(13, 29, image::Rgb([200, 3, 77]));
        let out = resize_bicubic(&img, 64, 32);
        assert!(out.pixels().all(|p| p.0 == [200, 3, 77]));
    }

    #[test]
    fn patches_group_each_merge_window_as_four_rows() {
        let c = PreprocessConfig::default();
        // 256x256: already a multiple of 32, at min_pixels: no resampling.
        let img = RgbImage::from_fn(256, 256, |x, y| {
            image::Rgb([(x / 16) as u8, (y / 16) as u8, ((x + y) % 256) as u8])
        });
        let p = preprocess(&DecodedImage::from_rgb(img), &c).unwrap();
        assert_eq!(p.grid_thw, [1, 16, 16]);
        assert_eq!(p.rows, 256);
        assert_eq!(p.token_count(2), 64);
        let level = |v: u8| ((f64::from(v) / 255.0) as f32 - 0.5) / 0.5;
        // Row 0..4 = patches (0,0), (0,1), (1,0), (1,1); row 4 = patch (0,2).
        let red_green = |row: usize| (p.data[row * 1536], p.data[row * 1536 + 512]);
        assert_eq!(red_green(1), (level(1), level(0)));
        assert_eq!(red_green(2), (level(0), level(1)));
        assert_eq!(red_green(3), (level(1), level(1)));
        assert_eq!(red_green(4), (level(2), level(0)));
        // Both temporal frames are the same image.
        assert_eq!(
            p.data[3 * 1536 + 256..3 * 1536 + 512],
            p.data[3 * 1536..3 * 1536 + 256]
        );
    }

    #[test]
    fn transparency_is_composited_on_white() {
        let rgba = image::RgbaImage::from_fn(2, 1, |x, _| {
            image::Rgba(if x == 0 {
                [0, 0, 0, 0]
            } else {
                [0, 100, 200, 255]
            })
        });
        let rgb = composite_on_white(&rgba);
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 100, 200]);
    }
}
