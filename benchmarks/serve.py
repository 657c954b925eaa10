"""`lmforge serve` beside llama.cpp's `llama-server`, under the same load, in the same run.

Each server is started on 127.0.0.1 with as many slots as there are clients (llama-server:
`-np C`, continuous batching on, 2 threads; lmforge: `--parallel C`), then C clients each send
chat requests back to back, streaming: a distinct ~200-token prompt (a number first, so no
prompt cache helps either server), 128 output tokens (`ignore_eos`, greedy). A level ends after
its request count or its time bound, whichever first. Reported per server and level: aggregate
output tok/s, per-stream tok/s (decode only: after the first token), p50/p95 time to first token
and p50/p95 latency, and lmforge's ratios to llama-server (per-stream: the median request). `--solo` also times lmforge's own
`LM.generate` on the same prompt in-process, so the 1-client row shows what the server costs.

    lmforge pull smollm2-135m-instruct && lmforge pull gemma3-270m
    # llama-server, from the llama.cpp sources vendored in llama-cpp-python's sdist:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build-native -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON
    cmake --build build-native --target llama-server -j2
    cmake -B build-avx2 -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF \\
      -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
    cmake --build build-avx2 --target llama-server -j2
    python benchmarks/serve.py --model smollm2-135m-instruct --llama-server .../build-native/bin/llama-server \\
      --llama-server-avx2 .../build-avx2/bin/llama-server --solo
    python benchmarks/serve.py --soak --model smollm2-135m-instruct      # 2,000 requests / 10 min, 32 clients

The soak run sends 2,000 requests from 32 clients over at most 10 minutes to lmforge alone: a
share disconnect after a few chunks, a share send invalid bodies. It reports every status seen,
any 5xx other than 503, /metrics' busy slots after the run, and the server's resident memory
after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the history of computing is a story of people who turned ideas about numbers logic and machines into "
         "tools that changed how everyone works and lives ").split()


def prompt(i: int, n_words: int = 150) -> str:
    rng = random.Random(i)
    body = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return f"Request {i}. Continue this text at length: {body}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model: str, clients: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if kind.startswith("lmforge"):
        if kind == "lmforge-avx2":  # every layer held to AVX2: lmforge's kernels, PyTorch's, oneDNN's, MKL's
            env.update(LMFORGE_KERNELS="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                       MKL_ENABLE_INSTRUCTIONS="AVX2")
        cmd = [sys.executable, "-m", "lmforge", "serve", model, "--parallel", str(clients), "--embed-model", "none",
               "--port", str(port), "--max-queue", "4096"]
    else:
        from lmforge import store

        gguf = store.find(model).gguf
        binary = args.llama_server if kind == "llama-server" else args.llama_server_avx2
        cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(clients),
               "-c", str(clients * 512), "-t", "2", "-tb", "2", "--cont-batching", "--no-webui", "-lv", "0"]
    log = open(f"/tmp/serve-bench-{kind}-{clients}.log", "w")  # (a pipe nobody reads would fill and stall it)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import httpx2 as httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except Exception:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{kind} did not start")


async def one_request(client, url: str, model: str, i: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, n_chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    n_chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    n = usage["completion_tokens"] if usage else n_chunks
    return {"status": 200, "ttft": ttft or total, "latency": total, "tokens": n}


async def load(url: str, model: str, clients: int, requests: int, max_time: float, max_tokens: int) -> dict:
    import httpx2 as httpx

    results, counter = [], iter(range(10**9))
    deadline = time.perf_counter() + max_time
    # a new connection per request, for both servers: a kept-alive connection that the server
    # closes between requests would otherwise show up as a failed request
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)) \
            as client:
        # warm-up: one request, not counted
        await one_request(client, url, model, -1, 8)
        t0 = time.perf_counter()

        async def worker():
            while time.perf_counter() < deadline:
                i = next(counter)
                if i >= requests:
                    return
                try:
                    results.append(await one_request(client, url, model, i, max_tokens))
                except httpx.HTTPError as e:  # (a server that drops the connection: counted, not fatal)
                    results.append({"status": -1, "error": str(e)})

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"requests": len(ok), "errors": len(results) - len(ok), "agg": sum(r["tokens"] for r in ok) / wall,
            "stream": statistics.median(max(r["tokens"] - 1, 1) / max(r["latency"] - r["ttft"], 1e-6) for r in ok),
            "first_error": next((r.get("error") or r["status"] for r in results if r["status"] != 200), None),
            "ttft50": q([r["ttft"] for r in ok], 50), "ttft95": q([r["ttft"] for r in ok], 95),
            "lat50": q([r["latency"] for r in ok], 50), "lat95": q([r["latency"] for r in ok], 95)}


def solo_speed(model: str, max_tokens: int) -> float:
    """lmforge's own generate on one request, in this process (what the server adds nothing to)."""
    sys.path.insert(0, str(ROOT))
    from lmforge.api import LM
    from lmforge.tasks.structured import prompt_ids

    lm = LM.load(model)
    ids = prompt_ids(lm, [{"role": "user", "content": prompt(10**6)}])  # (as the server renders it)
    speeds = []
    for _ in range(3):
        req = lm.request(ids, max_tokens, temperature=0)
        req.stop_ids = ()
        t_first = None
        n = 0
        for ev in lm.engine.run([req]):
            if ev.token is not None:
                n += 1
                if t_first is None:
                    t_first = time.perf_counter()
        speeds.append((n - 1) / (time.perf_counter() - t_first))
    return statistics.median(speeds)


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    keep = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                        "amx_tile") if f in flags]
    return f"{name} ({os.cpu_count()} cores), flags: {' '.join(keep)}"


