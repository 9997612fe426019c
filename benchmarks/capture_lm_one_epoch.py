"""In-run SOURCE against post-hoc SOURCE on a one-epoch language-model fine-tune, with and without the end pass.

    python benchmarks/capture_lm_one_epoch.py [--sequences 8192] [--dim 512] [--subsets 50] [--repeats 3]
        [--threads 1] [--workers 1] [--out runs/capture-lm-one-epoch]

The setting (fixed before any result): a tiny GPT-2 (2 layers × 64, 4 heads, word-level vocabulary of 2,048 from
the standard library's sources, 32 tokens a sequence) is pre-trained from scratch for 3 epochs on 2,048 sequences
(AdamW, lr 3e-3), then fine-tuned for **one epoch** on the next ``--sequences`` sequences (AdamW, lr 1e-3, batches
of 16, a linear warm-up over a tenth of the steps and a linear decay; 512 steps at 8,192 sequences), with the
recorder saving 6 checkpoints of the fine-tune. The 40 sequences after them are the queries; the measurement is
each query's summed next-token loss. The ground truth fine-tunes the pre-trained model again on random halves
(α = 0.5, ``--subsets`` × ``--repeats``, fresh shuffles a repeat): the fine-tune is what is attributed.

Stores (k = ``--dim``, the blocks' Conv1D layers, SOURCE with the library's default segments): post-hoc eigen
(``featurize`` of the recorded fine-tune, the library's defaults), and in-run eigen captured during the same
fine-tune at the defaults (``CaptureArguments()``: the end pass on every stage whose data are given) and with
``end_pass=False``. Capture leaves training unchanged, so each captured run must save the recorded run's
checkpoints bit for bit (checked). Prints LDS [95 % CI] and each in-run store's per-query difference to post-hoc
(95 % bootstrap interval over queries), and the seconds of the fine-tune alone and captured; writes
OUT/results.json.

Why: in-run capture takes each example's gradient at the one step that visits it in a one-epoch run. On MNIST's
one-epoch run over 60,000 images (938 steps) that cost 0.081 LDS without the end pass (BENCHMARKS.md); no
language-model run had been measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_lds import paired
from transformer_cpu import stdlib_tokens

import source_proj as sp
from source_proj import evaluation as ev

LENGTH, VOCAB, PRETRAIN, QUERIES, BATCH = 32, 2048, 2048, 40, 16
STAGE = "finetune"


@dataclass(frozen=True)
class Setting:
    sequences: int = 8192

    def tokens(self) -> torch.Tensor:
        total = PRETRAIN + self.sequences + QUERIES
        return torch.from_numpy(stdlib_tokens(total * LENGTH, VOCAB)).reshape(total, LENGTH)

    def data(self) -> dict[str, sp.TextDataset]:
        ids = self.tokens()
        parts = {"pretrain": ids[:PRETRAIN], STAGE: ids[PRETRAIN : PRETRAIN + self.sequences],
                 "queries": ids[PRETRAIN + self.sequences :]}  # fmt: skip
        return {name: sp.TextDataset(part.tolist(), length=LENGTH) for name, part in parts.items()}


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")  # fmt: skip
    return GPT2LMHeadModel(config)


def task() -> sp.LanguageModelingTask:
    """The blocks' Conv1D layers (norms and the tied embedding left out: capture projects factorable layers)."""
    selection = sp.ParameterSelection(skip_norm=True, skip_embedding=True)
    return sp.LanguageModelingTask(tokens_per_sequence=LENGTH - 1, parameters=selection)


def _epochs(
    model: torch.nn.Module,
    data: sp.TextDataset,
    epochs: int,
    lr: float,
    gen: torch.Generator,
    *,
    kept: torch.Tensor | None = None,
    recorder: sp.TrajectoryRecorder | None = None,
    captured: sp.GradientCapture | None = None,
) -> None:
    """AdamW with a linear warm-up (a tenth of the steps) and decay; the same shuffle with dropped examples
    left out of every batch for a retrain (``kept``)."""
    ids, mask = data.input_ids, data.attention_mask
    per_epoch = math.ceil(len(ids) / BATCH)
    steps, warmup = per_epoch * epochs, max(1, per_epoch * epochs // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warmup if t < warmup else max(0.0, (steps - t) / (steps - warmup))
    )
    if recorder is not None:
        recorder.begin_stage(STAGE, dataset_size=len(ids), optimizer=opt)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=gen)
        for b in range(per_epoch):
            idx = order[b * BATCH : (b + 1) * BATCH]
            if kept is not None:
                idx = idx[kept[idx]]
            if len(idx) > 0:
                batch = {"input_ids": ids[idx], "attention_mask": mask[idx]}
                with captured.batch(batch, indices=idx) if captured else contextlib.nullcontext():
                    loss = model(**batch, labels=batch["input_ids"]).loss
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                if recorder is not None:
                    recorder.step()
            schedule.step()
    model.eval()


