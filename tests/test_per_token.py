"""The per-token pull-back u = s ⊙ Pᵀ w equals the projection matrix's transpose for every projector kind
that per-token scores accept (the sum identity itself is tested on the text example's store)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import source_proj as sp
from source_proj.projection.eigen import EigenBasis
from source_proj.projection.factory import make_projector
from source_proj.query.per_token import adjoint
from source_proj.tasks.gradients import PerExampleGradients


@pytest.mark.parametrize("kind", ["rademacher", "identity"])
def test_the_pull_back_is_the_transpose_of_the_projection(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    projector = make_projector(kind, shapes, 16, 3, model=model)
    w = torch.randn(3, projector.dim)
    scale = {"0.weight": torch.rand(5, 6) + 0.5}
    u = adjoint(projector, shapes, w, scale)
    dense = projector.dense() if kind != "identity" else torch.eye(projector.dim)
    flat = torch.cat([u[n].reshape(3, -1) for n, _ in shapes], dim=1)
    expected = w @ dense
    expected[:, :30] *= scale["0.weight"].reshape(-1)
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["factored", "eigen"])
def test_the_pull_back_of_a_factored_projection_matches_its_hooks_features(kind: str) -> None:
    """A factored projection applies Adam's s = D^{-1/2} in its rank-R form through its layer hooks; the
    pull-back must be the adjoint of that map: ⟨u, g_i⟩ = ⟨w, features_i⟩ for every example's gradient
    g_i, the features computed by the hooks (``project_batch``) without materialising g."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    names = [n for n, _ in model.named_parameters()]
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    basis = None
    if kind == "eigen":
        gen = torch.Generator().manual_seed(1)
        a = [torch.randn(7, 7, generator=gen), torch.randn(6, 6, generator=gen)]
        b = [torch.randn(5, 5, generator=gen), torch.randn(4, 4, generator=gen)]
        basis = EigenBasis.from_factors(["0", "2"], [(m @ m.T).numpy() for m in a], [(m @ m.T).numpy() for m in b],
                                        30, [0], 1)  # fmt: skip
    projector = make_projector(kind, shapes, 16 if kind == "factored" else 30, 3, model=model, basis=basis)
    scale = {n: torch.rand(p.shape) + 0.5 for n, p in model.named_parameters()}
    w = torch.randn(3, projector.dim)
    u = adjoint(projector, shapes, w, scale)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    grads_fn = PerExampleGradients(model, sp.ClassificationTask(), names)
    g = grads_fn((x, y), "loss")
    features = projector.project_batch(grads_fn, (x, y), "loss", transform=projector.scaling(scale))
    pulled = sum(torch.einsum("q...,b...->qb", u[n], g[n]) for n in names)
    torch.testing.assert_close(pulled, w @ features.T, rtol=1e-4, atol=1e-5)
    exact = torch.cat([(u[n] / scale[n]).reshape(3, -1) for n in names], dim=1)
    assert not torch.allclose(exact, w @ projector.dense(), rtol=1e-3, atol=1e-4)  # the rank-1 form, not s itself


@pytest.mark.slow
def _identity_store(
    tmp_path: Path, build: Callable[[], nn.Module], task: sp.LanguageModelingTask, train: sp.TextDataset
) -> sp.Store:
    """The store (identity projection) of two full-batch SGD steps of ``build()``'s model on ``train``, a checkpoint
    at every step, recorded into ``tmp_path/run``."""
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder = sp.TrajectoryRecorder(tmp_path / "run", model, optimizer, save_every=1)
    recorder.begin_stage("main", dataset_size=len(train))
    batch = {key: torch.stack([train[i][key] for i in range(len(train))]) for key in train[0]}
    for _ in range(2):
        optimizer.zero_grad()
        task.loss(task.forward(model, batch), batch).mean().backward()
        optimizer.step()
        recorder.step()
    recorder.close()
    return sp.featurize(tmp_path / "run", build(), task, train, tmp_path / "s.sp", progress=False,
                        projection=sp.ProjectionArguments(kind="identity"))  # fmt: skip


