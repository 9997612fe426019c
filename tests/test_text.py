"""Text tasks: padded per-example gradients equal unpadded ones (Hugging Face GPT-2, Llama, BERT and plain
torch.nn transformers), the LM measurement and training loss equal the model's own loss, the LM Fisher
targets give the Gauss–Newton matrix at the loss's scale, module selection, and every refusal."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import pytest
import torch
import transformers
from torch import nn
from torch.func import functional_call, jacrev

import source_proj as sp
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.tasks.text import attention_bias, loss_positions

from .conftest import assert_binomial

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from a config: nothing may be downloaded
transformers.logging.set_verbosity_error()

VOCAB, LENGTH = 23, 8
SEQUENCES = [[5, 9, 2, 17, 3, 11, 8], [4, 12, 6, 21], [7, 1, 19, 13, 10, 15]]
CLASSES = [2, 0, 1]


def _gpt2(attn: str = "eager", classes: int | None = None, layers: int = 2, embd: int = 16) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=embd, n_layer=layers, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=classes or 2,
        attn_implementation=attn,
    )  # fmt: skip
    return (transformers.GPT2ForSequenceClassification if classes else transformers.GPT2LMHeadModel)(config)


def _bert(attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=LENGTH, attn_implementation="eager",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _opt() -> nn.Module:
    """OPT derives its position ids from the 2-D attention mask (a cumulative sum), which the task replaces."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=LENGTH, dropout=0.0, attn_implementation="eager",
        pad_token_id=0,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


def _mistral() -> nn.Module:
    """Mistral attends through a sliding window (3 keys here, of sequences up to 8), which the task's mask builds."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=LENGTH, sliding_window=3, attn_implementation="eager",
    )  # fmt: skip
    return transformers.MistralForCausalLM(config)


def _alibi(family: str, classes: int | None = None) -> nn.Module:
    """BLOOM and Falcon (with ``alibi=True``) place ALiBi biases from the 2-D mask, which the task leaves out."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                  num_labels=classes or 2, attn_implementation="eager")  # fmt: skip
    if family == "bloom":
        config = transformers.BloomConfig(n_layer=2, n_head=2, **common)
        return (transformers.BloomForSequenceClassification if classes else transformers.BloomForCausalLM)(config)
    config = transformers.FalconConfig(num_hidden_layers=2, num_attention_heads=2, alibi=True, **common)
    return transformers.FalconForCausalLM(config)


