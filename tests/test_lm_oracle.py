"""SOURCE on a causal language model equals SOURCE_MATH's formula computed one sequence at a time, unpadded.

A tiny GPT-2 trained on sequences of different lengths: featurize pads them (right padding, attention masks), the
brute force never does. Scores must be the formula's (the measurement the summed token loss, the training loss
each sequence's mean token loss, positive = z raised the query's loss), whatever the padding and the query batches,
and a padded position must carry no part of a sequence's per-token scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.func import functional_call, grad

import source_proj as sp

from .conftest import step_weights_by_hand

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB, LENGTH = 13, 7
TRAIN = [[1, 5, 2, 7, 3, 9, 4], [4, 2, 6], [7, 1, 9, 3, 11], [2, 8], [5, 5, 12, 3, 1, 6], [9, 10, 4, 2]]
QUERIES = [[3, 9, 4, 2, 7], [6, 1], [1, 5, 2, 7, 3, 9, 4]]
LR, STEPS, EVERY = 0.5, 6, 3


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _task(tokens: float | str) -> sp.LanguageModelingTask:
    return sp.LanguageModelingTask(tokens_per_sequence=tokens)


def _normaliser(tokens: float | str, seq: list[int]) -> float:
    """n of ℓ = s/n: the sequence's own count of predicted tokens, or the constant n̄."""
    return len(seq) - 1 if tokens == "own" else float(tokens)


def _summed_loss(model: nn.Module, params: dict[str, torch.Tensor], seq: list[int]) -> torch.Tensor:
    """s(z) = Σ_t −log p(x_{t+1} | x_{≤t}) of one sequence, alone: no padding, no mask."""
    ids = torch.tensor([seq])
    logits = functional_call(model, params, (ids,)).logits[0]
    return F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")


