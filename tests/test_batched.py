"""Batched retraining (torch.func) equals the plain sequential SGD loop, copy by copy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.evaluation.batched import BatchedRetrain, BatchedSGD, SGDStage
from source_proj.query.attributor import StageRows


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def stages() -> list[SGDStage]:
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(13, 6, generator=g), torch.randn(7, 6, generator=g)
    ya, yb = torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (7,), generator=g)
    return [
        SGDStage("a", xa, ya, epochs=3, lr=0.1, batch_size=4, momentum=0.9, weight_decay=1e-2),
        SGDStage("b", xb, yb, epochs=2, lr=0.05, batch_size=3, momentum=0.5),
    ]


def sequential(
    keep: dict[str, np.ndarray],
    seed: int,
    builder: Callable[[int], nn.Module] = build,
    lr_ratio: dict[str, float] | None = None,
) -> nn.Module:
    """The reference: torch.optim.SGD, the same shuffle with the dropped examples removed from every batch;
    ``lr_ratio`` puts each parameter it names in a parameter group of its own at that ratio × the stage's rate."""
    model = builder(seed)
    gen = torch.Generator().manual_seed(seed)
    ratios = lr_ratio or {}
    for st in stages():
        groups = [{"params": [p for n, p in model.named_parameters() if n not in ratios]}]
        groups += [{"params": [p], "lr": st.lr * ratios[n]} for n, p in model.named_parameters() if n in ratios]
        opt = torch.optim.SGD(groups, lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay)
        mask = torch.ones(st.size, dtype=torch.bool)
        if st.name in keep:
            mask[:] = False
            mask[torch.as_tensor(keep[st.name], dtype=torch.long)] = True
        for _ in range(st.epochs):
            order = torch.randperm(st.size, generator=gen)
            for b in range(st.steps_per_epoch):
                idx = order[b * st.batch_size : (b + 1) * st.batch_size]
                idx = idx[mask[idx]]
                if len(idx) == 0:
                    continue
                loss = F.cross_entropy(model(st.inputs[idx]), st.targets[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model


# Copy 2 keeps two examples of stage "a": most of its batches are empty and must make no step
# (and leave the momentum alone); copy 3 keeps everything.
KEEPS = [
    {"a": np.array([0, 2, 3, 5, 8, 9, 12])},
    {"a": np.array([1, 4, 6, 7, 10, 11])},
    {"a": np.array([4, 9])},
    {},
]
SEEDS = [3, 11, 2**40 + 7, 0]


def test_batched_sgd_equals_sequential_training_copy_by_copy() -> None:
    trainer = BatchedSGD(build, sp.ClassificationTask(), stages())
    params = trainer.train(KEEPS, SEEDS)
    for m, (keep, seed) in enumerate(zip(KEEPS, SEEDS, strict=True)):
        reference = dict(sequential(keep, seed).named_parameters())
        untrained = dict(build(seed).named_parameters())
        for name, p in params.items():
            torch.testing.assert_close(p[m], reference[name].detach(), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(p[m], untrained[name])
    queries = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0])
    measured = trainer.measure(params, *queries)
    for m, (keep, seed) in enumerate(zip(KEEPS, SEEDS, strict=True)):
        model = sequential(keep, seed)
        with torch.no_grad():
            expected = sp.ClassificationTask().measurement(model(queries[0]), queries)
        torch.testing.assert_close(measured[m], expected, rtol=1e-5, atol=1e-5)


def test_batched_sgd_with_lr_ratios_equals_torch_sgd_with_parameter_groups_copy_by_copy() -> None:
    """``lr_ratio``: the head at 5× the stage's rate and one body bias at 0.5× train as ``torch.optim.SGD`` with those
    parameter groups (momentum and weight decay too), copy by copy; the same copies without it differ."""
    ratios = {"2.weight": 5.0, "2.bias": 5.0, "0.bias": 0.5}
    params = BatchedSGD(build, sp.ClassificationTask(), stages(), lr_ratio=ratios).train(KEEPS, SEEDS)
    plain = BatchedSGD(build, sp.ClassificationTask(), stages()).train(KEEPS, SEEDS)
    for m, (keep, seed) in enumerate(zip(KEEPS, SEEDS, strict=True)):
        reference = dict(sequential(keep, seed, lr_ratio=ratios).named_parameters())
        for name, p in params.items():
            torch.testing.assert_close(p[m], reference[name].detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(params["2.weight"][m], plain["2.weight"][m], rtol=1e-3, atol=1e-4)


def test_batched_sgd_refuses_an_lr_ratio_of_an_unknown_parameter_or_a_negative_one() -> None:
    with pytest.raises(sp.TaskError, match=r"lr_ratio names 'head\.weight', which is not a parameter"):
        BatchedSGD(build, sp.ClassificationTask(), stages(), lr_ratio={"head.weight": 5.0})
    with pytest.raises(sp.TaskError, match=r"ratio -1\.0; give each a finite ratio"):
        BatchedSGD(build, sp.ClassificationTask(), stages(), lr_ratio={"2.weight": -1.0})


class Counting(BatchedRetrain):
    calls = 0

    def retrain_many(self, keeps, seeds):  # type: ignore[no-untyped-def]
        Counting.calls += 1
        return super().retrain_many(keeps, seeds)


def test_lds_ground_truth_with_a_batched_retrain_equals_the_plain_one_and_resumes(tmp_path) -> None:
    queries = torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 0])

    def plain(keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        model = sequential(keep, seed)
        with torch.no_grad():
            return sp.ClassificationTask().measurement(model(queries[0]), queries).numpy()

    rows = [StageRows("a", 0, 13)]
    args = ev.LDSArguments(num_subsets=4, repeats=2)
    batched = Counting(BatchedSGD(build, sp.ClassificationTask(), stages()), *queries, models_per_call=3)
    truth = ev.lds_ground_truth(batched, rows, tmp_path / "batched", args, progress=False)
    assert Counting.calls == 3  # 8 models in groups of 3
    reference = ev.lds_ground_truth(plain, rows, tmp_path / "plain", args, progress=False)
    np.testing.assert_allclose(truth.measurements, reference.measurements, rtol=1e-4, atol=1e-5)
    again = ev.lds_ground_truth(batched, rows, tmp_path / "batched", args, progress=False)
    assert Counting.calls == 3  # every model came from the cache
    np.testing.assert_array_equal(again.measurements, truth.measurements)
    np.testing.assert_allclose(batched({"a": np.arange(5)}, 9), plain({"a": np.arange(5)}, 9), rtol=1e-4, atol=1e-5)


def test_batched_training_refuses_batchnorm_and_bad_subsets() -> None:
    def with_norm(seed: int) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))

    with pytest.raises(sp.TaskError, match="without buffers or dropout"):
        BatchedSGD(with_norm, sp.ClassificationTask(), stages())
    trainer = BatchedSGD(build, sp.ClassificationTask(), stages())
    with pytest.raises(sp.TaskError, match=r"outside 0\.\.12"):
        trainer.train([{"a": np.array([13])}], [0])


