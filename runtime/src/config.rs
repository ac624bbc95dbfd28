//! The checkpoint's `config.json`: the text model, the optional vision tower, quantization and
//! the special-token ids. Read once at load time; every id the runtime uses comes from here.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::vision::VisionConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid model config: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("unsupported model_type `{0}` (expected qwen3_5_moe or qwen3_5)")]
    UnsupportedModelType(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Which family the checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// `qwen3_5_moe`: sparse MoE MLP with a shared expert.
    Moe,
    /// `qwen3_5`: dense SwiGLU MLP.
    Dense,
}

/// One id or a list of ids (`eos_token_id` is written both ways).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Rotary settings of the full-attention layers (`rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type", alias = "type")]
    pub rope_type: String,
    #[serde(default = "default_true")]
    pub mrope_interleaved: bool,
    pub mrope_section: Vec<usize>,
    pub rope_theta: f64,
    #[serde(default = "default_partial_rotary")]
    pub partial_rotary_factor: f64,
}

fn default_rope_type() -> String {
    "default".into()
}
fn default_true() -> bool {
    true
}
fn default_partial_rotary() -> f64 {
    0.25
}
fn default_interval() -> usize {
    4
}
fn default_eps() -> f64 {
    1e-6
}
fn default_conv_kernel() -> usize {
    4
}

