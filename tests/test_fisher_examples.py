"""``FeaturizeArguments.fisher_examples``: the projected Fisher of whole batches drawn in every row chunk,
checked against the Fisher of every example (its rows at the batches taken), fit's curvature against the
rows' own mean, a sharded run against one process, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import _fisher_examples
from source_proj.distributed import Shard
from source_proj.errors import TaskError
from source_proj.featurize import arguments
from source_proj.featurize.arguments import AUTO_FISHER_MIN, AUTO_FISHER_PER_K, FisherRows, resolve_fisher_examples
from source_proj.methods.fit import checkpoint_curvature
from source_proj.store.info import store_summary
from source_proj.store.store import Store, ckpt_key

from .conftest import _classification_data, full_batch_run, mlp

BATCH, CHUNK = 3, 9  # 30 examples: chunks of 9, 9, 9 and 3 rows, of 3, 3, 3 and 1 batches


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once for the module and only read (featurize reads it): checkpoints at steps 0, 5 and 10."""
    path = tmp_path_factory.mktemp("fisher-examples") / "run"
    torch.manual_seed(0)
    full_batch_run(path, mlp(), _classification_data(), lambda o, t: F.cross_entropy(o, t, reduction="none"),
                   lr=0.1, steps=10, save_every=5)  # fmt: skip
    return path


_finished: dict[tuple, Path] = {}
"""The finished stores :func:`_featurize` wrote, by their run and settings: a later call with the same ones gets a
copy (the tests featurize some settings several times; what they test is what the store holds)."""


def _featurize(run: Path, data: TensorDataset, store: Path, kind: str, fisher: str, examples: int | str | None,
               shard: Shard | None = None) -> Store:  # fmt: skip
    """``store`` featurized from ``run`` at k = 16 in chunks of 9 rows and batches of 3 (a fresh copy of an equal
    store already written, where ``store`` does not exist and no shard or ``"auto"`` is asked for)."""
    key = (run, kind, fisher, examples)
    same_data = all(torch.equal(a, b) for a, b in zip(data.tensors, _classification_data().tensors, strict=True))
    reusable = shard is None and examples != "auto" and same_data and not store.exists()
    if reusable and key in _finished:
        shutil.copytree(_finished[key], store)
        return Store.open(store)
    sp.featurize(run, mlp(), sp.ClassificationTask(), data, store,
                 projection=sp.ProjectionArguments(dim=16, kind=kind),
                 options=sp.FeaturizeArguments(batch_size=BATCH, chunk_rows=CHUNK, fisher=fisher,
                                               fisher_examples=examples),
                 progress=False, shard=shard)  # fmt: skip
    if reusable:
        _finished[key] = store.with_name(f"{store.name}.finished")
        shutil.copytree(store, _finished[key])
    return Store.open(store)


