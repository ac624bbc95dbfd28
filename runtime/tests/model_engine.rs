//! Engine generation controls on the tiny checkpoint: seeds, stop strings, cancellation,
//! max tokens, streamed deltas equal to the final text; decode against a full forward; the
//! image feature cache.
use std::ops::ControlFlow;

use cathedral_runtime::engine::{Engine, EngineError, EngineOptions, FinishReason, SamplingParams};
use cathedral_runtime::model::LogitsScope;
use cathedral_runtime::prompt::{ChatMessage, ContentPart, Role};
use cathedral_runtime::tiny::{write_tiny_model, TinyDtype, TinyModelArgs};
use cathedral_runtime::vision::preprocess::{decode_image, ImageLimits};
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

#[test]
fn sampling_seeds_stops_cancellation_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&TinyModelArgs {
        out: dir.path().to_path_buf(),
        seed: 11,
        dtype: TinyDtype::F32,
        q_bits: None,
        q_group_size: 32,
    })
    .unwrap();
    let mut engine = Engine::load(
        dir.path(),
        &EngineOptions {
            vision_enabled: false,
            ..Default::default()
        },
    )
    .unwrap();
    let prompt = engine
        .prepare(&[ChatMessage::text(Role::User, "Tell me a story.")])
        .unwrap();
    let mut run = |params: &SamplingParams, stop_after: Option<usize>| {
        let mut deltas = Vec::new();
        let out = engine
            .generate(&prompt, params, &mut |d| {
                deltas.push(d.to_string());
                match stop_after {
                    Some(n) if deltas.len() >= n => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                }
            })
            .unwrap();
        (out, deltas)
    };

    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        min_p: 0.01,
        seed: Some(42),
        max_tokens: 24,
        ..Default::default()
    };
    let (a, deltas) = run(&sampled, None);
    let (b, _) = run(&sampled, None);
    assert_eq!(a.text, b.text, "same seed, same tokens");
    assert_eq!(
        deltas.concat(),
        a.text,
        "streamed deltas add up to the text"
    );
    let (c, _) = run(
        &SamplingParams {
            seed: Some(43),
            ..sampled.clone()
        },
        None,
    );
    assert_ne!(a.text, c.text, "another seed, another sample");
    assert_eq!(a.finish_reason, FinishReason::Length);
    assert_eq!(a.completion_tokens, 24);
    assert_eq!(a.prompt_tokens, prompt.prompt_tokens());

    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 24,
        ..Default::default()
    };
    let (full, _) = run(&greedy, None);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(
        chars.len() > 8,
        "tiny model produced too little text: {:?}",
        full.text
    );
    let stop: String = chars[4..7].iter().collect();
    let (stopped, deltas) = run(
        &SamplingParams {
            stop: vec![stop.clone()],
            ..greedy.clone()
        },
        None,
    );
    let cut = full.text.find(&stop).unwrap();
    assert_eq!(
        stopped.text,
        full.text[..cut],
        "text ends before the stop string"
    );
    assert_eq!(deltas.concat(), stopped.text);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);

    let (cancelled, deltas) = run(&greedy, Some(1));
    assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);
    assert_eq!(deltas.len(), 1);
    assert!(cancelled.completion_tokens < 24);

    let bad = SamplingParams {
        top_p: 1.5,
        ..greedy
    };
    assert!(matches!(
        engine.generate(&prompt, &bad, &mut |_| ControlFlow::Continue(())),
        Err(EngineError::InvalidParams(_))
    ));
}

fn tiny_engine(seed: u64, opts: EngineOptions) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&TinyModelArgs {
        out: dir.path().to_path_buf(),
        seed,
        dtype: TinyDtype::F32,
        q_bits: None,
        q_group_size: 32,
    })
    .unwrap();
    let engine = Engine::load(dir.path(), &opts).unwrap();
    (dir, engine)
}

