//! The Qwen3.5 / 3.6 text model in mlx-rs, one file per block. Field paths of every module
//! equal the checkpoint's key suffixes (mlx-community layout), so the strict loader can match
//! tensors by name.
pub mod attention;
pub mod cache;
pub mod decoder;
pub mod embedding;
pub mod fused;
pub mod gated_delta;
pub mod language_model;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;

pub use cache::LayerCache;
pub use language_model::{LanguageModel, LogitsScope};
pub use linear::{QuantLookup, QuantSpec};

use mlx_rs::{Array, Dtype};

/// A Python-style weak scalar: a 0-d array in `dtype`, so multiplying a bf16 tensor by it keeps
/// bf16 (an f32 scalar array would promote the result).
pub(crate) fn scalar(value: f32, dtype: Dtype) -> Result<Array, mlx_rs::error::Exception> {
    Array::from_f32(value).as_dtype(dtype)
}
