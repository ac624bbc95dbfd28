//! Token embedding table (dense or quantized); also the tied output projection.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::{ops, Array};

use super::linear::{
    gemm_input, placeholder, quantized_shapes, MatrixParams, QuantLookup, QuantSpec,
    QuantizedMatrix,
};

#[derive(Debug, Clone, ModuleParameters)]
pub struct Embedding {
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub scales: Param<Option<Array>>,
    #[param]
    pub biases: Param<Option<Array>>,
    pub quant: Option<QuantSpec>,
}

impl Embedding {
    pub fn new(path: &str, vocab: usize, dim: usize, quant: QuantLookup) -> Self {
        let q = quant(path);
        let (weight, scales, biases) = match q {
            Some(q) => {
                let (w, s) = quantized_shapes(&[], vocab as i32, dim as i32, q);
                (
                    placeholder(&w),
                    Some(placeholder(&s)),
                    Some(placeholder(&s)),
                )
            }
            None => (placeholder(&[vocab as i32, dim as i32]), None, None),
        };
        Self {
            weight: Param::new(weight),
            scales: Param::new(scales),
            biases: Param::new(biases),
            quant: q,
        }
    }

    /// Rows of the table for `ids` (any shape) → `[..ids, dim]`.
    pub fn forward(&self, ids: &Array) -> Result<Array, Exception> {
        let rows = self.weight.as_ref().take_axis(ids, 0)?;
        match (self.quant, self.scales.as_ref(), self.biases.as_ref()) {
            (Some(q), Some(s), b) => {
                let s = s.take_axis(ids, 0)?;
                let b = match b {
                    Some(b) => Some(b.take_axis(ids, 0)?),
                    None => None,
                };
                ops::dequantize(&rows, &s, b.as_ref(), q.group_size, q.bits)
            }
            _ => Ok(rows),
        }
    }

    /// `x · Eᵀ` (tied lm_head).
    pub fn as_linear(&self, x: &Array) -> Result<Array, Exception> {
        match (self.quant, self.scales.as_ref()) {
            (Some(q), Some(s)) => ops::quantized_matmul(
                &gemm_input(x, self.quant, &self.weight)?,
                self.weight.as_ref(),
                s,
                self.biases.as_ref(),
                true,
                q.group_size,
                q.bits,
            ),
            _ => ops::matmul(x, self.weight.as_ref().t()),
        }
    }
}

/// A tied head is a quantized matmul too.
impl QuantizedMatrix for Embedding {
    fn matrix(&mut self) -> (Option<QuantSpec>, MatrixParams<'_>) {
        let parts = (&mut self.weight, &mut self.scales, &mut self.biases);
        (self.quant, parts)
    }
}
