//! Patch embedding: a Conv3d whose kernel equals its stride (T × P × P), i.e. one affine map
//! per pixel row. Stored as MLX keeps it, `weight` `[hidden, T, P, P, C]` + `bias`.

use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::Array;

use super::config::VisionConfig;

#[derive(Debug, Clone, ModuleParameters)]
pub struct PatchProjection {
    /// `[hidden, T, P, P, C]` (channels last, as MLX convolutions keep them).
    #[param]
    pub weight: Param<Array>,
    #[param]
    pub bias: Param<Array>,
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct PatchEmbed {
    #[param]
    pub proj: PatchProjection,
    hidden: i32,
    channels: i32,
    temporal: i32,
    patch: i32,
}

impl PatchEmbed {
    pub fn new(cfg: &VisionConfig) -> Result<Self, Exception> {
        let (o, t, p, c) = (
            cfg.hidden_size as i32,
            cfg.temporal_patch_size as i32,
            cfg.patch_size as i32,
            cfg.in_channels as i32,
        );
        Ok(Self {
            proj: PatchProjection {
                weight: Param::new(Array::zeros::<f32>(&[o, t, p, p, c])?),
                bias: Param::new(Array::zeros::<f32>(&[o])?),
            },
            hidden: o,
            channels: c,
            temporal: t,
            patch: p,
        })
    }

    /// `pixels` `[rows, C·T·P·P]` (channel-major, as the processor flattens) → `[rows, hidden]`.
    /// Run as the convolution itself (channels last), with the bias added after it: in bf16
    /// that rounds exactly where the reference's Conv3d does, which a fused `bias + x·Wᵀ`
    /// (one rounding, another summation order) does not.
    pub fn forward(&self, pixels: &Array) -> Result<Array, Exception> {
        let (t, p) = (self.temporal, self.patch);
        let patches = pixels
            .reshape(&[-1, self.channels, t, p, p])?
            .transpose_axes(&[0, 2, 3, 4, 1])?;
        mlx_rs::ops::conv3d(
            &patches,
            self.proj.weight.as_ref(),
            (t, p, p),
            None,
            None,
            None,
        )?
        .reshape(&[-1, self.hidden])?
        .add(self.proj.bias.as_ref())
    }
}
