"""The sampled Fisher's labels are each example's own: drawn from its key and index only, right in distribution, and
the same store whatever the batch size, the loader's workers or a resume with another batch size."""

from __future__ import annotations

import dataclasses
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.tasks.draws import FisherDraws, _murmur
from source_proj.tasks.text import IGNORE_INDEX

from .conftest import assert_binomial

TRIALS = 20000
KEYS = 1000


def _murmur3(data: bytes) -> int:
    """Reference MurmurHash3_x86_32 (seed 0) of whole 32-bit words, in Python integers."""
    mask, h = 0xFFFFFFFF, 0
    for (k,) in struct.iter_unpack("<I", data):
        k = (((k * 0xCC9E2D51) & mask) << 15 | ((k * 0xCC9E2D51) & mask) >> 17) & mask
        h ^= (k * 0x1B873593) & mask
        h = ((((h << 13) | (h >> 19)) & mask) * 5 + 0xE6546B64) & mask
    h ^= len(data)
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & mask
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_the_draws_hash_is_murmur3_in_integer_tensor_operations_that_never_overflow() -> None:
    """The tensor hash is the reference hash on words up to 2³² − 1: its products are split so that no int64 product
    overflows, so a CUDA device computes the same bits as the CPU. Each head (integers hashed once, in Python) leads
    its own hash of the words, tensors and integers alike."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(64, 7), dtype=np.uint64)
    words[0] = 2**32 - 1
    got = _murmur([[]], [torch.tensor(words[:, i].astype(np.int64)) for i in range(7)])
    expected = [_murmur3(struct.pack("<7I", *map(int, row))) for row in words]
    assert got.tolist() == [expected]
    heads = [[int(w) for w in rng.integers(0, 2**32, size=2)], [2**32 - 1, 0]]
    tail = [torch.tensor(words[:, 2].astype(np.int64)), int(words[1, 3]), torch.tensor(words[:, 4].astype(np.int64))]
    got = _murmur(heads, tail)
    expected = [
        [_murmur3(struct.pack("<5I", *head, int(row[2]), int(words[1, 3]), int(row[4]))) for row in words]
        for head in heads
    ]
    assert got.tolist() == expected


def test_an_examples_draws_depend_on_its_key_and_index_not_on_its_batch() -> None:
    whole = FisherDraws.of([5, 1], range(10)).per_example(3)
    alone = torch.cat([FisherDraws.of([5, 1], [i]).per_example(3) for i in range(10)])
    shuffled = FisherDraws.of([5, 1], [7, 2, 9]).per_example(3)
    assert torch.equal(whole, alone) and torch.equal(shuffled, whole[[7, 2, 9]])
    assert not torch.equal(FisherDraws.of([5, 2], range(10)).per_example(3), whole)  # another checkpoint's key
    assert ((whole >= 0) & (whole < 1)).all() and len(set(whole.flatten().tolist())) == 30
    # Positions are numbered among the marked ones: padding on either side moves no draw.
    keep = torch.tensor([[False, True, True, False], [True, True, False, False]])
    left = torch.tensor([[False, False, True, True, False], [False, True, True, False, False]])
    draws = FisherDraws.of([3], [4, 8])
    assert torch.equal(draws.at(keep)[keep], draws.at(left)[left]) and (draws.at(keep)[~keep] == 0).all()


def test_sampled_classes_follow_the_softmax_over_keys() -> None:
    """Over many keys, each class of one example is drawn as often as its probability says (an off-by-one inverse CDF
    would shift each class's share to its neighbour); a zero-probability class is never drawn."""
    logits = torch.tensor([[2.0, -1.0, 0.5, float("-inf"), 1.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    probs = torch.softmax(logits, -1)
    task = sp.ClassificationTask()
    rows = torch.arange(2).repeat(TRIALS)
    draws = FisherDraws.of([0], range(2 * TRIALS))  # one key, many examples: the hash's independence across rows
    ((weight, batch),) = task.fisher_targets(logits.repeat(TRIALS, 1), (None, rows), draws)
    assert torch.equal(weight, torch.ones(2 * TRIALS))
    for example in range(2):
        counts = torch.bincount(batch[1][example::2], minlength=5)
        assert_binomial(counts, probs[example], TRIALS)
    assert not (batch[1][0::2] == 3).any()  # example 0 gives class 3 no probability
    # The same over keys, for one example (the hash's independence across keys). A key costs a call of its own (both
    # hashes in ~160 tensor operations), so 1,000 keys: the 5-sigma bound is then ±7.8 points on class 0's 61 %, ample
    # for a draw that ignores its key (one class always) or an off-by-one in the inverse CDF.
    one = torch.stack([task.fisher_targets(logits[:1], (None, rows[:1]), FisherDraws.of([1, t], [0]))[0][1][1]
                       for t in range(KEYS)]).flatten()  # fmt: skip
    assert_binomial(torch.bincount(one, minlength=5), probs[0], KEYS)


def test_sampled_bernoulli_labels_and_gaussian_targets_have_the_models_distribution() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.5]])
    draws = FisherDraws.of([2], range(TRIALS))
    ((_, (_, drawn)),) = sp.MultiLabelClassificationTask().fisher_targets(logits.repeat(TRIALS, 1), (None, None), draws)
    assert_binomial(drawn.sum(0), torch.sigmoid(logits[0]), TRIALS)
    pred = torch.full((TRIALS, 1), 0.25, dtype=torch.float64)
    ((_, (_, target)),) = sp.RegressionTask().fisher_targets(pred, (None, torch.zeros(TRIALS)), draws)
    shift = (0.25 - target) * 2**0.5  # N(0, 1)
    assert abs(float(shift.mean())) < 5 / TRIALS**0.5 and abs(float(shift.var()) - 1) < 5 * (2 / TRIALS) ** 0.5
    normal = draws.normal(2)
    assert abs(float(torch.corrcoef(normal.T)[0, 1])) < 5 / TRIALS**0.5  # the two counters are independent


def test_sampled_tokens_follow_the_softmax_at_each_position() -> None:
    task = sp.LanguageModelingTask(tokens_per_sequence=3.0)
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)).repeat(TRIALS, 1, 1)
    ids = torch.tensor([[1, 2, 3, 4]]).repeat(TRIALS, 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    ((_, drawn),) = task.fisher_targets(logits, batch, FisherDraws.of([4], range(TRIALS)))
    labels = drawn["labels"]
    assert (labels[:, 0] == IGNORE_INDEX).all()
    for t in range(3):
        assert_binomial(torch.bincount(labels[:, t + 1], minlength=6), torch.softmax(logits[0, t], -1), TRIALS)
    # Two positions of one example are drawn independently (counters 0 and 1 of the same key and row).
    same = float((labels[:, 1] == labels[:, 2]).double().mean())
    expected = float((torch.softmax(logits[0, 0], -1) * torch.softmax(logits[0, 1], -1)).sum())
    assert abs(same - expected) < 5 * (expected / TRIALS) ** 0.5


TASKS = {"classification": (sp.ClassificationTask, 3), "regression": (sp.RegressionTask, 1)}


def _data(kind: str) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (40,), generator=g) if kind == "classification" else x.sum(1))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, TASKS[kind][1]))


