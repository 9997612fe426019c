"""Encoder–decoder models (``Seq2SeqTask``): padded per-example gradients equal single pairs on T5, BART and a
plain ``nn.Transformer``, by ``torch.func`` and by the layer hooks; the loss and measurement are the model's own;
the Fisher targets give the Gauss–Newton matrix with the decoder reading the observed target; every refusal; and a
Trainer-recorded T5 and BART run captured as featurize computes it, fitted, queried and split by token."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from torch.func import functional_call, jacrev

import source_proj as sp
from source_proj.query.text_report import token_report
from source_proj.tasks.draws import FisherDraws
from source_proj.tasks.gradients import PerExampleGradients
from source_proj.tasks.text import OBSERVED_TARGET_KEY, mean_target_tokens, shift_right, target_positions

from .conftest import assert_binomial

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from a config: nothing may be downloaded
transformers.logging.set_verbosity_error()

VOCAB = 29
SOURCES = [[5, 9, 2, 17, 3, 11, 8], [4, 12, 6, 21], [7, 3, 19, 13, 10, 15]]
TARGETS = [[8, 11, 3, 17], [21, 6], [15, 10, 13, 19, 3]]


def _t5(attn: str = "eager", width: int = 16, vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_decoder_layers=2, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation=attn,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _bart(attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None, attn_implementation=attn,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


class PlainSeq2Seq(nn.Module):
    """A plain ``torch.nn`` encoder–decoder: the task calls it with the 2-D mask and the decoder's input ids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.position = nn.Embedding(VOCAB, 16), nn.Embedding(16, 16)
        self.transformer = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor):
        src = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1], device=input_ids.device))
        tgt = self.embed(decoder_input_ids) + self.position(torch.arange(decoder_input_ids.shape[1]))
        padding = torch.zeros(attention_mask.shape, dtype=src.dtype).masked_fill(attention_mask == 0, float("-inf"))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        hidden = self.transformer(src, tgt, tgt_mask=causal, src_key_padding_mask=padding,
                                  memory_key_padding_mask=padding, tgt_is_causal=True)  # fmt: skip
        return self.head(hidden)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "t5-eager": _t5, "bart-eager": _bart, "bart-sdpa": lambda: _bart("sdpa"), "plain": PlainSeq2Seq,
}  # fmt: skip
TASKS: dict[str, sp.Seq2SeqTask] = {  # a plain model has no config: the task says how its decoder starts
    "plain": sp.Seq2SeqTask(tokens_per_sequence=3.5, decoder_start_token_id=0, pad_token_id=0),
}


def _pairs(sources: list[list[int]], targets: list[list[int]], length: int | None = 8,
           target_length: int | None = 6) -> dict:  # fmt: skip
    data = sp.TextDataset(sources, targets=targets, length=length, target_length=target_length)
    return {key: torch.stack([data[i][key] for i in range(len(data))]) for key in data[0]}


@pytest.mark.parametrize("case", list(MODELS))
def test_padded_per_example_gradients_equal_single_pairs_by_vmap_and_by_hooks(case: str) -> None:
    model, task = MODELS[case](), TASKS.get(case, sp.Seq2SeqTask(tokens_per_sequence=3.5))
    names = task.select_parameters(model)
    assert any("decoder" in n for n in names) and any("encoder" in n for n in names)
    assert not any("lm_head" in n or "shared" in n or "embed" in n or n.startswith("head") for n in names)
    batch = _pairs(SOURCES, TARGETS)
    for hooks in (False, True):
        grads = PerExampleGradients(model, task, names, hooks=hooks)
        grads.outputs(batch)  # outside vmap: the task checks its masks and decoder inputs against the model's own
        for quantity in ("loss", "measurement"):
            padded = grads(batch, quantity)
            for i, (source, target) in enumerate(zip(SOURCES, TARGETS, strict=True)):
                alone = grads(_pairs([source], [target], len(source), len(target)), quantity)
                scale = max(float(alone[n].abs().max()) for n in names)
                error = max(float((padded[n][i] - alone[n][0]).abs().max()) for n in names)
                assert scale > 1e-4, "the gradient must not vanish, or the comparison proves nothing"
                assert error <= 2e-5 * scale, f"{quantity} of pair {i}, hooks={hooks}: {error:.2e} / {scale:.2e}"


