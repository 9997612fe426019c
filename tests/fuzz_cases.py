"""Bad inputs a newcomer gives the CLI and the Python API, and how to judge what came back.

A :class:`Case` builds its input inside a :class:`Workspace` (copies of the tiny run and of a
fitted store, spec files) and :func:`judge` runs it: the outcome is a *clear error* when the CLI
exits ≠ 0 with exactly one ``Error:`` line (``verify`` may instead print its DAMAGED report) or the
API raises a one-line :class:`~source_proj.SourceProjError`; a *traceback* when anything else
escapes (or the CLI's catch-all names a bug); *silent* when the bad input is accepted; and *data
lost* when any file the workspace held before changed. BENCHMARKS.md's reliability table (issue 14)
is this catalogue's test run, grouped by the kinds below.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import source_proj as sp
from source_proj.cli.main import main

from .crash_driver import DIM, build_model, data

SPEC = """
import sys
sys.path.insert(0, {root!r})
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset
import source_proj as sp
from tests.crash_driver import build_model, data

def build_task():
    return sp.ClassificationTask()

def train_data(stage):
    return data()

def query_data():
    return data()

def describe(stage, index):
    return f"label {{int(data().tensors[1][index])}}"
"""

ROOT = Path(__file__).resolve().parents[1]

SPEC_CHANGES = {
    "syntax error": "def build_model(:\n",
    "import error": "import no_such_module_for_source_proj\n",
    "exits on import": "raise SystemExit(2)\n",
    "build_model raises": "def build_model():\n    raise ValueError('weights missing')\n",
    "build_model returns None": "def build_model():\n    return None\n",
    "build_task returns a string": "def build_task():\n    return 'classification'\n",
    "train_data returns an int": "def train_data(stage):\n    return 3\n",
    "train_data of another size": "def train_data(stage):\n    return Subset(data(), range(10))\n",
    "train_data shuffled": "def train_data(stage):\n    return Subset(data(), list(range(12))[::-1])\n",
    "query_data empty": "def query_data():\n    return Subset(data(), [])\n",
    "query_data of another shape": "def query_data():\n"
    "    return TensorDataset(torch.randn(4, 7), data().tensors[1][:4])\n",
    "query labels out of range": "def query_data():\n    x, y = data().tensors\n    return TensorDataset(x, y + 5)\n",
    "describe raises": "def describe(stage, index):\n    raise KeyError(index)\n",
    "another activation": "def build_model():\n    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))\n",
    "another width": "def build_model():\n    return nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 3))\n",
    "regression task": "def build_task():\n    return sp.RegressionTask()\n",
}
"""Spec files that go wrong: appended to :data:`SPEC` (a later definition replaces the spec's)."""


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (lock files aside), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".source-proj.lock" and "__pycache__" not in p.parts
    }


class Workspace:
    """A folder holding a copy of the tiny run (``run``), a fitted store of it (``store``) and its spec
    (``spec``); :meth:`spec_with` writes variants. Every case gets a fresh one."""

    def __init__(self, root: Path, run: Path, store: Path) -> None:
        self.root = root
        self.run = root / "run"
        self.store = root / "s.sp"
        self._source_run = run
        self.reset_run()
        shutil.copytree(store, self.store)
        self.spec = self.spec_with("")
        meta = json.loads((self.store / "zarr.json").read_text())
        meta["attributes"]["source_proj"]["trajectory"]["path"] = str(self.run)
        meta["attributes"]["source_proj"]["spec"] = str(self.spec)
        (self.store / "zarr.json").write_text(json.dumps(meta, indent=2))

    def reset_run(self) -> None:
        """Put back the workspace's copy of the run as it was."""
        shutil.rmtree(self.run, ignore_errors=True)
        shutil.copytree(self._source_run, self.run)

    def spec_with(self, change: str, name: str = "spec.py") -> Path:
        path = self.root / name
        path.write_text(SPEC.format(root=str(ROOT)) + change)
        return path

    def path(self, name: str) -> Path:
        return self.root / name

    def rewrite_checkpoint(self, index: int, payload: bytes) -> None:
        """Replace checkpoint ``index`` by ``payload`` and record its sha256 (a run edited by hand)."""
        index_file = self.run / "trajectory.json"
        trajectory = json.loads(index_file.read_text())
        entry = trajectory["checkpoints"][index]
        (self.run / entry["file"]).write_bytes(payload)
        entry["sha256"] = hashlib.sha256(payload).hexdigest()
        index_file.write_text(json.dumps(trajectory))


