#!/usr/bin/env python3
"""Benchmark bitnet-inference and llama.cpp on the same GGUF, in the same run, and print
our/their ratios.

llama.cpp is driven through the PyPI package `llama-cpp-python` (which builds the llama.cpp it
bundles; `pip install llama-cpp-python`, about ten minutes on two cores). The llama.cpp side
mirrors llama-bench: pp = one prompt of N random tokens evaluated in one batch, tg = N tokens
generated one at a time, each repeated R times after a warm-up, tokens/s mean ± stdev.

    python3 tools/bench_vs_llama_cpp.py -m model.gguf -t 2 -p 512 -n 128 -r 3

Make a model with no download: `bitnet dummy -o dummy.gguf --type tq2_0` (2B-4T shapes).
Note: TQ1_0/TQ2_0 files run in llama.cpp with Q8_K activation blocks; ours with per-token int8
(the BitNet arithmetic); speed is comparable, logits differ slightly.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time


def bench_llama_cpp(model, threads, n_prompt, n_gen, reps, n_batch):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=max(n_prompt, n_gen) + 16, n_batch=n_batch,
                          n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    rng = random.Random(1)
    results = {}

    def run_pp():
        toks = [rng.randrange(vocab) for _ in range(n_prompt)]
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        llm.eval(toks)
        return n_prompt / (time.perf_counter() - t)

    def run_tg():
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([rng.randrange(vocab)])
        return n_gen / (time.perf_counter() - t)

    for name, fn, n in (("pp", run_pp, n_prompt), ("tg", run_tg, n_gen)):
        if n <= 0:
            continue
        fn()  # warm-up
        samples = [fn() for _ in range(reps)]
        results[f"{name}{n}"] = (statistics.mean(samples), statistics.stdev(samples) if reps > 1 else 0.0)
    return results


def bench_ours(bitnet, model, threads, n_prompt, n_gen, reps, n_batch):
    out = subprocess.run([bitnet, "bench", "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                          "-r", str(reps), "-b", str(n_batch), "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    res = {}
    for r in rows:
        key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        res[key] = (r["avg_ts"], r["stddev_ts"])
    return res, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-b", "--batch-size", type=int, default=512)
    ap.add_argument("--bitnet", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "bitnet"))
    a = ap.parse_args()
    ours, rows = bench_ours(a.bitnet, a.model, a.threads, a.n_prompt, a.n_gen, a.repetitions, a.batch_size)
    theirs = bench_llama_cpp(a.model, a.threads, a.n_prompt, a.n_gen, a.repetitions, a.batch_size)
    kernel = rows[0]["kernel"] if rows else "?"
    print(f"model {a.model}, {a.threads} threads, our kernel {kernel}")
    print("| test | bitnet-inference t/s | llama.cpp t/s | ours/theirs |")
    print("|---|---:|---:|---:|")
    for k in ours:
        o, t = ours[k], theirs.get(k)
        if t is None:
            continue
        print(f"| {k} | {o[0]:.2f} ± {o[1]:.2f} | {t[0]:.2f} ± {t[1]:.2f} | {o[0] / t[0]:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
