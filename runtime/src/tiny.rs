//! `cathedral tiny-model`: a small random `qwen3_5_moe` checkpoint in the mlx-community layout
//! that walks every code path (DeltaNet and full-attention layers, MoE with a shared expert, a
//! vision tower whose position table must be interpolated) and loads in well under a second.
//!
//! Deterministic: the same seed and dtype give the same bytes (seeded ChaCha stream over the
//! tensors in sorted-name order; safetensors header sorted by name).
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::tokenizer;
use crate::vision::VisionConfig;

/// Weight dtype of the written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TinyDtype {
    F32,
    Bf16,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TinyModelArgs {
    /// Directory to write the checkpoint into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the weight generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight dtype.
    #[arg(long, value_enum, default_value_t = TinyDtype::F32)]
    pub dtype: TinyDtype,
    /// Quantize the text weights with MLX (affine) to this many bits (4 or 8), as
    /// `mlx_vlm.convert --quantize` does.
    #[arg(long, value_parser = clap::value_parser!(i32).range(2..=8))]
    pub q_bits: Option<i32>,
    /// Group size of the quantization.
    #[arg(long, default_value_t = 64)]
    pub q_group_size: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum TinyModelError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("quantization: {0}")]
    Quantize(#[from] mlx_rs::error::Exception),
}

/// The `config.json` of the tiny model (dims of the foundation issue, real special-token ids).
pub fn tiny_config() -> Value {
    json!({
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "eos_token_id": [248046, 248044],
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "full_attention_interval": 2,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "attention_bias": false,
            "attn_output_gate": true,
            "linear_num_key_heads": 1,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "rms_norm_eps": 1e-6,
            "vocab_size": 248320,
            "max_position_embeddings": 4096,
            "eos_token_id": 248044,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "mrope_interleaved": true,
                "mrope_section": [2, 1, 1],
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25
            }
        },
        "vision_config": {
            "model_type": "qwen3_5_moe",
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
            "out_hidden_size": 32,
            "num_position_embeddings": 16,
            "hidden_act": "gelu_pytorch_tanh",
            "deepstack_visual_indexes": []
        }
    })
}

/// Qwen2-VL image processor settings (the real checkpoint's values).
pub fn tiny_preprocessor_config() -> Value {
    json!({
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "do_convert_rgb": true,
        "do_resize": true,
        "do_rescale": true,
        "do_normalize": true,
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": 65536, "longest_edge": 16777216}
    })
}

/// How a tensor is initialised (all random: a wrong `1 + w` norm convention must show).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform in ±1/√fan_in (linear and conv weights).
    FanIn(usize),
    /// Uniform in [lo, hi).
    Uniform(f32, f32),
    /// log of uniform in [lo, hi) (`A_log`).
    LogUniform(f32, f32),
}

/// One tensor of the checkpoint: mlx-community name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

fn spec(name: String, shape: &[usize], init: Init) -> TensorSpec {
    TensorSpec {
        name,
        shape: shape.to_vec(),
        init,
    }
}

const NORM: Init = Init::Uniform(0.5, 1.5);
const BIAS: Init = Init::Uniform(-0.1, 0.1);

