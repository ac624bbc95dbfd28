//! Sparse MoE block: softmax router, top-k experts renormalised, SwiGLU experts through
//! gather_mm / gather_qmm (tokens sorted by expert when there are many), plus one shared expert
//! scaled by σ(shared_expert_gate(x)).
//!
//! The routing keeps the reference's order of operations (softmax over all experts, top-k,
//! renormalise; weighted sum as multiply then sum). Shorter forms exist (a softmax of the
//! top-k logits, one batched matmul for the mix), but in bf16 they round differently and
//! moved greedy agreement with mlx-vlm below 99 %.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::ops::indexing::{take_along_axis, IndexOp};
use mlx_rs::{ops, Array, Dtype};

use super::fused;
use super::linear::{
    is_narrow, placeholder, quantized_shapes, stack_rows, tail_slack, Linear, MatrixParams,
    QuantLookup, QuantSpec, QuantizedMatrix, Stacked,
};
use super::mlp::Mlp;
use crate::config::TextConfig;

/// Whether computation runs on MLX's CPU backend (whose gather_mm takes float32 only).
fn on_cpu() -> bool {
    matches!(
        mlx_rs::Device::default().get_type(),
        Ok(mlx_rs::DeviceType::Cpu)
    )
}

/// Below this many (token, expert) pairs, sorting costs more than it saves.
const SORT_THRESHOLD: usize = 64;

/// Expert weights `[E, out, in]` (or their quantized form).
#[derive(Debug, Clone, ModuleParameters)]
pub struct SwitchLinear {
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub scales: Param<Option<Array>>,
    #[param]
    pub biases: Param<Option<Array>>,
    pub quant: Option<QuantSpec>,
}

impl SwitchLinear {
    pub fn new(path: &str, experts: usize, inp: usize, out: usize, quant: QuantLookup) -> Self {
        let (e, i, o) = (experts as i32, inp as i32, out as i32);
        let q = quant(path);
        let (weight, scales, biases) = match q {
            Some(q) => {
                let (w, s) = quantized_shapes(&[e], o, i, q);
                (
                    placeholder(&w),
                    Some(placeholder(&s)),
                    Some(placeholder(&s)),
                )
            }
            None => (placeholder(&[e, o, i]), None, None),
        };
        Self {
            weight: Param::new(weight),
            scales: Param::new(scales),
            biases: Param::new(biases),
            quant: q,
        }
    }

    /// `gate` and `up` stacked by output rows, each left as a view into the stack.
    pub fn stack(
        gate: &mut SwitchLinear,
        up: &mut SwitchLinear,
    ) -> Result<Option<Self>, Exception> {
        if gate.quant != up.quant {
            gate.guard_narrow()?;
            up.guard_narrow()?;
            return Ok(None);
        }
        let quant = gate.quant;
        let ((weight, scales, biases), _) =
            stack_rows(&mut [gate.matrix().1, up.matrix().1], quant)?;
        Ok(Some(SwitchLinear {
            weight,
            scales,
            biases,
            quant,
        }))
    }

    /// `x` `[..., 1, in]`, `idx` expert per row → `[..., 1, out]`.
    pub fn forward(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
        match (self.quant, self.scales.as_ref()) {
            (Some(q), Some(s)) => ops::gather_qmm(
                // Expert gathers take the GEMM path even for one token.
                &if is_narrow(self.quant, &self.weight) {
                    tail_slack(x)?
                } else {
                    x.clone()
                },
                self.weight.as_ref(),
                s,
                self.biases.as_ref(),
                None,
                idx,
                true,
                q.group_size,
                q.bits,
                sorted,
            ),
            _ => {
                let w = self.weight.as_ref().swap_axes(-1, -2)?;
                if x.dtype() == Dtype::Float32 || !on_cpu() {
                    return ops::gather_mm(x, w, None, idx, sorted);
                }
                // MLX's CPU gather_mm is float32-only: widen the operands (exact) and round
                // the product back, as a bf16 GEMM with f32 accumulation would.
                ops::gather_mm(
                    x.as_dtype(Dtype::Float32)?,
                    w.as_dtype(Dtype::Float32)?,
                    None,
                    idx,
                    sorted,
                )?
                .as_dtype(x.dtype())
            }
        }
    }
}

