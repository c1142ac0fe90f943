"""End to end over HTTP on loopback: a real uvicorn process, the real SmolLM2, MiniLM, FAISS and SQLite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

DOCS = [
    {
        "id": "volcano",
        "text": "Mount Korvath is a volcano on the island of Delmar. It last erupted in 1887, burying "
        "the town of Essel under ash. Its summit is 2,314 metres above sea level.",
    },
    {
        "id": "violin",
        "text": "The Stradivarius violin known as the Lady Blunt was made in 1721 by Antonio "
        "Stradivari in Cremona. It was sold at auction in 2011 for 15.9 million dollars.",
    },
    {
        "id": "comet",
        "text": "Comet Halley returns to the inner Solar System about every 76 years. It was last "
        "seen from Earth in 1986 and will next appear in 2061.",
    },
    {
        "id": "bridge",
        "text": "The Golden Gate Bridge opened in 1937 and spans the strait between San Francisco "
        "Bay and the Pacific Ocean. Its main span is 1,280 metres long.",
    },
    {
        "id": "coffee",
        "text": "Coffee plants were first cultivated in Yemen in the fifteenth century. The two main "
        "species grown today are arabica and robusta.",
    },
    {
        "id": "penguin",
        "text": "Emperor penguins breed during the Antarctic winter. The male keeps the single egg "
        "warm on its feet for about 64 days while the female feeds at sea.",
    },
    {
        "id": "printing",
        "text": "Johannes Gutenberg introduced movable type printing in Europe around 1440 in "
        "Mainz. His 42-line Bible was printed about 1455.",
    },
    {"text": "The Nile is about 6,650 kilometres long and flows north into the Mediterranean Sea through Egypt."},
]
QUERIES = [
    "When did Mount Korvath last erupt?",
    "Who made the Lady Blunt violin?",
    "When will Halley's comet next appear?",
    "How long is the Golden Gate Bridge main span?",
    "Where was coffee first cultivated?",
    "How long does the male emperor penguin keep the egg warm?",
    "When did Gutenberg introduce movable type?",
    "How long is the Nile?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, KPLUG_DATA_DIR=str(data_dir), KPLUG_MAX_BODY_BYTES="200000", **(extra_env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server never became ready")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kplug-data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[Server]:
    srv = Server(data_dir)
    yield srv
    srv.stop()


def _wait_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    for _ in range(600):
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise TimeoutError(job_id)


def _register_all(server: Server) -> list[str]:
    reply = server.client.post("/documents", json={"documents": DOCS[:4]})
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert reply.headers["location"] == f"/jobs/{body['job_id']}"
    assert [d["id"] for d in body["documents"]] == ["volcano", "violin", "comet", "bridge"]
    job = _wait_job(server.client, body["job_id"])
    assert job["status"] == "succeeded" and job["progress"] == {"done": 4, "total": 4}
    # the encoder path trains nothing, so there is no loss to report; the plugin is there and not zero
    assert all(d["status"] == "created" and d["uniqueness"] > 0 and d["seconds"] > 0 for d in job["documents"])

    reply = server.client.post("/documents", params={"wait": "true"}, json={"documents": DOCS[4:]})
    assert reply.status_code == 200, reply.text
    waited = reply.json()
    assert waited["status"] == "succeeded" and len(waited["documents"]) == 4
    derived = waited["documents"][-1]["id"]
    assert derived.startswith("sha-")  # no id given: derived from the content hash
    return [d["id"] for d in body["documents"]] + [d["id"] for d in waited["documents"]]


@pytest.fixture(scope="module")
def registered(server: Server) -> list[str]:
    return _register_all(server)


def test_health_ready_and_metrics(server: Server, registered: list[str]) -> None:
    assert server.client.get("/health").json() == {"status": "ok"}
    ready = server.client.get("/ready").json()
    assert ready["status"] == "ready" and ready["documents"] == 8
    server.client.post("/generate", json={"query": "hello", "max_new_tokens": 4})
    text = server.client.get("/metrics").text
    for name in (
        'kplug_requests_total{method="POST",route="/generate",status="200"}',
        "kplug_time_to_first_token_seconds_bucket",
        "kplug_tokens_generated_total",
        "kplug_retrieval_seconds_count",
        "kplug_queue_depth 0",
        "kplug_documents 8",
        "kplug_plugins 8",
        'kplug_registration_jobs{state="succeeded"}',
    ):
        assert name in text, name


def test_documents_read_list_similar(server: Server, registered: list[str]) -> None:
    doc = server.client.get("/documents/volcano").json()
    assert doc["text"].startswith("Mount Korvath") and doc["plugin"]["stale"] is False
    assert 0 <= doc["plugin"]["uniqueness_percentile"] <= 100
    page = server.client.get("/documents", params={"offset": 2, "limit": 3}).json()
    assert page["total"] == 8 and [d["id"] for d in page["documents"]] == registered[2:5]
    similar = server.client.get("/documents/volcano/similar", params={"k": 3}).json()
    assert len(similar["similar"]) == 3 and "volcano" not in [s["id"] for s in similar["similar"]]


@pytest.mark.parametrize("mode", ["plugins", "context", "combine", "none"])
def test_generate_in_every_mode(server: Server, registered: list[str], mode: str) -> None:
    reply = server.client.post("/generate", json={"query": QUERIES[0], "mode": mode, "max_new_tokens": 20})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["mode"] == mode and isinstance(body["text"], str) and body["usage"]["completion_tokens"] > 0
    if mode == "none":
        assert body["documents"] == [] and body["usage"]["context_tokens"] == 0
    else:
        assert body["documents"][0]["id"] == "volcano" and len(body["documents"]) == 3
        assert abs(sum(d["weight"] for d in body["documents"]) - 1) < 1e-5
    if mode in ("context", "combine"):
        assert body["usage"]["context_tokens"] > 40
        if mode == "context":  # the paragraph alone in the prompt: the model reads the year off it
            one = server.client.post("/generate", json={"query": QUERIES[3], "mode": mode, "top_k": 1}).json()
            assert "1,280" in one["text"] and [d["id"] for d in one["documents"]] == ["bridge"]
    else:
        assert body["usage"]["context_tokens"] == 0
    assert set(body["timings_ms"]) == {"retrieval", "compose", "generate"}


def test_server_sent_events(server: Server, registered: list[str]) -> None:
    body = {"query": QUERIES[2], "stream": True, "max_new_tokens": 16}
    pieces, final = [], None
    with server.client.stream("POST", "/generate", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token":
                    pieces.append(data["text"])
                else:
                    final = data
    assert final is not None and len(pieces) >= 1
    assert "".join(pieces).strip() == final["text"].strip()
    assert final["documents"][0]["id"] == "comet" and final["usage"]["completion_tokens"] >= len(pieces)


def test_openai_client(server: Server, registered: list[str]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["kplug"]
    messages = [{"role": "user", "content": QUERIES[3]}]
    completion = client.chat.completions.create(model="kplug", messages=messages, max_tokens=12)  # type: ignore[arg-type]
    text = completion.choices[0].message.content
    assert text and completion.usage is not None and completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="kplug", messages=messages, max_tokens=12, stream=True)  # type: ignore[arg-type]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.strip() == text.strip()  # greedy: the stream says what the plain answer said


def test_concurrent_requests_equal_one_by_one(server: Server, registered: list[str]) -> None:
    bodies = [{"query": q, "max_new_tokens": 24} for q in QUERIES]

    def ask(body: dict[str, Any]) -> dict[str, Any]:
        reply = server.client.post("/generate", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, bodies))
    alone = [ask(b) for b in bodies]
    tops = [r["documents"][0]["id"] for r in together]
    assert len(set(tops)) == 8  # eight different top documents: eight different compositions
    assert [r["text"] for r in together] == [r["text"] for r in alone]


def test_bad_inputs_are_4xx_and_change_nothing(server: Server, registered: list[str]) -> None:
    c = server.client
    before = c.get("/documents", params={"limit": 100}).json()
    cases = [
        (c.post("/generate", json={"query": 123}), 422),
        (c.post("/generate", json={"query": "x", "top_k": 10_000}), 400),
        (c.post("/generate", json={"query": "x", "max_new_tokens": 10**6}), 400),
        (c.post("/generate", json={"query": "x", "mode": "magic"}), 422),
        (c.post("/generate", json={"query": "   "}), 400),
        (c.post("/generate", json={"query": "x", "unknown": 1}), 422),
        (c.post("/documents", json={"documents": [{"text": ""}]}), 422),
        (c.post("/documents", json={"documents": [{"text": "   "}]}), 400),
        (c.post("/documents", json={"documents": []}), 422),
        (c.post("/documents", json={"documents": [{"id": "volcano", "text": "new"}], "on_conflict": "fail"}), 409),
        (c.post("/documents", json={"documents": [{"id": "a", "text": "x" * 300_000}]}), 413),
        (c.post("/documents", content=b"{not json", headers={"content-type": "application/json"}), 422),
        (c.get("/documents/nope"), 404),
        (c.delete("/documents/nope"), 404),
        (c.get("/documents/nope/similar"), 404),
        (c.get("/jobs/nope"), 404),
    ]
    for reply, status in cases:
        assert reply.status_code == status, (reply.request.url, reply.text)
        assert reply.json()["error"]["message"]
    assert c.get("/documents", params={"limit": 100}).json() == before


def test_delete_then_restart_keeps_the_rest(server: Server, registered: list[str], data_dir: Path) -> None:
    assert server.client.delete("/documents/coffee").status_code == 204
    assert server.client.get("/documents/coffee").status_code == 404
    server.stop()
    again = Server(data_dir)
    try:
        ready = again.client.get("/ready").json()
        assert ready["documents"] == 7
        reply = again.client.post("/generate", json={"query": QUERIES[1], "max_new_tokens": 8})
        assert reply.json()["documents"][0]["id"] == "violin"
        assert again.client.get("/documents/coffee").status_code == 404
    finally:
        again.stop()
        server.proc = again.proc  # the module fixture's teardown finds a stopped process


def test_api_key_guards_everything_but_health(tmp_path: Path) -> None:
    srv = Server(tmp_path, {"KPLUG_API_KEY": "s3cret"})
    try:
        c = srv.client
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/documents").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/documents", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/documents", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 401
    finally:
        srv.stop()
    log = srv.proc.stdout.read() if srv.proc.stdout else ""
    assert "s3cret" not in log
