//! `cathedral bench`: times one checkpoint in this runtime, phase by phase, the way
//! `scripts/bench` compares it with mlx-vlm / mlx-lm: the vision tower alone, a text prefill,
//! greedy decoding, and (with `--profile`) each decoder layer of the prefill on its own.
//! Prints one JSON object (medians in seconds, peak resident memory); asserts nothing.
//!
//! ```text
//! cathedral bench --model DIR --phase vision --image-size 128 --runs 5
//! cathedral bench --model DIR --phase text --prompt-tokens 1000 --decode-tokens 128 --ids-out ids.json
//! ```
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use mlx_rs::{random, Array};
use serde_json::json;

use crate::engine::{Engine, EngineOptions, SamplingParams};
use crate::model::LogitsScope;
use crate::prompt::{ChatMessage, ContentPart, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPhase {
    /// The vision tower alone on random pixels of an `--image-size` square image.
    Vision,
    /// Prefill of a `--prompt-tokens` chat prompt, then `--decode-tokens` greedy tokens.
    Text,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub phase: BenchPhase,
    /// Side of the square image, in pixels (a multiple of patch × merge).
    #[arg(long, default_value_t = 1024)]
    pub image_size: u32,
    /// Approximate length of the text prompt in tokens (chat template included).
    #[arg(long, default_value_t = 1000)]
    pub prompt_tokens: usize,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Timed runs (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Write the prompt's token ids here (JSON list) so a peer can run the very same prompt.
    #[arg(long)]
    pub ids_out: Option<PathBuf>,
    /// Also time each decoder layer of the prefill (each evaluated before the next is built),
    /// and the prefill with logits for every position instead of the last one only.
    #[arg(long)]
    pub profile: bool,
    /// Compiled (fused) elementwise kernels in the language model.
    #[arg(long, value_enum, default_value = "auto")]
    pub fusion: crate::model::fused::Fusion,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Peak resident set size of this process in bytes (`VmHWM`), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    crate::model::fused::set_fusion(args.fusion);
    let load_start = Instant::now();
    let engine = Engine::load(
        &args.model,
        &EngineOptions {
            vision_enabled: args.phase == BenchPhase::Vision,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let load_s = load_start.elapsed().as_secs_f64();
    let mut out = match args.phase {
        BenchPhase::Vision => bench_vision(&engine, args)?,
        BenchPhase::Text => bench_text(engine, args)?,
    };
    out["load_s"] = json!(load_s);
    out["peak_rss_bytes"] = json!(peak_rss_bytes());
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn bench_vision(engine: &Engine, args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let Some(tower) = engine.parts().1 else {
        bail!("{} has no vision tower", args.model.display());
    };
    let cfg = tower.config();
    let unit = (cfg.patch_size * cfg.spatial_merge_size) as u32;
    if args.image_size == 0 || !args.image_size.is_multiple_of(unit) {
        bail!("--image-size must be a positive multiple of {unit}");
    }
    let side = args.image_size / cfg.patch_size as u32;
    let grid = [1, side, side];
    let rows = (side * side) as i32;
    let row_len =
        (cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size) as i32;
    let key = random::key(7)?;
    let pixels = random::normal::<f32>(&[rows, row_len], None, None, &key)?;
    pixels.eval()?;
    let mut times = Vec::new();
    for i in 0..args.warmup + args.runs {
        let t = Instant::now();
        let y = tower.forward(&pixels, &[grid])?;
        y.eval()?;
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(json!({
        "impl": "cathedral",
        "phase": "vision",
        "image": [args.image_size, args.image_size],
        "patches": rows,
        "vision_s": median(times.clone()),
        "vision_runs_s": times,
    }))
}

/// A chat prompt of about `n` tokens (plain English, so that the tokenizer behaves as usual).
fn long_prompt(engine: &Engine, n: usize) -> anyhow::Result<crate::engine::PreparedPrompt> {
    const SENTENCE: &str = "The cathedral keeps its lamps lit through the long winter night, \
                            and every stone remembers the hands that set it. ";
    let per = engine.tokenize(SENTENCE)?.len().max(1);
    let mut text = SENTENCE.repeat(n / per + 1);
    loop {
        let messages = [ChatMessage {
            role: Role::User,
            content: vec![ContentPart::Text(text.clone())],
        }];
        let prepared = engine.prepare(&messages)?;
        if prepared.prompt_tokens() <= n || text.len() < 8 {
            return Ok(prepared);
        }
        // Trim by whole words until the templated prompt fits.
        let excess = prepared.prompt_tokens() - n;
        for _ in 0..excess.max(1) {
            match text.trim_end().rfind(' ') {
                Some(i) => text.truncate(i),
                None => break,
            }
        }
    }
}

fn bench_text(mut engine: Engine, args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let prompt = long_prompt(&engine, args.prompt_tokens)?;
    if let Some(path) = &args.ids_out {
        std::fs::write(path, serde_json::to_string(prompt.token_ids())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let params = SamplingParams {
        max_tokens: args.decode_tokens,
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let (mut prefill, mut first, mut decode_tps, mut tokens) = (vec![], vec![], vec![], vec![]);
    for i in 0..args.warmup + args.runs {
        let out = engine.generate(&prompt, &params, &mut |_| ControlFlow::Continue(()))?;
        if i < args.warmup {
            continue;
        }
        let t = out.timings;
        // Decode rate after the first token, as mlx-lm reports it: the first token's sampling
        // sits inside `decode`, right after the prefill.
        let first_sample = t.first_token.saturating_sub(t.prefill + t.vision);
        let after_first = t.decode.saturating_sub(first_sample).as_secs_f64();
        prefill.push(t.prefill.as_secs_f64());
        first.push(t.first_token.as_secs_f64());
        tokens.push(out.completion_tokens);
        if out.completion_tokens > 1 && after_first > 0.0 {
            decode_tps.push((out.completion_tokens - 1) as f64 / after_first);
        }
    }
    let mut result = json!({
        "impl": "cathedral",
        "phase": "text",
        "prompt_tokens": prompt.prompt_tokens(),
        "prefill_s": median(prefill),
        "first_token_s": median(first.clone()),
        "first_token_runs_s": first,
        "decode_tok_s": median(decode_tps.clone()),
        "decode_runs_tok_s": decode_tps,
        "completion_tokens": tokens,
    });
    if args.profile {
        result["profile"] = profile_prefill(&mut engine, &prompt, args.runs)?;
    }
    Ok(result)
}

/// Per-layer prefill times (each layer evaluated before the next is built), summed by kind,
/// and the whole prefill with logits for the last position vs. every position.
fn profile_prefill(
    engine: &mut Engine,
    prompt: &crate::engine::PreparedPrompt,
    runs: usize,
) -> anyhow::Result<serde_json::Value> {
    let (embeds, positions, _) =
        engine.prompt_inputs(prompt, &mut crate::engine::Timings::default())?;
    let model = engine.parts().0;
    let n_layers = model.model.layers.len();
    let mut per_layer = vec![Vec::new(); n_layers];
    let (mut head, mut last_scope, mut all_scope) = (vec![], vec![], vec![]);
    let (mut decode_layers, mut decode_steps) = (vec![Vec::new(); n_layers], vec![]);
    for _ in 0..runs.max(1) {
        let mut cache = model.new_cache();
        let tables = model.rope.tables(&positions, embeds.dtype())?;
        let mut ready = tables.arrays();
        ready.push(&embeds);
        mlx_rs::transforms::eval(ready)?;
        let mut h = embeds.clone();
        for (i, (layer, c)) in model.model.layers.iter().zip(cache.iter_mut()).enumerate() {
            let t = Instant::now();
            h = layer.forward(&h, &model.rope, &tables, c)?;
            let mut arrays: Vec<&Array> = c.arrays();
            arrays.push(&h);
            mlx_rs::transforms::eval(arrays)?;
            per_layer[i].push(t.elapsed().as_secs_f64());
        }
        decode_profile(
            model,
            &mut cache,
            positions.shape()[1],
            &mut decode_layers,
            &mut decode_steps,
        )?;
        let t = Instant::now();
        let l = h.shape()[1];
        use mlx_rs::ops::indexing::IndexOp;
        let last = h.index((.., (l - 1)..l, ..));
        let logits = match &model.lm_head {
            Some(head) => head.forward(&model.model.norm.forward(&last)?)?,
            None => model
                .model
                .embed_tokens
                .as_linear(&model.model.norm.forward(&last)?)?,
        };
        logits.eval()?;
        head.push(t.elapsed().as_secs_f64());
        for (scope, sink) in [
            (LogitsScope::Last, &mut last_scope),
            (LogitsScope::All, &mut all_scope),
        ] {
            let mut cache = model.new_cache();
            let t = Instant::now();
            let logits = model.forward(&embeds, &positions, &mut cache, scope)?;
            let mut arrays: Vec<&Array> = cache.iter().flat_map(|c| c.arrays()).collect();
            arrays.push(&logits);
            mlx_rs::transforms::eval(arrays)?;
            sink.push(t.elapsed().as_secs_f64());
        }
    }
    let layers: Vec<_> = model
        .model
        .layers
        .iter()
        .zip(per_layer)
        .enumerate()
        .map(|(i, (layer, t))| {
            json!({
                "layer": i,
                "kind": if layer.is_linear() { "deltanet+moe" } else { "attention+moe" },
                "s": median(t),
            })
        })
        .collect();
    let decode_layers: Vec<_> = decode_layers.into_iter().map(median).collect();
    Ok(json!({
        "decode_layers_s": decode_layers,
        "decode_step_s": median(decode_steps),
        "layers": layers,
        "final_norm_lm_head_s": median(head),
        "prefill_last_logits_s": median(last_scope),
        "prefill_all_logits_s": median(all_scope),
    }))
}

/// Decode steps after a prefill (`cache` holds `prompt_len` positions): each layer timed on its
/// own, then whole steps as the engine runs them (forward, evaluate, logits to the host).
fn decode_profile(
    model: &crate::model::LanguageModel,
    cache: &mut [crate::model::LayerCache],
    prompt_len: i32,
    per_layer: &mut [Vec<f64>],
    steps: &mut Vec<f64>,
) -> anyhow::Result<()> {
    const STEPS: i32 = 8;
    for s in 0..2 * STEPS {
        let token = model.embed(&Array::from_slice(&[42i32], &[1, 1]))?;
        let p = prompt_len + s;
        let positions = Array::from_slice(&[p, p, p], &[3, 1]);
        if s < STEPS {
            let tables = model.rope.tables(&positions, token.dtype())?;
            let mut h = token;
            for (i, (layer, c)) in model.model.layers.iter().zip(cache.iter_mut()).enumerate() {
                let t = Instant::now();
                h = layer.forward(&h, &model.rope, &tables, c)?;
                let mut arrays: Vec<&Array> = c.arrays();
                arrays.push(&h);
                mlx_rs::transforms::eval(arrays)?;
                per_layer[i].push(t.elapsed().as_secs_f64());
            }
        } else {
            let t = Instant::now();
            let logits = model
                .forward(&token, &positions, cache, LogitsScope::Last)?
                .as_dtype(mlx_rs::Dtype::Float32)?;
            let mut arrays: Vec<&Array> = cache.iter().flat_map(|c| c.arrays()).collect();
            arrays.push(&logits);
            mlx_rs::transforms::eval(arrays)?;
            let host = logits.as_slice::<f32>().to_vec();
            std::hint::black_box(crate::engine::sampling::argmax(&host));
            steps.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