def benchmark(args) -> None:
    kinds = ["lmforge", "lmforge-avx2"] + (["llama-server"] if args.llama_server else []) + \
        (["llama-server-avx2"] if args.llama_server_avx2 else [])
    levels = [int(c) for c in args.clients.split(",")]
    print(f"# serve benchmark: {args.model}, {time.strftime('%Y-%m-%d')}, {cpu_line()}")
    print(f"# prompt ~200 tokens, {args.max_tokens} output tokens (ignore_eos, greedy), streaming")
    if args.solo:
        print(f"# lmforge LM generate alone (decode tok/s): {solo_speed(args.model, args.max_tokens):.1f}")
    table = {}
    for c in levels:
        for kind in kinds:
            proc, url = start(kind, args.model, c, args)
            try:
                n = max(args.requests_per_client * c, 6)
                table[(kind, c)] = r = asyncio.run(load(url, args.model, c, n, args.max_time, args.max_tokens))
            finally:
                proc.terminate()
                proc.wait(10)
            print(f"{kind:18} clients={c:2}  agg {r['agg']:6.1f} tok/s  stream {r['stream']:5.1f} tok/s  "
                  f"ttft p50 {r['ttft50']:6.2f} s p95 {r['ttft95']:6.2f} s  latency p50 {r['lat50']:6.2f} s "
                  f"p95 {r['lat95']:6.2f} s  ({r['requests']} requests, {r['errors']} errors"
                  + (f": {r['first_error']}" if r['errors'] else "") + ")", flush=True)
    print("\n| server | clients | aggregate tok/s | per-stream tok/s | TTFT p50 / p95 (s) | latency p50 / p95 (s) |"
          " agg vs llama-server | TTFT p95 vs llama-server |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, c), r in table.items():
        peer = table.get(("llama-server-avx2" if kind.endswith("avx2") else "llama-server", c))
        ratio = f"{r['agg'] / peer['agg']:.2f}x" if peer and not kind.startswith("llama") else ""
        tt = f"{r['ttft95'] / peer['ttft95']:.2f}x" if peer and not kind.startswith("llama") else ""
        print(f"| {kind} | {c} | {r['agg']:.1f} | {r['stream']:.1f} | {r['ttft50']:.2f} / {r['ttft95']:.2f} | "
              f"{r['lat50']:.2f} / {r['lat95']:.2f} | {ratio} | {tt} |")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(args) -> None:
    import httpx2 as httpx

    proc, url = start("lmforge", args.model, 8, args)
    statuses: dict[int, int] = {}
    rss = []
    try:
        async def run():
            counter = iter(range(args.soak_requests))
            deadline = time.perf_counter() + args.soak_time
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40)) as client:
                async def worker(w):
                    rng = random.Random(w)
                    for i in counter:
                        if time.perf_counter() > deadline:
                            return
                        kind = rng.random()
                        try:
                            if kind < 0.1:  # an invalid body
                                r = await client.post(url + "/v1/chat/completions",
                                                      json={"model": args.model, "messages": "nope"}, timeout=60)
                                code = r.status_code
                            elif kind < 0.25:  # a client that leaves after a few chunks
                                body = {"model": args.model, "stream": True, "max_tokens": 64, "temperature": 0.7,
                                        "messages": [{"role": "user", "content": prompt(i, 30)}]}
                                async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                                         timeout=120) as r:
                                    code = r.status_code
                                    k = 0
                                    async for _ in r.aiter_lines():
                                        k += 1
                                        if k > 6:
                                            break
                            else:
                                body = {"model": args.model, "max_tokens": rng.choice([8, 16, 32]),
                                        "temperature": 0.7, "stream": rng.random() < 0.5,
                                        "messages": [{"role": "user", "content": prompt(i, 30)}]}
                                r = await client.post(url + "/v1/chat/completions", json=body, timeout=300)
                                code = r.status_code
                        except httpx.HTTPError:
                            code = -1
                        statuses[code] = statuses.get(code, 0) + 1
                        if sum(statuses.values()) % 200 == 0:
                            rss.append(rss_mb(proc.pid))
                await asyncio.gather(*(worker(w) for w in range(32)))

        t0 = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        metrics = httpx.get(url + "/metrics").text
        busy = sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("lmforge_busy_slots{"))
        print(f"# soak: {args.model}, {time.strftime('%Y-%m-%d')}, {cpu_line()}")
        print(f"requests {sum(statuses.values())} in {wall:.0f} s; statuses {dict(sorted(statuses.items()))}")
        bad = {k: v for k, v in statuses.items() if k >= 500 and k != 503 or k == -1}
        print(f"5xx other than 503 (or broken connections): {bad or 'none'}; busy slots after: {busy:.0f}")
        print(f"resident memory (MB) every 200 requests: {', '.join(f'{x:.0f}' for x in rss)}")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--llama-server", help="llama-server built for this CPU")
    ap.add_argument("--llama-server-avx2", help="llama-server built without AVX-512")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-time", type=float, default=120, help="seconds per level at most")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--solo", action="store_true", help="also time LM.generate alone, in this process")
    ap.add_argument("--soak", action="store_true")
    ap.add_argument("--soak-requests", type=int, default=2000)
    ap.add_argument("--soak-time", type=float, default=600)
    args = ap.parse_args()
    soak(args) if args.soak else benchmark(args)


if __name__ == "__main__":
    main()
