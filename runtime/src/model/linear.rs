//! Dense or MLX-quantized affine projection `y = x Wᵀ (+ b)`. A quantized layer carries
//! `weight` (packed uint32), `scales` and `biases` exactly as MLX writes them.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::{ops, Array};

/// Group size and bits of an MLX affine-quantized tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub group_size: i32,
    pub bits: i32,
}

/// Answers, for a module path (mlx-community naming), whether it is quantized and how.
pub type QuantLookup<'a> = &'a dyn Fn(&str) -> Option<QuantSpec>;

/// Placeholder of the right shape; the loader replaces every one (strictly) before use.
pub(crate) fn placeholder(shape: &[i32]) -> Array {
    Array::zeros::<f32>(shape).expect("zeros of a valid shape")
}

/// Shapes of (weight, scales) for an `[.., out, in]` matrix quantized with `q`.
pub(crate) fn quantized_shapes(
    lead: &[i32],
    out: i32,
    inp: i32,
    q: QuantSpec,
) -> (Vec<i32>, Vec<i32>) {
    let mut w = lead.to_vec();
    w.extend([out, inp * q.bits / 32]);
    let mut s = lead.to_vec();
    s.extend([out, inp / q.group_size]);
    (w, s)
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct Linear {
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub bias: Param<Option<Array>>,
    #[param]
    pub scales: Param<Option<Array>>,
    #[param]
    pub biases: Param<Option<Array>>,
    pub quant: Option<QuantSpec>,
}

impl Linear {
    /// A `in → out` projection at `path`, quantized when `quant(path)` says so.
    pub fn new(path: &str, inp: usize, out: usize, bias: bool, quant: QuantLookup) -> Self {
        let (inp, out) = (inp as i32, out as i32);
        let q = quant(path);
        let (weight, scales, biases) = match q {
            Some(q) => {
                let (w, s) = quantized_shapes(&[], out, inp, q);
                (
                    placeholder(&w),
                    Some(placeholder(&s)),
                    Some(placeholder(&s)),
                )
            }
            None => (placeholder(&[out, inp]), None, None),
        };
        Self {
            weight: Param::new(weight),
            bias: Param::new(bias.then(|| placeholder(&[out]))),
            scales: Param::new(scales),
            biases: Param::new(biases),
            quant: q,
        }
    }

    pub fn forward(&self, x: &Array) -> Result<Array, Exception> {
        // Dense with bias: `bias + x·Wᵀ` as one op, rounded once in bf16 as MLX's own Linear
        // does (matmul then add rounds twice and drifts by an ulp; the vision tower's parity
        // with mlx-vlm depends on it). Quantized layers add the bias afterwards, as MLX does.
        if let (None, Some(b)) = (self.quant, self.bias.as_ref()) {
            return ops::addmm(b, x, self.weight.as_ref().t(), None, None);
        }
        let y = match (self.quant, self.scales.as_ref()) {
            (Some(q), Some(scales)) => ops::quantized_matmul(
                x,
                self.weight.as_ref(),
                scales,
                self.biases.as_ref(),
                true,
                q.group_size,
                q.bits,
            )?,
            _ => ops::matmul(x, self.weight.as_ref().t())?,
        };
        match self.bias.as_ref() {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
}
