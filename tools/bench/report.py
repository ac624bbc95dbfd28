"""Prints the tables of `scripts/bench` from its results directory (JSON files written by
`cathedral bench`, tools/bench/ref_bench.py and tools/bench/e2e_client.py)."""
import json
import os
import sys


def load(res, name):
    path = os.path.join(res, name)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path) as f:
        return json.load(f)


def mib(n):
    return f"{n / 2**20:.0f}" if n else "?"


def main():
    res = sys.argv[1]
    rows = []

    def pair(label, stem, key, unit, higher_is_better=False, mem_stem=None):
        ours, ref = load(res, f"{stem}.ours.json"), load(res, f"{stem}.ref.json")
        if not ours or not ref:
            return
        a, b = ours[key], ref[key]
        ratio = (a / b) if higher_is_better else (b / a)
        mo = load(res, f"{mem_stem}.ours.mem.json") if mem_stem else ours
        mr = load(res, f"{mem_stem}.ref.mem.json") if mem_stem else ref
        fmt = (lambda v: f"{v:.2f}") if unit == "tok/s" else (lambda v: f"{v * 1000:.0f}")
        rows.append((label, unit if unit == "tok/s" else "ms", fmt(a), fmt(b), f"{ratio:.2f}×",
                     mib(mo.get("peak_rss_bytes")), mib(mr.get("peak_rss_bytes"))))

    v = load(res, "vision.ours.json")
    t = load(res, "text-bf16.ours.json")
    img = f"{v['image'][0]}×{v['image'][1]}" if v else "?"
    pt = t["prompt_tokens"] if t else "?"
    pair(f"vision tower alone, {img} (bf16)", "vision", "vision_s", "s")
    pair(f"prefill, {pt}-token prompt (bf16)", "text-bf16", "first_token_s", "s")
    pair("decode (bf16)", "text-bf16", "decode_tok_s", "tok/s", True)
    pair(f"prefill, {pt}-token prompt (4-bit)", "text-q4", "first_token_s", "s")
    pair("decode (4-bit)", "text-q4", "decode_tok_s", "tok/s", True)
    pair(f"whole multimodal request, {img} image (bf16, mTLS vs plain HTTP)", "e2e", "request_s", "s",
         mem_stem="e2e")
    print()
    print("| what | unit | cathedral | mlx-vlm / mlx-lm | ratio (>1: cathedral faster) | cathedral peak MiB | reference peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print("prefill = time to the first token (prompt forward + first sample); decode = tokens after the")
    print("first / time after the first; medians of the timed runs; peak = max resident set size.")
    for stem in ("text-bf16", "text-q4"):
        o, r = load(res, f"{stem}.ours.json"), load(res, f"{stem}.ref.json")
        if o and r:
            print(f"{stem}: completion tokens per run cathedral {o['completion_tokens']}, reference {r['completion_tokens']}")
        o, r = load(res, f"{stem}.prof.ours.json") or o, load(res, f"{stem}.prof.ref.json") or r
        if o and r and "profile" in o and "profile" in r:
            po, pr = o["profile"], r["profile"]
            print()
            print(f"### per-layer prefill profile, {stem} (each layer evaluated before the next)")
            print("| layer | kind | cathedral ms | reference ms |")
            print("|---:|---|---:|---:|")
            for lo, lr in zip(po["layers"], pr["layers"]):
                print(f"| {lo['layer']} | {lo['kind']} | {lo['s'] * 1000:.0f} | {lr['s'] * 1000:.0f} |")
            if "decode_layers_s" in po and "decode_layers_s" in pr:
                print()
                print(f"### per-layer decode step, {stem} (after the prompt; each layer evaluated alone; medians of 8)")
                print("| layer | cathedral ms | reference ms |")
                print("|---:|---:|---:|")
                for i, (a, b) in enumerate(zip(po["decode_layers_s"], pr["decode_layers_s"])):
                    print(f"| {i} | {a * 1000:.1f} | {b * 1000:.1f} |")
                print(f"| whole step (forward + logits evaluated) | {po['decode_step_s'] * 1000:.1f} | {pr['decode_step_s'] * 1000:.1f} |")
            print()
            print(f"cathedral prefill, logits for the last position only: {po['prefill_last_logits_s'] * 1000:.0f} ms; "
                  f"for every position: {po['prefill_all_logits_s'] * 1000:.0f} ms; "
                  f"reference model call (every position): {pr['prefill_all_logits_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
