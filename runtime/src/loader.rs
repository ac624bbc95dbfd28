//! Strict checkpoint loader: config.json + single or sharded safetensors, in the mlx-community
//! or the Hugging Face layout, dense (f32/bf16/f16) or MLX-quantized.
//!
//! Every tensor the model expects must be present with the expected shape and nothing may be
//! left over; otherwise [`LoaderError::UnmatchedTensors`] names each offender. Module placeholders
//! are never used for computation: the model is returned only after every one was replaced.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mlx_rs::module::{ModuleParameters, ModuleParametersExt};
use mlx_rs::{Array, Dtype};

use crate::config::{normalise_key, ConfigError, ModelConfig, QuantOverride};
use crate::model::{LanguageModel, QuantSpec};
use crate::vision::VisionTower;

/// A tensor whose shape is not the one the model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    pub expected: Vec<i32>,
    pub found: Vec<i32>,
}

impl std::fmt::Display for ShapeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (expected {:?}, found {:?})",
            self.name, self.expected, self.found
        )
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 20;
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(", … ({} more)", items.len() - SHOWN));
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("no safetensors weights in {0}")]
    NoWeights(PathBuf),
    #[error(
        "checkpoint tensors do not match the model: missing [{}]; unexpected [{}]; wrong shape [{}]",
        list(.missing), list(.unexpected), list(.shape_mismatch)
    )]
    UnmatchedTensors {
        missing: Vec<String>,
        unexpected: Vec<String>,
        shape_mismatch: Vec<ShapeMismatch>,
    },
    #[error("invalid checkpoint: {0}")]
    Invalid(String),
    #[error("mlx: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
}

/// What to build from the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Build the vision tower when the checkpoint has one.
    pub vision: bool,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub language_model: LanguageModel,
    /// The tower, when the checkpoint has vision weights and it was asked for.
    pub vision_tower: Option<VisionTower>,
    /// Whether the checkpoint carries vision weights at all.
    pub has_vision_weights: bool,
}

/// The safetensors files of a checkpoint: the shards named by `model.safetensors.index.json`,
/// else every `*.safetensors` in the directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| LoaderError::Read {
            path: index.clone(),
            message: e.to_string(),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoaderError::Read {
            path: index.clone(),
            message: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                LoaderError::Invalid(format!("{} has no weight_map", index.display()))
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoaderError::Read {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoaderError::NoWeights(dir.to_path_buf()));
    }
    Ok(files)
}

/// Reads every tensor (lazily; MLX maps the data on evaluation).
fn read_tensors(files: &[PathBuf]) -> Result<BTreeMap<String, Array>, LoaderError> {
    let mut out = BTreeMap::new();
    for f in files {
        let tensors = Array::load_safetensors(f).map_err(|e| LoaderError::Read {
            path: f.clone(),
            message: e.to_string(),
        })?;
        for (k, v) in tensors {
            if out.insert(k.clone(), v).is_some() {
                return Err(LoaderError::Invalid(format!(
                    "tensor {k} appears in two shards"
                )));
            }
        }
    }
    Ok(out)
}

/// Text norm weights stored as `w − 1` in the Hugging Face layout (not the DeltaNet gated norm).
const SHIFTED_NORMS: [&str; 5] = [
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
];

/// Rewrites a Hugging Face layout into the mlx-community one (names, fused experts, conv and
/// patch-embed axis order, `1 + w` norms, no `mtp.*`). An mlx-community checkpoint passes
/// through unchanged.
pub fn to_mlx_layout(
    raw: BTreeMap<String, Array>,
    cfg: &ModelConfig,
) -> Result<BTreeMap<String, Array>, LoaderError> {
    let hf = raw.keys().any(|k| {
        k.starts_with("model.language_model") || k.starts_with("model.visual") || k.contains("mtp.")
    }) || raw
        .iter()
        .any(|(k, v)| k.contains("conv1d.weight") && v.shape().last() != Some(&1));
    let in_channels = cfg
        .vision_config
        .as_ref()
        .map_or(3, |v| v.in_channels as i32);
    let mut out = BTreeMap::new();
    for (key, value) in raw {
        if key.contains("mtp.") {
            continue;
        }
        let key = normalise_key(&key);
        let mut value = value;
        if key.contains("conv1d.weight") && value.ndim() == 3 && value.shape()[2] != 1 {
            value = value.swap_axes(1, 2)?;
        }
        if key.ends_with("patch_embed.proj.weight")
            && value.ndim() == 5
            && value.shape()[4] != in_channels
            && value.shape()[1] == in_channels
        {
            value = value.transpose_axes(&[0, 2, 3, 4, 1])?;
        }
        if hf && value.ndim() == 1 && SHIFTED_NORMS.iter().any(|s| key.ends_with(s)) {
            value = value.add(Array::from_f32(1.0).as_dtype(value.dtype())?)?;
        }
        if let Some(prefix) = key.strip_suffix(".experts.gate_up_proj") {
            // [E, 2I, H] → gate [E, I, H] | up [E, I, H]
            let mid = value.shape()[1] / 2;
            let parts = value.split_equal(2, 1)?;
            debug_assert_eq!(parts[0].shape()[1], mid);
            out.insert(
                format!("{prefix}.switch_mlp.gate_proj.weight"),
                parts[0].clone(),
            );
            out.insert(
                format!("{prefix}.switch_mlp.up_proj.weight"),
                parts[1].clone(),
            );
            continue;
        }
        if let Some(prefix) = key.strip_suffix(".experts.down_proj") {
            out.insert(format!("{prefix}.switch_mlp.down_proj.weight"), value);
            continue;
        }
        out.insert(key, value);
    }
    stack_per_expert(&mut out)?;
    Ok(out)
}