/// Decoding past the key/value buffers' first growth (256 tokens) and through the pipelined
/// greedy path gives, at every step, the token a fresh full-sequence forward picks.
#[test]
fn greedy_decode_matches_a_full_forward_across_cache_growth() {
    let (_dir, mut engine) = tiny_engine(5, EngineOptions::default());
    let words: Vec<String> = (0..70).map(|i| format!("w{i}")).collect();
    let prompt = engine
        .prepare(&[ChatMessage::text(Role::User, words.join(" "))])
        .unwrap();
    let n_prompt = prompt.prompt_tokens();
    assert!(n_prompt < 250 && n_prompt > 150, "{n_prompt} prompt tokens");
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 300 - n_prompt,
        ..Default::default()
    };
    let out = engine
        .generate(&prompt, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let n_out = out.tokens.len();
    assert!(n_prompt + n_out > 256 + 8, "{n_out} tokens out: no growth");

    // Teacher-forced: prompt + generated (all but the last) in one forward, every position.
    let ids: Vec<i32> = prompt
        .token_ids()
        .iter()
        .chain(&out.tokens[..n_out - 1])
        .map(|&t| t as i32)
        .collect();
    let len = ids.len() as i32;
    let (lm, _) = engine.parts();
    let embeds = lm.embed(&Array::from_slice(&ids, &[1, len])).unwrap();
    let pos: Vec<i32> = (0..3).flat_map(|_| 0..len).collect();
    let mut cache = lm.new_cache();
    let logits = lm
        .forward(
            &embeds,
            &Array::from_slice(&pos, &[3, len]),
            &mut cache,
            LogitsScope::All,
        )
        .unwrap()
        .index((0, (n_prompt as i32 - 1).., ..));
    logits.eval().unwrap();
    let vocab = logits.shape()[1] as usize;
    let flat = logits.as_slice::<f32>();
    for (i, &tok) in out.tokens.iter().enumerate() {
        let row = &flat[i * vocab..(i + 1) * vocab];
        let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Prefill (chunked) and decode (per token) round differently: allow float noise.
        assert!(
            row[tok as usize] >= best - 1e-4,
            "step {i}: decoded {tok} (logit {}) but the full forward's best is {best}",
            row[tok as usize]
        );
    }
}

/// The same image sent again takes its features from the cache: identical embeddings and
/// identical greedy output, no preprocessing; with the cache off it is computed again.
#[test]
fn a_repeated_image_reuses_its_features_exactly() {
    let png = |w, h, shade: u8| {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8 ^ shade, (y * 5) as u8, shade])
        });
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        decode_image(&bytes, &ImageLimits::default()).unwrap()
    };
    let ask = |image| {
        vec![ChatMessage {
            role: Role::User,
            content: vec![ContentPart::Image(image), ContentPart::Text("what?".into())],
        }]
    };
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        ..Default::default()
    };
    let opts = EngineOptions {
        vision_enabled: true,
        ..Default::default()
    };
    let (_dir, mut engine) = tiny_engine(3, opts);
    let run = |engine: &mut Engine, messages: &[ChatMessage]| {
        let prompt = engine.prepare(messages).unwrap();
        let (embeds, _, _) = engine
            .prompt_inputs(&prompt, &mut Default::default())
            .unwrap();
        embeds.eval().unwrap();
        let out = engine
            .generate(&prompt, &greedy, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        (prompt.cached_images(), embeds, out.tokens)
    };
    let a = ask(png(40, 56, 0));
    let (cached, fresh_embeds, fresh_tokens) = run(&mut engine, &a);
    assert_eq!(cached, 0);
    let (cached, again_embeds, again_tokens) = run(&mut engine, &a);
    assert_eq!(cached, 1, "the second time comes from the cache");
    assert_eq!(
        fresh_embeds.as_slice::<f32>(),
        again_embeds.as_slice::<f32>()
    );
    assert_eq!(fresh_tokens, again_tokens);
    let (cached, other_embeds, _) = run(&mut engine, &ask(png(40, 56, 9)));
    assert_eq!(cached, 0, "different pixels, different features");
    assert_ne!(
        fresh_embeds.as_slice::<f32>(),
        other_embeds.as_slice::<f32>()
    );

    let (_dir2, mut uncached) = tiny_engine(
        3,
        EngineOptions {
            vision_cache_bytes: 0,
            ..opts
        },
    );
    run(&mut uncached, &a);
    let (cached, embeds, tokens) = run(&mut uncached, &a);
    assert_eq!(cached, 0, "cache off");
    assert_eq!(embeds.as_slice::<f32>(), fresh_embeds.as_slice::<f32>());
    assert_eq!(tokens, fresh_tokens);
}
