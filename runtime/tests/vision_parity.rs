//! The vision tower and MRoPE positions against mlx-vlm 0.7.6 on the tiny checkpoint.
//!
//! Reference values: `runtime/tests/fixtures/vision/`, written by
//! `tools/reference/vision_parity.py` from the checkpoint `cathedral tiny-model --seed 0`
//! writes. Also here: properties the reference cannot show (head padding is exact, bf16
//! stays bf16, every parameter name is a checkpoint key).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cathedral_runtime::cli::{Cli, Command};
use cathedral_runtime::tiny::{tiny_preprocessor_config, write_tiny_model};
use cathedral_runtime::vision::preprocess::{preprocess, DecodedImage, PreprocessConfig};
use cathedral_runtime::vision::{
    mrope_position_ids, rope_delta, TowerOptions, VisionConfig, VisionTower,
};
use clap::Parser;
use mlx_rs::module::ModuleParameters;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{Array, Dtype};
use serde::Deserialize;

const PREFIX: &str = "vision_tower.";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vision")
}

#[derive(Deserialize)]
struct Reference {
    checkpoint: CheckpointInfo,
    grids: Vec<[u32; 3]>,
    image_sizes_wh: Vec<[u32; 2]>,
    input_ids: Vec<u32>,
    position_ids: Vec<Vec<i32>>,
    rope_delta: i32,
    image_token_id: u32,
    spatial_merge_size: usize,
}

#[derive(Deserialize)]
struct CheckpointInfo {
    vision_abs_sum: f64,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture_dir().join("vision_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn reference_features() -> HashMap<String, Array> {
    Array::load_safetensors(fixture_dir().join("vision_reference.safetensors")).unwrap()
}

/// Shape and f32 values of each vision tensor, keyed by its name after `vision_tower.`.
type VisionTensors = BTreeMap<String, (Vec<i32>, Vec<f32>)>;

/// The tiny checkpoint's config and vision tensors (written once per test binary).
fn checkpoint() -> &'static (VisionConfig, VisionTensors) {
    static CKPT: OnceLock<(VisionConfig, VisionTensors)> = OnceLock::new();
    CKPT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        // Through the real command line, so new options keep their documented defaults.
        let out = dir.path().to_str().unwrap();
        let cli =
            Cli::try_parse_from(["cathedral", "tiny-model", "--out", out, "--seed", "0"]).unwrap();
        let Command::TinyModel(args) = cli.command else {
            panic!("tiny-model parses as TinyModel");
        };
        write_tiny_model(&args).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        let cfg: VisionConfig = serde_json::from_value(config["vision_config"].clone()).unwrap();
        let tensors = Array::load_safetensors(dir.path().join("model.safetensors")).unwrap();
        let vision = tensors
            .into_iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(PREFIX)?.to_owned();
                let v = v.as_dtype(Dtype::Float32).unwrap();
                v.eval().unwrap();
                Some((name, (v.shape().to_vec(), v.as_slice::<f32>().to_vec())))
            })
            .collect();
        (cfg, vision)
    })
}

/// A tower holding the checkpoint's weights, cast to `dtype`. Fails on any name or shape
/// that does not match in either direction.
fn tower(dtype: Dtype) -> VisionTower {
    let (cfg, weights) = checkpoint();
    let mut tower = VisionTower::new(cfg).unwrap();
    let mut params = tower.parameters_mut().flatten();
    assert_eq!(
        params
            .keys()
            .map(|k| k.to_string())
            .collect::<std::collections::BTreeSet<_>>(),
        weights.keys().cloned().collect(),
        "tower parameters vs checkpoint keys"
    );
    for (name, (shape, data)) in weights {
        let slot = params.get_mut(name.as_str()).unwrap();
        assert_eq!(slot.shape(), shape.as_slice(), "{name}");
        **slot = Array::from_slice(data, shape).as_dtype(dtype).unwrap();
    }
    drop(params);
    tower
}