Action = list[str] | Callable[[], object]


@dataclass(frozen=True)
class Case:
    """One bad input: ``build`` prepares the workspace and returns CLI arguments or an API call."""

    name: str
    build: Callable[[Workspace], Action]


@dataclass(frozen=True)
class Outcome:
    clear: bool
    traceback: bool
    lost: bool
    message: str


def judge(case: Case, workspace: Workspace) -> Outcome:
    """Run ``case`` in ``workspace`` and classify what came back (see the module docstring)."""
    action = case.build(workspace)
    before = snapshot(workspace.root)
    if callable(action):
        try:
            action()
        except sp.SourceProjError as err:
            message = str(err)
            clear, traceback = "\n" not in message, False
        except Exception as err:  # anything else reaches the user as a traceback
            message, clear, traceback = f"{type(err).__name__}: {err}", False, True
        else:
            message, clear, traceback = "accepted", False, False
    else:
        out = CliRunner().invoke(main, action)
        text = out.output
        errors = [line for line in text.splitlines() if line.startswith("Error: ")]
        escaped = out.exception is not None and not isinstance(out.exception, SystemExit)
        traceback = escaped or "failed unexpectedly" in text or "Traceback" in text
        damaged = action[0] == "verify" and "status: DAMAGED" in text
        clear = out.exit_code != 0 and not traceback and (len(errors) == 1 or damaged)
        message = errors[0] if errors else (text.strip().splitlines() or [f"exit {out.exit_code}"])[-1]
    after = snapshot(workspace.root)
    lost = any(after.get(name) != digest for name, digest in before.items())
    return Outcome(clear, traceback, lost, message)


def _query(*extra: str) -> Callable[[Workspace], Action]:
    return lambda w: ["query", str(w.store), *extra]


def _spec_query(change: str) -> Callable[[Workspace], Action]:
    return lambda w: ["query", str(w.store), "--spec", str(w.spec_with(SPEC_CHANGES[change], "changed.py"))]


def _featurize(*extra: str, out: str = "new.sp") -> Callable[[Workspace], Action]:
    def build(w: Workspace) -> Action:
        return ["featurize", "--ckpts", str(w.run), "--spec", str(w.spec), "--out", str(w.path(out)), *extra]

    return build


def _featurize_over_store(change: str, name: str) -> Callable[[Workspace], Action]:
    """featurize into the reference store with the spec changed by ``SPEC_CHANGES[change]`` (same settings)."""

    def build(w: Workspace) -> Action:
        spec = w.spec_with(SPEC_CHANGES[change], name)
        return ["featurize", "--ckpts", str(w.run), "--out", str(w.store), "--dim", str(DIM), "--seed", "3",
                "--spec", str(spec)]  # fmt: skip

    return build


def _damaged_run(damage: Callable[[Workspace], None]) -> Callable[[Workspace], Action]:
    def build(w: Workspace) -> Action:
        damage(w)
        return _featurize("--dim", str(DIM))(w)

    return build


def _written(name: str, content: bytes | str, then: Callable[[Workspace], Action]) -> Callable[[Workspace], Action]:
    """Create ``name`` in the workspace (a file, or a directory when ``content`` is ``"/"``) first."""

    def build(w: Workspace) -> Action:
        target = w.path(name)
        if content == "/":
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
        return then(w)

    return build


def _store_meta(change: Callable[[dict], None]) -> Callable[[Workspace], None]:
    def edit(w: Workspace) -> None:
        root = json.loads((w.store / "zarr.json").read_text())
        change(root)
        (w.store / "zarr.json").write_text(json.dumps(root))

    return edit


def _then(edit: Callable[[Workspace], None], action: Callable[[Workspace], Action]) -> Callable[[Workspace], Action]:
    def build(w: Workspace) -> Action:
        edit(w)
        return action(w)

    return build


