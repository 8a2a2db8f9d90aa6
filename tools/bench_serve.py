#!/usr/bin/env python3
"""Benchmark `bitnet serve` and llama.cpp's `llama-server` side by side in one run: the same
GGUF, the same prompts (as token ids, so both see the same tokens), the same concurrency,
streamed greedy completions of a fixed length (`ignore_eos`).

Figures for each server and concurrency: TTFT p50/p99, inter-token latency p50/p99 (between
streamed chunks) and output tokens/s (all tokens of the level over its wall time).

    python3 tools/bench_serve.py -m model.gguf [--llama-server PATH] [-t 2] \\
        [--concurrency 1,4,16,64] [--max-tokens 64] [--prompt-tokens 96]

Without --llama-server only `bitnet serve` is measured. llama-server is not built by this
project; build it from the llama.cpp that the PyPI `llama-cpp-python` source bundles:

    pip download --no-binary :all: --no-deps llama-cpp-python   # the sdist
    tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF \\
        -DBUILD_SHARED_LIBS=OFF && cmake --build build --target llama-server -j

For each concurrency level both servers are started with a slot per client, and the level is
measured on one, then the other. Each server gets the threads given,
--ctx-size tokens per request (llama-server: -c ctx×slots split over -np slots), an f16 KV
cache on both sides, and one warm-up request. Speed is printed, never asserted.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def start_bitnet(args, slots):
    port = free_port()
    cmd = [args.bitnet, "serve", "-m", args.model, "--port", str(port), "-t", str(args.threads),
           "--parallel", str(slots), "--max-queue", str(4 * slots), "-c", str(args.ctx_size),
           "--kv-type", "f16", "-b", str(args.batch), "--device", args.device]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_llama(args, slots):
    port = free_port()
    cmd = [args.llama_server, "-m", args.model, "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "-np", str(slots), "-c", str(args.ctx_size * slots),
           "-ctk", "f16", "-ctv", "f16", "-b", str(args.batch), "-ub", str(args.batch),
           "--no-webui", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def one_request(url, prompt, max_tokens):
    """Streams one completion; returns (ttft, [inter-chunk gaps], tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, last, gaps, chunks = None, None, [], 0
    with urllib.request.urlopen(req, timeout=1200) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            # A token's chunk, whether or not its text is empty (a random model's tokens can
            # be pieces of characters); not the final chunk with only the finish reason.
            if not c.get("choices") or (c["choices"][0].get("finish_reason") and not c["choices"][0].get("text")):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
            chunks += 1
    return first, gaps, max_tokens


def level(url, prompts, concurrency, per_client, max_tokens):
    results, lock = [], threading.Lock()
    jobs = list(range(concurrency * per_client))

    def client(i):
        for k in range(per_client):
            r = one_request(url, prompts[(i * per_client + k) % len(prompts)], max_tokens)
            with lock:
                results.append(r)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    ttft = sorted(r[0] for r in results if r[0] is not None)
    gaps = sorted(g for r in results for g in r[1])
    tokens = sum(r[2] for r in results)
    assert len(results) == len(jobs)
    return {
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
        "tok_s": tokens / wall, "requests": len(results), "wall_s": wall,
    }


def pct(xs, p):
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def prompts_as_ids(url, n, length, seed=1):
    """`n` prompts of about `length` tokens, as ids from bitnet serve's tokenizer (both
    servers read the same file's vocabulary)."""
    rng = random.Random(seed)
    words = ("the little fox ran over hills and rivers while the old king watched from his "
             "tower counting stars and telling stories about dragons ships gardens rain").split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(length))
        ids = post(url + "/tokenize", {"content": text, "add_special": True})["tokens"]
        out.append(ids[:length])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--bitnet", default="target/release/bitnet")
    ap.add_argument("--llama-server")
    ap.add_argument("--device", default="cpu", help="bitnet serve's --device (cpu, cuda)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--ctx-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per client (default: 2 below concurrency 16, else 1)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = [("bitnet serve", start_bitnet)]
    if args.llama_server:
        servers.append(("llama-server", start_llama))
    else:
        print("llama-server not given (--llama-server): measuring bitnet serve alone", file=sys.stderr)
    table = {}
    prompts = None
    # For each level both servers start with a slot per client (what one would tune for that
    # load: llama-server's attention spans its slots' whole cache, so idle slots cost it),
    # then the level runs on one, then the other, so that a busy moment of the machine falls
    # on both alike.
    for c in levels:
        running = []
        try:
            for name, start in servers:
                proc, url = start(args, c)
                running.append((name, proc, url))
                wait_ready(url, proc)
            if prompts is None:
                prompts = prompts_as_ids(running[0][2], 64, args.prompt_tokens)
            for _, _, url in running:
                one_request(url, prompts[-1], 8)  # warm-up
            per = args.requests or (2 if c < 16 else 1)
            for name, _, url in running:
                r = level(url, prompts, c, per, args.max_tokens)
                table[(name, c)] = r
                print(f"{name:13} c={c:<3} TTFT p50 {r['ttft_p50']*1e3:8.1f} ms  p99 {r['ttft_p99']*1e3:8.1f} ms"
                      f"  ITL p50 {r['itl_p50']*1e3:7.1f} ms  p99 {r['itl_p99']*1e3:7.1f} ms"
                      f"  {r['tok_s']:7.1f} tok/s  ({r['requests']} requests, {r['wall_s']:.1f} s)", flush=True)
        finally:
            for _, proc, _ in running:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print()
    print(f"model {os.path.basename(args.model)}, {args.threads} threads, prompts of {args.prompt_tokens} "
          f"tokens, {args.max_tokens} generated each")
    print("| concurrency | server | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | output tok/s |")
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        for name, _ in servers:
            r = table[(name, c)]
            print(f"| {c} | {name} | {r['ttft_p50']*1e3:.0f} | {r['ttft_p99']*1e3:.0f} | {r['itl_p50']*1e3:.1f} "
                  f"| {r['itl_p99']*1e3:.1f} | {r['tok_s']:.1f} |")
        if len(servers) == 2:
            a, b = table[("bitnet serve", c)], table[("llama-server", c)]
            print(f"| {c} | ratio ours/theirs | {a['ttft_p50']/b['ttft_p50']:.2f} | {a['ttft_p99']/b['ttft_p99']:.2f} "
                  f"| {a['itl_p50']/b['itl_p50']:.2f} | {a['itl_p99']/b['itl_p99']:.2f} | {a['tok_s']/b['tok_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]}@{k[1]}": v for k, v in table.items()}, f, indent=1)


if __name__ == "__main__":
    main()
