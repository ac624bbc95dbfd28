//! The language model: embeddings → decoder layers → final RMSNorm → lm_head (or the tied
//! embedding). Inputs are embeddings plus (t, h, w) positions, so text and image prompts share
//! one path.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

use super::cache::LayerCache;
use super::decoder::DecoderLayer;
use super::embedding::Embedding;
use super::linear::{Linear, QuantLookup, QuantizedMatrix};
use super::norm::RmsNorm;
use super::rope::MRope;
use crate::config::{ConfigError, TextConfig};

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsScope {
    /// Only the last position (prefill and decode).
    Last,
    /// Every position (parity tests).
    All,
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct TextModel {
    #[param]
    pub embed_tokens: Embedding,
    #[param]
    pub layers: Vec<DecoderLayer>,
    #[param]
    pub norm: RmsNorm,
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct LanguageModel {
    #[param]
    pub model: TextModel,
    #[param]
    pub lm_head: Option<Linear>,
    pub rope: MRope,
    pub vocab_size: usize,
}

impl LanguageModel {
    /// Builds the module tree with placeholders; `quant(path)` tells which modules (full
    /// `language_model.` paths) are quantized. Only the loader should call this.
    pub fn new(cfg: &TextConfig, quant: QuantLookup) -> Result<Self, ConfigError> {
        let rope_params = cfg.rope()?;
        let rope = MRope::new(
            cfg.rotary_dim()?,
            rope_params.rope_theta,
            &rope_params.mrope_section,
        )
        .map_err(|e| ConfigError::Invalid(format!("rope: {e}")))?;
        let prefix = "language_model.model";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(i, prefix, cfg, quant))
            .collect();
        Ok(Self {
            model: TextModel {
                embed_tokens: Embedding::new(
                    &format!("{prefix}.embed_tokens"),
                    cfg.vocab_size,
                    cfg.hidden_size,
                    quant,
                ),
                layers,
                norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps),
            },
            lm_head: (!cfg.tie_word_embeddings).then(|| {
                Linear::new(
                    "language_model.lm_head",
                    cfg.hidden_size,
                    cfg.vocab_size,
                    false,
                    quant,
                )
            }),
            rope,
            vocab_size: cfg.vocab_size,
        })
    }

    /// Stacks the projections that read the same input into single matmuls (see
    /// [`super::linear::Stacked`]) and gives narrow quantized matrices slack (see
    /// [`super::linear::QMM_MIN_IN_FEATURES`]); called once, after loading.
    pub fn fuse_projections(&mut self) -> Result<(), Exception> {
        for layer in &mut self.model.layers {
            layer.fuse()?;
        }
        match &mut self.lm_head {
            Some(head) => head.guard_narrow()?,
            None => self.model.embed_tokens.guard_narrow()?,
        }
        // Views into the stacks replace the parts' own buffers, which are freed here.
        use mlx_rs::module::ModuleParameters;
        let params = self.parameters().flatten();
        mlx_rs::transforms::eval(params.values().copied())
    }

    pub fn new_cache(&self) -> Vec<LayerCache> {
        self.model
            .layers
            .iter()
            .map(DecoderLayer::new_cache)
            .collect()
    }

    /// Token ids `[B, L]` → embeddings `[B, L, hidden]`.
    pub fn embed(&self, ids: &Array) -> Result<Array, Exception> {
        self.model.embed_tokens.forward(ids)
    }

    /// `embeds` `[B, L, hidden]`, `positions` `[3, L]` int32 (t, h, w) → logits
    /// `[B, L or 1, vocab]`.
    pub fn forward(
        &self,
        embeds: &Array,
        positions: &Array,
        cache: &mut [LayerCache],
        scope: LogitsScope,
    ) -> Result<Array, Exception> {
        if cache.len() != self.model.layers.len() {
            return Err(Exception::custom("cache has the wrong number of layers"));
        }
        let tables = self.rope.tables(positions, embeds.dtype())?;
        let mut h = embeds.clone();
        for (layer, c) in self.model.layers.iter().zip(cache.iter_mut()) {
            h = layer.forward(&h, &self.rope, &tables, c)?;
        }
        if scope == LogitsScope::Last {
            let l = h.shape()[1];
            h = h.index((.., (l - 1)..l, ..));
        }
        let h = self.model.norm.forward(&h)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.model.embed_tokens.as_linear(&h),
        }
    }
}
