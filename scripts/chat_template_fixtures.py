#!/usr/bin/env python3
"""Renders the real chat templates with transformers' own renderer, for the Rust tests.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers jinja2
    /tmp/hf/bin/python scripts/chat_template_fixtures.py > crates/elasticmoe/tests/fixtures/chat_templates.json

Reads the templates from crates/moe-model/src/chat_templates/ and renders each conversation below
the way `tokenizer.apply_chat_template(messages, tokenize=False, ...)` does: transformers'
`render_jinja_template` (its sandboxed jinja2 environment with trim_blocks, lstrip_blocks,
loopcontrols, `raise_exception`, `tojson` and `strftime_now`), with the special tokens of the
tokenizer that `elasticmoe gen-model` writes for that architecture as template variables.
A render that raises is recorded with its message under "error".
"""

import json
import pathlib
import sys

import transformers
from transformers.utils import chat_template_utils as ctu

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "crates" / "moe-model" / "src" / "chat_templates"

# The special tokens map of each gen-model tokenizer (moe_model::synth::tokenizer_config_json_for).
SPECIALS = {
    "qwen3": {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"},
    "deepseek_v2": {
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>",
        "pad_token": "<｜▁pad▁｜>",
    },
    "mixtral": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"},
}


def m(role, content):
    return {"role": role, "content": content}


COMMON = [
    ("user", [m("user", "Hello!")], True, {}),
    ("system_user", [m("system", "You are terse."), m("user", "What is 2+2?")], True, {}),
    (
        "multi_turn",
        [
            m("system", "Be brief."),
            m("user", "Hi"),
            m("assistant", "Hello. How can I help?"),
            m("user", "Name a prime."),
        ],
        True,
        {},
    ),
    ("no_generation_prompt", [m("user", "Hi"), m("assistant", "Hello.")], False, {}),
    ("unicode", [m("user", "Grüße, 世界! 🚀 naïve café")], True, {}),
    ("whitespace", [m("user", "  padded\n\n"), m("assistant", "\nok  "), m("user", "\tend")], True, {}),
]

EXTRA = {
    "qwen3": [
        ("thinking_off", [m("user", "Hello!")], True, {"enable_thinking": False}),
        ("thinking_on", [m("user", "Hello!")], True, {"enable_thinking": True}),
        (
            "history_with_think",
            [
                m("user", "2+2?"),
                m("assistant", "<think>\nadd them\n</think>\n\n4"),
                m("user", "3+3?"),
            ],
            True,
            {},
        ),
        (
            "last_assistant_with_think",
            [m("user", "2+2?"), m("assistant", "<think>add</think>4")],
            False,
            {},
        ),
        ("second_system", [m("system", "A"), m("user", "x"), m("system", "B"), m("user", "y")], True, {}),
    ],
    "deepseek_v2": [],
    "mixtral": [
        ("not_alternating", [m("user", "a"), m("user", "b")], True, {}),
        ("tool_role", [m("user", "a"), m("tool", "b")], True, {}),
    ],
}


def render(template, messages, add_generation_prompt, kwargs, specials):
    if hasattr(ctu, "render_jinja_template"):
        rendered, _ = ctu.render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **specials,
            **kwargs,
        )
        return rendered[0]
    compiled = ctu._compile_jinja_template(template)
    return compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt, **specials, **kwargs
    )


def main():
    cases = []
    for family in ["qwen3", "deepseek_v2", "mixtral"]:
        template = (TEMPLATES / f"{family}.jinja").read_text()
        for name, messages, gen, kwargs in COMMON + EXTRA[family]:
            case = {
                "family": family,
                "name": name,
                "messages": messages,
                "add_generation_prompt": gen,
                "kwargs": kwargs,
            }
            try:
                case["rendered"] = render(template, messages, gen, kwargs, SPECIALS[family])
            except Exception as e:  # the template's raise_exception
                case["error"] = str(e)
            cases.append(case)
    out = {
        "generated_by": "scripts/chat_template_fixtures.py",
        "transformers": transformers.__version__,
        "cases": cases,
    }
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
