"""`kplug bench serve`: the service under load on loopback, plugins against the bare model, in one run.

Registers a few dozen paragraphs, then for 1, 4 and 8 concurrent clients (each asking about other documents, so
every row has its own composition) measures throughput and latency in `plugins` mode and in `none` mode (the same
base model, no plugins); then time to first token in `plugins` mode against `context` mode over the same top-3
documents, streamed, one client at a time. Runs against --url, or starts its own server on a fresh data folder.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from adapters.corpus import load_squad


@contextmanager
def local_server(startup_s: float = 300) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="kplug-bench-") as data:
        env = dict(os.environ, KPLUG_DATA_DIR=data)
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError("the server exited during start-up")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _workload(data: Path, n_docs: int) -> tuple[list[dict[str, Any]], list[str]]:
    docs = [d for d in load_squad(data) if d.article >= 24][:n_docs]
    payload = [{"id": d.id, "text": d.text} for d in docs]
    queries = [d.questions[0].question for d in docs if d.questions]
    return payload, queries


def _load(
    client: httpx.Client, queries: list[str], mode: str, clients: int, per_client: int, tokens: int
) -> dict[str, float]:
    def worker(c: int) -> list[tuple[float, int]]:
        out = []
        for i in range(per_client):
            query = queries[(c * per_client + i) % len(queries)]
            started = time.perf_counter()
            body = {"query": query, "mode": mode, "max_new_tokens": tokens, "min_new_tokens": tokens}
            reply = client.post("/generate", json=body)
            reply.raise_for_status()
            out.append((time.perf_counter() - started, reply.json()["usage"]["completion_tokens"]))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - started
    latencies = [r[0] * 1000 for r in results]
    return {
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(sum(r[1] for r in results) / wall, 2),
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1),
    }


def _ttft(client: httpx.Client, query: str, mode: str, tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    first = None
    context_tokens = 0
    with client.stream(
        "POST", "/generate", json={"query": query, "mode": mode, "stream": True, "max_new_tokens": tokens}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: token") and first is None:
                first = time.perf_counter() - started
            elif line.startswith("data: ") and '"usage"' in line:
                context_tokens = json.loads(line[6:])["usage"]["context_tokens"]
    return (first if first is not None else time.perf_counter() - started) * 1000, context_tokens


def bench_serve(url: str | None, data: Path, n_docs: int = 32, per_client: int = 4, tokens: int = 32) -> dict[str, Any]:
    if url is None:
        with local_server() as started_url:
            return bench_serve(started_url, data, n_docs, per_client, tokens)
    payload, queries = _workload(data, n_docs)
    result: dict[str, Any] = {"url": url, "documents": len(payload), "max_new_tokens": tokens, "per_client": per_client}
    with httpx.Client(base_url=url, timeout=600) as client:
        reply = client.post("/documents", params={"wait": "true"}, json={"documents": payload, "on_conflict": "skip"})
        reply.raise_for_status()
        client.post("/generate", json={"query": queries[0], "max_new_tokens": 4}).raise_for_status()  # warm-up
        for clients in (1, 4, 8):
            for mode in ("none", "plugins"):
                stats = _load(client, queries, mode, clients, per_client, tokens)
                for key, value in stats.items():
                    result[f"{mode}_c{clients}_{key}"] = value
            result[f"throughput_ratio_c{clients}"] = round(
                result[f"plugins_c{clients}_tokens_per_s"] / result[f"none_c{clients}_tokens_per_s"], 3
            )
        ttft: dict[str, list[float]] = {"plugins": [], "context": []}
        ctx_tokens = []
        for query in queries[:8]:
            for mode in ("plugins", "context"):  # alternated, so noise hits both alike
                ms, n_ctx = _ttft(client, query, mode, 8)
                ttft[mode].append(ms)
                if mode == "context":
                    ctx_tokens.append(n_ctx)
        result["ttft_plugins_ms"] = round(statistics.median(ttft["plugins"]), 1)
        result["ttft_context_ms"] = round(statistics.median(ttft["context"]), 1)
        result["ttft_ratio_context_over_plugins"] = round(result["ttft_context_ms"] / result["ttft_plugins_ms"], 2)
        result["context_tokens_mean"] = round(float(np.mean(ctx_tokens)), 1)
    return result
