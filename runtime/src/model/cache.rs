//! Per-layer decoding state: keys/values for full attention, the conv window and the fp32
//! recurrent state for Gated DeltaNet.
use mlx_rs::error::Exception;
use mlx_rs::{ops, Array};

#[derive(Debug, Default)]
pub struct KvCache {
    pub keys: Option<Array>,
    pub values: Option<Array>,
    /// Tokens held.
    pub offset: usize,
}

impl KvCache {
    /// Appends `[B, H, L, D]` keys/values and returns the full ones.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array), Exception> {
        let len = keys.shape()[2] as usize;
        let (k, v) = match (self.keys.take(), self.values.take()) {
            (Some(pk), Some(pv)) => (
                ops::concatenate(&[&pk, &keys], 2)?,
                ops::concatenate(&[&pv, &values], 2)?,
            ),
            _ => (keys, values),
        };
        self.keys = Some(k.clone());
        self.values = Some(v.clone());
        self.offset += len;
        Ok((k, v))
    }
}

#[derive(Debug, Default)]
pub struct DeltaCache {
    /// Last `kernel − 1` conv inputs `[B, K−1, conv_dim]`.
    pub conv: Option<Array>,
    /// Recurrent state `[B, Hv, Dv, Dk]`, fp32.
    pub state: Option<Array>,
}

#[derive(Debug)]
pub enum LayerCache {
    Attention(KvCache),
    Linear(DeltaCache),
}

impl LayerCache {
    /// Arrays to evaluate so the graph does not grow across decode steps.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LayerCache::Attention(c) => c.keys.iter().chain(c.values.iter()).collect(),
            LayerCache::Linear(c) => c.conv.iter().chain(c.state.iter()).collect(),
        }
    }
}
