"""The official `openai` client against a cathedral server over mTLS.

Usage: openai_peer.py BASE_URL CA CERT KEY IMAGE_DATA_URL_FILE
Prints one JSON object with what each call returned; exits non-zero on any failure.
"""
import json
import ssl
import sys

import httpx
import openai

base, ca, cert, key, image_file = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
client = openai.OpenAI(
    base_url=base,
    api_key="unused",  # identity comes from the client certificate
    http_client=httpx.Client(verify=ctx, timeout=120),
    max_retries=0,
)
out = {}

models = client.models.list()
model = models.data[0].id
out["models"] = [m.id for m in models.data]

messages = [{"role": "system", "content": "Answer in few words."}, {"role": "user", "content": "Say hello."}]
sync = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=8,
    temperature=0,
    seed=7,
)
out["sync"] = {
    "object": sync.object,
    "content": sync.choices[0].message.content,
    "role": sync.choices[0].message.role,
    "finish_reason": sync.choices[0].finish_reason,
    "usage": sync.usage.model_dump(),
}

chunks = list(
    client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        temperature=0,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream"] = {
    "chunks": len(chunks),
    "content": text,
    "first_role": chunks[0].choices[0].delta.role,
    "finish_reason": [c.choices[0].finish_reason for c in chunks if c.choices][-1],
    "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None,
    "objects": sorted({c.object for c in chunks}),
}

with open(image_file) as f:
    url = f.read().strip()
img = client.chat.completions.create(
    model=model,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ],
    max_completion_tokens=6,
    temperature=0,
)
out["image"] = {
    "content": img.choices[0].message.content,
    "finish_reason": img.choices[0].finish_reason,
    "usage": img.usage.model_dump(),
}

text_only = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}]}],
    max_tokens=1,
)
out["text_only_prompt_tokens"] = text_only.usage.prompt_tokens

try:
    client.chat.completions.create(model=model, messages=[], max_tokens=1)
    out["bad"] = "accepted"
except openai.BadRequestError as e:
    out["bad"] = {"status": e.status_code, "code": e.code, "message": e.message}

print(json.dumps(out))
