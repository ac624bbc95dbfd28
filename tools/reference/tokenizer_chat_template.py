"""Reference renderings of chat templates, for the prompt rendering test.

Reads {"cases": [{"template", "messages", "add_generation_prompt"}]} (messages as a JSON string,
exactly as the Rust side hands them to its template) from argv[1]; writes a JSON list of
{"text": ...} or {"error": ...} to argv[2].

With transformers importable (.venv-ref) it renders through transformers' own
`render_jinja_template`; otherwise (.venv, jinja2 only) through a Jinja2 sandbox configured the
way transformers configures it: trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
and `tojson` as plain `json.dumps` (no HTML escaping, non-ASCII kept).
"""

import json
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

try:
    from transformers.utils.chat_template_utils import render_jinja_template
except Exception:  # noqa: BLE001 - any import failure means: no transformers here
    render_jinja_template = None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render_plain(template, messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt
    )


def render(template, messages, add_generation_prompt):
    if render_jinja_template is None:
        return render_plain(template, messages, add_generation_prompt)
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    out = []
    for case in cases:
        messages = json.loads(case["messages"])
        try:
            out.append({"text": render(case["template"], messages, case["add_generation_prompt"])})
        except Exception as e:  # noqa: BLE001 - the error text is the result
            out.append({"error": f"{type(e).__name__}: {e}"})
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump({"renderer": "transformers" if render_jinja_template else "jinja2", "results": out}, f)


if __name__ == "__main__":
    main()
