"""Reference vision-tower features and MRoPE positions for the tiny checkpoint, from mlx-vlm.

Run with the reference venv (tools/reference/setup.sh):

    cargo run -p cathedral-runtime --bin cathedral -- tiny-model --out /tmp/tiny --seed 0
    .venv-ref/bin/python tools/reference/vision_parity.py --checkpoint /tmp/tiny \
        --out runtime/tests/fixtures/vision

Writes `vision_reference.safetensors` (inputs and outputs, f32) and `vision_reference.json`
(grids, prompt ids, positions, and a fingerprint of the checkpoint's vision weights so the
test can tell a changed checkpoint from a wrong tower). The Rust test
`runtime/tests/vision_parity.rs` compares against these files without Python.

What is compared:
- the tower's output for the patch grids the Hugging Face Qwen2-VL image processor assigns to
  64x64 and 100x60 images (each alone and both in one call), in f32 and with the weights
  cast to bf16. The pixel rows are a fixed integer-hash pattern (regenerated bit-exactly in
  Rust) so that the fixture stays small; the tower is tested in isolation from
  preprocessing.
- the tower's output on the processor's own pixel rows for those two images (regenerated in
  Rust and preprocessed there), which checks preprocessing and tower together.
- MRoPE position ids of a prompt with text around two images, from mlx-vlm's
  `get_rope_index` (the language model is not run, so the Gated DeltaNet normalisation
  difference of mlx-vlm 0.7.6 does not matter here).
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_vlm.models.qwen3_5_moe import ModelConfig
from mlx_vlm.models.qwen3_5_moe.language import LanguageModel
from mlx_vlm.models.qwen3_5_moe.vision import VisionModel
from mlx_vlm.models.qwen3_5_moe.config import TextConfig, VisionConfig
from mlx.utils import tree_map
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

IMAGE_SIZES = [(64, 64), (100, 60)]  # (width, height)


def pixel_rows(rows: int, cols: int) -> np.ndarray:
    """Row r, column c: ((r*cols + c) * 2654435761 mod 2^32) / 2^32 * 2 - 1, as f32."""
    idx = np.arange(rows * cols, dtype=np.uint64)
    h = (idx * np.uint64(2654435761)) % np.uint64(1 << 32)
    return (h.astype(np.float64) / float(1 << 32) * 2.0 - 1.0).astype(np.float32).reshape(rows, cols)


def test_image(width: int, height: int) -> Image.Image:
    """Pixel (x, y) = (x*255 // (w-1), y*255 // (h-1), (x+y) mod 256): regenerated in Rust."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def processed(processor, width: int, height: int) -> tuple[list[int], np.ndarray]:
    """The Hugging Face processor's patch grid and pixel rows for the test image."""
    out = processor(images=[test_image(width, height)])
    grid = [int(v) for v in np.asarray(out["image_grid_thw"])[0]]
    return grid, np.asarray(out["pixel_values"], dtype=np.float32)


def load_tower(checkpoint: Path, vision_config: dict) -> VisionModel:
    tower = VisionModel(VisionConfig(**{k: v for k, v in vision_config.items() if k in VisionConfig.__dataclass_fields__}))
    weights = mx.load(str(checkpoint / "model.safetensors"))
    prefix = "vision_tower."
    mine = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    tower.load_weights(list(tower.sanitize(mine).items()), strict=True)
    mx.eval(tower.parameters())
    return tower, mine


def fingerprint(weights: dict) -> float:
    """Sum over the vision tensors (sorted by name) of sum(|w|) — a cheap identity check."""
    total = 0.0
    for k in sorted(weights):
        total += float(np.abs(np.asarray(weights[k].astype(mx.float32), dtype=np.float64)).sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    config = json.loads((args.checkpoint / "config.json").read_text())
    pre = json.loads((args.checkpoint / "preprocessor_config.json").read_text())
    processor = Qwen2VLImageProcessorPil(
        patch_size=pre["patch_size"],
        temporal_patch_size=pre["temporal_patch_size"],
        merge_size=pre["merge_size"],
        size=pre["size"],
        image_mean=pre["image_mean"],
        image_std=pre["image_std"],
    )
    processed_images = [processed(processor, w, h) for (w, h) in IMAGE_SIZES]
    grids = [g for g, _ in processed_images]

    tower, weights = load_tower(args.checkpoint, config["vision_config"])
    vc = config["vision_config"]
    patch_dim = vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2
    rows = [g[0] * g[1] * g[2] for g in grids]
    # One pattern over all rows, split per image, so the two images differ.
    both = pixel_rows(sum(rows), patch_dim)
    pixels = [both[: rows[0]], both[rows[0]:]]

    tensors = {}
    for dtype_name, dtype in [("f32", mx.float32), ("bf16", mx.bfloat16)]:
        if dtype is not mx.float32:
            tower.update(tree_map(lambda a: a.astype(dtype), tower.parameters()))
        for k, (px, g) in enumerate(zip(pixels, grids)):
            out, _ = tower(mx.array(px).astype(dtype), mx.array([g]))
            tensors[f"features_{k}_{dtype_name}"] = out.astype(mx.float32)
        out, _ = tower(mx.array(both).astype(dtype), mx.array(grids))
        tensors[f"features_both_{dtype_name}"] = out.astype(mx.float32)
        if dtype is mx.float32:
            # The processor's own pixels: checks preprocessing and tower together.
            for k, (g, px) in enumerate(processed_images):
                out, _ = tower(mx.array(px), mx.array([g]))
                tensors[f"features_processed_{k}_f32"] = out.astype(mx.float32)
    mx.eval(tensors)

    # MRoPE positions over text + two images, from mlx-vlm's language model.
    text = TextConfig(**{k: v for k, v in config["text_config"].items() if k in TextConfig.__dataclass_fields__})
    model_config = ModelConfig(
        text_config=text,
        vision_config=VisionConfig(**{k: v for k, v in vc.items() if k in VisionConfig.__dataclass_fields__}),
        model_type=config["model_type"],
        image_token_id=config["image_token_id"],
        video_token_id=config["video_token_id"],
        vision_start_token_id=config["vision_start_token_id"],
        vision_end_token_id=config["vision_end_token_id"],
    )
    lm = LanguageModel(text, model_config)
    merge = vc["spatial_merge_size"]
    image_id, start_id, end_id = (
        config["image_token_id"],
        config["vision_start_token_id"],
        config["vision_end_token_id"],
    )
    ids = [248045, 872, 198]
    for k, g in enumerate(grids):
        ids += [start_id] + [image_id] * (g[0] * (g[1] // merge) * (g[2] // merge)) + [end_id]
        ids += [1000 + k, 2000 + k, 3000 + k][: k + 1]
    ids += [248046, 198, 248045, 77091, 198]
    position_ids, rope_deltas = lm.get_rope_index(mx.array([ids]), mx.array(grids))

    args.out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(args.out / "vision_reference.safetensors"), tensors)
    meta = {
        "generator": "tools/reference/vision_parity.py (mlx-vlm 0.7.6, mlx 0.32.2)",
        "checkpoint": {"command": "cathedral tiny-model --seed 0 --dtype f32", "vision_abs_sum": fingerprint(weights)},
        "image_sizes_wh": IMAGE_SIZES,
        "grids": grids,
        "image_token_id": image_id,
        "spatial_merge_size": merge,
        "input_ids": ids,
        "position_ids": np.asarray(position_ids)[:, 0, :].tolist(),
        "rope_delta": int(np.asarray(rope_deltas).reshape(-1)[0]),
    }
    (args.out / "vision_reference.json").write_text(json.dumps(meta) + "\n")
    print(f"grids {grids}; features {[tuple(v.shape) for v in tensors.values()]}; rope_delta {meta['rope_delta']}")


if __name__ == "__main__":
    main()
