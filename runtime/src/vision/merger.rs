//! Patch merger: LN over each patch, then each `merge × merge` group (consecutive rows) is
//! concatenated into one token and projected `fc₂(gelu(fc₁(·)))` to the text model's width.

use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::Array;

use super::config::VisionActivation;
use super::config::VisionConfig;
use super::vision_block::{activate, LayerNorm, TowerOptions};
use crate::model::linear::Linear;
use crate::model::QuantLookup;

#[derive(Debug, Clone, ModuleParameters)]
pub struct PatchMerger {
    #[param]
    pub norm: LayerNorm,
    #[param]
    pub linear_fc1: Linear,
    #[param]
    pub linear_fc2: Linear,
    merged: i32,
}

impl PatchMerger {
    pub fn new(path: &str, cfg: &VisionConfig, quant: QuantLookup) -> Result<Self, Exception> {
        let merged = cfg.merged_hidden_size();
        Ok(Self {
            norm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps)?,
            linear_fc1: Linear::new(&format!("{path}.linear_fc1"), merged, merged, true, quant),
            linear_fc2: Linear::new(
                &format!("{path}.linear_fc2"),
                merged,
                cfg.out_hidden_size,
                true,
                quant,
            ),
            merged: merged as i32,
        })
    }

    /// `x` `[patches, hidden]` in merge-group order → `[patches / merge², out_hidden]`.
    pub fn forward(&self, x: &Array, opts: &TowerOptions) -> Result<Array, Exception> {
        let grouped = self.norm.forward(x)?.reshape(&[-1, self.merged])?;
        let hidden = activate(
            &self.linear_fc1.forward(&grouped)?,
            VisionActivation::Gelu,
            opts.fused_elementwise,
        )?;
        self.linear_fc2.forward(&hidden)
    }
}