def test_per_token_scores_read_a_modules_flattened_positions_as_the_sequences_own(tmp_path: Path) -> None:
    """OPT's MLP runs on ``[B·T, d]``, its positions flattened into rows example by example: its shares lie on the
    positions of those rows (a batch of one, whose rows are its own positions, gives the same), none on padding, and
    the shares sum to the cached score. It was refused as mixing the examples."""
    import numpy as np
    import transformers

    def opt() -> nn.Module:
        torch.manual_seed(0)
        config = transformers.OPTConfig(vocab_size=13, hidden_size=8, ffn_dim=16, num_hidden_layers=1,
                                        num_attention_heads=2, word_embed_proj_dim=8, max_position_embeddings=8,
                                        dropout=0.0, pad_token_id=0, attn_implementation="eager")  # fmt: skip
        return transformers.OPTForCausalLM(config)

    train = sp.TextDataset([[1, 5, 2, 7, 3, 9, 4], [4, 2, 6], [7, 1, 9, 3, 11], [2, 8]])
    queries = sp.TextDataset([[3, 9, 4, 2, 7], [6, 1]])
    task = sp.LanguageModelingTask(tokens_per_sequence="own")
    store = _identity_store(tmp_path, opt, task, train)
    sp.fit(store.path, progress=False)
    attributor = sp.Attributor(store.path, opt(), task)
    rows = [0, 1, 3]
    together = sp.token_scores(attributor, queries, train, rows, batch_size=3, progress=False)
    alone = sp.token_scores(attributor, queries, train, rows, batch_size=1, progress=False)
    scale = np.abs(together.tokens).max()
    assert scale > 0 and np.abs(together.tokens[:, together.attention_mask == 0]).max() == 0.0
    np.testing.assert_allclose(together.tokens, alone.tokens, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(together.tokens.sum(-1) + together.unplaced, together.scores, rtol=0,
                               atol=1e-4 * np.abs(together.scores).max())  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "given"),
    [([[0, 1], [2, 3]], r"rows of shape \[2, 2\]"), ([1.5], r"1\.5"), ([True, False], "True")],
)
def test_token_scores_refuse_rows_that_are_not_a_flat_list_of_whole_numbers(
    fitted_mlp_store: Path, rows: object, given: str
) -> None:
    """A query result's ``helpful_ids`` ``[Q, k]`` passed whole raised numpy's TypeError; a row 1.5 or True was read
    as row 1 without a word."""
    from tests.conftest import _classification_data, mlp

    attributor = sp.Attributor(fitted_mlp_store, mlp(), sp.ClassificationTask(), progress=False)
    data = _classification_data()
    with pytest.raises(sp.TaskError, match=rf"^token_scores takes rows .*; got {given}"):
        sp.token_scores(attributor, torch.utils.data.Subset(data, [0]), data, rows, progress=False)  # type: ignore[arg-type]



