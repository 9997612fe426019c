"""Datasets of sequences of their own lengths, batched by the collator that padded the training batches
(``sp.CollatedDataset``): featurize, fit, queries and per-token scores give what they give on the same sequences
padded to one length; without the collator, one sentence says what to give."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import source_proj as sp
from source_proj.tasks.text import mean_predicted_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB, LENGTH = 40, 16


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _sequences(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    return [torch.randint(1, VOCAB, (int(t),), generator=g).tolist() for t in lengths]


def _pad(examples: list[dict]) -> transformers.BatchEncoding:
    """Pads a batch to its longest sequence, as ``DataCollatorForLanguageModeling`` does (labels −100 there)."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": labels})


def _pad_left(examples: list[dict]) -> transformers.BatchEncoding:
    """``_pad`` with the padding before each sequence's tokens, as a tokenizer with ``padding_side="left"`` pads."""
    batch = _pad(examples)
    shift = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(-1)
    return transformers.BatchEncoding({key: torch.stack([row.roll(int(s)) for row, s in zip(value, shift, strict=True)])
                                       for key, value in batch.items()})  # fmt: skip


def _pad_ids_only(examples: list[dict]) -> transformers.BatchEncoding:
    """``_pad``, refusing a key it does not know, as a tokenizer's ``pad`` refuses a text column."""
    unknown = sorted(set(examples[0]) - {"input_ids"})
    if unknown:
        raise TypeError(f"cannot pad {unknown}")
    return _pad(examples)


