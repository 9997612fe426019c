"""Tasks: margins, parameter selection and Fisher targets whose expectation is the Gauss–Newton matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import source_proj as sp
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import PerExampleGradients

from .conftest import assert_binomial


def test_margin_is_correct_logit_minus_logsumexp_of_the_others() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    margin = sp.ClassificationTask().measurement(logits, (None, labels))
    expected = torch.tensor(
        [2.0 - torch.logsumexp(torch.tensor([0.0, -1.0]), 0), 0.5 - torch.logsumexp(torch.tensor([0.5, 3.0]), 0)]
    )
    assert torch.allclose(margin, expected)


def test_labels_out_of_range_are_named() -> None:
    with pytest.raises(sp.TaskError, match=r"lie in \[0, 2\].*from 0 to 5"):
        sp.ClassificationTask().loss(torch.zeros(2, 3), (None, torch.tensor([0, 5])))


def test_parameter_selection_by_pattern_and_module_type() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert sp.ParameterSelection().select(model) == [
        "0.weight",
        "1.weight",
        "1.bias",
        "2.weight",
        "2.bias",
        "3.weight",
        "3.bias",
    ]
    assert sp.ParameterSelection(skip_norm=True, skip_embedding=True).select(model) == [
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    assert sp.ParameterSelection(include=("*.weight",), exclude=("0.*",)).select(model) == [
        "1.weight",
        "2.weight",
        "3.weight",
    ]
    with pytest.raises(sp.TaskError, match="keeps no trainable parameter"):
        sp.ParameterSelection(include=("nothing",)).select(model)


@pytest.mark.parametrize(
    "task",
    [sp.ClassificationTask(), sp.ClassificationTask(label_smoothing=0.2), sp.RegressionTask(),
     sp.MultiLabelClassificationTask()],
    ids=["classification", "smoothed-labels", "regression", "multi-label"],
)  # fmt: skip
def test_exact_fisher_targets_give_the_gauss_newton_matrix(task: sp.Task) -> None:
    """The Gauss–Newton matrix of the training loss; with smoothed labels it is that of the plain cross-entropy
    (the smoothing's term is linear in the logits)."""
    torch.manual_seed(0)
    outputs = 1 if isinstance(task, sp.RegressionTask) else 3
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    if isinstance(task, sp.MultiLabelClassificationTask):
        y = (torch.rand(5, 3) > 0.5).double()
    else:
        y = torch.randint(0, 3, (5,)) if outputs == 3 else torch.randn(5, dtype=torch.float64)
    batch = (x, y)
    grads = PerExampleGradients(model, task, sp.ParameterSelection().select(model))
    flat = lambda g: torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)  # noqa: E731
    fisher = sum(
        flat(grads(b, "fisher")).T @ (w[:, None] * flat(grads(b, "fisher")))
        for w, b in task.fisher_targets(grads.outputs(batch), batch, None)
    )

    # Gauss–Newton: Σ_i J_iᵀ ∇²_out loss J_i, with J the Jacobian of the outputs.
    params = dict(model.named_parameters())
    jac = jacrev(lambda p: functional_call(model, p, (x,)))({k: v.detach() for k, v in params.items()})
    j = torch.cat([v.reshape(5, outputs, -1) for v in jac.values()], dim=2)
    out = model(x).detach()
    gn = 0
    for i in range(5):
        if isinstance(task, sp.MultiLabelClassificationTask):  # the mean over 3 labels of their sigmoid CE
            s = torch.sigmoid(out[i])
            h_out = torch.diag(s * (1 - s)) / 3
        elif outputs == 3:
            p = torch.softmax(out[i], 0)
            h_out = torch.diag(p) - torch.outer(p, p)
        else:
            h_out = torch.full((1, 1), 2.0, dtype=torch.float64)
        gn = gn + j[i].T @ h_out @ j[i]
    assert torch.allclose(fisher, gn, atol=1e-10)


TRIALS = 20000


def test_sampled_fisher_targets_are_unbiased() -> None:
    """Each of TRIALS examples of the same logits draws its class from its own uniform (one call: the draws across
    keys are test_fisher_draws' test_sampled_classes_follow_the_softmax_over_keys); the weighted counts are the
    softmax."""
    task = sp.ClassificationTask()
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    ((weight, batch),) = task.fisher_targets(logits.repeat(TRIALS, 1), (None, torch.zeros(TRIALS, dtype=torch.long)),
                                             FisherDraws.of([0], range(TRIALS)))  # fmt: skip
    counts = torch.zeros(3).index_add_(0, batch[1], weight)
    assert_binomial(counts, torch.softmax(logits[0], 0), TRIALS)


def test_multi_label_task_is_hugging_faces_loss_and_samples_each_label_from_its_sigmoid() -> None:
    task = sp.MultiLabelClassificationTask()
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, -3.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    batch = (None, labels)
    assert torch.allclose(task.loss(logits, batch).mean(), torch.nn.BCEWithLogitsLoss()(logits, labels))
    assert torch.allclose(task.measurement(logits, batch), torch.tensor([2.0 - 0.0 - 1.0, -0.5 + 3.0 + 1.0]))
    # TRIALS copies of both examples, each copy its own row of the draws.
    ((weight, targets),) = task.fisher_targets(logits.repeat(TRIALS, 1), (None, labels.repeat(TRIALS, 1)),
                                               FisherDraws.of([0], range(2 * TRIALS)))  # fmt: skip
    assert torch.equal(weight, torch.full((2 * TRIALS,), 3.0))
    assert_binomial(targets[1].reshape(TRIALS, 2, 3).sum(0), torch.sigmoid(logits), TRIALS)
    with pytest.raises(sp.TaskError, match=r"labels of shape \[2, 3\], but the data hold labels of shape \[2\]"):
        task.loss(logits, (None, torch.tensor([0, 1])))


def test_the_default_forward_takes_the_logits_of_a_hugging_face_image_classifier() -> None:
    """``ViTForImageClassification`` returns an ImageClassifierOutput: ClassificationTask failed on it with an
    AttributeError traceback. The default forward takes ``outputs_of`` (its logits), and the per-example gradients
    are the model's own, one image at a time."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    task = sp.ClassificationTask()
    batch = (torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1]))
    names = task.select_parameters(model)
    got = PerExampleGradients(model, task, names)(batch, "measurement")
    params = dict(model.named_parameters())
    for i in range(3):
        margin = task.measurement(model(batch[0][i : i + 1]).logits, (batch[0][i : i + 1], batch[1][i : i + 1]))
        want = torch.autograd.grad(margin.sum(), [params[n] for n in names])
        for n, g in zip(names, want, strict=True):
            assert torch.allclose(got[n][i], g, rtol=1e-4, atol=1e-6), n
