"""Per-example gradients: the layer-hook path equals torch.func's vmap(grad) and plain autograd one
example at a time; models the hooks cannot see whole keep torch.func; the hook path imports no
torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils._pytree import tree_map

import source_proj as sp
from source_proj.projection.factory import make_projector, projector_from_meta
from source_proj.projection.layers import factorable_layers
from source_proj.tasks.gradients import PerExampleGradients, batch_size
from source_proj.tasks.task import Batch

from .test_factored import _Tokens

ROOT = Path(__file__).resolve().parents[1]


def _torch_func(grads_fn: PerExampleGradients, batch: Batch, quantity: str, names: list[str]) -> dict[str, Any]:
    """The torch.func path (vmap of grad), whatever the hook path would do."""
    func = PerExampleGradients(grads_fn.model, grads_fn.task, grads_fn.param_names, precision=grads_fn.precision,
                               hooks=False)  # fmt: skip
    got = func(batch, quantity, names=names)
    assert not func._hooked_layers
    return got


def _one_by_one(model: nn.Module, task: sp.Task, batch: Batch, names: list[str], quantity: str) -> dict[str, Any]:
    """Per-example gradients by definition: the model's own autograd on each example alone (eval mode)."""
    model.eval()
    params = dict(model.named_parameters())
    value = task.loss if quantity == "loss" else task.measurement
    rows = []
    for i in range(batch_size(batch)):
        one = tree_map(lambda t, i=i: t[i : i + 1], batch)
        rows.append(torch.autograd.grad(value(task.forward(model, one), one).sum(), [params[n] for n in names]))
    return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}


class _Shared(nn.Module):
    """One Linear applied twice, in-place ReLU, a weight tied between two Linear modules, no-bias layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 7, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(7, 3, bias=False)
        self.tied = nn.Linear(7, 3, bias=False)
        self.tied.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(torch.tanh(self.fc1(x))))  # fc1 used twice
        h = self.act(self.fc2(h))
        return self.head(h) + 0.5 * self.tied(h)


class _Conv(nn.Module):
    """Conv1d/2d/3d with stride, dilation, reflect padding, without bias; a linear head (torch.func's)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(5, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(4, 4, 2, dilation=2)
        self.t = nn.Conv1d(4, 3, 2)
        self.v = nn.Conv3d(1, 2, 2)
        self.fc = nn.Linear(3 + 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))  # [B, 4, 3, 3]
        t = torch.tanh(self.t(h.flatten(2))).mean(2)  # [B, 3]
        v = torch.tanh(self.v(x[:, :1, :4, :4].reshape(-1, 1, 2, 2, 4))).mean((2, 3, 4))  # [B, 2]
        return self.fc(torch.cat([t, v], dim=1))


class _Sequence(nn.Module):
    """Token inputs [B, T, d] through position-wise Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x))).sum(dim=1)


class _Normed(nn.Module):
    """Dropout and BatchNorm (which eval mode must switch off); only the Linear layers are selected."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.norm(self.fc1(x)))))


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=23, n_positions=8, n_embd=16, n_layer=1, n_head=2, attn_implementation="eager"
    )  # wte tied to lm_head, Conv1D layers, wpe over [1, T] positions
    return transformers.GPT2LMHeadModel(config)


def _labels(g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 3, (5,), generator=g)


def _normed() -> nn.Module:
    model = _Normed()
    model.norm.running_mean.normal_()
    model.norm.running_var.uniform_(0.5, 2.0)
    return model.train()  # PerExampleGradients must put it in eval mode


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Batch], Callable[[], sp.Task]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
            lambda g: (torch.randn(5, 4, generator=g), _labels(g)), sp.ClassificationTask),
    "shared": (_Shared, lambda g: (torch.randn(5, 6, generator=g), _labels(g)), sp.ClassificationTask),
    "sequence": (_Sequence, lambda g: (torch.randn(5, 7, 5, generator=g), _labels(g)), sp.ClassificationTask),
    "tokens": (_Tokens, lambda g: (torch.randint(0, 11, (5, 7), generator=g), _labels(g)), sp.ClassificationTask),
    "eval-mode": (_normed, lambda g: (torch.randn(5, 6, generator=g), _labels(g)), sp.ClassificationTask),
    "gpt2": (_gpt2, lambda g: {"input_ids": torch.randint(1, 23, (5, 8), generator=g),
                               "attention_mask": torch.ones(5, 8, dtype=torch.long)},
             lambda: sp.LanguageModelingTask(tokens_per_sequence=7, parameters=sp.ParameterSelection())),
}  # fmt: skip


def _factorable(model: nn.Module) -> list[str]:
    layers, _ = factorable_layers(model, [n for n, _ in model.named_parameters()])
    return [n for layer in layers for n in (layer.weight, layer.bias) if n]


