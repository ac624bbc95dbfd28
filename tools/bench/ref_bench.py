"""The reference side of `scripts/bench`: times one checkpoint in mlx-vlm (vision tower) or
mlx-lm (text prefill and decode) the way `cathedral bench` times it in this runtime, and prints
one JSON object (medians in seconds, peak resident memory). Asserts nothing.

    python tools/bench/ref_bench.py --model DIR --phase vision --image-size 128
    python tools/bench/ref_bench.py --model DIR --phase text --ids ids.json --decode-tokens 128
"""
import argparse
import json
import resource
import time

import mlx.core as mx

import cpu_compat  # noqa: F401  (bf16 expert matmuls on MLX's CPU backend)


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_vision(args):
    from mlx_vlm import load

    t = time.perf_counter()
    model, _ = load(args.model)
    load_s = time.perf_counter() - t
    tower = model.vision_tower
    cfg = model.config.vision_config
    side = args.image_size // cfg.patch_size
    rows = side * side
    row_len = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size
    pixels = mx.random.normal((rows, row_len), key=mx.random.key(7))
    grid = mx.array([[1, side, side]])
    dtype = tower.patch_embed.proj.weight.dtype
    mx.eval(pixels)
    times = []
    for i in range(args.warmup + args.runs):
        t = time.perf_counter()
        # As mlx-vlm's own generate feeds the tower: pixels cast to the weights' dtype.
        out = tower(pixels.astype(dtype), grid)
        mx.eval(out[0] if isinstance(out, tuple) else out)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {
        "impl": "mlx-vlm",
        "phase": "vision",
        "image": [args.image_size, args.image_size],
        "patches": rows,
        "vision_s": median(times),
        "vision_runs_s": times,
        "load_s": load_s,
    }


def timed_layers(layers, record):
    """Wraps each layer's class __call__ so that its output is evaluated and timed."""
    classes = {type(layer) for layer in layers}
    originals = {c: c.__call__ for c in classes}
    index = {id(layer): i for i, layer in enumerate(layers)}

    def make(orig):
        def call(self, *a, **k):
            t = time.perf_counter()
            out = orig(self, *a, **k)
            cache = k.get("cache", a[2] if len(a) > 2 else None)
            mx.eval(out, *( [c.state] if cache is not None and hasattr(cache, "state") else []))
            record[index[id(self)]].append(time.perf_counter() - t)
            return out

        return call

    for c in classes:
        c.__call__ = make(originals[c])
    return lambda: [setattr(c, "__call__", o) for c, o in originals.items()]


def bench_text(args):
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    t = time.perf_counter()
    model, tokenizer = load(args.model)
    load_s = time.perf_counter() - t
    ids = json.load(open(args.ids))
    sampler = make_sampler(temp=0.0)
    prefill, first, tps, tokens = [], [], [], []
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        t_first = None
        n = 0
        last = None
        for r in stream_generate(model, tokenizer, prompt=ids, max_tokens=args.decode_tokens, sampler=sampler):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            last = r
        t_end = time.perf_counter()
        if i < args.warmup:
            continue
        first.append(t_first - t0)
        prefill.append(last.prompt_tokens / last.prompt_tps)
        tokens.append(last.generation_tokens)
        if last.generation_tokens > 1:
            tps.append((last.generation_tokens - 1) / (t_end - t_first))
    result = {
        "impl": "mlx-lm",
        "phase": "text",
        "prompt_tokens": len(ids),
        "prefill_s": median(prefill),
        "first_token_s": median(first),
        "first_token_runs_s": first,
        "decode_tok_s": median(tps),
        "completion_tokens": tokens,
        "load_s": load_s,
    }
    if args.profile:
        result["profile"] = profile_prefill(model, ids, args.runs)
    return result


def profile_prefill(model, ids, runs):
    from mlx_lm.models.cache import make_prompt_cache

    inner = model.language_model.model if hasattr(model, "language_model") else model.model
    layers = inner.layers
    record = [[] for _ in layers]
    restore = timed_layers(layers, record)
    x = mx.array([ids])
    full = []
    try:
        for _ in range(max(runs, 1)):
            cache = make_prompt_cache(model)
            model(x, cache=cache)
    finally:
        restore()
    for _ in range(max(runs, 1)):
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        logits = model(x, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        full.append(time.perf_counter() - t)
    # Decode steps after a prefill: each layer timed on its own, then whole steps (forward,
    # evaluate, last logits).
    cache = make_prompt_cache(model)
    mx.eval(model(x, cache=cache), [c.state for c in cache])
    token = mx.array([[42]])
    record = [[] for _ in layers]
    restore = timed_layers(layers, record)
    try:
        for _ in range(8):
            model(token, cache=cache)
    finally:
        restore()
    steps = []
    for _ in range(8):
        t = time.perf_counter()
        logits = model(token, cache=cache)
        mx.eval(logits[:, -1, :].astype(mx.float32), [c.state for c in cache])
        steps.append(time.perf_counter() - t)
    decode_layers = [median(r) for r in record]
    kinds = ["deltanet+moe" if getattr(layer, "is_linear", False) else "attention+moe" for layer in layers]
    return {
        "layers": [{"layer": i, "kind": kinds[i], "s": median(t)} for i, t in enumerate(record)],
        "prefill_all_logits_s": median(full),
        "decode_layers_s": decode_layers,
        "decode_step_s": median(steps),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--phase", choices=["vision", "text"], required=True)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--ids", help="JSON list of prompt token ids (from `cathedral bench --ids-out`)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    out = bench_vision(args) if args.phase == "vision" else bench_text(args)
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["mlx"] = mx.__version__
    out["device"] = str(mx.default_device())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