@pytest.mark.parametrize("case", ["t5-eager", "bart-eager"])
def test_left_padded_sources_give_the_gradients_of_right_padded_ones_by_vmap_and_by_hooks(case: str) -> None:
    """A left-padded source (tokenizer.padding_side = "left") is rolled to the right before the encoder runs:
    BART's learned positions see the source from 0, as the pair alone does; the target keeps its own axis."""
    model, task = MODELS[case]().double(), sp.Seq2SeqTask(tokens_per_sequence=3.5)
    names = task.select_parameters(model)
    right = _pairs(SOURCES, TARGETS)
    shift = right["attention_mask"].shape[1] - right["attention_mask"].sum(-1)
    left = {**right, **{key: torch.stack([row.roll(int(s)) for row, s in zip(right[key], shift, strict=True)])
                        for key in ("input_ids", "attention_mask")}}  # fmt: skip
    for hooks in (True, False):
        grads = PerExampleGradients(model, task, names, hooks=hooks)
        assert torch.equal(grads.outputs(left), grads.outputs(right))
        for quantity in ("loss", "measurement"):
            got, want = grads(left, quantity), grads(right, quantity)
            assert all(torch.equal(got[n], want[n]) for n in names), f"{quantity}, hooks={hooks}"
    alone = grads(_pairs(SOURCES[1:2], TARGETS[1:2], len(SOURCES[1]), len(TARGETS[1])), "measurement")
    scale = max(float(alone[n].abs().max()) for n in names)
    assert scale > 1e-4 and max(float((got[n][1] - alone[n][0]).abs().max()) for n in names) <= 1e-7 * scale


@pytest.mark.parametrize("case", ["t5-eager", "bart-eager"])
def test_loss_and_measurement_are_the_models_own_seq2seq_loss(case: str) -> None:
    model = MODELS[case]().eval()
    batch = _pairs(SOURCES, TARGETS)
    counts = target_positions(batch).sum(-1)
    assert counts.tolist() == [4, 2, 5]
    task = sp.Seq2SeqTask(tokens_per_sequence=float(counts.float().mean()))
    with torch.no_grad():
        measured = task.measurement(task.forward(model, batch), batch)
        for i, (source, target) in enumerate(zip(SOURCES, TARGETS, strict=True)):  # the mean over target tokens
            own = model(input_ids=torch.tensor([source]), labels=torch.tensor([target])).loss
            assert torch.allclose(measured[i], own * counts[i], rtol=1e-5)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        assert torch.allclose(task.loss(task.forward(model, batch), batch).mean(), own, rtol=1e-5)  # equal n̄
        each = sp.Seq2SeqTask(tokens_per_sequence="own")
        per_pair = torch.stack([model(input_ids=torch.tensor([s]), labels=torch.tensor([t])).loss
                                for s, t in zip(SOURCES, TARGETS, strict=True)])  # fmt: skip
        assert torch.allclose(each.loss(each.forward(model, batch), batch), per_pair, rtol=1e-5)
    data = sp.TextDataset(SOURCES, targets=TARGETS)
    assert mean_target_tokens(data) == pytest.approx(11 / 3)


@pytest.mark.parametrize("tokens", [2.5, "own"])
def test_exact_seq2seq_fisher_targets_give_the_gauss_newton_matrix_with_the_observed_decoder_inputs(tokens) -> None:
    vocab = 12  # one exact direction per (target position, token): a small vocabulary keeps them few
    model = _t5(width=8, vocab=vocab).double().eval()
    task = sp.Seq2SeqTask(tokens_per_sequence=tokens, parameters=sp.ModuleSelection(include=("decoder.block.1.*",)))
    names = task.select_parameters(model)
    batch = _pairs([[5, 9, 2], [4, 10]], [[8, 11, 3], [7]], length=3, target_length=3)
    grads = PerExampleGradients(model, task, names)
    outputs = grads.outputs(batch)
    directions = task.fisher_targets(outputs, batch, None)
    for _, pseudo in directions[:: len(directions) // 5]:  # the decoder still reads the observed target
        assert not torch.equal(pseudo["labels"], batch["labels"])
        assert torch.equal(task.forward(model, pseudo), outputs)
    observed = shift_right(batch["labels"], 0, 0)
    flat = lambda g: torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)  # noqa: E731
    fisher = sum(flat(grads(b, "fisher")).T @ (w[:, None].double() * flat(grads(b, "fisher"))) for w, b in directions)

    # Gauss–Newton of ℓ = s/n: Σ_b (1/n_b) Σ_t J_btᵀ (diag p − ppᵀ) J_bt over the predicted target positions, the
    # decoder reading the observed target.
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "decoder_input_ids": observed}
    jac = jacrev(lambda p: functional_call(model, p, (), inputs).logits)(params)
    j = torch.cat([jac[n].reshape(2, 3, vocab, -1) for n in names], dim=3)
    logits = model(**inputs).logits.detach()
    keep = target_positions(batch)
    gn = torch.zeros_like(fisher)
    for b in range(2):
        n = float(keep[b].sum()) if tokens == "own" else tokens
        for t in range(3):
            if keep[b, t]:
                p = torch.softmax(logits[b, t], 0)
                gn += j[b, t].T @ (torch.diag(p) - torch.outer(p, p)) @ j[b, t] / n
    scale = float(gn.abs().max())
    assert scale > 1e-6
    assert float((fisher - gn).abs().max()) <= 1e-7 * scale  # T5's norms square in float32 even in a float64 model


