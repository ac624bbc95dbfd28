//! Dense or MLX-quantized affine projection `y = x Wᵀ (+ b)`. A quantized layer carries
//! `weight` (packed uint32), `scales` and `biases` exactly as MLX writes them.
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::ops::indexing::IndexOp;
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
                &gemm_input(x, self.quant, &self.weight)?,
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

/// Inputs narrower than this make MLX 0.32's CUDA quantized GEMM (`qmm_sm80`, three 64-wide
/// k-tiles in flight whatever K is) read past the end of the weight buffer and of the input
/// rows; where a buffer ends a mapping that is an illegal address (abort or hang). Seen under
/// compute-sanitizer with K = 128, the benchmark's expert width; real Qwen3.5/3.6 layers are
/// ≥ 512 wide and never pay for the slack.
pub const QMM_MIN_IN_FEATURES: i32 = 192;

/// `a` moved into a buffer one leading-axis slab longer (zeros), returned (lazily) as a view
/// of its original length: reads past the end then stay inside memory we own. Values are
/// unchanged.
pub(crate) fn tail_slack(a: &Array) -> Result<Array, Exception> {
    let mut shape = a.shape().to_vec();
    let n = shape[0];
    shape[0] = 1;
    let padded = ops::concatenate(&[a, &ops::zeros_dtype(&shape, a.dtype())?], 0)?;
    Ok(padded.index(..n))
}

/// [`tail_slack`], evaluated (for weights, once after loading).
pub(crate) fn with_tail_slack(a: &Array) -> Result<Array, Exception> {
    let view = tail_slack(a)?;
    view.eval()?;
    Ok(view)
}

/// Whether a quantized matrix (packed `weight`) is narrower than [`QMM_MIN_IN_FEATURES`]. Its
/// GEMM then also reads past the end of the *input* rows (by up to one k-tile), so inputs get
/// [`tail_slack`] too: a copy, but only in layers this narrow.
pub(crate) fn is_narrow(quant: Option<QuantSpec>, weight: &Array) -> bool {
    quant.is_some_and(|q| weight.shape()[weight.ndim() - 1] * 32 / q.bits < QMM_MIN_IN_FEATURES)
}

/// `x` as a quantized matmul against `weight` should read it: with [`tail_slack`] when the
/// matrix is narrow and `x` has several rows (one row goes through the matrix-vector kernel,
/// which stays in bounds).
pub(crate) fn gemm_input(
    x: &Array,
    quant: Option<QuantSpec>,
    weight: &Array,
) -> Result<Array, Exception> {
    if x.size() as i32 > x.dim(-1) && is_narrow(quant, weight) {
        tail_slack(x)
    } else {
        Ok(x.clone())
    }
}

/// Puts slack after a quantized matrix (`weight`, `scales`, `biases`) narrower than
/// [`QMM_MIN_IN_FEATURES`].
fn guard_narrow_quantized(
    quant: Option<QuantSpec>,
    weight: &mut Param<Array>,
    scales: &mut Param<Option<Array>>,
    biases: &mut Param<Option<Array>>,
) -> Result<(), Exception> {
    if !is_narrow(quant, weight) {
        return Ok(());
    }
    **weight = with_tail_slack(weight)?;
    for p in [scales, biases] {
        if let Some(a) = p.value.as_ref() {
            p.value = Some(with_tail_slack(a)?);
        }
    }
    Ok(())
}

