"""Constrained output: what it costs, what it covers, whether it is always right.

Parts (each prints a table; `all` runs every one):
  cost      greedy decoding of SmolLM2 and Gemma 3 on a nested JSON Schema, constrained and
            unconstrained from the same prompt, alternating in rounds; the mask's own cost per
            step (fill, apply, how many steps needed the mask at all) and compile time, cold and
            cached; beside llama.cpp's grammar sampler on the same schema and prompt (its
            constrained / unconstrained ratio against ours), when --llama-python is given
  coverage  the share of JSONSchemaBench's Github_easy and Glaiveai2K schemas that compile,
            with the reasons for the rest, by count
  maskbench each of maskbench_JME's 100 schemas walks its valid instance token by token
  validity  200 generations (100 schemas, greedy and sampled) by SmolLM2, each validated by
            the jsonschema package; truncations counted apart
  usefulness  66 function-calling requests written for lmforge (benchmarks/data/function_calls.py):
            valid-call rate and argument exact match, constrained vs unconstrained

Reproduce (models pulled with `lmforge pull`; the data under ../shared/data/structured):
    python benchmarks/constrained.py all --llama-python /tmp/llvenv/bin/python
    (llama-cpp-python 0.3.36 in its own venv: see benchmarks/decode.py)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "structured"

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string", "maxLength": 60},
                                   "city": {"type": "string", "maxLength": 40},
                                   "country": {"type": "string", "enum": ["FR", "DE", "US", "JP", "other"]}},
                    "required": ["street", "city", "country"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "object",
                                              "properties": {"skill": {"type": "string", "maxLength": 30},
                                                             "years": {"type": "integer", "minimum": 0,
                                                                       "maximum": 60}},
                                              "required": ["skill", "years"], "additionalProperties": False},
                   "minItems": 1, "maxItems": 4},
    },
    "required": ["name", "age", "email", "address", "skills"],
    "additionalProperties": False,
}
ASK = ("Write a JSON record for this person: Marie Dupont, 34, marie.dupont@example.org, lives at "
       "12 rue des Lilas in Lyon, France. She has 10 years of Python and 3 years of Rust.")


def prompt_for(lm) -> str:
    if lm.tokenizer.chat_template:
        return lm.tokenizer.render_chat([{"role": "user", "content": ASK}])
    return ASK + "\nJSON: "


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


# ---------------------------------------------------------------------------------------- cost
LLAMA = r'''
import json, sys, time
from llama_cpp import Llama, LlamaGrammar
gguf, prompt, schema, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = Llama(model_path=gguf, n_threads=2, n_ctx=1024, verbose=False)
grammar = LlamaGrammar.from_json_schema(schema, verbose=False)
ids = llm.tokenize(prompt.encode(), special=True)
def run(g):
    llm.reset(); made = 0; t0 = None
    for tok in llm.generate(ids, top_k=1, temp=0.0, grammar=g, reset=True):
        if t0 is None:
            t0 = time.perf_counter()   # after the prefill and first token
        else:
            made += 1
        if tok == llm.token_eos() or made >= n:
            break
    return made / (time.perf_counter() - t0), made
out = {}
for r in range(3):
    for key, g in (("free", None), ("grammar", grammar)):
        rate, made = run(g)
        out[key] = max(out.get(key, 0), rate); out[key + "_tokens"] = made
print("JSON" + json.dumps(out))
'''


def part_cost(args) -> None:
    import numpy as np
    import torch

    from lmforge import store
    from lmforge.api import LM
    from lmforge.engine import SamplingParams
    from lmforge.engine.constraint import Spec

    torch.set_num_threads(2)
    rows, mask_rows, llama_rows = [], [], []
    for name in args.models:
        if store.find(name) is None:
            print(f"({name} not pulled: skipped)")
            continue
        lm = LM.load(name)
        ids = lm.tokenizer.encode(prompt_for(lm), check=False)
        greedy = SamplingParams(temperature=0)
        t = time.perf_counter(); vocab = lm.vocabulary; vocab_s = time.perf_counter() - t
        spec = Spec.json_schema(NESTED)
        t = time.perf_counter(); vocab.compile(spec); cold = time.perf_counter() - t
        t = time.perf_counter(); vocab.compile(spec); cached = time.perf_counter() - t
        t = time.perf_counter(); lm.constraint(spec); matcher = time.perf_counter() - t

        def decode(constrained: bool):
            procs = [lm.constraint(spec)] if constrained else []
            gen = lm.engine.generate(ids, args.tokens, greedy, stop_ids=lm.tokenizer.stop_ids if constrained else (),
                                     processors=procs)
            next(gen)  # the prefill and first token are not decode steps
            t0 = time.perf_counter(); n = sum(1 for _ in gen)
            return n / (time.perf_counter() - t0), n, procs

        best = {True: 0.0, False: 0.0}
        for _ in range(args.rounds):
            for c in (False, True):
                rate, n, procs = decode(c)
                best[c] = max(best[c], rate)
                if c:
                    made, decoded = n, procs[0]
        out = lm.tokenizer.decode(
            [t for t in lm.engine.generate(ids, args.tokens, greedy, stop_ids=lm.tokenizer.stop_ids,
                                           processors=[lm.constraint(spec)])
             if t not in lm.tokenizer.stop_ids])
        rows.append([name, f"{best[False]:.1f}", f"{best[True]:.1f}", f"**{best[True] / best[False]:.3f}x**",
                     made + 1, f"{1000 * vocab_s:.0f} ms", f"{1000 * cold:.1f} ms", f"{1000 * cached:.3f} ms",
                     f"{1000 * matcher:.2f} ms"])
        print(f"{name} constrained output: {out}")

        # the mask's own parts, per step, along the constrained output
        cons = lm.constraint(spec)
        V = lm.config.vocab_size
        logits = torch.randn(1, V)
        fills, applies, naive, checks = [], [], [], []
        for tok in lm.tokenizer.encode(out, check=False):
            cons._filled = False
            t = time.perf_counter(); cons._mask_words(); fills.append(time.perf_counter() - t)
            t = time.perf_counter(); cons.allows(tok); checks.append(time.perf_counter() - t)
            t = time.perf_counter(); cons(ids, logits); applies.append(time.perf_counter() - t)
            bits = torch.from_numpy(cons._words.view(np.int32))[None]
            t = time.perf_counter()  # the naive way: expand every bit with torch ops
            expanded = (bits.repeat_interleave(32, dim=1) >> torch.arange(32, dtype=torch.int32).repeat(bits.shape[1])) & 1
            logits.masked_fill(expanded[:, :V] == 0, float("-inf"))
            naive.append(time.perf_counter() - t)
            cons.accept(tok)
        ms = lambda xs: f"{1000 * statistics.median(xs):.3f}"  # noqa: E731
        step_ms = 1000 / best[False]
        mask_rows.append([name, f"{V:,}", ms(fills), ms(checks), ms(applies), ms(naive),
                          f"{decoded.masked_steps}/{made + 1}", f"{step_ms:.1f}"])

        if args.llama_python:
            gguf = store.find(name).gguf
            res = subprocess.run([args.llama_python, "-c", LLAMA, str(gguf), prompt_for(lm), json.dumps(NESTED),
                                  str(args.tokens)], capture_output=True, text=True, timeout=1800)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("JSON")), None)
            if line is None:
                print(f"llama.cpp failed: {res.stderr[-500:]}")
            else:
                r = json.loads(line[4:])
                ours = best[True] / best[False]
                theirs = r["grammar"] / r["free"]
                llama_rows.append([name, f"{r['free']:.1f}", f"{r['grammar']:.1f}", f"{theirs:.3f}x",
                                   f"{ours:.3f}x", f"**{ours / theirs:.2f}x**"])
    table("Decode speed, greedy, 2 threads: unconstrained vs constrained by the nested schema",
          ["model", "free tok/s", "constrained tok/s", "ratio (>= 0.95)", "JSON tokens", "tokenizer for the engine",
           "compile cold", "compile cached", "new matcher"], rows)
    table("The mask per decode step (medians along the constrained output)",
          ["model", "vocab", "fill ms", "check argmax ms", "apply ms (ours)", "apply ms (naive torch)",
           "steps that needed the mask / steps (greedy run)", "decode step ms"], mask_rows)
    if llama_rows:
        table("Beside llama.cpp's grammar sampler (same GGUF, schema, prompt; greedy; best of 3)",
              ["model", "llama.cpp free tok/s", "llama.cpp grammar tok/s", "llama.cpp ratio", "lmforge ratio",
               "lmforge ratio / llama.cpp ratio"], llama_rows)


# ------------------------------------------------------------------------------------ coverage
def part_coverage(args) -> None:
    from lmforge.api import LM
    from lmforge.engine.constraint import Spec
    from lmforge.errors import LMForgeError

    lm = LM.load("smollm2-135m-instruct")
    rows = []
    for f in ("schemas_Github_easy.jsonl", "schemas_Glaiveai2K.jsonl"):
        schemas = [json.loads(line)["json_schema"] for line in open(DATA / f)]
        ok, why = 0, collections.Counter()
        for s in schemas:
            try:
                lm.vocabulary.compile(Spec.json_schema(s))
                ok += 1
            except LMForgeError as e:
                msg = str(e)
                why[msg.split(" at #")[0][:80] if "keyword" in msg else msg[:80]] += 1
        rows.append([f, f"{ok}/{len(schemas)}", f"**{ok / len(schemas):.1%}**",
                     "; ".join(f"{n} x {k}" for k, n in why.most_common(6))])
    table("JSON Schema coverage (JSONSchemaBench)", ["file", "compiled", "share", "most common refusals"], rows)


# ----------------------------------------------------------------------------------- maskbench
def part_maskbench(args) -> None:
    from lmforge.api import LM
    from lmforge.engine.constraint import Spec
    from lmforge.errors import LMForgeError

    rows = []
    for name, closed in [(m, c) for m in args.models for c in (False, True)]:
        try:
            lm = LM.load(name)
        except LMForgeError:
            continue
        items = [json.loads(line) for line in open(DATA / "maskbench_JME.jsonl")]
        accepted, refused, failed = 0, 0, []
        for it in items:
            try:
                spec = Spec.json_schema(it["schema"], closed=closed)
                lm.vocabulary.compile(spec)
            except LMForgeError:
                refused += 1
                continue
            for test in it["tests"]:
                if not test.get("valid", True):
                    continue
                cons = lm.constraint(spec)
                text = json.dumps(test["data"], ensure_ascii=False)  # (the compact form the grammar writes)
                try:
                    for tok in lm.tokenizer.encode(text, check=False):
                        cons.accept(tok)
                    ok = cons.complete
                except LMForgeError:
                    ok = False
                accepted += ok
                if not ok:
                    failed.append(it["file"])
                break
        n = len(items) - refused
        rows.append([name, "closed (the default)" if closed else "as given (closed=False)", f"{accepted}/{n}",
                     f"**{accepted / max(1, n):.1%}**", refused, ", ".join(failed[:5])])
    table("maskbench_JME: valid instances walked token by token",
          ["model", "objects", "accepted", "share", "schemas refused", "failures"], rows)


# ------------------------------------------------------------------------------------ validity
def part_validity(args) -> None:
    import jsonschema

    from lmforge.api import LM
    from lmforge.engine.constraint import Spec
    from lmforge.errors import LMForgeError, TruncatedOutput

    lm = LM.load("smollm2-135m-instruct")
    items = [json.loads(line) for line in open(DATA / "maskbench_JME.jsonl")]
    valid = invalid = truncated = refused = 0
    t0 = time.perf_counter()
    for it in items:
        try:
            spec = Spec.json_schema(it["schema"])
            lm.vocabulary.compile(spec)
        except LMForgeError:
            refused += 2
            continue
        msgs = [{"role": "user", "content": f"Make up one example of a {it['schema'].get('title', 'record')}."}]
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 1}):
            try:
                out = "".join(lm.chat(msgs, args.max_tokens, spec=spec, **sampling))
            except TruncatedOutput:
                truncated += 1
                continue
            try:
                jsonschema.validate(json.loads(out), it["schema"])
                valid += 1
            except (jsonschema.ValidationError, json.JSONDecodeError) as e:
                invalid += 1
                print(f"INVALID {it['file']}: {str(e)[:200]}\n  {out[:300]}")
    done = valid + invalid
    table(f"Generations validated by jsonschema (SmolLM2, {args.max_tokens} tokens at most, "
          f"{time.perf_counter() - t0:.0f} s)",
          ["generations", "valid", "invalid", "truncated (reported as errors)", "refused (schema)",
           "valid share of the complete ones"],
          [[done + truncated + refused, valid, invalid, truncated, refused, f"**{valid / max(1, done):.1%}**"]])


# ---------------------------------------------------------------------------------- usefulness
def _first_json(text: str):
    """The first JSON object in free text (how an unconstrained reply is read), or None."""
    start = text.find("{")
    while start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def part_usefulness(args) -> None:
    import jsonschema

    sys.path.insert(0, str(ROOT / "benchmarks" / "data"))
    from function_calls import CASES, TOOLS

    from lmforge import store
    from lmforge.api import LM
    from lmforge.errors import TruncatedOutput
    from lmforge.engine import SamplingParams
    from lmforge.tasks.structured import chat_with_tools, prompt_ids, tool_messages

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    described = [(t["function"]["name"], t["function"]["parameters"], t["function"]["description"]) for t in TOOLS]
    rows = []
    for name in args.models:
        if store.find(name) is None:
            continue
        lm = LM.load(name)
        t0 = time.perf_counter()
        score = {"constrained": [0, 0, 0, 0], "unconstrained": [0, 0, 0, 0]}  # valid, right name, exact, truncated
        for request, want_name, want_args in CASES:
            msgs = [{"role": "user", "content": request}]
            try:
                msg = chat_with_tools(lm, msgs, TOOLS, "required", max_new_tokens=160)
                fn = msg["tool_calls"][0]["function"]
                got = {"name": fn["name"], "arguments": json.loads(fn["arguments"])}
            except TruncatedOutput:
                got = None
                score["constrained"][3] += 1
            ids = prompt_ids(lm, tool_messages(msgs, described))
            free = lm.tokenizer.decode(list(lm.engine.generate(ids, 160, stop_ids=lm.tokenizer.stop_ids,
                                                               params=SamplingParams(temperature=0))))
            parsed = _first_json(free)
            for key, call in (("constrained", got), ("unconstrained", parsed)):
                if not isinstance(call, dict) or call.get("name") not in schemas or not isinstance(call.get("arguments"), dict):
                    continue
                try:
                    jsonschema.validate(call["arguments"], schemas[call["name"]])
                except jsonschema.ValidationError:
                    continue
                s_ = score[key]
                s_[0] += 1
                s_[1] += call["name"] == want_name
                s_[2] += call["name"] == want_name and call["arguments"] == want_args
        n = len(CASES)
        for key, (valid, right, exact, trunc) in score.items():
            rows.append([name, key, f"{valid / n:.1%}", f"{right / n:.1%}", f"**{exact / n:.1%}**", trunc])
        print(f"({name}: {time.perf_counter() - t0:.0f} s)")
    table(f"Function calling: {len(CASES)} requests written for lmforge (benchmarks/data/function_calls.py), greedy",
          ["model", "decoding", "valid call", "right function", "exact arguments", "truncated"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["cost", "coverage", "maskbench", "validity", "usefulness", "all"])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--tokens", type=int, default=96, help="decode steps per timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256, help="(validity) longest output")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python, for the grammar comparison")
    args = ap.parse_args()
    import platform

    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0] if os.path.exists("/proc/cpuinfo") else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{time.strftime('%Y-%m-%d')} | {cpu} | {os.cpu_count()} cores | "
          + " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile") if f" {f}" in flags))
    parts = ["cost", "coverage", "maskbench", "validity", "usefulness"] if args.part == "all" else [args.part]
    for p in parts:
        globals()[f"part_{p}"](args)


if __name__ == "__main__":
    main()
