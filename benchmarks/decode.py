"""Pretrained-model inference speed: lmforge beside llama.cpp and transformers on the same GGUF.

Same file, same 200-token prompt, 128 greedy tokens, 2 threads; every engine runs one 16-token
forward first, so prefill is timed warm, and prefill is the best of three runs for every engine. Each engine runs in its own
process (so peak RSS is its own); a peer that is not installed is reported as such.

    lmforge pull smollm2-135m-instruct
    python benchmarks/decode.py                           # smollm2-135m-instruct
    python benchmarks/decode.py --model gemma3-270m
    pip install llama-cpp-python transformers             # the peers (a long source build for the first)
    python benchmarks/decode.py --llama-python /path/to/venv/bin/python   # llama.cpp from another venv
    python benchmarks/decode.py --model gemma3-270m --engines lmforge,llama.cpp --rounds 3
    python benchmarks/decode.py --engines lmforge,lmforge-compile,llama.cpp   # also torch.compile'd (load_s
                                                                            # then includes compiling)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, NEW_TOKENS = 200, 128
TEXT = ("The history of computing is a story of people who turned ideas about numbers, logic and "
        "machines into tools that changed how everyone works and lives. ") * 20

WORKER = r'''
import json, resource, sys, time
engine, gguf, n_prompt, n_new, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
out = {}
def best_of(n, f, items):  # the best of n timed runs, as items per second (the same rule for every engine)
    times = []
    for _ in range(n):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return items / min(times)
t0 = time.perf_counter()
if engine != "llama.cpp":  # (torch stays out of llama.cpp's process and its RSS)
    import torch
    torch.set_num_threads(2)
if engine.startswith("lmforge"):
    sys.path.insert(0, sys.argv[6])
    from lmforge.api import LM
    from lmforge.engine import SamplingParams
    lm = LM.load(sys.argv[7], device="cpu", quantize="none" if engine == "lmforge-float" else "auto",
                 compile=engine == "lmforge-compile")
    ids = lm.tokenizer.encode(text, check=False)[:n_prompt]
    fwd = lm.engine._forward
    if engine == "lmforge-compile":  # compiling (prefill and decode graphs) counts as loading
        list(lm.engine.generate(ids, 4, SamplingParams(temperature=0)))
    out["load_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        fwd(torch.tensor([ids[:16]]), last_only=True)  # warm-up, as for every engine
        out["prefill_tok_s"] = best_of(3, lambda: fwd(torch.tensor([ids]), last_only=True), n_prompt)
    gen = lm.engine.generate(ids, n_new, SamplingParams(temperature=0))
    t = time.perf_counter(); next(gen); t1 = time.perf_counter()
    rest = sum(1 for _ in gen)
    out["decode_tok_s"] = rest / (time.perf_counter() - t1)
    # peak RSS of the single-stream run, as for the peers (the batch below holds 8 KV caches)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if engine == "lmforge":  # 8 different prompts decoded together; prefill timed apart and subtracted
        all_ids = lm.tokenizer.encode(text, check=False)
        prompts = [all_ids[i:i + n_prompt] for i in range(8)]
        greedy = SamplingParams(temperature=0)
        t = time.perf_counter(); lm.engine.generate_batch(prompts, 1, greedy); first = time.perf_counter() - t
        t = time.perf_counter(); outs = lm.engine.generate_batch(prompts, n_new, greedy); total = time.perf_counter() - t
        out["batch8_decode_tok_s"] = (sum(map(len, outs)) - 8) / (total - first)
elif engine == "transformers":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import os
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    out["load_s"] = time.perf_counter() - t0
    ids = torch.tensor([tok(text)["input_ids"][:n_prompt]])
    with torch.inference_mode():
        model(ids[:, :16])  # warm-up
        out["prefill_tok_s"] = best_of(3, lambda: model(ids), n_prompt)
        t = time.perf_counter(); model.generate(ids, max_new_tokens=1, do_sample=False); first = time.perf_counter() - t
        t = time.perf_counter(); model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        out["decode_tok_s"] = (n_new - 1) / (time.perf_counter() - t - first)
elif engine == "llama.cpp":
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_threads=2, n_ctx=1024, verbose=False)
    out["load_s"] = time.perf_counter() - t0
    ids = llm.tokenize(text.encode())[:n_prompt]
    llm.eval(ids[:16]); llm.reset()  # warm-up
    def prefill():
        llm.reset(); llm.eval(ids)
    out["prefill_tok_s"] = best_of(3, prefill, n_prompt)
    t = time.perf_counter(); n = 0
    for tok_id in llm.generate(ids, top_k=1, reset=True):
        n += 1
        if n == 1: t1 = time.perf_counter()
        if n >= n_new: break
    out["decode_tok_s"] = (n - 1) / (time.perf_counter() - t1)
out.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("RESULT" + json.dumps(out))
'''


def run(engine: str, gguf: Path, spec: str, python: str = sys.executable) -> dict | str:
    """spec: how lmforge names the model (a pulled name loads the store's quantized copy)."""
    proc = subprocess.run([python, "-c", WORKER, engine, str(gguf), str(PROMPT_TOKENS), str(NEW_TOKENS),
                           TEXT, str(ROOT), spec], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return "not installed" if "ModuleNotFoundError" in err else f"failed: {err[:80]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a pulled model's name or a .gguf path")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python with llama-cpp-python installed (it may live in its own venv)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, alternating, and keep each figure's best "
                         "(a shared VM's speed drifts by 20-40%% from minute to minute)")
    ap.add_argument("--engines", default="lmforge,lmforge-float,llama.cpp,transformers",
                    help="comma-separated subset of the engines to run")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lmforge import store

    found = store.find(args.model)
    gguf = found.gguf if found else Path(args.model)
    if not gguf.is_file():
        raise SystemExit(f"{args.model}: not pulled; run: lmforge pull {args.model}")
    spec = args.model if found else str(gguf)
    engines = args.engines.split(",")
    results: dict[str, dict | str] = {}
    for _ in range(args.rounds):
        for e in engines:
            r = run(e, gguf, spec, args.llama_python if e == "llama.cpp" else sys.executable)
            prev = results.get(e)
            if isinstance(r, dict) and isinstance(prev, dict):  # best of the rounds, figure by figure
                r = {k: (min if k in ("load_s", "peak_rss_mb") else max)(v, prev[k]) for k, v in r.items()}
            results[e] = r if isinstance(r, dict) or e not in results else results[e]
    print(f"\n{args.model}: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, 2 threads, "
          f"best of {args.rounds} round(s)")
    cols = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")
    print("lmforge = quantized CPU path (GGUF 4-bit blocks as int4, the rest int8); "
          "lmforge-float = float32 reference path")
    print(f"{'engine':14}" + "".join(f"{c:>15}" for c in cols))
    for e, r in results.items():
        if isinstance(r, str):
            print(f"{e:14}{r:>15}")
        else:
            print(f"{e:14}" + "".join(f"{r[c]:>15.1f}" for c in cols))
    ours = results.get("lmforge")
    if isinstance(ours, dict):
        print(f"lmforge batched decode, 8 prompts: {ours['batch8_decode_tok_s']:.1f} tok/s in aggregate")
    for peer in ("llama.cpp", "transformers"):
        r = results.get(peer)
        if isinstance(ours, dict) and isinstance(r, dict):
            print(f"lmforge / {peer}: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                  f"prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x, "
                  f"RSS {ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x, batched-8 aggregate vs its single stream "
                  f"{ours['batch8_decode_tok_s'] / r['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