/// A matrix MLX may store quantized: a dense or quantized linear layer, the experts' weights,
/// the (tied) embedding table.
pub trait QuantizedMatrix {
    /// Its quantization and arrays.
    fn matrix(&mut self) -> (Option<QuantSpec>, MatrixParams<'_>);

    /// Slack after the matrix when it is narrow (see [`QMM_MIN_IN_FEATURES`]); once, after
    /// loading.
    fn guard_narrow(&mut self) -> Result<(), Exception> {
        let (quant, (weight, scales, biases)) = self.matrix();
        guard_narrow_quantized(quant, weight, scales, biases)
    }
}

impl QuantizedMatrix for Linear {
    fn matrix(&mut self) -> (Option<QuantSpec>, MatrixParams<'_>) {
        let parts = (&mut self.weight, &mut self.scales, &mut self.biases);
        (self.quant, parts)
    }
}

/// Projections of one input stacked by output rows: one matmul where there were several (a
/// decode step is bound by kernel launches, not arithmetic). Built once after loading; each
/// part keeps its weights as a view into the stack, so memory is not doubled.
#[derive(Debug, Clone)]
pub struct Stacked {
    pub linear: Linear,
    /// Where each part ends along the output axis, except the last.
    bounds: Vec<i32>,
}

/// Rows `[start, end)` of the output axis (the second to last) of `a`, as a view.
pub(crate) fn rows(a: &Array, start: i32, end: i32) -> Result<Array, Exception> {
    match a.ndim() {
        2 => Ok(a.index((start..end, ..))),
        3 => Ok(a.index((.., start..end, ..))),
        n => Err(Exception::custom(format!(
            "cannot split a {n}-D weight by rows"
        ))),
    }
}

/// The arrays of one matrix as MLX stores it: `weight`, plus `scales` and `biases` when quantized.
pub type MatrixParams<'a> = (
    &'a mut Param<Array>,
    &'a mut Param<Option<Array>>,
    &'a mut Param<Option<Array>>,
);

/// Picks one array of a [`MatrixParams`] (absent for an unquantized matrix's scales).
type Getter = for<'p> fn(&'p MatrixParams<'_>) -> Option<&'p Array>;

/// The stack of several matrices: `(weight, scales, biases)`.
pub(crate) type StackedMatrix = (Param<Array>, Param<Option<Array>>, Param<Option<Array>>);