impl QuantizedMatrix for SwitchLinear {
    fn matrix(&mut self) -> (Option<QuantSpec>, MatrixParams<'_>) {
        let parts = (&mut self.weight, &mut self.scales, &mut self.biases);
        (self.quant, parts)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct SwitchGlu {
    #[param]
    pub gate_proj: SwitchLinear,
    #[param]
    pub up_proj: SwitchLinear,
    #[param]
    pub down_proj: SwitchLinear,
    /// gate | up as one gather, once [`SwitchGlu::fuse`] has run.
    pub gate_up: Option<SwitchLinear>,
}

impl SwitchGlu {
    /// `x` `[B, L, D]`, `indices` `[B, L, k]` → `[B, L, k, D]`.
    pub fn forward(&self, x: &Array, indices: &Array) -> Result<Array, Exception> {
        let ishape = indices.shape().to_vec();
        let (b, l, k) = (ishape[0], ishape[1], ishape[2]);
        let d = x.shape()[2];
        let n = indices.size();
        if n >= SORT_THRESHOLD {
            // Rows grouped by expert: contiguous weight access, then back to token order.
            let flat = indices.flatten(None, None)?;
            let order = ops::argsort_axis(&flat, 0)?;
            let inv_order = ops::argsort_axis(&order, 0)?;
            let rows = order.floor_divide(Array::from_int(k))?;
            let xs = x.reshape(&[b * l, 1, d])?.take_axis(&rows, 0)?;
            let idx = flat.take_axis(&order, 0)?;
            let y = self.glu(&xs, &idx, true)?;
            let y = y.take_axis(&inv_order, 0)?;
            let out = y.shape()[2];
            y.reshape(&[b, l, k, out])
        } else {
            let xs = x.reshape(&[b, l, 1, 1, d])?;
            let y = self.glu(&xs, indices, false)?;
            y.squeeze_axes(&[-2])
        }
    }

    /// Stacks the experts' gate and up projections (after loading).
    pub fn fuse(&mut self) -> Result<(), Exception> {
        self.gate_up = SwitchLinear::stack(&mut self.gate_proj, &mut self.up_proj)?;
        self.down_proj.guard_narrow()
    }

    fn glu(&self, x: &Array, idx: &Array, sorted: bool) -> Result<Array, Exception> {
        let h = match &self.gate_up {
            Some(stacked) => {
                let gu = stacked.forward(x, idx, sorted)?;
                let half = gu.shape()[gu.ndim() - 1] / 2;
                let parts = gu.split_at_indices(&[half], -1)?;
                fused::swiglu(&parts[0], &parts[1])?
            }
            None => {
                let up = self.up_proj.forward(x, idx, sorted)?;
                let gate = self.gate_proj.forward(x, idx, sorted)?;
                fused::swiglu(&gate, &up)?
            }
        };
        self.down_proj.forward(&h, idx, sorted)
    }
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct SparseMoeBlock {
    #[param]
    pub gate: Linear,
    #[param]
    pub switch_mlp: SwitchGlu,
    #[param]
    pub shared_expert: Mlp,
    #[param]
    pub shared_expert_gate: Linear,
    pub top_k: i32,
    pub num_experts: i32,
    /// Router | shared-expert gate as one matmul, once [`SparseMoeBlock::fuse`] has run.
    pub router: Option<Stacked>,
}

impl SparseMoeBlock {
    pub fn new(path: &str, cfg: &TextConfig, quant: QuantLookup) -> Self {
        let h = cfg.hidden_size;
        let e = cfg.num_experts.unwrap_or(0);
        let mi = cfg.moe_intermediate_size.unwrap_or(0);
        let si = cfg.shared_expert_intermediate_size.unwrap_or(0);
        let sw =
            |n: &str, i, o| SwitchLinear::new(&format!("{path}.switch_mlp.{n}"), e, i, o, quant);
        Self {
            gate: Linear::new(&format!("{path}.gate"), h, e, false, quant),
            switch_mlp: SwitchGlu {
                gate_proj: sw("gate_proj", h, mi),
                up_proj: sw("up_proj", h, mi),
                down_proj: sw("down_proj", mi, h),
                gate_up: None,
            },
            shared_expert: Mlp::new(&format!("{path}.shared_expert"), h, si, quant),
            shared_expert_gate: Linear::new(
                &format!("{path}.shared_expert_gate"),
                h,
                1,
                false,
                quant,
            ),
            top_k: cfg.num_experts_per_tok.unwrap_or(1) as i32,
            num_experts: e as i32,
            router: None,
        }
    }

    /// Stacks what reads the same input: router with shared-expert gate, and each SwiGLU's
    /// gate with its up projection (after loading).
    pub fn fuse(&mut self) -> Result<(), Exception> {
        self.router = Stacked::new(vec![&mut self.gate, &mut self.shared_expert_gate])?;
        self.shared_expert.fuse()?;
        self.switch_mlp.fuse()
    }

    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        let (logits, shared_gate) = match &self.router {
            Some(stacked) => {
                let mut p = stacked.forward(x)?.into_iter();
                (p.next().expect("router"), p.next().expect("shared gate"))
            }
            None => (self.gate.forward(x)?, self.shared_expert_gate.forward(x)?),
        };
        let k = self.top_k;
        let gates = ops::softmax_axis(&logits, -1, true)?;
        let inds = ops::argpartition_axis(&gates, self.num_experts - k, -1)?;
        let inds = inds.index((.., .., (self.num_experts - k)..));
        let scores = take_along_axis(&gates, &inds, -1)?;
        let scores = scores.divide(scores.sum_axis(-1, true)?)?;
        let y = self.switch_mlp.forward(x, &inds)?;
        let y = y.multiply(scores.expand_dims(-1)?)?.sum_axis(-2, None)?;
        let shared = self.shared_expert.forward(x)?;
        fused::gated_add(&y, &shared, &shared_gate)
    }
}
