"""Writes the "medium" random checkpoint of the benchmark: the real Qwen3.5/3.6 vision tower
(27 blocks, hidden 1152, 16 heads, MLP 4304, patch 16, merge 2) in front of a scaled-down
language model that keeps the real layer mix (3 Gated DeltaNet : 1 full attention, sparse MoE
with many experts, top-k routing and a shared expert), in the mlx-community layout that both
`cathedral` and mlx-vlm load. Tokenizer and processor files are copied from a checkpoint
written by `cathedral tiny-model` (same vocabulary, same chat template).

    python tools/bench/medium_checkpoint.py --tokenizer-from DIR --out DIR [--q4 DIR]

`--q4` also writes the 4-bit conversion made by mlx-vlm's own `convert` (affine, group 64).
"""
import argparse
import json
import os
import shutil

import mlx.core as mx

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def medium_config(image_min_pixels):
    layers = 8
    layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "eos_token_id": [248046, 248044],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": 512,
            "num_hidden_layers": layers,
            "full_attention_interval": 4,
            "layer_types": layer_types,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "attention_bias": False,
            "attn_output_gate": True,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 8,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "linear_conv_kernel_dim": 4,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 128,
            "rms_norm_eps": 1e-6,
            "vocab_size": 248320,
            "max_position_embeddings": 8192,
            "eos_token_id": 248044,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "mrope_interleaved": True,
                "mrope_section": [6, 5, 5],
                "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25,
            },
        },
        "vision_config": {
            "model_type": "qwen3_5_moe",
            "depth": 27,
            "hidden_size": 1152,
            "num_heads": 16,
            "intermediate_size": 4304,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
            "out_hidden_size": 512,
            "num_position_embeddings": 2304,
            "hidden_act": "gelu_pytorch_tanh",
            "deepstack_visual_indexes": [],
        },
        "_image_min_pixels": image_min_pixels,
    }


