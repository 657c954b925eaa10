"""Pretrained-model inference speed: lmforge beside llama.cpp (and transformers) on the same GGUF,
on every kernel path this CPU runs.

Same file, same 200-token prompt, 128 greedy tokens, 2 threads; every engine runs one 16-token
forward first, so prefill is timed warm, and prefill is the best of three runs for every engine,
each into an empty KV cache (lmforge: one slot of its engine's cache, as a new request).
Each engine runs in its own process (so peak RSS is its own); a peer that is not installed is
reported as such. Engines:
- lmforge: the kernels this CPU picks (AVX-512 where it has it);
- lmforge-avx2: the AVX2 path forced, as on most laptops: lmforge's AVX2 + FMA + F16C build
  (LMFORGE_KERNELS=avx2), PyTorch's (ATEN_CPU_CAPABILITY=avx2), oneDNN's (ONEDNN_MAX_CPU_ISA=AVX2)
  and MKL's (MKL_ENABLE_INSTRUCTIONS=AVX2);
- lmforge-float: the float32 reference path;
- llama.cpp: llama-cpp-python as built for this CPU (--llama-python);
- llama.cpp-avx2: a llama-cpp-python built without AVX-512 (--llama-avx2-python; see RESULTS.md);
- transformers.
Decode rows also print the weight bytes read per token and the effective GB/s they imply,
beside this machine's measured read bandwidth. lmforge's batched figure is 8 requests that
join the engine at different steps (one every 4 steps) and decode together, in aggregate.

    lmforge pull smollm2-135m-instruct && lmforge pull gemma3-270m
    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install numpy llama-cpp-python==0.3.36
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \\
      -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF" \\
      /tmp/llvenv2/bin/pip install --no-cache-dir llama-cpp-python==0.3.36      # (python -m venv /tmp/llvenv2 first)
    python benchmarks/decode.py --model smollm2-135m-instruct --llama-python /tmp/llvenv/bin/python \\
      --llama-avx2-python /tmp/llvenv2/bin/python --rounds 3
    python benchmarks/decode.py --model gemma3-270m ... (the same flags)
"""

from __future__ import annotations

import argparse
import json
import os
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
if not engine.startswith("llama.cpp"):  # (torch stays out of llama.cpp's process and its RSS)
    import torch
    torch.set_num_threads(2)
if engine.startswith("lmforge"):
    sys.path.insert(0, sys.argv[6])
    from lmforge.api import LM
    from lmforge.engine import Request, SamplingParams
    from lmforge.models import kernels
    lm = LM.load(sys.argv[7], device="cpu", quantize="none" if engine == "lmforge-float" else "auto")
    ids = lm.tokenizer.encode(text, check=False)[:n_prompt]
    out["load_s"] = time.perf_counter() - t0
    out["kernels"] = kernels.chosen_variant() or "off"
    greedy = SamplingParams(temperature=0)
    from lmforge.engine.cache import KVCache
    cache = KVCache(lm.model.config, 1, n_prompt + 8, "cpu")

    def prefill(part):  # into an emptied cache slot, as the engine runs a new prompt
        cache.lengths[0] = 0
        lm.model(torch.tensor([part]), cache=cache.view([0]), last_only=True)

    with torch.inference_mode():
        prefill(ids[:16])  # warm-up, as for every engine
        out["prefill_tok_s"] = best_of(3, lambda: prefill(ids), n_prompt)
    gen = lm.engine.generate(ids, n_new, greedy)
    t = time.perf_counter(); next(gen); t1 = time.perf_counter()
    rest = sum(1 for _ in gen)
    out["decode_tok_s"] = rest / (time.perf_counter() - t1)
    # peak RSS of the single-stream run, as for the peers (the batch below holds 8 KV caches)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the bytes a decoding step reads: every weight once (the tied token table in full, for the
    # output projection), not the embedding lookups
    seen, nbytes = set(), 0
    for name, tensor in list(lm.model.named_parameters()) + list(lm.model.named_buffers()):
        if tensor.data_ptr() in seen or name.startswith("rope_"):
            continue
        seen.add(tensor.data_ptr()); nbytes += tensor.numel() * tensor.element_size()
    out["weight_mb"] = nbytes / 1e6
    if engine != "lmforge-float":  # 8 requests, joining one every 4 steps, decoded together
        all_ids = lm.tokenizer.encode(text, check=False)
        prompts = [all_ids[i:i + n_prompt] for i in range(8)]
        eng = lm.engine
        def batch(n):
            pending = [Request(p, n, greedy) for p in prompts]
            made, step = 0, 0
            while pending or eng.has_work:
                if pending and step % 4 == 0:
                    eng.submit(pending.pop(0))
                made += sum(1 for ev in eng.step() if ev.token is not None)
                step += 1
            return made
        t = time.perf_counter(); n1 = batch(1); first = time.perf_counter() - t   # the prefills alone
        t = time.perf_counter(); made = batch(n_new); total = time.perf_counter() - t
        out["batch8_decode_tok_s"] = (made - n1) / max(1e-9, total - first)
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
elif engine.startswith("llama.cpp"):
    import numpy as np
    from llama_cpp import Llama
    import gguf as _g
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
    try:  # the tensors' bytes (token_embd read in full for a tied output projection)
        out["weight_mb"] = sum(int(t.n_bytes) for t in _g.GGUFReader(gguf).tensors) / 1e6
    except Exception:
        pass
