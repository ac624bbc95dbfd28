//! Gated DeltaNet (linear attention). Per token t and value head h:
//!   g = exp(−exp(A_log) · softplus(a + dt_bias)),  β = σ(b)
//!   S ← g·S;  S ← S + k ⊗ β(v − S k);  o = S q
//! with q, k from a causal depthwise conv1d (+ SiLU) and L2-normalised (ε = 1e-6 added to the
//! sum of squares; q additionally scaled by d_k^−½). The state S is fp32. Output:
//! out_proj(RMSNorm(o) · SiLU(z)).
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{fast, nn, ops, Array, Dtype};

use super::cache::DeltaCache;
use super::fused;
use super::linear::{placeholder, Linear, QuantLookup, QuantizedMatrix, Stacked};
use super::norm::RmsNormGated;
use super::scalar;
use crate::config::TextConfig;

/// ε of the q/k L2 normalisation (on the sum of squares).
const QK_L2_EPS: f32 = 1e-6;

#[allow(non_snake_case)]
#[derive(Debug, Clone, ModuleParameters)]
pub struct GatedDeltaNet {
    #[param]
    pub in_proj_qkv: Linear,
    #[param]
    pub in_proj_z: Linear,
    #[param]
    pub in_proj_b: Linear,
    #[param]
    pub in_proj_a: Linear,
    /// Depthwise conv weight `[conv_dim, kernel, 1]`.
    #[param]
    pub conv1d: Conv1dWeight,
    #[param]
    pub dt_bias: Param<Array>,
    #[param]
    pub A_log: Param<Array>,
    #[param]
    pub norm: RmsNormGated,
    #[param]
    pub out_proj: Linear,
    pub num_k_heads: i32,
    pub num_v_heads: i32,
    pub head_k_dim: i32,
    pub head_v_dim: i32,
    pub kernel: i32,
    /// qkv | z | b | a as one matmul, once [`GatedDeltaNet::fuse`] has run.
    pub in_proj: Option<Stacked>,
    /// The q and k scales `d_k^−1` and `d_k^−½` as RMSNorm weights (`[d_k]`, in the layer's
    /// dtype), so that normalising and scaling is one kernel each.
    pub qk_scales: Option<(Array, Array)>,
}

/// Holds only `weight` so the key is `conv1d.weight`.
#[derive(Debug, Clone, ModuleParameters)]
pub struct Conv1dWeight {
    #[param]
    pub weight: Param<Array>,
}

impl GatedDeltaNet {
    pub fn new(path: &str, cfg: &TextConfig, quant: QuantLookup) -> Self {
        let h = cfg.hidden_size;
        let key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim;
        let value_dim = cfg.linear_num_value_heads * cfg.linear_value_head_dim;
        let conv_dim = 2 * key_dim + value_dim;
        let nv = cfg.linear_num_value_heads;
        let p = |n: &str| format!("{path}.{n}");
        Self {
            in_proj_qkv: Linear::new(&p("in_proj_qkv"), h, conv_dim, false, quant),
            in_proj_z: Linear::new(&p("in_proj_z"), h, value_dim, false, quant),
            in_proj_b: Linear::new(&p("in_proj_b"), h, nv, false, quant),
            in_proj_a: Linear::new(&p("in_proj_a"), h, nv, false, quant),
            conv1d: Conv1dWeight {
                weight: Param::new(placeholder(&[
                    conv_dim as i32,
                    cfg.linear_conv_kernel_dim as i32,
                    1,
                ])),
            },
            dt_bias: Param::new(placeholder(&[nv as i32])),
            A_log: Param::new(placeholder(&[nv as i32])),
            norm: RmsNormGated::new(cfg.linear_value_head_dim, cfg.rms_norm_eps),
            out_proj: Linear::new(&p("out_proj"), value_dim, h, false, quant),
            num_k_heads: cfg.linear_num_key_heads as i32,
            num_v_heads: nv as i32,
            head_k_dim: cfg.linear_key_head_dim as i32,
            head_v_dim: cfg.linear_value_head_dim as i32,
            kernel: cfg.linear_conv_kernel_dim as i32,
            in_proj: None,
            qk_scales: None,
        }
    }