def pretrained(setting: Setting, out: Path) -> torch.nn.Module:
    """The pre-trained model (trained once, cached in OUT)."""
    path = out / "pretrained.pt"
    model = build_model(0)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    _epochs(model, setting.data()["pretrain"], 3, 3e-3, torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def finetune(setting: Setting, out: Path, run: Path | None, store: Path | None = None,
             options: sp.CaptureArguments | None = None, dim: int = 512) -> float:  # fmt: skip
    """The recorded fine-tune (captured into ``store`` when given); returns its seconds."""
    model, data = pretrained(setting, out), setting.data()
    per_epoch = math.ceil(setting.sequences / BATCH)
    recorder = None if run is None else sp.TrajectoryRecorder(run, model, torch.optim.AdamW(model.parameters()),
                                                              save_every=per_epoch // 5, overwrite=True)  # fmt: skip
    captured = None
    if store is not None and recorder is not None:
        captured = sp.GradientCapture(recorder, store, task(), projection=sp.ProjectionArguments(dim=dim),
                                      options=options or sp.CaptureArguments(), overwrite=True,
                                      datasets={STAGE: data[STAGE]}, progress=False)  # fmt: skip
    start = time.perf_counter()
    _epochs(model, data[STAGE], 1, 1e-3, torch.Generator().manual_seed(1), recorder=recorder, captured=captured)
    if recorder is not None:
        recorder.close()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Retrain:
    """``retrain(keep, seed)``: the pre-trained model fine-tuned one epoch on the kept examples, the query losses."""

    sequences: int
    out: str

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        setting = Setting(self.sequences)
        model, data = pretrained(setting, Path(self.out)), setting.data()
        kept = torch.zeros(self.sequences, dtype=torch.bool)
        kept[torch.as_tensor(keep[STAGE], dtype=torch.long)] = True
        _epochs(model, data[STAGE], 1, 1e-3, torch.Generator().manual_seed(seed), kept=kept)
        queries = data["queries"]
        batch = {"input_ids": queries.input_ids, "attention_mask": queries.attention_mask}
        with torch.no_grad():
            return task().measurement(task().forward(model, batch), batch).numpy()


def same_run(a: Path, b: Path) -> bool:
    ours, theirs = sp.Trajectory.load(a).checkpoints, sp.Trajectory.load(b).checkpoints
    return [c.sha256 for c in ours] == [c.sha256 for c in theirs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/capture-lm-one-epoch"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting, out = Setting(args.sequences), args.out
    reference = out / "run"
    seconds = {"fine-tune alone": finetune(setting, out, reference)}
    stores: dict[str, Path] = {}
    for name, options in {"in-run (eigen), defaults (end pass)": sp.CaptureArguments(),
                          "in-run (eigen), end_pass=False": sp.CaptureArguments(end_pass=False)}.items():  # fmt: skip
        run, stores[name] = out / f"run-{len(stores)}", out / f"in-run-{len(stores)}.sp"
        seconds[name] = finetune(setting, out, run, stores[name], options, args.dim)
        if not same_run(run, reference):
            raise SystemExit(f"The captured run {run} differs from the recorded run {reference}.")
    stores["post-hoc (eigen)"] = out / "post-hoc.sp"
    start = time.perf_counter()
    sp.featurize(reference, build_model(), task(), {STAGE: setting.data()[STAGE]}, stores["post-hoc (eigen)"],
                 projection=sp.ProjectionArguments(dim=args.dim), overwrite=True, progress=False)  # fmt: skip
    seconds["post-hoc featurize"] = time.perf_counter() - start
    scores, rows = {}, None
    for name, store in stores.items():
        sp.fit(store, overwrite=True, progress=False)
        attributor = sp.Attributor(store, build_model(), task())
        scores[name], rows = attributor.scores(setting.data()["queries"]), attributor.rows
    assert rows is not None
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = ev.lds_ground_truth(Retrain(args.sequences, str(out)), rows, out / "retrains", lds_args)
    results = {name: ev.lds(s, truth, lds_args) for name, s in scores.items()}
    post = results["post-hoc (eigen)"]
    lines = [f"one-epoch fine-tune of {args.sequences} sequences, k = {args.dim}, M = {args.subsets}, "
             f"R = {args.repeats}, {QUERIES} queries", "",
             "| store | LDS [95 % CI] | − post-hoc, per query [95 % CI] |", "|---|---|---|"]  # fmt: skip
    record: dict[str, object] = {"seconds": seconds, "lds": {}}
    for name, result in results.items():
        diff = "" if result is post else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired(result, post))
        lines.append(f"| {name} | {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}] | {diff} |")
        record["lds"][name] = {"lds": result.mean, "low": result.low, "high": result.high,  # type: ignore[index]
                               "per_query": result.per_query.tolist()}  # fmt: skip
    lines += ["", ", ".join(f"{name}: {s:.1f} s" for name, s in seconds.items())]
    print("\n".join(lines), flush=True)
    (out / "results.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
