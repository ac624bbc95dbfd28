"""One client for both servers: times whole multimodal chat requests (a PNG as a data URL plus
a question, greedy, N tokens out, not streamed) against an OpenAI-compatible endpoint, with
mTLS when a client certificate is given. Prints one JSON object; asserts nothing.

    python tools/bench/e2e_client.py --url https://127.0.0.1:PORT --cert c.pem --key c.key --ca ca.pem \
        --model NAME --image-size 128 --max-tokens 32 --runs 5 --warmup 1
"""
import argparse
import base64
import json
import ssl
import struct
import time
import zlib

import httpx


def png(side, shift=0):
    """A deterministic RGB gradient (a different one per `shift`), encoded as PNG with the
    standard library only."""
    rows = b"".join(
        b"\x00"
        + bytes(v for x in range(side) for v in ((x * 7 + shift) % 256, (y * 5) % 256, ((x + y) * 3 + 11 * shift) % 256))
        for y in range(side)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    def body(shift):
        # A new image for every request: servers that cache image features by content
        # (mlx_vlm.server does) must still run the vision tower each time.
        data_url = "data:image/png;base64," + base64.b64encode(png(args.image_size, shift)).decode()
        return {
            "model": args.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": "Describe this picture in one sentence."},
                    ],
                }
            ],
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": False,
        }
    kw = {"timeout": 600.0}
    if args.cert:
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.load_cert_chain(args.cert, args.key)
        kw["verify"] = ctx
    times, tokens = [], []
    with httpx.Client(**kw) as client:
        for i in range(args.warmup + args.runs):
            t = time.perf_counter()
            r = client.post(args.url.rstrip("/") + "/v1/chat/completions", json=body(i))
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"HTTP {r.status_code}: {r.text[:500]}")
            usage = r.json().get("usage") or {}
            if i >= args.warmup:
                times.append(dt)
                tokens.append(usage.get("completion_tokens"))
    print(json.dumps({"request_s": median(times), "request_runs_s": times, "completion_tokens": tokens,
                      "prompt_tokens": usage.get("prompt_tokens")}))


if __name__ == "__main__":
    main()
