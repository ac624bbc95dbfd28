//! Interleaved multimodal RoPE over the first `rotary_dim` dims of each head (half-split
//! pairing). Frequency j rotates by the position of axis `sel(j)`: h for j ≡ 1 (mod 3) below
//! 3·section[1], w for j ≡ 2 (mod 3) below 3·section[2], t otherwise. Text tokens have t = h = w,
//! which makes this the ordinary 1D RoPE.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{ops, Array};

#[derive(Debug, Clone)]
pub struct MRope {
    inv_freq: Array,
    selector: Array,
    rotary_dim: i32,
}

impl MRope {
    pub fn new(rotary_dim: usize, theta: f64, section: &[usize]) -> Result<Self, Exception> {
        let freqs = rotary_dim / 2;
        // inv_freq_j = 1 / θ^(2j/d), computed in f32 as MLX does.
        let exps = ops::arange::<_, f32>(0, rotary_dim as i32, 2)?
            .divide(Array::from_f32(rotary_dim as f32))?;
        let inv_freq = ops::power(Array::from_f32(theta as f32), &exps)?.reciprocal()?;
        let mut sel = vec![0i32; freqs];
        for (axis, offset) in [(1usize, 1usize), (2, 2)] {
            let end = (section.get(axis).copied().unwrap_or(0) * 3).min(freqs);
            let mut j = offset;
            while j < end {
                sel[j] = axis as i32;
                j += 3;
            }
        }
        Ok(Self {
            inv_freq,
            selector: Array::from_slice(&sel, &[freqs as i32]),
            rotary_dim: rotary_dim as i32,
        })
    }

    /// `(cos, sin)` of shape `[L, rotary_dim]` for positions `[3, L]` (t, h, w), cast to `dtype`.
    pub fn cos_sin(
        &self,
        positions: &Array,
        dtype: mlx_rs::Dtype,
    ) -> Result<(Array, Array), Exception> {
        // [F, L] → [L, F]
        let picked = positions.take_axis(&self.selector, 0)?.transpose()?;
        let freqs = picked
            .as_dtype(mlx_rs::Dtype::Float32)?
            .multiply(&self.inv_freq)?;
        let emb = ops::concatenate(&[&freqs, &freqs], -1)?;
        Ok((emb.cos()?.as_dtype(dtype)?, emb.sin()?.as_dtype(dtype)?))
    }

    /// Rotates `x` `[B, H, L, D]` with tables from [`MRope::cos_sin`].
    pub fn apply(&self, x: &Array, cos: &Array, sin: &Array) -> Result<Array, Exception> {
        let d = self.rotary_dim;
        let half = d / 2;
        let rot = x.index((.., .., .., ..d));
        let x1 = rot.index((.., .., .., ..half));
        let x2 = rot.index((.., .., .., half..));
        let rotated = ops::concatenate(&[&x2.negative()?, &x1], -1)?;
        let out = rot
            .multiply(cos)?
            .add(rotated.multiply(sin)?)?
            .as_dtype(x.dtype())?;
        if d == x.shape()[3] {
            return Ok(out);
        }
        let pass = x.index((.., .., .., d..));
        ops::concatenate(&[&out, &pass], -1)
    }
}