/// Row r, column c: ((r·cols + c)·2654435761 mod 2³²) / 2³² · 2 − 1 — the pattern the
/// reference script feeds.
fn pixel_rows(rows: usize, cols: usize) -> Array {
    let data: Vec<f32> = (0..(rows * cols) as u64)
        .map(|i| {
            let h = i.wrapping_mul(2_654_435_761) % (1u64 << 32);
            (h as f64 / (1u64 << 32) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    Array::from_slice(&data, &[rows as i32, cols as i32])
}

fn rows_of(grid: [u32; 3]) -> usize {
    grid.iter().map(|&x| x as usize).product()
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let d = a
        .as_dtype(Dtype::Float32)
        .unwrap()
        .subtract(b.as_dtype(Dtype::Float32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(None)
        .unwrap();
    d.item_cast::<f32>()
}

fn max_abs(a: &Array) -> f32 {
    a.as_dtype(Dtype::Float32)
        .unwrap()
        .abs()
        .unwrap()
        .max(None)
        .unwrap()
        .item_cast::<f32>()
}

/// Per-image inputs: the pixels of all images (one pattern), then each image's slice.
fn inputs(grids: &[[u32; 3]], patch_dim: usize) -> (Array, Vec<Array>) {
    let total: usize = grids.iter().map(|&g| rows_of(g)).sum();
    let all = pixel_rows(total, patch_dim);
    let mut start = 0;
    let parts = grids
        .iter()
        .map(|&g| {
            let n = rows_of(g) as i32;
            let part = all.index((start..start + n, ..));
            start += n;
            part
        })
        .collect();
    (all, parts)
}

#[test]
fn checkpoint_is_the_one_the_reference_used() {
    let (_, weights) = checkpoint();
    let sum: f64 = weights
        .values()
        .map(|(_, d)| d.iter().map(|v| f64::from(v.abs())).sum::<f64>())
        .sum();
    let expected = reference().checkpoint.vision_abs_sum;
    assert!(
        (sum - expected).abs() <= 1e-6 * expected,
        "tiny checkpoint's vision weights changed (|w| sum {sum} vs {expected}): rerun tools/reference/vision_parity.py"
    );
}

#[test]
fn f32_features_match_mlx_vlm() {
    let r = reference();
    let feats = reference_features();
    let tower = tower(Dtype::Float32);
    let (all, parts) = inputs(&r.grids, tower.config().patch_dim());
    for (k, (px, g)) in parts.iter().zip(&r.grids).enumerate() {
        let out = tower.forward(px, &[*g]).unwrap();
        assert_eq!(out.dtype(), Dtype::Float32);
        let want = &feats[&format!("features_{k}_f32")];
        let d = max_abs_diff(&out, want);
        println!(
            "image {k} grid {g:?}: max |Δ| = {d:e} (max |ref| {})",
            max_abs(want)
        );
        assert!(d <= 1e-4, "image {k}: max |Δ| {d}");
    }
    // Both images in one call: attention stays inside each image.
    let out = tower.forward(&all, &r.grids).unwrap();
    let d = max_abs_diff(&out, &feats["features_both_f32"]);
    println!("both images: max |Δ| = {d:e}");
    assert!(d <= 1e-4, "both: max |Δ| {d}");
}

/// The reference script's test image: pixel (x, y) = (x·255 / (w−1), y·255 / (h−1), (x+y) mod 256).
fn test_image(width: u32, height: u32) -> DecodedImage {
    DecodedImage::from_rgb(image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 255 / (width - 1).max(1)) as u8,
            (y * 255 / (height - 1).max(1)) as u8,
            ((x + y) % 256) as u8,
        ])
    }))
}

/// Our preprocessing feeding our tower, against the Hugging Face processor feeding mlx-vlm's.
#[test]
fn preprocessed_images_match_mlx_vlm() {
    let r = reference();
    let feats = reference_features();
    let tower = tower(Dtype::Float32);
    let pre = PreprocessConfig::from_json(&tiny_preprocessor_config().to_string()).unwrap();
    for (k, &[w, h]) in r.image_sizes_wh.iter().enumerate() {
        let patches = preprocess(&test_image(w, h), &pre).unwrap();
        assert_eq!(patches.grid_thw, r.grids[k], "image {k} grid");
        let row_len = (patches.data.len() / patches.rows) as i32;
        let pixels = Array::from_slice(&patches.data, &[patches.rows as i32, row_len]);
        let out = tower.forward(&pixels, &[patches.grid_thw]).unwrap();
        let want = &feats[&format!("features_processed_{k}_f32")];
        let d = max_abs_diff(&out, want);
        println!(
            "processed image {k} ({w}x{h}): max |Δ| = {d:e} (max |ref| {})",
            max_abs(want)
        );
        assert!(d <= 1e-4, "image {k}: max |Δ| {d}");
    }
}

