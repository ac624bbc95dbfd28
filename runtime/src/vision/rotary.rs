//! 2D rotary position embedding of the vision tower.
//!
//! Each head's dimension is split in two halves of frequencies: the first rotates with the
//! patch's row, the second with its column (`head_dim / 4` frequencies each, base 10000).
//! The angle table is `[h-angles | w-angles]`, repeated twice so that it lines up with the
//! rotate-half convention `x·cos + rotate_half(x)·sin`, computed here as
//! `x·cos + swap_halves(x)·(±sin)` so that the elementwise part fuses into one kernel.

use mlx_rs::error::Exception;
use mlx_rs::transforms::compile::compile;
use mlx_rs::{ops, Array};

use super::positions::merge_order;

/// Base of the rotary frequencies (fixed by the model family).
const THETA: f32 = 10_000.0;

/// The tables of one forward, `[tokens, head_dim]`, always in f32 whatever the activations'
/// dtype (the rotation of bf16 q and k is computed in f32 and rounded once): `cos`, and
/// `sin` with the sign of rotate-half folded in (`−sin` on the first half), so that
/// `rope(x) = x·cos + swap_halves(x)·sin`.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    pub cos: Array,
    pub sin: Array,
}

/// `head_dim / 2` rotary dimensions shared between the row and column axes.
#[derive(Debug, Clone, Copy)]
pub struct VisionRotary {
    /// Rotary dimensions per axis (`head_dim / 2`): `dim / 2` frequencies.
    dim: i32,
}

impl VisionRotary {
    pub fn new(head_dim: usize) -> Self {
        Self {
            dim: (head_dim / 2) as i32,
        }
    }

    /// Angles for `0..len` positions: `[len, dim / 2]`, in f32.
    fn angles(&self, len: i32) -> Result<Array, Exception> {
        let exponents =
            Array::arange::<_, f32>(0, self.dim, 2)?.divide(Array::from_f32(self.dim as f32))?;
        let inv_freq = Array::from_f32(1.0).divide(Array::from_f32(THETA).power(&exponents)?)?;
        let seq = Array::arange::<_, f32>(0, len, 1)?;
        ops::outer(&seq, &inv_freq)
    }

    /// Tables for every patch of every image, tokens in merge-group order (the order of the
    /// pixel rows), in f32.
    pub fn tables(&self, grids: &[[u32; 3]], merge: usize) -> Result<RotaryTables, Exception> {
        let max_side = grids
            .iter()
            .map(|g| g[1].max(g[2]))
            .max()
            .unwrap_or(1)
            .max(1) as i32;
        let table = self.angles(max_side)?;
        let (mut rows, mut cols) = (Vec::new(), Vec::new());
        for &[t, h, w] in grids {
            let order = merge_order(h as usize, w as usize, merge);
            for _ in 0..t {
                for &(r, c) in &order {
                    rows.push(r as i32);
                    cols.push(c as i32);
                }
            }
        }
        let n = rows.len() as i32;
        let rows = Array::from_slice(&rows, &[n]);
        let cols = Array::from_slice(&cols, &[n]);
        let half = ops::concatenate(
            &[table.take_axis(&rows, 0)?, table.take_axis(&cols, 0)?],
            -1,
        )?;
        let (cos, sin) = (ops::cos(&half)?, ops::sin(&half)?);
        Ok(RotaryTables {
            cos: ops::concatenate(&[&cos, &cos], -1)?,
            sin: ops::concatenate(&[&sin.negative()?, &sin], -1)?,
        })
    }
}

/// `x·cos + swap_halves(x)·sin` over the last axis (equal to `x·cos + rotate_half(x)·sin`
/// with the unsigned table). The products promote `x` to the tables' f32; the sum is rounded
/// back to `x`'s dtype once.
fn rope_eager((x, cos, sin): (&Array, &Array, &Array)) -> Result<Array, Exception> {
    let halves = x.split_equal(2, -1)?;
    let swapped = ops::concatenate(&[&halves[1], &halves[0]], -1)?;
    x.multiply(cos)?
        .add(swapped.multiply(sin)?)?
        .as_dtype(x.dtype())
}

type Rope3 = Box<dyn for<'a> FnMut((&'a Array, &'a Array, &'a Array)) -> Result<Array, Exception>>;

thread_local! {
    // MLX graphs are per thread; one compiled rope per thread, retraced per input shape.
    static ROPE: std::cell::RefCell<Rope3> =
        std::cell::RefCell::new(Box::new(compile(rope_eager, false)));
}

/// Rotates `x` `[..., tokens, head_dim]` by the tables (broadcast over leading axes);
/// `fused` runs it as one compiled graph.
pub fn apply(x: &Array, tables: &RotaryTables, fused: bool) -> Result<Array, Exception> {
    if fused {
        ROPE.with(|f| (f.borrow_mut())((x, &tables.cos, &tables.sin)))
    } else {
        rope_eager((x, &tables.cos, &tables.sin))
    }
}