/// `text_config` of a Qwen3.5 / 3.6 checkpoint (dense or MoE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Dense MLP width (`qwen3_5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    #[serde(default = "default_conv_kernel")]
    pub linear_conv_kernel_dim: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_interval")]
    pub full_attention_interval: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Older configs keep theta and the MRoPE section outside `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

fn default_hidden_act() -> String {
    "silu".into()
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether layer `i` is a Gated DeltaNet (linear attention) layer. `layer_types` wins when
    /// present; otherwise the interval rule: linear iff (i+1) % interval != 0.
    pub fn is_linear_layer(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) if types.len() == self.num_hidden_layers => types[i] == "linear_attention",
            _ => !(i + 1).is_multiple_of(self.full_attention_interval),
        }
    }

    /// The rotary parameters, normalised from either config shape.
    pub fn rope(&self) -> Result<RopeParameters, ConfigError> {
        if let Some(rope) = &self.rope_parameters {
            return Ok(rope.clone());
        }
        let scaling = self.rope_scaling.as_ref();
        let section = scaling
            .and_then(|s| s.get("mrope_section"))
            .and_then(|v| serde_json::from_value::<Vec<usize>>(v.clone()).ok())
            .ok_or_else(|| ConfigError::Invalid("text_config has no mrope_section".into()))?;
        Ok(RopeParameters {
            rope_type: default_rope_type(),
            mrope_interleaved: scaling
                .and_then(|s| s.get("mrope_interleaved"))
                .and_then(Value::as_bool)
                .unwrap_or(true),
            mrope_section: section,
            rope_theta: self.rope_theta.unwrap_or(10_000_000.0),
            partial_rotary_factor: self.partial_rotary_factor.unwrap_or(0.25),
        })
    }

    /// Number of rotated dimensions per head.
    pub fn rotary_dim(&self) -> Result<usize, ConfigError> {
        let rope = self.rope()?;
        Ok((self.head_dim() as f64 * rope.partial_rotary_factor) as usize)
    }

    pub fn is_moe(&self) -> bool {
        self.num_experts.unwrap_or(0) > 0
    }
}

/// Per-layer override in `quantization`: either other parameters, or `false` (kept unquantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantOverride {
    Quantized { group_size: i32, bits: i32 },
    NotQuantized,
}

/// MLX quantization (`quantization` / `quantization_config` in config.json): default group size
/// and bits plus overrides keyed by module path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizationConfig {
    pub group_size: i32,
    pub bits: i32,
    pub mode: String,
    pub overrides: BTreeMap<String, QuantOverride>,
}

impl QuantizationConfig {
    fn from_value(v: &Value) -> Result<Self, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError::Invalid("quantization must be an object".into()))?;
        let int = |k: &str| obj.get(k).and_then(Value::as_i64).map(|x| x as i32);
        let group_size = int("group_size").unwrap_or(64);
        let bits = int("bits").unwrap_or(4);
        let mode = obj
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("affine")
            .to_string();
        let mut overrides = BTreeMap::new();
        for (k, val) in obj {
            match val {
                Value::Bool(false) => {
                    overrides.insert(normalise_key(k), QuantOverride::NotQuantized);
                }
                Value::Object(o) => {
                    let g = o.get("group_size").and_then(Value::as_i64);
                    let b = o.get("bits").and_then(Value::as_i64);
                    overrides.insert(
                        normalise_key(k),
                        QuantOverride::Quantized {
                            group_size: g.map(|g| g as i32).unwrap_or(group_size),
                            bits: b.map(|b| b as i32).unwrap_or(bits),
                        },
                    );
                }
                _ => {}
            }
        }
        Ok(Self {
            group_size,
            bits,
            mode,
            overrides,
        })
    }

    /// The parameters for the module at `path` (mlx-community naming, no trailing `.weight`).
    pub fn for_module(&self, path: &str) -> QuantOverride {
        match self.overrides.get(path) {
            Some(o) => *o,
            None => QuantOverride::Quantized {
                group_size: self.group_size,
                bits: self.bits,
            },
        }
    }
}

/// HF-layout module paths → mlx-community paths (the same rule the loader applies to tensors).
pub fn normalise_key(key: &str) -> String {
    const RULES: [(&str, &str); 4] = [
        ("model.language_model.visual", "vision_tower"),
        ("model.language_model", "language_model.model"),
        ("model.visual", "vision_tower"),
        ("lm_head", "language_model.lm_head"),
    ];
    for (from, to) in RULES {
        if let Some(rest) = key.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    key.to_string()
}

/// The parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub kind: ModelKind,
    pub text_config: TextConfig,
    /// The vision tower's settings; `None` for a text-only config.
    pub vision_config: Option<VisionConfig>,
    pub quantization: Option<QuantizationConfig>,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// Ids that end generation: the top-level `eos_token_id`, else `text_config.eos_token_id`,
    /// plus `generation_config.json`'s when the checkpoint ships one.
    pub eos_token_ids: Vec<u32>,
    /// The file as read, for fields nobody typed.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawTop {
    model_type: String,
    #[serde(default)]
    text_config: Option<Value>,
    #[serde(default)]
    vision_config: Option<Value>,
    #[serde(default)]
    quantization: Option<Value>,
    #[serde(default)]
    quantization_config: Option<Value>,
    image_token_id: Option<u32>,
    #[serde(default)]
    image_token_index: Option<u32>,
    video_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

impl ModelConfig {
    /// Reads `dir/config.json` (and `generation_config.json` for extra EOS ids).
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Self::from_json(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen) = std::fs::read_to_string(&gen_path) {
            if let Ok(v) = serde_json::from_str::<Value>(&gen) {
                if let Some(ids) = v
                    .get("eos_token_id")
                    .and_then(|e| serde_json::from_value::<TokenIds>(e.clone()).ok())
                {
                    for id in ids.to_vec() {
                        if !cfg.eos_token_ids.contains(&id) {
                            cfg.eos_token_ids.push(id);
                        }
                    }
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let parse_err = |source| ConfigError::Parse {
            path: "config.json".into(),
            source,
        };
        let raw: Value = serde_json::from_str(text).map_err(parse_err)?;
        let top: RawTop = serde_json::from_value(raw.clone()).map_err(parse_err)?;
        let kind = match top.model_type.as_str() {
            "qwen3_5_moe" => ModelKind::Moe,
            "qwen3_5" => ModelKind::Dense,
            other => return Err(ConfigError::UnsupportedModelType(other.to_string())),
        };
        // A text-only export may keep the text fields at the top level.
        let text_value = top.text_config.clone().unwrap_or_else(|| raw.clone());
        let text_config: TextConfig = serde_json::from_value(text_value).map_err(parse_err)?;
        if kind == ModelKind::Moe && !text_config.is_moe() {
            return Err(ConfigError::Invalid(
                "qwen3_5_moe text_config needs num_experts".into(),
            ));
        }
        if kind == ModelKind::Dense && text_config.intermediate_size.is_none() {
            return Err(ConfigError::Invalid(
                "qwen3_5 text_config needs intermediate_size".into(),
            ));
        }
        let rope = text_config.rope()?;
        let rotary = text_config.rotary_dim()?;
        if rope.mrope_section.iter().sum::<usize>() * 2 != rotary {
            return Err(ConfigError::Invalid(format!(
                "mrope_section {:?} must sum to rotary_dim/2 = {}",
                rope.mrope_section,
                rotary / 2
            )));
        }
        let quantization = match top
            .quantization
            .as_ref()
            .or(top.quantization_config.as_ref())
        {
            Some(v) => Some(QuantizationConfig::from_value(v)?),
            None => None,
        };
        let missing = |name: &str| ConfigError::Invalid(format!("config.json has no {name}"));
        let image_token_id = top
            .image_token_id
            .or(top.image_token_index)
            .ok_or_else(|| missing("image_token_id"))?;
        let eos = top
            .eos_token_id
            .clone()
            .or_else(|| text_config.eos_token_id.clone())
            .map(|e| e.to_vec())
            .unwrap_or_default();
        Ok(Self {
            model_type: top.model_type,
            kind,
            text_config,
            vision_config: match top.vision_config {
                Some(v) => Some(serde_json::from_value(v).map_err(parse_err)?),
                None => None,
            },
            quantization,
            image_token_id,
            video_token_id: top
                .video_token_id
                .ok_or_else(|| missing("video_token_id"))?,
            vision_start_token_id: top
                .vision_start_token_id
                .ok_or_else(|| missing("vision_start_token_id"))?,
            vision_end_token_id: top
                .vision_end_token_id
                .ok_or_else(|| missing("vision_end_token_id"))?,
            eos_token_ids: eos,
            raw,
        })
    }
}
