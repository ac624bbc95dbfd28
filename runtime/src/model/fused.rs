//! Elementwise chains of the language model run as compiled MLX graphs: one fused kernel
//! where eager evaluation launches one per operation. A decode step is bound by kernel
//! launches, not arithmetic, so this is where its time goes.
//!
//! Each function also has its eager form (`*_eager`), the definition the tests compare with.
//! On MLX's CPU backend the eager form runs: there compiled graphs measured slower (decode
//! 3.7 vs 7.5 tok/s on the benchmark checkpoint), so [`Fusion::Auto`] fuses on a GPU only.
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use mlx_rs::error::Exception;
use mlx_rs::transforms::compile::compile;
use mlx_rs::{nn, ops, Array, Dtype};

type Binary = Box<dyn for<'a> FnMut((&'a Array, &'a Array)) -> Result<Array, Exception>>;
type Ternary =
    Box<dyn for<'a> FnMut((&'a Array, &'a Array, &'a Array)) -> Result<Array, Exception>>;
type Many = Box<dyn for<'a> FnMut(&'a [Array]) -> Result<Vec<Array>, Exception>>;

/// Whether the compiled forms run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fusion {
    /// Compiled on a GPU (Metal, CUDA), eager on the CPU.
    Auto,
    On,
    Off,
}

static FUSION: AtomicU8 = AtomicU8::new(0);

/// Sets the mode for every thread (benchmarks compare the two).
pub fn set_fusion(mode: Fusion) {
    FUSION.store(
        match mode {
            Fusion::Auto => 0,
            Fusion::On => 1,
            Fusion::Off => 2,
        },
        Ordering::Relaxed,
    );
}

fn fused() -> bool {
    static ON_GPU: OnceLock<bool> = OnceLock::new();
    match FUSION.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *ON_GPU.get_or_init(|| {
            mlx_rs::Device::try_default()
                .and_then(|d| d.get_type())
                .is_ok_and(|t| matches!(t, mlx_rs::DeviceType::Gpu))
        }),
    }
}

thread_local! {
    // MLX graphs are per thread; one compiled graph per function, dtype and (unless
    // shapeless) shape, cached by MLX.
    static SWIGLU: RefCell<Binary> =
        RefCell::new(Box::new(compile(|(g, x): (&Array, &Array)| swiglu_eager(g, x), true)));
    static SILU_GATE_F32: RefCell<Binary> = RefCell::new(Box::new(compile(
        |(x, g): (&Array, &Array)| silu_gate_f32_eager(x, g),
        true,
    )));
    static SIGMOID_GATE: RefCell<Binary> = RefCell::new(Box::new(compile(
        |(x, g): (&Array, &Array)| sigmoid_gate_eager(x, g),
        true,
    )));
    static GATED_ADD: RefCell<Ternary> = RefCell::new(Box::new(compile(
        |(y, x, g): (&Array, &Array, &Array)| gated_add_eager(y, x, g),
        true,
    )));
    static DECAY: RefCell<Ternary> = RefCell::new(Box::new(compile(
        |(a_log, a, dt_bias): (&Array, &Array, &Array)| decay_eager(a_log, a, dt_bias),
        true,
    )));
    static DELTA_STEP: RefCell<Many> = RefCell::new(Box::new(compile(
        |args: &[Array]| {
            let (y, s) =
                delta_step_eager(&args[0], &args[1], &args[2], &args[3], &args[4], &args[5])?;
            Ok(vec![y, s])
        },
        false,
    )));
}

/// `SiLU(gate) · x`.
pub fn swiglu(gate: &Array, x: &Array) -> Result<Array, Exception> {
    if !fused() {
        return swiglu_eager(gate, x);
    }
    SWIGLU.with(|f| (f.borrow_mut())((gate, x)))
}

pub fn swiglu_eager(gate: &Array, x: &Array) -> Result<Array, Exception> {
    nn::silu(gate)?.multiply(x)
}

/// `x · SiLU(gate)` computed in f32, returned in `x`'s dtype (the gated RMSNorm's tail).
pub fn silu_gate_f32(x: &Array, gate: &Array) -> Result<Array, Exception> {
    if !fused() {
        return silu_gate_f32_eager(x, gate);
    }
    SILU_GATE_F32.with(|f| (f.borrow_mut())((x, gate)))
}

pub fn silu_gate_f32_eager(x: &Array, gate: &Array) -> Result<Array, Exception> {
    nn::silu(gate.as_dtype(Dtype::Float32)?)?
        .multiply(x.as_dtype(Dtype::Float32)?)?
        .as_dtype(x.dtype())
}

/// `x · σ(gate)`.
pub fn sigmoid_gate(x: &Array, gate: &Array) -> Result<Array, Exception> {
    if !fused() {
        return sigmoid_gate_eager(x, gate);
    }
    SIGMOID_GATE.with(|f| (f.borrow_mut())((x, gate)))
}

pub fn sigmoid_gate_eager(x: &Array, gate: &Array) -> Result<Array, Exception> {
    x.multiply(ops::sigmoid(gate)?)
}

/// `y + x · σ(gate)` (the MoE output: routed experts plus the gated shared expert).
pub fn gated_add(y: &Array, x: &Array, gate: &Array) -> Result<Array, Exception> {
    if !fused() {
        return gated_add_eager(y, x, gate);
    }
    GATED_ADD.with(|f| (f.borrow_mut())((y, x, gate)))
}

pub fn gated_add_eager(y: &Array, x: &Array, gate: &Array) -> Result<Array, Exception> {
    y.add(sigmoid_gate_eager(x, gate)?)
}

