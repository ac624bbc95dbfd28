//! `cathedral bench-vision`: times the vision tower alone at the real model's shapes (random
//! weights), in its shipped form and with each speed-up switched off, and optionally the
//! mlx-vlm tower on the very same weights and pixels (also comparing the two outputs).
//! Prints tables; asserts nothing.
//!
//! ```text
//! cathedral bench-vision --dir /tmp/vb --python .venv-ref/bin/python [--profile]
//! ```
//!
//! On an NVIDIA GPU, the same binary runs on MLX's CUDA backend when the `libmlx.so` of the
//! `mlx-cuda-13==0.32.2` wheel comes first on `LD_LIBRARY_PATH` (with the CUDA 13 libraries
//! it links, e.g. a PyTorch venv's `nvidia/*/lib`), and the Python peer uses the same wheel
//! through `mlx==0.32.2`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use mlx_rs::module::ModuleParameters;
use mlx_rs::{random, Array, Dtype};

use super::{Stage, TowerOptions, VisionConfig, VisionTower};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDtype {
    F32,
    Bf16,
    F16,
}

impl BenchDtype {
    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::Float32,
            Self::Bf16 => Dtype::Bfloat16,
            Self::F16 => Dtype::Float16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchVisionArgs {
    /// Directory for the random weights and pixels shared with the Python peer.
    #[arg(long)]
    pub dir: PathBuf,
    /// Image height in pixels (a multiple of patch × merge).
    #[arg(long, default_value_t = 1024)]
    pub height: u32,
    /// Image width in pixels (a multiple of patch × merge).
    #[arg(long, default_value_t = 1024)]
    pub width: u32,
    /// Number of blocks (27 in Qwen3.5/3.6; fewer for a quick look on slow machines).
    #[arg(long, default_value_t = 27)]
    pub depth: usize,
    /// Weight dtype.
    #[arg(long, value_enum, default_value_t = BenchDtype::Bf16)]
    pub dtype: BenchDtype,
    /// Timed runs per variant (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs before timing each variant.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Python with mlx-vlm to time the reference tower too (e.g. `.venv-ref/bin/python`).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Time only the shipped configuration (skip the switched-off variants).
    #[arg(long)]
    pub shipped_only: bool,
    /// Also time each stage on its own (embedding, each block, merger), in both
    /// implementations: every stage is evaluated before the next is built.
    #[arg(long)]
    pub profile: bool,
}

/// Median seconds per stage: embedding (patches + positions + rotary tables), one block
/// (median over blocks and runs), all blocks, merger.
#[derive(Debug)]
struct StageTimes {
    embed: f64,
    block: f64,
    blocks: f64,
    merger: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn profile_stages(
    tower: &VisionTower,
    pixels: &Array,
    grid: [u32; 3],
    runs: usize,
) -> anyhow::Result<StageTimes> {
    let (mut embed, mut block, mut blocks, mut merger) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs.max(1) {
        let mut last = Instant::now();
        let mut run_blocks = 0.0;
        tower.forward_observed(pixels, &[grid], &mut |stage, x| {
            x.eval()?;
            let dt = last.elapsed().as_secs_f64();
            match stage {
                Stage::Embed => embed.push(dt),
                Stage::Block(_) => {
                    block.push(dt);
                    run_blocks += dt;
                }
                Stage::Merger => merger.push(dt),
            }
            last = Instant::now();
            Ok(())
        })?;
        blocks.push(run_blocks);
    }
    Ok(StageTimes {
        embed: median(embed),
        block: median(block),
        blocks: median(blocks),
        merger: median(merger),
    })
}

/// Timings of one configuration, in seconds.
struct Timing {
    label: String,
    runs: Vec<f64>,
    peak_bytes: Option<u64>,
}

impl Timing {
    fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

fn bench_config(depth: usize) -> VisionConfig {
    VisionConfig {
        depth,
        out_hidden_size: 2048,
        ..VisionConfig::default()
    }
}

/// Random weights (N(0, 0.02²); norm scales 1 + N(0, 0.02²)) for every tower parameter,
/// keyed as in a checkpoint.
fn random_weights(tower: &VisionTower, dtype: Dtype) -> anyhow::Result<Vec<(String, Array)>> {
    let mut names: Vec<(String, Vec<i32>)> = tower
        .parameters()
        .flatten()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.shape().to_vec()))
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for (i, (name, shape)) in names.into_iter().enumerate() {
        let k = random::key(1000 + i as u64)?;
        let mut w = random::normal::<f32>(shape.as_slice(), None, 0.02, &k)?;
        if name.contains("norm") && name.ends_with("weight") {
            w = w.add(Array::from_f32(1.0))?;
        }
        out.push((name, w.as_dtype(dtype)?));
    }
    Ok(out)
}

fn time_variant(
    tower: &VisionTower,
    label: &str,
    pixels: &Array,
    grid: [u32; 3],
    args: &BenchVisionArgs,
) -> anyhow::Result<Timing> {
    for _ in 0..args.warmup {
        tower.forward(pixels, &[grid])?.eval()?;
    }
    mlx_rs::memory::reset_peak_memory()?;
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t = Instant::now();
        tower.forward(pixels, &[grid])?.eval()?;
        runs.push(t.elapsed().as_secs_f64());
    }
    Ok(Timing {
        label: label.to_owned(),
        runs,
        peak_bytes: mlx_rs::memory::peak_memory().ok().map(|b| b as u64),
    })
}

