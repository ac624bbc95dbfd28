//! One decoder layer: `h = x + mixer(norm₁(x))`, `out = h + mlp(norm₂(h))`, where the mixer is
//! Gated DeltaNet or gated full attention, and the MLP is sparse MoE or dense SwiGLU.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::{ModuleParamMut, ModuleParamRef, ModuleParameters};
use mlx_rs::Array;

use super::attention::Attention;
use super::cache::LayerCache;
use super::gated_delta::GatedDeltaNet;
use super::linear::QuantLookup;
use super::mlp::Mlp;
use super::moe::SparseMoeBlock;
use super::norm::RmsNorm;
use super::rope::{MRope, RopeTables};
use crate::config::TextConfig;

/// The layer's MLP; its parameters sit directly under `mlp.` whichever kind it is.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Moe(Box<SparseMoeBlock>),
    Dense(Box<Mlp>),
}

impl FeedForward {
    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        match self {
            FeedForward::Moe(m) => m.forward(x),
            FeedForward::Dense(m) => m.forward(x),
        }
    }

    fn inner(&self) -> &dyn ModuleParameters {
        match self {
            FeedForward::Moe(m) => m.as_ref(),
            FeedForward::Dense(m) => m.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn ModuleParameters {
        match self {
            FeedForward::Moe(m) => m.as_mut(),
            FeedForward::Dense(m) => m.as_mut(),
        }
    }
}

impl ModuleParameters for FeedForward {
    fn num_parameters(&self) -> usize {
        self.inner().num_parameters()
    }
    fn parameters(&self) -> ModuleParamRef<'_> {
        self.inner().parameters()
    }
    fn parameters_mut(&mut self) -> ModuleParamMut<'_> {
        self.inner_mut().parameters_mut()
    }
    fn trainable_parameters(&self) -> ModuleParamRef<'_> {
        self.inner().trainable_parameters()
    }
    fn freeze_parameters(&mut self, recursive: bool) {
        self.inner_mut().freeze_parameters(recursive)
    }
    fn unfreeze_parameters(&mut self, recursive: bool) {
        self.inner_mut().unfreeze_parameters(recursive)
    }
    fn all_frozen(&self) -> Option<bool> {
        self.inner().all_frozen()
    }
    fn any_frozen(&self) -> Option<bool> {
        self.inner().any_frozen()
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct DecoderLayer {
    #[param]
    pub input_layernorm: RmsNorm,
    #[param]
    pub post_attention_layernorm: RmsNorm,
    #[param]
    pub linear_attn: Option<GatedDeltaNet>,
    #[param]
    pub self_attn: Option<Attention>,
    #[param]
    pub mlp: FeedForward,
}

impl DecoderLayer {
    pub fn new(index: usize, prefix: &str, cfg: &TextConfig, quant: QuantLookup) -> Self {
        let path = format!("{prefix}.layers.{index}");
        let linear = cfg.is_linear_layer(index);
        let mlp_path = format!("{path}.mlp");
        let mlp = if cfg.is_moe() {
            FeedForward::Moe(Box::new(SparseMoeBlock::new(&mlp_path, cfg, quant)))
        } else {
            FeedForward::Dense(Box::new(Mlp::new(
                &mlp_path,
                cfg.hidden_size,
                cfg.intermediate_size.unwrap_or(0),
                quant,
            )))
        };
        Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps),
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps),
            linear_attn: linear
                .then(|| GatedDeltaNet::new(&format!("{path}.linear_attn"), cfg, quant)),
            self_attn: (!linear).then(|| Attention::new(&format!("{path}.self_attn"), cfg, quant)),
            mlp,
        }
    }

    /// Stacks the projections of this layer's blocks (after loading).
    pub fn fuse(&mut self) -> Result<(), Exception> {
        if let Some(delta) = &mut self.linear_attn {
            delta.fuse()?;
        }
        if let Some(attn) = &mut self.self_attn {
            attn.fuse()?;
        }
        match &mut self.mlp {
            FeedForward::Moe(m) => m.fuse(),
            FeedForward::Dense(m) => m.fuse(),
        }
    }

    pub fn is_linear(&self) -> bool {
        self.linear_attn.is_some()
    }

    pub fn new_cache(&self) -> LayerCache {
        if self.is_linear() {
            LayerCache::Linear(Default::default())
        } else {
            LayerCache::Attention(Default::default())
        }
    }

    pub fn forward(
        &self,
        x: &Array,
        rope: &MRope,
        tables: &RopeTables,
        cache: &mut LayerCache,
    ) -> Result<Array, Exception> {
        let normed = self.input_layernorm.forward(x)?;
        let r = match (&self.linear_attn, &self.self_attn, cache) {
            (Some(delta), _, LayerCache::Linear(c)) => delta.forward(&normed, c)?,
            (_, Some(attn), LayerCache::Attention(c)) => attn.forward(&normed, rope, tables, c)?,
            _ => {
                return Err(Exception::custom(
                    "cache kind does not match the layer kind",
                ))
            }
        };
        let h = x.add(r)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        h.add(m)
    }
}
