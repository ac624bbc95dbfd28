//! The vision tower: pixels → patch embedding + interpolated learned positions → blocks with
//! 2D rotary attention → patch merger. Output: one feature row per merged token, in the
//! weights' dtype.

use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::{ops, Array, Dtype};

use super::config::VisionConfig;
use super::merger::PatchMerger;
use super::patch_embed::PatchEmbed;
use super::positions::merge_order;
use super::rotary::VisionRotary;
use super::vision_block::{TowerOptions, VisionBlock};
use crate::model::QuantLookup;

/// A point in the tower's forward, for [`VisionTower::forward_observed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Patch embedding plus interpolated positions.
    Embed,
    /// Output of block `i`.
    Block(usize),
    /// The merged features (the tower's output).
    Merger,
}

/// The learned `side × side` position table.
#[derive(Debug, Clone, ModuleParameters)]
pub struct PositionTable {
    #[param]
    pub weight: Param<Array>,
}

#[derive(Debug, Clone, ModuleParameters)]
pub struct VisionTower {
    #[param]
    pub patch_embed: PatchEmbed,
    #[param]
    pub pos_embed: PositionTable,
    #[param]
    pub blocks: Vec<VisionBlock>,
    #[param]
    pub merger: PatchMerger,
    config: VisionConfig,
    rotary: VisionRotary,
    options: TowerOptions,
}

/// Bilinear interpolation of the position table at one grid: for each of the four corners,
/// the table row and weight of every patch (row-major over the `h × w` grid).
struct Bilinear {
    index: [Vec<i32>; 4],
    weight: [Vec<f32>; 4],
}

impl VisionTower {
    /// A tower with placeholder weights (the loader replaces every one); its parameter names
    /// and shapes are the checkpoint's.
    pub fn new(cfg: &VisionConfig) -> Result<Self, Exception> {
        Self::new_quantized(cfg, &|_| None)
    }

    /// As [`VisionTower::new`], with linear layers quantized where `quant` says so; `quant`
    /// is asked with full checkpoint paths (`vision_tower.blocks.0.attn.qkv`).
    pub fn new_quantized(cfg: &VisionConfig, quant: QuantLookup) -> Result<Self, Exception> {
        cfg.validate()
            .map_err(|e| Exception::custom(e.to_string()))?;
        let act = cfg
            .activation()
            .map_err(|e| Exception::custom(e.to_string()))?;
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(&format!("vision_tower.blocks.{i}"), cfg, act, quant))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(cfg)?,
            pos_embed: PositionTable {
                weight: Param::new(Array::zeros::<f32>(&[
                    cfg.num_position_embeddings as i32,
                    cfg.hidden_size as i32,
                ])?),
            },
            blocks,
            merger: PatchMerger::new("vision_tower.merger", cfg, quant)?,
            config: cfg.clone(),
            rotary: VisionRotary::new(cfg.head_dim()),
            options: TowerOptions::default(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The dtype activations are kept in: that of the (never quantized) patch embedding.
    pub fn dtype(&self) -> Dtype {
        self.patch_embed.proj.weight.dtype()
    }

    pub fn options(&self) -> TowerOptions {
        self.options
    }

    /// Switches how the tower runs (the defaults are the fast ones; see [`TowerOptions`]).
    pub fn set_options(&mut self, options: TowerOptions) {
        self.options = options;
    }

    /// `pixels` `[rows, C·T·P·P]`, merge groups as consecutive rows, images in order;
    /// `grid_thw` one (t, h, w) patch grid per image. Returns `[rows / merge², out_hidden]`.
    pub fn forward(&self, pixels: &Array, grid_thw: &[[u32; 3]]) -> Result<Array, Exception> {
        self.forward_observed(pixels, grid_thw, &mut |_, _| Ok(()))
    }

    /// [`VisionTower::forward`], handing each stage's output to `observe` as it is built
    /// (for per-stage timing and dtype checks; arrays are lazy until evaluated).
    pub fn forward_observed(
        &self,
        pixels: &Array,
        grid_thw: &[[u32; 3]],
        observe: &mut dyn FnMut(Stage, &Array) -> Result<(), Exception>,
    ) -> Result<Array, Exception> {
        let spans = self.check_input(pixels, grid_thw)?;
        let dtype = self.dtype();
        let opts = self.options;
        let act_dtype = if opts.anchor_dtype {
            dtype
        } else {
            Dtype::Float32
        };
        let pixels = pixels.as_dtype(act_dtype)?;
        let mut x = self
            .patch_embed
            .forward(&pixels)?
            .add(self.position_embeddings(grid_thw)?)?;
        observe(Stage::Embed, &x)?;
        let rope = self
            .rotary
            .tables(grid_thw, self.config.spatial_merge_size)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &rope, &spans, &opts)?;
            observe(Stage::Block(i), &x)?;
        }
        let out = self.merger.forward(&x, &opts)?.as_dtype(dtype)?;
        observe(Stage::Merger, &out)?;
        Ok(out)
    }

    /// Validates shapes and returns each frame's `(start, len)` token span.
    fn check_input(
        &self,
        pixels: &Array,
        grid_thw: &[[u32; 3]],
    ) -> Result<Vec<(i32, i32)>, Exception> {
        let cfg = &self.config;
        let m = cfg.spatial_merge_size as u32;
        let shape = pixels.shape();
        if shape.len() != 2 || shape[1] as usize != cfg.patch_dim() {
            return Err(Exception::custom(format!(
                "vision tower: pixels must be [rows, {}], got {shape:?}",
                cfg.patch_dim()
            )));
        }
        let mut spans = Vec::new();
        let mut start = 0i64;
        for g in grid_thw {
            let [t, h, w] = *g;
            if t == 0 || h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
                return Err(Exception::custom(format!(
                    "vision tower: grid {g:?} is empty or not divisible by merge size {m}"
                )));
            }
            for _ in 0..t {
                let len = i64::from(h) * i64::from(w);
                spans.push((start as i32, len as i32));
                start += len;
            }
        }
        if grid_thw.is_empty() || start != i64::from(shape[0]) {
            return Err(Exception::custom(format!(
                "vision tower: grids {grid_thw:?} cover {start} patches but pixels have {} rows",
                shape[0]
            )));
        }
        Ok(spans)
    }

    /// The learned position table interpolated bilinearly (corners aligned) to each grid,
    /// rows in merge-group order, repeated for every frame.
    fn position_embeddings(&self, grid_thw: &[[u32; 3]]) -> Result<Array, Exception> {
        let side = self.config.position_grid_side();
        let merge = self.config.spatial_merge_size;
        let mut index: [Vec<i32>; 4] = Default::default();
        let mut weight: [Vec<f32>; 4] = Default::default();
        for &[t, h, w] in grid_thw {
            let (h, w) = (h as usize, w as usize);
            let b = bilinear(side, h, w)?;
            let order = merge_order(h, w, merge);
            for _ in 0..t {
                for &(r, c) in &order {
                    for corner in 0..4 {
                        index[corner].push(b.index[corner][r * w + c]);
                        weight[corner].push(b.weight[corner][r * w + c]);
                    }
                }
            }
        }
        let n = index[0].len() as i32;
        let table = self.pos_embed.weight.as_ref();
        let dt = table.dtype();
        let mut sum: Option<Array> = None;
        for corner in 0..4 {
            let rows = table.take_axis(Array::from_slice(&index[corner], &[n]), 0)?;
            let wts = Array::from_slice(&weight[corner], &[n, 1]).as_dtype(dt)?;
            let term = rows.multiply(wts)?;
            sum = Some(match sum {
                None => term,
                Some(s) => s.add(term)?,
            });
        }
        let out = sum.expect("four corners");
        if self.options.anchor_dtype {
            out.as_dtype(self.dtype())
        } else {
            Ok(out)
        }
    }
}

