//! The strict loader on variants of the tiny checkpoint: Hugging Face layout, shards, missing /
//! unexpected / wrong-shape tensors, text-only, 8-bit; the engine's vision states; and the
//! projections stacked after loading.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use cathedral_runtime::engine::{Engine, EngineError, EngineOptions, VisionAvailability};
use cathedral_runtime::loader::{load_model, LoadOptions, LoaderError};
use cathedral_runtime::model::decoder::FeedForward;
use cathedral_runtime::model::{LanguageModel, LogitsScope};
use cathedral_runtime::prompt::{ChatMessage, ContentPart, Role};
use cathedral_runtime::tiny::{write_tiny_model, TinyDtype, TinyModelArgs};
use cathedral_runtime::vision::preprocess::DecodedImage;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{ops, Array, Dtype};

static MLX: Mutex<()> = Mutex::new(());

const SIDE_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
];

fn tiny(q_bits: Option<i32>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&TinyModelArgs {
        out: dir.path().to_path_buf(),
        seed: 3,
        dtype: TinyDtype::F32,
        q_bits,
        q_group_size: 32,
    })
    .unwrap();
    dir
}

fn tensors(dir: &Path) -> HashMap<String, Array> {
    Array::load_safetensors(dir.join("model.safetensors")).unwrap()
}

/// A sibling checkpoint directory with the same side files and these tensors in `files`.
fn variant(src: &Path, files: &[(&str, HashMap<String, Array>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in SIDE_FILES {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    for (name, map) in files {
        Array::save_safetensors(
            map.iter().map(|(k, v)| (k.as_str(), v)),
            None,
            dir.path().join(name),
        )
        .unwrap();
    }
    dir
}

fn text_logits(dir: &Path) -> Array {
    let model = load_model(dir, LoadOptions { vision: false }).unwrap();
    let lm = &model.language_model;
    let ids = [9419, 1814, 11, 279, 76435, 15175, 13, 248046];
    let len = ids.len() as i32;
    let embeds = lm.embed(&Array::from_slice(&ids, &[1, len])).unwrap();
    let pos: Vec<i32> = (0..3).flat_map(|_| 0..len).collect();
    let mut cache = lm.new_cache();
    lm.forward(
        &embeds,
        &Array::from_slice(&pos, &[3, len]),
        &mut cache,
        LogitsScope::All,
    )
    .unwrap()
}

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    a.subtract(b)
        .unwrap()
        .abs()
        .unwrap()
        .max(None)
        .unwrap()
        .item_exact::<f32>()
}

fn unmatched(dir: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    match load_model(dir, LoadOptions { vision: true }) {
        Err(LoaderError::UnmatchedTensors {
            missing,
            unexpected,
            shape_mismatch,
        }) => (
            missing,
            unexpected,
            shape_mismatch.into_iter().map(|m| m.name).collect(),
        ),
        other => panic!("expected UnmatchedTensors, got {:?}", other.map(|_| ())),
    }
}

/// Rewrites an mlx-community tensor set into the Hugging Face layout.
fn to_hf_layout(mlx: HashMap<String, Array>) -> HashMap<String, Array> {
    let shifted = [
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    ];
    let mut out = HashMap::new();
    let mut experts: HashMap<String, HashMap<&str, Array>> = HashMap::new();
    for (k, mut v) in mlx {
        if k.starts_with("language_model.") && shifted.iter().any(|s| k.ends_with(s)) {
            v = v.subtract(Array::from_f32(1.0)).unwrap();
        }
        if k.contains("conv1d.weight") {
            v = v.swap_axes(1, 2).unwrap();
        }
        if k.ends_with("patch_embed.proj.weight") {
            v = v.transpose_axes(&[0, 4, 1, 2, 3]).unwrap();
        }
        let k = if let Some(rest) = k.strip_prefix("language_model.model.") {
            format!("model.language_model.{rest}")
        } else if let Some(rest) = k.strip_prefix("vision_tower.") {
            format!("model.visual.{rest}")
        } else {
            k.replace("language_model.lm_head", "lm_head")
        };
        if let Some((prefix, proj)) = k.split_once(".switch_mlp.") {
            let proj = match proj {
                "gate_proj.weight" => "gate",
                "up_proj.weight" => "up",
                _ => "down",
            };
            experts
                .entry(prefix.to_string())
                .or_default()
                .insert(proj, v);
            continue;
        }
        out.insert(k, v);
    }
    for (prefix, mut e) in experts {
        let gate_up =
            ops::concatenate(&[e.remove("gate").unwrap(), e.remove("up").unwrap()], 1).unwrap();
        out.insert(format!("{prefix}.experts.gate_up_proj"), gate_up);
        out.insert(
            format!("{prefix}.experts.down_proj"),
            e.remove("down").unwrap(),
        );
    }
    out.insert(
        "mtp.fc.weight".into(),
        Array::zeros::<f32>(&[4, 4]).unwrap(),
    );
    out
}

#[test]
fn hugging_face_layout_and_shards_load_to_the_same_model() {
    let _g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    let base = tiny(None);
    let reference = text_logits(base.path());

    let hf = variant(
        base.path(),
        &[("model.safetensors", to_hf_layout(tensors(base.path())))],
    );
    let d = max_abs_diff(&text_logits(hf.path()), &reference);
    assert!(d <= 1e-5, "HF layout changes logits by {d}");
    // The vision tower converts too (patch-embed axis order, names).
    let loaded = load_model(hf.path(), LoadOptions { vision: true }).unwrap();
    assert!(loaded.vision_tower.is_some());

    let all = tensors(base.path());
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second): (Vec<_>, Vec<_>) = names.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let pick = |part: &[(usize, &&String)]| -> HashMap<String, Array> {
        part.iter()
            .map(|(_, n)| ((**n).clone(), all[**n].clone()))
            .collect()
    };
    let (a, b) = (pick(&first), pick(&second));
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": a.keys().map(|k| (k.clone(), serde_json::json!("model-00001-of-00002.safetensors")))
            .chain(b.keys().map(|k| (k.clone(), serde_json::json!("model-00002-of-00002.safetensors"))))
            .collect::<serde_json::Map<_, _>>()
    });
    let sharded = variant(
        base.path(),
        &[
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ],
    );
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(max_abs_diff(&text_logits(sharded.path()), &reference), 0.0);
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named() {
    let _g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    let base = tiny(None);
    let mut t = tensors(base.path());
    t.remove("language_model.model.layers.1.self_attn.k_norm.weight");
    t.insert(
        "language_model.model.layers.0.mlp.extra.weight".into(),
        Array::zeros::<f32>(&[2]).unwrap(),
    );
    t.insert(
        "vision_tower.merger.norm.bias".into(),
        Array::zeros::<f32>(&[5]).unwrap(),
    );
    let broken = variant(base.path(), &[("model.safetensors", t)]);
    let (missing, unexpected, shape) = unmatched(broken.path());
    assert_eq!(
        missing,
        ["language_model.model.layers.1.self_attn.k_norm.weight"]
    );
    assert_eq!(
        unexpected,
        ["language_model.model.layers.0.mlp.extra.weight"]
    );
    assert_eq!(shape, ["vision_tower.merger.norm.bias"]);
    let message = load_model(broken.path(), LoadOptions { vision: false })
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("k_norm") && message.contains("mlp.extra") && message.contains("[32]"),
        "{message}"
    );
}