class PlainTransformer(nn.Module):
    """A plain torch.nn transformer: causal LM (logits per position) or mean-pooled classifier."""

    def __init__(self, causal: bool, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.causal = causal
        self.embed, self.position = nn.Embedding(VOCAB, 16), nn.Embedding(LENGTH, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        h = self.embed(input_ids) + self.position(torch.arange(length, device=input_ids.device))
        padding = torch.zeros(attention_mask.shape, dtype=h.dtype).masked_fill(attention_mask == 0, float("-inf"))
        causal = nn.Transformer.generate_square_subsequent_mask(length) if self.causal else None
        h = self.norm(self.encoder(h, mask=causal, src_key_padding_mask=padding, is_causal=self.causal))
        if self.causal:
            return self.head(h)
        weights = attention_mask[..., None].to(h)
        return self.head((h * weights).sum(1) / weights.sum(1))


def _batch(sequences: list[list[int]], labels: list[int] | None = None, length: int | None = None) -> dict:
    data = sp.TextDataset(sequences, labels=labels, length=length)
    return {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}


def _lm() -> sp.LanguageModelingTask:
    return sp.LanguageModelingTask(tokens_per_sequence=4.5)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], sp.Task], bool]] = {
    "gpt2-lm-eager": (lambda: _gpt2("eager"), _lm, False),
    "gpt2-lm-sdpa": (lambda: _gpt2("sdpa"), _lm, False),
    "llama-lm-eager": (_llama, _lm, False),
    "opt-lm-eager": (_opt, _lm, False),
    "mistral-window-lm-eager": (_mistral, _lm, False),
    "bloom-alibi-lm-eager": (lambda: _alibi("bloom"), _lm, False),
    "falcon-alibi-lm-eager": (lambda: _alibi("falcon"), _lm, False),
    "nn-causal-lm": (lambda: PlainTransformer(True, VOCAB), _lm, False),
    "gpt2-classifier": (lambda: _gpt2(classes=3), sp.SequenceClassificationTask, True),
    "bert-classifier-eager": (lambda: _bert("eager"), sp.SequenceClassificationTask, True),
    "bert-classifier-sdpa": (lambda: _bert("sdpa"), sp.SequenceClassificationTask, True),
    "bloom-alibi-classifier": (lambda: _alibi("bloom", classes=3), sp.SequenceClassificationTask, True),
    "nn-bidirectional-classifier": (lambda: PlainTransformer(False, 3), sp.SequenceClassificationTask, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_padded_per_example_gradients_equal_single_sequences(case: str) -> None:
    build, make_task, classify = CASES[case]
    model, task = build(), make_task()
    names = task.select_parameters(model)
    grads = PerExampleGradients(model, task, names)
    labels = CLASSES if classify else None
    batch = _batch(SEQUENCES, labels, LENGTH)
    grads.outputs(batch)  # outside vmap: the task checks its mask against the model's own masking
    for quantity in ("loss", "measurement"):
        padded = grads(batch, quantity)
        for i, seq in enumerate(SEQUENCES):
            alone = grads(_batch([seq], None if labels is None else [labels[i]]), quantity)
            scale = max(float(alone[n].abs().max()) for n in names)
            error = max(float((padded[n][i] - alone[n][0]).abs().max()) for n in names)
            assert scale > 1e-4, "the gradient must not vanish, or the comparison proves nothing"
            assert error <= 2e-5 * scale, f"{quantity} of sequence {i}: {error:.2e} vs scale {scale:.2e}"


def test_a_float64_model_gets_finite_gradients_where_its_float32_softmax_meets_a_row_masked_whole() -> None:
    """Mistral's window masks every key of a padding row past it; Mistral takes its softmax in float32, where float64's
    minimum is -inf: the row was NaN, and its backward (0 · NaN) made every gradient NaN."""
    model, task = _mistral().double(), _lm()
    names = task.select_parameters(model)
    grads = PerExampleGradients(model, task, names)
    batch = _batch(SEQUENCES, None, LENGTH)
    grads.outputs(batch)
    padded = grads(batch)
    for i, seq in enumerate(SEQUENCES):
        alone = grads(_batch([seq]))
        scale = max(float(alone[n].abs().max()) for n in names)
        error = max(float((padded[n][i] - alone[n][0]).abs().max()) for n in names)
        assert scale > 1e-4 and error <= 1e-7 * scale, f"sequence {i}: {error:.2e} vs {scale:.2e}"


def _left_padded(batch: dict, aligned: tuple[str, ...] = ("input_ids", "attention_mask")) -> dict:
    """``batch`` (right-padded) with each row's padding moved before its tokens in the ``aligned`` tensors."""
    shift = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(-1)
    return {key: torch.stack([row.roll(int(s)) for row, s in zip(value, shift, strict=True)]) if key in aligned
            else value for key, value in batch.items()}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_per_example_gradients_equal_single_sequences(case: str) -> None:
    """Left padding (tokenizer.padding_side = "left") shifts every token's position; the task rolls each row to the
    right before the model runs, so each row's gradients are those of its sequence alone, on both gradient paths."""
    build, make_task, classify = CASES[case]
    model, task = build().double(), make_task()
    names = task.select_parameters(model)
    labels = CLASSES if classify else None
    right = _batch(SEQUENCES, labels, LENGTH)
    left = _left_padded(right, ("input_ids", "attention_mask") if classify else ("input_ids", "attention_mask",
                                                                                  "labels"))
    assert bool((left["attention_mask"][:, 0] == 0).any()), "some row must be padded on the left"
    assert torch.equal(task.representation(model, left), task.representation(model, right))  # RepSim's
    for hooks in (True, False):  # the layer hooks' path, and vmap's
        grads = PerExampleGradients(model, task, names, hooks=hooks)
        outputs = grads.outputs(left)  # outside vmap: the task checks its mask against the model's own masking
        assert torch.equal(outputs, grads.outputs(right)), "the left-padded batch runs as the right-padded one"
        for quantity in ("loss", "measurement"):
            padded, rolled = grads(left, quantity), grads(right, quantity)
            assert all(torch.equal(padded[n], rolled[n]) for n in names), f"{quantity}, hooks={hooks}"
    for i, seq in enumerate(SEQUENCES):
        alone = grads(_batch([seq], None if labels is None else [labels[i]]), "measurement")
        scale = max(float(alone[n].abs().max()) for n in names)
        error = max(float((padded[n][i] - alone[n][0]).abs().max()) for n in names)
        assert scale > 1e-4, "the gradient must not vanish, or the comparison proves nothing"
        # float64 throughout, but Llama, OPT and BLOOM take their attention's softmax in float32
        assert error <= 1e-7 * scale, f"sequence {i}: {error:.2e} vs {scale:.2e}"


def test_a_batch_of_one_gets_its_plain_autograd_gradient_where_vmap_cannot_run_the_model() -> None:
    """BLOOM's GELU is an autograd.Function without setup_context, which torch.func refuses: a single query (or a
    dataset's last batch of one), which the hooks' two-example check never sees, takes plain autograd."""
    model, task = _alibi("bloom"), _lm()
    names = task.select_parameters(model)
    one = _batch([SEQUENCES[1]])
    got = PerExampleGradients(model, task, names)(one, "loss")
    params = dict(model.named_parameters())
    want = torch.autograd.grad(task.loss(task.forward(model, one), one).sum(), [params[n] for n in names])
    for name, expected in zip(names, want, strict=True):
        torch.testing.assert_close(got[name][0], expected, rtol=1e-5, atol=1e-7)


def test_falcons_linear_layers_are_factored_by_the_hooks_as_nn_linear_is() -> None:
    """FalconLinear overrides forward with x Wᵀ + b: the hooks factor it (the factored projection refused Falcon, none
    of its layers being factorable), and the hooks' features are the projection of its materialised gradients."""
    from source_proj.projection.factory import make_projector

    model, task = _alibi("falcon"), _lm()
    names = task.select_parameters(model)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if n in names]
    projector = make_projector("factored", shapes, 32, 0, model=model)
    grads = PerExampleGradients(model, task, names)
    batch = _batch(SEQUENCES, length=LENGTH)
    materialised = grads(batch, "loss")
    assert grads._hooked_layers[tuple(names)] is not None  # the hooks agreed with plain autograd
    want = projector.project(materialised)
    torch.testing.assert_close(projector.project_batch(grads, batch, "loss"), want, rtol=1e-4, atol=1e-5 * float(
        want.abs().max()))


def test_a_model_torch_func_cannot_run_takes_plain_autograd_for_parameters_the_hooks_do_not_factor() -> None:
    """BLOOM's GELU is an autograd.Function without setup_context: its layer norms, which the hooks do not factor,
    went to torch.func, which refused the model with advice for checkpointing. Plain autograd, one sequence at a time,
    gives each padded sequence's gradient, that of the model's own loss on the sequence alone."""
    model = _alibi("bloom")
    task = sp.LanguageModelingTask(tokens_per_sequence=1, parameters=sp.ParameterSelection(include=("*h.1.*",)))
    names = task.select_parameters(model)
    assert any("layernorm" in n for n in names)
    got = PerExampleGradients(model, task, names)(_batch(SEQUENCES, length=LENGTH), "loss")
    params = dict(model.named_parameters())
    for i, seq in enumerate(SEQUENCES):
        ids = torch.tensor([seq])
        own = model(input_ids=ids, labels=ids).loss * (len(seq) - 1)  # the summed token loss
        for name, want in zip(names, torch.autograd.grad(own, [params[n] for n in names]), strict=True):
            torch.testing.assert_close(got[name][i], want, rtol=1e-4, atol=1e-6)


def test_a_model_with_gradient_checkpointing_enabled_gives_the_gradients_of_the_same_model_without() -> None:
    """Hugging Face models checkpoint in training mode only, and attribution runs them in eval() mode: the
    per-example gradients of a Llama after gradient_checkpointing_enable (either form) are those without it."""
    task = _lm()
    batch = _batch(SEQUENCES, None, LENGTH)
    plain = _llama()
    names = task.select_parameters(plain)
    want = PerExampleGradients(plain, task, names)(batch)
    for reentrant in (False, True):
        model = _llama()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got = PerExampleGradients(model, task, names)(batch)
        assert all(torch.equal(got[n], want[n]) for n in names)


@pytest.mark.parametrize("case", ["gpt2-lm-sdpa", "llama-lm-eager"])
def test_bf16_language_model_gradients_agree_with_fp32_on_both_paths(case: str) -> None:
    """Under bf16 autocast the logits reach the loss in bf16 (no float32 copy): the per-example gradients of the
    loss and the measurement, by the layer hooks and by ``torch.func``, stay within bf16's rounding of fp32's."""
    build, make_task, _ = CASES[case]
    model, task = build(), make_task()
    names = task.select_parameters(model)
    batch = _batch(SEQUENCES, None, LENGTH)
    for quantity in ("loss", "measurement"):
        want = PerExampleGradients(model, task, names)(batch, quantity)
        scale = max(float(want[n].abs().max()) for n in names)
        for hooks in (True, False):
            got = PerExampleGradients(model, task, names, precision="bf16", hooks=hooks)(batch, quantity)
            error = max(float((got[n].float() - want[n]).abs().max()) for n in names)
            assert scale > 1e-4 and 0 < error <= 0.05 * scale, f"{quantity}, hooks={hooks}: {error:.2e} / {scale:.2e}"


def test_lm_measurement_and_loss_equal_the_models_own_loss() -> None:
    model = _gpt2().eval()
    task = sp.LanguageModelingTask(tokens_per_sequence=LENGTH - 1)
    batch = _batch(SEQUENCES, length=LENGTH)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # a collator's padded labels
    labels[0, 3] = -100  # a position the model is not asked to predict
    batch["labels"] = labels
    with torch.no_grad():
        measured = task.measurement(task.forward(model, batch), batch)
        counts = loss_positions(batch).sum(-1)
        assert counts.tolist() == [5, 3, 5]
        for i, seq in enumerate(SEQUENCES):  # the model's own loss is the mean over the predicted tokens
            own = model(input_ids=torch.tensor([seq]), labels=labels[i : i + 1, : len(seq)]).loss
            assert torch.allclose(measured[i], own * counts[i], rtol=1e-5)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        assert torch.allclose(measured.sum() / counts.sum(), own, rtol=1e-5)

        # Equal-length sequences: the batch mean of the task's loss is exactly the model's training loss.
        ids = torch.randint(1, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(0))
        full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        own = model(input_ids=ids, labels=ids).loss
        assert torch.allclose(task.loss(task.forward(model, full), full).mean(), own, rtol=1e-5)
        # "own": ℓ = s/n(z), the mean of per-sequence mean token losses.
        each = sp.LanguageModelingTask(tokens_per_sequence="own")
        per_sequence = torch.stack([model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss
                                    for s in SEQUENCES])  # fmt: skip
        unlabelled = _batch(SEQUENCES, length=LENGTH)
        assert torch.allclose(each.loss(each.forward(model, unlabelled), unlabelled), per_sequence, rtol=1e-5)


@pytest.mark.parametrize("tokens", [3.0, "own"])
def test_exact_lm_fisher_targets_give_the_gauss_newton_matrix_of_the_loss(tokens: float | str) -> None:
    model = _gpt2(layers=1, embd=8).double().eval()
    task = sp.LanguageModelingTask(tokens_per_sequence=tokens, parameters=sp.ModuleSelection(include=("*.mlp.*",)))
    names = task.select_parameters(model)
    batch = _batch([[5, 9, 2, 17, 3], [4, 12, 6]], length=5)
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, 2] = -100
    grads = PerExampleGradients(model, task, names)
    flat = lambda g: torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)  # noqa: E731
    fisher = sum(
        flat(grads(b, "loss")).T @ (w[:, None].double() * flat(grads(b, "loss")))
        for w, b in task.fisher_targets(grads.outputs(batch), batch, None)
    )

    # Gauss–Newton of ℓ = s/n: Σ_b (1/n_b) Σ_t J_btᵀ (diag p − ppᵀ) J_bt over the positions carrying loss.
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    bias = attention_bias(batch["attention_mask"], True, torch.float64)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": bias}
    jac = jacrev(lambda p: functional_call(model, p, (), inputs).logits)(params)
    j = torch.cat([jac[n].reshape(2, 5, VOCAB, -1) for n in names], dim=3)
    logits = model(**inputs).logits.detach()
    keep = loss_positions(batch)
    counts = keep.sum(-1)
    gn = torch.zeros_like(fisher)
    for b in range(2):
        n = float(counts[b]) if tokens == "own" else tokens
        for t in range(4):
            if keep[b, t]:
                p = torch.softmax(logits[b, t], 0)
                gn += j[b, t].T @ (torch.diag(p) - torch.outer(p, p)) @ j[b, t] / n
    assert torch.allclose(fisher, gn, atol=1e-12, rtol=1e-8)