    /// Stacks the four input projections (after loading).
    pub fn fuse(&mut self) -> Result<(), Exception> {
        self.in_proj = Stacked::new(vec![
            &mut self.in_proj_qkv,
            &mut self.in_proj_z,
            &mut self.in_proj_b,
            &mut self.in_proj_a,
        ])?;
        self.out_proj.guard_narrow()?;
        let dtype = self.norm.weight.dtype();
        let inv = (self.head_k_dim as f32).powf(-0.5);
        let filled =
            |v: f32| ops::full::<f32>(&[self.head_k_dim], Array::from_f32(v))?.as_dtype(dtype);
        let scales = (filled(inv * inv)?, filled(inv)?);
        mlx_rs::transforms::eval([&scales.0, &scales.1])?;
        self.qk_scales = Some(scales);
        Ok(())
    }

    /// (qkv, z, b, a) projections of `x`.
    fn project_in(&self, x: &Array) -> Result<(Array, Array, Array, Array), Exception> {
        if let Some(stacked) = &self.in_proj {
            let mut p = stacked.forward(x)?.into_iter();
            let mut next = || p.next().expect("four parts");
            return Ok((next(), next(), next(), next()));
        }
        Ok((
            self.in_proj_qkv.forward(x)?,
            self.in_proj_z.forward(x)?,
            self.in_proj_b.forward(x)?,
            self.in_proj_a.forward(x)?,
        ))
    }

    pub fn forward(&self, x: &Array, cache: &mut DeltaCache) -> Result<Array, Exception> {
        let (b, s) = (x.shape()[0], x.shape()[1]);
        let (hk, hv, dk, dv) = (
            self.num_k_heads,
            self.num_v_heads,
            self.head_k_dim,
            self.head_v_dim,
        );
        let key_dim = hk * dk;
        let conv_dim = 2 * key_dim + hv * dv;

        let (qkv, z, beta_in, a) = self.project_in(x)?;
        let z = z.reshape(&[b, s, hv, dv])?;

        // Causal depthwise conv over [previous K−1 inputs | this chunk].
        let conv_state = match cache.conv.take() {
            Some(c) => c,
            None => ops::zeros_dtype(&[b, self.kernel - 1, conv_dim], x.dtype())?,
        };
        let conv_input = ops::concatenate(&[&conv_state, &qkv], 1)?;
        let total = conv_input.shape()[1];
        cache.conv = Some(conv_input.index((.., (total - (self.kernel - 1)).., ..)));
        let conv_out = nn::silu(ops::conv1d(
            &conv_input,
            self.conv1d.weight.as_ref(),
            1,
            0,
            1,
            conv_dim,
        )?)?;

        let q = conv_out
            .index((.., .., ..key_dim))
            .reshape(&[b, s, hk, dk])?;
        let k = conv_out
            .index((.., .., key_dim..2 * key_dim))
            .reshape(&[b, s, hk, dk])?;
        let v = conv_out
            .index((.., .., 2 * key_dim..))
            .reshape(&[b, s, hv, dv])?;

        // L2 norm with ε on Σx² == rms_norm with ε/d on mean(x²), times d^−½.
        let inv = (dk as f32).powf(-0.5);
        let rms_eps = QK_L2_EPS * inv * inv;
        let (q, k) = match &self.qk_scales {
            Some((qs, ks)) if qs.dtype() == q.dtype() => (
                fast::rms_norm(&q, Some(qs), rms_eps)?,
                fast::rms_norm(&k, Some(ks), rms_eps)?,
            ),
            _ => (
                fast::rms_norm(&q, None, rms_eps)?.multiply(scalar(inv * inv, q.dtype())?)?,
                fast::rms_norm(&k, None, rms_eps)?.multiply(scalar(inv, k.dtype())?)?,
            ),
        };

        let beta = ops::sigmoid(&beta_in)?;
        let g = fused::decay(self.A_log.as_ref(), &a, self.dt_bias.as_ref())?;

        let state = match cache.state.take() {
            Some(st) => st,
            None => ops::zeros_dtype(&[b, hv, dv, dk], Dtype::Float32)?,
        };
        if s == 1 && hv % hk == 0 {
            // One step: value heads grouped under their key head, so q and k broadcast
            // instead of being repeated.
            let r = hv / hk;
            let (y, state) = fused::delta_step(
                &q.reshape(&[b, hk, 1, dk])?,
                &k.reshape(&[b, hk, 1, dk])?,
                &v.reshape(&[b, hk, r, dv])?,
                &g.reshape(&[b, hk, r])?,
                &beta.reshape(&[b, hk, r])?,
                &state.reshape(&[b, hk, r, dv, dk])?,
            )?;
            cache.state = Some(state.reshape(&[b, hv, dv, dk])?);
            let out = self.norm.forward(&y.reshape(&[b, 1, hv, dv])?, &z)?;
            return self.out_proj.forward(&out.reshape(&[b, 1, hv * dv])?);
        }

        let (q, k) = if hv > hk {
            let r = hv / hk;
            (
                ops::repeat_axis::<f32>(q, r, -2)?,
                ops::repeat_axis::<f32>(k, r, -2)?,
            )
        } else {
            (q, k)
        };

        let (out, state) = if s > 1 {
            delta_chunked(&q, &k, &v, &g, &beta, state)?
        } else {
            delta_sequential(&q, &k, &v, &g, &beta, state)?
        };
        cache.state = Some(state);
        let out = self.norm.forward(&out, &z)?;
        self.out_proj.forward(&out.reshape(&[b, s, hv * dv])?)
    }
}

