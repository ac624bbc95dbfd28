//! Interleaved multimodal RoPE over the first `rotary_dim` dims of each head (half-split
//! pairing). Frequency j rotates by the position of axis `sel(j)`: h for j ≡ 1 (mod 3) below
//! 3·section[1], w for j ≡ 2 (mod 3) below 3·section[2], t otherwise. Text tokens have t = h = w,
//! which makes this the ordinary 1D RoPE: such runs (every text prompt, every decode step)
//! go through MLX's fused rope kernel instead of the tables, one kernel in place of seven.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::{fast, ops, Array};

#[derive(Debug, Clone)]
pub struct MRope {
    inv_freq: Array,
    selector: Array,
    rotary_dim: i32,
    theta: f32,
}

/// How the positions of one forward pass rotate queries and keys.
#[derive(Debug, Clone)]
pub enum RopeTables {
    /// Consecutive positions `offset, offset + 1, …` with t = h = w: ordinary 1D RoPE.
    Text { offset: i32 },
    /// Any (t, h, w) positions: `cos`/`sin` `[L, rotary_dim]` from [`MRope::cos_sin`].
    Grid { cos: Array, sin: Array },
}

impl RopeTables {
    /// Arrays to evaluate ahead of a timed region.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            RopeTables::Text { .. } => Vec::new(),
            RopeTables::Grid { cos, sin } => vec![cos, sin],
        }
    }
}

/// `Some(start)` when `positions` `[3, L]` are `start..start + L` on all three axes.
fn text_run(positions: &Array) -> Option<i32> {
    let shape = positions.shape();
    if shape.len() != 2 || shape[0] != 3 || positions.dtype() != mlx_rs::Dtype::Int32 {
        return None;
    }
    let l = shape[1] as usize;
    let p = positions.try_as_slice::<i32>().ok()?;
    let start = *p.first()?;
    let consecutive = (0..3).all(|axis| {
        p[axis * l..(axis + 1) * l]
            .iter()
            .enumerate()
            .all(|(i, &v)| v == start + i as i32)
    });
    consecutive.then_some(start)
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
            theta: theta as f32,
        })
    }

    /// The rotation for positions `[3, L]` (t, h, w); tables are built only for non-text runs.
    pub fn tables(&self, positions: &Array, dtype: mlx_rs::Dtype) -> Result<RopeTables, Exception> {
        if let Some(offset) = text_run(positions) {
            return Ok(RopeTables::Text { offset });
        }
        let (cos, sin) = self.cos_sin(positions, dtype)?;
        Ok(RopeTables::Grid { cos, sin })
    }

    /// Rotates `x` `[B, H, L, D]`.
    pub fn rotate(&self, x: &Array, tables: &RopeTables) -> Result<Array, Exception> {
        match tables {
            RopeTables::Text { offset } => {
                fast::rope(x, self.rotary_dim, false, self.theta, 1.0, *offset, None)
            }
            RopeTables::Grid { cos, sin } => self.apply(x, cos, sin),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::{random, Dtype};

    fn rope() -> MRope {
        // The benchmark checkpoint's geometry: head 128, a quarter rotated, sections 6/5/5.
        MRope::new(32, 1e7, &[6, 5, 5]).unwrap()
    }

    fn positions(rows: [&[i32]; 3]) -> Array {
        let flat: Vec<i32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Array::from_slice(&flat, &[3, rows[0].len() as i32])
    }

    #[test]
    fn text_runs_take_the_fused_kernel_and_rotate_as_the_tables_do() {
        let r = rope();
        let key = random::key(7).unwrap();
        let x = random::normal::<f32>(&[1, 4, 5, 128], None, None, Some(&key)).unwrap();
        for start in [0, 1, 977] {
            let run: Vec<i32> = (start..start + 5).collect();
            let pos = positions([&run, &run, &run]);
            let tables = r.tables(&pos, Dtype::Float32).unwrap();
            assert!(matches!(tables, RopeTables::Text { offset } if offset == start));
            let fast = r.rotate(&x, &tables).unwrap();
            let (cos, sin) = r.cos_sin(&pos, Dtype::Float32).unwrap();
            let slow = r.apply(&x, &cos, &sin).unwrap();
            let diff = fast
                .subtract(&slow)
                .unwrap()
                .abs()
                .unwrap()
                .max(None)
                .unwrap();
            // Angles up to ~1000 rad in f32: both round the angle, not the rotation.
            assert!(
                diff.item_exact::<f32>() < 1e-3,
                "start {start}: {}",
                diff.item_exact::<f32>()
            );
        }
    }

    #[test]
    fn image_grids_and_gaps_keep_the_tables() {
        let r = rope();
        for pos in [
            positions([&[3, 3, 3, 3], &[3, 3, 4, 4], &[3, 4, 3, 4]]),
            positions([&[0, 1, 3], &[0, 1, 3], &[0, 1, 3]]),
        ] {
            assert!(matches!(
                r.tables(&pos, Dtype::Float32).unwrap(),
                RopeTables::Grid { .. }
            ));
        }
    }
}
