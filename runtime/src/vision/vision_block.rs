//! One vision transformer block, pre-norm:
//! `x ← x + proj(attn(rope(q), rope(k), v))` over LN₁(x), then `x ← x + fc₂(gelu_tanh(fc₁(LN₂(x))))`.
//! Attention is bidirectional inside each image (frame) and never crosses images.

use mlx_rs::error::Exception;
use mlx_rs::fast;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::ops::indexing::IndexOp;
use std::cell::RefCell;

use mlx_rs::transforms::compile::compile;
use mlx_rs::{ops, Array, Dtype};

use super::config::{VisionActivation, VisionConfig};
use super::rotary::{self, RotaryTables};
use crate::model::linear::Linear;
use crate::model::QuantLookup;

/// Head sizes MLX's fused attention kernels handle; other sizes are zero-padded up to the next
/// one. Zero columns add nothing to q·k and produce zero output columns, which are sliced off.
pub const FUSED_HEAD_DIMS: [i32; 3] = [64, 80, 128];

/// The fused size a head of `head_dim` is padded to, if any.
pub fn padded_head_dim(head_dim: i32) -> Option<i32> {
    FUSED_HEAD_DIMS
        .iter()
        .copied()
        .find(|&d| d >= head_dim)
        .filter(|&d| d != head_dim)
}

/// A scalar in `dtype`, so that arithmetic with it keeps the activations' dtype.
fn scalar(value: f32, dtype: Dtype) -> Result<Array, Exception> {
    Array::from_f32(value).as_dtype(dtype)
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh(x: &Array) -> Result<Array, Exception> {
    let dt = x.dtype();
    let cubic = x
        .power(scalar(3.0, dt)?)?
        .multiply(scalar(0.044_715, dt)?)?;
    let inner = x
        .add(cubic)?
        .multiply(scalar((2.0 / std::f64::consts::PI).sqrt() as f32, dt)?)?;
    let one_plus = ops::tanh(&inner)?.add(scalar(1.0, dt)?)?;
    x.multiply(scalar(0.5, dt)?)?.multiply(one_plus)
}

/// Exact GELU `x·(1 + erf(x/√2))/2`.
pub fn gelu_erf(x: &Array) -> Result<Array, Exception> {
    let dt = x.dtype();
    let erf = ops::erf(x.divide(scalar(std::f32::consts::SQRT_2, dt)?)?)?;
    x.multiply(erf.add(scalar(1.0, dt)?)?)?
        .divide(scalar(2.0, dt)?)
}

fn silu(x: &Array) -> Result<Array, Exception> {
    x.multiply(ops::sigmoid(x)?)
}

type Unary = Box<dyn for<'a> FnMut(&'a Array) -> Result<Array, Exception>>;

thread_local! {
    // One compiled (fused, shape-agnostic) graph per activation and thread.
    static GELU_TANH: RefCell<Unary> = RefCell::new(Box::new(compile(gelu_tanh, true)));
    static GELU_ERF: RefCell<Unary> = RefCell::new(Box::new(compile(gelu_erf, true)));
    static SILU: RefCell<Unary> = RefCell::new(Box::new(compile(silu, true)));
}

/// Applies `act`; `fused` runs it as one compiled kernel instead of one per operation.
pub fn activate(x: &Array, act: VisionActivation, fused: bool) -> Result<Array, Exception> {
    let eager: fn(&Array) -> Result<Array, Exception> = match act {
        VisionActivation::GeluTanh => gelu_tanh,
        VisionActivation::Gelu => gelu_erf,
        VisionActivation::Silu => silu,
    };
    if !fused {
        return eager(x);
    }
    let cell = match act {
        VisionActivation::GeluTanh => &GELU_TANH,
        VisionActivation::Gelu => &GELU_ERF,
        VisionActivation::Silu => &SILU,
    };
    cell.with(|f| (f.borrow_mut())(x))
}

/// How the tower runs; every setting gives the same result up to rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TowerOptions {
    /// Keep activations in the weights' dtype (pixels, position rows); the rotary tables stay
    /// f32 either way.
    pub anchor_dtype: bool,
    /// Pad heads to a fused attention size (see [`padded_head_dim`]).
    pub pad_heads: bool,
    /// Run elementwise chains (activations, rotary) as compiled, fused graphs.
    pub fused_elementwise: bool,
}

impl Default for TowerOptions {
    /// Padding pays only where the fused attention kernel needs it: Metal. CUDA's attention
    /// takes head_dim 72 as is, and the CPU has no fused kernel.
    fn default() -> Self {
        Self {
            anchor_dtype: true,
            pad_heads: metal_available(),
            fused_elementwise: true,
        }
    }
}

fn metal_available() -> bool {
    let mut available = false;
    // SAFETY: plain query of the MLX runtime writing one bool.
    let status = unsafe { mlx_sys::mlx_metal_is_available(&mut available) };
    status == 0 && available
}