def _taken_examples(rows: FisherRows) -> list[int]:
    """The examples whose Fisher the store holds, in its order."""
    examples = []
    for chunk in range(-(-rows.size // rows.chunk_rows)):
        for batch in rows.batches(chunk) or []:
            first = chunk * rows.chunk_rows + batch * rows.batch_size
            examples += range(first, min(first + rows.batch_size, (chunk + 1) * rows.chunk_rows, rows.size))
    return examples


def test_rows_draw_whole_batches_in_every_chunk() -> None:
    rows = FisherRows.of({"fisher_examples": 8, "chunk_rows": CHUNK, "batch_size": BATCH, "seed": 0}, 30, 0)
    assert rows.share == pytest.approx(8 / 30)
    assert [len(rows.batches(c) or []) for c in range(4)] == [1, 1, 1, 1]  # ceil(0.27 × 3) = 1, at least 1
    assert rows.per_chunk == 3 and rows.total == 12 == sum(rows.rows(c) for c in range(4))
    assert rows.batches(2) == FisherRows.of({"fisher_examples": 8, "chunk_rows": CHUNK, "batch_size": BATCH,
                                             "seed": 0}, 30, 0).batches(2)  # fmt: skip
    many = FisherRows.of({"fisher_examples": 2_500, "chunk_rows": 1024, "batch_size": 64, "seed": 1}, 10_000, 2)
    assert many.per_chunk == 4 * 64  # ceil(0.25 × 16) batches of each full chunk
    # the last chunk's 784 rows: ceil(0.25 × 13) = 4 of its batches, 12 of 64 rows and one of 16
    assert len(many.batches(9) or []) == 4
    assert many.rows(9) == (3 * 64 + 16 if 12 in (many.batches(9) or []) else 4 * 64)
    assert many.total == sum(many.rows(c) for c in range(10))
    assert len(_taken_examples(many)) == many.total
    drawn = {tuple(many.batches(c) or []) for c in range(9)}
    assert len(drawn) > 1  # each chunk draws its own batches
    every = FisherRows.of({"fisher_examples": 30, "chunk_rows": CHUNK, "batch_size": BATCH}, 30, 0)
    assert every.share is None and every.batches(0) is None and every.total == 30


def test_many_rows_end_with_a_partial_batch() -> None:
    rows = FisherRows.of({"fisher_examples": 5, "chunk_rows": 8, "batch_size": 4, "seed": 3}, 11, 0)
    # chunks of 8 and 3 rows; the second is one batch of 3, so its Fisher has 3 rows
    assert rows.per_chunk == 4 and rows.rows(1) == 3 and rows.total == 7


@pytest.mark.parametrize("kind", ["factored", "rademacher"])  # one forward per batch, and a forward per quantity
def test_fisher_rows_are_the_full_fisher_at_the_batches_taken(
    run: Path, classification_data: TensorDataset, tmp_path: Path, kind: str
) -> None:
    full = _featurize(run, classification_data, tmp_path / "full.sp", kind, "exact", None)
    part = _featurize(run, classification_data, tmp_path / "part.sp", kind, "exact", 8)
    rows = FisherRows.of(part.meta["featurize"], 30, 0)
    examples = _taken_examples(rows)
    directions = part.meta["featurize"]["fisher_directions"]
    assert directions == 3 and len(examples) == rows.total == 12
    index = np.concatenate([np.arange(e * directions, (e + 1) * directions) for e in examples])
    for step in part.meta["trajectory"]["checkpoints"]:
        name = f"fisher/main/{ckpt_key(step)}"
        got, expected = part.read(name), full.read(name)[index]
        assert got.shape == (12 * directions, 16)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        grads = f"grads/main/{ckpt_key(step)}"
        np.testing.assert_array_equal(part.read(grads), full.read(grads))
        curvature = checkpoint_curvature(part, "main", step).numpy()
        x = got.astype(np.float64)
        np.testing.assert_allclose(curvature, x.T @ x / len(examples), rtol=1e-10)
    assert sp.verify_store(part.path, progress=False).problems == []


def test_sampled_fisher_of_a_share_fits_and_queries(
    run: Path, classification_data: TensorDataset, tmp_path: Path
) -> None:
    store = _featurize(run, classification_data, tmp_path / "s.sp", "factored", "sampled", 8)
    final = ckpt_key(store.meta["trajectory"]["checkpoints"][-1])
    assert store.read(f"fisher/main/{final}").shape == (12, 16)
    assert np.abs(store.read(f"fisher/main/{final}")).sum(axis=1).min() > 0  # every row taken is a gradient
    sp.fit(store.path, progress=False)
    scores = sp.Attributor(store.path, mlp(), sp.ClassificationTask()).scores(classification_data)
    assert scores.shape == (30, 30) and np.isfinite(scores).all()
    assert sp.verify_store(store.path, progress=False).problems == []
    assert store_summary(Store.open(store.path))["fisher"].startswith("sampled, of about 8 examples a stage")


def test_the_segmentation_probe_takes_its_own_share(
    run: Path, classification_data: TensorDataset, tmp_path: Path
) -> None:
    sp.featurize(run, mlp(), sp.ClassificationTask(), classification_data, tmp_path / "s.sp",
                 projection=sp.ProjectionArguments(dim=16, kind="factored"),
                 options=sp.FeaturizeArguments(batch_size=BATCH, chunk_rows=CHUNK, fisher_examples=8,
                                               segmentation=sp.SegmentationArguments(auto=2, probe_rows=12)),
                 progress=False)  # fmt: skip
    store = Store.open(tmp_path / "s.sp")
    probe = FisherRows.of(store.meta["featurize"], 12, 0)  # 8 of its 12 rows: 2 of 3 batches, then 1 of 1
    assert probe.total == 9
    assert store.array("probe/fisher/main/step-00000000").shape == (9, 16)
    assert store.array("fisher/main/step-00000000").shape == (12, 16)
    assert len(store.meta["segmentation"]["segments"]) == 2


def test_a_share_covering_the_stage_is_every_example(
    run: Path, classification_data: TensorDataset, tmp_path: Path
) -> None:
    full = _featurize(run, classification_data, tmp_path / "full.sp", "factored", "sampled", None)
    same = _featurize(run, classification_data, tmp_path / "same.sp", "factored", "sampled", 30)
    for step in full.meta["trajectory"]["checkpoints"]:
        name = f"fisher/main/{ckpt_key(step)}"
        np.testing.assert_array_equal(same.read(name), full.read(name))


def test_independent_shards_take_the_same_batches(
    run: Path, classification_data: TensorDataset, tmp_path: Path
) -> None:
    whole = _featurize(run, classification_data, tmp_path / "one.sp", "factored", "sampled", 8)
    for shard in (Shard(0, 2), Shard(1, 2)):
        split = _featurize(run, classification_data, tmp_path / "two.sp", "factored", "sampled", 8, shard)
    for step in whole.meta["trajectory"]["checkpoints"]:
        for kind in ("grads", "fisher"):
            name = f"{kind}/main/{ckpt_key(step)}"
            np.testing.assert_array_equal(Store.open(split.path).read(name), whole.read(name))


def test_refusals(run: Path, classification_data: TensorDataset, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"must be a multiple of batch_size \(--batch-size, "):
        sp.FeaturizeArguments(batch_size=4, chunk_rows=10, fisher_examples=100)
    with pytest.raises(TaskError, match="fisher_examples"):
        sp.FeaturizeArguments(fisher_examples=0)
    _featurize(run, classification_data, tmp_path / "s.sp", "factored", "sampled", 8)
    with pytest.raises(sp.StoreError, match="other settings"):  # another share is another store
        _featurize(run, classification_data, tmp_path / "s.sp", "factored", "sampled", 12)


def test_auto_takes_a_share_only_of_stages_larger_than_it() -> None:
    def auto(dim: int, sizes: list[int], recorded: dict | None = None, **options: object) -> int | None:
        return resolve_fisher_examples(sp.FeaturizeArguments(**options), dim, sizes, recorded)  # type: ignore[arg-type]

    assert AUTO_FISHER_PER_K == 32 and AUTO_FISHER_MIN == 65_536
    assert auto(1024, [65_536]) is None  # the floor covers the stage
    assert auto(1024, [100, 65_537]) == 65_536  # one larger stage is enough (FisherRows keeps the smaller one whole)
    assert auto(16, [10**6]) == 65_536  # never below AUTO_FISHER_MIN
    assert auto(4096, [131_072]) is None and auto(4096, [200_000]) == 131_072  # 32 k above the floor
    # Where no share can be taken, every example (an explicit number would be refused there instead).
    assert auto(1024, [10**6], fisher="empirical") is None
    assert auto(1024, [10**6], shard_parameters=True) is None
    assert auto(1024, [10**6], batch_size=48) is None  # chunk_rows 1024 is not a multiple of 48
    # A store resumed or grown keeps what it recorded; explicit values stay as they are.
    assert auto(1024, [10**6], {"chunk_rows": 1024}) is None
    assert auto(1024, [10**6], {"fisher_examples": 4096}) == 4096
    assert auto(1024, [10**6], fisher_examples=None) is None
    assert auto(1024, [10**6], {}, fisher_examples=100) == 100


def test_auto_is_the_explicit_share_and_resumes_a_store_as_it_was(
    run: Path, classification_data: TensorDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the constants shrunk to this 30-example stage (k = 16): ``"auto"`` is ``max(16 / 8, 10) = 10``
    examples, the store of ``fisher_examples=10``; on a store written with every example it resumes that store
    (no refusal for other settings) until overwritten."""
    monkeypatch.setattr(arguments, "AUTO_FISHER_PER_K", 1 / 8)
    monkeypatch.setattr(arguments, "AUTO_FISHER_MIN", 10)
    explicit = _featurize(run, classification_data, tmp_path / "ten.sp", "factored", "sampled", 10)
    auto = _featurize(run, classification_data, tmp_path / "auto.sp", "factored", "sampled", "auto")
    assert auto.meta["featurize"]["fisher_examples"] == 10
    assert auto.meta["featurize"] == explicit.meta["featurize"]
    for step in auto.meta["trajectory"]["checkpoints"]:
        for kind in ("grads", "fisher"):
            name = f"{kind}/main/{ckpt_key(step)}"
            np.testing.assert_array_equal(auto.read(name), explicit.read(name))
    every = _featurize(run, classification_data, tmp_path / "every.sp", "factored", "sampled", None)
    again = _featurize(run, classification_data, every.path, "factored", "sampled", "auto")
    assert "fisher_examples" not in again.meta["featurize"]
    sp.featurize(run, mlp(), sp.ClassificationTask(), classification_data, every.path,
                 projection=sp.ProjectionArguments(dim=16, kind="factored"),
                 options=sp.FeaturizeArguments(batch_size=BATCH, chunk_rows=CHUNK), overwrite=True,
                 progress=False)  # fmt: skip
    assert Store.open(every.path).meta["featurize"]["fisher_examples"] == 10


def test_the_cli_reads_auto_all_and_numbers() -> None:
    assert _fisher_examples("auto") == "auto" and _fisher_examples(" AUTO ") == "auto"
    assert _fisher_examples("all") is None and _fisher_examples("4096") == 4096
    for bad in ("0", "-3", "half", "1e5"):
        with pytest.raises(click.BadParameter, match="'all' or 'auto'"):
            _fisher_examples(bad)


def test_a_featurize_out_of_memory_resumes_its_share_with_half_the_batch(
    run: Path, classification_data: TensorDataset, tmp_path: Path
) -> None:
    """A featurize of a Fisher share that stops part-way (out of memory) resumes its store with a batch size that
    divides the share's batches: the store records the share's batches, not the new size, and holds the Fisher of
    the same examples (the exact Fisher: their values, to rounding) and the same gradients as the uninterrupted
    one. A batch size that does not divide them is refused in one sentence that names those that do."""

    def featurize(store: Path, batch: int, model: torch.nn.Module | None = None) -> Store:
        sp.featurize(run, model or mlp(), sp.ClassificationTask(), classification_data, store,
                     projection=sp.ProjectionArguments(dim=16, kind="factored"),
                     options=sp.FeaturizeArguments(batch_size=batch, chunk_rows=8, fisher="exact", fisher_examples=8),
                     progress=False)  # fmt: skip
        return Store.open(store)

    whole = featurize(tmp_path / "whole.sp", 4)
    calls = []

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        calls.append(args[0].shape[0])
        if calls.count(4) > 12:  # some chunks are written by then
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes.")

    model = mlp()
    model.register_forward_pre_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        featurize(tmp_path / "s.sp", 4, model)
    partial = Store.open(tmp_path / "s.sp")
    names = partial.progress_arrays("grads/")
    total = sum(partial.num_chunks(name) for name in names)
    assert 0 < total - sum(len(partial.pending_chunks(name)) for name in names) < total  # stopped part-way
    with pytest.raises(sp.StoreError, match=r"in batches of 4; resume it with a batch size that divides 4 \(2 or 1\)"):
        featurize(tmp_path / "s.sp", 8)
    resumed = featurize(tmp_path / "s.sp", 2)
    assert resumed.meta["featurize"] == whole.meta["featurize"]  # batch_size: the share's, 4
    for step in whole.meta["trajectory"]["checkpoints"]:
        for kind in ("grads", "fisher"):
            name = f"{kind}/main/{ckpt_key(step)}"
            assert resumed.read(name).shape == whole.read(name).shape
            np.testing.assert_allclose(resumed.read(name), whole.read(name), rtol=1e-5, atol=1e-6)
    assert sp.verify_store(resumed.path, progress=False).problems == []