def test_sampled_seq2seq_fisher_targets_draw_from_the_model_at_target_positions_only() -> None:
    """6,000 copies of two pairs in one batch, each copy its own rows of the draws (the draws across keys are
    test_fisher_draws' over-keys check): tokens are drawn at target positions only, from the softmax there, and the
    decoder still reads the observed target."""
    task, copies = sp.Seq2SeqTask(tokens_per_sequence=2.5), 6000
    pairs = _pairs([[3, 4], [5, 6]], [[7, 8, 9], [4]], length=2, target_length=3)
    batch = {key: value.repeat(copies, 1) for key, value in pairs.items()}
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    draws = FisherDraws.of([1], range(2 * copies))
    ((weight, sampled),) = task.fisher_targets(logits.repeat(copies, 1, 1), batch, draws)
    labels = sampled["labels"].reshape(copies, 2, 3)
    assert torch.equal(weight, torch.full((2 * copies,), 2.5))
    observed = shift_right(sampled[OBSERVED_TARGET_KEY], 0, 0).reshape(copies, 2, 3)
    assert torch.equal(observed, torch.tensor([[0, 7, 8], [0, 4, 0]]).expand(copies, 2, 3))
    assert (labels[:, 0] >= 0).all() and (labels[:, 1, 0] >= 0).all() and (labels[:, 1, 1:] == -100).all()
    assert_binomial(torch.bincount(labels[:, 0, 2], minlength=10), torch.softmax(logits[0, 2], 0), copies)


def test_seq2seq_inputs_and_models_that_do_not_fit_are_refused_with_a_sentence() -> None:
    t5 = _t5()
    batch = _pairs(SOURCES, TARGETS)
    with pytest.raises(sp.TaskError, match=r"T5ForConditionalGeneration is an encoder–decoder model.*Seq2SeqTask"):
        sp.LanguageModelingTask(tokens_per_sequence=3).forward(t5, batch)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=1,
                                                                 n_head=2, attn_implementation="eager"))  # fmt: skip
    with pytest.raises(sp.TaskError, match=r"GPT2LMHeadModel is not an encoder–decoder model"):
        sp.Seq2SeqTask(tokens_per_sequence=3).forward(gpt2, batch)
    # A decoder that the model starts from another token: the first batch's logits differ from the model's own.
    wrong = sp.Seq2SeqTask(tokens_per_sequence=3, decoder_start_token_id=5)
    with pytest.raises(sp.TaskError, match=r"do not reproduce T5ForConditionalGeneration's own logits"):
        PerExampleGradients(t5, wrong, wrong.select_parameters(t5)).outputs(batch)
    # A target padded with the pad id under a decoder_attention_mask: the model's loss predicts it, the task would not.
    padded = {**batch, "labels": batch["labels"].clamp_min(0), "decoder_attention_mask": (batch["labels"] >= 0).long()}
    with pytest.raises(sp.TaskError, match=r"Example 0 .* label at padded position 4 \(decoder_attention_mask 0"):
        sp.Seq2SeqTask(tokens_per_sequence=3).loss(torch.zeros(3, 6, VOCAB), padded)
    with pytest.raises(sp.TaskError, match=r"needs its target as 'labels' \[B, S\].*holds none"):
        sp.Seq2SeqTask(tokens_per_sequence=3).forward(t5, {k: v for k, v in batch.items() if k != "labels"})
    plain = sp.Seq2SeqTask(tokens_per_sequence=3)
    with pytest.raises(sp.TaskError, match=r"Cannot build .* decoder inputs"):
        plain._decoder_inputs(batch, plain._shift_ids(nn.Linear(2, 2)), "Linear")
    with pytest.raises(sp.TaskError, match=r"tokens_per_sequence must be .* mean_target_tokens"):
        sp.Seq2SeqTask(tokens_per_sequence=0)
    with pytest.raises(sp.TaskError, match=r"Target 1 is empty"):
        sp.TextDataset(SOURCES, targets=[[1], [], [2]])
    with pytest.raises(sp.TaskError, match=r"Target 2 has 5 tokens, more than target_length=4"):
        sp.TextDataset(SOURCES, targets=TARGETS, target_length=4)
    with pytest.raises(sp.TaskError, match=r"Target token ids must be non-negative"):
        sp.TextDataset(SOURCES, targets=[[1], [-3], [2]])
    with pytest.raises(sp.TaskError, match=r"one of labels .* or targets"):
        sp.TextDataset(SOURCES, labels=[0, 1, 0], targets=TARGETS)
    with pytest.raises(sp.TaskError, match=r"2 targets were given for 3 sequences"):
        sp.TextDataset(SOURCES, targets=TARGETS[:2])