@pytest.fixture(scope="module", params=sorted(TASKS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind, path = request.param, tmp_path_factory.mktemp("draws") / "run"
    model, task = _model(kind), TASKS[kind][0]()
    batch = _data(kind).tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = sp.TrajectoryRecorder(path, model, opt, save_every=3)
    rec.begin_stage("main", dataset_size=len(batch[1]))
    for _ in range(6):
        opt.zero_grad()
        task.loss(model(batch[0]), batch).mean().backward()
        opt.step()
        rec.step()
    rec.close()
    return kind, path


OPTIONS = sp.FeaturizeArguments(batch_size=4, chunk_rows=20, device="cpu", fisher_examples=None)


def _featurize(run: tuple[str, Path], store: Path, options: sp.FeaturizeArguments) -> sp.Store:
    kind, path = run
    return sp.featurize(path, _model(kind), TASKS[kind][0](), _data(kind), store, options=options, progress=False,
                        projection=sp.ProjectionArguments(dim=16, seed=3, kind="rademacher"))  # fmt: skip


def _arrays(store: Path, prefix: str) -> dict[str, np.ndarray]:
    opened = sp.Store.open(store)
    return {name: opened.read(name) for name in opened.nodes(prefix) if opened.node_type(name) == "array"}


def _scores(kind: str, store: Path) -> np.ndarray:
    sp.fit(store, sp.FitArguments(), progress=False)
    queries = TensorDataset(*(t[:5] + 0.5 for t in _data(kind).tensors))
    if kind == "classification":
        queries = TensorDataset(queries.tensors[0], torch.arange(5) % 3)
    return sp.Attributor(store, _model(kind), TASKS[kind][0]()).scores(queries)


def test_the_sampled_fisher_and_scores_do_not_depend_on_the_batch_size_the_chunks_or_the_loaders_workers(
    run: tuple[str, Path], tmp_path: Path
) -> None:
    """Before, each row chunk drew its labels from a generator of its own, in batch order: another chunk size drew
    other labels, and so did another batch size where a draw is not one number per example in turn (the regression
    task's Gaussian targets)."""
    _featurize(run, tmp_path / "four.sp", OPTIONS)
    _featurize(run, tmp_path / "seven.sp", dataclasses.replace(OPTIONS, batch_size=7, chunk_rows=10, num_workers=2))
    four, seven = _arrays(tmp_path / "four.sp", "fisher"), _arrays(tmp_path / "seven.sp", "fisher")
    assert len(four) == 3 and four.keys() == seven.keys()
    for name in four:  # the same labels: the gradients agree to float32 rounding of other batch shapes
        np.testing.assert_allclose(seven[name], four[name], rtol=1e-5, atol=1e-6)
    kind = run[0]
    np.testing.assert_allclose(_scores(kind, tmp_path / "seven.sp"), _scores(kind, tmp_path / "four.sp"), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    assert sp.Store.open(tmp_path / "four.sp").meta["featurize"]["fisher_draws"] == "example-keyed-murmur3-v1"


def test_a_featurize_resumed_with_another_batch_size_draws_the_labels_an_uninterrupted_one_draws(
    run: tuple[str, Path], tmp_path: Path
) -> None:
    """Chunks left unfinished (as a kill leaves them) are recomputed in one batch of 20: the same Fisher. (Before, a
    chunk's generator gave the regression task's 20 Gaussian targets in another order than five batches of 4 did.)"""
    reference = _featurize(run, tmp_path / "reference.sp", OPTIONS)
    shutil.copytree(tmp_path / "reference.sp", tmp_path / "resumed.sp")
    store = sp.Store.open(tmp_path / "resumed.sp", writable=True)
    names = [n for n in store.progress_arrays() if n.startswith(("grads/", "fisher/"))]
    assert names
    for name in names:
        store.mark_pending(name, [1])
    _featurize(run, tmp_path / "resumed.sp", dataclasses.replace(OPTIONS, batch_size=20))
    resumed = _arrays(tmp_path / "resumed.sp", "fisher")
    for name, values in _arrays(Path(reference.path), "fisher").items():
        np.testing.assert_allclose(resumed[name], values, rtol=1e-5, atol=1e-6)


def test_a_store_of_per_batch_draws_is_not_resumed_with_per_example_ones(run: tuple[str, Path], tmp_path: Path) -> None:
    store = _featurize(run, tmp_path / "old.sp", OPTIONS)
    featurize = dict(store.meta["featurize"])
    del featurize["fisher_draws"]  # as the library wrote it before
    sp.Store.open(tmp_path / "old.sp", writable=True).update_meta(featurize=featurize)
    with pytest.raises(sp.StoreError, match=r"other settings.*fisher_draws"):
        _featurize(run, tmp_path / "old.sp", OPTIONS)


def test_the_eigen_basis_pass_draws_the_same_labels_in_batches_of_any_size(
    run: tuple[str, Path], tmp_path: Path
) -> None:
    """The eigen projection's basis comes from a Fisher pass at every checkpoint: its labels too are each example's
    (before, one generator ran through every visit's batches, and the regression task's Gaussian targets came out
    in another order in batches of 20)."""
    kind, path = run
    bases = []
    for size in (4, 20):
        store = sp.featurize(path, _model(kind), TASKS[kind][0](), _data(kind), tmp_path / f"{size}.sp",
                             options=dataclasses.replace(OPTIONS, batch_size=size), progress=False,
                             projection=sp.ProjectionArguments(dim=16, seed=3, kind="eigen"))  # fmt: skip
        assert store.meta["projection"]["kind"] == "eigen"
        bases.append(_arrays(tmp_path / f"{size}.sp", "projection"))
    assert bases[0] and bases[0].keys() == bases[1].keys()
    for name, values in bases[0].items():  # eigenvectors up to sign: compare |⟨u, v⟩| row by row
        other = bases[1][name]
        np.testing.assert_allclose(np.abs((values * other).sum(-1)), 1.0, atol=1e-4)
