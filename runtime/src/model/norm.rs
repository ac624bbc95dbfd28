//! RMSNorm `x / √(mean(x²) + ε) · w`, and the gated variant of the DeltaNet output
//! `RMSNorm(x) · SiLU(z)` (computed in fp32, cast back).
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::{fast, Array};

use super::linear::placeholder;

#[derive(Debug, Clone, ModuleParameters)]
pub struct RmsNorm {
    #[param]
    pub weight: Param<Array>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64) -> Self {
        Self {
            weight: Param::new(placeholder(&[dim as i32])),
            eps: eps as f32,
        }
    }

    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        fast::rms_norm(x, Some(self.weight.as_ref()), self.eps)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct RmsNormGated {
    #[param]
    pub weight: Param<Array>,
    pub eps: f32,
}

impl RmsNormGated {
    pub fn new(dim: usize, eps: f64) -> Self {
        Self {
            weight: Param::new(placeholder(&[dim as i32])),
            eps: eps as f32,
        }
    }

    /// `RMSNorm(x) · SiLU(gate)`.
    pub fn forward(&self, x: &Array, gate: &Array) -> Result<Array, Exception> {
        let normed = fast::rms_norm(x, Some(self.weight.as_ref()), self.eps)?;
        // rms_norm keeps x's dtype, so the product comes back in it.
        super::fused::silu_gate_f32(&normed, gate)
    }
}
