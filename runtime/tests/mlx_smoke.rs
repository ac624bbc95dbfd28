//! MLX computes on this machine: the operations the model is built from, with known answers.
use mlx_rs::{fast, ops, Array, Dtype};

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    ops::abs(&(a - b))
        .unwrap()
        .max(None)
        .unwrap()
        .item_exact::<f32>()
}

#[test]
fn matmul_matches_hand_computed_product() {
    let x = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
    let y = ops::matmul(&x, &x).unwrap();
    assert_eq!(y.as_slice::<f32>(), &[7.0, 10.0, 15.0, 22.0]);
}

#[test]
fn large_matmul_matches_naive_loop() {
    let n = 96usize;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7 % 31) as f32) / 31.0 - 0.5)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i * 11 % 37) as f32) / 37.0 - 0.5)
        .collect();
    let got = ops::matmul(
        Array::from_slice(&a, &[n as i32, n as i32]),
        Array::from_slice(&b, &[n as i32, n as i32]),
    )
    .unwrap();
    let got = got.as_slice::<f32>();
    for (i, j) in [(0, 0), (5, 17), (95, 95), (40, 3)] {
        let want: f32 = (0..n).map(|k| a[i * n + k] * b[k * n + j]).sum();
        assert!(
            (got[i * n + j] - want).abs() < 1e-4,
            "({i},{j}) {} vs {want}",
            got[i * n + j]
        );
    }
}

/// Fused SDPA equals softmax(q kᵀ · scale) v written out with plain ops, causal and not.
#[test]
fn sdpa_matches_plain_attention() {
    mlx_rs::random::seed(7).unwrap();
    let shape = [1, 2, 6, 8];
    let q = mlx_rs::random::normal::<f32>(&shape, None, None, None).unwrap();
    let k = mlx_rs::random::normal::<f32>(&shape, None, None, None).unwrap();
    let v = mlx_rs::random::normal::<f32>(&shape, None, None, None).unwrap();
    let scale = 1.0 / (8f32).sqrt();
    let scores = ops::matmul(&q, k.transpose_axes(&[0, 1, 3, 2]).unwrap()).unwrap() * scale;

    let plain = ops::matmul(ops::softmax_axis(&scores, -1, None).unwrap(), &v).unwrap();
    let fused = fast::scaled_dot_product_attention(&q, &k, &v, scale, None, None).unwrap();
    assert!(max_abs_diff(&plain, &fused) < 1e-5);

    let row = ops::arange::<_, i32>(None, 6, None).unwrap();
    let allowed = row
        .reshape(&[6, 1])
        .unwrap()
        .ge(row.reshape(&[1, 6]).unwrap())
        .unwrap();
    let masked = ops::select(&allowed, &scores, Array::from_f32(f32::NEG_INFINITY)).unwrap();
    let plain_causal = ops::matmul(ops::softmax_axis(&masked, -1, None).unwrap(), &v).unwrap();
    let fused_causal = fast::scaled_dot_product_attention(
        &q,
        &k,
        &v,
        scale,
        fast::ScaledDotProductAttentionMask::Causal,
        None,
    )
    .unwrap();
    assert!(max_abs_diff(&plain_causal, &fused_causal) < 1e-5);
}

#[test]
fn rms_norm_matches_definition() {
    let x = Array::from_slice(&[1.0f32, -2.0, 3.0, -4.0, 0.5, 0.25, -0.125, 2.0], &[2, 4]);
    let w = Array::from_slice(&[0.5f32, 1.0, 1.5, 2.0], &[4]);
    let got = fast::rms_norm(&x, Some(&w), 1e-6).unwrap();
    let xs = x.as_slice::<f32>();
    let ws = w.as_slice::<f32>();
    let got = got.as_slice::<f32>();
    for r in 0..2 {
        let row = &xs[r * 4..r * 4 + 4];
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-6).sqrt();
        for c in 0..4 {
            let want = row[c] / rms * ws[c];
            assert!((got[r * 4 + c] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn safetensors_round_trip_keeps_values_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let x = Array::from_slice(&[1.5f32, -2.25, 3.0, 0.0], &[2, 2]);
    let b = x.as_dtype(Dtype::Bfloat16).unwrap();
    let meta = std::collections::HashMap::from([("format".to_string(), "mlx".to_string())]);
    Array::save_safetensors([("x", &x), ("b", &b)], &meta, &path).unwrap();
    let (loaded, lmeta) = Array::load_safetensors_with_metadata(&path).unwrap();
    assert_eq!(lmeta.get("format").map(String::as_str), Some("mlx"));
    assert_eq!(loaded["x"].as_slice::<f32>(), x.as_slice::<f32>());
    assert_eq!(loaded["b"].dtype(), Dtype::Bfloat16);
    assert_eq!(
        loaded["b"]
            .as_dtype(Dtype::Float32)
            .unwrap()
            .as_slice::<f32>(),
        &[1.5, -2.25, 3.0, 0.0]
    );
}
