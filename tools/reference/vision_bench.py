"""Times mlx-vlm's vision tower on the weights and pixels `cathedral bench-vision` wrote.

    .venv-ref/bin/python tools/reference/vision_bench.py --dir DIR [--runs 5] [--warmup 2]

Called by `cathedral bench-vision --python ...`; prints one JSON line (times in seconds).
The pixels are cast to the weights' dtype first, as mlx-vlm's Qwen3.5 model does before
calling its tower.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
from mlx_vlm.models.qwen3_5_moe.config import VisionConfig
from mlx_vlm.models.qwen3_5_moe.vision import VisionModel
from mlx_vlm.version import __version__ as mlx_vlm_version


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also time each stage alone")
    args = ap.parse_args()
    meta = json.loads((args.dir / "vision_bench.json").read_text())
    vc = meta["vision_config"]
    tower = VisionModel(VisionConfig(**{k: v for k, v in vc.items() if k in VisionConfig.__dataclass_fields__}))
    tensors = mx.load(str(args.dir / "vision_bench.safetensors"))
    pixels = tensors.pop("pixels")
    prefix = "vision_tower."
    tower.load_weights([(k[len(prefix):], v) for k, v in tensors.items()], strict=True)
    mx.eval(tower.parameters())
    dtype = tower.patch_embed.proj.weight.dtype
    grid = mx.array([meta["grid_thw"]])

    def once() -> None:
        out, _ = tower(pixels.astype(dtype), grid)
        mx.eval(out)

    for _ in range(args.warmup):
        once()
    mx.reset_peak_memory()
    runs = []
    for _ in range(args.runs):
        t = time.perf_counter()
        once()
        runs.append(time.perf_counter() - t)
    result = {
        "mlx_vlm": mlx_vlm_version,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "runs_s": runs,
        "peak_bytes": mx.get_peak_memory(),
    }
    ours = args.dir / "vision_bench_output.safetensors"
    if ours.is_file():
        out, _ = tower(pixels.astype(dtype), grid)
        ref = out.astype(mx.float32)
        result["max_abs_diff"] = mx.abs(mx.load(str(ours))["features"] - ref).max().item()
        result["max_abs_ref"] = mx.abs(ref).max().item()
    if args.profile:
        result["stages"] = profile(tower, pixels.astype(dtype), grid, args.runs)
    print(json.dumps(result))


def profile(tower, pixels, grid, runs: int) -> dict:
    """The steps of mlx-vlm's VisionModel.__call__, each evaluated before the next."""
    embed, block, blocks, merger = [], [], [], []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        x = tower.patch_embed(pixels) + tower.fast_pos_embed_interpolate(grid)
        rotary = tower.rot_pos_emb(grid)
        n = int(grid[0, 0].item() * grid[0, 1].item() * grid[0, 2].item())
        cu_seqlens = mx.array([0, n], dtype=mx.int32)
        mx.eval(x, rotary)
        embed.append(time.perf_counter() - t)
        run_blocks = 0.0
        for blk in tower.blocks:
            t = time.perf_counter()
            x = blk(x, cu_seqlens=cu_seqlens, rotary_pos_emb=rotary)
            mx.eval(x)
            block.append(time.perf_counter() - t)
            run_blocks += block[-1]
        blocks.append(run_blocks)
        t = time.perf_counter()
        mx.eval(tower.merger(x))
        merger.append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]
    return {"embed": med(embed), "block": med(block), "blocks": med(blocks), "merger": med(merger)}


if __name__ == "__main__":
    main()
