"""Real sizes on one GPU (issue 13, item 4): GPT-2 124M and a 1.1B Llama-style model, trained, featurized, fitted.

    python benchmarks/transformer_gpu.py --model gpt2-124m --length 1024 --dim 16384 --steps 200
    python benchmarks/transformer_gpu.py --model llama-1b --length 512 --dim 8192 --steps 200 --precision bf16
    python benchmarks/transformer_gpu.py --smoke                     # toy sizes on the CPU (what the test runs)

Random initialisation (throughput does not depend on the weights), word-level tokens of the Python
standard library's own sources (nothing downloaded), ``--steps`` AdamW steps (warm-up and cosine
decay, clipping at 1.0, bf16 autocast) recorded by ``TrajectoryRecorder`` with a checkpoint at the
start and at the end; then ``sp.featurize`` with the factored projection at k = ``--dim`` (AdamW's
D^{-1/2} as its rank-``--adam-rank`` form, one gradient per sequence: empirical Fisher, no measurement
gradients; ``--fisher sampled`` adds the sampled Fisher's backward, ``--fisher-examples M`` on about M sequences
only) and ``sp.fit`` on the same device. Prints one JSON line per phase: examples/s, tokens/s,
seconds and peak GPU memory (``torch.cuda.max_memory_allocated``), beside the training step's own rate.
The checkpoints of the 1.1B model carry AdamW's state: about 13 GiB each on disk.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sysconfig
import time
from pathlib import Path

import devices
import numpy as np
import torch
from torch.utils.data import Dataset

import source_proj as sp

_LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
             "num_attention_heads": 32, "num_key_value_heads": 8}  # fmt: skip
_TOY_LLAMA = {"vocab_size": 97, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
MODELS = {  # name → (family, config): GPT-2 small and a Llama-3.2-1B-like shape with a 32k vocabulary (1.1B)
    "gpt2-124m": ("gpt2", {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12}),
    "llama-1b": ("llama", _LLAMA_1B),
    "toy-gpt2": ("gpt2", {"vocab_size": 97, "n_embd": 16, "n_layer": 2, "n_head": 2}),
    "toy-llama": ("llama", _TOY_LLAMA),
}


def build_model(name: str, length: int) -> torch.nn.Module:
    import transformers

    family, config = MODELS[name]
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(**config, n_positions=length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="sdpa")  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(**config, max_position_embeddings=length, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def stdlib_tokens(count: int, vocab: int) -> torch.Tensor:
    """``count`` word-level tokens of the standard library's sources (all ``*.py`` files, sorted, repeated if
    needed); ids of the ``vocab − 1`` most frequent words, 0 for the rest."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    words: list[str] = []
    while len(words) < count:
        for path in files:
            words += re.findall(r"\w+|[^\w\s]", path.read_text(errors="replace"))
            if len(words) >= count:
                break
    common = {w: i + 1 for i, (w, _) in enumerate(collections.Counter(words).most_common(vocab - 1))}
    return torch.tensor([common.get(w, 0) for w in words[:count]], dtype=torch.long)


class Blocks(Dataset):
    """Fixed-length token blocks as a language model's batch dicts."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train(args: argparse.Namespace, data: Blocks, device: torch.device) -> dict:
    """``args.steps`` AdamW steps recorded by the recorder; returns the phase's figures."""
    model = build_model(args.model, args.length).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=device.type == "cuda")
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    recorder = sp.TrajectoryRecorder(args.out / "run", model, opt, save_every=args.steps, overwrite=True)
    recorder.begin_stage("main", dataset_size=len(data))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    _reset(device)
    start, seen = time.perf_counter(), 0
    for step in range(args.steps):
        rows = [(step * args.train_batch + i) % len(data) for i in range(args.train_batch)]
        batch = torch.stack([data.ids[r] for r in rows]).to(device)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recorder.step()
        schedule.step()
        seen += len(rows)
    _sync(device)
    seconds = time.perf_counter() - start
    recorder.close()
    parameters = sum(p.numel() for p in model.parameters())
    return {"phase": "train", "parameters": parameters, "steps": args.steps, "seconds": seconds,
            "examples_per_s": seen / seconds, "tokens_per_s": seen * args.length / seconds,
            "final_loss": float(loss.detach()), "peak_gib": _peak_gib(device)}  # fmt: skip