/// Concatenates matrices (all quantized with `quant`, or none) by output rows into one
/// evaluated buffer, with slack when narrow (see [`QMM_MIN_IN_FEATURES`]), and leaves each
/// part as a view of its rows. Returns the stack and each part's row range.
pub(crate) fn stack_rows(
    parts: &mut [MatrixParams],
    quant: Option<QuantSpec>,
) -> Result<(StackedMatrix, Vec<(i32, i32)>), Exception> {
    let cat = |field: Getter| -> Result<Option<Array>, Exception> {
        let arrays: Option<Vec<&Array>> = parts.iter().map(field).collect();
        arrays.map(|a| ops::concatenate(&a, -2)).transpose()
    };
    let mut weight = Param::new(cat(|p| Some(&p.0.value))?.expect("every part has a weight"));
    let mut scales = Param::new(cat(|p| p.1.value.as_ref())?);
    let mut biases = Param::new(cat(|p| p.2.value.as_ref())?);
    let all: Vec<&Array> = [
        Some(&weight.value),
        scales.value.as_ref(),
        biases.value.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    mlx_rs::transforms::eval(all)?;
    guard_narrow_quantized(quant, &mut weight, &mut scales, &mut biases)?;
    let mut ranges = Vec::with_capacity(parts.len());
    let mut start = 0;
    for (w, s, b) in parts.iter_mut() {
        let end = start + w.shape()[w.ndim() - 2];
        w.value = rows(&weight, start, end)?;
        if let Some(stacked) = scales.value.as_ref() {
            s.value = Some(rows(stacked, start, end)?);
        }
        if let Some(stacked) = biases.value.as_ref() {
            b.value = Some(rows(stacked, start, end)?);
        }
        ranges.push((start, end));
        start = end;
    }
    Ok(((weight, scales, biases), ranges))
}

impl Stacked {
    /// Stacks `parts` that read the same input. `None` when they cannot share one matmul
    /// (different quantization, or biases on some only); the parts are then left as they are.
    pub fn new(mut parts: Vec<&mut Linear>) -> Result<Option<Self>, Exception> {
        let quant = parts[0].quant;
        let with_bias = parts[0].bias.is_some();
        if parts
            .iter()
            .any(|p| p.quant != quant || p.bias.is_some() != with_bias)
        {
            for p in parts {
                p.guard_narrow()?;
            }
            return Ok(None);
        }
        let mut matrices: Vec<MatrixParams> = parts.iter_mut().map(|p| p.matrix().1).collect();
        let ((weight, scales, biases), ranges) = stack_rows(&mut matrices, quant)?;
        let bias = if with_bias {
            let all: Vec<&Array> = parts.iter().filter_map(|p| p.bias.value.as_ref()).collect();
            let stacked = ops::concatenate(&all, 0)?;
            stacked.eval()?;
            for (p, &(start, end)) in parts.iter_mut().zip(&ranges) {
                p.bias.value = Some(stacked.index(start..end));
            }
            Some(stacked)
        } else {
            None
        };
        let bounds = ranges[..ranges.len() - 1].iter().map(|r| r.1).collect();
        Ok(Some(Self {
            linear: Linear {
                weight,
                bias: Param::new(bias),
                scales,
                biases,
                quant,
            },
            bounds,
        }))
    }

    /// One output per part, in order (views of the stacked output).
    pub fn forward(&self, x: &Array) -> Result<Vec<Array>, Exception> {
        self.linear.forward(x)?.split_at_indices(&self.bounds, -1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::{random, Dtype};

    fn quantized(out: i32, inp: i32) -> Linear {
        let key = random::key(5).unwrap();
        let w = random::normal::<f32>(&[out, inp], None, None, Some(&key))
            .unwrap()
            .as_dtype(Dtype::Bfloat16)
            .unwrap();
        let (wq, s, b) = ops::quantize(&w, 64, 4).unwrap();
        Linear {
            weight: Param::new(wq),
            bias: Param::new(None),
            scales: Param::new(Some(s)),
            biases: Param::new(Some(b)),
            quant: Some(QuantSpec {
                group_size: 64,
                bits: 4,
            }),
        }
    }

    fn dense(out: i32, inp: i32, bias: bool, seed: u64) -> Linear {
        let key = random::key(seed).unwrap();
        let w = random::normal::<f32>(&[out, inp], None, None, Some(&key)).unwrap();
        Linear {
            weight: Param::new(w),
            bias: Param::new(bias.then(|| {
                random::normal::<f32>(&[out], None, None, Some(&random::key(seed + 1).unwrap()))
                    .unwrap()
            })),
            scales: Param::new(None),
            biases: Param::new(None),
            quant: None,
        }
    }

    #[test]
    fn stacked_parts_with_biases_give_each_part_its_own_output() {
        let x = random::normal::<f32>(&[2, 3, 16], None, None, None).unwrap();
        let (mut a, mut b) = (dense(5, 16, true, 1), dense(7, 16, true, 3));
        let expected = [a.forward(&x).unwrap(), b.forward(&x).unwrap()];
        let stacked = Stacked::new(vec![&mut a, &mut b])
            .unwrap()
            .expect("stackable");
        let got = stacked.forward(&x).unwrap();
        assert_eq!(got.len(), 2);
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.shape(), e.shape());
            let d = g.subtract(e).unwrap().abs().unwrap().max(None).unwrap();
            assert!(d.item_exact::<f32>() < 1e-5);
        }
        // The parts are views into the stack and still compute what they did.
        assert!(a.forward(&x).unwrap().eq_values(&expected[0]).unwrap());
        // Biases on some parts only: left unstacked.
        let (mut c, mut d) = (dense(4, 16, true, 5), dense(4, 16, false, 7));
        assert!(Stacked::new(vec![&mut c, &mut d]).unwrap().is_none());
    }

    #[test]
    fn narrow_quantized_layers_get_slack_without_changing_a_value() {
        for inp in [128, 512] {
            let mut layer = quantized(96, inp);
            let x = random::normal::<f32>(&[1, 7, inp], None, None, None)
                .unwrap()
                .as_dtype(Dtype::Bfloat16)
                .unwrap();
            let before = layer.forward(&x).unwrap();
            let weight = layer.weight.as_ref().clone();
            layer.guard_narrow().unwrap();
            assert_eq!(layer.weight.shape(), weight.shape());
            assert!(layer.weight.eq_values(&weight).unwrap());
            assert!(layer.forward(&x).unwrap().eq_values(&before).unwrap());
        }
    }
}
