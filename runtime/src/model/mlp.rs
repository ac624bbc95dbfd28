//! SwiGLU feed-forward `down(SiLU(gate(x)) · up(x))`: the dense MLP of `qwen3_5` and the
//! shared expert of `qwen3_5_moe`.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::Array;

use super::fused;
use super::linear::{Linear, QuantLookup, QuantizedMatrix, Stacked};

#[derive(Debug, Clone, ModuleParameters)]
pub struct Mlp {
    #[param]
    pub gate_proj: Linear,
    #[param]
    pub up_proj: Linear,
    #[param]
    pub down_proj: Linear,
    /// gate | up as one matmul, once [`Mlp::fuse`] has run.
    pub gate_up: Option<Stacked>,
}

impl Mlp {
    pub fn new(path: &str, dim: usize, hidden: usize, quant: QuantLookup) -> Self {
        Self {
            gate_proj: Linear::new(&format!("{path}.gate_proj"), dim, hidden, false, quant),
            up_proj: Linear::new(&format!("{path}.up_proj"), dim, hidden, false, quant),
            down_proj: Linear::new(&format!("{path}.down_proj"), hidden, dim, false, quant),
            gate_up: None,
        }
    }

    /// Stacks the gate and up projections (after loading).
    pub fn fuse(&mut self) -> Result<(), Exception> {
        self.gate_up = Stacked::new(vec![&mut self.gate_proj, &mut self.up_proj])?;
        self.down_proj.guard_narrow()
    }

    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        let h = match &self.gate_up {
            Some(stacked) => {
                let p = stacked.forward(x)?;
                fused::swiglu(&p[0], &p[1])?
            }
            None => fused::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?,
        };
        self.down_proj.forward(&h)
    }
}