#[test]
fn bf16_features_stay_bf16_and_track_mlx_vlm() {
    let r = reference();
    let feats = reference_features();
    let tower = tower(Dtype::Bfloat16);
    let (all, _) = inputs(&r.grids, tower.config().patch_dim());
    let mut stages = Vec::new();
    let out = tower
        .forward_observed(&all, &r.grids, &mut |stage, x| {
            stages.push((stage, x.dtype()));
            Ok(())
        })
        .unwrap();
    assert_eq!(out.dtype(), Dtype::Bfloat16);
    // The residual stream is bf16 at every stage, not only at the end.
    assert_eq!(stages.len(), 2 + tower.blocks.len());
    for (stage, dtype) in stages {
        assert_eq!(dtype, Dtype::Bfloat16, "{stage:?}");
    }
    let want = &feats["features_both_bf16"];
    let d = max_abs_diff(&out, want);
    let scale = max_abs(want);
    println!("bf16 both images: max |Δ| = {d:e} (max |ref| {scale})");
    // Every stage rounds where the reference's does (rotary in f32 rounded once, bias folded
    // into the matmul, conv then bias), so the bf16 features are the reference's bit for bit.
    assert!(d == 0.0, "bf16: max |Δ| {d} vs scale {scale}");
}

/// Every speed option (head padding 72→80 style, dtype anchoring, fused elementwise
/// graphs) computes the same function: in f32 they agree to rounding.
#[test]
fn speed_options_do_not_change_results() {
    let r = reference();
    let mut tower = tower(Dtype::Float32);
    let (all, _) = inputs(&r.grids, tower.config().patch_dim());
    let base = TowerOptions {
        anchor_dtype: true,
        pad_heads: false,
        fused_elementwise: false,
    };
    tower.set_options(base);
    let plain = tower.forward(&all, &r.grids).unwrap();
    for options in [
        TowerOptions {
            pad_heads: true,
            ..base
        },
        TowerOptions {
            fused_elementwise: true,
            ..base
        },
        TowerOptions {
            anchor_dtype: false,
            ..base
        },
    ] {
        tower.set_options(options);
        let out = tower.forward(&all, &r.grids).unwrap();
        let d = max_abs_diff(&out, &plain);
        println!("{options:?}: max |Δ| {d:e}");
        assert!(d <= 1e-6, "{options:?}: max |Δ| {d}");
    }
}

#[test]
fn head_padding_is_exact_at_the_real_head_size() {
    // head_dim 72 (hidden 144 over 2 heads) pads to 80, as in the real tower.
    let cfg = VisionConfig {
        depth: 1,
        hidden_size: 144,
        num_heads: 2,
        intermediate_size: 64,
        out_hidden_size: 16,
        num_position_embeddings: 16,
        ..VisionConfig::default()
    };
    assert_eq!(cfg.head_dim(), 72);
    let mut tower = VisionTower::new(&cfg).unwrap();
    {
        let mut params = tower.parameters_mut().flatten();
        for (i, (_, slot)) in params.iter_mut().enumerate() {
            let shape = slot.shape().to_vec();
            let key = mlx_rs::random::key(i as u64).unwrap();
            **slot = mlx_rs::random::normal::<f32>(shape.as_slice(), None, 0.1, &key).unwrap();
        }
    }
    let grid = [1, 4, 6];
    let pixels = pixel_rows(24, cfg.patch_dim());
    let base = TowerOptions::default();
    tower.set_options(TowerOptions {
        pad_heads: false,
        ..base
    });
    let plain = tower.forward(&pixels, &[grid]).unwrap();
    tower.set_options(TowerOptions {
        pad_heads: true,
        ..base
    });
    let padded = tower.forward(&pixels, &[grid]).unwrap();
    let d = max_abs_diff(&padded, &plain);
    assert!(max_abs(&plain) > 1e-3, "a degenerate output proves nothing");
    assert!(d <= 1e-6, "72 vs 80: max |Δ| {d}");
}

#[test]
fn mrope_positions_match_mlx_vlm() {
    let r = reference();
    let (positions, next) = mrope_position_ids(
        &r.input_ids,
        &r.grids,
        r.image_token_id,
        r.spatial_merge_size,
    )
    .unwrap();
    assert_eq!(positions.len(), r.input_ids.len());
    for axis in 0..3 {
        let ours: Vec<i32> = positions.iter().map(|p| p[axis]).collect();
        assert_eq!(ours, r.position_ids[axis], "axis {axis}");
    }
    assert_eq!(rope_delta(next, r.input_ids.len()), r.rope_delta);
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let tower = tower(Dtype::Float32);
    let dim = tower.config().patch_dim();
    // Grid covers 16 patches, pixels have 12.
    assert!(tower.forward(&pixel_rows(12, dim), &[[1, 4, 4]]).is_err());
    // Grid not divisible by the merge size.
    assert!(tower.forward(&pixel_rows(12, dim), &[[1, 3, 4]]).is_err());
    // Wrong row width.
    assert!(tower
        .forward(&pixel_rows(16, dim - 1), &[[1, 4, 4]])
        .is_err());
    assert!(tower.forward(&pixel_rows(16, dim), &[]).is_err());
}
