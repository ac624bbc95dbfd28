//! Per-layer decoding state: keys/values for full attention, the conv window and the fp32
//! recurrent state for Gated DeltaNet.
use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::{IndexOp, TryIndexMutOp};
use mlx_rs::{ops, Array};

/// Keys and values of one attention layer, in buffers that grow by [`KV_STEP`] tokens and
/// are written in place: concatenating every decode step would copy the whole context each
/// token, which made a decode step's cost grow with the prompt length.
#[derive(Debug, Default)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    /// Tokens held (the buffers may be longer).
    pub offset: usize,
}

/// Buffer growth, in tokens.
pub const KV_STEP: i32 = 256;

impl KvCache {
    /// Appends `[B, H, L, D]` keys/values and returns views of all the held ones.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array), Exception> {
        let len = keys.shape()[2];
        let prev = self.offset as i32;
        let capacity = self.keys.as_ref().map_or(0, |k| k.shape()[2]);
        if prev + len > capacity {
            let grow = (len + KV_STEP - 1) / KV_STEP * KV_STEP;
            let extend = |held: Option<Array>, new: &Array| -> Result<Array, Exception> {
                let mut shape = new.shape().to_vec();
                shape[2] = grow;
                let fresh = ops::zeros_dtype(&shape, new.dtype())?;
                match held {
                    Some(h) => ops::concatenate(&[&h.index((.., .., ..prev, ..)), &fresh], 2),
                    None => Ok(fresh),
                }
            };
            self.keys = Some(extend(self.keys.take(), &keys)?);
            self.values = Some(extend(self.values.take(), &values)?);
        }
        let end = prev + len;
        let mut k = self.keys.take().expect("allocated above");
        let mut v = self.values.take().expect("allocated above");
        k.try_index_mut((.., .., prev..end, ..), &keys)?;
        v.try_index_mut((.., .., prev..end, ..), &values)?;
        let held = (k.index((.., .., ..end, ..)), v.index((.., .., ..end, ..)));
        self.keys = Some(k);
        self.values = Some(v);
        self.offset = end as usize;
        Ok(held)
    }

    /// The buffers, for evaluation between steps.
    pub fn buffers(&self) -> impl Iterator<Item = &Array> {
        self.keys.iter().chain(self.values.iter())
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
            LayerCache::Attention(c) => c.buffers().collect(),
            LayerCache::Linear(c) => c.conv.iter().chain(c.state.iter()).collect(),
        }
    }
}