/// Every tensor of a `qwen3_5_moe` checkpoint with this config, in the mlx-community layout.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let t = &cfg.text_config;
    let h = t.hidden_size;
    let mut out = vec![
        spec(
            "language_model.model.embed_tokens.weight".into(),
            &[t.vocab_size, h],
            Init::Uniform(-1.0, 1.0),
        ),
        spec("language_model.model.norm.weight".into(), &[h], NORM),
    ];
    if !t.tie_word_embeddings {
        out.push(spec(
            "language_model.lm_head.weight".into(),
            &[t.vocab_size, h],
            Init::FanIn(h),
        ));
    }
    for i in 0..t.num_hidden_layers {
        let p = format!("language_model.model.layers.{i}");
        out.push(spec(format!("{p}.input_layernorm.weight"), &[h], NORM));
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            NORM,
        ));
        if t.is_linear_layer(i) {
            let a = format!("{p}.linear_attn");
            let key_dim = t.linear_num_key_heads * t.linear_key_head_dim;
            let value_dim = t.linear_num_value_heads * t.linear_value_head_dim;
            let conv_dim = 2 * key_dim + value_dim;
            let nv = t.linear_num_value_heads;
            out.push(spec(
                format!("{a}.in_proj_qkv.weight"),
                &[conv_dim, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{a}.in_proj_z.weight"),
                &[value_dim, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{a}.in_proj_b.weight"),
                &[nv, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{a}.in_proj_a.weight"),
                &[nv, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{a}.conv1d.weight"),
                &[conv_dim, t.linear_conv_kernel_dim, 1],
                Init::FanIn(t.linear_conv_kernel_dim),
            ));
            out.push(spec(format!("{a}.dt_bias"), &[nv], Init::Uniform(0.5, 1.5)));
            out.push(spec(
                format!("{a}.A_log"),
                &[nv],
                Init::LogUniform(1.0, 16.0),
            ));
            out.push(spec(
                format!("{a}.norm.weight"),
                &[t.linear_value_head_dim],
                NORM,
            ));
            out.push(spec(
                format!("{a}.out_proj.weight"),
                &[h, value_dim],
                Init::FanIn(value_dim),
            ));
        } else {
            let a = format!("{p}.self_attn");
            let hd = t.head_dim();
            let q = t.num_attention_heads * hd;
            let kv = t.num_key_value_heads * hd;
            out.push(spec(
                format!("{a}.q_proj.weight"),
                &[2 * q, h],
                Init::FanIn(h),
            ));
            out.push(spec(format!("{a}.k_proj.weight"), &[kv, h], Init::FanIn(h)));
            out.push(spec(format!("{a}.v_proj.weight"), &[kv, h], Init::FanIn(h)));
            out.push(spec(format!("{a}.o_proj.weight"), &[h, q], Init::FanIn(q)));
            if t.attention_bias {
                out.push(spec(format!("{a}.q_proj.bias"), &[2 * q], BIAS));
                out.push(spec(format!("{a}.k_proj.bias"), &[kv], BIAS));
                out.push(spec(format!("{a}.v_proj.bias"), &[kv], BIAS));
                out.push(spec(format!("{a}.o_proj.bias"), &[h], BIAS));
            }
            out.push(spec(format!("{a}.q_norm.weight"), &[hd], NORM));
            out.push(spec(format!("{a}.k_norm.weight"), &[hd], NORM));
        }
        let m = format!("{p}.mlp");
        if t.is_moe() {
            let e = t.num_experts.unwrap_or(0);
            let mi = t.moe_intermediate_size.unwrap_or(0);
            let si = t.shared_expert_intermediate_size.unwrap_or(0);
            out.push(spec(format!("{m}.gate.weight"), &[e, h], Init::FanIn(h)));
            out.push(spec(
                format!("{m}.switch_mlp.gate_proj.weight"),
                &[e, mi, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{m}.switch_mlp.up_proj.weight"),
                &[e, mi, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{m}.switch_mlp.down_proj.weight"),
                &[e, h, mi],
                Init::FanIn(mi),
            ));
            out.push(spec(
                format!("{m}.shared_expert.gate_proj.weight"),
                &[si, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{m}.shared_expert.up_proj.weight"),
                &[si, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{m}.shared_expert.down_proj.weight"),
                &[h, si],
                Init::FanIn(si),
            ));
            out.push(spec(
                format!("{m}.shared_expert_gate.weight"),
                &[1, h],
                Init::FanIn(h),
            ));
        } else {
            let mi = t.intermediate_size.unwrap_or(0);
            out.push(spec(
                format!("{m}.gate_proj.weight"),
                &[mi, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{m}.up_proj.weight"),
                &[mi, h],
                Init::FanIn(h),
            ));
            out.push(spec(
                format!("{m}.down_proj.weight"),
                &[h, mi],
                Init::FanIn(mi),
            ));
        }
    }
    if let Some(v) = &cfg.vision_config {
        out.extend(vision_specs(v));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn vision_specs(v: &VisionConfig) -> Vec<TensorSpec> {
    let hid = v.hidden_size;
    let inter = v.intermediate_size;
    let (patch, temporal, chans) = (v.patch_size, v.temporal_patch_size, v.in_channels);
    let merged = hid * v.spatial_merge_size * v.spatial_merge_size;
    let out_hid = v.out_hidden_size;
    let p = "vision_tower";
    let patch_fan = chans * temporal * patch * patch;
    let mut out = vec![
        spec(
            format!("{p}.patch_embed.proj.weight"),
            &[hid, temporal, patch, patch, chans],
            Init::FanIn(patch_fan),
        ),
        spec(format!("{p}.patch_embed.proj.bias"), &[hid], BIAS),
        spec(
            format!("{p}.pos_embed.weight"),
            &[v.num_position_embeddings, hid],
            Init::Uniform(-1.0, 1.0),
        ),
        spec(format!("{p}.merger.norm.weight"), &[hid], NORM),
        spec(format!("{p}.merger.norm.bias"), &[hid], BIAS),
        spec(
            format!("{p}.merger.linear_fc1.weight"),
            &[merged, merged],
            Init::FanIn(merged),
        ),
        spec(format!("{p}.merger.linear_fc1.bias"), &[merged], BIAS),
        spec(
            format!("{p}.merger.linear_fc2.weight"),
            &[out_hid, merged],
            Init::FanIn(merged),
        ),
        spec(format!("{p}.merger.linear_fc2.bias"), &[out_hid], BIAS),
    ];
    for i in 0..v.depth {
        let b = format!("{p}.blocks.{i}");
        out.push(spec(format!("{b}.norm1.weight"), &[hid], NORM));
        out.push(spec(format!("{b}.norm1.bias"), &[hid], BIAS));
        out.push(spec(format!("{b}.norm2.weight"), &[hid], NORM));
        out.push(spec(format!("{b}.norm2.bias"), &[hid], BIAS));
        out.push(spec(
            format!("{b}.attn.qkv.weight"),
            &[3 * hid, hid],
            Init::FanIn(hid),
        ));
        out.push(spec(format!("{b}.attn.qkv.bias"), &[3 * hid], BIAS));
        out.push(spec(
            format!("{b}.attn.proj.weight"),
            &[hid, hid],
            Init::FanIn(hid),
        ));
        out.push(spec(format!("{b}.attn.proj.bias"), &[hid], BIAS));
        out.push(spec(
            format!("{b}.mlp.linear_fc1.weight"),
            &[inter, hid],
            Init::FanIn(hid),
        ));
        out.push(spec(format!("{b}.mlp.linear_fc1.bias"), &[inter], BIAS));
        out.push(spec(
            format!("{b}.mlp.linear_fc2.weight"),
            &[hid, inter],
            Init::FanIn(inter),
        ));
        out.push(spec(format!("{b}.mlp.linear_fc2.bias"), &[hid], BIAS));
    }
    out
}

fn sample(rng: &mut StdRng, init: Init, n: usize) -> Vec<f32> {
    match init {
        Init::FanIn(fan) => {
            let a = 1.0 / (fan as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-a..a)).collect()
        }
        Init::Uniform(lo, hi) => (0..n).map(|_| rng.gen_range(lo..hi)).collect(),
        Init::LogUniform(lo, hi) => (0..n).map(|_| rng.gen_range(lo..hi).ln()).collect(),
    }
}

struct Tensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(values: &[f32], dtype: TinyDtype) -> (safetensors::Dtype, Vec<u8>) {
    match dtype {
        TinyDtype::F32 => (
            safetensors::Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        TinyDtype::Bf16 => (
            safetensors::Dtype::BF16,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TinyModelError> {
    std::fs::write(path, bytes).map_err(|source| TinyModelError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), TinyModelError> {
    let mut text = serde_json::to_string_pretty(v).expect("json values always serialise");
    text.push('\n');
    write_file(path, text.as_bytes())
}

/// Writes the checkpoint directory: config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json, preprocessor_config.json.
pub fn write_tiny_model(args: &TinyModelArgs) -> Result<(), TinyModelError> {
    let dir = &args.out;
    std::fs::create_dir_all(dir).map_err(|source| TinyModelError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut config = tiny_config();
    let torch_dtype = match args.dtype {
        TinyDtype::F32 => "float32",
        TinyDtype::Bf16 => "bfloat16",
    };
    config["torch_dtype"] = json!(torch_dtype);
    let parsed = ModelConfig::from_json(&config.to_string())?;

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut overrides = serde_json::Map::new();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for s in tensor_specs(&parsed) {
        let n = s.shape.iter().product();
        let values = sample(&mut rng, s.init, n);
        let (dtype, bytes) = encode(&values, args.dtype);
        let tensor = Tensor {
            dtype,
            shape: s.shape,
            bytes,
        };
        let plan = args
            .q_bits
            .and_then(|bits| quant_plan(&s.name, &tensor.shape, bits, args.q_group_size));
        match plan {
            None => tensors.push((s.name, tensor)),
            Some((module, group_size, bits)) => {
                if (group_size, Some(bits)) != (args.q_group_size, args.q_bits) {
                    overrides.insert(
                        module.clone(),
                        json!({"group_size": group_size, "bits": bits}),
                    );
                }
                for (suffix, t) in
                    quantize_tensor(&values, &tensor.shape, args.dtype, group_size, bits)?
                {
                    tensors.push((format!("{module}.{suffix}"), t));
                }
            }
        }
    }
    if let Some(bits) = args.q_bits {
        let mut q = serde_json::Map::new();
        q.insert("group_size".into(), json!(args.q_group_size));
        q.insert("bits".into(), json!(bits));
        q.insert("mode".into(), json!("affine"));
        q.extend(overrides);
        config["quantization"] = Value::Object(q.clone());
        config["quantization_config"] = Value::Object(q);
    }
    let metadata = std::collections::HashMap::from([("format".to_string(), "mlx".to_string())]);
    let weights_path = dir.join("model.safetensors");
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))?;
    write_file(&weights_path, &bytes)?;

    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &tiny_preprocessor_config(),
    )?;
    write_tokenizer(dir)?;
    Ok(())
}

/// Which tensors MLX quantization (as `mlx_vlm.convert` applies it) turns into
/// weight/scales/biases: linear, embedding and expert weights of the text model whose input
/// dimension the group size divides; the MoE router and shared-expert gate at 8 bits / group
/// 64. The vision tower stays in floating point. Returns (module path, group size, bits).
fn quant_plan(
    name: &str,
    shape: &[usize],
    bits: i32,
    group_size: i32,
) -> Option<(String, i32, i32)> {
    let module = name.strip_suffix(".weight")?;
    if !name.starts_with("language_model.") || shape.len() < 2 || name.contains("conv1d") {
        return None;
    }
    let (g, b) = if module.ends_with("mlp.gate") || module.ends_with("shared_expert_gate") {
        (64, 8)
    } else {
        (group_size, bits)
    };
    shape[shape.len() - 1]
        .is_multiple_of(g as usize)
        .then(|| (module.to_string(), g, b))
}

/// MLX affine quantization of one tensor: packed `weight` (uint32), `scales`, `biases`.
fn quantize_tensor(
    values: &[f32],
    shape: &[usize],
    dtype: TinyDtype,
    group_size: i32,
    bits: i32,
) -> Result<Vec<(&'static str, Tensor)>, TinyModelError> {
    let dims: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
    let mut w = mlx_rs::Array::from_slice(values, &dims);
    if dtype == TinyDtype::Bf16 {
        w = w.as_dtype(mlx_rs::Dtype::Bfloat16)?;
    }
    let (packed, scales, biases) = mlx_rs::ops::quantize(&w, group_size, bits)?;
    Ok(vec![
        ("weight", array_tensor(&packed)?),
        ("scales", array_tensor(&scales)?),
        ("biases", array_tensor(&biases)?),
    ])
}

fn array_tensor(a: &mlx_rs::Array) -> Result<Tensor, TinyModelError> {
    a.eval()?;
    let shape = a.shape().iter().map(|&d| d as usize).collect();
    let (dtype, bytes) = match a.dtype() {
        mlx_rs::Dtype::Uint32 => (
            safetensors::Dtype::U32,
            a.as_slice::<u32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        mlx_rs::Dtype::Float32 => (
            safetensors::Dtype::F32,
            a.as_slice::<f32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        mlx_rs::Dtype::Bfloat16 => (
            safetensors::Dtype::BF16,
            a.as_slice::<half::bf16>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(TinyModelError::Quantize(mlx_rs::error::Exception::custom(
                format!("unexpected dtype {other:?}"),
            )))
        }
    };
    Ok(Tensor {
        dtype,
        shape,
        bytes,
    })
}

fn write_tokenizer(dir: &Path) -> Result<(), TinyModelError> {
    let tok_err = |e: &dyn std::fmt::Display| TinyModelError::Tokenizer(e.to_string());
    let vocab = tokenizer::locate_vocab().map_err(|e| tok_err(&e))?;
    let tok = tokenizer::convert_tiktoken(&vocab).map_err(|e| tok_err(&e))?;
    let json = tok.to_string(true).map_err(|e| tok_err(&e))?;
    write_file(&dir.join("tokenizer.json"), json.as_bytes())?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config())
}

/// `tokenizer_config.json`: the chat template and the Qwen special tokens by name.
pub fn tokenizer_config() -> Value {
    json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": false,
        "add_prefix_space": false,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "errors": "replace",
        "clean_up_tokenization_spaces": false,
        "split_special_tokens": false,
        "model_max_length": 4096,
        "chat_template": tokenizer::CHAT_TEMPLATE
    })
}
