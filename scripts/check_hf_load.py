#!/usr/bin/env python3
"""Load `elasticmoe gen-model` directories with Hugging Face transformers' own implementations.

Not run in CI (it needs torch and transformers). For each directory it checks that:
  - AutoConfig / AutoTokenizer / AutoModelForCausalLM load it with no missing, unexpected or
    mis-shaped weights (so the names, shapes and config keys are the real architecture's);
  - the chat template renders and the byte-level tokenizer round-trips text;
  - a greedy decode of --steps tokens (full recompute each step, EOS ignored) keeps every logit
    finite and the logits non-degenerate (spread > 0, more than one distinct argmax over the run).

With --dump FILE it also writes, per directory, the prompt ids, the greedy tokens and the logits of
every step as JSON, which can be compared with the engine's own forward.

    python3 scripts/check_hf_load.py models/tiny-qwen3 models/tiny-deepseek models/tiny-mixtral
"""
import argparse
import json
import math
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def check(path, steps, prompt):
    cfg = AutoConfig.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = list(info.get(key) or [])
        if found:
            problems.append(f"{key}: {found[:8]}{' ...' if len(found) > 8 else ''}")
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False).input_ids
    if tok.decode(ids) != text:
        problems.append("tokenizer does not round-trip the chat prompt")
    seq = list(ids)
    all_logits, argmaxes = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([seq]), use_cache=False)
            last = out.logits[0, -1].float()
            if not torch.isfinite(last).all():
                problems.append(f"non-finite logits at step {len(all_logits)}")
                break
            all_logits.append([float(x) for x in last])
            nxt = int(last.argmax())
            argmaxes.append(nxt)
            seq.append(nxt)
    spreads = [float(torch.tensor(l).std()) for l in all_logits]
    if not spreads or min(spreads) <= 0.0:
        problems.append("degenerate logits (zero spread)")
    if len(set(argmaxes)) < 2:
        problems.append(f"greedy decode is stuck on one token: {argmaxes[:8]}")
    summary = {
        "dir": path,
        "architecture": cfg.architectures[0],
        "transformers_class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "prompt_ids": ids,
        "greedy": argmaxes,
        "logit_std_min": min(spreads) if spreads else math.nan,
        "logit_std_max": max(spreads) if spreads else math.nan,
        "problems": problems,
    }
    return summary, all_logits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", default="hello")
    ap.add_argument("--dump", help="write prompt ids, greedy tokens and per-step logits as JSON")
    args = ap.parse_args()
    torch.manual_seed(0)
    failed = False
    dumps = {}
    for d in args.dirs:
        summary, logits = check(d, args.steps, args.prompt)
        status = "FAIL" if summary["problems"] else "ok"
        failed |= bool(summary["problems"])
        print(
            f"{status:4} {d}: {summary['architecture']} as {summary['transformers_class']}, "
            f"{summary['params']} params, {len(summary['greedy'])} steps, logit std "
            f"{summary['logit_std_min']:.3f}..{summary['logit_std_max']:.3f}, "
            f"{len(set(summary['greedy']))} distinct greedy tokens"
        )
        for p in summary["problems"]:
            print(f"     {p}")
        dumps[d] = dict(summary, logits=logits)
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(dumps, f)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