def test_sampled_lm_fisher_targets_draw_from_the_model_at_loss_positions_only() -> None:
    """6,000 copies of two sequences in one batch, each copy its own rows of the draws (the draws across keys are
    test_fisher_draws' over-keys check): tokens are drawn at loss positions only, from the softmax there."""
    task, copies = sp.LanguageModelingTask(tokens_per_sequence=2.5), 6000
    pair = _batch([[3, 4, 5, 6], [7, 8]], length=4)
    pair["labels"] = pair["input_ids"].clone()
    pair["labels"][0, 2] = -100
    batch = {key: value.repeat(copies, 1) for key, value in pair.items()}
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    draws = FisherDraws.of([1], range(2 * copies))
    ((weight, sampled),) = task.fisher_targets(logits.repeat(copies, 1, 1), batch, draws)
    labels = sampled["labels"].reshape(copies, 2, 4)
    assert torch.equal(weight, torch.full((2 * copies,), 2.5))
    assert (labels[:, 0, [0, 2]] == -100).all() and (labels[:, 1, [0, 2, 3]] == -100).all()
    assert (labels[:, 0, [1, 3]] >= 0).all() and (labels[:, 1, 1] >= 0).all()
    assert_binomial(torch.bincount(labels[:, 0, 3], minlength=5), torch.softmax(logits[0, 2], 0), copies)