/// DeltaNet's per-token decay `g = exp(−exp(A_log) · softplus(a + dt_bias))`, f32.
pub fn decay(a_log: &Array, a: &Array, dt_bias: &Array) -> Result<Array, Exception> {
    if !fused() {
        return decay_eager(a_log, a, dt_bias);
    }
    DECAY.with(|f| (f.borrow_mut())((a_log, a, dt_bias)))
}

pub fn decay_eager(a_log: &Array, a: &Array, dt_bias: &Array) -> Result<Array, Exception> {
    a_log
        .as_dtype(Dtype::Float32)?
        .exp()?
        .multiply(nn::softplus(a.add(dt_bias)?)?)?
        .negative()?
        .exp()
}

/// One DeltaNet recurrence step (decode). q, k `[B, H, Dk]`, v `[B, H, Dv]`, g, β `[B, H]`,
/// state `[B, H, Dv, Dk]` → (output `[B, H, Dv]` in q's dtype, next state). Leading axes
/// broadcast: q, k `[B, Hk, 1, Dk]` against v `[B, Hk, r, Dv]` and state `[B, Hk, r, Dv, Dk]`
/// shares each key head among its r value heads without copying it.
pub fn delta_step(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
) -> Result<(Array, Array), Exception> {
    if !fused() {
        return delta_step_eager(q, k, v, g, beta, state);
    }
    let args = [q, k, v, g, beta, state].map(Clone::clone);
    let mut out = DELTA_STEP.with(|f| (f.borrow_mut())(&args))?;
    let state = out.pop().expect("two outputs");
    let y = out.pop().expect("two outputs");
    Ok((y, state))
}

/// `S ← g·S;  S ← S + k ⊗ β(v − S k);  y = S q`.
pub fn delta_step_eager(
    q: &Array,
    k: &Array,
    v: &Array,
    g: &Array,
    beta: &Array,
    state: &Array,
) -> Result<(Array, Array), Exception> {
    let decay = g.expand_dims_axes(&[-1, -2])?;
    let state = state.multiply(&decay)?;
    let k_row = k.expand_dims(-2)?;
    let kv_mem = state.multiply(&k_row)?.sum_axis(-1, None)?;
    let delta = v.subtract(&kv_mem)?.multiply(beta.expand_dims(-1)?)?;
    let state = state.add(k_row.multiply(delta.expand_dims(-1)?)?)?;
    let y = state.multiply(q.expand_dims(-2)?)?.sum_axis(-1, None)?;
    Ok((y.as_dtype(q.dtype())?, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    fn max_diff(a: &Array, b: &Array) -> f32 {
        a.as_dtype(Dtype::Float32)
            .unwrap()
            .subtract(b.as_dtype(Dtype::Float32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_exact::<f32>()
    }

    fn normal(shape: &[i32], dtype: Dtype, key: u64) -> Array {
        let k = random::key(key).unwrap();
        random::normal::<f32>(shape, None, None, Some(&k))
            .unwrap()
            .as_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn compiled_kernels_equal_their_eager_definitions() {
        set_fusion(Fusion::On);
        for dtype in [Dtype::Float32, Dtype::Bfloat16] {
            // bf16: fused kernels may round intermediates differently, by at most an ulp or so.
            let tol = if dtype == Dtype::Float32 { 1e-6 } else { 2e-2 };
            let (g, x) = (normal(&[2, 3, 8], dtype, 1), normal(&[2, 3, 8], dtype, 2));
            assert!(max_diff(&swiglu(&g, &x).unwrap(), &swiglu_eager(&g, &x).unwrap()) <= tol);
            let out = silu_gate_f32(&x, &g).unwrap();
            assert_eq!(out.dtype(), dtype);
            assert!(max_diff(&out, &silu_gate_f32_eager(&x, &g).unwrap()) <= tol);
            assert!(
                max_diff(
                    &sigmoid_gate(&x, &g).unwrap(),
                    &sigmoid_gate_eager(&x, &g).unwrap()
                ) <= tol
            );
            let y = normal(&[2, 3, 8], dtype, 12);
            assert!(
                max_diff(
                    &gated_add(&y, &x, &g).unwrap(),
                    &gated_add_eager(&y, &x, &g).unwrap()
                ) <= tol
            );
            let (a_log, dt) = (normal(&[3], dtype, 3), normal(&[3], dtype, 4));
            let a = normal(&[2, 5, 3], dtype, 5);
            let d = decay(&a_log, &a, &dt).unwrap();
            assert_eq!(d.dtype(), Dtype::Float32);
            assert!(max_diff(&d, &decay_eager(&a_log, &a, &dt).unwrap()) <= 1e-6);
        }
        let (q, k) = (
            normal(&[1, 4, 8], Dtype::Float32, 6),
            normal(&[1, 4, 8], Dtype::Float32, 7),
        );
        let v = normal(&[1, 4, 6], Dtype::Float32, 8);
        let g = ops::sigmoid(normal(&[1, 4], Dtype::Float32, 9)).unwrap();
        let beta = ops::sigmoid(normal(&[1, 4], Dtype::Float32, 10)).unwrap();
        let mut s_fused = normal(&[1, 4, 6, 8], Dtype::Float32, 11);
        let mut s_eager = s_fused.clone();
        // Several steps, so the compiled graph is reused with new inputs.
        for _ in 0..3 {
            let (y1, n1) = delta_step(&q, &k, &v, &g, &beta, &s_fused).unwrap();
            let (y2, n2) = delta_step_eager(&q, &k, &v, &g, &beta, &s_eager).unwrap();
            assert!(max_diff(&y1, &y2) <= 1e-5);
            assert!(max_diff(&n1, &n2) <= 1e-5);
            (s_fused, s_eager) = (n1, n2);
        }
    }
}
