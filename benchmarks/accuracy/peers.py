"""The peer libraries on the same checkpoints as ours: score matrices for the accuracy harness.

    benchmarks/accuracy/install_peers.sh                       # .venv-peers: kronfluence 1.0.1, dattri 0.3.0
    .venv-peers/bin/python benchmarks/accuracy/peers.py [--settings early,converged,two-stage,early-fast]
        [--peers kronfluence,dattri] [--root runs/accuracy] [--models 3]
    benchmarks/accuracy/install_peers.sh --bergson .venv       # bergson 2.5.1 beside the project
    .venv/bin/python benchmarks/accuracy/peers.py --settings early,two-stage --peers bergson

For each setting and attributed model (``harness.locate``: the recorded trajectories the library's
own methods use), writes ``<setting folder>/peers/<method>/seed-<i>-<query set>.npy``: ``[Q, N]``
scores of the attributed stage's examples in this project's sign (positive = helpful); ``run.py``
scores them by the same LDS code against the same ground truth. A model whose scores were all written
is skipped on a re-run (``--force`` recomputes).

- kronfluence (``kf-ekfac``, ``kf-kfac``, ``kf-diagonal``): influence functions at the final
  checkpoint; the true Fisher (labels sampled from the model), factors fitted on every stage's
  data (as our IF baseline's curvature); measurement = the margin. One file per damping:
  ``@1e-08`` is kronfluence's default ``damping_factor``, ``@heuristic`` its "0.1 × mean
  eigenvalue" (``damping_factor=None``), and the grid 1e-4 … 1 from which ``run.py`` reports the best
  (chosen on the reported queries: an optimistic figure for the peer).
  kronfluence's score is ∇f(q)ᵀ(H + λI)⁻¹∇ℓ(z) for the loss ℓ, which predicts the change of f when
  z is *up*-weighted with the opposite sign; removing z changes f by about +score/N, so our score is
  −score.
- dattri (``dattri-tracin-k512``, ``dattri-tracin-full``): TracIn-CP over the checkpoints saved
  while the attributed stage trained (the initialisation excluded), weights = the learning rate of
  each checkpoint (dattri's ``weight_list``), target = the margin, with dattri's default random
  projection (k = 512, seed 0) or none. dattri's score Σ_c η_c ∇ℓ(z; θ_c)·∇f(q; θ_c) is the first-
  order change of f under a gradient step *against* ∇ℓ(z) with the opposite sign, so our score is
  −score. (dattri replaces ``projector_kwargs=None`` by its default projector; the full-gradient
  variant clears the attribute after construction.)

- bergson (``bergson-source``, ``bergson-source-L1``, ``bergson-ekfac@…``): bergson 2.5.1's SOURCE
  (``approx_unrolling_pipeline``: EK-FAC per segment, Bae et al. 2024) and its EK-FAC influence
  (``hessian_pipeline``) on the same checkpoints, run from the project's venv with bergson installed
  (``install_peers.sh --bergson .venv``). bergson reads Hugging Face causal LMs and tokenized datasets
  only, so each checkpoint is saved as a minimal ``PreTrainedModel`` around the same MLP whose "token"
  is a row of a frozen table of the inputs (sequence ``[row, row]``, label ``[-100, class]``: the
  position bergson collects is the example, its next-token label the class). Its checkpoints are
  those of the attributed stage before its end (as ours), split into L equal segments of equal
  numbers of steps (L = 3 where it divides their count, else the divisor closest to 3; and L = 1),
  learning rate and momentum from the recorded stage. The query gradient is of bergson's
  ``log_odds`` loss (= −margin) at the final checkpoint (built beside the pipeline: its
  ``query.path`` is ignored by the backward walk); the training side is the cross-entropy. bergson
  attributes the ``nn.Linear`` weights only (``include_bias`` breaks its segment-eigenbasis step), with
  no weight-decay term, and one dataset for every segment: with several stages only the attributed
  stage's checkpoints and data are given, so a later stage's propagation is left out. Scores are
  read with bergson's ``load_scores_loss_signed`` (negative = helpful, whatever ``higher_is_better``
  each pipeline saved: SOURCE's is False, the influence pipeline's True), so our score is −that.
  EK-FAC influence at the final checkpoint on the attributed stage's data: ``@heuristic`` is bergson's
  default (``damped_inverse``, 0.1 × mean eigenvalue), the grid ``absolute_damped_inverse`` with
  λ = 1e-4 … 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import settings as settings_module

import source_proj as sp

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
STRATEGIES = ("ekfac", "kfac", "diagonal")
PEERS = ("kronfluence", "dattri", "bergson")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return correct - torch.logsumexp(logits.scatter(-1, labels.unsqueeze(-1), float("-inf")), dim=-1)


def final_model(s: settings_module.Setting, run: Path) -> torch.nn.Module:
    trajectory = sp.Trajectory.load(run)
    return trajectory.load_into(s.build_model(0), trajectory.final_checkpoint).eval()


def attributed_data(s: settings_module.Setting) -> TensorDataset:
    return s.train_data[s.attributed]


def kronfluence_scores(s: settings_module.Setting, run: Path, out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Method → query set → ``[Q, N]`` (our sign) for every strategy and damping."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class MarginTask(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            x, y = batch
            return margin(model(x), y).sum()

    task = MarginTask()
    model = prepare_model(final_model(s, run), task)
    analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=str(out))
    curvature_data = ConcatDataset(list(s.train_data.values()))
    results: dict[str, dict[str, np.ndarray]] = {}
    for strategy in STRATEGIES:
        torch.manual_seed(0)
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=curvature_data,
            per_device_batch_size=256,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        for damping in (1e-8, None, *GRID):
            label = "heuristic" if damping is None else f"{damping:g}"
            method = f"kf-{strategy}@{label}"
            for queries in s.queries:
                name = f"{strategy}-{label}-{queries}"
                analyzer.compute_pairwise_scores(
                    scores_name=name,
                    factors_name=strategy,
                    query_dataset=s.query_data(queries),
                    train_dataset=attributed_data(s),
                    per_device_query_batch_size=256,
                    per_device_train_batch_size=256,
                    score_args=ScoreArguments(damping_factor=damping),
                    overwrite_output_dir=True,
                )
                raw = analyzer.load_pairwise_scores(name)["all_modules"]
                results.setdefault(method, {})[queries] = -raw.double().numpy()
    return results


def dattri_scores(s: settings_module.Setting, run: Path) -> dict[str, dict[str, np.ndarray]]:
    """TracIn-CP through dattri, projected (k = 512) and with full gradients."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    template = s.build_model(0)

    def loss(params, data):  # type: ignore[no-untyped-def]
        x, y = data
        return F.cross_entropy(torch.func.functional_call(template, params, x.unsqueeze(0)), y.unsqueeze(0))

    def target(params, data):  # type: ignore[no-untyped-def]
        x, y = data
        return margin(torch.func.functional_call(template, params, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)

    trajectory = sp.Trajectory.load(run)
    stage = trajectory.stage(s.attributed)
    checkpoints = [c for c in trajectory if stage.start_step < c.step <= stage.end_step]
    states = [trajectory.load_state(c)["model"] for c in checkpoints]
    lr = next(st.lr for st in s.stages if st.name == s.attributed)
    task = AttributionTask(loss_func=loss, model=template, checkpoints=states, target_func=target)
    train = DataLoader(attributed_data(s), batch_size=256, shuffle=False)
    results: dict[str, dict[str, np.ndarray]] = {}
    for method, projected in (("dattri-tracin-k512", True), ("dattri-tracin-full", False)):
        attributor = TracInAttributor(
            task=task,
            weight_list=torch.full((len(states),), lr),
            normalized_grad=False,
            projector_kwargs={"proj_dim": 512, "proj_seed": 0, "device": "cpu"} if projected else None,
        )
        if not projected:
            attributor.projector_kwargs = None
        for queries in s.queries:
            test = DataLoader(s.query_data(queries), batch_size=256, shuffle=False)
            raw = attributor.attribute(train, test)  # [N, Q]
            results.setdefault(method, {})[queries] = -raw.T.double().numpy()
    return results


@functools.cache
def _bergson_model_class() -> type:
    """A Hugging Face causal-LM wrapper of the settings' MLP (registered once with the Auto classes)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class MLPConfig(PretrainedConfig):
        model_type = "source-proj-mlp"

        def __init__(self, widths=(64, 10), rows=1, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(**kwargs)
            self.widths, self.rows = list(widths), rows

    class MLPForCausalLM(PreTrainedModel):
        config_class = MLPConfig

        def __init__(self, config: MLPConfig) -> None:
            super().__init__(config)
            self.inputs = torch.nn.Embedding(config.rows, config.widths[0])
            layers: list[torch.nn.Module] = []
            for i, (a, b) in enumerate(zip(config.widths[:-1], config.widths[1:], strict=True)):
                layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(config.widths) - 2 else [])
            self.net = torch.nn.Sequential(*layers)
            self.post_init()

        def _init_weights(self, module: torch.nn.Module) -> None:
            pass

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.inputs

        def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutput:  # type: ignore[no-untyped-def]
            return CausalLMOutput(logits=self.net(self.inputs(input_ids)))

    AutoConfig.register("source-proj-mlp", MLPConfig)
    AutoModelForCausalLM.register(MLPConfig, MLPForCausalLM)
    return MLPForCausalLM


def _segments(count: int) -> int:
    return min((d for d in range(1, count + 1) if count % d == 0), key=lambda d: (abs(d - 3), d))


def bergson_scores(s: settings_module.Setting, run: Path, out: Path) -> dict[str, dict[str, np.ndarray]]:
    """bergson's SOURCE (L segments and 1) and EK-FAC influence on model ``run``'s checkpoints."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bergson.approx_unrolling.pipeline import approx_unrolling_pipeline
    from bergson.build import build_query
    from bergson.config import ApproxUnrollingConfig, HessianConfig, IndexConfig, PreprocessConfig
    from bergson.config.config import (
        DataConfig,
        HessianPipelineConfig,
        InversionConfig,
        QuerySetConfig,
        ScoreConfig,
    )
    from bergson.data import load_scores_loss_signed
    from bergson.hessians.pipeline import hessian_pipeline
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model_class = _bergson_model_class()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    x, y = attributed_data(s).tensors
    qx, qy = s.all_queries()
    table = torch.cat([x, qx])
    trajectory = sp.Trajectory.load(run)
    checkpoints = {}
    for c in trajectory:
        net = trajectory.load_into(s.build_model(0), c)
        hf = model_class(model_class.config_class(widths=s.widths, rows=len(table)))
        hf.inputs.weight.data.copy_(table)
        hf.net.load_state_dict(net.state_dict())
        checkpoints[c.step] = str(out / "checkpoints" / f"checkpoint-{c.step}")
        hf.save_pretrained(checkpoints[c.step])
    vocabulary = WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(vocabulary), model_max_length=10**9, pad_token="[PAD]"
    )
    tokenizer.save_pretrained(out / "tokenizer")

    def dataset(first: int, labels: torch.Tensor, name: str) -> str:
        rows = range(first, first + len(labels))
        Dataset.from_dict(
            {
                "input_ids": [[r, r] for r in rows],
                "labels": [[-100, int(label)] for label in labels],
                "length": [2] * len(labels),
            }
        ).save_to_disk(out / name)
        return str(out / name)

    train, queries = dataset(0, y, "train"), dataset(len(x), qy, "queries")
    final = checkpoints[trajectory.final_checkpoint.step]
    common = {"tokenizer": str(out / "tokenizer"), "projection_dim": 0, "token_batch_size": 2048, "include_bias": False}
    stage = trajectory.stage(s.attributed)
    recipe = next(st for st in s.stages if st.name == s.attributed)
    used = [checkpoints[c.step] for c in trajectory if stage.start_step <= c.step < stage.end_step]
    ekfac = HessianConfig(method="kfac", ev_correction=True)

    def read(path: Path) -> dict[str, np.ndarray]:
        loss_signed, _ = load_scores_loss_signed(str(path))  # [N, Q], negative = helpful (bergson's reading)
        raw = -loss_signed.double().numpy().T
        return {name: raw[cols] for name, cols in s.query_slices().items()}

    results: dict[str, dict[str, np.ndarray]] = {}
    for segments in sorted({_segments(len(used)), 1}, reverse=True):
        folder = out / f"source-L{segments}"
        query = IndexConfig(run_path=str(folder / "query"), model=final, loss_fn="log_odds", **common)
        build_query(query, QuerySetConfig(dataset=queries), PreprocessConfig())
        steps = [len(chunk) for chunk in np.array_split(np.arange(stage.end_step - stage.start_step), segments)]
        approx_unrolling_pipeline(
            IndexConfig(run_path=str(folder), model=final, data=DataConfig(dataset=train), loss_fn="ce", **common),
            ekfac,
            ApproxUnrollingConfig(
                checkpoints=used,
                segments=segments,
                lr_list=[recipe.lr] * segments,
                step_size_list=steps,
                momentum=recipe.momentum,
            ),
        )
        label = "bergson-source" if segments == _segments(len(used)) else "bergson-source-L1"
        results[label] = read(folder / "scores")
    query_index = out / "influence-query"
    build_query(
        IndexConfig(run_path=str(query_index), model=final, loss_fn="log_odds", **common),
        QuerySetConfig(dataset=queries),
        PreprocessConfig(),
    )
    for damping in (None, *GRID):
        label = "heuristic" if damping is None else f"{damping:g}"
        folder = out / f"influence-{label}"
        if damping is not None:
            shutil.copytree(out / "influence-heuristic" / "hessian", folder / "hessian")
        inversion = (
            InversionConfig() if damping is None else InversionConfig("absolute_damped_inverse", damping_factor=damping)
        )
        hessian_pipeline(
            IndexConfig(run_path=str(folder), model=final, data=DataConfig(dataset=train), loss_fn="ce", **common),
            ekfac,
            ScoreConfig(),
            PreprocessConfig(),
            HessianPipelineConfig(query=QuerySetConfig(path=str(query_index)), inversion_cfg=inversion, resume=True),
        )
        results[f"bergson-ekfac@{label}"] = read(folder / "scores")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="early,converged,two-stage,early-fast")
    parser.add_argument("--peers", default="kronfluence,dattri", help=f"any of {', '.join(PEERS)}")
    parser.add_argument("--root", default=str(harness.ROOT))
    parser.add_argument("--mnist", default=None)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="recompute models whose peer scores exist")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = args.peers.split(",")
    if unknown := [p for p in peers if p not in PEERS]:
        parser.error(f"unknown peer {', '.join(unknown)}; use any of {', '.join(PEERS)}")
    if missing := [p for p in peers if importlib.util.find_spec(p) is None]:
        raise SystemExit(
            f"{', '.join(missing)} cannot be imported by {sys.executable}; install the peers with "
            "benchmarks/accuracy/install_peers.sh (kronfluence, dattri) or install_peers.sh --bergson (bergson)."
        )
    for name in args.settings.split(","):
        s, folder, runs = harness.locate(name, root=args.root, mnist=args.mnist, models=args.models)
        for seed, run in enumerate(runs):
            done = folder / "peers" / f"done-{seed}-{'-'.join(peers)}"
            if done.exists() and not args.force:
                continue
            start = time.perf_counter()
            results: dict[str, dict[str, np.ndarray]] = {}
            if "kronfluence" in peers:
                results.update(kronfluence_scores(s, run, folder / "peers-work" / f"kronfluence-{seed}"))
            if "dattri" in peers:
                results.update(dattri_scores(s, run))
            if "bergson" in peers:
                results.update(bergson_scores(s, run, folder / "peers-work" / f"bergson-{seed}"))
            for method, per_query_set in results.items():
                (folder / "peers" / method).mkdir(parents=True, exist_ok=True)
                for queries, scores in per_query_set.items():
                    np.save(folder / "peers" / method / f"seed-{seed}-{queries}.npy", scores)
            done.touch()
            seconds = time.perf_counter() - start
            print(f"{name} model {seed}: {len(results)} peer methods in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
