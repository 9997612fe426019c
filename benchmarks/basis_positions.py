"""The eigen basis from sampled positions (``ProjectionArguments.basis_positions``): what it saves in the basis
pass of a GPT-2, and what it costs in LDS on the text example.

    python benchmarks/basis_positions.py pass [--lengths 128,512] [--positions all,64,32,16] [--sequences 64]
        [--threads 1]
    python benchmarks/basis_positions.py lds [--positions all,16,8,4] [--reference runs/adam-rank]
        [--out runs/basis-positions] [--threads 1]

``pass``: the GPT-2 configuration of ``transformer_cpu.py`` (4 layers × 256 wide, a 4,096-word vocabulary, its
16 attention and MLP ``Conv1D`` weights), at random initialisation (the pass costs the same at any weights), on
``--sequences`` blocks of the standard library's tokens per length. For each setting, one basis pass
(``BasisPass.visit``: the sampled-label forward and backward, and the factor products) is timed after a
warm-up pass over 8 sequences, then the eigendecompositions apart; beside them one training step's forward and
backward over the same sequences, the floor. Wall seconds, batches of 8.

``lds``: the text example (``examples/text/lm.py``, two AdamW stages, sequences of 32 tokens) featurized
after training with the eigen projection at k = 512 and each ``--positions`` setting, SOURCE fitted on the
fine-tuning stage, scored by LDS against the cached ``finetune`` ground truth of ``adam_rank_lds.py``
(REFERENCE/finetune/retrains, 50 × 4, α = 0.5; computed if missing), with each setting's LDS minus that of
every position, paired per query. The parameters are the blocks' Conv1D layers, as in
``capture_text_lds.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _positions(value: str) -> int | None:
    return None if value == "all" else int(value)


def time_pass(lengths: list[int], settings: list[str], sequences: int) -> list[str]:
    import transformer_cpu as tc

    from source_proj.featurize.basis import BasisPass
    from source_proj.tasks.gradients import PerExampleGradients

    lines = ["| sequence length | positions per sequence | basis pass s | eigendecompositions s | training step s |",
             "|---|---|---|---|---|"]  # fmt: skip
    for length in lengths:
        config = tc.CONFIG | {"length": length}
        tc.CONFIG.update(config)
        model, task = tc.build_model(config).eval(), tc.build_task()
        names = task.select_parameters(model)
        ids = torch.from_numpy(tc.stdlib_tokens(sequences * length, config["vocab"])).reshape(sequences, -1)
        data = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in ids]
        grads_fn = PerExampleGradients(model, task, names)
        rows = []
        for setting in settings:
            basis_pass = BasisPass(grads_fn, task, {"main": data}, names, 1024, examples=sequences, seed=0,
                                   batch_size=8, device=torch.device("cpu"), positions=_positions(setting))  # fmt: skip
            basis_pass.visit("main", "warm-up", basis_pass.quiet(), None, 8)
            start = time.perf_counter()
            basis_pass.visit("main", "timed", basis_pass.quiet())
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            basis_pass.basis([0], "")
            rows.append((setting, seconds, time.perf_counter() - start))
        model.train()
        start = time.perf_counter()
        for i in range(0, sequences, 8):
            model.zero_grad()
            model(input_ids=ids[i : i + 8], labels=ids[i : i + 8]).loss.backward()
        step = time.perf_counter() - start
        for setting, seconds, eigh in rows:
            lines.append(f"| {length} | {setting} | {seconds:.2f} | {eigh:.2f} | {step:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def lds(settings: list[str], reference: Path, out: Path, threads: int) -> list[str]:
    import lm
    from capture_lds import paired
    from capture_text_lds import METHOD, task

    import source_proj as sp
    from source_proj import evaluation as ev

    if not (reference / "run" / "trajectory.json").exists():
        lm.train(seed=0, run_dir=reference / "run")
    scores, seconds, rows = {}, {}, None
    for setting in settings:
        store = out / f"eigen-{setting}.sp"
        start = time.perf_counter()
        sp.featurize(reference / "run", lm.build_model(), task(), lm.corpus().train, store, overwrite=True,
                     projection=sp.ProjectionArguments(dim=512, kind="eigen", basis_positions=_positions(setting)),
                     options=sp.FeaturizeArguments(batch_size=32, chunk_rows=128), progress=False)  # fmt: skip
        seconds[setting] = time.perf_counter() - start
        sp.fit(store, sp.FitArguments(stages=("finetune",), method=METHOD), overwrite=True, progress=False)
        attributor = sp.Attributor(store, lm.build_model(), task(), method=METHOD)
        scores[setting], rows = attributor.scores(lm.query_data()), attributor.rows
    assert rows is not None
    args = ev.LDSArguments(alpha=0.5, num_subsets=50, repeats=4, workers=1)
    truth = ev.lds_ground_truth(lm.Retrain(str(reference / "run"), fixed_init=False), rows,
                                reference / "finetune" / "retrains", args)  # fmt: skip
    results = {setting: ev.lds(s, truth, args) for setting, s in scores.items()}
    base = results[settings[0]]
    lines = [f"| positions per sequence (of 32) | LDS [95 % CI] | − {settings[0]}, per query [95 % CI] | featurize s |",
             "|---|---|---|---|"]  # fmt: skip
    for setting, result in results.items():
        diff = "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired(result, base))
        lines.append(f"| {setting} | {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}] | {diff} | "
                     f"{seconds[setting]:.1f} |")  # fmt: skip
    record = {s: {"lds": r.mean, "low": r.low, "high": r.high, "seconds": seconds[s]} for s, r in results.items()}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("pass", "lds"))
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--positions", default=None, help="comma-separated; 'all' for every position")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--reference", type=Path, default=Path("runs/adam-rank"))
    parser.add_argument("--out", type=Path, default=Path("runs/basis-positions"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "pass":
        settings = (args.positions or "all,64,32,16").split(",")
        lines = time_pass([int(n) for n in args.lengths.split(",")], settings, args.sequences)
    else:
        settings = (args.positions or "all,16,8,4").split(",")
        lines = lds(settings, args.reference, args.out, args.threads)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
