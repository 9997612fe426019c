"""The text example end to end at a tiny size: two stages (AdamW, warm-up) recorded, featurized with the
language-modelling task, fitted, and the query results shown as text (HTML report and CLI)."""

from __future__ import annotations

import html
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import source_proj as sp
from source_proj.cli.main import main
from source_proj.query.text_report import ShadedText, text_report, token_report
from source_proj.tasks.text import mean_predicted_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text"
sys.path.insert(0, str(EXAMPLE))
import lm  # noqa: E402

TINY = lm.Config(length=10, pretrain_size=24, finetune_size=16, queries=4, n_embd=16, n_layer=1, n_head=2,
                 batch_size=8, pretrain_epochs=2, finetune_epochs=2, warmup=0.5, checkpoints=2)  # fmt: skip
SPEC = f"""
import sys
sys.path.insert(0, {str(EXAMPLE)!r})
import lm
TINY = lm.{TINY!r}

def build_model():
    return lm.build_model(0, TINY)

def build_task():
    return lm.build_task(TINY)

def train_data(stage):
    return lm.corpus(TINY).train[stage]

def query_data():
    return lm.corpus(TINY).queries

def describe(stage, index):
    return lm.corpus(TINY).train[stage].text(index)

def describe_query(index):
    return lm.corpus(TINY).queries.text(index)
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("text")
    (root / "spec.py").write_text(SPEC)
    lm.train(TINY, seed=0, run_dir=root / "run")
    store = sp.featurize(
        root / "run", lm.build_model(0, TINY), lm.build_task(TINY), lm.corpus(TINY).train, root / "model.sp",
        projection=sp.ProjectionArguments(dim=64), options=sp.FeaturizeArguments(batch_size=8, chunk_rows=8),
        spec=str(root / "spec.py"), progress=False,
    )  # fmt: skip
    sp.fit(store, progress=False)
    return root, root / "model.sp"


def test_two_stage_adamw_run_with_warmup_is_recorded_and_attributed(fitted: tuple[Path, Path]) -> None:
    root, store = fitted
    trajectory = sp.Trajectory.load(root / "run")
    assert [(s.name, s.start_step, s.end_step, s.dataset_size) for s in trajectory.stages] == [
        ("pretrain", 0, 6, 24), ("finetune", 6, 10, 16)
    ]
    assert all(s.optimizer["kind"] == "adamw" for s in trajectory.stages)
    assert trajectory.lr[0] < trajectory.lr[1] and trajectory.lr[6] < trajectory.lr[7]  # each stage warms up
    meta = sp.Store.open(store).meta
    assert meta["task"]["class"] == "source_proj.tasks.text.LanguageModelingTask"
    assert meta["task"]["tokens_per_sequence"] == TINY.length - 1
    assert all(".h.0." in name for name, _ in meta["params"])  # attention and MLP layers only
    attributor = sp.Attributor(store, lm.build_model(0, TINY), lm.build_task(TINY))
    scores = attributor.scores(lm.corpus(TINY).queries)
    assert scores.shape == (4, 40) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert [(r.stage, r.offset, r.size) for r in attributor.rows] == [("pretrain", 0, 24), ("finetune", 24, 16)]


def test_html_report_shows_query_and_training_texts(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    _, store = fitted
    task = lm.build_task(TINY)
    data = lm.corpus(TINY)
    attributor = sp.Attributor(store, lm.build_model(0, TINY), task)
    result, scores = attributor.top_k(data.queries, 3), attributor.scores(data.queries)
    offsets = {rows.stage: rows.offset for rows in result.rows}
    for r in result.records():  # score = −Δloss: a sequence that lowered the query's loss (helped) scores < 0
        assert r["kind"] == ("helpful" if scores[r["query"], offsets[r["stage"]] + r["index"]] < 0 else "harmful"), r
    first = ShadedText(["alpha", "beta<"], [0.0, 2.0])
    path = text_report(result, [first, data.queries.text(1), "q2", "q3"], lambda s, i: data.train[s].text(i),
                       tmp_path / "report.html", shading="next-token loss")  # fmt: skip
    page = path.read_text()
    stage, index = result.locate(int(result.helpful_ids[1, 0]))
    assert html.escape(data.train[stage].text(index)).split("&")[0][:20] in page
    assert "beta&lt;" in page and "rgba(220, 80, 40, 0.75)" in page  # escaped; the largest value is darkest
    assert html.escape(task.score_labels[1]) in page and "<mark>" in page  # the task's words, from the result
    with pytest.raises(sp.TaskError, match="give one each"):
        text_report(result, ["only one"], lambda s, i: "", tmp_path / "bad.html")


def test_cli_query_prints_texts_and_writes_the_html_report(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    _, store = fitted
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["query", str(store), "--queries", "0:2", "--top-k", "2", "--html", str(out)])
    assert result.exit_code == 0, result.output
    data = lm.corpus(TINY)
    assert f"query 0: {data.queries.text(0)[:60]}" in result.output
    assert "raised the query's loss" in result.output and "lowered the query's loss" in result.output
    shown = [line for line in result.output.splitlines() if "pretrain[" in line or "finetune[" in line]
    assert len(shown) == 8  # 2 queries × (2 + 2)
    stage, index = re.search(r"(pretrain|finetune)\[(\d+)\]", shown[0]).groups()
    assert " ".join(data.train[stage].text(int(index)).split())[:40] in shown[0]
    assert out.exists() and html.escape(data.queries.text(1))[:30] in out.read_text()


def test_the_example_trains_with_the_models_own_loss_at_the_tasks_scale() -> None:
    data = lm.corpus(TINY).train["finetune"]
    model = lm.build_model(0, TINY)
    task = lm.build_task(TINY)
    batch = {"input_ids": data.input_ids[:5], "attention_mask": data.attention_mask[:5]}
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        assert torch.allclose(task.loss(task.forward(model, batch), batch).mean(), own, rtol=1e-5)
    assert mean_predicted_tokens(data) == TINY.length - 1


def test_a_padded_bert_classifier_trained_by_the_hf_trainer_is_attributed(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder

    def bert() -> torch.nn.Module:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=8, num_labels=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip
        return BertForSequenceClassification(config)

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (24,), generator=g).tolist()
    sequences = [torch.randint(1, 30, (n,), generator=g).tolist() for n in lengths]
    labels = [int(s[0] > 15) for s in sequences]
    data = sp.TextDataset(sequences, labels=labels, length=8)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-3, warmup_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", seed=0)  # fmt: skip
    Trainer(model=bert(), args=args, train_dataset=data, callbacks=[HuggingFaceRecorder(tmp_path / "run", save_every=2)]
            ).train()  # fmt: skip
    task = sp.SequenceClassificationTask()
    store = sp.featurize(tmp_path / "run", bert(), task, data, tmp_path / "s.sp",
                         projection=sp.ProjectionArguments(dim=32),
                         options=sp.FeaturizeArguments(batch_size=8, chunk_rows=8), progress=False)  # fmt: skip
    sp.fit(store, progress=False)
    names = [name for name, _ in store.meta["params"]]  # the block's linear layers and the head, no embeddings
    assert [n for n in names if ".encoder.layer.0." not in n] == [
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"
    ]
    queries = sp.TextDataset(sequences[:3], labels=labels[:3], length=8)
    scores = sp.Attributor(store, bert(), task).scores(queries)
    assert scores.shape == (3, 24) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # The old default (blocks only) is refused with the argument that opens this store.
    with pytest.raises(sp.TaskError, match=r"build the task with the store's selection "
                                           r"\(parameters=sp\.ModuleSelection\(blocks_only=False\)\)\.$"):
        sp.Attributor(store, bert(), sp.SequenceClassificationTask(parameters=sp.ModuleSelection()))
    # So is featurize into it (a resume, or a grown store) and a baseline that runs the model.
    old = sp.SequenceClassificationTask(parameters=sp.ModuleSelection())
    with pytest.raises(sp.StoreError, match=r"another parameter selection: .*\(parameters=sp\.ModuleSelection\("
                                            r"blocks_only=False\)\), pass --force"):
        sp.featurize(tmp_path / "run", bert(), old, data, tmp_path / "s.sp", projection=sp.ProjectionArguments(dim=32),
                     options=sp.FeaturizeArguments(batch_size=8, chunk_rows=8), progress=False)  # fmt: skip
    with pytest.raises(sp.TaskError, match=r"^The task selects the parameters .*blocks_only=False\)\)\.$"):
        sp.fit_baseline(store, sp.BaselineArguments(kind="repsim"), model=bert(), task=old, train_data=data)


def test_per_token_scores_of_a_sequence_sum_to_its_score(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    """The shares of every position, recomputed at every checkpoint of the SOURCE recipe (two AdamW stages:
    preconditioned gradients, folded operators), add up to the score read from the cached features."""
    _, store = fitted
    data = lm.corpus(TINY)
    attributor = sp.Attributor(store, lm.build_model(0, TINY), lm.build_task(TINY))
    queries = torch.utils.data.Subset(data.queries, [0, 1])
    top = attributor.top_k(queries, 2)
    rows = sorted({int(r) for r in np.concatenate([top.helpful_ids.ravel(), top.harmful_ids.ravel()])})
    result = sp.token_scores(attributor, queries, data.train, rows, batch_size=3)
    assert result.tokens.shape == (2, len(rows), TINY.length)
    expected = attributor.scores(queries)[:, rows]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-9)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result.tokens.sum(-1) + result.unplaced, expected, rtol=0, atol=2e-4 * scale)
    assert np.abs(result.unplaced).max() == 0.0  # every attributed layer's output is per position
    assert (np.abs(result.tokens).max(axis=-1) > 1e-3 * scale).all()  # not one position carrying everything

    assert result.score_labels == lm.build_task(TINY).score_labels  # the report's words, as the result's
    page = token_report(result, [data.queries.text(0), data.queries.text(1)],
                        lambda t: data.tokenizer.decode([t])[0], tmp_path / "tokens.html").read_text()  # fmt: skip
    assert page.count("<tr>") == 2 * len(rows) and "rgba(220, 80, 40" in page and "rgba(40, 110, 220" in page


def test_per_token_scores_batch_each_stages_sequences_by_that_stages_own_collate(fitted: tuple[Path, Path]) -> None:
    """The fine-tuning stage given as raw token lists that only its own collate makes into batches, the
    pre-training stage as ``TextDataset``: rows of both stages, interleaved, score as when both are
    ``TextDataset``s (each stage batched by its own collate, not the first row's)."""
    _, store = fitted
    data = lm.corpus(TINY)
    attributor = sp.Attributor(store, lm.build_model(0, TINY), lm.build_task(TINY))
    queries = torch.utils.data.Subset(data.queries, [0, 1])
    rows = [30, 0, 35, 5, 24]  # fine-tuning rows start at 24
    reference = sp.token_scores(attributor, queries, data.train, rows, batch_size=2, progress=False)

    def tokenize(lists: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(lists)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    finetune = data.train["finetune"]
    raw = sp.CollatedDataset([finetune[i]["input_ids"].tolist() for i in range(len(finetune))], tokenize)
    mixed = sp.token_scores(attributor, queries, {"pretrain": data.train["pretrain"], "finetune": raw}, rows,
                            batch_size=2, progress=False)  # fmt: skip
    assert mixed.where == reference.where and [s for s, _ in mixed.where] == ["finetune", "pretrain"] * 2 + ["finetune"]
    np.testing.assert_array_equal(mixed.input_ids, reference.input_ids)
    np.testing.assert_array_equal(mixed.attention_mask, reference.attention_mask)
    np.testing.assert_allclose(mixed.tokens, reference.tokens, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mixed.unplaced, reference.unplaced, rtol=1e-6, atol=1e-9)
    with pytest.raises(sp.TaskError, match=r"^Give token_scores at least one row"):
        sp.token_scores(attributor, queries, data.train, [], progress=False)
    # The same sequences in another order: row 30's shares were those of another sequence, silently.
    shuffled = sp.CollatedDataset([raw.dataset[i] for i in reversed(range(len(raw.dataset)))], tokenize)
    with pytest.raises(sp.TaskError, match=r"^The per-token shares of training row 30 \(stage 'finetune', example 6\) "
                                           r"sum to .* so train_data are not the examples the store was featurized"):
        sp.token_scores(attributor, queries, {"pretrain": data.train["pretrain"], "finetune": shuffled}, [30],
                        progress=False)  # fmt: skip


def test_per_token_scores_of_a_method_without_a_recipe_name_the_methods_that_have_one(
    fitted: tuple[Path, Path], tmp_path: Path
) -> None:
    """TRAK's scores go through its kernel, which no training recipe splits by token: the refusal names the methods
    that split, and tells to re-fit only a store whose SOURCE lacks its recipe (fitted by an earlier version)."""
    _, store = fitted
    copy = tmp_path / "model.sp"
    shutil.copytree(store, copy)
    sp.fit_baseline(copy, sp.BaselineArguments(kind="trak"), progress=False)
    data = lm.corpus(TINY)
    trak = sp.Attributor(copy, lm.build_model(0, TINY), lm.build_task(TINY), method="trak")
    with pytest.raises(sp.TaskError, match=r"^Method 'trak' records no training recipe, .* or tracin\.$"):
        sp.token_scores(trak, [data.queries[0]], data.train, [0])
    meta = sp.Store.open(copy, writable=True)
    methods = dict(meta.meta["methods"])
    methods["source"] = {key: value for key, value in methods["source"].items() if key != "train"}
    meta.update_meta(methods=methods)
    source = sp.Attributor(copy, lm.build_model(0, TINY), lm.build_task(TINY))
    with pytest.raises(sp.TaskError, match=r"^Method 'source' \(fitted by an earlier version: re-fit it with --force"):
        sp.token_scores(source, [data.queries[0]], data.train, [0])


def test_single_token_queries_split_the_summed_query_loss(fitted: tuple[Path, Path]) -> None:
    """A query's summed loss is the sum of its tokens' losses: the single-token queries' features, and the
    per-token scores of a training sequence for them, add up to those of the whole query."""
    _, store = fitted
    data = lm.corpus(TINY)
    attributor = sp.Attributor(store, lm.build_model(0, TINY), lm.build_task(TINY))
    query = {**data.queries[0], "labels": data.queries[0]["input_ids"]}  # every token predicted, as by default
    singles = [sp.single_token_query(query, j) for j in range(1, TINY.length)]
    whole = attributor.query_features([query])
    split = attributor.query_features(singles)
    np.testing.assert_allclose(split.sum(0), whole[0], rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
    both = sp.token_scores(attributor, [query, *singles[:3]], data.train, [0, 30])
    parts = sp.token_scores(attributor, singles, data.train, [0, 30])
    np.testing.assert_allclose(parts.tokens.sum(0), both.tokens[0], rtol=0, atol=1e-3 * np.abs(both.tokens[0]).max())
    np.testing.assert_allclose(both.tokens[1:], parts.tokens[:3], rtol=1e-6, atol=1e-9)
    with pytest.raises(sp.TaskError, match="Token 0 is not predicted"):
        sp.single_token_query(query, 0)


def test_a_single_token_query_refuses_a_padded_position() -> None:
    """A position in a sequence's padding (or its first token) is never predicted: its query measured nothing (scores
    of 0) without a word. It is refused naming the sequence's own length; the last real token is taken."""
    padded = sp.TextDataset([[5, 6, 7, 8]], length=6)[0]  # 4 tokens, 2 of padding
    last = sp.single_token_query(padded, 3)
    assert last["labels"].tolist() == [-100, -100, -100, 8, -100, -100]
    for position in (4, 5):
        with pytest.raises(sp.TaskError, match=rf"^Token {position} is not predicted in this sequence of 4 tokens; "
                                                r"use 1 ≤ position < 4\.$"):
            sp.single_token_query(padded, position)
    whole = {"input_ids": torch.tensor([5, 6, 7, 8, 9, 10])}  # no mask: every token is the sequence's
    assert sp.single_token_query(whole, 5)["labels"].tolist() == [-100] * 5 + [10]
    assert sp.single_token_query(padded, torch.tensor(3))["labels"].tolist() == last["labels"].tolist()
    for position in (True, 2.0, torch.tensor(2.0)):  # True predicted every token, padding too, without a word
        with pytest.raises(sp.TaskError, match=r"^The token position must be a whole number, not "):
            sp.single_token_query(padded, position)  # type: ignore[arg-type]
    # Left padding (tokenizer.padding_side = "left"): the tokens lie at 2 … 5, the first of them predicts nothing.
    left = {"input_ids": torch.tensor([0, 0, 5, 6, 7, 8]), "attention_mask": torch.tensor([0, 0, 1, 1, 1, 1])}
    assert sp.single_token_query(left, 5)["labels"].tolist() == [-100] * 5 + [8]
    for position in (1, 2):
        with pytest.raises(sp.TaskError, match=rf"^Token {position} is not predicted in this sequence of 4 tokens; "
                                                r"use 3 ≤ position < 6\.$"):
            sp.single_token_query(left, position)


def _tutorial_lines(text: str) -> list[tuple[str, float, int]]:
    """``(kind, score, row)`` of every ``  helpful +0.0384  #52 '…'`` line of the Trainer tutorial's output."""
    found = re.findall(r"^  (helpful|harmful) ([+-]\d\.\d{4})  #(\d+) ", text, re.MULTILINE)
    return [(kind, float(score), int(row)) for kind, score, row in found]


@pytest.mark.slow
def test_the_trainer_tutorial_runs_as_written_and_prints_what_it_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/tutorials/huggingface.md's script, pasted as it is, prints the lists its "What it prints" shows: the same
    rows in each query's lists (in any order among equal scores: two training sentences repeat) and the same scores
    to the printed precision, give or take one in its last digit. It runs in this process, in a namespace of its own
    and in an empty directory, on one thread as the tests do: a fresh interpreter spent most of the test importing
    torch and transformers again. The random states its seeds set are restored after it."""
    pytest.importorskip("transformers")
    page = (Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "huggingface.md").read_text()
    (script,) = re.findall(r"^```python\n(.*?)^```", page, re.MULTILINE | re.DOTALL)
    shown = _tutorial_lines(page[page.index("## What it prints") :])
    monkeypatch.chdir(tmp_path)
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            exec(compile(script, "docs/tutorials/huggingface.md", "exec"), {"__name__": "__main__"})
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    out = capsys.readouterr().out
    printed = _tutorial_lines(out)[: len(shown)]
    assert len(shown) == 12 and len(printed) == 12, out
    for at in range(0, 12, 3):  # one query's helpful or harmful three
        assert {r for *_, r in shown[at : at + 3]} == {r for *_, r in printed[at : at + 3]}, out
    assert [(k, s) for k, s, _ in shown] == [(k, pytest.approx(s, abs=1.5e-4)) for k, s, _ in printed], out