def _close(got: dict[str, Any], want: dict[str, Any], names: list[str], rtol: float) -> None:
    assert list(got) == names
    for n in names:
        assert got[n].shape == want[n].shape and got[n].dtype == want[n].dtype, n
        assert float((got[n] - want[n]).norm()) <= rtol * float(want[n].norm()) + 1e-7, n


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("quantity", ["loss", "measurement"])
def test_hook_gradients_equal_torch_func_and_autograd_one_by_one(case: str, quantity: str) -> None:
    build, inputs, make_task = CASES[case]
    torch.manual_seed(0)
    model, task = build(), make_task()
    batch = inputs(torch.Generator().manual_seed(1))
    names = _factorable(model)
    grads_fn = PerExampleGradients(model, task, names)
    got = grads_fn(batch, quantity)
    assert grads_fn._hooked_layers[tuple(names)] is not None  # the hook path was taken
    _close(got, _torch_func(grads_fn, batch, quantity, names), names, 1e-5)
    _close(got, _one_by_one(model, task, batch, names, quantity), names, 1e-5)


def test_a_subset_of_names_gets_only_those_gradients_with_the_others_fixed() -> None:
    torch.manual_seed(0)
    model = _Shared()
    task = sp.ClassificationTask()
    batch = (torch.randn(5, 6), _labels(torch.Generator().manual_seed(1)))
    grads_fn = PerExampleGradients(model, task, _factorable(model))
    subset = ["head.weight", "fc1.weight", "fc1.bias"]  # out of model order; fc2 fixed
    got = grads_fn(batch, "loss", names=subset)
    assert grads_fn._hooked_layers[tuple(subset)] is not None
    _close(got, _one_by_one(model, task, batch, subset, "loss"), subset, 1e-5)


def test_bf16_hook_gradients_agree_with_torch_func_under_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
    names = _factorable(model)
    grads_fn = PerExampleGradients(model, sp.ClassificationTask(), names, precision="bf16")
    got = grads_fn(batch, "loss")
    assert grads_fn._hooked_layers[tuple(names)] is not None
    _close(got, _torch_func(grads_fn, batch, "loss", names), names, 3e-2)  # bf16 rounding, not a wrong term


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + F.linear(x, self.fc.weight)  # the weight also used outside its module


class _Flattening(nn.Module):
    def __init__(self, interleave: bool = True) -> None:
        super().__init__()
        self.fc, self.interleave = nn.Linear(4, 3), interleave

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleave:  # [T·B, 4], position by position: the examples interleaved along the first dimension
            return self.fc(x.transpose(0, 1).reshape(-1, 4)).reshape(x.shape[1], x.shape[0], 3).sum(0)
        return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1, 3).sum(1)  # [B·T, 4], example by example (OPT)


class _Mixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(0))  # every example's output depends on the others


class _Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=x)  # no positional input for a hook to read


@pytest.mark.parametrize(
    ("build", "shape"),
    [(_Functional, (4, 4)), (_Flattening, (4, 2, 4)), (_Flattening, (2, 2, 4)), (_Mixing, (4, 4)), (_Keyword, (4, 4))],
)
def test_models_the_hooks_cannot_see_whole_keep_torch_func(build: Callable[[], nn.Module], shape: tuple) -> None:
    torch.manual_seed(0)
    model = build()
    task = sp.ClassificationTask()
    batch = (torch.randn(*shape), torch.randint(0, 3, (shape[0],)))
    names = ["fc.weight", "fc.bias"]
    grads_fn = PerExampleGradients(model, task, names)
    got = grads_fn(batch, "loss")
    assert grads_fn._hooked_layers[(*names,)] is None
    _close(got, _torch_func(grads_fn, batch, "loss", names), names, 1e-6)


def test_a_linear_layer_seeing_positions_flattened_example_by_example_takes_the_hook_path() -> None:
    """OPT's MLP reshapes [B, T, d] to [B·T, d]: its rows group by example, and the hook path (checked against
    autograd one example at a time) takes it rather than torch.func."""
    torch.manual_seed(0)
    model, task = _Flattening(interleave=False), sp.ClassificationTask()
    batch = (torch.randn(4, 3, 4), torch.randint(0, 3, (4,)))
    names = ["fc.weight", "fc.bias"]
    grads_fn = PerExampleGradients(model, task, names)
    got = grads_fn(batch, "loss")
    assert grads_fn._hooked_layers[(*names,)] is not None
    _close(got, _one_by_one(model, task, batch, names, "loss"), names, 1e-5)


