"""Two text domains that ship with the installed packages, and a small word-level tokenizer.

* **docstrings** (pre-training domain): the docstrings of public functions and classes of a fixed
  list of Python standard-library modules (``inspect.getdoc``), deduplicated.
* **datasets** (fine-tuning domain): scikit-learn's bundled dataset descriptions
  (``sklearn/datasets/descr/*.rst``), without reStructuredText rules and directives.

Each domain's text is tokenized and cut into consecutive blocks of ``length`` tokens (the
Hugging Face ``run_clm`` recipe), so every sequence predicts the same number of tokens. Nothing is
downloaded; the texts depend on the installed Python and scikit-learn versions.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

STDLIB_MODULES = (
    "collections", "itertools", "functools", "json", "re", "string", "textwrap", "statistics", "heapq",
    "bisect", "datetime", "pathlib", "shutil", "csv", "argparse", "logging", "fractions", "difflib", "enum",
    "contextlib", "operator", "math", "os",
)  # fmt: skip
TOKEN = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_RULE = re.compile(r"^\s*[=\-~*^#+`]{3,}[\s=\-~*^#+`]*$")
PAD, UNK = "<pad>", "<unk>"


@dataclass(frozen=True)
class Block:
    """``length`` consecutive tokens of a domain and the original text they span."""

    tokens: tuple[str, ...]
    text: str


def docstrings() -> list[str]:
    """Docstrings of the public functions and classes of :data:`STDLIB_MODULES`, each once, in a fixed order."""
    seen: set[str] = set()
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def dataset_descriptions() -> list[str]:
    """scikit-learn's dataset descriptions (one per file, sorted by name), without rules and directives.

    The files are found without importing scikit-learn (a 2 s import the spec does not need)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("The text example reads the texts scikit-learn ships; `pip install scikit-learn`.")
    folder = Path(spec.origin).parent / "datasets" / "descr"
    docs = []
    for path in sorted(folder.glob("*.rst")):
        lines = [ln for ln in path.read_text().splitlines() if not _RULE.match(ln) and not ln.startswith("..")]
        docs.append("\n".join(lines))
    return docs


def blocks(texts: Sequence[str], length: int) -> list[Block]:
    """The texts' tokens (lower-cased), concatenated, in consecutive blocks of ``length``; a short tail is dropped."""
    spans = [(text, m) for text in texts for m in TOKEN.finditer(text)]
    return [
        Block(tuple(m.group().lower() for _, m in spans[i : i + length]), _span_text(spans[i : i + length]))
        for i in range(0, len(spans) - length + 1, length)
    ]


class WordTokenizer:
    """A vocabulary of the tokens seen at least ``min_count`` times in ``blocks``; others map to ``<unk>``.
    Ids: 0 = ``<pad>``, 1 = ``<unk>``, then by decreasing count."""

    def __init__(self, blocks: Sequence[Block], min_count: int = 2) -> None:
        counts = Counter(t for block in blocks for t in block.tokens)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.vocab = [PAD, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of tokens (``<unk>`` for those outside the vocabulary)."""
        return [self.index.get(t, 1) for t in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of ``ids``."""
        return [self.vocab[i] for i in ids]


def _span_text(part: Sequence[tuple[str, re.Match[str]]]) -> str:
    """The original text of consecutive tokens (whitespace collapsed; " … " between source texts)."""
    pieces: list[str] = []
    current, first, last = None, 0, 0
    for text, match in part:
        if text is not current:
            if current is not None:
                pieces.append(current[first:last])
            current, first = text, match.start()
        last = match.end()
    if current is not None:
        pieces.append(current[first:last])
    return " … ".join(" ".join(p.split()) for p in pieces)