class _Bigram(nn.Module):
    """A bigram language model: token t's logits read token t alone, so position t's activations reach only the
    loss of predicting token t + 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(13, 4), nn.Linear(4, 13)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_per_token_scores_put_each_positions_share_at_that_position(tmp_path: Path) -> None:
    """Oracle: in a bigram model position t's activations carry only the loss of predicting token t + 1, so under
    grad-dot (identity projection: score ∝ ⟨∇f(q), ∇ℓ(z)⟩) position t's share is ⟨∇f(q), ∇ℓ_t(z)⟩ up to the
    method's one constant, brute-forced per position. The other tests check that the shares sum to the score and
    leave padding at zero, which shares moved to a neighbouring position (the last real token's is zero in a causal
    model) also do."""
    import numpy as np
    import torch.nn.functional as F
    from torch.func import functional_call, grad

    train = sp.TextDataset([[1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11]])
    queries = sp.TextDataset([[3, 9, 4, 2], [6, 1, 5]])
    task = sp.LanguageModelingTask(tokens_per_sequence=4.5, parameters=sp.ParameterSelection())  # every parameter
    store = _identity_store(tmp_path, _Bigram, task, train)
    sp.fit_baseline(store, sp.BaselineArguments(kind="grad-dot"), progress=False)
    result = sp.token_scores(sp.Attributor(store.path, _Bigram(), task, method="grad-dot"), queries, train, [0, 1, 2],
                             progress=False)  # fmt: skip

    final = _Bigram().double()
    sp.Trajectory.load(tmp_path / "run").load_into(final, sp.Trajectory.load(tmp_path / "run").final_checkpoint)
    params = {n: p.detach() for n, p in final.named_parameters()}

    def token_loss(theta: dict[str, torch.Tensor], seq: list[int], t: int) -> torch.Tensor:
        ids = torch.tensor([seq])
        return F.cross_entropy(functional_call(final, theta, (ids, torch.ones_like(ids)))[0, t], ids[0, t + 1])

    def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g[n].reshape(-1) for n in params])

    query_grads = [flat(grad(lambda th, s=s: sum(token_loss(th, s, t) for t in range(len(s) - 1)))(params))
                   for s in ([3, 9, 4, 2], [6, 1, 5])]  # fmt: skip
    expected = np.zeros(result.tokens.shape)
    for i, seq in enumerate([[1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11]]):
        for t in range(len(seq) - 1):  # the last token predicts nothing: its share stays 0
            g = flat(grad(lambda th, s=seq, t=t: token_loss(th, s, t))(params))
            expected[:, i, t] = [float(q @ g) for q in query_grads]
    constant = float((result.tokens * expected).sum() / (expected**2).sum())  # the method's −1/4.5
    assert constant == pytest.approx(-1 / 4.5, rel=1e-3)
    np.testing.assert_allclose(result.tokens, constant * expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # SOURCE over two segments: T(z) = Σ_ℓ A_ℓ ḡ_ℓ(z) with A_1 = S_2 F_1, a product that is not symmetric, so the
    # query is pulled back through A_ℓᵀ; token_scores refuses shares that do not sum to the cached score.
    sp.fit(store, sp.FitArguments(boundaries=(1,)), progress=False)
    source = sp.token_scores(sp.Attributor(store.path, _Bigram(), task), queries, train, [0, 1, 2], progress=False)
    scale = np.abs(source.scores).max()
    assert scale > 0  # the shares sum to the score far inside token_scores' own refusal (2 % of the largest score)
    np.testing.assert_allclose(source.tokens.sum(-1) + source.unplaced, source.scores, rtol=0, atol=1e-5 * scale)
    operator = store.read(store.meta["methods"]["source"]["train"]["terms"][0]["operator"])
    assert not np.allclose(operator, operator.T)  # the case: a transposed pull-back would be another one


def test_token_scores_refuse_a_store_captured_during_training(tmp_path: Path) -> None:
    """A captured store's features hold each sequence's gradients at the steps that visited it, which per-token scores
    cannot recompute: they are refused in one sentence that says what to do, not as shares that miss the scores
    (which blamed the training data)."""
    train = sp.TextDataset([[1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11], [2, 8, 4, 12]])
    task = sp.LanguageModelingTask(tokens_per_sequence=3.25, parameters=sp.ModuleSelection(blocks_only=False))
    model = _Bigram()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder = sp.TrajectoryRecorder(tmp_path / "run", model, optimizer, save_every=1)
    capture = sp.GradientCapture(recorder, tmp_path / "cap.sp", task, datasets={"main": train},
                                 projection=sp.ProjectionArguments(kind="factored", dim=16))  # fmt: skip
    recorder.begin_stage("main", dataset_size=len(train))
    for rows in ([0, 1], [2, 3], [1, 2]):
        batch = {key: torch.stack([train[i][key] for i in rows]) for key in train[0]}
        with capture.batch(batch, indices=torch.tensor(rows)) as inputs:
            optimizer.zero_grad()
            task.loss(task.forward(model, inputs), inputs).mean().backward()
        optimizer.step()
        recorder.step()
    recorder.close()
    sp.fit(tmp_path / "cap.sp", progress=False)
    attributor = sp.Attributor(tmp_path / "cap.sp", _Bigram(), task)
    assert attributor.scores(train).shape == (4, 4)
    with pytest.raises(sp.TaskError, match=r"captured during training.*featurize the run into another store"):
        sp.token_scores(attributor, train, train, [0, 1], progress=False)


def test_queries_that_predict_no_token_are_named_in_a_warning(tmp_path: Path) -> None:
    """A language-model query of one token, or whose labels are all −100, measures nothing: its every score is 0,
    which is said (naming those queries), where a query that predicts a token passes silently."""
    import warnings

    train = sp.TextDataset([[1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11]])
    task = sp.LanguageModelingTask(tokens_per_sequence=4.5, parameters=sp.ParameterSelection())
    store = _identity_store(tmp_path, _Bigram, task, train)
    sp.fit(store, progress=False)
    attributor = sp.Attributor(store.path, _Bigram(), task)
    queries = sp.TextDataset([[3, 9, 4, 2], [6], [6, 1, 5]], token_labels=[[3, 9, 4, 2], [6], [-100, -100, -100]])
    with pytest.warns(UserWarning, match=r"^Queries \[1, 2\] have a measurement gradient of zero at every checkpoint"):
        scores = attributor.scores(queries)
    assert (scores[1:] == 0).all() and (scores[0] != 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attributor.scores(sp.TextDataset([[3, 9, 4, 2], [6, 1, 5]]))


def test_queries_of_different_lengths_without_a_collator_are_refused_in_one_sentence(tmp_path: Path) -> None:
    """Queries batched by the default collate must have one length: ones that have not are refused as featurize
    refuses such training data, naming the remedies (torch's collate raised its RuntimeError); padded, they score."""
    train = sp.TextDataset([[1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11]])
    task = sp.LanguageModelingTask(tokens_per_sequence=4.5, parameters=sp.ParameterSelection())
    store = _identity_store(tmp_path, _Bigram, task, train)
    sp.fit(store, progress=False)
    attributor = sp.Attributor(store.path, _Bigram(), task)
    ragged = [{"input_ids": torch.tensor(q)} for q in ([3, 9, 4, 2], [6, 1, 5])]
    with pytest.raises(sp.TaskError, match=r"^The examples in the queries have different lengths .*CollatedDataset"):
        attributor.top_k(ragged, 2)
    assert attributor.scores(sp.TextDataset([[3, 9, 4, 2], [6, 1, 5]])).shape == (2, 3)


def test_token_scores_refuse_training_data_of_different_lengths_without_a_collator_in_one_sentence(
    tmp_path: Path,
) -> None:
    """Training sequences that the default collate cannot stack (of different lengths, as a tokenized dataset keeps
    them) are refused by token_scores as featurize refuses them (torch's collate raised its RuntimeError)."""
    train = sp.TextDataset([[1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11]])
    task = sp.LanguageModelingTask(tokens_per_sequence=4.5, parameters=sp.ParameterSelection())
    store = _identity_store(tmp_path, _Bigram, task, train)
    sp.fit(store, progress=False)
    attributor = sp.Attributor(store.path, _Bigram(), task)
    queries = sp.TextDataset([[3, 9, 4, 2], [6, 1, 5]])
    ragged = [{"input_ids": torch.tensor(s)} for s in ([1, 5, 2, 7, 3], [4, 2, 6], [7, 1, 9, 3, 11])]
    with pytest.raises(sp.TaskError, match=r"^The examples in the training data have different lengths .*Collated"):
        sp.token_scores(attributor, queries, ragged, [0, 1], progress=False)
    assert sp.token_scores(attributor, queries, train, [0, 1], progress=False).tokens.shape == (2, 2, 5)