def test_sources_and_targets_beyond_barts_position_tables_are_refused_by_name() -> None:
    """BART's encoder and decoder look positions up in tables of 16 rows (two more before position 0): a source or a
    target longer would index past them (an IndexError on the CPU, a device-side assert on a GPU)."""
    bart, task = _bart(), sp.Seq2SeqTask(tokens_per_sequence=3)
    long = list(range(3, 20))  # 17 tokens
    pairs = partial(_pairs, length=None, target_length=None)
    assert task.forward(bart, pairs([long[:16], [3]], [long[:16], [4]])).shape == (2, 16, VOCAB)
    with pytest.raises(sp.TaskError, match=r"^Example 1 of the batch has 17 tokens, more than the 16 positions of "
                       r"BartForConditionalGeneration's position table"):  # fmt: skip
        task.forward(bart, pairs([[3], long], [[4], [5]]))
    with pytest.raises(sp.TaskError, match=r"^Example 0 of the batch has 17 target tokens, more than the 16"):
        task.forward(bart, pairs([[3], [4]], [long, [5]]))


def test_examples_of_different_lengths_are_refused_with_how_to_pad_them(tmp_path) -> None:
    """A newcomer's list of unpadded pairs: featurize says they differ in length and names the padding dataset."""
    model = _t5()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sp.TrajectoryRecorder(tmp_path / "run", model, opt, save_every=1)
    rec.begin_stage("main", dataset_size=3)
    pairs = [{"input_ids": torch.tensor(s), "labels": torch.tensor(t)} for s, t in zip(SOURCES, TARGETS, strict=True)]
    for pair in pairs:
        opt.zero_grad()
        model(input_ids=pair["input_ids"][None], labels=pair["labels"][None]).loss.backward()
        opt.step()
        rec.step()
    rec.close()
    with pytest.raises(sp.TaskError, match=r"have different lengths .*sp\.TextDataset\(sequences, length=T\)"):
        sp.featurize(tmp_path / "run", _t5(), sp.Seq2SeqTask(tokens_per_sequence=3), pairs, tmp_path / "s.sp",
                     progress=False)  # fmt: skip