/// LayerNorm with affine weight and bias.
#[derive(Debug, Clone, ModuleParameters)]
pub struct LayerNorm {
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub bias: Param<Array>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f32) -> Result<Self, Exception> {
        Ok(Self {
            weight: Param::new(Array::ones::<f32>(&[dim as i32])?),
            bias: Param::new(Array::zeros::<f32>(&[dim as i32])?),
            eps,
        })
    }

    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        fast::layer_norm(
            x,
            Some(self.weight.as_ref()),
            Some(self.bias.as_ref()),
            self.eps,
        )
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct VisionAttention {
    /// Fused projection to `[q | k | v]`, each `heads × head_dim`.
    #[param]
    pub qkv: Linear,
    #[param]
    pub proj: Linear,
    pub num_heads: i32,
    pub head_dim: i32,
}

impl VisionAttention {
    pub fn new(path: &str, cfg: &VisionConfig, quant: QuantLookup) -> Self {
        let h = cfg.hidden_size;
        Self {
            qkv: Linear::new(&format!("{path}.qkv"), h, 3 * h, true, quant),
            proj: Linear::new(&format!("{path}.proj"), h, h, true, quant),
            num_heads: cfg.num_heads as i32,
            head_dim: cfg.head_dim() as i32,
        }
    }

    /// `x` `[tokens, hidden]`; `spans` the `(start, len)` of each image's (frame's) tokens.
    pub fn forward(
        &self,
        x: &Array,
        rope: &RotaryTables,
        spans: &[(i32, i32)],
        opts: &TowerOptions,
    ) -> Result<Array, Exception> {
        let n = x.shape()[0];
        let (heads, d) = (self.num_heads, self.head_dim);
        // [3, heads, tokens, d]: q, k, v already in the attention kernel's layout.
        let qkv = self
            .qkv
            .forward(x)?
            .reshape(&[n, 3, heads, d])?
            .transpose_axes(&[1, 2, 0, 3])?;
        // q and k rotated together, in one pass.
        let qk = rotary::apply(&qkv.index(0..2), rope, opts.fused_elementwise)?;
        let (mut q, mut k, mut v) = (qk.index(0..1), qk.index(1..2), qkv.index(2..3));
        let padded = if opts.pad_heads {
            padded_head_dim(d)
        } else {
            None
        };
        if let Some(p) = padded {
            let width = [(0, 0), (0, 0), (0, 0), (0, p - d)];
            q = ops::pad(&q, &width, None, None)?;
            k = ops::pad(&k, &width, None, None)?;
            v = ops::pad(&v, &width, None, None)?;
        }
        let scale = (d as f32).powf(-0.5);
        let mut outs = Vec::with_capacity(spans.len());
        for &(start, len) in spans {
            let r = start..start + len;
            let (qs, ks, vs) = if spans.len() == 1 {
                (q.clone(), k.clone(), v.clone())
            } else {
                (
                    q.index((.., .., r.clone(), ..)),
                    k.index((.., .., r.clone(), ..)),
                    v.index((.., .., r, ..)),
                )
            };
            outs.push(fast::scaled_dot_product_attention(
                &qs, &ks, &vs, scale, None, None,
            )?);
        }
        let mut out = if outs.len() == 1 {
            outs.pop().expect("one span")
        } else {
            ops::concatenate(&outs, 2)?
        };
        if padded.is_some() {
            out = out.index((.., .., .., ..d));
        }
        let out = out
            .squeeze_axes(&[0])?
            .transpose_axes(&[1, 0, 2])?
            .reshape(&[n, heads * d])?;
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct VisionMlp {
    #[param]
    pub linear_fc1: Linear,
    #[param]
    pub linear_fc2: Linear,
    pub act: VisionActivation,
}

impl VisionMlp {
    pub fn new(path: &str, cfg: &VisionConfig, act: VisionActivation, quant: QuantLookup) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Self {
            linear_fc1: Linear::new(&format!("{path}.linear_fc1"), h, i, true, quant),
            linear_fc2: Linear::new(&format!("{path}.linear_fc2"), i, h, true, quant),
            act,
        }
    }

    pub fn forward(&self, x: &Array, opts: &TowerOptions) -> Result<Array, Exception> {
        let hidden = activate(
            &self.linear_fc1.forward(x)?,
            self.act,
            opts.fused_elementwise,
        )?;
        self.linear_fc2.forward(&hidden)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct VisionBlock {
    #[param]
    pub norm1: LayerNorm,
    #[param]
    pub norm2: LayerNorm,
    #[param]
    pub attn: VisionAttention,
    #[param]
    pub mlp: VisionMlp,
}

impl VisionBlock {
    pub fn new(
        path: &str,
        cfg: &VisionConfig,
        act: VisionActivation,
        quant: QuantLookup,
    ) -> Result<Self, Exception> {
        Ok(Self {
            norm1: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps)?,
            norm2: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps)?,
            attn: VisionAttention::new(&format!("{path}.attn"), cfg, quant),
            mlp: VisionMlp::new(&format!("{path}.mlp"), cfg, act, quant),
        })
    }

    pub fn forward(
        &self,
        x: &Array,
        rope: &RotaryTables,
        spans: &[(i32, i32)],
        opts: &TowerOptions,
    ) -> Result<Array, Exception> {
        let x = x.add(
            self.attn
                .forward(&self.norm1.forward(x)?, rope, spans, opts)?,
        )?;
        x.add(self.mlp.forward(&self.norm2.forward(&x)?, opts)?)
    }
}