/// What the Python peer reports besides its timings.
struct PeerReport {
    timing: Timing,
    stages: Option<StageTimes>,
    /// max |ours − mlx-vlm| and max |mlx-vlm| over the output features.
    agreement: Option<(f64, f64)>,
}

fn python_peer(python: &Path, args: &BenchVisionArgs) -> anyhow::Result<PeerReport> {
    // From the repository root when run there, else from where this crate was built.
    let relative = Path::new("tools/reference/vision_bench.py");
    let script = if relative.is_file() {
        relative.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative)
    };
    let out = Command::new(python)
        .arg(&script)
        .arg("--dir")
        .arg(&args.dir)
        .args(["--runs", &args.runs.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(args.profile.then_some("--profile"))
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON line from the Python peer")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let runs = v["runs_s"]
        .as_array()
        .context("runs_s")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    let stages = v.get("stages").map(|st| StageTimes {
        embed: st["embed"].as_f64().unwrap_or(f64::NAN),
        block: st["block"].as_f64().unwrap_or(f64::NAN),
        blocks: st["blocks"].as_f64().unwrap_or(f64::NAN),
        merger: st["merger"].as_f64().unwrap_or(f64::NAN),
    });
    let timing = Timing {
        label: format!("mlx-vlm {}", v["mlx_vlm"].as_str().unwrap_or("?")),
        runs,
        peak_bytes: v["peak_bytes"].as_u64(),
    };
    let agreement = v["max_abs_diff"].as_f64().zip(v["max_abs_ref"].as_f64());
    Ok(PeerReport {
        timing,
        stages,
        agreement,
    })
}

pub fn run_bench_vision(args: &BenchVisionArgs) -> anyhow::Result<()> {
    let cfg = bench_config(args.depth);
    let factor = (cfg.patch_size * cfg.spatial_merge_size) as u32;
    if !args.height.is_multiple_of(factor) || !args.width.is_multiple_of(factor) || args.runs == 0 {
        bail!("height and width must be multiples of {factor}, runs ≥ 1");
    }
    let dtype = args.dtype.dtype();
    let grid = [
        1,
        args.height / cfg.patch_size as u32,
        args.width / cfg.patch_size as u32,
    ];
    let rows = (grid[1] * grid[2]) as i32;
    std::fs::create_dir_all(&args.dir)?;

    let mut tower = VisionTower::new(&cfg)?;
    let weights = random_weights(&tower, dtype)?;
    let pixels = random::normal::<f32>(
        &[rows, cfg.patch_dim() as i32],
        None,
        None,
        &random::key(1)?,
    )?;
    {
        let mut params = tower.parameters_mut().flatten();
        for (name, w) in &weights {
            **params
                .get_mut(name.as_str())
                .with_context(|| format!("no parameter {name}"))? = w.clone();
        }
    }
    let mut tensors: HashMap<String, Array> = weights
        .into_iter()
        .map(|(k, v)| (format!("vision_tower.{k}"), v))
        .collect();
    tensors.insert("pixels".into(), pixels.clone());
    Array::save_safetensors(&tensors, None, args.dir.join("vision_bench.safetensors"))?;
    drop(tensors);
    let meta = serde_json::json!({
        "vision_config": cfg,
        "grid_thw": grid,
        "dtype": args.dtype.name(),
    });
    std::fs::write(args.dir.join("vision_bench.json"), meta.to_string())?;

    let device = format!("{:?}", mlx_rs::Device::default());
    println!(
        "vision tower, {}×{} image → {} patches, depth {}, hidden {}, heads {} (head_dim {}), {} weights, device {device}",
        args.height,
        args.width,
        rows,
        cfg.depth,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.head_dim(),
        args.dtype.name()
    );
    let mut timings = Vec::new();
    let shipped = TowerOptions::default();
    let mut variants = vec![("cathedral (shipped)".to_owned(), shipped)];
    if !args.shipped_only {
        let flip = |label: &str, o: TowerOptions| (format!("cathedral, {label}"), o);
        variants.push(flip(
            if shipped.pad_heads {
                "heads not padded"
            } else {
                "heads padded 72→80"
            },
            TowerOptions {
                pad_heads: !shipped.pad_heads,
                ..shipped
            },
        ));
        variants.push(flip(
            "activations not anchored (f32)",
            TowerOptions {
                anchor_dtype: false,
                ..shipped
            },
        ));
        variants.push(flip(
            "elementwise not fused",
            TowerOptions {
                fused_elementwise: false,
                ..shipped
            },
        ));
        variants.push(flip(
            "plain port (no anchoring, padding or fusion)",
            TowerOptions {
                anchor_dtype: false,
                pad_heads: false,
                fused_elementwise: false,
            },
        ));
    }
    println!("shipped options: {shipped:?}");
    for (label, options) in &variants {
        tower.set_options(*options);
        timings.push(time_variant(&tower, label, &pixels, grid, args)?);
    }
    tower.set_options(shipped);
    // The shipped output, for the peer to compare: a fast wrong answer is worth nothing.
    let features = tower.forward(&pixels, &[grid])?.as_dtype(Dtype::Float32)?;
    Array::save_safetensors(
        [("features", &features)],
        None,
        args.dir.join("vision_bench_output.safetensors"),
    )?;
    let ours_stages = if args.profile {
        Some(profile_stages(&tower, &pixels, grid, args.runs)?)
    } else {
        None
    };
    let (reference, reference_stages) = match &args.python {
        Some(py) => {
            let report = python_peer(py, args)?;
            if let Some((diff, scale)) = report.agreement {
                println!(
                    "output vs mlx-vlm on the same weights and pixels: max |Δ| {diff:.3e} (max |ref| {scale:.3e})"
                );
            }
            (Some(report.timing), report.stages)
        }
        None => (None, None),
    };

    println!(
        "\n| implementation | median ms | min ms | vs mlx-vlm | peak MiB |\n|---|---:|---:|---:|---:|"
    );
    let reference_median = reference.as_ref().map(Timing::median);
    for t in timings.iter().chain(reference.iter()) {
        let ratio =
            reference_median.map_or("—".to_owned(), |r| format!("{:.2}×", r / t.median()));
        let peak = t
            .peak_bytes
            .map_or("—".to_owned(), |b| format!("{:.0}", b as f64 / 1048576.0));
        println!(
            "| {} | {:.1} | {:.1} | {} | {} |",
            t.label,
            t.median() * 1e3,
            t.min() * 1e3,
            ratio,
            peak
        );
    }
    println!(
        "\n(median of {} runs after {} warm-up; ratio = mlx-vlm median / this median, > 1 is faster)",
        args.runs, args.warmup
    );
    if let Some(ours) = ours_stages {
        let theirs = reference_stages.unwrap_or(StageTimes {
            embed: f64::NAN,
            block: f64::NAN,
            blocks: f64::NAN,
            merger: f64::NAN,
        });
        println!("\n| stage (each evaluated alone) | cathedral ms | mlx-vlm ms |\n|---|---:|---:|");
        for (name, a, b) in [
            ("patch embed + positions + rotary", ours.embed, theirs.embed),
            ("one block (median)", ours.block, theirs.block),
            ("all blocks", ours.blocks, theirs.blocks),
            ("merger", ours.merger, theirs.merger),
        ] {
            println!("| {name} | {:.2} | {:.2} |", a * 1e3, b * 1e3);
        }
    }
    Ok(())
}
