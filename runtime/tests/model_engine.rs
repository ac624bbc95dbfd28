//! Engine generation controls on the tiny checkpoint: seeds, stop strings, cancellation,
//! max tokens, streamed deltas equal to the final text.
use std::ops::ControlFlow;

use cathedral_runtime::engine::{Engine, EngineError, EngineOptions, FinishReason, SamplingParams};
use cathedral_runtime::prompt::{ChatMessage, Role};
use cathedral_runtime::tiny::{write_tiny_model, TinyDtype, TinyModelArgs};

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