#[test]
fn text_only_checkpoint_and_vision_states() {
    let _g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    let base = tiny(None);
    let text_only: HashMap<String, Array> = tensors(base.path())
        .into_iter()
        .filter(|(k, _)| !k.starts_with("vision_tower."))
        .collect();
    let dir = variant(base.path(), &[("model.safetensors", text_only)]);
    let loaded = load_model(dir.path(), LoadOptions { vision: true }).unwrap();
    assert!(loaded.vision_tower.is_none() && !loaded.has_vision_weights);

    let image = DecodedImage::from_rgb(image::RgbImage::from_pixel(
        40,
        40,
        image::Rgb([10, 200, 30]),
    ));
    let messages = vec![ChatMessage {
        role: Role::User,
        content: vec![
            ContentPart::Image(image),
            ContentPart::Text("what is this?".into()),
        ],
    }];
    let engine = Engine::load(
        dir.path(),
        &EngineOptions {
            vision_enabled: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(engine.vision(), VisionAvailability::Unsupported);
    assert!(matches!(
        engine.prepare(&messages),
        Err(EngineError::VisionUnavailable(
            VisionAvailability::Unsupported
        ))
    ));

    let engine = Engine::load(
        base.path(),
        &EngineOptions {
            vision_enabled: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(engine.vision(), VisionAvailability::NotWired);
    assert!(matches!(
        engine.prepare(&messages),
        Err(EngineError::VisionUnavailable(VisionAvailability::NotWired))
    ));

    let engine = Engine::load(
        base.path(),
        &EngineOptions {
            vision_enabled: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(engine.vision(), VisionAvailability::Ready);
    let prepared = engine.prepare(&messages).unwrap();
    assert_eq!(prepared.image_count(), 1);
    // 40×40 → 64×64 is below min_pixels: scaled up to 256×256 → 64 tokens.
    let pads = prepared
        .token_ids()
        .iter()
        .filter(|&&t| t == engine.config().image_token_id)
        .count();
    assert_eq!(pads, 64);
}

#[test]
fn eight_bit_checkpoint_loads_quantized_and_tracks_fp32() {
    let _g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    let base = tiny(None);
    let q8 = tiny(Some(8));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q8.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization"]["bits"], 8);
    let loaded = load_model(q8.path(), LoadOptions { vision: true }).unwrap();
    let head = loaded.language_model.lm_head.as_ref().unwrap();
    assert_eq!(head.quant.map(|q| (q.bits, q.group_size)), Some((8, 32)));
    assert_eq!(head.weight.dtype(), Dtype::Uint32);
    let d = max_abs_diff(&text_logits(q8.path()), &text_logits(base.path()));
    println!("8-bit vs fp32: max |Δlogit| = {d:.3e}");
    assert!(d < 0.1, "8-bit logits drift {d} from fp32");
}

#[test]
fn tiny_model_is_deterministic_and_fully_random() {
    let _g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (tiny(None), tiny(None));
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        let (x, y) = (
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between two runs with the same seed");
    }
    let other = tempfile::tempdir().unwrap();
    write_tiny_model(&TinyModelArgs {
        out: other.path().to_path_buf(),
        seed: 4,
        dtype: TinyDtype::F32,
        q_bits: None,
        q_group_size: 32,
    })
    .unwrap();
    assert!(
        std::fs::read(a.path().join("model.safetensors")).unwrap()
            != std::fs::read(other.path().join("model.safetensors")).unwrap()
    );
    // No tensor is constant: norms and biases are random too.
    for (name, t) in tensors(a.path()) {
        let spread = t
            .max(None)
            .unwrap()
            .subtract(t.min(None).unwrap())
            .unwrap()
            .item_exact::<f32>();
        assert!(spread > 0.0, "{name} is constant");
    }
}

/// The model with every stacked projection dropped, so each part runs its own matmul.
fn unstacked(lm: &LanguageModel) -> LanguageModel {
    let mut plain = lm.clone();
    for layer in &mut plain.model.layers {
        if let Some(d) = &mut layer.linear_attn {
            d.in_proj = None;
        }
        if let Some(a) = &mut layer.self_attn {
            a.qkv = None;
        }
        match &mut layer.mlp {
            FeedForward::Moe(m) => {
                m.router = None;
                m.shared_expert.gate_up = None;
                m.switch_mlp.gate_up = None;
            }
            FeedForward::Dense(m) => m.gate_up = None,
        }
    }
    plain
}

/// Prefill logits at every position, then greedy decode steps' logits.
fn prefill_and_decode(lm: &LanguageModel) -> Vec<Array> {
    let ids = [9419, 1814, 11, 279, 76435, 15175, 13, 248046];
    let len = ids.len() as i32;
    let mut cache = lm.new_cache();
    let embeds = lm.embed(&Array::from_slice(&ids, &[1, len])).unwrap();
    let pos: Vec<i32> = (0..3).flat_map(|_| 0..len).collect();
    let mut out = vec![lm
        .forward(
            &embeds,
            &Array::from_slice(&pos, &[3, len]),
            &mut cache,
            LogitsScope::All,
        )
        .unwrap()];
    for step in 0..4 {
        let last = out.last().unwrap();
        let n = last.shape()[1];
        let tok = mlx_rs::ops::indexing::argmax_axis(last.index((.., n - 1, ..)), -1, false)
            .unwrap()
            .as_dtype(Dtype::Int32)
            .unwrap()
            .reshape(&[1, 1])
            .unwrap();
        let p = len + step;
        let logits = lm
            .forward(
                &lm.embed(&tok).unwrap(),
                &Array::from_slice(&[p, p, p], &[3, 1]),
                &mut cache,
                LogitsScope::Last,
            )
            .unwrap();
        out.push(logits);
    }
    out
}

#[test]
fn stacked_projections_compute_what_the_separate_ones_do() {
    let _g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    for q_bits in [None, Some(4)] {
        let dir = tiny(q_bits);
        let model = load_model(dir.path(), LoadOptions { vision: false }).unwrap();
        let lm = &model.language_model;
        for layer in &lm.model.layers {
            assert!(layer
                .linear_attn
                .as_ref()
                .is_none_or(|d| d.in_proj.is_some()));
            assert!(layer.self_attn.as_ref().is_none_or(|a| a.qkv.is_some()));
            if let FeedForward::Moe(m) = &layer.mlp {
                assert!(m.router.is_some() && m.switch_mlp.gate_up.is_some());
                assert!(m.shared_expert.gate_up.is_some());
            }
        }
        // The parts are views into the stacks and still hold the checkpoint's tensors.
        let stored = tensors(dir.path());
        let delta = lm.model.layers[0].linear_attn.as_ref().unwrap();
        for (name, part) in [
            ("in_proj_z", &delta.in_proj_z),
            ("in_proj_a", &delta.in_proj_a),
        ] {
            let key = format!("language_model.model.layers.0.linear_attn.{name}.weight");
            assert!(
                part.weight.eq_values(&stored[&key]).unwrap(),
                "{name} ({q_bits:?})"
            );
        }
        let plain = unstacked(lm);
        for (i, (a, b)) in prefill_and_decode(lm)
            .iter()
            .zip(prefill_and_decode(&plain))
            .enumerate()
        {
            let d = max_abs_diff(a, &b);
            assert!(d <= 1e-4, "{q_bits:?} step {i}: max |Δlogit| {d}");
        }
    }
}