def test_a_scaled_word_embedding_tied_to_its_head_takes_the_hook_path_with_its_scale() -> None:
    """Gemma's embedding multiplies its rows by √d in a forward of its own and is tied to the LM head: the hooks
    scale its output gradient back, and its per-example gradients (both uses) equal autograd's one by one."""
    from .test_factored import _causal_lm

    model, task = _causal_lm("gemma")(), sp.LanguageModelingTask(tokens_per_sequence="own",
                                                                 parameters=sp.ParameterSelection(include=("*embed*",)))
    assert type(model.model.embed_tokens).__name__.endswith("ScaledWordEmbedding")
    batch = {"input_ids": torch.randint(1, 23, (3, 6), generator=torch.Generator().manual_seed(0))}
    names = task.select_parameters(model)
    grads_fn = PerExampleGradients(model, task, names)
    got = grads_fn(batch, "loss")
    assert names == ["model.embed_tokens.weight"] and grads_fn._hooked_layers[tuple(names)] is not None
    _close(got, _one_by_one(model, task, batch, names, "loss"), names, 1e-5)


def test_convolutions_keep_torch_func() -> None:
    torch.manual_seed(0)
    model, task = _Conv(), sp.ClassificationTask()
    batch = (torch.randn(3, 3, 9, 9), torch.tensor([0, 1, 2]))
    names = _factorable(model)
    grads_fn = PerExampleGradients(model, task, names)
    got = grads_fn(batch, "measurement")
    assert "c1.weight" in names and grads_fn._hooked_layers[tuple(names)] is None
    _close(got, _one_by_one(model, task, batch, names, "measurement"), names, 1e-5)


class _Recurrent(nn.Module):
    """A recurrent layer (its fused kernel fails under torch.func.vmap) and a linear head."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn, self.head = cell(4, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_models_take_autograd_one_example_at_a_time_and_featurize(cell: type[nn.RNNBase], tmp_path) -> None:
    """vmap of an LSTM failed with a broadcast RuntimeError, from featurize as a traceback: a model with a recurrent
    module takes plain autograd example by example, and its features are the projected exact gradients."""
    torch.manual_seed(0)
    model = _Recurrent(cell)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 5, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    _exact_per_example_and_featurized(model, lambda: _Recurrent(cell), data, tmp_path)


def _exact_per_example_and_featurized(model: nn.Module, build: Callable[[], nn.Module], data, tmp_path) -> None:
    """``model``'s per-example gradients on ``data`` are plain autograd's one example at a time; trained one SGD step
    and featurized (a fresh ``build()`` loading the checkpoint), its features are those gradients projected."""
    task = sp.ClassificationTask()
    names = [n for n, _ in model.named_parameters()]
    got = PerExampleGradients(model, task, names)(data.tensors, "measurement")
    _close(got, _one_by_one(model, task, data.tensors, names, "measurement"), names, 1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=1)
    rec.begin_stage("main", dataset_size=len(data))
    F.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
    opt.step()
    rec.step()
    rec.close()
    store = sp.featurize(tmp_path / "run", build(), task, data, tmp_path / "s.sp", progress=False,
                         projection=sp.ProjectionArguments(dim=16, kind="factored"))  # fmt: skip
    exact = _one_by_one(model, task, data.tensors, names, "loss")
    features = torch.from_numpy(np.asarray(store.read("grads/main/step-00000001")))
    expected = projector_from_meta(store.meta, model).project(exact)
    assert float((features - expected).norm() / expected.norm()) < 1e-5


class _Renormed(nn.Module):
    """An embedding that renormalises the rows it looks up to ``max_norm`` (in place, at every forward) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(12, 6, max_norm=0.5), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


def test_an_embedding_with_max_norm_takes_autograd_one_example_at_a_time_and_featurizes(tmp_path) -> None:
    """vmap failed on the embedding's in-place renormalisation (a RuntimeError about a batched index into an
    unbatched weight, from featurize as a traceback): the model takes plain autograd example by example."""
    torch.manual_seed(0)
    model = _Renormed()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 12, (8, 5), generator=g),
                                          torch.randint(0, 3, (8,), generator=g))  # fmt: skip
    assert float(model.embed.weight.detach().norm(dim=1).min()) > 0.5  # every row is renormalised when looked up
    _exact_per_example_and_featurized(model, _Renormed, data, tmp_path)