def test_token_sampling_is_the_float64_inverse_cdf_in_blocks_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """sample_tokens (blocks of 256 tokens, chunks of rows) draws what a plain float64 inverse CDF over the whole
    vocabulary draws from the same uniforms; tokens with −inf logits are never drawn."""
    from source_proj.tasks import text

    monkeypatch.setattr(text, "_HOST_BLOCK", 3 * 1000)  # 3 rows per block of rows: the loop over them runs
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 50, 1000, generator=g)  # 4 blocks, the last one padded
    logits[..., 990:] = float("-inf")
    logits[0, 0, :] = -1e4
    logits[0, 0, 517] = 0.0  # one certain token
    uniform = torch.rand(4, 50, generator=g, dtype=torch.float64)
    got = text.sample_tokens(logits, uniform)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    want = torch.searchsorted(cdf, (uniform * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    assert got.shape == (4, 50) and got.dtype == torch.long
    assert torch.equal(got, want)
    assert got[0, 0] == 517 and (got < 990).all()
    assert len(set(got.flatten().tolist())) > 100  # the draws spread over the vocabulary


@pytest.mark.parametrize("vocab", [5, 200, 256, 300])
def test_token_sampling_never_draws_a_token_of_probability_zero_at_the_top_of_the_cdf(vocab: int) -> None:
    """A uniform just below 1 lands past the float64 cumulative sum of a block's float32 weights, whose float32 total
    can be the larger by rounding: it must still draw the last token of nonzero probability, not the block's last
    (a −inf logit here) nor its padding's. Vocabularies under 256 (one block, padded), of one whole block, and with a
    padded last block."""
    from source_proj.tasks import text

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, vocab, generator=g)  # every other token of probability well above 1e-9
    logits[:, -1] = float("-inf")  # the last token is impossible
    uniform = 1 - 1e-9 * torch.rand(4000, generator=g, dtype=torch.float64)
    got = text.sample_tokens(logits, uniform)
    assert (got == vocab - 2).all()  # the last possible token: the inverse CDF at the top


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [None, 3])
def test_token_nll_of_half_precision_logits_is_the_float32_path_without_a_float32_copy(
    dtype: torch.dtype, block_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half-precision logits: ``token_nll`` gives the bits of ``token_nll(logits.float())`` (the float32 loss,
    and the half-precision gradient ``.float()``'s backward rounds to), per batch and per example, block by
    block or whole; and the graph holds no n × V float32 tensor (the float32 path holds the float32 copy)."""
    from torch.func import grad, vmap

    from source_proj.tasks import text
    from source_proj.tasks.text import IGNORE_INDEX, token_nll

    if block_rows is not None:
        monkeypatch.setattr(text, "_HOST_BLOCK", block_rows * 13)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 7, 13, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 13, (4, 7), generator=g)
    targets[0, 2] = targets[3, 6] = IGNORE_INDEX
    weights = torch.randn(4, 7, generator=g)

    def saved(fn):  # (the loss, the n × V float tensors the graph keeps)
        kept = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point() and t.numel() == logits.numel():
                kept.append(t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return fn(), kept

    ours, ours_kept = saved(lambda: token_nll(logits.reshape(-1, 13), targets.reshape(-1)))
    theirs, theirs_kept = saved(lambda: token_nll(logits.float().reshape(-1, 13), targets.reshape(-1)))
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    assert ours_kept == [dtype] and theirs_kept == [torch.float32]
    (ours_grad,) = torch.autograd.grad((ours * weights.reshape(-1)).sum(), logits)
    (their_grad,) = torch.autograd.grad((theirs * weights.reshape(-1)).sum(), logits)
    assert ours_grad.dtype == dtype and torch.equal(ours_grad, their_grad) and ours_grad.abs().sum() > 0

    def per_example(upcast):
        return vmap(grad(lambda z, t, w: (token_nll(z.float() if upcast else z, t) * w).sum()))(
            logits.detach(), targets, weights
        )

    assert torch.equal(per_example(False), per_example(True))
    # The language-model task's loss passes its half-precision outputs on as they are.
    task, batch = sp.LanguageModelingTask(tokens_per_sequence=6), {"input_ids": targets.clamp_min(0)}
    loss, kept = saved(lambda: task.loss(logits, batch))
    assert kept == [dtype] and torch.equal(loss, task.loss(logits.float(), batch))


def test_module_selection_includes_and_excludes_exactly_what_it_says() -> None:
    gpt2_blocks = [
        f"transformer.h.{i}.{m}.{p}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]  # fmt: skip
    lm = _gpt2()
    assert sp.ModuleSelection().select(lm) == gpt2_blocks
    # Every linear layer: the LM head is tied to the token embedding, so it is still left out.
    assert sp.ModuleSelection(blocks_only=False).select(lm) == gpt2_blocks
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert sp.ModuleSelection(include=("*.mlp.*",), bias=False).select(lm) == [
        f"transformer.h.{i}.mlp.{m}.weight" for i in range(2) for m in ("c_fc", "c_proj")
    ]
    assert sp.ModuleSelection(exclude=("transformer.h.0.*",)).select(lm) == gpt2_blocks[8:]

    bert_blocks = [
        f"bert.encoder.layer.{i}.{m}.{p}" for i in range(2)
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense")
        for p in ("weight", "bias")
    ]  # fmt: skip
    bert = _bert()
    assert sp.ModuleSelection().select(bert) == bert_blocks
    assert sp.ModuleSelection(blocks_only=False).select(bert) == [
        *bert_blocks, "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"
    ]

    plain = PlainTransformer(True, VOCAB)
    assert sp.ModuleSelection().select(plain) == [
        f"encoder.layers.{i}.{p}" for i in range(2)
        for p in ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
                  "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    ]  # fmt: skip
    assert sp.ModuleSelection(bias=False, include=("*.self_attn*",)).select(plain) == [
        f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("in_proj_weight", "out_proj.weight")
    ]
    never = ("embed", "wte", "wpe", "embeddings", "norm", "ln_", "LayerNorm", "position")
    for model in (lm, bert, plain):
        assert not any(word in name for name in sp.ModuleSelection().select(model) for word in never)
    with pytest.raises(sp.TaskError, match="keeps no trainable linear layer"):
        sp.ModuleSelection(include=("nothing*",)).select(lm)
    # Asking for the tied head alone says why it is left out, where it said only to set blocks_only=False.
    with pytest.raises(sp.TaskError, match=r"\(lm_head\.weight is transformer\.wte\.weight: a weight tied to an "
                       r"embedding is left out with the embeddings, select it by name with sp\.ParameterSelection\)"):
        sp.ModuleSelection(include=("lm_head",), blocks_only=False).select(lm)
    assert sp.LanguageModelingTask(tokens_per_sequence=1).select_parameters(lm) == gpt2_blocks


def test_the_classifiers_tasks_attribute_their_heads_and_the_language_model_task_its_blocks() -> None:
    bert, gpt2_classifier, lm = _bert(), _gpt2(classes=3), _gpt2()
    config = bert.config
    torch.manual_seed(0)
    tagger = transformers.BertForTokenClassification(config)
    heads = {
        "bert": ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"],
        "gpt2": ["score.weight"],
        "tagger": ["classifier.weight", "classifier.bias"],
    }
    cases = [
        ("bert", bert, sp.SequenceClassificationTask()),
        ("gpt2", gpt2_classifier, sp.SequenceClassificationTask()),
        ("tagger", tagger, sp.TokenClassificationTask(tokens_per_sequence=6)),
    ]
    for key, model, task in cases:
        chosen = task.select_parameters(model)
        assert chosen == sp.ModuleSelection().select(model) + heads[key], key
        assert not any("embeddings" in name or "wte" in name for name in chosen)
    # The language model's head is tied to its token embedding: blocks only, as before.
    lm_task = sp.LanguageModelingTask(tokens_per_sequence=6)
    assert lm_task.select_parameters(lm) == sp.ModuleSelection().select(lm)


def test_attention_implementations_that_cannot_run_under_vmap_are_refused_with_the_fix() -> None:
    model = _gpt2()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(sp.TaskError, match=r"flash_attention_2.*set_attn_implementation\(\"eager\"\)"):
        PerExampleGradients(model, _lm(), ["transformer.h.0.mlp.c_fc.weight"])


def test_a_mask_that_does_not_reproduce_the_models_own_is_refused() -> None:
    model = _bert()
    task = sp.SequenceClassificationTask(attention="causal")  # BERT attends both ways
    grads = PerExampleGradients(model, task, task.select_parameters(model))
    with pytest.raises(sp.TaskError, match=r"causal attention mask .* does not reproduce.*'bidirectional'"):
        grads.outputs(_batch(SEQUENCES, CLASSES, LENGTH))


def test_bad_text_input_is_refused_with_a_sentence() -> None:
    model = _gpt2()
    task = _lm()
    grads = PerExampleGradients(model, task, task.select_parameters(model))
    right = _batch(SEQUENCES, length=LENGTH)  # a row padded on both sides runs as if padded on the right
    both = {key: torch.stack([row.roll(2) if i == 1 else row for i, row in enumerate(value)])
            for key, value in right.items()}  # fmt: skip
    assert both["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert torch.equal(grads.outputs(both), grads.outputs(right))
    holed = _batch(SEQUENCES, length=LENGTH)
    holed["attention_mask"][2, 3] = 0
    with pytest.raises(sp.TaskError, match="Example 2 of the batch has padding between two of its tokens"):
        grads.outputs(holed)
    with pytest.raises(sp.TaskError, match="dicts with 'input_ids'"):
        grads.outputs((torch.ones(2, 4, dtype=torch.long),))
    with pytest.raises(sp.TaskError, match="attends bidirectionally"):
        task.bind(_bert())
    with pytest.raises(sp.TaskError, match="positive number"):
        sp.LanguageModelingTask(tokens_per_sequence=0)
    with pytest.raises(sp.TaskError, match="more than length=3"):
        sp.TextDataset([[1, 2, 3, 4]], length=3)
    big = _batch([[1, 2, VOCAB + 3]])
    with pytest.raises(sp.TaskError, match=rf"lie in \[0, {VOCAB - 1}\]"):
        task.loss(grads.outputs({**big, "input_ids": big["input_ids"].clamp_max(VOCAB - 1)}), big)
    with pytest.raises(sp.TaskError, match="needs 'labels'"):
        sp.SequenceClassificationTask().loss(torch.zeros(3, 3), _batch(SEQUENCES))


@pytest.mark.parametrize(
    ("task", "helper"),
    [(sp.LanguageModelingTask, "mean_predicted_tokens"), (sp.Seq2SeqTask, "mean_target_tokens"),
     (sp.TokenClassificationTask, "mean_labelled_tokens")],
)  # fmt: skip
def test_a_token_task_without_tokens_per_sequence_or_with_a_non_number_is_one_sentence_naming_what_to_pass(
    task: type, helper: str
) -> None:
    """tokens_per_sequence has no default (the loss scale depends on the training loop): left out, the task names it
    and the helper that computes it, in a TaskError, not Python's TypeError of a missing argument; a list or a
    tensor of several values is the positive-number sentence, not float()'s TypeError."""
    for given in ({}, {"tokens_per_sequence": None}):
        needs = rf"^{task.__name__} needs tokens_per_sequence: .*text\.{helper}\(train\)"
        with pytest.raises(sp.TaskError, match=needs):
            task(**given)
    for wrong in ([3], torch.tensor([2.0, 3.0]), "many"):
        with pytest.raises(sp.TaskError, match=rf"^tokens_per_sequence must be a positive number .*see {helper}"):
            task(tokens_per_sequence=wrong)
    assert task(tokens_per_sequence=2.5).tokens_per_sequence == 2.5
    assert task(tokens_per_sequence="own").tokens_per_sequence == "own"


@pytest.mark.parametrize("build", [_gpt2, _opt, _bert], ids=["gpt2-wpe", "opt-offset-2", "bert"])
def test_sequences_beyond_the_position_table_are_refused_by_name_before_the_model_indexes_past_it(
    build: Callable[[], nn.Module],
) -> None:
    """A learned position table of LENGTH rows (OPT's holds two more, before position 0): a batch padded to more
    would make the model index past it (an IndexError on the CPU, a device-side assert on a GPU). Up to LENGTH runs;
    beyond, the sentence names the longest sequence, or the padding when every sequence fits."""
    model = build()
    task = _lm() if isinstance(model, transformers.GenerationMixin) else sp.SequenceClassificationTask()
    grads = PerExampleGradients(model, task, task.select_parameters(model))
    labels = None if isinstance(task, sp.LanguageModelingTask) else [0, 1]
    assert grads(_batch([list(range(1, LENGTH + 1)), [3, 4]], labels), "loss")  # exactly LENGTH positions
    name = type(model).__name__
    with pytest.raises(sp.TaskError, match=rf"^Example 1 of the batch has {LENGTH + 1} tokens, more than the "
                       rf"{LENGTH} positions of {name}'s position table; truncate or split"):  # fmt: skip
        grads.outputs(_batch([[3, 4], list(range(1, LENGTH + 2))], labels))
    with pytest.raises(sp.TaskError, match=rf"^The batch's sequences are padded to {LENGTH + 1} positions, more"):
        grads(_batch([[3, 4], [5, 6, 7]], labels, length=LENGTH + 1), "loss")


def test_a_rotary_model_has_no_position_table_to_run_past() -> None:
    batch = _batch([list(range(1, LENGTH + 3))])  # beyond max_position_embeddings: rotary positions extrapolate
    assert _lm().forward(_llama(), batch).shape == (1, LENGTH + 2, VOCAB)


def test_labels_at_padded_positions_are_refused_since_the_models_own_loss_predicts_them() -> None:
    """``labels = input_ids.copy()`` of sequences padded with the EOS id (no pad token): the model's loss predicts the
    padding, which the task never does, so the run's loss and the task's differ silently; the batch is refused."""
    model = _gpt2().eval()
    batch = _batch(SEQUENCES, length=LENGTH)
    batch["labels"] = batch["input_ids"].clone()  # 0 (the EOS and pad id) at padding, not -100
    task = sp.LanguageModelingTask(tokens_per_sequence=1)
    with torch.no_grad():
        own = model(**batch).loss * (batch["labels"][:, 1:] != -100).sum()
        masked = {**batch, "labels": batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)}
        assert not torch.allclose(task.measurement(task.forward(model, masked), masked).sum(), own)
        with pytest.raises(sp.TaskError, match=r"Example 0 of the batch has a label at padded position 7 .*-100 at "):
            task.measurement(task.forward(model, batch), batch)
    tagger = _token_bert()
    tagged = _tagged(SEQUENCES, LENGTH)
    tagged["labels"][1, -1] = 2
    with pytest.raises(sp.TaskError, match=r"Example 1 of the batch has a label at padded position 7 "):
        sp.TokenClassificationTask(tokens_per_sequence=1).loss(tagger(**tagged).logits, tagged)


def test_a_row_that_packs_several_sequences_is_refused_since_the_run_attended_within_each() -> None:
    """``DataCollatorWithFlattening`` packs a batch into one row whose position_ids restart at each sequence. Trained
    with flash attention, or without a cache, Llama attends within each sequence; the task's mask (padding only) would
    let them attend to each other, and its own check (eval, with a cache) agrees with that, so the row is refused."""
    model = _llama().eval()
    first, second = SEQUENCES[1], SEQUENCES[2][:3]
    ids = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        cut = len(first)
        alone = torch.cat([model(input_ids=ids[:, :cut]).logits, model(input_ids=ids[:, cut:]).logits], 1)
    assert torch.allclose(packed, alone, atol=1e-5)  # what the run trained on: each sequence alone
    task = _lm()
    grads = PerExampleGradients(model, task, task.select_parameters(model))
    with pytest.raises(sp.TaskError, match=r"Example 0 of the batch packs several sequences .* restart at position 4"):
        grads.outputs({"input_ids": ids, "position_ids": positions})
    grads.outputs({"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None]})  # one sequence: taken


def test_a_sliding_window_on_some_layers_only_is_exact_up_to_it_and_longer_sequences_are_refused() -> None:
    """A Qwen2 whose second layer attends through a window of 3 tokens and whose first attends to all: one mask
    cannot build both. A first batch no longer than the window passes the check against the model's own masking, and
    is exact; a later batch of longer sequences was then attributed as if no layer had a window (28% off on this
    model): it is refused, in a sentence."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=LENGTH, sliding_window=3, use_sliding_window=True,
        max_window_layers=1, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    task = sp.LanguageModelingTask(tokens_per_sequence=1)
    names = task.select_parameters(model)
    grads = PerExampleGradients(model, task, names)
    short = [SEQUENCES[0][:3], SEQUENCES[1][:2]]
    got = grads(_batch(short, length=3), "measurement")
    params = dict(model.named_parameters())
    for i, seq in enumerate(short):
        ids = torch.tensor([seq])
        own = model(input_ids=ids, labels=ids).loss * (len(seq) - 1)
        want = torch.autograd.grad(own, [params[n] for n in names])
        scale = max(float(w.abs().max()) for w in want)
        assert max(float((got[n][i] - w).abs().max()) for n, w in zip(names, want, strict=True)) <= 2e-5 * scale
    with pytest.raises(sp.TaskError, match=r"Example 0 of the batch has 7 tokens, more than the sliding window of 3"):
        grads(_batch(SEQUENCES, length=LENGTH), "measurement")


class _Branching(PlainTransformer):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if attention_mask.all():  # data-dependent control flow: vmap cannot batch it
            attention_mask = torch.ones_like(attention_mask)
        return super().forward(input_ids, attention_mask)


class _CallsItem(PlainTransformer):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = int(attention_mask.sum().item())  # .item(): vmap cannot batch it either
        return super().forward(input_ids[..., :length], attention_mask[..., :length])


@pytest.mark.parametrize("model_class", [_Branching, _CallsItem])
def test_a_model_that_branches_on_its_inputs_gets_a_clear_error(model_class: type) -> None:
    model, task = model_class(True, VOCAB), _lm()
    grads = PerExampleGradients(model, task, task.select_parameters(model))
    with pytest.raises(sp.TaskError, match=r"branches on the values of its inputs.*torch.where"):
        grads(_batch(SEQUENCES, length=LENGTH))


@pytest.mark.parametrize("block_rows", [None, 3])
def test_token_nll_is_cross_entropy_with_its_gradient_under_autograd_and_per_example_transforms(
    block_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``token_nll`` (the language-model loss, half cross_entropy's memory) gives cross_entropy's values and
    gradients, ignored positions 0 with no gradient, under ``torch.func.vmap(grad)`` as per-example gradients
    take it; a second derivative is refused, not wrong. With 3 rows a block its log-sum-exp runs block by block
    (28 rows: the last block short; 7 an example under vmap)."""
    from torch.func import grad, vmap

    from source_proj.tasks import text
    from source_proj.tasks.text import IGNORE_INDEX, token_nll

    if block_rows is not None:
        monkeypatch.setattr(text, "_HOST_BLOCK", block_rows * 13)

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 7, 13, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 13, (4, 7), generator=g)
    targets[0, 2] = targets[3, 6] = IGNORE_INDEX
    weights = torch.randn(4, 7, generator=g, dtype=torch.float64)
    ours = token_nll(logits.reshape(-1, 13), targets.reshape(-1)).view(4, 7)
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), targets.reshape(-1), reduction="none").view(4, 7)
    assert torch.allclose(ours, theirs, atol=1e-13) and ours[0, 2] == 0 and ours[3, 6] == 0
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    (their_grad,) = torch.autograd.grad((theirs * weights).sum(), logits)
    assert torch.allclose(ours_grad, their_grad, atol=1e-13) and not ours_grad[0, 2].any()
    assert torch.autograd.gradcheck(lambda z: token_nll(z, targets[1]), (logits[1].detach().requires_grad_(),))

    def per_example(fn):
        return vmap(grad(lambda z, t, w: (fn(z, t) * w).sum()))(logits.detach(), targets, weights)

    cross_entropy = partial(torch.nn.functional.cross_entropy, reduction="none")
    assert torch.allclose(per_example(token_nll), per_example(cross_entropy), atol=1e-13)
    half = logits.detach().to(torch.bfloat16).float().reshape(-1, 13)
    assert torch.allclose(token_nll(half, targets.reshape(-1)), cross_entropy(half, targets.reshape(-1)), atol=1e-5)
    (first,) = torch.autograd.grad(token_nll(logits[0], targets[0]).sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not require grad|once_differentiable"):
        torch.autograd.grad(first.sum(), logits)


@pytest.mark.parametrize(
    ("outputs", "config_problem", "labels", "problem"),
    [
        (3, None, torch.tensor(CLASSES), "single_label_classification"),
        (3, None, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), "multi_label_classification"),
        (3, "multi_label_classification", torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1]]).float(),
         "multi_label_classification"),
        (1, None, torch.tensor([0.3, -1.2, 2.0]), "regression"),
    ],
    ids=["single-label", "multi-label", "multi-label-by-config", "regression"],
)  # fmt: skip
def test_sequence_classification_trains_each_head_as_the_model_does(outputs, config_problem, labels, problem) -> None:
    """The task's batch-mean loss is the model's own (`labels=` loss) for single-label, multi-label and regression
    heads, the problem found as Hugging Face finds it (the config's, else one output or the labels' type)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=outputs, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        problem_type=config_problem,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {**_batch(SEQUENCES), "labels": labels}
    task = sp.SequenceClassificationTask().bind(model)
    logits = task.forward(model, batch)
    assert task._problem(logits, labels) == problem
    with torch.no_grad():
        assert torch.allclose(task.loss(logits, batch).mean(), model(**batch).loss, atol=1e-6)
    assert task.measurement(logits, batch).shape == (3,)
    ((weight, drawn),) = task.fisher_targets(logits.detach(), batch, FisherDraws.of([0], range(3)))
    assert drawn["labels"].dtype == labels.dtype and drawn["labels"].shape == labels.shape
    assert torch.isfinite(task.fisher_loss(logits, drawn)).all() and weight.shape == (3,)
    said = {"regression": "error", "multi_label_classification": "log-odds"}.get(problem, "margin")
    explicit = sp.SequenceClassificationTask(problem_type=problem).bind(model)  # the same, said outright
    assert torch.equal(explicit.loss(logits, batch), task.loss(logits, batch))
    assert said in explicit.score_labels[0]
    # Bound, the task words its scores by the problem the model says; float labels alone it sees at the batch only.
    assert ("margin" if config_problem is None and problem.startswith("multi") else said) in task.score_labels[0]
    if problem != "single_label_classification":
        with pytest.raises(sp.TaskError, match="Label smoothing applies to single-label classification"):
            sp.SequenceClassificationTask(label_smoothing=0.1).bind(model).loss(logits, batch)
        with pytest.raises(sp.TaskError, match="Label smoothing applies to single-label classification"):
            sp.SequenceClassificationTask(problem_type=problem, label_smoothing=0.1)
    with pytest.raises(sp.TaskError, match="problem_type must be 'auto' or one of"):
        sp.SequenceClassificationTask(problem_type="ranking")  # type: ignore[arg-type]
    if outputs == 3 and config_problem is None:  # class ids given as floats read as a multi-label head's: said so
        with pytest.raises(sp.TaskError, match=r"floats of shape \[3\], which train a multi-label head"):
            task.loss(logits, {**batch, "labels": torch.tensor(CLASSES).float()})


def _token_bert(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForTokenClassification(config).eval()


def _tagged(sequences: list[list[int]], length: int) -> dict:
    """A padded batch with a tag per token (−100 at padding and at every third token: a word's later pieces)."""
    batch = _batch(sequences, length=length)
    tags = (batch["input_ids"] * 7 + 3) % 4
    tags[:, 2::3] = -100
    batch["labels"] = tags.masked_fill(batch["attention_mask"] == 0, -100)
    return batch


@pytest.mark.parametrize("case", ["token-classification", "language-modeling"])
def test_left_padded_token_losses_and_exact_fisher_targets_are_the_right_padded_ones(case: str) -> None:
    """A per-token task reads its labels where forward ran the tokens: on the rows rolled to right padding."""
    if case == "token-classification":
        model, task = _token_bert().double(), sp.TokenClassificationTask(tokens_per_sequence=3)
        right = _tagged(SEQUENCES, LENGTH)
    else:
        model, task = _gpt2().double(), _lm()
        right = _batch(SEQUENCES, length=LENGTH)
        right["labels"] = right["input_ids"].masked_fill(right["attention_mask"] == 0, -100)
    left = _left_padded(right, ("input_ids", "attention_mask", "labels"))
    names = task.select_parameters(model)
    grads = PerExampleGradients(model, task, names)
    outputs = grads.outputs(left)
    assert torch.equal(outputs, grads.outputs(right))
    for quantity in ("loss", "fisher", "measurement"):
        got, want = grads(left, quantity), grads(right, quantity)
        assert all(torch.equal(got[n], want[n]) for n in names), quantity
    bound = task.bind(model)
    for (weight, batch), (expected, rolled) in zip(bound.fisher_targets(outputs, left, None),
                                                   bound.fisher_targets(outputs, right, None), strict=True):
        assert torch.equal(weight, expected) and torch.equal(batch["labels"], rolled["labels"])


def test_token_classification_loss_is_the_models_own_and_its_measurement_the_summed_margins() -> None:
    """The batch mean of ℓ = s/n̄ at n̄ = the batch's labelled tokens per sequence is the model's loss (the mean over
    labelled tokens), smoothed or not (the Trainer's LabelSmoother); the measurement sums the labelled tokens'
    margins; bad labels are refused in a sentence."""
    from transformers.trainer_pt_utils import LabelSmoother

    from source_proj.tasks.text import labelled_tokens

    model = _token_bert()
    batch = _tagged(SEQUENCES, LENGTH)
    counts = (batch["labels"] != -100).sum(-1)
    assert labelled_tokens([{k: v[i] for k, v in batch.items()} for i in range(3)]).tolist() == counts.tolist()
    n = float(counts.float().mean())
    task = sp.TokenClassificationTask(tokens_per_sequence=n).bind(model)
    with torch.no_grad():
        logits = task.forward(model, batch)
        assert torch.allclose(task.loss(logits, batch).mean(), model(**batch).loss, rtol=1e-5)
        smoothed = sp.TokenClassificationTask(tokens_per_sequence=n, label_smoothing=0.1).bind(model)
        theirs = LabelSmoother(epsilon=0.1)({"logits": logits}, batch["labels"])
        assert torch.allclose(smoothed.loss(logits, batch).mean(), theirs, rtol=1e-5)
        assert torch.equal(smoothed.fisher_loss(logits, batch), task.loss(logits, batch))
        margins = task.measurement(logits, batch)
    for b in range(3):
        want = 0.0
        for t in range(LENGTH):
            y = int(batch["labels"][b, t])
            if y >= 0:
                others = torch.cat([logits[b, t, :y], logits[b, t, y + 1 :]])
                want += float(logits[b, t, y] - torch.logsumexp(others, 0))
        assert margins[b].item() == pytest.approx(want, rel=1e-5)
    wrong = {**batch, "labels": batch["labels"].masked_fill(batch["labels"] == 3, 9)}
    with pytest.raises(sp.TaskError, match=r"Token labels must lie in \[0, 3\] .* hold 0 to 9"):
        task.loss(logits, wrong)
    with pytest.raises(sp.TaskError, match=r"a label per token, 'labels' \[B, T\]"):
        task.loss(logits, {**batch, "labels": torch.tensor([0, 1, 2])})
    with pytest.raises(sp.TaskError, match=r"tokens_per_sequence must be a positive number .* mean_labelled_tokens"):
        sp.TokenClassificationTask(tokens_per_sequence=0)


@pytest.mark.parametrize("tokens", [2.5, "own"])
def test_exact_token_classification_fisher_targets_give_the_gauss_newton_matrix(tokens: float | str) -> None:
    model = _token_bert(classes=3).double()
    selection = sp.ModuleSelection(include=("*.output.*",))
    task = sp.TokenClassificationTask(tokens_per_sequence=tokens, parameters=selection)
    names = task.select_parameters(model)
    batch = _tagged([[5, 9, 2, 17, 3], [4, 12, 6]], 5)
    batch["labels"] = batch["labels"].clamp_max(2).masked_fill(batch["labels"] < 0, -100)
    grads = PerExampleGradients(model, task, names)
    flat = lambda g: torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)  # noqa: E731
    fisher = sum(
        flat(grads(b, "fisher")).T @ (w[:, None].double() * flat(grads(b, "fisher")))
        for w, b in task.fisher_targets(grads.outputs(batch), batch, None)
    )
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": attention_bias(batch["attention_mask"], False,
                                                                                  torch.float64)}  # fmt: skip
    jac = jacrev(lambda p: functional_call(model, p, (), inputs).logits)(params)
    j = torch.cat([jac[n].reshape(2, 5, 3, -1) for n in names], dim=3)
    logits = model(**inputs).logits.detach()
    keep = batch["labels"] != -100
    gn = torch.zeros_like(fisher)
    for b in range(2):
        n = float(keep[b].sum()) if tokens == "own" else tokens
        for t in range(5):
            if keep[b, t]:
                p = torch.softmax(logits[b, t], 0)
                gn += j[b, t].T @ (torch.diag(p) - torch.outer(p, p)) @ j[b, t] / n
    assert gn.abs().max() > 0 and torch.allclose(fisher, gn, atol=1e-12, rtol=1e-8)
    # Sampled: a class at every labelled token and nowhere else, weight n.
    ((weight, drawn),) = task.fisher_targets(logits, batch, FisherDraws.of([0], range(2)))
    assert torch.equal(drawn["labels"] != -100, keep)
    n = keep.sum(-1).double() if tokens == "own" else torch.full((2,), 2.5, dtype=torch.float64)
    assert torch.allclose(weight, n)