def test_a_kept_subset_of_a_stage_the_trainer_does_not_have_is_refused_not_trained_on_everything() -> None:
    """A recorder stage named "main" against an SGDStage named "train" kept every example in every copy: a ground
    truth that did not depend on the subsets, and an LDS near zero for every method."""
    trainer = BatchedSGD(build, sp.ClassificationTask(), stages())
    with pytest.raises(sp.TaskError, match=r"'main'.*\['a', 'b'\]"):
        trainer.train([{"a": np.array([1, 2])}, {"main": np.array([0, 1])}], [0, 1])


def test_frozen_parameters_stay_frozen_as_torch_sgd_leaves_them() -> None:
    """torch.optim.SGD skips a parameter without a gradient (requires_grad=False); the batched copies used to train
    it, weight decay and all: a fine-tuning recipe with a frozen layer got another model's ground truth."""

    def frozen_first_layer(seed: int) -> nn.Module:
        model = build(seed)
        model[0].requires_grad_(False)
        return model

    trainer = BatchedSGD(frozen_first_layer, sp.ClassificationTask(), stages())
    params = trainer.train(KEEPS, SEEDS)
    for m, (keep, seed) in enumerate(zip(KEEPS, SEEDS, strict=True)):
        reference = dict(sequential(keep, seed, frozen_first_layer).named_parameters())
        for name, p in params.items():
            torch.testing.assert_close(p[m], reference[name].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(params["0.weight"][m], build(seed)[0].weight.detach(), rtol=0, atol=0)


def test_a_batched_retrain_with_unequal_query_inputs_and_targets_is_refused_when_built() -> None:
    """It used to train a whole group of models, then fail in the measurement with a torch size mismatch."""
    trainer = BatchedSGD(build, sp.ClassificationTask(), stages())
    with pytest.raises(sp.TaskError, match="5 query inputs and 3 targets"):
        BatchedRetrain(trainer, torch.randn(5, 6), torch.tensor([0, 1, 2]))
    with pytest.raises(sp.TaskError, match="at least one model per call"):
        BatchedRetrain(trainer, torch.randn(3, 6), torch.tensor([0, 1, 2]), models_per_call=0)


def test_a_model_builder_without_a_seed_is_refused_in_one_sentence() -> None:
    """The other guides' zero-argument build_model() ended in a TypeError traceback from inside BatchedSGD."""
    with pytest.raises(sp.TaskError, match=r"calls build_model\(seed\) for each copy .* takes no seed"):
        BatchedSGD(lambda: build(0), sp.ClassificationTask(), stages())


@pytest.mark.parametrize("size", [12, 14])
def test_rows_of_another_size_than_the_trainers_stage_are_refused_before_any_retrain(tmp_path, size: int) -> None:
    """Stage "a" holds 13 examples; attributed rows of 14 were refused only as a kept index outside the stage,
    and rows of 12 trained every copy on example 12 as well, a ground truth of other data than the scores'."""
    batched = Counting(BatchedSGD(build, sp.ClassificationTask(), stages()), torch.randn(2, 6), torch.tensor([0, 1]))
    calls = Counting.calls
    rows = [StageRows("a", 0, size)]
    expected = rf"SGDStage 'a' holds 13 examples but the attributed stage has {size} rows"
    with pytest.raises(sp.TaskError, match=expected):
        ev.lds_ground_truth(batched, rows, tmp_path / "lds", ev.LDSArguments(num_subsets=4), progress=False)
    with pytest.raises(sp.TaskError, match=expected):
        ev.subset_removal({"m": np.zeros((2, size))}, batched, rows, tmp_path / "removal", progress=False)
    assert Counting.calls == calls