/// Token-by-token recurrence (decode). q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, β `[B, T, H]`.
fn delta_sequential(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    mut state: Array,
) -> Result<(Array, Array), Exception> {
    let steps = q.shape()[1];
    let mut ys = Vec::with_capacity(steps as usize);
    for t in 0..steps {
        let (y, next) = fused::delta_step(
            &q.index((.., t, .., ..)),
            &k.index((.., t, .., ..)),
            &v.index((.., t, .., ..)),
            &g.index((.., t, ..)),
            &beta.index((.., t, ..)),
            &state,
        )?;
        state = next;
        ys.push(y);
    }
    Ok((ops::stack(&ys, 1)?, state))
}

/// Tokens per chunk of the parallel prefill scan.
const CHUNK: i32 = 64;

/// The same recurrence over a whole prompt, chunk-parallel (prefill): within a chunk of C
/// tokens the updates are a unit lower-triangular system solved by forward substitution;
/// the state is carried between chunks. All in fp32; output in v's dtype.
fn delta_chunked(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: Array,
) -> Result<(Array, Array), Exception> {
    let in_dtype = v.dtype();
    let sh = v.shape();
    let (b, t, h, dv) = (sh[0], sh[1], sh[2], sh[3]);
    let dk = q.shape()[3];
    let c = CHUNK;
    let pad = (c - t % c) % c;
    let padded = |x: &Array, fill: f32| -> Result<Array, Exception> {
        if pad == 0 {
            return Ok(x.clone());
        }
        let mut shape = x.shape().to_vec();
        shape[1] = pad;
        let filler = ops::full::<f32>(&shape, Array::from_f32(fill))?.as_dtype(x.dtype())?;
        ops::concatenate(&[x, &filler], 1)
    };
    let (q, k, v, g, beta) = (
        padded(q, 0.0)?,
        padded(k, 0.0)?,
        padded(v, 0.0)?,
        padded(g, 1.0)?,
        padded(beta, 0.0)?,
    );
    let tp = t + pad;
    let nc = tp / c;
    // [B, Tp, H, D] → [B, H, nC, C, D] (fp32); [B, Tp, H] → [B, H, nC, C]
    let chunks = |x: &Array, d: i32| -> Result<Array, Exception> {
        x.reshape(&[b, nc, c, h, d])?
            .transpose_axes(&[0, 3, 1, 2, 4])?
            .as_dtype(Dtype::Float32)
    };
    let per_token = |x: &Array| -> Result<Array, Exception> {
        x.reshape(&[b, nc, c, h])?.transpose_axes(&[0, 3, 1, 2])
    };
    let (q, k, v) = (chunks(&q, dk)?, chunks(&k, dk)?, chunks(&v, dv)?);
    let (g, beta) = (per_token(&g)?, per_token(&beta)?);

    // Cumulative log decay; g is clipped off 0 so its log stays finite.
    let clipped = ops::minimum(
        ops::maximum(&g, Array::from_f32(1e-6))?,
        Array::from_f32(1.0),
    )?;
    let lcg = ops::cumsum(clipped.log()?, -1, None, None)?;
    let cumg = lcg.exp()?;
    let ones = Array::ones::<f32>(&[c, c])?;
    let lower_incl = ops::tril(&ones, 0)?;
    let strict_lower = ops::tril(&ones, -1)?;
    // decay ratio cumg_i / cumg_j below the diagonal (masked before exp).
    let diff = ops::select(
        &lower_incl.gt(Array::from_f32(0.0))?,
        lcg.expand_dims(-1)?.subtract(lcg.expand_dims(-2)?)?,
        Array::from_f32(-1e30),
    )?;
    let dr = diff.exp()?;
    let beta_col = beta.expand_dims(-1)?;
    let kk = ops::matmul(&k, k.swap_axes(-1, -2)?)?;
    let a = beta_col
        .multiply(&dr)?
        .multiply(&kk)?
        .multiply(&strict_lower)?;
    let eye = Array::eye::<f32>(c, None, None)?;
    let tinv = invert_unit_lower(&eye.add(&a)?, c)?;

    let kbeta = beta.multiply(&cumg)?.expand_dims(-1)?.multiply(&k)?;
    let u0 = ops::matmul(&tinv, beta_col.multiply(&v)?)?;
    let kt = ops::matmul(&tinv, &kbeta)?;
    let m = dr
        .multiply(ops::matmul(&q, k.swap_axes(-1, -2)?)?)?
        .multiply(&lower_incl)?;
    let qeff = cumg
        .expand_dims(-1)?
        .multiply(&q)?
        .subtract(ops::matmul(&m, &kt)?)?;
    let mu0 = ops::matmul(&m, &u0)?;
    let cumg_last = cumg.index((.., .., .., -1));
    let ratio_last = lcg.index((.., .., .., -1..)).subtract(&lcg)?.exp()?;

    let mut s = state.as_dtype(Dtype::Float32)?;
    let mut ys = Vec::with_capacity(nc as usize);
    for ci in 0..nc {
        let st = s.swap_axes(-1, -2)?;
        let qeff_c = qeff.index((.., .., ci, .., ..));
        ys.push(
            mu0.index((.., .., ci, .., ..))
                .add(ops::matmul(&qeff_c, &st)?)?,
        );
        let uc = u0
            .index((.., .., ci, .., ..))
            .subtract(ops::matmul(kt.index((.., .., ci, .., ..)), &st)?)?;
        let uscaled = ratio_last
            .index((.., .., ci, ..))
            .expand_dims(-1)?
            .multiply(&uc)?;
        let decay = cumg_last.index((.., .., ci)).expand_dims_axes(&[-1, -2])?;
        s = decay.multiply(&s)?.add(ops::matmul(
            uscaled.swap_axes(-1, -2)?,
            k.index((.., .., ci, .., ..)),
        )?)?;
    }
    let y = ops::stack(&ys, 2)?
        .transpose_axes(&[0, 2, 3, 1, 4])?
        .reshape(&[b, tp, h, dv])?
        .index((.., ..t, .., ..))
        .as_dtype(in_dtype)?;
    Ok((y, s))
}

/// Inverse of a batched unit lower-triangular `[.., C, C]` matrix by forward substitution.
fn invert_unit_lower(t: &Array, c: i32) -> Result<Array, Exception> {
    let x = ops::broadcast_to(Array::eye::<f32>(c, None, None)?, t.shape())?;
    let mut rows = vec![x.index((.., .., .., 0..1, ..))];
    for i in 1..c {
        let tij = t.index((.., .., .., i..i + 1, ..i));
        let xj = ops::concatenate(&rows, -2)?;
        rows.push(
            x.index((.., .., .., i..i + 1, ..))
                .subtract(ops::matmul(&tij, &xj)?)?,
        );
    }
    ops::concatenate(&rows, -2)
}
