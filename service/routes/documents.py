"""Documents and their registration jobs: register (fold in) as a background job, read, list, delete, analyse."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from adapters.errors import InvalidInputError
from index.store import Job, StoredDocument
from service.protocol import (
    ClustersOut,
    DocumentOut,
    DocumentPage,
    JobDocument,
    JobOut,
    PluginInfo,
    Progress,
    RegisterRequest,
    SimilarDocument,
    SimilarOut,
)
from service.routes.deps import AUTH, RuntimeDep, SettingsDep
from service.runtime import Runtime

router = APIRouter(tags=["documents"], dependencies=AUTH)


def job_out(job: Job) -> JobOut:
    done = {r["id"]: r for r in job.results}
    documents = [
        JobDocument(**done[d["id"]]) if d["id"] in done else JobDocument(id=d["id"], status="queued")
        for d in job.request["documents"]
    ]
    return JobOut(
        job_id=job.id,
        status=job.state,
        progress=Progress(done=job.done, total=job.total),
        documents=documents,
        error=job.error,
    )


def document_out(runtime: Runtime, doc: StoredDocument) -> DocumentOut:
    plugin = None
    if doc.norm is not None and doc.adapter_id is not None:
        stale = doc.adapter_id != runtime.store.adapter_id
        percentile = None if stale else runtime.store.uniqueness(doc.id)[1]
        plugin = PluginInfo(
            norm=doc.norm, uniqueness_percentile=percentile, adapter_id=doc.adapter_id, stale=stale, loss=doc.loss
        )
    return DocumentOut(
        id=doc.id,
        text=doc.text,
        metadata=doc.metadata,
        content_hash=doc.content_hash,
        created_at=doc.created_at,
        updated_at=doc.updated_at,
        plugin=plugin,
    )


@router.post("/documents", status_code=202, response_model=JobOut)
async def register(
    body: RegisterRequest,
    runtime: RuntimeDep,
    settings: SettingsDep,
    response: Response,
    wait: bool = False,
) -> JobOut | JSONResponse:
    if len(body.documents) > settings.max_documents_per_call:
        raise InvalidInputError(
            f"{len(body.documents)} documents in one call; at most {settings.max_documents_per_call}"
        )
    for i, doc in enumerate(body.documents):
        if not doc.text.strip():
            raise InvalidInputError(f"documents.{i}.text is empty")
        if len(doc.text) > settings.max_text_chars:
            raise InvalidInputError(
                f"documents.{i}.text has {len(doc.text)} characters; at most {settings.max_text_chars}"
            )
    payload = [d.model_dump() for d in body.documents]
    job = await asyncio.to_thread(runtime.registrar.submit, payload, body.on_conflict)
    if wait:
        job = await asyncio.to_thread(runtime.registrar.wait, job.id)
        return JSONResponse(job_out(job).model_dump(), status_code=200)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_out(job)


@router.post("/documents/reregister", status_code=202, response_model=JobOut)
async def reregister(runtime: RuntimeDep, response: Response) -> JobOut:
    """Fold in again every document whose plugin belongs to another adapter."""
    ids = runtime.store.stale_ids()
    if not ids:
        raise InvalidInputError("no stale plugins: every document belongs to the loaded adapter")
    docs = [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in (runtime.store.get(i) for i in ids)]
    job = await asyncio.to_thread(runtime.registrar.submit, docs, "overwrite")
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_out(job)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, runtime: RuntimeDep) -> JobOut:
    return job_out(runtime.store.get_job(job_id))


@router.get("/documents", response_model=DocumentPage)
def list_documents(
    runtime: RuntimeDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1)] = 50,
) -> DocumentPage:
    limit = min(limit, settings.max_page_size)
    docs = runtime.store.page(offset, limit)
    return DocumentPage(
        documents=[document_out(runtime, d) for d in docs], total=runtime.store.count(), offset=offset, limit=limit
    )


@router.get("/documents/clusters", response_model=ClustersOut)
def clusters(runtime: RuntimeDep, n: Annotated[int, Query(ge=1, le=1000)] = 8) -> ClustersOut:
    return ClustersOut(clusters=runtime.engine.call(lambda: runtime.store.clusters(n)).result())


@router.get("/documents/{doc_id}", response_model=DocumentOut)
def get_document(doc_id: str, runtime: RuntimeDep) -> DocumentOut:
    return document_out(runtime, runtime.store.get(doc_id))


@router.delete("/documents/{doc_id}", status_code=204)
def delete_document(doc_id: str, runtime: RuntimeDep) -> Response:
    runtime.store.delete(doc_id)
    return Response(status_code=204)


@router.get("/documents/{doc_id}/similar", response_model=SimilarOut)
def similar(doc_id: str, runtime: RuntimeDep, k: Annotated[int, Query(ge=1, le=100)] = 5) -> SimilarOut:
    hits = runtime.engine.call(lambda: runtime.store.similar(doc_id, k)).result()  # compute on the engine thread
    return SimilarOut(id=doc_id, similar=[SimilarDocument(id=i, cosine=c) for i, c in hits])