def specs(cfg):
    """(name, shape, init) for every tensor; init: ('fan', n) | ('uni', lo, hi) | ('loguni', lo, hi)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    h = t["hidden_size"]
    norm, bias = ("uni", 0.5, 1.5), ("uni", -0.1, 0.1)
    out = [
        ("language_model.model.embed_tokens.weight", (t["vocab_size"], h), ("uni", -1.0, 1.0)),
        ("language_model.model.norm.weight", (h,), norm),
        ("language_model.lm_head.weight", (t["vocab_size"], h), ("fan", h)),
    ]
    for i, kind in enumerate(t["layer_types"]):
        p = f"language_model.model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,), norm), (f"{p}.post_attention_layernorm.weight", (h,), norm)]
        if kind == "linear_attention":
            a = f"{p}.linear_attn"
            kd = t["linear_num_key_heads"] * t["linear_key_head_dim"]
            vd = t["linear_num_value_heads"] * t["linear_value_head_dim"]
            nv, conv = t["linear_num_value_heads"], 2 * kd + vd
            out += [
                (f"{a}.in_proj_qkv.weight", (conv, h), ("fan", h)),
                (f"{a}.in_proj_z.weight", (vd, h), ("fan", h)),
                (f"{a}.in_proj_b.weight", (nv, h), ("fan", h)),
                (f"{a}.in_proj_a.weight", (nv, h), ("fan", h)),
                (f"{a}.conv1d.weight", (conv, t["linear_conv_kernel_dim"], 1), ("fan", t["linear_conv_kernel_dim"])),
                (f"{a}.dt_bias", (nv,), ("uni", 0.5, 1.5)),
                (f"{a}.A_log", (nv,), ("loguni", 1.0, 16.0)),
                (f"{a}.norm.weight", (t["linear_value_head_dim"],), norm),
                (f"{a}.out_proj.weight", (h, vd), ("fan", vd)),
            ]
        else:
            a = f"{p}.self_attn"
            hd = t["head_dim"]
            q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
            out += [
                (f"{a}.q_proj.weight", (2 * q, h), ("fan", h)),
                (f"{a}.k_proj.weight", (kv, h), ("fan", h)),
                (f"{a}.v_proj.weight", (kv, h), ("fan", h)),
                (f"{a}.o_proj.weight", (h, q), ("fan", q)),
                (f"{a}.q_norm.weight", (hd,), norm),
                (f"{a}.k_norm.weight", (hd,), norm),
            ]
        m = f"{p}.mlp"
        e, mi, si = t["num_experts"], t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
        out += [
            (f"{m}.gate.weight", (e, h), ("fan", h)),
            (f"{m}.switch_mlp.gate_proj.weight", (e, mi, h), ("fan", h)),
            (f"{m}.switch_mlp.up_proj.weight", (e, mi, h), ("fan", h)),
            (f"{m}.switch_mlp.down_proj.weight", (e, h, mi), ("fan", mi)),
            (f"{m}.shared_expert.gate_proj.weight", (si, h), ("fan", h)),
            (f"{m}.shared_expert.up_proj.weight", (si, h), ("fan", h)),
            (f"{m}.shared_expert.down_proj.weight", (h, si), ("fan", si)),
            (f"{m}.shared_expert_gate.weight", (1, h), ("fan", h)),
        ]
    hid, inter, p = v["hidden_size"], v["intermediate_size"], "vision_tower"
    ps, tp, ch = v["patch_size"], v["temporal_patch_size"], v["in_channels"]
    merged = hid * v["spatial_merge_size"] ** 2
    out += [
        (f"{p}.patch_embed.proj.weight", (hid, tp, ps, ps, ch), ("fan", ch * tp * ps * ps)),
        (f"{p}.patch_embed.proj.bias", (hid,), bias),
        (f"{p}.pos_embed.weight", (v["num_position_embeddings"], hid), ("uni", -1.0, 1.0)),
        (f"{p}.merger.norm.weight", (hid,), norm),
        (f"{p}.merger.norm.bias", (hid,), bias),
        (f"{p}.merger.linear_fc1.weight", (merged, merged), ("fan", merged)),
        (f"{p}.merger.linear_fc1.bias", (merged,), bias),
        (f"{p}.merger.linear_fc2.weight", (v["out_hidden_size"], merged), ("fan", merged)),
        (f"{p}.merger.linear_fc2.bias", (v["out_hidden_size"],), bias),
    ]
    for i in range(v["depth"]):
        b = f"{p}.blocks.{i}"
        out += [
            (f"{b}.norm1.weight", (hid,), norm),
            (f"{b}.norm1.bias", (hid,), bias),
            (f"{b}.norm2.weight", (hid,), norm),
            (f"{b}.norm2.bias", (hid,), bias),
            (f"{b}.attn.qkv.weight", (3 * hid, hid), ("fan", hid)),
            (f"{b}.attn.qkv.bias", (3 * hid,), bias),
            (f"{b}.attn.proj.weight", (hid, hid), ("fan", hid)),
            (f"{b}.attn.proj.bias", (hid,), bias),
            (f"{b}.mlp.linear_fc1.weight", (inter, hid), ("fan", hid)),
            (f"{b}.mlp.linear_fc1.bias", (inter,), bias),
            (f"{b}.mlp.linear_fc2.weight", (hid, inter), ("fan", inter)),
            (f"{b}.mlp.linear_fc2.bias", (hid,), bias),
        ]
    return sorted(out)


def sample(shape, init):
    if init[0] == "fan":
        a = init[1] ** -0.5
        return mx.random.uniform(-a, a, shape)
    if init[0] == "uni":
        return mx.random.uniform(init[1], init[2], shape)
    return mx.log(mx.random.uniform(init[1], init[2], shape))


def write(out, tokenizer_from, seed, image_min_pixels):
    os.makedirs(out, exist_ok=True)
    cfg = medium_config(image_min_pixels)
    cfg.pop("_image_min_pixels")
    mx.random.seed(seed)
    weights = {}
    for name, shape, init in specs(cfg):
        weights[name] = sample(shape, init).astype(mx.bfloat16)
        mx.eval(weights[name])
    mx.save_safetensors(os.path.join(out, "model.safetensors"), weights, metadata={"format": "mlx"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_from, name), os.path.join(out, name))
    with open(os.path.join(tokenizer_from, "preprocessor_config.json")) as f:
        pre = json.load(f)
    # A smaller floor than the real 65,536 pixels, so that a small benchmark image is not
    # upscaled (the CPU run uses small images; both implementations read this file).
    pre["size"]["shortest_edge"] = image_min_pixels
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    n = sum(v.size for v in weights.values())
    print(f"wrote {out}: {len(weights)} tensors, {n / 1e6:.1f} M parameters (bf16)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from", required=True, help="a `cathedral tiny-model` directory")
    ap.add_argument("--q4", help="also write the 4-bit mlx-vlm conversion here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-min-pixels", type=int, default=4096)
    args = ap.parse_args()
    write(args.out, args.tokenizer_from, args.seed, args.image_min_pixels)
    if args.q4:
        from mlx_vlm.convert import convert

        shutil.rmtree(args.q4, ignore_errors=True)
        convert(args.out, args.q4, quantize=True, q_bits=4, q_group_size=64)
        with open(os.path.join(args.out, "preprocessor_config.json")) as f:
            pre = f.read()
        with open(os.path.join(args.q4, "preprocessor_config.json"), "w") as f:
            f.write(pre)
        print(f"wrote {args.q4} (4-bit, group 64, mlx-vlm convert)")


if __name__ == "__main__":
    main()