def _api(call: Callable[[Workspace], object]) -> Callable[[Workspace], Action]:
    return lambda w: lambda: call(w)


def _attributor(w: Workspace, **kwargs: object) -> sp.Attributor:
    return sp.Attributor(w.store, build_model(), sp.ClassificationTask(), progress=False, **kwargs)  # type: ignore[arg-type]


def _api_featurize(w: Workspace, **kwargs: object) -> object:
    arguments: dict = {"projection": sp.ProjectionArguments(dim=DIM), "progress": False}
    arguments.update(kwargs)
    model = arguments.pop("model", build_model())
    train = arguments.pop("train_data", data())
    return sp.featurize(w.run, model, sp.ClassificationTask(), train, w.path("api.sp"), **arguments)


def _state(change: Callable[[dict], None]) -> Callable[[Workspace], None]:
    """Rewrite the final checkpoint with a changed state dict (and its sha256 recorded)."""

    def damage(w: Workspace) -> None:
        state = torch.load(w.run / "checkpoints" / "step-00000008.pt", weights_only=True)
        change(state["model"])
        buffer = w.path("state.pt")
        torch.save(state, buffer)
        w.rewrite_checkpoint(2, buffer.read_bytes())
        buffer.unlink()

    return damage


def _set(state: dict, name: str, value: torch.Tensor) -> None:
    state[name] = value


def _set_incomplete(w: Workspace) -> None:
    index = json.loads((w.run / "trajectory.json").read_text())
    index["complete"] = False
    (w.run / "trajectory.json").write_text(json.dumps(index))