/// `mlp.experts.{e}.{proj}.{weight|scales|biases}` → `mlp.switch_mlp.{proj}.*` stacked on axis 0.
fn stack_per_expert(tensors: &mut BTreeMap<String, Array>) -> Result<(), LoaderError> {
    let mut groups: BTreeMap<String, BTreeMap<usize, String>> = BTreeMap::new();
    for key in tensors.keys() {
        let Some((prefix, rest)) = key.split_once(".mlp.experts.") else {
            continue;
        };
        let Some((index, tail)) = rest.split_once('.') else {
            continue;
        };
        let Ok(index) = index.parse::<usize>() else {
            continue;
        };
        groups
            .entry(format!("{prefix}.mlp.switch_mlp.{tail}"))
            .or_default()
            .insert(index, key.clone());
    }
    for (target, members) in groups {
        if members.keys().copied().ne(0..members.len()) {
            return Err(LoaderError::Invalid(format!(
                "{target}: expert tensors are not numbered 0..{}",
                members.len()
            )));
        }
        let arrays: Vec<Array> = members
            .values()
            .map(|k| tensors.remove(k).expect("key listed above"))
            .collect();
        tensors.insert(target, mlx_rs::ops::stack(&arrays, 0)?);
    }
    Ok(())
}

/// Assigns `tensors` (names relative to the module) to `module`'s parameters, strictly.
fn assign<M: ModuleParameters>(
    module: &mut M,
    prefix: &str,
    tensors: &mut BTreeMap<String, Array>,
    missing: &mut Vec<String>,
    shape_mismatch: &mut Vec<ShapeMismatch>,
) {
    let mut params = module.parameters_mut().flatten();
    let mut names: Vec<String> = params.keys().map(|k| k.to_string()).collect();
    names.sort();
    for name in names {
        let full = format!("{prefix}{name}");
        let slot = params.get_mut(name.as_str()).expect("name from this map");
        match tensors.remove(&full) {
            None => missing.push(full),
            Some(t) => {
                if t.shape() != slot.shape() {
                    shape_mismatch.push(ShapeMismatch {
                        name: full,
                        expected: slot.shape().to_vec(),
                        found: t.shape().to_vec(),
                    });
                } else {
                    **slot = t;
                }
            }
        }
    }
}

/// Loads a checkpoint directory.
pub fn load_model(dir: &Path, opts: LoadOptions) -> Result<LoadedModel, LoaderError> {
    let config = ModelConfig::load(dir)?;
    let files = weight_files(dir)?;
    let mut tensors = to_mlx_layout(read_tensors(&files)?, &config)?;

    // A module is quantized iff the checkpoint carries its scales; group size and bits come
    // from the config (with per-module overrides).
    let scaled: BTreeSet<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".scales").map(str::to_string))
        .collect();
    let qcfg = config.quantization.clone();
    let quant = move |path: &str| -> Option<QuantSpec> {
        if !scaled.contains(path) {
            return None;
        }
        match qcfg.as_ref()?.for_module(path) {
            QuantOverride::Quantized { group_size, bits } => Some(QuantSpec { group_size, bits }),
            QuantOverride::NotQuantized => None,
        }
    };

    let mut missing = Vec::new();
    let mut shape_mismatch = Vec::new();
    let mut language_model = LanguageModel::new(&config.text_config, &quant)?;
    assign(
        &mut language_model,
        "language_model.",
        &mut tensors,
        &mut missing,
        &mut shape_mismatch,
    );

    let has_vision_weights = tensors.keys().any(|k| k.starts_with("vision_tower."));
    let mut vision_tower = None;
    if has_vision_weights {
        let vcfg = config.vision_config.as_ref().ok_or_else(|| {
            LoaderError::Invalid(
                "vision_tower weights present but config.json has no vision_config".into(),
            )
        })?;
        // Checked even when not kept, so a broken tower never hides behind a flag.
        let mut tower = VisionTower::new_quantized(vcfg, &quant)?;
        assign(
            &mut tower,
            "vision_tower.",
            &mut tensors,
            &mut missing,
            &mut shape_mismatch,
        );
        if opts.vision {
            vision_tower = Some(tower);
        }
    }

    let unexpected: Vec<String> = tensors.into_keys().collect();
    if !missing.is_empty() || !unexpected.is_empty() || !shape_mismatch.is_empty() {
        return Err(LoaderError::UnmatchedTensors {
            missing,
            unexpected,
            shape_mismatch,
        });
    }
    language_model.eval()?;
    language_model.fuse_projections()?;
    if let Some(t) = &vision_tower {
        t.eval()?;
    }
    Ok(LoadedModel {
        config,
        language_model,
        vision_tower,
        has_vision_weights,
    })
}

/// The dtype the text weights were stored in (of the final norm: never quantized).
pub fn text_dtype(model: &LanguageModel) -> Dtype {
    model.model.norm.weight.dtype()
}
