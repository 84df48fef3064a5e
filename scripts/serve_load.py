#!/usr/bin/env python3
"""Bounded load on a running `supra serve`: a fixed number of requests from a fixed number of
client threads over loopback, each with a timeout; prints requests/s, latency percentiles,
tokens/s and the status codes seen. Standard library only.

    target/release/supra serve --port 8080 &
    scripts/serve_load.py --requests 32 --clients 4 --max-tokens 32
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

    def body(i):
        q = f"Question {i}: name a river in Europe and the sea it flows into."
        if a.chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": q}]
            return "/v1/chat/completions", {"messages": msgs, "max_tokens": a.max_tokens, "seed": i}
        return "/v1/completions", {"prompt": system + q, "max_tokens": a.max_tokens, "seed": i}

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
                conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                status = r.status
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
                data = b""
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)
                    usage = json.loads(data).get("usage", {})
                    completion_tokens[0] += usage.get("completion_tokens", 0)
                    cached[0] += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
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
    if ok:
        print(f"requests/s {ok / wall:.2f}; latency p50 {percentile(latencies, 50):.2f} s, "
              f"p99 {percentile(latencies, 99):.2f} s, mean {statistics.mean(latencies):.2f} s; "
              f"generated tokens/s {completion_tokens[0] / wall:.1f}; cached prompt tokens {cached[0]}")
    raise SystemExit(0 if ok == a.requests else 1)


if __name__ == "__main__":
    main()
