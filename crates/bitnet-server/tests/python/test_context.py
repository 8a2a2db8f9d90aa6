"""The KV budget decides how many requests run at once; each may use the whole context."""

import concurrent.futures as cf
import time

from conftest import Server

# bitnet-tiny at -c 256: 2 (keys, values) × 10 layers × 256 positions × 256 × 4 bytes.
SLOT = 2 * 10 * 256 * 256 * 4


def test_every_request_may_use_the_whole_context_while_others_run():
    s = Server("-c", "256", "--parallel", "auto", "--kv-cache", str(3 * SLOT))
    try:
        m = s.metrics()
        assert m["bitnet_requests_max_running"] == 3
        assert m["bitnet_kv_cache_slots"] == 3 and m["bitnet_kv_cache_bytes"] == 3 * SLOT
        assert any("3 running at once" in line for line in s.stderr_lines), s.stderr_lines
        status, toks, _ = s.post("/tokenize", {"content": "Once upon a time, there was a little fox"})
        prompt = toks["tokens"]
        body = {"prompt": prompt, "max_tokens": 256 - len(prompt), "temperature": 0, "ignore_eos": True}
        peak = 0.0
        with cf.ThreadPoolExecutor(3) as pool:
            runs = [pool.submit(s.post, "/v1/completions", body) for _ in range(3)]
            while not all(r.done() for r in runs):
                peak = max(peak, s.metrics()["bitnet_kv_cache_used_bytes"])
                time.sleep(0.05)
            results = [r.result() for r in runs]
        for status, r, _ in results:
            assert status == 200, r
            u = r["usage"]
            # Each filled its whole context, prompt and completion, beside the other two.
            assert u["prompt_tokens"] + u["completion_tokens"] == 256, u
            assert r["choices"][0]["finish_reason"] == "length"
        # All three held KV at once: more than two whole contexts' worth at the peak.
        assert 2 * SLOT < peak <= 3 * SLOT, peak
        assert s.metrics()["bitnet_kv_cache_used_bytes"] == 0
    finally:
        s.kill()
