"""Registration jobs: embed, fold in and store documents in a bounded background worker.

Jobs are persisted with their request, so a restart resumes the unfinished ones; a document whose write landed
before a crash (same id and content hash) is recognised instead of being written twice. Documents are processed
in small chunks so that the generation engine, sharing the model, is never stalled for long.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from adapters.adapter import PluginAdapter
from adapters.corpus import content_id
from adapters.errors import ConflictError, KplugError, OverloadedError
from adapters.training import FoldInConfig, fold_in
from index.embedder import Embedder
from index.store import Job, PluginStore, content_hash
from service.engine import Engine

log = logging.getLogger(__name__)
CHUNK = 4


class Registrar:
    def __init__(
        self,
        store: PluginStore,
        embedder: Embedder,
        adapter: PluginAdapter,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        fold_in_config: FoldInConfig,
        engine: Engine,
        max_pending: int = 32,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.adapter = adapter
        self.model = model
        self.tokenizer = tokenizer
        self.fold_in_config = fold_in_config
        self.engine = engine  # embedding and fold-in run on its thread, between decoding steps
        self.max_pending = max_pending
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._done: dict[str, threading.Event] = {}
        self._thread: threading.Thread | None = None
        self.on_document: Callable[[], None] | None = None  # metrics hook

    def start(self) -> None:
        for job in self.store.unfinished_jobs():
            log.info("resuming registration job %s (%d of %d done)", job.id, job.done, job.total)
            self._done[job.id] = threading.Event()
            self._queue.put(job.id)
        self._thread = threading.Thread(target=self._run, name="kplug-registrar", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def submit(self, documents: list[dict[str, Any]], on_conflict: str) -> Job:
        """Persist a job for these documents (ids filled in from content hashes) and queue it."""
        if self._queue.qsize() >= self.max_pending:
            raise OverloadedError(f"{self.max_pending} registration jobs are waiting", retry_after_s=10)
        docs = [{**d, "id": d.get("id") or content_id(d["text"])} for d in documents]
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise ConflictError("the same document id appears twice in one request")
        if on_conflict == "fail":
            existing = self.store.exists(ids)
            if existing:
                raise ConflictError(f"documents already exist: {sorted(existing)[:10]}")
        job_id = uuid.uuid4().hex
        job = self.store.create_job(job_id, {"documents": docs, "on_conflict": on_conflict}, len(docs))
        self._done[job_id] = threading.Event()
        self._queue.put(job_id)
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        event = self._done.get(job_id)
        if event is not None:
            event.wait(timeout)
        return self.store.get_job(job_id)

    def _run(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._process(self.store.get_job(job_id))
            except Exception as exc:
                log.exception("registration job %s failed", job_id)
                self.store.update_job(job_id, state="failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                event = self._done.pop(job_id, None)
                if event is not None:
                    event.set()

    def _process(self, job: Job) -> None:
        self.store.update_job(job.id, state="running")
        results = list(job.results)
        on_conflict = job.request["on_conflict"]
        todo = job.request["documents"][len(results) :]
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            results += self._register(chunk, on_conflict, resumed=bool(job.results) and start == 0)
            self.store.update_job(job.id, results=results)
        failed = [r for r in results if r["status"] == "failed"]
        error = f"{len(failed)} of {len(results)} documents failed" if failed else None
        self.store.update_job(job.id, state="failed" if failed else "succeeded", error=error)

    def _register(self, docs: list[dict[str, Any]], on_conflict: str, resumed: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(docs)
        work = []
        for i, doc in enumerate(docs):
            if resumed and self._already_written(doc):
                out[i] = {"id": doc["id"], "status": "created", "uniqueness": None, "loss": None, "seconds": 0.0}
            elif on_conflict == "skip" and self.store.exists([doc["id"]]):
                out[i] = {"id": doc["id"], "status": "skipped", "uniqueness": None, "loss": None, "seconds": 0.0}
            else:
                work.append(i)
        if work:
            texts = [docs[i]["text"] for i in work]
            started = time.perf_counter()
            embeddings, folded = self.engine.call(
                lambda: (
                    self.embedder.embed(texts),
                    fold_in(self.adapter, self.model, self.tokenizer, texts, self.fold_in_config),
                )
            ).result()
            seconds = (time.perf_counter() - started) / len(work)
            for j, i in enumerate(work):
                doc, result = docs[i], folded[j]
                entry: dict[str, Any] = {"id": doc["id"], "uniqueness": float((result.plugin**2).sum() ** 0.5)}
                try:
                    status = self.store.put(
                        doc["id"], doc["text"], doc.get("metadata") or {}, embeddings[j], result.plugin,
                        loss=result.loss, on_conflict=on_conflict,  # type: ignore[arg-type]
                    )  # fmt: skip
                    entry.update(status=status, loss=result.loss, seconds=round(seconds, 4))
                    if self.on_document is not None:
                        self.on_document()
                except KplugError as exc:
                    entry.update(status="failed", loss=None, seconds=None, error=str(exc))
                out[i] = entry
        return [r for r in out if r is not None]

    def _already_written(self, doc: dict[str, Any]) -> bool:
        try:
            return self.store.get(doc["id"]).content_hash == content_hash(doc["text"])
        except KplugError:
            return False