@pytest.fixture(scope="module")
def ragged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of AdamW on 24 sequences of their own lengths (``_sequences(24, 0)``), batched by ``_pad``, with
    the task of ``_ragged_task``; read by the tests, never changed."""
    run = tmp_path_factory.mktemp("ragged") / "run"
    ragged = sp.CollatedDataset([{"input_ids": s} for s in _sequences(24, 0)], _pad)
    task = _ragged_task()
    model = _gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    recorder = sp.TrajectoryRecorder(run, model, optimizer, save_every=3)
    recorder.begin_stage("main", dataset_size=len(ragged))
    for batch in torch.utils.data.DataLoader(ragged, batch_size=6, collate_fn=ragged.collate_fn):  # one epoch
        loss = task.loss(task.forward(model, batch), batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorder.step()
    recorder.close()
    return run


def _ragged_task() -> sp.LanguageModelingTask:
    return sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(sp.TextDataset(_sequences(24, 0),
                                                                                            length=LENGTH)))


def test_sequences_of_their_own_lengths_without_a_collator_that_batches_them_are_refused_in_one_sentence(
    ragged_run: Path, tmp_path: Path
) -> None:
    """Without the collator the examples cannot be batched: one sentence names what to give."""
    train, task = _sequences(24, 0), _ragged_task()
    with pytest.raises(sp.TaskError, match=r"takes the function that batches the examples .* not a str"):
        sp.CollatedDataset(train, "pad")
    with_text = sp.CollatedDataset([{"input_ids": s, "text": "a docstring"} for s in train], _pad_ids_only)
    told = r"could not batch \d+ examples with keys \['input_ids', 'text'\] \(TypeError: .*remove_columns"
    with pytest.raises(sp.TaskError, match=told):
        sp.featurize(ragged_run, _gpt2(), task, with_text, tmp_path / "text.sp", progress=False,
                     options=sp.FeaturizeArguments(batch_size=5))  # fmt: skip
    plain = [{"input_ids": s} for s in train]
    told = r"different lengths .*sp\.CollatedDataset\(dataset, collate_fn\) \(a Trainer's is trainer\.data_collator\)"
    with pytest.raises(sp.TaskError, match=told):
        sp.featurize(ragged_run, _gpt2(), task, plain, tmp_path / "plain.sp", progress=False)


@pytest.mark.parametrize("kind", ["eigen", "factored"])
def test_sequences_of_their_own_lengths_are_attributed_as_when_padded_to_one(
    ragged_run: Path, tmp_path: Path, kind: str
) -> None:
    """The eigen basis (the default) takes no padded position into its factors, and draws the positions it samples
    (3 of each sequence here, in batches of five) and the sampled Fisher's labels at the loss's positions only, so
    neither depends on how far a batch was padded."""
    train, queries = _sequences(24, 0), _sequences(3, 1)
    ragged = sp.CollatedDataset([{"input_ids": s} for s in train], _pad)
    padded = sp.TextDataset(train, length=LENGTH)
    task = _ragged_task()

    options = sp.FeaturizeArguments(batch_size=5)  # batches of five: lengths differ between the two stores' batches
    stores = {}
    for name, data in (("ragged", ragged), ("padded", padded)):
        projection = sp.ProjectionArguments(dim=64, kind=kind, basis_positions=3)
        stores[name] = sp.featurize(ragged_run, _gpt2(), task, data, tmp_path / f"{name}.sp",
                                    projection=projection, options=options, progress=False)  # fmt: skip
        sp.fit(stores[name].path, progress=False)
    if kind == "eigen":  # A tokenized dataset's columns are Python lists: of one length, they batch as tensors would.
        listed = [{key: value.tolist() for key, value in padded[i].items()} for i in range(len(padded))]
        stores["listed"] = sp.featurize(ragged_run, _gpt2(), task, listed, tmp_path / "listed.sp",
                                        projection=projection, options=options, progress=False)  # fmt: skip
    steps = [c.step for c in sp.Trajectory.load(ragged_run).checkpoints]
    for step in steps:
        want = stores["padded"].read(f"grads/main/step-{step:08d}")
        got = stores["ragged"].read(f"grads/main/step-{step:08d}")
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
        if "listed" in stores:
            assert np.array_equal(stores["listed"].read(f"grads/main/step-{step:08d}"), want)

    ragged_queries = sp.CollatedDataset([{"input_ids": s} for s in queries], _pad)
    padded_queries = sp.TextDataset(queries, length=LENGTH)
    ours = sp.Attributor(stores["ragged"].path, _gpt2(), task)
    theirs = sp.Attributor(stores["padded"].path, _gpt2(), task)
    want = theirs.scores(padded_queries)
    np.testing.assert_allclose(ours.scores(ragged_queries), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

    rows = [0, 7, 13]  # per-token scores: the selected rows batched by the collator, to their longest
    got = sp.token_scores(ours, ragged_queries, ragged, rows, progress=False)
    want = sp.token_scores(theirs, padded_queries, padded, rows, progress=False)
    width = max(len(train[r]) for r in rows)
    assert got.tokens.shape == (3, 3, width) and np.abs(want.tokens).max() > 0
    scale = np.abs(want.tokens).max()
    np.testing.assert_allclose(got.tokens, want.tokens[..., :width], rtol=1e-3, atol=1e-4 * scale)
    assert np.all(want.tokens[..., width:] == 0)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-3, atol=1e-4 * np.abs(want.scores).max())


@pytest.mark.slow
def test_left_padded_batches_are_attributed_as_right_padded_ones(tmp_path: Path) -> None:
    """A left-padding collator (tokenizer.padding_side = "left") gives the store, the scores, the per-token scores and
    the single-token queries that a right-padding one gives: the task rolls each row to the right before GPT-2's
    learned positions see it, and a single-token query's label stays on its token wherever the collator pads."""
    train, queries = _sequences(8, 0), _sequences(3, 1)
    right = sp.CollatedDataset([{"input_ids": s} for s in train], _pad)
    left = sp.CollatedDataset([{"input_ids": s} for s in train], _pad_left)
    task = sp.LanguageModelingTask(tokens_per_sequence="own")
    model = _gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder = sp.TrajectoryRecorder(tmp_path / "run", model, optimizer, save_every=1)
    recorder.begin_stage("main", dataset_size=len(train))
    for batch in torch.utils.data.DataLoader(left, batch_size=4, collate_fn=left.collate_fn):
        optimizer.zero_grad()
        task.loss(task.forward(model, batch), batch).mean().backward()
        optimizer.step()
        recorder.step()
    recorder.close()
    stores = {}
    for name, data in (("left", left), ("right", right)):
        stores[name] = sp.featurize(tmp_path / "run", _gpt2(), task, data, tmp_path / f"{name}.sp", progress=False,
                                    projection=sp.ProjectionArguments(dim=32),
                                    options=sp.FeaturizeArguments(batch_size=4))  # fmt: skip
        sp.fit(stores[name].path, progress=False)
    for step in (c.step for c in sp.Trajectory.load(tmp_path / "run").checkpoints):
        want = stores["right"].read(f"grads/main/step-{step:08d}")
        assert np.abs(want).max() > 0 and np.array_equal(stores["left"].read(f"grads/main/step-{step:08d}"), want)
    ours, theirs = (sp.Attributor(stores[name].path, _gpt2(), task) for name in ("left", "right"))
    single = [sp.single_token_query({"input_ids": q}, 2) for q in queries]
    for chosen in ([{"input_ids": q} for q in queries], single):
        want = theirs.scores(sp.CollatedDataset(chosen, _pad))
        assert np.abs(want).max() > 0 and np.array_equal(ours.scores(sp.CollatedDataset(chosen, _pad_left)), want)
    rows = [0, 3, 6]
    got = sp.token_scores(ours, sp.CollatedDataset(single, _pad_left), left, rows, progress=False)
    want = sp.token_scores(theirs, sp.CollatedDataset(single, _pad), right, rows, progress=False)
    assert np.abs(want.tokens).max() > 0 and np.array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.scores, want.scores)