def test_text_dataset_keeps_each_kind_of_label_in_the_type_its_task_trains_on() -> None:
    """Class ids stay integers, numbers and 0/1 rows become floats (regression and multi-label, as Hugging Face
    decides by the labels' type), token tags are padded with −100; mismatches are refused in a sentence."""
    ids = [[5, 9, 2], [4, 12]]
    assert sp.TextDataset(ids, labels=[2, 0])[0]["labels"].dtype == torch.long
    assert sp.TextDataset(ids, labels=[0.5, -1.25])[1]["labels"].item() == -1.25
    rows = sp.TextDataset(ids, labels=[[1, 0, 1], [0, 0, 1]])
    assert rows[0]["labels"].dtype == torch.float32 and rows[0]["labels"].tolist() == [1.0, 0.0, 1.0]
    tagged = sp.TextDataset(ids, token_labels=[[1, -100, 3], [0, 2]], length=4)
    assert tagged[1]["labels"].tolist() == [0, 2, -100, -100] and tagged[0]["labels"].tolist() == [1, -100, 3, -100]
    from source_proj.tasks.text import mean_labelled_tokens

    assert mean_labelled_tokens(tagged) == 2.0
    with pytest.raises(sp.TaskError, match="Sequence 1 has 2 tokens but 3 token labels"):
        sp.TextDataset(ids, token_labels=[[1, 2, 3], [0, 2, 1]])
    with pytest.raises(sp.TaskError, match=r"Give one of labels .* token_labels .* or targets .*, not several"):
        sp.TextDataset(ids, labels=[0, 1], token_labels=[[1, 2, 3], [0, 2]])
    with pytest.raises(sp.TaskError, match="labels must be one class id, number or row of 0/1 labels per sequence"):
        sp.TextDataset(ids, labels=[[1, 0], [1]])