def featurize(args: argparse.Namespace, data: Blocks, device: torch.device) -> dict:
    task = sp.LanguageModelingTask(tokens_per_sequence=args.length - 1)
    model = build_model(args.model, args.length)
    options = sp.FeaturizeArguments(
        batch_size=args.batch, chunk_rows=max(args.batch, 1024 // args.batch * args.batch), fisher=args.fisher,
        measurement=False, device=str(device), precision=args.precision,
        segmentation=sp.SegmentationArguments(per_stage=1), fisher_examples=args.fisher_examples,
    )  # fmt: skip
    projection = sp.ProjectionArguments(dim=args.dim, kind=args.projection, adam_rank=args.adam_rank)
    _reset(device)
    start = time.perf_counter()
    store = sp.featurize(args.out / "run", model, task, data, args.out / "store.sp", projection=projection,
                         options=options, overwrite=True, progress=False)  # fmt: skip
    _sync(device)
    seconds = time.perf_counter() - start
    points = len(store.meta["trajectory"]["checkpoints"])
    rows = points * len(data)
    attributed = sum(math.prod(shape) for _, shape in store.meta["params"])
    return {"phase": "featurize", "k": store.meta["projection"]["dim"], "attributed": attributed,
            "checkpoints": points, "seconds": seconds, "examples_per_s": rows / seconds,
            "tokens_per_s": rows * args.length / seconds, "peak_gib": _peak_gib(device)}  # fmt: skip


def fit(args: argparse.Namespace, device: torch.device) -> dict:
    _reset(device)
    start = time.perf_counter()
    sp.fit(args.out / "store.sp", overwrite=True, progress=False, device=str(device))
    _sync(device)
    return {"phase": "fit", "seconds": time.perf_counter() - start, "peak_gib": _peak_gib(device)}


def step_rate(args: argparse.Namespace, data: Blocks, device: torch.device) -> dict:
    """The floor: one forward and one backward pass (no optimizer) per batch of ``--batch`` sequences."""
    model = build_model(args.model, args.length).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    batches = [data.ids[i : i + args.batch].to(device) for i in range(0, min(len(data), 8 * args.batch), args.batch)]
    _reset(device)
    for warm in (True, False):
        _sync(device)
        start = time.perf_counter()
        for batch in batches[:1] if warm else batches:
            model.zero_grad(set_to_none=True)
            with autocast:
                model(input_ids=batch, labels=batch).loss.backward()
        _sync(device)
    seen = sum(len(b) for b in batches)
    seconds = time.perf_counter() - start
    return {"phase": "train-step", "examples_per_s": seen / seconds, "tokens_per_s": seen * args.length / seconds,
            "peak_gib": _peak_gib(device)}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2-124m")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (512–2048)")
    parser.add_argument("--sequences", type=int, default=2048, help="training sequences featurized")
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps recorded")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="featurize batch size")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dim", type=int, default=8192, help="projection dimension k (up to 16384)")
    parser.add_argument("--adam-rank", type=int, default=1)
    parser.add_argument("--projection", choices=["factored", "eigen"], default="factored",
                        help="factored (issue 13's figures) or eigen (the library's default: adds its basis pass)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--fisher", choices=["empirical", "sampled"], default="empirical",
                        help="featurize's Fisher: empirical (one gradient per sequence) or sampled (a second backward)")
    parser.add_argument("--fisher-examples", type=int, default=None,
                        help="with --fisher sampled: its Fisher of about this many sequences (fisher_examples)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--phases", default="train-step,train,featurize,fit")
    parser.add_argument("--out", type=Path, default=Path("runs/transformer-gpu"))
    parser.add_argument("--smoke", action="store_true", help="toy model and sizes on the CPU, fp32")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model if args.model.startswith("toy") else "toy-llama"
        args.length, args.sequences, args.steps, args.train_batch, args.batch = 16, 24, 4, 4, 8
        args.dim, args.precision, args.device = 64, "fp32", "cpu"
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = devices.device(args.device)
    if device.type == "cpu" and args.device is None and not args.model.startswith("toy"):
        raise SystemExit(f"--model {args.model} is sized for a GPU and this machine has none; pass --smoke for toy "
                         "sizes, or --device cpu to run these sizes on the CPU anyway.")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = MODELS[args.model][1]["vocab_size"]
    data = Blocks(stdlib_tokens(args.sequences * args.length, vocab).reshape(args.sequences, args.length))
    wanted = args.phases.split(",")
    if "train" not in wanted and {"featurize", "fit"} & set(wanted) and not (args.out / "run").is_dir():
        raise SystemExit(f"--phases {args.phases} reads the run of an earlier call in {args.out / 'run'}, which is "
                         "not there: add the train phase, or pass that call's --out.")  # fmt: skip
    results = []
    phases = {"train-step": lambda: step_rate(args, data, device), "train": lambda: train(args, data, device),
              "featurize": lambda: featurize(args, data, device), "fit": lambda: fit(args, device)}  # fmt: skip
    for phase in wanted:
        result = phases[phase]() | {"model": args.model, "length": args.length, "device": str(device),
                                    "precision": args.precision}  # fmt: skip
        print(json.dumps(result), flush=True)
        results.append(result)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
