#!/usr/bin/env python3
"""The official `openai` Python client against `elasticmoe serve`, as a new user would use it.

    python3 -m venv /tmp/oa && /tmp/oa/bin/pip install openai
    cargo build -p elasticmoe
    /tmp/oa/bin/python scripts/openai_client_check.py target/debug/elasticmoe

Writes a tiny-qwen3 model with `gen-model`, starts `serve` on a free port with an API key, and
exercises completions and chat, streamed and not, with n, stop, logprobs, seed, usage in
streams, array content, and the errors a client sees. Every step asserts what it prints.
"""

import subprocess
import sys
import tempfile

import openai
from openai import OpenAI

binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/elasticmoe"
work = tempfile.mkdtemp()
model = f"{work}/tiny-qwen3"
subprocess.run([binary, "gen-model", "--preset", "tiny-qwen3", "--out", model], check=True,
               capture_output=True)
server = subprocess.Popen(
    [binary, "serve", "--model", model, "--devices", "host:2", "--port", "0",
     "--api-key", "sk-local-test", "--served-model-name", "tiny-qwen3"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    line = server.stdout.readline().strip()
    assert line.startswith("listening on "), line
    base = line.removeprefix("listening on ") + "/v1"
    print(f"openai {openai.__version__}; server at {base}\n")
    client = OpenAI(base_url=base, api_key="sk-local-test")

    print("== models.list")
    print([m.id for m in client.models.list().data])

    print("\n== completions.create (not streamed)")
    r = client.completions.create(model="tiny-qwen3", prompt="Hello", max_tokens=12,
                                  extra_body={"ignore_eos": True})
    print(repr(r.choices[0].text), r.choices[0].finish_reason, r.usage)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    full = r.choices[0].text

    print("\n== completions.create (streamed, usage chunk)")
    text, usage = "", None
    for chunk in client.completions.create(model="tiny-qwen3", prompt="Hello", max_tokens=12,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
    print(repr(text), usage)
    assert text == full and usage.completion_tokens == 12

    print("\n== completions.create with stop, n=2 + seed, logprobs")
    stop = full[4:6]
    r = client.completions.create(model="tiny-qwen3", prompt="Hello", max_tokens=12, stop=[stop],
                                  extra_body={"ignore_eos": True})
    print(f"stop={stop!r}:", repr(r.choices[0].text), r.choices[0].finish_reason)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny-qwen3", prompt="Hello", max_tokens=6, n=2,
                                  temperature=0.8, seed=5, logprobs=2)
    for c in r.choices:
        print(c.index, repr(c.text), [round(x, 3) for x in c.logprobs.token_logprobs])
    assert len(r.choices) == 2

    print("\n== chat.completions.create (not streamed)")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny-qwen3", messages=msgs, max_tokens=12,
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    print(repr(c.message.content), c.finish_reason, r.usage, "created", r.created)
    print("first token:", c.logprobs.content[0].token, round(c.logprobs.content[0].logprob, 3),
          [t.token for t in c.logprobs.content[0].top_logprobs])
    assert c.message.role == "assistant"
    chat_full = c.message.content

    print("\n== chat.completions.create (streamed)")
    text = ""
    for chunk in client.chat.completions.create(model="tiny-qwen3", messages=msgs,
                                                max_tokens=12, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
    print(repr(text))
    assert text == chat_full

    print("\n== array content, Qwen3 thinking switch")
    r = client.chat.completions.create(
        model="tiny-qwen3",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    print(repr(r.choices[0].message.content), r.usage.prompt_tokens, "prompt tokens")

    print("\n== errors")
    for name, call in [
        ("wrong key", lambda: OpenAI(base_url=base, api_key="nope").models.list()),
        ("unsupported parameter", lambda: client.chat.completions.create(
            model="tiny-qwen3", messages=msgs, presence_penalty=0.5)),
        ("unknown model", lambda: client.completions.create(model="gpt-4", prompt="x")),
        ("image part", lambda: client.chat.completions.create(
            model="tiny-qwen3", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])),
    ]:
        try:
            call()
            raise AssertionError(f"{name}: no error")
        except openai.APIStatusError as e:
            print(f"{name}: {e.status_code} {type(e).__name__}: {e.body.get('message')!r}")
    print("\nall checks passed")
finally:
    server.terminate()
    server.wait(timeout=30)
