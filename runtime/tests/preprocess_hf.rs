//! Image preprocessing against the Hugging Face Qwen2-VL image processor: token counts on the
//! committed size table and pixel values on small committed images, both written by
//! `tools/reference/image_tokens.py` (transformers in `.venv-ref`).

use std::path::{Path, PathBuf};

use cathedral_runtime::vision::preprocess::{
    decode_image, preprocess, DecodedImage, ImageError, ImageLimits, PreprocessConfig,
};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Deserialize)]
struct Table {
    config: TableConfig,
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct TableConfig {
    patch_size: u32,
    temporal_patch_size: u32,
    merge_size: u32,
    min_pixels: u64,
    max_pixels: u64,
}

#[derive(Deserialize)]
struct Row {
    width: u32,
    height: u32,
    resized_height: Option<u32>,
    resized_width: Option<u32>,
    grid_thw: Option<[u32; 3]>,
    tokens: Option<usize>,
    error: Option<String>,
}

#[test]
fn token_counts_equal_the_hf_processor_on_every_table_size() {
    let table: Table = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("image_tokens.json")).unwrap(),
    )
    .unwrap();
    let config = PreprocessConfig::default();
    assert_eq!(
        (
            config.patch_size,
            config.temporal_patch_size,
            config.merge_size,
            config.min_pixels,
            config.max_pixels
        ),
        (
            table.config.patch_size,
            table.config.temporal_patch_size,
            table.config.merge_size,
            table.config.min_pixels,
            table.config.max_pixels
        )
    );
    assert!(table.rows.len() >= 20);
    let mut checked_pixels = 0;
    for row in &table.rows {
        let label = format!("{}x{}", row.width, row.height);
        let resized = config.resized_size(row.height, row.width);
        let tokens = config.token_count(row.height, row.width);
        match &row.error {
            Some(reason) => {
                assert!(reason.contains("aspect ratio"), "{label}: {reason}");
                assert!(
                    matches!(resized, Err(ImageError::AspectRatio { .. })),
                    "{label}: {resized:?}"
                );
                assert!(tokens.is_err());
            }
            None => {
                assert_eq!(
                    resized.unwrap(),
                    (row.resized_height.unwrap(), row.resized_width.unwrap()),
                    "{label}"
                );
                assert_eq!(tokens.unwrap(), row.tokens.unwrap(), "{label}");
                // The full pipeline agrees with the size rule (kept to moderate sizes).
                if u64::from(row.width) * u64::from(row.height) <= 1 << 20 {
                    let img = DecodedImage::from_rgb(image::RgbImage::from_pixel(
                        row.width,
                        row.height,
                        image::Rgb([120, 60, 30]),
                    ));
                    let p = preprocess(&img, &config).unwrap();
                    assert_eq!(p.grid_thw, row.grid_thw.unwrap(), "{label}");
                    assert_eq!(p.token_count(config.merge_size), row.tokens.unwrap());
                    assert_eq!(p.data.len(), p.rows * 1536);
                    checked_pixels += 1;
                }
            }
        }
    }
    assert!(checked_pixels >= 20);
}

#[derive(Deserialize)]
struct PixelCase {
    image: String,
    levels: String,
    min_pixels: u64,
    max_pixels: u64,
    grid_thw: [u32; 3],
    rows: usize,
}

/// Largest difference accepted on JPEG input, in normalised units (2/255 per 8-bit level).
const JPEG_TOLERANCE: f32 = 4.0 * 2.0 / 255.0 + 1e-6;

#[test]
fn pixel_values_equal_the_hf_processor() {
    let dir = fixtures().join("image_tokens_pixels");
    let cases: Vec<PixelCase> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let config = PreprocessConfig {
            min_pixels: case.min_pixels,
            max_pixels: case.max_pixels,
            ..PreprocessConfig::default()
        };
        let bytes = std::fs::read(dir.join(&case.image)).unwrap();
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        let ours = preprocess(&img, &config).unwrap();
        assert_eq!(ours.grid_thw, case.grid_thw, "{}", case.image);
        assert_eq!(ours.rows, case.rows, "{}", case.image);

        // The reference values are 8-bit levels k: value = (k / 255 − 0.5) / 0.5.
        let levels = image::open(dir.join(&case.levels)).unwrap().to_luma8();
        assert_eq!(
            (levels.width() as usize, levels.height() as usize),
            (1536, case.rows)
        );
        let mut max_diff = 0f32;
        let mut differing = 0;
        for (ours, k) in ours.data.iter().zip(levels.as_raw()) {
            let want = ((f64::from(*k) / 255.0) as f32 - 0.5) / 0.5;
            let d = (ours - want).abs();
            if d > 0.0 {
                differing += 1;
            }
            max_diff = max_diff.max(d);
        }
        eprintln!(
            "{}: {} values, {differing} differ, max |diff| {max_diff:e}",
            case.image,
            ours.data.len()
        );
        if case.image.ends_with(".png") {
            // Lossless input: compositing, resampling and normalisation match PIL bit for bit.
            assert_eq!(
                max_diff, 0.0,
                "{}: differs from the HF processor",
                case.image
            );
        } else {
            // JPEG: the decoders (zune-jpeg here, libjpeg-turbo in PIL) round the IDCT and
            // chroma upsampling differently by a few 8-bit levels.
            assert!(
                max_diff <= JPEG_TOLERANCE,
                "{}: max |diff| {max_diff} over {JPEG_TOLERANCE}",
                case.image
            );
        }
    }
}
