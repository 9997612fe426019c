"""Automatic segmentation on digits: a run with a step learning-rate drop, and where the cuts go.

    python examples/digits/auto_segments.py [--out runs/digits-auto] [--segments 4]

Trains the digits MLP with SGD (momentum 0.9) for 20 epochs, dividing the learning rate by 10
after epoch 10, with 24 checkpoints; featurizes them, fits SOURCE with ``auto:L`` segments, prints
the trajectory table and writes ``OUT/trajectory.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits

import source_proj as sp
from source_proj.query.attributor import method_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits-auto")
    parser.add_argument("--segments", type=int, default=4, help="L, the budget of automatic segments")
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    out = Path(args.out)
    train_set, _ = digits.load_split()
    x, y = train_set.tensors
    model = digits.build_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-3)
    steps_per_epoch, epochs = -(-len(y) // 64), 20
    rec = sp.TrajectoryRecorder(out / "run", model, opt, save_every=steps_per_epoch * epochs // 24, overwrite=True)
    rec.begin_stage("main", dataset_size=len(y))
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        if epoch == epochs // 2:
            opt.param_groups[0]["lr"] = 0.003
        order = torch.randperm(len(y), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * 64 : (b + 1) * 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.step()
    rec.close()
    store = sp.featurize(
        out / "run",
        digits.build_model(0),
        digits.build_task(),
        train_set,
        out / "store.sp",
        projection=sp.ProjectionArguments(dim=args.dim),
        overwrite=True,
    )
    sp.fit(store, sp.FitArguments(auto_segments=args.segments), overwrite=True)
    view = sp.TrajectoryView.from_description(method_meta(store, "source")["view"])
    print(view.table())
    print(f"learning rate drops at step {steps_per_epoch * epochs // 2}; picture: {view.plot(out / 'trajectory.png')}")


if __name__ == "__main__":
    main()