CASES: list[Case] = [
    # --queries: ranges and indices
    *[
        Case(f"query --queries {which!r}", _query("--queries", which))
        for which in ("400:410", "5:5", "10:5", "abc", "10:14", "-1", "3,,5", "1:2:3", "", "12", ":0", "3:a", "0x3")
    ],
    # other query options
    *[Case(f"query --top-k {k}", _query("--top-k", k)) for k in ("0", "-3", "13", "5000", "ten")],
    Case("query --show -1", _query("--show", "-1")),
    Case("query --method nosuch", _query("--method", "nosuch")),
    Case("query --search nosuch", _query("--search", "nosuch")),
    Case("query --out a directory", lambda w: ["query", str(w.store), "--out", str(w.root)]),
    Case("query --out results.txt", lambda w: ["query", str(w.store), "--out", str(w.path("results.txt"))]),
    Case("query --out without suffix", lambda w: ["query", str(w.store), "--out", str(w.path("results"))]),
    Case("query --html into a folder", lambda w: ["query", str(w.store), "--html", str(w.root)]),
    # store paths
    Case("query of a missing store", lambda w: ["query", str(w.path("missing.sp"))]),
    Case("info of a regular file", _written("file.sp", b"not a store", lambda w: ["info", str(w.path("file.sp"))])),
    Case("verify of an empty folder", _written("empty.sp", "/", lambda w: ["verify", str(w.path("empty.sp"))])),
    Case(
        "fit of a folder of other files", _written("other/notes.txt", "mine", lambda w: ["fit", str(w.path("other"))])
    ),
    Case(
        "query of a zarr group that is no store",
        _written(
            "group.sp/zarr.json",
            '{"zarr_format": 3, "node_type": "group", "attributes": {}}',
            lambda w: ["query", str(w.path("group.sp"))],
        ),
    ),
    Case(
        "info with garbage root metadata",
        _written("bad.sp/zarr.json", b"\x00garbage", lambda w: ["info", str(w.path("bad.sp"))]),
    ),
    Case(
        "fit of a store of a future format",
        _then(
            _store_meta(lambda m: m["attributes"]["source_proj"].update(format_version=9)),
            lambda w: ["fit", str(w.store)],
        ),
    ),
    Case(
        "verify --repair of a store without metadata fields",
        _then(
            _store_meta(lambda m: m["attributes"]["source_proj"].pop("params")),
            lambda w: ["verify", str(w.store), "--repair"],
        ),
    ),
    Case("query of a store whose run moved", _then(lambda w: shutil.rmtree(w.run), lambda w: ["query", str(w.store)])),
    # fit, baseline, trajectory options
    Case("fit --stages nosuch", lambda w: ["fit", str(w.store), "--stages", "nosuch", "--force"]),
    Case("fit --segments abc", lambda w: ["fit", str(w.store), "--segments", "abc", "--force"]),
    Case("fit --segments 0", lambda w: ["fit", str(w.store), "--segments", "0", "--method", "zero"]),
    Case("fit --boundaries x", lambda w: ["fit", str(w.store), "--boundaries", "x"]),
    Case("fit of another method without --force", lambda w: ["fit", str(w.store), "--segments", "2"]),
    Case("fit --shard 3/2", lambda w: ["fit", str(w.store), "--shard", "3/2"]),
    Case("baseline --kind nosuch", lambda w: ["baseline", str(w.store), "--kind", "nosuch"]),
    Case("baseline --damping-factor -1",
         lambda w: ["baseline", str(w.store), "--kind", "if", "--damping-factor", "-1"]),
    Case("baseline --trak-dim 0", lambda w: ["baseline", str(w.store), "--kind", "trak", "--trak-dim", "0"]),
    Case("trajectory --segments 3", lambda w: ["trajectory", str(w.store), "--segments", "3"]),
    Case("trajectory without automatic cuts", lambda w: ["trajectory", str(w.store)]),
    Case("lds --alpha x", lambda w: ["lds", str(w.store), "--alpha", "x"]),
    Case("lds without retrain()", lambda w: ["lds", str(w.store), "--subsets", "2", "--repeats", "1"]),
    # spec files
    Case("query --spec missing.py", lambda w: ["query", str(w.store), "--spec", str(w.path("missing.py"))]),
    Case("query --spec a folder", lambda w: ["query", str(w.store), "--spec", str(w.root)]),
    Case(
        "query --spec notes.txt",
        _written("notes.txt", "x = 1", lambda w: ["query", str(w.store), "--spec", str(w.path("notes.txt"))]),
    ),
    *[Case(f"query with a spec whose {change}", _spec_query(change)) for change in SPEC_CHANGES],
    # featurize options and paths
    Case(
        "featurize --ckpts missing",
        lambda w: ["featurize", "--ckpts", str(w.path("nope")), "--spec", str(w.spec), "--out", str(w.path("n.sp"))],
    ),
    Case(
        "featurize --ckpts a file",
        _written(
            "run.txt",
            "x",
            lambda w: [
                "featurize",
                "--ckpts",
                str(w.path("run.txt")),
                "--spec",
                str(w.spec),
                "--out",
                str(w.path("n.sp")),
            ],
        ),
    ),
    Case(
        "featurize --ckpts garbage trajectory.json",
        _then(lambda w: (w.run / "trajectory.json").write_text("{not json"), _featurize()),
    ),
    *[Case(f"featurize --dim {d}", _featurize("--dim", d)) for d in ("0", "-4")],
    # The eigen projection takes any k (above p it keeps every direction); the dense one refuses k > p.
    Case("featurize --dim 100000", _featurize("--projection", "rademacher", "--dim", "100000")),
    Case("featurize --batch-size 0", _featurize("--batch-size", "0")),
    Case("featurize --chunk-rows 0", _featurize("--chunk-rows", "0")),
    Case("featurize --workers -1", _featurize("--workers", "-1")),
    Case("featurize --shard 3/2", _featurize("--shard", "3/2")),
    Case("featurize --shard x", _featurize("--shard", "x")),
    Case("featurize --segments abc", _featurize("--segments", "abc")),
    Case("featurize --fisher nosuch", _featurize("--fisher", "nosuch")),
    Case("featurize --fisher-examples 0", _featurize("--fisher-examples", "0")),
    Case("featurize --fisher-examples half", _featurize("--fisher-examples", "half")),
    Case("featurize --fisher-examples, chunks of 1.5 batches",
         _featurize("--fisher-examples", "4", "--batch-size", "2", "--chunk-rows", "3")),
    Case("featurize --basis-checkpoints x", _featurize("--basis-checkpoints", "x")),
    Case("featurize --out a folder of other files", _written("theirs/a.txt", "keep me", _featurize(out="theirs"))),
    Case("featurize --out a file", _written("f.sp", "keep me", _featurize(out="f.sp"))),
    Case("featurize over a store of other settings", _featurize("--dim", "8", out="s.sp")),
    Case("featurize with another activation over the store", _featurize_over_store("another activation", "tanh.py")),
    Case("featurize with shuffled data over the store", _featurize_over_store("train_data shuffled", "shuffled.py")),
    # damaged checkpoints
    Case("checkpoint deleted", _damaged_run(lambda w: (w.run / "checkpoints/step-00000004.pt").unlink())),
    Case(
        "checkpoint with a flipped byte",
        _damaged_run(
            lambda w: (w.run / "checkpoints/step-00000004.pt").write_bytes(
                bytes([b ^ (i == 100) for i, b in enumerate((w.run / "checkpoints/step-00000004.pt").read_bytes())])
            )
        ),
    ),
    Case(
        "checkpoint truncated, sha256 updated",
        _damaged_run(lambda w: w.rewrite_checkpoint(1, (w.run / "checkpoints/step-00000004.pt").read_bytes()[:700])),
    ),
    Case("checkpoint replaced by text, sha256 updated", _damaged_run(lambda w: w.rewrite_checkpoint(1, b"weights"))),
    Case("checkpoint of another architecture", _damaged_run(_state(lambda s: _set(s, "0.weight", torch.zeros(9, 5))))),
    Case("checkpoint with NaN weights", _damaged_run(_state(lambda s: s["2.bias"].fill_(float("nan"))))),
    Case(
        "checkpoint without a model entry",
        _damaged_run(
            lambda w: (
                torch.save({"weights": {}}, w.path("x.pt")),
                w.rewrite_checkpoint(0, w.path("x.pt").read_bytes()),
            )
        ),
    ),
    # the Python API
    Case("ProjectionArguments(dim=0)", _api(lambda w: sp.ProjectionArguments(dim=0))),
    Case("FeaturizeArguments(batch_size=0)", _api(lambda w: sp.FeaturizeArguments(batch_size=0))),
    Case("FeaturizeArguments(chunk_rows=-1)", _api(lambda w: sp.FeaturizeArguments(chunk_rows=-1))),
    Case("featurize(fisher='bogus')", _api(lambda w: _api_featurize(w, options=sp.FeaturizeArguments(fisher="bogus")))),  # type: ignore[arg-type]
    Case(
        "featurize with inputs of another width",
        _api(lambda w: _api_featurize(w, train_data=TensorDataset(torch.randn(12, 4), data().tensors[1]))),
    ),
    Case("featurize with 11 examples", _api(lambda w: _api_featurize(w, train_data=TensorDataset(*data()[:11])))),
    Case("featurize with an incomplete run", _then(_set_incomplete, _api(_api_featurize))),
    Case("Attributor of another method", _api(lambda w: _attributor(w, method="nosuch"))),
    Case(
        "Attributor with a regression task", _api(lambda w: sp.Attributor(w.store, build_model(), sp.RegressionTask()))
    ),
    Case(
        "Attributor with another activation",
        _api(
            lambda w: sp.Attributor(
                w.store, nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), sp.ClassificationTask()
            )
        ),
    ),
    Case("top_k(k=0)", _api(lambda w: _attributor(w).top_k(data(), 0))),
    Case("top_k(k=13) of 12 examples", _api(lambda w: _attributor(w).top_k(data(), 13))),
    Case(
        "top_k of no queries",
        _api(lambda w: _attributor(w).top_k(TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)), 2)),
    ),
    Case(
        "scores of queries of another width",
        _api(lambda w: _attributor(w).scores(TensorDataset(torch.randn(3, 7), torch.zeros(3, dtype=torch.long)))),
    ),
    Case("Ensemble of no stores", _api(lambda w: sp.Ensemble([]))),
    Case(
        "fit with an unknown stage",
        _api(lambda w: sp.fit(w.store, sp.FitArguments(stages=("x",), method="x"), progress=False)),
    ),
    Case("Store.open of a missing path", _api(lambda w: sp.Store.open(w.path("none.sp")))),
]
