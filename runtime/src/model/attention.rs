//! Gated full attention: q_proj yields query | gate per head; RMSNorm on q and k; partial
//! interleaved MRoPE; GQA causal SDPA; output · σ(gate) → o_proj.
use mlx_rs::error::Exception;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::macros::ModuleParameters;
use mlx_rs::Array;

use super::cache::KvCache;
use super::fused;
use super::linear::{Linear, QuantLookup, QuantizedMatrix, Stacked};
use super::norm::RmsNorm;
use super::rope::{MRope, RopeTables};
use crate::config::TextConfig;

#[derive(Debug, Clone, ModuleParameters)]
pub struct Attention {
    #[param]
    pub q_proj: Linear,
    #[param]
    pub k_proj: Linear,
    #[param]
    pub v_proj: Linear,
    #[param]
    pub o_proj: Linear,
    #[param]
    pub q_norm: RmsNorm,
    #[param]
    pub k_norm: RmsNorm,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    /// q | k | v as one matmul, once [`Attention::fuse`] has run.
    pub qkv: Option<Stacked>,
}

impl Attention {
    pub fn new(path: &str, cfg: &TextConfig, quant: QuantLookup) -> Self {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let q = cfg.num_attention_heads * hd;
        let kv = cfg.num_key_value_heads * hd;
        let b = cfg.attention_bias;
        Self {
            q_proj: Linear::new(&format!("{path}.q_proj"), h, 2 * q, b, quant),
            k_proj: Linear::new(&format!("{path}.k_proj"), h, kv, b, quant),
            v_proj: Linear::new(&format!("{path}.v_proj"), h, kv, b, quant),
            o_proj: Linear::new(&format!("{path}.o_proj"), q, h, b, quant),
            q_norm: RmsNorm::new(hd, cfg.rms_norm_eps),
            k_norm: RmsNorm::new(hd, cfg.rms_norm_eps),
            num_heads: cfg.num_attention_heads as i32,
            num_kv_heads: cfg.num_key_value_heads as i32,
            head_dim: hd as i32,
            qkv: None,
        }
    }

    /// Stacks the query, key and value projections (after loading).
    pub fn fuse(&mut self) -> Result<(), Exception> {
        self.qkv = Stacked::new(vec![&mut self.q_proj, &mut self.k_proj, &mut self.v_proj])?;
        self.o_proj.guard_narrow()
    }

    fn project_qkv(&self, x: &Array) -> Result<(Array, Array, Array), Exception> {
        if let Some(stacked) = &self.qkv {
            let mut p = stacked.forward(x)?.into_iter();
            let mut next = || p.next().expect("three parts");
            return Ok((next(), next(), next()));
        }
        Ok((
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        ))
    }

    /// `x` `[B, L, hidden]`, rotated by `tables` for these L positions.
    pub fn forward(
        &self,
        x: &Array,
        rope: &MRope,
        tables: &RopeTables,
        cache: &mut KvCache,
    ) -> Result<Array, Exception> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.project_qkv(x)?;
        let qg = q.reshape(&[b, l, nh, 2 * hd])?;
        let parts = qg.split_equal(2, -1)?;
        let (queries, gate) = (&parts[0], parts[1].reshape(&[b, l, nh * hd])?);
        let keys = k.reshape(&[b, l, nkv, hd])?;
        let values = v.reshape(&[b, l, nkv, hd])?;
        let queries = self
            .q_norm
            .forward(queries)?
            .transpose_axes(&[0, 2, 1, 3])?;
        let keys = self.k_norm.forward(&keys)?.transpose_axes(&[0, 2, 1, 3])?;
        let values = values.transpose_axes(&[0, 2, 1, 3])?;
        let queries = rope.rotate(&queries, tables)?;
        let keys = rope.rotate(&keys, tables)?;
        let (keys, values) = cache.update(keys, values)?;
        let scale = (hd as f32).powf(-0.5);
        let out = if l > 1 {
            fast::scaled_dot_product_attention(
                &queries,
                &keys,
                &values,
                scale,
                ScaledDotProductAttentionMask::Causal,
                None,
            )?
        } else {
            fast::scaled_dot_product_attention(&queries, &keys, &values, scale, None, None)?
        };
        let out = out
            .transpose_axes(&[0, 2, 1, 3])?
            .reshape(&[b, l, nh * hd])?;
        self.o_proj.forward(&fused::sigmoid_gate(&out, &gate)?)
    }
}