@pytest.mark.parametrize("case", ["t5-eager", "bart-eager"])
def test_a_trainer_run_is_captured_as_featurize_computes_it_and_answers_queries(tmp_path, case: str) -> None:
    """A T5 or a BART trained by the Trainer on reversed sources (8 pairs, two steps of 4; 4 target tokens a pair,
    so the batch mean of s/n̄ is the Trainer's loss exactly): capture taps the Trainer's own gradients, and post-hoc
    featurize with ``Seq2SeqTask`` computes them at every step; featurize at the defaults (eigen projection, sampled
    Fisher) fits and answers queries, and splits each pair's score over its source and target tokens."""
    from .test_integrations import _captured_and_posthoc

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 6), generator=g)
    data = sp.TextDataset(ids.tolist(), targets=ids.flip(1)[:, :4].tolist())
    task = sp.Seq2SeqTask(tokens_per_sequence=mean_target_tokens(data))
    assert task.tokens_per_sequence == 4.0
    build = MODELS[case]
    _captured_and_posthoc(tmp_path, build, data, task, per_device_train_batch_size=4)
    store = sp.featurize(tmp_path / "run", build(), task, data, tmp_path / "default.sp", progress=False,
                         projection=sp.ProjectionArguments(dim=32))  # fmt: skip
    assert store.meta["projection"]["kind"] == "eigen"
    sp.fit(store.path, sp.FitArguments(segments_per_stage=1), progress=False)
    attributor = sp.Attributor(store.path, build(), task)
    queries = torch.utils.data.Subset(data, [0, 1, 2])
    scores = attributor.scores(queries)
    assert scores.shape == (3, 8) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # Per-token scores: the source's and the target's shares sum to each pair's score. With the targets padded to
    # the source's length (S = T), the shares are the same: the cross-attention's keys and values lie on the
    # source's positions by what they read (the encoder's output), not by their shape.
    split = sp.token_scores(attributor, queries, data, [3, 4, 5], progress=False)
    assert split.tokens.shape == (3, 3, 6) and split.target_tokens.shape == (3, 3, 4)
    assert np.abs(split.tokens).max() > 0 and np.abs(split.target_tokens).max() > 0 and not split.unplaced.any()
    total = split.tokens.sum(-1) + split.target_tokens.sum(-1)
    assert np.allclose(total, split.scores, rtol=1e-4, atol=1e-6 * np.abs(split.scores).max())
    assert np.allclose(split.scores, scores[:, [3, 4, 5]], rtol=1e-5)
    padded = sp.TextDataset(ids.tolist(), targets=ids.flip(1)[:, :4].tolist(), target_length=6)
    same = sp.token_scores(attributor, queries, padded, [3, 4, 5], progress=False)
    assert same.target_tokens.shape == (3, 3, 6) and not same.target_tokens[..., 4:].any()
    scale = np.abs(split.tokens).max()
    assert np.allclose(same.tokens, split.tokens, atol=1e-5 * scale)
    assert np.allclose(same.target_tokens[..., :4], split.target_tokens, atol=1e-5 * scale)
    # One target token's loss a query each: together they are the whole query (its summed target loss).
    singles = [sp.single_token_query(data[0], j, target=True) for j in range(4)]
    whole, parts = attributor.query_features([data[0]]), attributor.query_features(singles)
    assert np.allclose(parts.sum(0), whole[0], rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
    with pytest.raises(sp.TaskError, match="pass target=True"):
        sp.single_token_query(data[0], 1)
    with pytest.raises(sp.TaskError, match=r"not the input tokens.*pass target=True"):  # S = T: shape cannot tell
        sp.single_token_query(padded[0], 1)
    with pytest.raises(sp.TaskError, match="Target token 4 is not predicted"):
        sp.single_token_query(padded[0], 4, target=True)
    # The HTML view: each pair as its source, an arrow, its target, a hover value on every token.
    page = token_report(split, ["q0", "q1", "q2"], lambda t: f"w{t}", tmp_path / "tokens.html").read_text()
    source, target = data[3]["input_ids"].tolist(), data[3]["labels"].tolist()
    row = page.split("main[3]")[1].split("</tr>")[0]  # training pair 3, for query 0: its source → its target
    before, after = row.split("→")
    assert [f">w{t}<" in before for t in source] == [True] * len(source) and before.count("title=") == len(source)
    assert [f">w{t}<" in after for t in target] == [True] * len(target) and after.count("title=") == len(target)


def test_pairs_padded_per_batch_by_data_collator_for_seq2seq_are_attributed_as_when_padded_to_one_length(
    tmp_path,
) -> None:
    """Pairs of their own lengths, batched by ``DataCollatorForSeq2Seq`` (a real tokenizer built offline; its
    decoder inputs made by the model): the stores of ``sp.CollatedDataset(pairs, collator)`` and of the same pairs
    padded to one length by ``sp.TextDataset`` are equal, with the random and the eigen projection."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w3")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(8):  # two batches of 4, each padded to its own longest pair
        source = torch.randint(3, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        pairs.append({"input_ids": source, "labels": source[::-1][: max(2, len(source) - 2)]})
    model = _bart()
    ragged = sp.CollatedDataset(pairs, DataCollatorForSeq2Seq(tokenizer, model=model))
    padded = sp.TextDataset([p["input_ids"] for p in pairs], targets=[p["labels"] for p in pairs], pad_id=1)
    task = sp.Seq2SeqTask(tokens_per_sequence=mean_target_tokens(padded))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    recorder = sp.TrajectoryRecorder(tmp_path / "run", model, optimizer, save_every=2)
    recorder.begin_stage("main", dataset_size=len(pairs))
    for batch in torch.utils.data.DataLoader(ragged, batch_size=4, collate_fn=ragged.collate_fn):
        assert "decoder_input_ids" in batch and (batch["labels"] == -100).any()  # padded per batch, by the collator
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorder.step()
    recorder.close()
    for kind in ("factored", "eigen"):
        projection = sp.ProjectionArguments(dim=32, kind=kind, basis_positions=2)
        options = sp.FeaturizeArguments(batch_size=4)
        stores = [sp.featurize(tmp_path / "run", _bart(), task, data, tmp_path / f"{kind}-{i}.sp",
                               projection=projection, options=options, progress=False)
                  for i, data in enumerate((ragged, padded))]  # fmt: skip
        for step in (0, 2):
            got, want = (store.read(f"grads/main/step-{step:08d}") for store in stores)
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