def test_the_basis_budget_counts_a_padded_sequences_real_tokens() -> None:
    """The layers' budget (``basis_layer_positions``) keeps as few sequences as give every layer its positions,
    counting each sequence's real tokens, the ones its factors can take: sequences of 5 tokens padded to 8 or to
    16 keep the same ⌈130 / 5⌉ = 26 of the 30 drawn (130: twice the widest factor's side, the MLP's 64 + 1)."""
    from source_proj.featurize.basis import BasisPass
    from source_proj.tasks.gradients import PerExampleGradients

    seqs = [s[:5] for s in _sequences(40, 2) if len(s) >= 5][:36]
    model = _gpt2()
    kept = []
    for length in (8, 16):
        data = sp.TextDataset(seqs, length=length)
        task = sp.LanguageModelingTask(tokens_per_sequence=4)
        names = task.select_parameters(model)
        basis = BasisPass(PerExampleGradients(model, task, names), task, {"main": data}, names, 32, examples=30,
                          seed=0, batch_size=8, device=torch.device("cpu"), layer_positions=40)  # fmt: skip
        basis.inputs_cut()
        kept.append(len(basis.subsets["main"]))
    assert kept == [26, 26]


def test_a_collator_that_masks_at_random_is_warned_of_once_and_its_first_batch_is_the_one_it_draws() -> None:
    """``DataCollatorForLanguageModeling(mlm=True)`` masks each call anew: a ``CollatedDataset`` of it says so once, as
    its first batch is made, and that batch is the one the collator draws from the random state it was given (the
    check's second draw is put back); a collator that only pads is told nothing."""
    import warnings

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                                     pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    rows = [{"input_ids": [max(3, t) for t in s]} for s in _sequences(8, 0)]
    told = {}
    for mlm in (True, False):
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=mlm, mlm_probability=0.5)
        torch.manual_seed(0)
        want = collator(rows[:4])
        torch.manual_seed(0)
        data = sp.CollatedDataset(rows, collator)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = data.collate_fn(rows[:4])
            second = data.collate_fn(rows[:4])
        told[mlm] = [str(w.message) for w in caught]
        assert all(torch.equal(first[k], want[k]) for k in want)
        assert mlm == (not torch.equal(first["labels"], second["labels"]))
    assert told[False] == [] and len(told[True]) == 1
    assert told[True][0].startswith("sp.CollatedDataset's collate function (DataCollatorForLanguageModeling) batches")
    assert "scores do not repeat" in told[True][0]


