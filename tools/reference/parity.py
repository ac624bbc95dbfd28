#!/usr/bin/env python3
"""Reference outputs for the runtime's parity tests (runtime/tests/model_parity.rs).

Computed on the tiny checkpoints that `cathedral tiny-model` writes (fixed seed; the tests
regenerate the same bytes), with the reference implementations pinned in requirements.txt:

* text prompt, fp32 and bf16: mlx-lm 0.32.2 (and mlx-vlm 0.7.6, whose chunked DeltaNet
  prefill the runtime also uses: the bf16 gate compares against it);
* image prompts (vision features, MRoPE positions, logits, greedy decode): mlx-vlm 0.7.6;
* 4-bit: the fp32 checkpoint quantized by mlx-vlm's own `convert` (MLX affine, 4 bits,
  group 32), greedy tokens from mlx-vlm on it (mlx-lm 0.32.2 cannot run quantized experts on
  MLX 0.32.2: it passes gather_qmm an argument that release lacks). The SHA-256 of every
  converted tensor is recorded so the tests prove they rebuild the very same checkpoint.

MLX's CPU backend has gather_mm for float32 only, so for the bf16 checkpoint the references'
expert matmuls run with their operands widened to float32 and the product rounded back to
bf16 (`widened_switch_linear`): the same numbers a bf16 GEMM with float32 accumulation gives,
and what the runtime does on CPU.

One deliberate change to mlx-vlm 0.7.6: its Gated DeltaNet normalises q and k with
`rms_norm` (eps added to the mean of squares). The model's own (Hugging Face) definition, which
mlx-lm and mlx-vlm >= 0.7.10 follow, is an L2 norm with eps 1e-6 added to the sum of squares.
`hf_normalize_qk` below replaces that one method with the Hugging Face form.

Usage: tools/reference/parity.sh (builds the checkpoints, then runs this script).
"""
import argparse
import hashlib
import json
import os
import sys

import mlx.core as mx
import numpy as np
from PIL import Image

import mlx_vlm.models.qwen3_5.language as vlm_language
from mlx_lm.models.gated_delta import normalize_qk as lm_normalize_qk

GREEDY_TOKENS = 32
LOGIT_STRIDE = 997  # sampled vocabulary columns stored per position (full rows are 1 MB each)

TEXT_MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Hello from the cathedral! Count: 1, 2, 3. 你好，世界 🌍"},
]
IMAGE_PROMPT = "Describe this picture in one sentence."
IMAGE_SIZES = {"image64": (64, 64), "image100x60": (100, 60)}  # (width, height)


def hf_normalize_qk(self, q, k):
    """Hugging Face Gated DeltaNet q/k normalisation: l2norm(x) = x / sqrt(sum(x^2) + 1e-6), q also
    scaled by d_k^-1/2. Evaluated as mlx-lm 0.32.2 does (`normalize_qk`): rms_norm with the eps
    divided by d_k, which is the same function."""
    return lm_normalize_qk(q, k, inv_scale=q.shape[-1] ** -0.5, eps=1e-6)


vlm_language.Qwen3_5GatedDeltaNet._normalize_qk = hf_normalize_qk


# CPU gather_mm is float32-only: the same expert-matmul shim the benchmark uses.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import cpu_compat  # noqa: E402,F401


