"""Which parameters to attribute a language model through: the blocks only (the task's default), or the
embeddings and the tied output head as well?

The text example's two-stage GPT-2 (``examples/text/lm.py``: docstrings, then scikit-learn's dataset
descriptions; AdamW, warm-up and decay) recorded once; two stores of it at k = ``--dim`` (eigen projection):
``blocks`` (``LanguageModelingTask``'s default, the blocks' linear layers) and ``all-but-norms``
(``ParameterSelection(skip_norm=True)``: the blocks, the token and position embeddings, and the output head tied
to the token embedding). SOURCE, TracIn-CP, grad-dot and TRAK attribute the fine-tuned model's loss on the 40
held-out descriptions to the fine-tuning sequences; ground truth: ``--subsets`` random halves × ``--repeats``
fine-tunes of the recorded pre-trained model, as ``examples/text/lds.py``'s ``finetune`` setting.

    python benchmarks/lm_selection_lds.py --out runs/lm-selection

``--untied``: the same recipe with an output head of its own (``tie_word_embeddings=False``, as Llama-style models
have), recorded and retrained as such, and a third store, ``blocks+head`` (``ModuleSelection(blocks_only=False)``:
the blocks and the head, without the embeddings).

    python benchmarks/lm_selection_lds.py --untied --out runs/lm-selection-untied
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "text"))
import lm

import source_proj as sp
from source_proj import evaluation as ev

METHODS = ("source", "tracin", "grad-dot", "trak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--untied", action="store_true", help="an output head of its own, not tied to the embedding")
    parser.add_argument("--out", type=Path, default=Path("runs/lm-selection"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = dataclasses.replace(lm.CONFIG, tied=not args.untied)
    run = args.out / "run"
    if not (run / "trajectory.json").exists() or not sp.Trajectory.load(run).complete:
        lm.train(config, seed=0, run_dir=run)
    data, queries = lm.corpus(config).train, lm.corpus(config).queries
    tokens = lm.build_task(config).tokens_per_sequence
    variants = {
        "blocks": lm.build_task(config),
        "all-but-norms": sp.LanguageModelingTask(tokens_per_sequence=tokens,
                                                parameters=sp.ParameterSelection(skip_norm=True)),
    }  # fmt: skip
    if args.untied:
        variants["blocks+head"] = sp.LanguageModelingTask(tokens_per_sequence=tokens,
                                                          parameters=sp.ModuleSelection(blocks_only=False))
    scores, rows = {}, None
    for name, task in variants.items():
        store = args.out / f"{name}.sp"
        if not store.is_dir() or not sp.Store.open(store).meta.get("featurized"):  # new, or resumed
            sp.featurize(run, lm.build_model(0, config), task, data, store,
                         projection=sp.ProjectionArguments(dim=args.dim),
                         options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128), progress=False)  # fmt: skip
        sp.fit(store, sp.FitArguments(stages=("finetune",), method="source-finetune"), progress=False)
        for kind in METHODS[1:]:
            sp.fit_baseline(store, sp.BaselineArguments(kind=kind, stages=("finetune",), method=f"{kind}-finetune"),
                            model=lm.build_model(0, config), task=task, train_data=data, progress=False)  # fmt: skip
        for method in METHODS:
            attributor = sp.Attributor(store, lm.build_model(0, config), task, method=f"{method}-finetune")
            scores[f"{name}/{method}"], rows = attributor.scores(queries), attributor.rows
    lds_args = ev.LDSArguments(alpha=0.5, num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    truth = ev.lds_ground_truth(lm.Retrain(str(run), config, fixed_init=False), rows, args.out / "retrains", lds_args)
    report = {}
    for key, matrix in scores.items():
        result = ev.lds(matrix, truth, lds_args)
        report[key] = {"lds": result.mean, "ci": [result.low, result.high]}
        print(f"{key}: LDS {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}]", flush=True)
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
