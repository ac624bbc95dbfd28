//! A bf16 checkpoint keeps its activations in bf16 end to end: image features spliced into
//! the prompt embeddings, the residual stream after every decoder layer (prefill and a decode
//! step), and the logits. One op that widened to f32 would run every later layer in f32, the
//! slow path the benchmark's dtype-anchoring win removes.
use std::path::PathBuf;

use cathedral_runtime::engine::{Engine, EngineOptions, Timings};
use cathedral_runtime::model::{LayerCache, LogitsScope};
use cathedral_runtime::prompt::{ChatMessage, ContentPart, Role};
use cathedral_runtime::tiny::{write_tiny_model, TinyDtype, TinyModelArgs};
use cathedral_runtime::vision::preprocess::{decode_image, ImageLimits};
use mlx_rs::{Array, Dtype};

fn fixture_png() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/image64.png");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn bf16_checkpoint_keeps_bf16_activations_through_vision_and_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(&TinyModelArgs {
        out: dir.path().to_path_buf(),
        seed: 3,
        dtype: TinyDtype::Bf16,
        q_bits: None,
        q_group_size: 64,
    })
    .unwrap();
    let mut engine = Engine::load(
        dir.path(),
        &EngineOptions {
            vision_enabled: true,
            ..Default::default()
        },
    )
    .unwrap();
    let image = decode_image(&fixture_png(), &ImageLimits::default()).unwrap();
    let prompt = engine
        .prepare(&[ChatMessage {
            role: Role::User,
            content: vec![
                ContentPart::Image(image),
                ContentPart::Text("What is in the picture?".into()),
            ],
        }])
        .unwrap();
    assert_eq!(prompt.image_count(), 1);
    let (embeds, positions, next) = engine
        .prompt_inputs(&prompt, &mut Timings::default())
        .unwrap();
    assert_eq!(embeds.dtype(), Dtype::Bfloat16, "prompt embeddings");

    let model = engine.parts().0;
    let mut cache = model.new_cache();
    let mut h = embeds.clone();
    let step = |h: Array, positions: &Array, cache: &mut [LayerCache], what: &str| -> Array {
        let tables = model.rope.tables(positions, h.dtype()).unwrap();
        let mut h = h;
        for (i, (layer, c)) in model.model.layers.iter().zip(cache.iter_mut()).enumerate() {
            h = layer.forward(&h, &model.rope, &tables, c).unwrap();
            assert_eq!(
                h.dtype(),
                Dtype::Bfloat16,
                "{what}: residual after layer {i}"
            );
        }
        h
    };
    h = step(h, &positions, &mut cache, "prefill");
    h.eval().unwrap();

    let ids = Array::from_slice(&[42i32], &[1, 1]);
    let token = model.embed(&ids).unwrap();
    assert_eq!(token.dtype(), Dtype::Bfloat16, "token embedding");
    let pos = Array::from_slice(&[next, next, next], &[3, 1]);
    step(token, &pos, &mut cache, "decode").eval().unwrap();

    let logits = model
        .forward(
            &embeds,
            &positions,
            &mut model.new_cache(),
            LogitsScope::Last,
        )
        .unwrap();
    assert_eq!(logits.dtype(), Dtype::Bfloat16, "logits");
    assert_eq!(logits.shape()[1], 1, "last-position logits only");
}