def test_mean_predicted_tokens_counts_what_the_collator_labels_so_the_task_loss_is_the_models() -> None:
    """A GPT-2-style tokenizer without a pad token pads with its EOS, and ``DataCollatorForLanguageModeling`` then
    labels every EOS −100, the one ending each text too: n̄ counts the collated labels, so the batch mean of
    ℓ = s/n̄ is the model's own loss (the run's), not that loss times n/(n + 1)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<eos>")),
                                        eos_token="<eos>", pad_token="<eos>")  # fmt: skip
    rows = [{"input_ids": [*s, 0], "attention_mask": [1] * (len(s) + 1)} for s in _sequences(5, seed=3)]
    data = sp.CollatedDataset(rows, DataCollatorForLanguageModeling(tokenizer, mlm=False))
    batch = data.collate_fn(list(rows))
    model = _gpt2().eval()
    task = sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))
    with torch.no_grad():
        ours = task.loss(task.forward(model, batch), batch).mean()
        own = model(**batch).loss
    assert torch.allclose(ours, own, rtol=1e-6), f"{float(ours)} vs the model's {float(own)}"


def test_single_token_queries_keep_their_labels_through_a_language_models_collator() -> None:
    """``DataCollatorForLanguageModeling`` labels every token anew, whatever labels an example holds: a batch of
    single-token queries measured every token's loss. Their chosen labels are kept, right-padded with −100, so each
    query's measurement is the loss of its one token, computed on the sequence alone; for an encoder–decoder pair
    (``DataCollatorForSeq2Seq``, ``target=True``), of its one target token with the decoder reading the whole target."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[PAD]")),
                                        pad_token="[PAD]")  # fmt: skip
    model = _gpt2().eval()
    task = sp.LanguageModelingTask(tokens_per_sequence=1)
    rows = [{"input_ids": torch.tensor(s)} for s in _sequences(3, seed=4)]  # as a dataset formatted "torch" gives
    # One sequence's tokens (one length: the collator's labels were silently every token's), then ragged ones.
    for picked in ([(0, 1), (0, 2), (0, 5)], [(0, 2), (1, len(rows[1]["input_ids"]) - 1), (2, 1)]):
        queries = [sp.single_token_query(rows[i], j) for i, j in picked]
        batch = sp.CollatedDataset(queries, DataCollatorForLanguageModeling(tokenizer, mlm=False)).collate_fn(queries)
        with torch.no_grad():
            ours = task.measurement(task.forward(model, batch), batch)
            want = [F.cross_entropy(model(rows[i]["input_ids"][None, :j]).logits[0, -1], rows[i]["input_ids"][j])
                    for i, j in picked]  # fmt: skip
        torch.testing.assert_close(ours, torch.stack(want), rtol=1e-5, atol=1e-6)

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0, pad_token_id=0,
        decoder_start_token_id=0, attn_implementation="eager")).eval()  # fmt: skip
    pairs = [{"input_ids": s, "labels": t} for s, t in zip(_sequences(2, seed=5), ([3, 4, 5], [6, 7]), strict=True)]
    picked = [(0, 1), (1, 1)]
    queries = [sp.single_token_query(pairs[i], j, target=True) for i, j in picked]
    batch = sp.CollatedDataset(queries, DataCollatorForSeq2Seq(tokenizer, model=t5)).collate_fn(queries)
    seq2seq = sp.Seq2SeqTask(tokens_per_sequence=1)
    with torch.no_grad():
        ours = seq2seq.measurement(seq2seq.forward(t5, batch), batch)
        want = [F.cross_entropy(t5(input_ids=torch.tensor([pairs[i]["input_ids"]]),
                                   labels=torch.tensor([pairs[i]["labels"]])).logits[0, j],
                                torch.tensor(pairs[i]["labels"][j])) for i, j in picked]  # fmt: skip
    torch.testing.assert_close(ours, torch.stack(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(sp.TaskError, match="mixes single-token queries"):
        sp.CollatedDataset(rows, DataCollatorForLanguageModeling(tokenizer, mlm=False)).collate_fn(
            [rows[0], sp.single_token_query(rows[1], 1)])
