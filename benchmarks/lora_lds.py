"""How well SOURCE and the baselines attribute a LoRA fine-tune, through its adapters.

The text example's tiny GPT-2 (``examples/text/lm.py``: word tokens of Python docstrings, then of scikit-learn's
dataset descriptions) pre-trained on the docstrings as there (not recorded), then fine-tuned on the 240
description blocks with LoRA adapters (peft, rank ``--rank`` on ``c_attn`` and ``c_fc``, α = 2·rank, the base
frozen), AdamW at ``--lr`` with the example's warm-up and linear decay, batches of 16, ``--epochs`` epochs, recorded
with the recorder's default for a peft model (the adapters only). Queries: the 40 held-out descriptions, measured
by their summed token loss (so the sequences that taught the model a query have the most negative scores).
Ground truth: ``--subsets`` random halves × ``--repeats`` LoRA fine-tunes of the same pre-trained base with the
same recipe. Methods fitted in one store at k = ``--dim`` (eigen projection): SOURCE (one segment), TRAK, TracIn-CP
and grad-dot, all through the adapters' weights.

    python benchmarks/lora_lds.py --out runs/lora-lds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "text"))
import lm  # noqa: E402

import source_proj as sp  # noqa: E402
from source_proj.evaluation.lds import LDSArguments  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from methods_lds import compare_methods, parse_args, train_kept  # noqa: E402


class LoRAFineTune:
    """The LoRA fine-tune of the pre-trained base (``base`` a state dict), recorded or not (picklable)."""

    def __init__(self, base: dict[str, torch.Tensor], rank: int, lr: float, epochs: int) -> None:
        self.base, self.rank, self.lr, self.epochs = base, rank, lr, epochs

    def model(self) -> torch.nn.Module:
        import peft

        model = lm.build_model()
        model.load_state_dict(self.base)
        torch.manual_seed(1)  # the adapters' initialisation, the same every time
        config = peft.LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=["c_attn", "c_fc"],
                                 lora_dropout=0.0, fan_in_fan_out=True)  # fmt: skip
        return peft.get_peft_model(model, config)

    def train(self, seed: int, keep: np.ndarray | None = None, run: Path | None = None) -> torch.nn.Module:
        model = self.model()
        data = lm.corpus().train["finetune"]
        ids, mask = data.input_ids, data.attention_mask
        batch_size = lm.CONFIG.batch_size
        per_epoch = math.ceil(len(ids) / batch_size)
        steps, warmup = per_epoch * self.epochs, max(1, round(lm.CONFIG.warmup * per_epoch * self.epochs))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: (t + 1) / warmup if t < warmup else max(0.0, (steps - t) / (steps - warmup))
        )
        rec = None
        if run is not None:
            rec = sp.TrajectoryRecorder(run, model, opt, save_every=max(1, steps // 6), overwrite=True)
            rec.begin_stage("finetune", dataset_size=len(ids))
        model.train()
        train_kept(lambda rows: model(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows]).loss, opt,
                   len(ids), batch_size, self.epochs, seed, keep, rec, schedule.step)  # fmt: skip
        return model.eval()

    def __call__(self, keep: dict[str, np.ndarray], seed: int) -> np.ndarray:
        model = self.train(seed, keep["finetune"])
        queries = lm.corpus().queries
        batch = {"input_ids": queries.input_ids, "attention_mask": queries.attention_mask}
        task = lm.build_task().bind(model)
        with torch.no_grad():
            return task.measurement(task.forward(model, batch), batch).numpy().astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/lora-lds"))
    args = parse_args(parser)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    base_file = args.out / "base.pt"
    if not base_file.is_file():  # the example's pre-training stage alone
        base = lm.train(dataclasses.replace(lm.CONFIG, finetune_epochs=0))
        torch.save(base.state_dict(), base_file)
    fine_tune = LoRAFineTune(torch.load(base_file), args.rank, args.lr, args.epochs)
    run = args.out / "run"
    if not (run / "trajectory.json").is_file() or not json.loads((run / "trajectory.json").read_text())["complete"]:
        fine_tune.train(0, run=run)
    size = sum(f.stat().st_size for f in (run / "checkpoints").glob("*.pt"))
    store_path = args.out / "run.sp"
    task = lm.build_task()
    started = time.perf_counter()
    if not store_path.is_dir() or not sp.Store.open(store_path).meta.get("featurized"):  # new, or resumed
        sp.featurize(run, fine_tune.model(), task, {"finetune": lm.corpus().train["finetune"]}, store_path,
                     projection=sp.ProjectionArguments(dim=args.dim), progress=False)  # fmt: skip
    featurizing = time.perf_counter() - started
    trained = sum(p.numel() for p in fine_tune.model().parameters() if p.requires_grad)
    print(f"{trained} adapter weights; checkpoints {size / 2**20:.2f} MiB")
    lds_args = LDSArguments(num_subsets=args.subsets, repeats=args.repeats, workers=args.workers)
    report = compare_methods(store_path, fine_tune.model, task, lm.corpus().queries, fine_tune,
                             args.out / "retrains", lds_args)  # fmt: skip
    report.update(featurize_and_fit_s=featurizing + report["fit_s"], checkpoint_bytes=size,
                  trained_parameters=trained)  # fmt: skip
    print(f"featurize and fits {report['featurize_and_fit_s']:.1f} s")
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
