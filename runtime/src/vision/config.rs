//! `vision_config` of a Qwen3.5/3.6 (MoE) vision-language checkpoint.
//!
//! Field names and defaults follow the Hugging Face `Qwen3_5MoeVisionConfig`; unknown keys
//! (`initializer_range`, `rope_parameters`, ...) are ignored.

use serde::{Deserialize, Serialize};

/// Why a `vision_config` cannot drive the tower.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VisionConfigError {
    #[error("vision_config: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")]
    HeadsDoNotDivide {
        hidden_size: usize,
        num_heads: usize,
    },
    #[error("vision_config: head_dim {0} must be a positive multiple of 4 for the 2D rotary")]
    HeadDimForRotary(usize),
    #[error("vision_config: num_position_embeddings {0} is not a perfect square")]
    PositionTableNotSquare(usize),
    #[error("vision_config: hidden_act `{0}` is not supported (expected gelu_pytorch_tanh, gelu or silu)")]
    UnsupportedActivation(String),
    #[error(
        "vision_config: deepstack_visual_indexes {0:?} are not supported by Qwen3.5 checkpoints"
    )]
    Deepstack(Vec<usize>),
    #[error("vision_config: `{0}` must be positive")]
    Zero(&'static str),
}

/// The vision tower's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub model_type: String,
    /// Number of transformer blocks.
    pub depth: usize,
    pub hidden_size: usize,
    pub hidden_act: String,
    /// Width of the per-block MLP.
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    /// Width of the merged image features, equal to the text model's hidden size.
    pub out_hidden_size: usize,
    /// Size of the learned position table: a square grid of `side × side` entries.
    pub num_position_embeddings: usize,
    pub layer_norm_eps: f32,
    pub deepstack_visual_indexes: Vec<usize>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            model_type: "qwen3_5_moe".to_owned(),
            depth: 27,
            hidden_size: 1152,
            hidden_act: "gelu_pytorch_tanh".to_owned(),
            intermediate_size: 4304,
            num_heads: 16,
            in_channels: 3,
            patch_size: 16,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            out_hidden_size: 3584,
            num_position_embeddings: 2304,
            layer_norm_eps: 1e-6,
            deepstack_visual_indexes: Vec::new(),
        }
    }
}

/// The non-linearity of the per-block MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionActivation {
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`), the Qwen3.5 choice.
    GeluTanh,
    /// GELU with the exact erf form.
    Gelu,
    Silu,
}

impl VisionConfig {
    /// The small shapes used by `cathedral tiny-model`.
    pub fn tiny() -> Self {
        Self {
            depth: 2,
            hidden_size: 32,
            intermediate_size: 64,
            num_heads: 2,
            out_hidden_size: 32,
            num_position_embeddings: 16,
            ..Self::default()
        }
    }

    /// Checks every invariant the tower relies on.
    pub fn validate(&self) -> Result<(), VisionConfigError> {
        for (name, v) in [
            ("depth", self.depth),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("spatial_merge_size", self.spatial_merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("out_hidden_size", self.out_hidden_size),
            ("num_position_embeddings", self.num_position_embeddings),
        ] {
            if v == 0 {
                return Err(VisionConfigError::Zero(name));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(VisionConfigError::HeadsDoNotDivide {
                hidden_size: self.hidden_size,
                num_heads: self.num_heads,
            });
        }
        if !self.head_dim().is_multiple_of(4) {
            return Err(VisionConfigError::HeadDimForRotary(self.head_dim()));
        }
        let side = self.position_grid_side();
        if side * side != self.num_position_embeddings {
            return Err(VisionConfigError::PositionTableNotSquare(
                self.num_position_embeddings,
            ));
        }
        self.activation()?;
        if !self.deepstack_visual_indexes.is_empty() {
            return Err(VisionConfigError::Deepstack(
                self.deepstack_visual_indexes.clone(),
            ));
        }
        Ok(())
    }

    pub fn activation(&self) -> Result<VisionActivation, VisionConfigError> {
        match self.hidden_act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" => Ok(VisionActivation::GeluTanh),
            "gelu" => Ok(VisionActivation::Gelu),
            "silu" | "swish" => Ok(VisionActivation::Silu),
            other => Err(VisionConfigError::UnsupportedActivation(other.to_owned())),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Length of one pixel row fed to the tower: `C × T × P × P` (1536 for Qwen3.5).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Side of the learned position grid (48 for 2304 entries).
    pub fn position_grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }

    /// Width of one merged token before the merger MLP: `hidden × merge²`.
    pub fn merged_hidden_size(&self) -> usize {
        self.hidden_size * self.spatial_merge_size * self.spatial_merge_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_checkpoint_vision_config_and_fills_defaults() {
        let json = r#"{
            "deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02,
            "intermediate_size": 4304, "model_type": "qwen3_5_moe", "num_heads": 16,
            "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2
        }"#;
        let c: VisionConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 72);
        assert_eq!(c.patch_dim(), 1536);
        assert_eq!(c.position_grid_side(), 48);
        assert_eq!(c.merged_hidden_size(), 4608);
        assert_eq!(c.out_hidden_size, 2048);
        assert_eq!(c.layer_norm_eps, 1e-6);
        let sparse: VisionConfig = serde_json::from_str(r#"{"out_hidden_size": 2048}"#).unwrap();
        assert_eq!(sparse, c);
    }

    #[test]
    fn tiny_config_is_valid() {
        let c = VisionConfig::tiny();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.position_grid_side(), 4);
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let mut c = VisionConfig::tiny();
        c.num_position_embeddings = 15;
        assert_eq!(
            c.validate(),
            Err(VisionConfigError::PositionTableNotSquare(15))
        );
        let mut c = VisionConfig::tiny();
        c.num_heads = 3;
        assert!(matches!(
            c.validate(),
            Err(VisionConfigError::HeadsDoNotDivide { .. })
        ));
        let mut c = VisionConfig::tiny();
        c.hidden_act = "relu".into();
        assert!(matches!(
            c.validate(),
            Err(VisionConfigError::UnsupportedActivation(_))
        ));
        let mut c = VisionConfig::tiny();
        c.deepstack_visual_indexes = vec![1];
        assert!(matches!(c.validate(), Err(VisionConfigError::Deepstack(_))));
    }
}