class _AlwaysCheckpointed(nn.Module):
    """A hidden layer under torch.utils.checkpoint in every mode, eval() included."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.fc0, self.fc, self.head, self.reentrant = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.utils.checkpoint.checkpoint(self.fc, torch.tanh(self.fc0(x)), use_reentrant=self.reentrant)
        return self.head(torch.tanh(hidden))


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_forward_that_always_checkpoints_is_refused_in_one_sentence(reentrant: bool, tmp_path) -> None:
    """Per-example gradients cannot be taken through torch.utils.checkpoint in eval mode: torch.func refuses it,
    and the recomputation differentiates the module's own parameters. featurize ended in a traceback, and the hook
    path under a reentrant checkpoint gave the checkpointed layer a gradient of zero without a word. Each path
    now refuses in one sentence."""
    torch.manual_seed(0)
    model, task = _AlwaysCheckpointed(reentrant), sp.ClassificationTask()
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    names = [n for n, _ in model.named_parameters()]
    for hooks in (True, False) if reentrant else (False,):  # non-reentrant: the hook path is exact (or refused)
        with pytest.raises(sp.TaskError, match=r"torch\.utils\.checkpoint.*if self\.training"):
            PerExampleGradients(model, task, names, hooks=hooks)(data.tensors)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=1)
    rec.begin_stage("main", dataset_size=8)
    rec.step()
    rec.close()
    for kind in ("eigen", "factored"):
        with pytest.raises(sp.TaskError, match=r"torch\.utils\.checkpoint|gradient checkpointing"):
            sp.featurize(tmp_path / "run", _AlwaysCheckpointed(reentrant), task, data, tmp_path / f"{kind}.sp",
                         projection=sp.ProjectionArguments(dim=16, kind=kind), progress=False)  # fmt: skip


class _NoGradUse(nn.Module):
    """A selected layer also applied under torch.no_grad inside the forward (a stop-gradient): only its other use
    has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.fc(x)
        return self.head(torch.tanh(self.fc(x)) * target)


def test_a_layer_also_run_under_no_grad_keeps_torch_func_and_the_factored_path() -> None:
    """A layer running without autograd inside a forward that began with it cannot be told from a reentrant
    checkpoint's first forward by the gradient hooks: its gradients come from torch.func (exact; a reentrant
    checkpoint is refused there), and the factored projection, whose taps give such a use nothing, checks equal."""
    torch.manual_seed(0)
    model, task = _NoGradUse(), sp.ClassificationTask()
    batch = (torch.randn(4, 4), torch.randint(0, 3, (4,)))
    names = [n for n, _ in model.named_parameters()]
    grads_fn = PerExampleGradients(model, task, names)
    _close(grads_fn(batch, "loss"), _one_by_one(model, task, batch, names, "loss"), names, 1e-5)
    assert grads_fn._hooked_layers[tuple(names)] is None
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    projector = make_projector("factored", shapes, 16, 0, model=model)
    expected = projector.project(grads_fn(batch))
    assert torch.allclose(projector.project_batch(grads_fn, batch), expected, rtol=1e-5, atol=1e-6)


def test_a_batch_of_one_example_does_not_decide_the_path() -> None:
    model = _Mixing()
    grads_fn = PerExampleGradients(model, sp.ClassificationTask(), ["fc.weight", "fc.bias"])
    grads_fn((torch.randn(1, 4), torch.tensor([1])), "loss")
    assert ("fc.weight", "fc.bias") not in grads_fn._hooked_layers  # one example cannot show the mixing
    grads_fn((torch.randn(3, 4), torch.tensor([1, 0, 2])), "loss")
    assert grads_fn._hooked_layers[("fc.weight", "fc.bias")] is None


def test_the_digits_spec_and_its_query_gradients_import_neither_sklearn_nor_torch_dynamo() -> None:
    pytest.importorskip("sklearn")  # the spec reads the digits file scikit-learn ships
    code = (
        "import sys\n"
        "from source_proj.cli.main import main\n"
        "from source_proj.spec import load_spec\n"
        "from source_proj.tasks.gradients import PerExampleGradients\n"
        f"spec = load_spec({str(ROOT / 'examples' / 'digits' / 'digits.py')!r})\n"
        "queries, model, task = spec.query_data(), spec.build_model(), spec.build_task()\n"
        "x, y = queries[:8]\n"
        "grads = PerExampleGradients(model, task, [n for n, _ in model.named_parameters()])((x, y), 'measurement')\n"
        "print(len(queries), spec.describe('main', 0), sorted(g.shape[0] for g in grads.values()))\n"
        "print([m for m in ('sklearn', 'torch._dynamo', 'matplotlib') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    sizes, imported = out.stdout.strip().splitlines()[-2:]
    assert sizes.startswith("360 digit ") and sizes.endswith("[8, 8, 8, 8, 8, 8]")
    assert imported == "[]"


def test_the_digits_arrays_equal_scikit_learns() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = pytest.importorskip("digits", reason="examples/digits must be importable (tests/conftest.py adds it)")
    data, target = digits.load_digits()
    reference = datasets.load_digits()
    assert data.dtype == reference.data.dtype and target.dtype == reference.target.dtype
    assert (data == reference.data).all() and (target == reference.target).all()
    train_images, test_images = digits.raw_images()
    assert train_images.shape == (1437, 8, 8) and test_images.shape == (360, 8, 8)
    assert sorted(map(bytes, [*train_images, *test_images])) == sorted(map(bytes, reference.images))
