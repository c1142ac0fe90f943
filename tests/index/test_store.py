"""The store and its index: exact search, persistence, crash safety under SIGKILL, repair, analytics."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from adapters.errors import ConflictError, InvalidInputError, NotFoundError, StoreCorruptError
from index import codec
from index.store import DB_FILE, INDEX_FILE, PluginStore, content_hash
from index.vectors import VectorIndex

DIM, SHAPE = 16, (3, 4)


def _unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _store(folder: Path, adapter_id: str = "ckpt-a", **kw: object) -> PluginStore:
    return PluginStore(folder, DIM, SHAPE, adapter_id, **kw)  # type: ignore[arg-type]


def _fill(store: PluginStore, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = _unit(rng, n)
    for i in range(n):
        store.put(f"doc-{i}", f"text {i}", {"i": i}, vectors[i], rng.standard_normal(SHAPE).astype(np.float32))
    return {f"doc-{i}": vectors[i] for i in range(n)}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_search_equals_brute_force_cosine(kind: str) -> None:
    rng = np.random.default_rng(1)
    data, queries = _unit(rng, 500, 32), _unit(rng, 20, 32)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    index = VectorIndex(32, kind)  # type: ignore[arg-type]
    index.build(ids, data)
    if kind == "ivf":
        index.set_nprobe(10_000)  # probing every list makes IVF exact
    found_ids, found_scores = index.search(queries, 10)
    expected = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    np.testing.assert_array_equal(found_ids, ids[expected])
    np.testing.assert_allclose(found_scores, np.take_along_axis(queries @ data.T, expected, 1), rtol=1e-5)


def test_top_k_larger_than_collection_and_empty_index() -> None:
    index = VectorIndex(DIM)
    ids, scores = index.search(np.ones(DIM, np.float32), 5)
    assert ids.shape == (1, 0) and scores.shape == (1, 0)
    index.add(np.array([7, 9]), _unit(np.random.default_rng(0), 2))
    ids, _ = index.search(np.ones(DIM, np.float32), 50)
    assert sorted(ids[0].tolist()) == [7, 9]


def test_ids_and_results_survive_save_and_reload(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    index = VectorIndex(DIM)
    ids = np.array([5, 17, 3, 99, 42])
    index.build(ids, _unit(rng, 5))
    query = _unit(rng, 3)
    before = index.search(query, 4)
    index.save(tmp_path / "x.faiss", sequence=12)
    again = VectorIndex(DIM)
    assert again.load(tmp_path / "x.faiss") == 12
    after = again.search(query, 4)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(np.sort(again.ids()), np.sort(ids))


def test_store_round_trip_and_search(tmp_path: Path) -> None:
    store = _store(tmp_path)
    vectors = _fill(store, 20)
    doc = store.get("doc-3")
    assert doc.text == "text 3" and doc.metadata == {"i": 3} and doc.content_hash == content_hash("text 3")
    assert doc.plugin is not None and doc.plugin.shape == SHAPE and doc.adapter_id == "ckpt-a"
    assert store.search(vectors["doc-7"], 1)[0][0] == "doc-7"
    store.close()
    reopened = _store(tmp_path)
    assert reopened.count() == 20
    assert reopened.search(vectors["doc-7"], 3)[0] == ("doc-7", pytest.approx(1.0, abs=1e-5))
    np.testing.assert_array_equal(reopened.get("doc-3").plugin, doc.plugin)


def test_update_and_delete_keep_store_and_index_in_step(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _fill(store, 5)
    new_vec = _unit(np.random.default_rng(9), 1)[0]
    assert store.put("doc-2", "new text", {}, new_vec, np.ones(SHAPE, np.float32)) == "updated"
    assert store.get("doc-2").text == "new text"
    assert store.search(new_vec, 1)[0][0] == "doc-2"
    np.testing.assert_allclose(store.index.vector(store.get("doc-2").num), new_vec)
    store.delete("doc-2")
    with pytest.raises(NotFoundError):
        store.get("doc-2")
    assert "doc-2" not in [d for d, _ in store.search(new_vec, 10)]
    assert len(store.index) == store.count() == 4
    with pytest.raises(NotFoundError):
        store.delete("doc-2")


def test_conflict_policies_and_bad_input_lose_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _fill(store, 2)
    vec, plug = _unit(np.random.default_rng(3), 1)[0], np.zeros(SHAPE, np.float32)
    assert store.put("doc-0", "other", {}, vec, plug, on_conflict="skip") == "skipped"
    with pytest.raises(ConflictError):
        store.put("doc-0", "other", {}, vec, plug, on_conflict="fail")
    with pytest.raises(InvalidInputError):
        store.put("doc-9", "x", {}, vec[:5], plug)
    with pytest.raises(InvalidInputError):
        store.put("doc-9", "  ", {}, vec, plug)
    with pytest.raises(InvalidInputError):
        store.put("doc-9", "x", {}, vec, np.full(SHAPE, np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="float16"):
        store.put("doc-9", "x", {}, vec, np.full(SHAPE, 1e5, np.float32))
    assert store.get("doc-0").text == "text 0" and store.count() == 2 and len(store.index) == 2


def test_missing_or_corrupt_snapshot_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path)
    vectors = _fill(store, 10)
    store.close()
    (tmp_path / INDEX_FILE).unlink()
    with caplog.at_level(logging.INFO):
        again = _store(tmp_path)
    assert "building it from SQLite" in caplog.text
    assert again.search(vectors["doc-4"], 1)[0][0] == "doc-4"
    again.close()
    data = bytearray((tmp_path / INDEX_FILE).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / INDEX_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.INFO):
        third = _store(tmp_path)
    assert "unusable" in caplog.text
    assert third.search(vectors["doc-4"], 1)[0][0] == "doc-4" and len(third.index) == 10


def test_stale_snapshot_is_caught_up_from_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path, snapshot_every=1000)
    _fill(store, 4)
    store.snapshot()
    vectors = _fill(store, 8, seed=5)  # overwrites doc-0..3, adds doc-4..7: after the snapshot
    store.delete("doc-1")
    store._db.close()  # a crash: no final snapshot
    with caplog.at_level(logging.INFO):
        again = _store(tmp_path)
    assert "caught up" in caplog.text
    assert len(again.index) == again.count() == 7
    assert again.search(vectors["doc-6"], 1)[0][0] == "doc-6"
    assert again.search(vectors["doc-0"], 1)[0][0] == "doc-0"


def test_corrupt_sqlite_is_a_clear_error_not_an_empty_store(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _fill(store, 3)
    store.close()
    (tmp_path / DB_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorruptError, match="refusing to start on an empty store"):
        _store(tmp_path)


def test_other_adapter_marks_plugins_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path)
    _fill(store, 3)
    store.close()
    with caplog.at_level(logging.WARNING):
        other = _store(tmp_path, adapter_id="ckpt-b")
    assert "belong to another adapter" in caplog.text
    assert other.stale_ids() == ["doc-0", "doc-1", "doc-2"] and other.plugins(["doc-0"]) == {}
    other.put("doc-0", "text 0", {}, other.embedding("doc-0"), np.ones(SHAPE, np.float32))
    assert other.stale_ids() == ["doc-1", "doc-2"] and set(other.plugins(["doc-0", "doc-1"])) == {"doc-0"}


def test_plugin_analytics(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rng = np.random.default_rng(4)
    direction = rng.standard_normal(SHAPE).astype(np.float32)
    for i in range(12):
        plugin = direction * (1 + i) if i < 6 else rng.standard_normal(SHAPE).astype(np.float32) * 0.1
        store.put(f"d{i}", f"t{i}", {}, _unit(rng, 1)[0], plugin)
    norm, pct = store.uniqueness("d5")
    assert norm == pytest.approx(6 * np.linalg.norm(direction), rel=1e-3) and pct == 100.0  # rel: float16 at rest
    assert {d for d, _ in store.similar("d0", 5)} == {"d1", "d2", "d3", "d4", "d5"}
    labels = store.clusters(2)
    assert len({labels[f"d{i}"] for i in range(6)}) == 1


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from pathlib import Path
    from index.store import PluginStore
    store = PluginStore(Path(sys.argv[1]), 16, (3, 4), "ckpt-a", snapshot_every=7)
    rng = np.random.default_rng(int(sys.argv[2]))
    i = int(sys.argv[3])  # each round goes on from where the last one was killed
    while True:
        vec = rng.standard_normal(16).astype(np.float32)
        vec /= np.linalg.norm(vec)
        doc_id = f"doc-{i % 40}"  # ids repeat: updates as well as inserts
        text = f"{sys.argv[2]}-{i} " * 50
        store.put(doc_id, text, {"i": i}, vec, np.full((3, 4), i % 2048, np.float32))  # float16-exact
        if i % 11 == 5:
            store.delete(doc_id)
            print("del", doc_id, i, flush=True)
        else:
            print("ack", doc_id, i, flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("run", range(5))
def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path: Path, run: int) -> None:
    rng = random.Random(run)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    acked: dict[str, int | None] = {}
    last = -1  # the last operation acknowledged; the next one may have run, unacknowledged

    def record(line: str) -> None:
        nonlocal last
        parts = line.split()
        if len(parts) == 3:
            acked[parts[1]] = int(parts[2]) if parts[0] == "ack" else None
            last = int(parts[2])

    for round_ in range(3):  # several kills on the same store, each at a random moment
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(run * 10 + round_), str(last + 1)],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert child.stdout is not None
        deadline = time.monotonic() + rng.uniform(1.5, 4.0)
        while time.monotonic() < deadline:
            record(child.stdout.readline())
        child.send_signal(signal.SIGKILL)
        child.wait()
        for line in child.stdout.read().splitlines():  # acknowledged before the kill, read late
            record(line)
        assert len(acked) > 0
        store = _store(tmp_path)
        in_flight = last + 1
        for doc_id, i in acked.items():
            if i is None:
                continue  # deleted, possibly re-added after the last line we saw
            if doc_id == f"doc-{in_flight % 40}" and in_flight % 11 == 5 and not store.exists([doc_id]):
                continue  # the unacknowledged put-then-delete in flight at the kill completed
            doc = store.get(doc_id)
            # the acknowledged write or a later one, never an older one
            assert doc.metadata["i"] >= i
            assert doc.plugin is not None and float(doc.plugin[0, 0]) == doc.metadata["i"] % 2048
            assert doc.content_hash == content_hash(doc.text)
        nums = sorted(d.num for d in store.page(0, 1000))
        assert sorted(store.index.ids().tolist()) == nums
        for doc in store.page(0, 1000):
            np.testing.assert_array_equal(store.index.vector(doc.num), store.embedding(doc.id))
        store.close()


def test_plugins_are_kept_as_float16(tmp_path: Path) -> None:
    """Half the bytes of float32; what comes back is the float16 rounding of what was put, norm included."""
    store = _store(tmp_path)
    plugin = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 5
    store.put("doc-0", "text", {}, _unit(np.random.default_rng(1), 1)[0], plugin)
    blob = store._db.execute("SELECT vector FROM plugins").fetchone()[0]
    assert len(blob) == store.plugin_bytes == np.prod(SHAPE) * 2
    back = store.get("doc-0")
    assert back.plugin is not None and back.plugin.dtype == np.float32
    np.testing.assert_array_equal(back.plugin, plugin.astype(np.float16).astype(np.float32))
    assert 0 < np.abs(back.plugin - plugin).max() <= 5e-3 * np.abs(plugin).max()
    assert back.norm == pytest.approx(float(np.linalg.norm(back.plugin)), rel=1e-6)
    np.testing.assert_array_equal(store.plugins(["doc-0"])["doc-0"], back.plugin)


def test_a_schema_1_store_is_migrated_to_float16_plugins(tmp_path: Path) -> None:
    """A store written by the float32 version opens with every document, plugin and search result intact."""
    store = _store(tmp_path)
    vectors = _fill(store, 5)
    plugins = {i: np.random.default_rng(i).standard_normal(SHAPE).astype(np.float32) for i in range(5)}
    # rewrite it as schema 1 wrote it: float32 blobs, schema_version 1
    with store._tx():
        for i, plugin in plugins.items():
            store._db.execute(
                "UPDATE plugins SET vector = ?, norm = ? WHERE num = (SELECT num FROM documents WHERE id = ?)",
                (plugin.tobytes(), float(np.linalg.norm(plugin)), f"doc-{i}"),
            )
        store._db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        store._db.execute("DELETE FROM meta WHERE key = 'plugin_format'")
    store.close()

    reopened = _store(tmp_path, plugin_format="float8")  # an old store keeps float16 whatever a new one would use
    meta = dict(reopened._db.execute("SELECT key, value FROM meta").fetchall())
    assert meta["schema_version"] == "3" and meta["plugin_format"] == "float16" and reopened.count() == 5
    assert reopened.plugin_format == "float16"
    for i, plugin in plugins.items():
        doc = reopened.get(f"doc-{i}")
        assert doc.plugin is not None
        np.testing.assert_array_equal(doc.plugin, plugin.astype(np.float16).astype(np.float32))
        assert doc.norm == pytest.approx(float(np.linalg.norm(doc.plugin)), rel=1e-6)
        assert reopened.search(vectors[f"doc-{i}"], 1)[0][0] == f"doc-{i}"
    reopened.close()
    # a second open finds schema 3 and leaves the float16 blobs alone (read as float32 they would not even reshape)
    again = _store(tmp_path).get("doc-0").plugin
    assert again is not None
    np.testing.assert_array_equal(again, plugins[0].astype(np.float16).astype(np.float32))


def test_a_schema_2_store_records_float16_and_keeps_its_plugins(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _fill(store, 3)
    before = {f"doc-{i}": store.get(f"doc-{i}").plugin for i in range(3)}
    with store._tx():
        store._db.execute("DELETE FROM meta WHERE key = 'plugin_format'")
        store._db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store.close()
    reopened = _store(tmp_path)
    meta = dict(reopened._db.execute("SELECT key, value FROM meta").fetchall())
    assert (meta["schema_version"], meta["plugin_format"]) == ("3", "float16")
    for doc_id, plugin in before.items():
        np.testing.assert_array_equal(reopened.get(doc_id).plugin, plugin)


def test_float8_stores_one_byte_a_number_and_rounds_as_torch_does(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(codec.E4M3, table)  # NaN codes included
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 3, 5000), codec.E4M3[1:126] / 2 + codec.E4M3[2:127] / 2]).astype(np.float32)
    reference = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert codec.encode(values, "float8") == reference.tobytes()  # ties included: to the even code

    store = _store(tmp_path, plugin_format="float8")
    plugin = rng.standard_normal(SHAPE).astype(np.float32) * 5
    store.put("doc-0", "text", {}, _unit(rng, 1)[0], plugin)
    blob = store._db.execute("SELECT vector FROM plugins").fetchone()[0]
    assert len(blob) == store.plugin_bytes == np.prod(SHAPE)
    back = store.get("doc-0").plugin
    assert back is not None and back.dtype == np.float32
    assert np.abs(back - plugin).max() > 0 and np.all(np.abs(back - plugin) <= np.abs(plugin) / 16 + 2.0**-10)
    assert store.get("doc-0").norm == pytest.approx(float(np.linalg.norm(back)), rel=1e-6)
    with pytest.raises(InvalidInputError, match="range of float8"):
        store.put("doc-1", "text", {}, _unit(rng, 1)[0], np.full(SHAPE, 500.0, np.float32))
    assert store.count() == 1
    store.close()
    reopened = _store(tmp_path)  # the recorded format wins over the default
    assert reopened.plugin_format == "float8"
    np.testing.assert_array_equal(reopened.get("doc-0").plugin, back)


def test_an_unknown_schema_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with store._tx():
        store._db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    store.close()
    with pytest.raises(StoreCorruptError, match="schema 7"):
        _store(tmp_path)


def _texts_store(folder: Path) -> tuple[PluginStore, np.ndarray]:
    """Three documents; the query's embedding leans toward the first, its words are the second's."""
    store = _store(folder)
    rng = np.random.default_rng(5)
    vectors = _unit(rng, 3)
    texts = ["The tower was painted red.", "Normans founded the duchy of Normandy in 911.", "Rivers flow to seas."]
    for i, text in enumerate(texts):
        store.put(f"doc-{i}", text, {}, vectors[i], np.zeros(SHAPE, dtype=np.float32))
    query = vectors[0] * 0.6 + vectors[1] * 0.4
    return store, query / np.linalg.norm(query)


def test_a_lexical_weight_adds_bm25_for_the_query_words(tmp_path: Path) -> None:
    store, query = _texts_store(tmp_path)
    question = "When did the Normans found the duchy?"
    assert store.search(query, 1, question)[0][0] == "doc-0"  # no weight: cosine alone
    [(first, score), (second, cosine)] = store.search(query, 2, question, lexical_weight=0.5)
    assert first == "doc-1" and second == "doc-0"
    assert cosine == pytest.approx(float(query @ store.embedding("doc-0")), abs=1e-5)  # no word of it matched
    assert score > float(query @ store.embedding("doc-1"))
    assert store.search(query, 1, "what is the", lexical_weight=0.5)[0][0] == "doc-0"  # stopwords match nothing
    assert store.search(query, 1, 'Normans" OR (duchy', lexical_weight=0.5)[0][0] == "doc-1"  # no FTS5 syntax


def test_bm25_leaves_out_the_commonest_query_words_past_its_budget(tmp_path: Path) -> None:
    store, query = _texts_store(tmp_path)
    rng = np.random.default_rng(7)
    more = ["Normans sailed north.", "Normans built castles.", "Normans spoke French."]
    more += ["Bees make honey.", "Snow is cold.", "Owls hunt at night.", "Clocks tick."]  # BM25: a word in < half
    for i, text in enumerate(more):
        store.put(f"more-{i}", text, {}, _unit(rng, 1)[0], np.zeros(SHAPE, dtype=np.float32))
    question = "Normans duchy"  # "normans" is in 4 of 10 documents, "duchy" in 1

    def scores(**budget: int) -> dict[str, float]:
        return dict(store.search(query, 10, question, lexical_weight=0.5, **budget))

    def cosine(doc_id: str) -> float:
        return float(query @ store.embedding(doc_id))

    every, rarest = scores(), scores(max_postings=4)
    assert every["more-0"] > cosine("more-0") + 1e-3  # within the budget: both words count
    assert rarest["more-0"] == pytest.approx(cosine("more-0"), abs=1e-5)  # past it: "normans" left out
    assert rarest["doc-1"] > cosine("doc-1") + 1e-3  # "duchy" kept, the rarest
    assert scores(max_postings=0) == dict(store.search(query, 10))  # no word within a budget of none


def test_the_lexicon_follows_overwrites_and_deletes_and_is_built_for_an_older_store(tmp_path: Path) -> None:
    store, query = _texts_store(tmp_path)
    store.put("doc-1", "Nothing about dukes here.", {}, store.embedding("doc-1"), np.zeros(SHAPE, dtype=np.float32))
    assert store.search(query, 1, "Normans duchy", lexical_weight=0.5)[0][0] == "doc-0"  # old words gone
    assert store.search(query, 1, "dukes", lexical_weight=0.5)[0][0] == "doc-1"
    store.delete("doc-1")
    assert store.search(query, 3, "dukes", lexical_weight=0.5) == store.search(query, 3)
    # BM25's word weights need a word rarer than in half the documents: a third one
    store.put("doc-3", "Mountains are tall.", {}, _unit(np.random.default_rng(6), 1)[0], np.zeros(SHAPE))
    store.close()
    db = sqlite3.connect(tmp_path / DB_FILE)  # a store written before the lexicon existed
    db.executescript("DROP TABLE lexicon; DROP TRIGGER lexicon_insert; DROP TRIGGER lexicon_delete;")
    db.close()
    reopened = _store(tmp_path)
    assert reopened.search(query, 1, "rivers seas", lexical_weight=0.5)[0][0] == "doc-2"