out.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("RESULT" + json.dumps(out))
'''


def read_bandwidth_gbs() -> float:
    """This machine's read bandwidth: summing a 1 GiB float32 array, 2 threads, best of 5."""
    code = ("import time, torch; torch.set_num_threads(2); a = torch.ones(1 << 28); a.sum(); best = 1e9\n"
            "for _ in range(5):\n t = time.perf_counter(); a.sum(); best = min(best, time.perf_counter() - t)\n"
            "print(a.numel() * 4 / best / 1e9)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def run(engine: str, gguf: Path, spec: str, python: str = sys.executable) -> dict | str:
    """spec: how lmforge names the model (a pulled name loads the store's quantized copy)."""
    env = dict(os.environ)
    if engine == "lmforge-avx2":  # every layer held to AVX2: lmforge's kernels, PyTorch's, oneDNN's, MKL's
        env.update(LMFORGE_KERNELS="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                   MKL_ENABLE_INSTRUCTIONS="AVX2")
    proc = subprocess.run([python, "-c", WORKER, engine, str(gguf), str(PROMPT_TOKENS), str(NEW_TOKENS),
                           TEXT, str(ROOT), spec], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return "not installed" if "ModuleNotFoundError" in err else f"failed: {err[:80]}"


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), []))
    shown = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                         "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(shown)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a pulled model's name or a .gguf path")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="a Python with llama-cpp-python installed (it may live in its own venv)")
    ap.add_argument("--llama-avx2-python", default=None,
                    help="a Python with a llama-cpp-python built without AVX-512 (engine llama.cpp-avx2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, alternating, and keep each figure's best "
                         "(a shared VM's speed drifts by 20-40%% from minute to minute)")
    ap.add_argument("--engines", default=None,
                    help="comma-separated subset (default: lmforge, lmforge-avx2, llama.cpp, and "
                         "llama.cpp-avx2 when --llama-avx2-python is given)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lmforge import store

    found = store.find(args.model)
    gguf = found.gguf if found else Path(args.model)
    if not gguf.is_file():
        raise SystemExit(f"{args.model}: not pulled; run: lmforge pull {args.model}")
    spec = args.model if found else str(gguf)
    engines = args.engines.split(",") if args.engines else \
        ["lmforge", "lmforge-avx2", "llama.cpp"] + (["llama.cpp-avx2"] if args.llama_avx2_python else [])
    pythons = {"llama.cpp": args.llama_python, "llama.cpp-avx2": args.llama_avx2_python or args.llama_python}
    results: dict[str, dict | str] = {}
    for _ in range(args.rounds):
        for e in engines:
            r = run(e, gguf, spec, pythons.get(e, sys.executable))
            prev = results.get(e)
            if isinstance(r, dict) and isinstance(prev, dict):  # best of the rounds, figure by figure
                r = {k: ((min if k in ("load_s", "peak_rss_mb") else max)(v, prev[k])
                         if isinstance(v, (int, float)) and k in prev else v) for k, v in r.items()}
            results[e] = r if isinstance(r, dict) or e not in results else results[e]
    bw = read_bandwidth_gbs()
    print(f"\n{args.model}: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, 2 threads, "
          f"best of {args.rounds} round(s)")
    print(f"CPU: {cpu_line()}; measured read bandwidth {bw:.1f} GB/s")
    cols = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "weight_mb", "decode_GB_s")
    print(f"{'engine':16}" + "".join(f"{c:>15}" for c in cols))
    for e, r in results.items():
        if isinstance(r, str):
            print(f"{e:16}{r:>15}")
            continue
        r["decode_GB_s"] = r.get("weight_mb", float("nan")) * r["decode_tok_s"] / 1e3
        print(f"{e:16}" + "".join(f"{r.get(c, float('nan')):>15.1f}" for c in cols))
    for ours, peer in (("lmforge", "llama.cpp"), ("lmforge-avx2", "llama.cpp-avx2"), ("lmforge-avx2", "llama.cpp"),
                       ("lmforge", "transformers")):
        a, b = results.get(ours), results.get(peer)
        if isinstance(a, dict) and isinstance(b, dict):
            line = (f"{ours} / {peer}: decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x, "
                    f"prefill {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x, "
                    f"RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
            if "batch8_decode_tok_s" in a:
                line += f", batched-8 aggregate vs its single stream {a['batch8_decode_tok_s'] / b['decode_tok_s']:.2f}x"
            print(line)
    for e in ("lmforge", "lmforge-avx2"):
        r = results.get(e)
        if isinstance(r, dict) and "batch8_decode_tok_s" in r:
            print(f"{e} batched decode, 8 requests joining at different steps: "
                  f"{r['batch8_decode_tok_s']:.1f} tok/s in aggregate (kernels: {r.get('kernels')})")


if __name__ == "__main__":
    main()
