"""GPT-2 on the CPU, side by side with bergson: throughput, peak memory and faithfulness of projected gradients.

    python benchmarks/transformer_cpu.py [--sequences 512] [--length 128] [--dim 1024] [--out runs/transformer-cpu]
    python benchmarks/transformer_cpu.py --smoke          # toy sizes (checks that every method runs)
    python benchmarks/transformer_cpu.py --reuse-run --rounds 3   # the methods in turn 3 times: median rounds
    python benchmarks/transformer_cpu.py --reuse-run --precision bf16 --out runs/transformer-cpu-bf16

The workload of issue 13: a GPT-2 configuration (4 layers × 256 wide, 4 heads, a 4,096-word vocabulary)
trained from random initialisation by the Hugging Face Trainer with ``HuggingFaceRecorder`` (AdamW,
warm-up and cosine decay, clipping at norm 1.0) on ``--sequences`` blocks of ``--length`` tokens of the
Python standard library's own sources (nothing downloaded); the attention and MLP ``Conv1D`` layers of
the blocks are attributed (their weights, 3.15M parameters, as bergson attributes them by default).
Then, each in its own process (so that its peak resident memory is its own), on the same final
checkpoint, tokens, batch size and threads:

- ``train-step``: one forward and one backward pass per batch (the parameters' gradients too, in training mode);
- ``floor``: one eval-mode forward and one backward per batch that computes no parameter's gradient (only the
  input embeddings'): about what any method that takes per-example gradients by backpropagation pays (one that
  attributes the blocks only may stop its backward at the first block, a little sooner);
- ``rademacher``, ``factored``, ``factored-per-module``: the projection engine featurize runs per batch
  (``Projector.project_batch``: per-example loss gradients of the final checkpoint projected to
  k = ``--dim``; the store's writes are not timed, nor AdamW's D^{-1/2}, which bergson does not apply
  either); per-module: 16 layers × k/16 coordinates, bergson's layout;
- ``eigen`` (the library's default projection): the same engine with each layer's Kronecker eigenbasis, its
  basis first estimated from one sampled-Fisher pass over the sequences at the final checkpoint (timed
  apart: ``basis_seconds``; featurize takes it once per checkpoint, not per batch), its factors from 64
  random positions of each sequence (``basis_positions``, the default); ``eigen-all-positions``: the same
  with every position in the factors; ``eigen-b<E>`` (e.g. ``eigen-b128``): its basis pass over E sequences;
  the default pass keeps the sequences that give each layer 2,048 positions (``basis_layer_positions``: 33
  sequences here, 64 positions of each), ``eigen-all-examples`` all ``basis_examples`` (the default before it
  existed);
- ``bergson``: bergson's in-memory gradient collector, per-module projection of 16 modules × √(k/16)²
  (8 × 8 = 64 at k = 1,024).

A method named ``<method>@<k>`` (``bergson@4096``) runs at that k instead of ``--dim``, in the same run: a peer
at the k where its projected inner products are as faithful as ours, beside ours at ``--dim``.

``--precision bf16``: the training step and our methods run forward and backward under bfloat16 autocast
(``FeaturizeArguments(precision="bf16")``: the projections' sides in bf16, their sums in fp32); bergson gets the
model in bfloat16 (its ``precision="bf16"``: the parameters' dtype). The exact inner products stay float64.

Rates are per CPU-second of the process (``time.process_time``, both threads): on a shared machine the
wall time measures the other jobs as much as the method; the wall-clock rate is printed beside it.

Faithfulness: on the first ``--pairs-of`` sequences, Spearman correlation over all pairs between the
exact inner products of the per-example loss gradients (materialised, float64) and the inner products
of each method's projected (unscaled) gradients. Results are printed as a Markdown table and saved as
JSON. bergson is optional: ``pip install --no-deps bergson==2.5.1`` and ``pip install datasets jaxtyping
peft natsort simple-parsing petname ml_dtypes`` (its own requirements pull torchvision and torchaudio,
which its gradient collection does not use); without it its row says so.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = 2


def stdlib_tokens(count: int, vocab: int) -> np.ndarray:
    """The first ``count`` word-level tokens of the standard library's sources (sorted files), ids < ``vocab``
    (the ``vocab − 1`` most frequent words and punctuation of those tokens, the rest mapped to 0)."""
    words: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        words += re.findall(r"\w+|[^\w\s]", path.read_text(errors="replace"))
        if len(words) >= count:
            break
    words = words[:count]
    common = [w for w, _ in collections.Counter(words).most_common(vocab - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}
    return np.array([index.get(w, 0) for w in words], dtype=np.int64)


def build_model(config: dict) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(
        vocab_size=config["vocab"], n_positions=config["length"], n_embd=config["width"], n_layer=config["layers"],
        n_head=config["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(gpt2)
    # the Trainer then divides the loss by the predicted labels only, as LanguageModelingTask does (no warning)
    model.loss_type = "ForCausalLM"
    return model


def build_task():
    import source_proj as sp

    # the blocks' Conv1D weights, without biases: bergson's default, so that every method attributes the same θ
    return sp.LanguageModelingTask(tokens_per_sequence=CONFIG["length"] - 1, parameters=sp.ModuleSelection(bias=False))


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def train(out: Path, ids: torch.Tensor, config: dict) -> Path:
    """Train with the HF Trainer and the recorder; returns the run directory."""
    from transformers import Trainer, TrainingArguments

    from source_proj.integrations import HuggingFaceRecorder

    run = out / "run"
    steps = config["train_steps"]
    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=config["batch"], max_steps=steps,
        learning_rate=1e-3, warmup_steps=max(1, steps // 8), lr_scheduler_type="cosine", weight_decay=0.01,
        max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    recorder = HuggingFaceRecorder(run, save_every=max(1, steps // 2), overwrite=True)
    Trainer(model=build_model(config), args=args, train_dataset=_Sequences(ids), callbacks=[recorder]).train()
    return run


def _final_model(run: Path, config: dict) -> torch.nn.Module:
    import source_proj as sp

    trajectory = sp.Trajectory.load(run)
    model = build_model(config)
    trajectory.load_into(model, trajectory.final_checkpoint)
    return model.eval()


def _batches(ids: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])}
        for i in range(0, len(ids), size)
    ]


def worker(method: str, out: Path, config: dict) -> dict:
    """Run one method in this process; returns its timing, memory and (for the faithfulness pairs) inner products."""
    torch.set_num_threads(THREADS)
    ids = torch.from_numpy(np.load(out / "tokens.npy"))
    run = out / "run"
    few = ids[: config["pairs_of"]]
    result: dict = {"method": method}
    if "@" in method:  # <method>@<k>: this method at its own k
        method, _, dim = method.partition("@")
        config = {**config, "dim": int(dim)}
    if method == "exact":
        import source_proj as sp
        from source_proj.tasks.gradients import PerExampleGradients

        model, task = _final_model(run, config), build_task()
        grads_fn = PerExampleGradients(model, task, task.select_parameters(model))
        flat = []
        for batch in _batches(few, 4):
            grads = grads_fn(batch)
            flat.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1).double())
        features = torch.cat(flat)
        result["attributed"] = int(features.shape[1])
        del sp
    elif method == "train-step":
        model = _final_model(run, config).train()
        bf16 = config.get("precision") == "bf16"
        start, cpu = time.perf_counter(), time.process_time()
        for batch in _batches(ids, config["batch"]):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        features = None
    elif method == "floor":
        model = _final_model(run, config).eval().requires_grad_(False)
        embed = model.get_input_embeddings()
        bf16 = config.get("precision") == "bf16"
        start, cpu = time.perf_counter(), time.process_time()
        for batch in _batches(ids, config["batch"]):
            inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                mask, labels = batch["attention_mask"], batch["input_ids"]
                loss = model(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
            torch.autograd.grad(loss, inputs)
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        features = None
    elif method == "bergson":
        features = _bergson(out, ids, few, config, result)
    else:
        features = _source_proj(method, out, ids, few, config, result)
    if features is not None:
        np.save(out / f"gram-{result['method']}.npy", (features.double() @ features.double().T).numpy())
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _projection(method: str, dim: int):
    import source_proj as sp

    if method == "eigen":
        return sp.ProjectionArguments(dim=dim, kind="eigen")
    if method == "eigen-all-positions":
        return sp.ProjectionArguments(dim=dim, kind="eigen", basis_positions=None)
    if method == "eigen-all-examples":
        return sp.ProjectionArguments(dim=dim, kind="eigen", basis_layer_positions=None)
    if method.startswith("eigen-b"):  # eigen-b<E>: the basis pass over E sequences
        return sp.ProjectionArguments(dim=dim, kind="eigen", basis_examples=int(method.removeprefix("eigen-b")),
                                      basis_layer_positions=None)  # fmt: skip
    if method == "rademacher":
        return sp.ProjectionArguments(dim=dim, kind="rademacher")
    if method == "factored":
        return sp.ProjectionArguments(dim=dim, kind="factored")
    return sp.ProjectionArguments(dim=dim, kind="factored", module_dims={"*": dim // (4 * CONFIG["layers"])})


def _source_proj(method: str, out: Path, ids: torch.Tensor, few: torch.Tensor, config: dict, result: dict):
    """Time the projection engine itself (what featurize does per batch, without the store): raw loss gradients."""
    from source_proj.projection.factory import make_projector
    from source_proj.tasks.gradients import PerExampleGradients

    model, task = _final_model(out / "run", config), build_task()
    names = task.select_parameters(model)
    params = dict(model.named_parameters())
    projection = _projection(method, config["dim"])
    grads_fn = PerExampleGradients(model, task, names, precision=config.get("precision", "fp32"))
    basis = None
    if projection.kind == "eigen":  # its basis at the final checkpoint, timed apart: a one-off pass before featurize
        start, cpu = time.perf_counter(), time.process_time()
        basis = _eigen_basis(out / "run", grads_fn, task, ids, names, projection)
        result["basis_seconds"], result["basis_cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        model.eval()
    projector = make_projector(projection.kind, [(n, tuple(params[n].shape)) for n in names], projection.dim, 0,
                               model=model, module_dims=projection.module_dims, basis=basis)  # fmt: skip
    projector.project_batch(grads_fn, _batches(ids[:2], 2)[0])  # the one-time check of the factored path
    start, cpu = time.perf_counter(), time.process_time()
    for batch in _batches(ids, config["batch"]):
        projector.project_batch(grads_fn, batch)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    result["dim"] = projector.dim
    return torch.cat([projector.project_batch(grads_fn, batch) for batch in _batches(few, 8)])


def _eigen_basis(run: Path, grads_fn, task, ids: torch.Tensor, names, projection):
    """The eigen projection's basis from the final checkpoint alone (featurize averages every checkpoint's; the
    cost per checkpoint is the same): one sampled-Fisher pass over at most ``basis_examples`` sequences."""
    import source_proj as sp
    from source_proj.featurize.basis import BasisPass, estimate_basis

    trajectory = sp.Trajectory.load(run)
    data = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in ids]  # as ``_batches`` gives them
    pass_ = BasisPass.of(projection, grads_fn, task, {trajectory.stages[-1].name: data}, names,
                         batch_size=CONFIG["batch"], device=torch.device("cpu"))  # fmt: skip
    return estimate_basis(trajectory, [trajectory.final_checkpoint], pass_)


def _bergson(out: Path, ids: torch.Tensor, few: torch.Tensor, config: dict, result: dict):
    try:
        from bergson import InMemoryCollector
        from bergson.collector.collector import CollectorComputer
        from bergson.config.config import IndexConfig
        from bergson.gradients import GradientProcessor
        from datasets import Dataset
    except ImportError as err:
        result["error"] = f"bergson not importable ({err})"
        return None
    import bergson

    result["version"] = bergson.__version__
    model = _final_model(out / "run", config)
    if config.get("precision") == "bf16":
        model = model.to(torch.bfloat16)
    side = round((config["dim"] // (4 * config["layers"])) ** 0.5)  # a side × side block per module
    modules = {name for name, m in model.base_model.named_modules() if type(m).__name__ == "Conv1D"}

    def collect(tokens: torch.Tensor) -> torch.Tensor:
        data = Dataset.from_dict({"input_ids": tokens.tolist()})
        cfg = IndexConfig(run_path=str(out / "bergson"), projection_dim=side)
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        collector = InMemoryCollector(
            model=model.base_model, data=data, cfg=cfg, target_modules=modules,
            processor=GradientProcessor(projection_dim=side),
        )  # fmt: skip
        size = config["batch"]
        batches = [list(range(i, min(i + size, len(tokens)))) for i in range(0, len(tokens), size)]
        computer = CollectorComputer(model=model, data=data, collector=collector, batches=batches, cfg=cfg)
        computer.run_with_collector_hooks(
            desc="bergson"
        )
        return torch.cat([collector.gradients[name].float() for name in sorted(collector.gradients)], dim=1)

    start, cpu = time.perf_counter(), time.process_time()
    collect(ids)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    features = collect(few)
    result["dim"] = int(features.shape[1])
    return features


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    upper = np.triu_indices(a.shape[0], 1)
    return float(spearmanr(a[upper], b[upper]).statistic)


METHODS = ("train-step", "floor", "rademacher", "factored", "factored-per-module", "eigen", "eigen-all-positions",
           "bergson", "exact")  # fmt: skip
CONFIG = {"vocab": 4096, "length": 128, "width": 256, "layers": 4, "heads": 4, "batch": 16, "train_steps": 32}
SMOKE = {"vocab": 64, "length": 16, "width": 16, "layers": 1, "heads": 2, "batch": 4, "train_steps": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024, help="total projection dimension k (per-module: k/16 each)")
    parser.add_argument("--pairs-of", type=int, default=64, help="sequences whose pairwise inner products are compared")
    parser.add_argument("--train-steps", type=int, default=32, help="AdamW steps recorded (batches of 16)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=1, help="run the methods in turn this many times; each "
                        "method's row is its median round")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/transformer-cpu"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes (a few seconds per method)")
    parser.add_argument("--reuse-run", action="store_true", help="keep OUT/run and OUT/tokens.npy if complete")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = dict(SMOKE if args.smoke else CONFIG)
    if not args.smoke:
        config |= {"length": args.length, "train_steps": args.train_steps}
    config |= {"dim": 64 if args.smoke else args.dim, "pairs_of": 8 if args.smoke else args.pairs_of}
    config |= {"precision": args.precision}
    CONFIG.update(config)
    sequences = 16 if args.smoke else args.sequences
    if args.worker:
        print(json.dumps(worker(args.worker, args.out, config)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    trained = (args.out / "run" / "trajectory.json").exists() and json.loads(
        (args.out / "run" / "trajectory.json").read_text()
    )["complete"]
    if args.reuse_run and trained:
        ids = torch.from_numpy(np.load(args.out / "tokens.npy"))[:sequences]
    else:
        ids = torch.from_numpy(stdlib_tokens(sequences * config["length"], config["vocab"])).reshape(sequences, -1)
        start = time.perf_counter()
        train(args.out, ids, config)
        print(f"trained {config['train_steps']} AdamW steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    np.save(args.out / "tokens.npy", ids.numpy())
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):  # the methods in turn, so that a load that changes slows them alike
        for method in args.methods.split(","):
            if method == "exact" and round_:
                continue
            command = [sys.executable, __file__, "--worker", method, "--out", str(args.out), "--dim", str(args.dim),
                       "--pairs-of", str(args.pairs_of), "--length", str(args.length),
                       "--train-steps", str(args.train_steps), "--precision", args.precision]  # fmt: skip
            command += ["--smoke"] if args.smoke else []
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                result = {"method": method, "error": done.stderr.strip().splitlines()[-1]}
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault(method, []).append(result)
            print(f"round {round_ + 1}, {method}: {result}", file=sys.stderr)
    results = {}
    for method, tries in runs.items():  # each method's median round (by CPU seconds), with every round's time
        timed = sorted((r for r in tries if "cpu_seconds" in r), key=lambda r: r["cpu_seconds"])
        chosen = timed[(len(timed) - 1) // 2] if timed else tries[-1]
        results[method] = {**chosen, "cpu_seconds_rounds": [r["cpu_seconds"] for r in timed]}
    exact = np.load(args.out / "gram-exact.npy") if "exact" in results and "error" not in results["exact"] else None
    floor = results.get("train-step", {}).get("cpu_seconds")
    peer = results.get("bergson", {}).get("cpu_seconds")
    least = results.get("floor", {}).get("cpu_seconds")
    lines = ["| method | k | examples per CPU-s | tokens per CPU-s | of a training step's rate | of the floor's rate "
             "| of bergson's rate "
             "| CPU s per round | examples per wall-s | peak RSS GiB | Spearman vs exact | basis pass CPU s "
             "| of bergson's rate with the basis pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, r in results.items():
        if method == "exact":
            continue
        if "error" in r:
            lines.append(f"| {method} | | {r['error']} | | | | | | | | | | |")
            continue
        rate = sequences / r["cpu_seconds"]
        share = f"{floor / r['cpu_seconds']:.2f}" if floor else ""
        against = f"{peer / r['cpu_seconds']:.2f}" if peer else ""
        of_floor = f"{least / r['cpu_seconds']:.2f}" if least else ""
        rounds = ", ".join(f"{t:.1f}" for t in r["cpu_seconds_rounds"])
        gram = args.out / f"gram-{method}.npy"
        faithful = f"{spearman(np.load(gram), exact):.3f}" if exact is not None and gram.exists() else ""
        r |= {"examples_per_cpu_s": rate, "spearman": faithful}
        basis = r.get("basis_cpu_seconds")  # one checkpoint's pass over these sequences, with the projection
        with_basis = f"{peer / (r['cpu_seconds'] + basis):.2f}" if peer and basis is not None else ""
        lines.append(f"| {method} | {r.get('dim', '')} | {rate:.2f} | {rate * config['length']:,.0f} | {share} | "
                     f"{of_floor} | {against} | {rounds} | {sequences / r['seconds']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{faithful} | {'' if basis is None else f'{basis:.1f}'} | {with_basis} |")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"config": config, "sequences": sequences, "results": results}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
