#!/usr/bin/env python3
"""Bounded load on a running OpenAI-compatible server (`supra serve`, llama.cpp's server): a
fixed number of requests from a fixed number of client threads over loopback, each with a
timeout; prints requests/s, latency percentiles, generated tokens/s and the status codes seen.
With --stream, each request streams and the time to first token and the gaps between streamed
pieces (inter-token latency) are reported too. Standard library only.

    target/release/supra serve --port 8080 &
    scripts/serve_load.py --requests 32 --clients 4 --max-tokens 32
    scripts/serve_load.py --stream --clients 4 --requests 8 --max-tokens 64 --prompt-tokens 100
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    ap.add_argument("--requests", type=int, default=32, help="requests in all")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    ap.add_argument("--shared-prefix", action="store_true",
                    help="every prompt starts with the same long system text (prompt cache)")
    ap.add_argument("--stream", action="store_true",
                    help="stream each answer; report time to first token and inter-token latency")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="pad each prompt with distinct filler text to about this many tokens "
                         "(each request's own, so no prompt cache helps)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    a = ap.parse_args()
    if a.requests < 1 or a.clients < 1:
        ap.error("--requests and --clients must be at least 1")

    u = urllib.parse.urlparse(a.url)
    if u.scheme != "http" or not u.hostname:
        ap.error(f"--url must be http://HOST:PORT, got {a.url}")
    system = ("You are a concise assistant who answers questions about geography, history and "
              "science in one sentence. " * 4) if a.shared_prefix else ""
    lock = threading.Lock()
    next_i = [0]
    latencies, statuses, completion_tokens, cached = [], {}, [0], [0]
    ttfts, gaps, prompt_tokens = [], [], []
    salt = int(time.time() * 1000) % 1_000_000

    def filler(i):
        # About 21 tokens a sentence in SmolLM2's tokenizer; the run's salt and the request's
        # number first, so that no two prompts share a prefix, in this run or an earlier one.
        n = max(0, round((a.prompt_tokens - 18) / 21))
        return "".join(f"Note {salt}-{i}.{k}: the river flows past the old mill. "
                       for k in range(n))

    def body(i):
        q = filler(i) + f"Question {i}: name a river in Europe and the sea it flows into."
        extra = {"stream": True, "stream_options": {"include_usage": True}} if a.stream else {}
        if a.chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": q}]
            return "/v1/chat/completions", {"messages": msgs, "max_tokens": a.max_tokens,
                                            "seed": i, **extra}
        return "/v1/completions", {"prompt": system + q, "max_tokens": a.max_tokens, "seed": i,
                                   **extra}

    def read_stream(r, t0):
        """Usage and the arrival times of the streamed text pieces of one response."""
        times, usage = [], {}
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                text = c.get("text") or (c.get("delta") or {}).get("content")
                if text:
                    times.append(time.perf_counter() - t0)
        return usage, times

    def client():
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
        while True:
            with lock:
                if next_i[0] >= a.requests:
                    break
                i = next_i[0]
                next_i[0] += 1
            path, payload = body(i)
            t0 = time.perf_counter()
            try:
                try:
                    conn.request("POST", path, json.dumps(payload),
                                 {"Content-Type": "application/json"})
                    r = conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    # The server closed the kept-alive connection after the last response
                    # (llama.cpp's does after a stream): once more on a new one, as HTTP
                    # clients do.
                    conn.close()
                    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
                    t0 = time.perf_counter()
                    conn.request("POST", path, json.dumps(payload),
                                 {"Content-Type": "application/json"})
                    r = conn.getresponse()
                status = r.status
                if a.stream and status == 200:
                    usage, times = read_stream(r, t0)
                    data = json.dumps({"usage": usage}).encode()
                else:
                    data, times = r.read(), []
            except (OSError, http.client.HTTPException, ValueError) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
                data = b""
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)
                    usage = json.loads(data).get("usage") or {}
                    # A stream without usage counts its pieces (about one per token).
                    completion_tokens[0] += usage.get("completion_tokens", len(times))
                    details = usage.get("prompt_tokens_details") or {}
                    cached[0] += details.get("cached_tokens", 0)
                    if "prompt_tokens" in usage:
                        prompt_tokens.append(usage["prompt_tokens"])
                    if times:
                        ttfts.append(times[0])
                        gaps.extend(b - x for x, b in zip(times, times[1:]))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = len(latencies)
    print(f"{a.requests} requests, {a.clients} clients, max_tokens {a.max_tokens}"
          f"{', chat' if a.chat else ''}{', shared prefix' if a.shared_prefix else ''}: {wall:.1f} s")
    print(f"status codes: {dict(sorted(statuses.items(), key=str))}")
    figures = {"requests": a.requests, "clients": a.clients, "max_tokens": a.max_tokens,
               "ok": ok, "wall_s": wall, "statuses": {str(k): v for k, v in statuses.items()}}
    if ok:
        figures.update({
            "requests_per_s": ok / wall, "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "generated_tokens_per_s": completion_tokens[0] / wall,
            "completion_tokens": completion_tokens[0], "cached_prompt_tokens": cached[0],
            "prompt_tokens_mean": statistics.mean(prompt_tokens) if prompt_tokens else None})
        print(f"requests/s {ok / wall:.2f}; latency p50 {percentile(latencies, 50):.2f} s, "
              f"p99 {percentile(latencies, 99):.2f} s, mean {statistics.mean(latencies):.2f} s; "
              f"generated tokens/s {completion_tokens[0] / wall:.1f}; cached prompt tokens {cached[0]}")
        if prompt_tokens:
            print(f"prompt tokens: mean {statistics.mean(prompt_tokens):.0f}")
    if ttfts:
        figures.update({"ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99)})
        print(f"time to first token p50 {percentile(ttfts, 50):.3f} s, p99 {percentile(ttfts, 99):.3f} s; "
              f"inter-token latency p50 {1000 * percentile(gaps, 50):.1f} ms, "
              f"p99 {1000 * percentile(gaps, 99):.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    raise SystemExit(0 if ok == a.requests else 1)


if __name__ == "__main__":
    main()