@pytest.fixture(scope="module", params=["own", 4.5])
def tokens(request: pytest.FixtureRequest) -> float | str:
    """ℓ = s/n(z), each sequence's mean token loss, or ℓ = s/n̄ (Hugging Face's mean over a batch's tokens)."""
    return request.param


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tokens: float | str) -> Path:
    """Full-batch SGD on the mean over sequences of ℓ = s/n, each sequence computed alone."""
    path = tmp_path_factory.mktemp("lm") / "run"
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = sp.TrajectoryRecorder(path, model, opt, save_every=EVERY)
    rec.begin_stage("main", dataset_size=len(TRAIN))
    params = dict(model.named_parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        loss = sum(_summed_loss(model, params, s) / _normaliser(tokens, s) for s in TRAIN) / len(TRAIN)
        loss.backward()
        opt.step()
        rec.step()
    rec.close()
    return path


def _brute(run: Path, tokens: float | str) -> np.ndarray:
    """−(1/N) ∇f(q; θ_T)ᵀ (I − e^{−tH̄}) H̄⁻¹ ḡ(z), float64, one segment, the empirical Fisher H̄: the step average
    of (1/N) Σ_z ∇ℓ(z)∇ℓ(z)ᵀ over the checkpoints 0, 3 and 6."""
    traj = sp.Trajectory.load(run)
    model = _gpt2().double()
    names = _task(tokens).select_parameters(model)

    def grads(step: int, seqs: list[list[int]], training_loss: bool) -> torch.Tensor:
        traj.load_into(model, next(c for c in traj.checkpoints if c.step == step))
        base = {n: p.detach() for n, p in model.named_parameters()}
        out = []
        for s in seqs:
            def value(chosen: dict[str, torch.Tensor], s: list[int] = s) -> torch.Tensor:
                loss = _summed_loss(model, {**base, **chosen}, s)
                return loss / _normaliser(tokens, s) if training_loss else loss

            g = grad(value)({n: base[n] for n in names})
            out.append(torch.cat([g[n].reshape(-1) for n in names]))
        return torch.stack(out)

    weights = step_weights_by_hand(0, STEPS, [0, EVERY, STEPS], np.full(STEPS, LR))
    g = sum(w * grads(step, TRAIN, True) for step, w in weights.items())
    h = sum(w * grads(step, TRAIN, True).T @ grads(step, TRAIN, True) / len(TRAIN) for step, w in weights.items())
    p = len(h)
    response = (torch.eye(p, dtype=torch.float64) - torch.linalg.matrix_exp(-LR * STEPS * h)) @ torch.linalg.pinv(
        h, hermitian=True, rtol=1e-12
    )
    # φ(σ) → t on h's null space, which pinv leaves out: add it back there.
    sigma, u = torch.linalg.eigh(h)
    null = u[:, sigma <= 1e-12 * float(sigma.max())]
    response = response + LR * STEPS * null @ null.T
    q = grads(STEPS, QUERIES, False)
    return -(q @ response @ g.T / len(TRAIN)).numpy()


@pytest.fixture(scope="module")
def fitted(run: Path, tmp_path_factory: pytest.TempPathFactory, tokens: float | str) -> Path:
    store = tmp_path_factory.mktemp("lm-store") / "s.sp"
    options = sp.FeaturizeArguments(batch_size=4, chunk_rows=4, fisher="empirical")
    identity = sp.ProjectionArguments(kind="identity")
    sp.featurize(run, _gpt2(), _task(tokens), sp.TextDataset(TRAIN), store, projection=identity, options=options,
                 progress=False)
    sp.fit(store, sp.FitArguments(damping_factor=0.0), progress=False)
    return store


def test_padded_language_model_scores_equal_the_formula_on_each_sequence_alone(
    run: Path, fitted: Path, tokens: float | str
) -> None:
    expected = _brute(run, tokens)
    for batch_size in (1, 2, 3):  # query batches of other sizes: other padding, the same scores
        ours = sp.Attributor(fitted, _gpt2(), _task(tokens), batch_size=batch_size).scores(sp.TextDataset(QUERIES))
        np.testing.assert_allclose(ours, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


def test_per_token_scores_put_nothing_on_padding_and_sum_to_the_score(fitted: Path, tokens: float | str) -> None:
    attributor = sp.Attributor(fitted, _gpt2(), _task(tokens))
    rows = list(range(len(TRAIN)))
    result = sp.token_scores(attributor, sp.TextDataset(QUERIES), sp.TextDataset(TRAIN), rows, progress=False)
    padding = result.attention_mask == 0
    assert padding.any()
    assert np.abs(result.tokens[:, padding]).max() == 0.0
    scale = np.abs(result.scores).max()
    np.testing.assert_allclose(result.tokens.sum(-1) + result.unplaced, result.scores, rtol=0, atol=1e-4 * scale)


def test_per_token_scores_of_a_plain_torch_transformer_split_its_attention_layers_exactly(tmp_path: Path) -> None:
    """``nn.MultiheadAttention`` runs attention in a fused kernel without forward-mode AD and uses its ``out_proj``'s
    weights as tensors, never calling ``out_proj``: its share must still be split by position, whole."""
    from .test_text import PlainTransformer

    task = _task("own")
    model = PlainTransformer(True, VOCAB)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=EVERY)
    rec.begin_stage("main", dataset_size=len(TRAIN))
    data = sp.TextDataset(TRAIN)
    batch = {key: torch.stack([data[i][key] for i in range(len(TRAIN))]) for key in data[0]}
    for _ in range(STEPS):
        opt.zero_grad()
        task.loss(task.forward(model, batch), batch).mean().backward()
        opt.step()
        rec.step()
    rec.close()
    build = lambda: PlainTransformer(True, VOCAB)  # noqa: E731
    assert any(isinstance(m, nn.MultiheadAttention) for m in build().modules())
    store = tmp_path / "s.sp"
    projection = sp.ProjectionArguments(kind="rademacher", dim=32)
    options = sp.FeaturizeArguments(batch_size=4, chunk_rows=4)
    sp.featurize(tmp_path / "run", build(), task, data, store, projection=projection, options=options, progress=False)
    sp.fit(store, progress=False)
    rows = list(range(len(TRAIN)))
    result = sp.token_scores(sp.Attributor(store, build(), task), sp.TextDataset(QUERIES), data, rows, progress=False)
    scale = np.abs(result.scores).max()
    assert np.abs(result.tokens[:, result.attention_mask == 0]).max() == 0.0
    np.testing.assert_allclose(result.tokens.sum(-1) + result.unplaced, result.scores, rtol=0, atol=1e-4 * scale)