/// `n` points spread evenly over `0..=side-1` on one axis: the table lines on either side of
/// each point and its distance past the lower one.
struct AxisSamples {
    floor: Vec<i32>,
    ceil: Vec<i32>,
    frac: Vec<f32>,
}

impl AxisSamples {
    fn new(side: usize, n: usize) -> Result<Self, Exception> {
        let last = (side - 1) as i32;
        // MLX's own linspace, so the sample points are bit-identical to the reference.
        let opts = ops::LinspaceOptions {
            count: n as i32,
            endpoint: true,
        };
        let pts = ops::linspace::<f32, f32>(0.0, last as f32, opts)?;
        pts.eval()?;
        let pts = pts.as_slice::<f32>();
        let floor: Vec<i32> = pts.iter().map(|&p| p as i32).collect();
        let ceil = floor.iter().map(|&f| (f + 1).min(last)).collect();
        let frac = pts
            .iter()
            .zip(&floor)
            .map(|(&p, &f)| p - f as f32)
            .collect();
        Ok(Self { floor, ceil, frac })
    }
}

/// Corner rows and weights of a `side × side` table sampled at `h × w` points spread evenly
/// from corner to corner (the table's first and last rows/columns are hit exactly).
fn bilinear(side: usize, h: usize, w: usize) -> Result<Bilinear, Exception> {
    let (hs, ws) = (AxisSamples::new(side, h)?, AxisSamples::new(side, w)?);
    let (hf, hc, dh) = (&hs.floor, &hs.ceil, &hs.frac);
    let (wf, wc, dw) = (&ws.floor, &ws.ceil, &ws.frac);
    let side = side as i32;
    let mut out = Bilinear {
        index: Default::default(),
        weight: Default::default(),
    };
    for r in 0..h {
        for c in 0..w {
            let corners = [
                (hf[r], wf[c], (1.0 - dh[r]) * (1.0 - dw[c])),
                (hf[r], wc[c], (1.0 - dh[r]) * dw[c]),
                (hc[r], wf[c], dh[r] * (1.0 - dw[c])),
                (hc[r], wc[c], dh[r] * dw[c]),
            ];
            for (k, (row, col, wt)) in corners.into_iter().enumerate() {
                out.index[k].push(row * side + col);
                out.weight[k].push(wt);
            }
        }
    }
    Ok(out)
}
