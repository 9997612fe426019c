"""What ``weights="trainable"`` saves on a LoRA fine-tune: checkpoint bytes, the recorder's time, featurize's time.

A GPT-2 configuration (``--layers`` × ``--width``, vocabulary 8,192, random initialisation: nothing downloaded)
with LoRA adapters (peft, rank ``--rank``, on ``c_attn`` and ``c_fc``) trained ``--steps`` AdamW steps on
sequences of 128 tokens of the standard library's sources, a checkpoint every ``--save-every`` steps, recorded
twice in one process: the whole state dict at every checkpoint (``weights="all"``, the default) and the adapters
only (``weights="trainable"``). Then both runs are featurized (the eigen projection, k = 512) on the same model.

    python benchmarks/lora_checkpoints.py --out runs/lora-checkpoints
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import source_proj as sp
from source_proj.tasks.text import mean_predicted_tokens


def corpus(count: int, length: int, vocab: int) -> torch.Tensor:
    """Byte-pair-free tokens: the standard library's source bytes folded into the vocabulary, in blocks."""
    import os

    root = Path(os.__file__).parent
    data = b"".join(p.read_bytes() for p in sorted(root.glob("*.py"))[:40])
    ids = torch.frombuffer(bytearray(data[: count * length * 2]), dtype=torch.int16).long().abs() % vocab
    return ids[: count * length].view(count, length)


def build(layers: int, width: int, rank: int) -> torch.nn.Module:
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=8192, n_positions=128, n_embd=width, n_layer=layers,
                                     n_head=max(1, width // 64), bos_token_id=0, eos_token_id=0)  # fmt: skip
    base = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                           fan_in_fan_out=True)  # fmt: skip
    return peft.get_peft_model(base, lora)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/lora-checkpoints"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    ids = corpus(args.examples, 128, 8192)
    data = sp.TextDataset(ids.tolist())
    task = sp.LanguageModelingTask(tokens_per_sequence=mean_predicted_tokens(data))
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": 2}
    model = build(args.layers, args.width, args.rank)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report["parameters"], report["trained"] = params, trained
    print(f"{params / 1e6:.1f}M parameters, {trained / 1e6:.2f}M trained (LoRA rank {args.rank})")
    for weights in ("all", "trainable"):
        run = args.out / weights
        model = build(args.layers, args.width, args.rank)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        rec = sp.TrajectoryRecorder(run, model, opt, save_every=args.save_every, overwrite=True, weights=weights)
        rec.begin_stage("main", dataset_size=len(data))
        saving = 0.0
        started = time.perf_counter()
        for step in range(args.steps):
            rows = torch.arange(step * 8, step * 8 + 8) % len(data)
            logits = model(input_ids=ids[rows]).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 8192), ids[rows][:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = time.perf_counter()
            rec.step()
            saving += time.perf_counter() - before
        before = time.perf_counter()
        rec.close()
        saving += time.perf_counter() - before
        training = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (run / "checkpoints").glob("*.pt"))
        started = time.perf_counter()
        sp.featurize(run, build(args.layers, args.width, args.rank), task, data, args.out / f"{weights}.sp",
                     projection=sp.ProjectionArguments(dim=512), overwrite=True, progress=False)  # fmt: skip
        featurizing = time.perf_counter() - started
        count = len(list((run / "checkpoints").glob("*.pt")))
        report[weights] = {"checkpoints": count, "bytes": size, "training_s": training, "recorder_s": saving,
                           "featurize_s": featurizing}  # fmt: skip
        print(f"{weights}: {count} checkpoints, {size / 2**20:.1f} MiB; training {training:.1f} s of which the "
              f"recorder {saving:.1f} s; featurize {featurizing:.1f} s")  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
