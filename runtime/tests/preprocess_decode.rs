//! Decoding: the four accepted formats, GIF's first frame, and bad input refused with typed
//! errors (never a panic or an unbounded allocation).

use std::io::Cursor;

use cathedral_runtime::vision::preprocess::{
    decode_image, preprocess, smart_resize, ImageError, ImageLimits, PreprocessConfig,
};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 9) as u8, (y * 5) as u8, 200]))
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn png_webp_gif_decode_losslessly_and_jpeg_closely() {
    let img = pattern(23, 17);
    for format in [ImageFormat::Png, ImageFormat::WebP] {
        let bytes = encode(&DynamicImage::ImageRgb8(img.clone()), format);
        let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(decoded.rgb(), &img, "{format:?}");
    }
    // GIF quantises to a palette; a flat colour survives exactly.
    let flat = RgbImage::from_pixel(9, 4, Rgb([255, 0, 0]));
    let gif = encode(&DynamicImage::ImageRgb8(flat.clone()), ImageFormat::Gif);
    assert_eq!(
        decode_image(&gif, &ImageLimits::default()).unwrap().rgb(),
        &flat
    );
    let jpeg = encode(&DynamicImage::ImageRgb8(img.clone()), ImageFormat::Jpeg);
    let decoded = decode_image(&jpeg, &ImageLimits::default()).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (23, 17));
}

#[test]
fn animated_gif_gives_its_first_frame() {
    let mut bytes = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut bytes);
        let frames = [Rgba([0, 0, 255, 255]), Rgba([0, 255, 0, 255])]
            .map(|c| image::Frame::new(RgbaImage::from_pixel(6, 5, c)));
        enc.encode_frames(frames).unwrap();
    }
    let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
    assert!(decoded.rgb().pixels().all(|p| p.0 == [0, 0, 255]));
}

#[test]
fn transparent_pixels_become_white() {
    let rgba = RgbaImage::from_fn(4, 4, |x, _| {
        if x < 2 {
            Rgba([10, 20, 30, 0])
        } else {
            Rgba([10, 20, 30, 255])
        }
    });
    let bytes = encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
    let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
    assert_eq!(decoded.rgb().get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(decoded.rgb().get_pixel(3, 3).0, [10, 20, 30]);
}

/// A PNG signature and IHDR claiming `w`×`h`, then nothing: only the header is ever read.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(ihdr);
    png.extend(crc.to_be_bytes());
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn decompression_bombs_are_refused_from_the_header() {
    let bomb = png_header(60_000, 60_000);
    let err = decode_image(&bomb, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::TooManyPixels { .. }), "{err}");
    assert!(err.to_string().contains("pixels"), "{err}");

    // A real, valid image over a lowered cap is refused the same way.
    let png = encode(
        &DynamicImage::ImageRgb8(pattern(100, 100)),
        ImageFormat::Png,
    );
    let small = ImageLimits {
        max_pixels_decoded: 5_000,
        ..ImageLimits::default()
    };
    assert!(matches!(
        decode_image(&png, &small),
        Err(ImageError::TooManyPixels {
            width: 100,
            height: 100,
            ..
        })
    ));
    let few_bytes = ImageLimits {
        max_bytes: 10,
        ..ImageLimits::default()
    };
    assert!(matches!(
        decode_image(&png, &few_bytes),
        Err(ImageError::TooManyBytes { .. })
    ));
}

#[test]
fn garbage_and_unsupported_formats_give_typed_errors() {
    let limits = ImageLimits::default();
    assert!(matches!(decode_image(b"", &limits), Err(ImageError::Empty)));
    assert!(matches!(
        decode_image(b"definitely not an image", &limits),
        Err(ImageError::UnknownFormat)
    ));
    assert!(matches!(
        decode_image(
            b"BM\x00\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00",
            &limits
        ),
        Err(ImageError::UnsupportedFormat(ImageFormat::Bmp))
    ));
    // A truncated PNG: header fine, pixel data missing.
    let mut png = encode(&DynamicImage::ImageRgb8(pattern(30, 30)), ImageFormat::Png);
    png.truncate(png.len() / 2);
    assert!(matches!(
        decode_image(&png, &limits),
        Err(ImageError::Undecodable(_))
    ));
    assert!(matches!(
        decode_image(&png_header(0, 5), &limits),
        Err(ImageError::ZeroSized { .. }) | Err(ImageError::Undecodable(_))
    ));
}

#[test]
fn tiny_images_scale_up_and_extreme_aspects_are_refused() {
    let config = PreprocessConfig::default();
    let one = encode(
        &DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([255, 255, 255]))),
        ImageFormat::Png,
    );
    let p = preprocess(
        &decode_image(&one, &ImageLimits::default()).unwrap(),
        &config,
    )
    .unwrap();
    assert_eq!(p.grid_thw, [1, 16, 16]);
    assert!(p.data.iter().all(|v| *v == 1.0));

    let line = decode_image(
        &encode(&DynamicImage::ImageRgb8(pattern(1, 4000)), ImageFormat::Png),
        &ImageLimits::default(),
    )
    .unwrap();
    let err = preprocess(&line, &config).unwrap_err();
    assert!(matches!(
        err,
        ImageError::AspectRatio {
            width: 1,
            height: 4000
        }
    ));
    assert!(err.to_string().contains("aspect ratio"), "{err}");
    assert!(matches!(
        smart_resize(0, 5, 32, 0, 100),
        Err(ImageError::ZeroSized { .. })
    ));
}

#[test]
fn preprocessor_config_is_read_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        PreprocessConfig::from_checkpoint(dir.path()).unwrap(),
        PreprocessConfig::default()
    );
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"size": {"longest_edge": 1048576, "shortest_edge": 4096}, "patch_size": 14,
            "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48, 0.45, 0.4],
            "image_std": [0.26, 0.26, 0.27], "image_processor_type": "Qwen2VLImageProcessorFast"}"#,
    )
    .unwrap();
    let c = PreprocessConfig::from_checkpoint(dir.path()).unwrap();
    assert_eq!(
        (c.patch_size, c.min_pixels, c.max_pixels),
        (14, 4096, 1_048_576)
    );
    assert_eq!(c.factor(), 28);
    assert_eq!(c.row_len(), 3 * 2 * 14 * 14);
    assert_eq!(c.image_mean, [0.48, 0.45, 0.4]);

    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"min_pixels": 10, "max_pixels": 5, "size": {"longest_edge": 99, "shortest_edge": 1}}"#,
    )
    .unwrap();
    assert!(matches!(
        PreprocessConfig::from_checkpoint(dir.path()),
        Err(ImageError::Config(_))
    ));
}