def test_image(width, height):
    """A deterministic picture: colour gradients plus a checker pattern."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    b = (((x // 8 + y // 8) % 2) * 200 + 30).astype(np.uint8)
    return Image.fromarray(np.stack([r, g, b], axis=-1), mode="RGB")


def sample_ids(vocab):
    return np.arange(0, vocab, LOGIT_STRIDE, dtype=np.int32)


def record_logits(out, prefix, logits, cols):
    logits = np.array(logits.astype(mx.float32))[0]
    if prefix.endswith(".f32"):
        out[f"{prefix}.logits_sample"] = logits[:, cols]
    out[f"{prefix}.argmax"] = logits.argmax(axis=-1).astype(np.int32)


def text_reference(model_dir, tokenizer_ids, out, prefix, cols, full):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(model_dir)
    ids = mx.array([tokenizer_ids])
    logits = model(ids)
    record_logits(out, prefix, logits, cols)
    if full:
        hidden = model.language_model.model(ids)
        out[f"{prefix}.hidden"] = np.array(hidden.astype(mx.float32))[0]
    tokens = []
    for tok, _ in generate_step(
        mx.array(tokenizer_ids), model, max_tokens=GREEDY_TOKENS, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        tokens.append(int(tok))
    out[f"{prefix}.greedy"] = np.array(tokens, dtype=np.int32)


def vlm_text_reference(model_dir, tokenizer_ids, out, prefix, cols):
    """Text prompt through mlx-vlm (mlx-lm 0.32.2 cannot run quantized experts on MLX 0.32.2)."""
    from mlx_vlm import load

    model, _ = load(model_dir)
    ids = mx.array([tokenizer_ids])
    record_logits(out, prefix, model(ids).logits, cols)
    cache = model.language_model.make_cache()
    step = model(ids, cache=cache).logits
    tokens = []
    for _ in range(GREEDY_TOKENS):
        tok = int(mx.argmax(step[0, -1]))
        tokens.append(tok)
        step = model.language_model(mx.array([[tok]]), cache=cache).logits
    out[f"{prefix}.greedy"] = np.array(tokens, dtype=np.int32)


def image_reference(model_dir, case, out, prefix, cols, full, fixtures_dir):
    from mlx_vlm import load

    model, processor = load(model_dir)
    image = Image.open(os.path.join(fixtures_dir, f"{case}.png")).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="np")
    input_ids = mx.array(inputs["input_ids"])
    pixel_values = mx.array(inputs["pixel_values"])
    grid = mx.array(inputs["image_grid_thw"])

    logits = model(input_ids, pixel_values=pixel_values, image_grid_thw=grid).logits
    record_logits(out, prefix, logits, cols)
    if prefix.endswith(".bf16"):
        features, _ = model.vision_tower(pixel_values.astype(mx.bfloat16), grid)
        out[f"{prefix}.features"] = np.array(features.astype(mx.float32))
    if full:
        out[f"{prefix}.input_ids"] = np.array(input_ids, dtype=np.int32)[0]
        # The processor's values are (u8 / 255 - 0.5) / 0.5 of a resized 8-bit image: stored as
        # the 8-bit values (4x smaller), exact to 1.2e-7 when mapped back.
        pv = np.array(pixel_values.astype(mx.float32))
        u8 = np.round((pv * 0.5 + 0.5) * 255.0)
        assert np.abs(u8 - (pv * 0.5 + 0.5) * 255.0).max() < 1e-3
        out[f"{prefix}.pixel_u8"] = u8.astype(np.uint8)
        out[f"{prefix}.grid_thw"] = np.array(grid, dtype=np.int32)
        features, _ = model.vision_tower(pixel_values.astype(model.vision_tower.patch_embed.proj.weight.dtype), grid)
        out[f"{prefix}.features"] = np.array(features.astype(mx.float32))
        positions, _ = model.language_model.get_rope_index(input_ids, grid)
        out[f"{prefix}.positions"] = np.array(positions, dtype=np.int32)[:, 0, :]
        emb = model.get_input_embeddings(input_ids, pixel_values, image_grid_thw=grid)
        hidden = model.language_model.model(
            input_ids, inputs_embeds=emb.inputs_embeds, position_ids=emb.position_ids
        )
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        out[f"{prefix}.hidden"] = np.array(hidden.astype(mx.float32))[0]

    cache = model.language_model.make_cache()
    step = model(input_ids, pixel_values=pixel_values, image_grid_thw=grid, cache=cache).logits
    tokens = []
    for _ in range(GREEDY_TOKENS):
        tok = int(mx.argmax(step[0, -1]))
        tokens.append(tok)
        step = model.language_model(mx.array([[tok]]), cache=cache).logits
    out[f"{prefix}.greedy"] = np.array(tokens, dtype=np.int32)


def tensor_digests(path):
    weights = mx.load(path)
    digests = {}
    for name in sorted(weights):
        data = np.array(weights[name])
        digests[name] = hashlib.sha256(data.tobytes()).hexdigest()
    return digests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", required=True, help="tiny checkpoint, fp32")
    ap.add_argument("--bf16", required=True, help="tiny checkpoint, bf16 (same seed)")
    ap.add_argument("--q4", required=True, help="where to write the 4-bit conversion")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, help="fixtures directory")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    from mlx_vlm.convert import convert
    from transformers import AutoTokenizer

    for case, (w, h) in IMAGE_SIZES.items():
        test_image(w, h).save(os.path.join(args.out, f"{case}.png"))

    tok = AutoTokenizer.from_pretrained(args.f32)
    text_prompt = tok.apply_chat_template(TEXT_MESSAGES, tokenize=False, add_generation_prompt=True)
    text_ids = tok.encode(text_prompt, add_special_tokens=False)
    vocab = json.load(open(os.path.join(args.f32, "config.json")))["text_config"]["vocab_size"]
    cols = sample_ids(vocab)

    out = {"sample_ids": cols, "text.input_ids": np.array(text_ids, dtype=np.int32)}
    text_reference(args.f32, text_ids, out, "text.f32", cols, full=True)
    text_reference(args.bf16, text_ids, out, "text.bf16", cols, full=False)
    for case in IMAGE_SIZES:
        image_reference(args.f32, case, out, f"{case}.f32", cols, True, args.out)
        image_reference(args.bf16, case, out, f"{case}.bf16", cols, False, args.out)

    convert(args.f32, args.q4, quantize=True, q_bits=4, q_group_size=32)
    vlm_text_reference(args.q4, text_ids, out, "text.q4", cols)
    vlm_text_reference(args.f32, text_ids, out, "text.vlm_f32", cols)
    vlm_text_reference(args.bf16, text_ids, out, "text.vlm_bf16", cols)
    image_reference(args.q4, "image64", out, "image64.q4", cols, False, args.out)

    mx.save_safetensors(os.path.join(args.out, "reference.safetensors"), {k: mx.array(v) for k, v in sorted(out.items())})
    q4_config = json.load(open(os.path.join(args.q4, "config.json")))
    meta = {
        "seed": args.seed,
        "references": {"mlx": mx.__version__, "mlx-lm": "0.32.2", "mlx-vlm": "0.7.6"},
        "deltanet_qk_norm": "Hugging Face L2 norm, eps 1e-6 on the sum of squares (mlx-vlm patched)",
        "text_prompt": text_prompt,
        "image_prompt": IMAGE_PROMPT,
        "image_sizes": {k: list(v) for k, v in IMAGE_SIZES.items()},
        "logit_stride": LOGIT_STRIDE,
        "greedy_tokens": GREEDY_TOKENS,
        "q4_quantization": q4_config.get("quantization"),
        "q4_tensor_sha256": tensor_digests(os.path.join(args.q4, "model.safetensors")),
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
