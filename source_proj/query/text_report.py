"""HTML reports of text attribution results: each query with its top training sequences
(``text_report``), and the per-token scores of training sequences (``token_report``).

For every query: its text (optionally shaded token by token, e.g. by the next-token loss the
measurement sums), then its training sequences that helped it most and those that harmed it most, in that order
(for a loss or an error the helpful ones have the most negative scores), with their stage, index, score and text (a
list stops where the scores change sign, as ``QueryResult.records`` does). Words a training text shares with its
query are marked, to help a reader see what connects them (a reading aid, not part of the score). The page is
self-contained (no scripts, no external files). A long training text shows its start (``text_report``) or the
window of tokens around its largest share (``token_report``), the whole text one click away in a ``<details>``
element; ``max_chars=None`` / ``max_tokens=None`` show every text whole. Texts are escaped; a lone UTF-16
surrogate (text decoded from broken JSON escapes, common in scraped data), which UTF-8 cannot hold, is written as its
backslash escape.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from source_proj.errors import TaskError
from source_proj.query.attributor import QueryResult
from source_proj.query.per_token import TokenScores
from source_proj.store.durable import atomic_write_bytes
from source_proj.tasks.text import IGNORE_INDEX

_WORD = re.compile(r"\w+")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 80em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.query { background: #f6f6f6; padding: .6em; border-radius: 4px; line-height: 1.8; }
.cols { display: flex; gap: 1.5em; } .cols > div { flex: 1; min-width: 0; }
table { border-collapse: collapse; width: 100%; font-size: .9em; }
td { border-top: 1px solid #eee; padding: .3em; vertical-align: top; }
td, .query { overflow-wrap: anywhere; }
td.score { white-space: nowrap; font-family: monospace; } td.where { white-space: nowrap; color: #666; }
h3.pos { color: #1a7f37; } h3.neg { color: #b42318; } mark { background: #fff3a3; }
.tok { border-radius: 2px; } .legend { color: #555; font-size: .9em; }
details { margin-top: .3em; } summary { color: #666; cursor: pointer; }
"""


@dataclass(frozen=True)
class ShadedText:
    """A text as pieces with one value each (e.g. tokens and their loss); pieces are joined with spaces
    and shaded in proportion to |value| / the largest finite |value| of the report (orange > 0, blue < 0)."""

    pieces: Sequence[str]
    values: Sequence[float]


def text_report(
    result: QueryResult,
    queries: Sequence[str | ShadedText],
    train_text: Callable[[str, int], str],
    path: str | Path,
    *,
    title: str = "Training data attribution",
    score_labels: tuple[str, str] | None = None,
    query_names: Sequence[str] | None = None,
    shading: str = "",
    positive_helps: bool | None = None,
    max_chars: int | None = 500,
) -> Path:
    """Write the HTML report; returns its path.

    Args:
        result: top-k of the queries (``[Q, k]`` rows and scores of each sign; score = −Δf, docs/concepts/scores.md).
        queries: each query's text, or a [`ShadedText`][], in the order of the result's rows.
        train_text: the text of training example ``(stage, index)``.
        path: the ``.html`` file to write (replaced atomically).
        title: the page heading.
        score_labels: what a positive and a negative score mean for this task's measurement (default: the
            result's own, its task's ``score_labels``).
        query_names: one heading per query (default ``query 0``, ``query 1``, …); other counts are refused.
        shading: what the shading of [`ShadedText`][] queries shows (for the legend).
        positive_helps: whether a positive score means the example helped the query (default: the result's own,
            its task's ``positive_helps``): the helpful list comes first, headed in green, the other second, in red.
            ``False`` for a measurement that is a loss or an error (a language model's), where a positive score means
            the example raised it and the helpful list holds the most negative scores.
        max_chars: the characters of a training text shown (cut at the last space before, where there is one in
            the second half), then "…" and the whole text behind a click (a ``<details>`` element); ``None``: every
            training text whole.
    """
    _check_bound(max_chars, "max_chars")
    score_labels = result.score_labels if score_labels is None else score_labels
    positive_helps = result.positive_helps if positive_helps is None else positive_helps
    count = result.positive_ids.shape[0]
    if len(queries) != count:
        raise TaskError(f"{len(queries)} query texts were given for the {count} queries of the result; give one each.")
    names = _names(query_names, count)
    shaded = [q for q in queries if isinstance(q, ShadedText)]
    top = max((_largest(q.values) for q in shaded), default=0.0)
    legend = [
        "score = −(predicted change of the query's measurement if the training sequence were left out): "
        f"score &gt; 0 = {html.escape(score_labels[0])}; score &lt; 0 = {html.escape(score_labels[1])}.",
        "<mark>marked</mark> words also occur in the query (a reading aid, not part of the score).",
    ]
    if shaded and shading:
        legend.append(f"Query shading: {html.escape(shading)} (darker = larger in absolute value, up to {top:.3g}; "
                      "orange &gt; 0, blue &lt; 0).")
    parts = [f"<h1>{html.escape(title)}</h1>", *(f'<p class="legend">{line}</p>' for line in legend)]
    for q in range(count):
        query = queries[q]
        plain = " ".join(query.pieces) if isinstance(query, ShadedText) else query
        words = {w.lower() for w in _WORD.findall(plain)}
        body = _shaded(query, top) if isinstance(query, ShadedText) else html.escape(query)
        parts.append(f"<h2>{html.escape(names[q])}</h2><div class='query'>{body}</div><div class='cols'>")
        by_sign = [
            (score_labels[0], 1.0, result.positive_ids[q], result.positive_scores[q]),
            (score_labels[1], -1.0, result.negative_ids[q], result.negative_scores[q]),
        ]
        helpful, harmful = by_sign if positive_helps else by_sign[::-1]
        for css, (label, sign, ids, scores) in (("pos", helpful), ("neg", harmful)):  # helpful first, in green
            rows = []
            for row, score in zip(ids, scores, strict=True):
                if not sign * score > 0:  # the list ran out of examples of its sign (QueryResult.short_lists)
                    sign_text = "&gt; 0" if sign > 0 else "&lt; 0"
                    rows.append(f"<tr><td colspan='3' class='where'>no{' other' if rows else ''} training example "
                                f"has a score {sign_text}</td></tr>")  # fmt: skip
                    break
                stage, index = result.locate(int(row))
                rows.append(
                    f"<tr><td class='score'>{score:+.3e}</td><td class='where'>{html.escape(stage)}[{index}]</td>"
                    f"<td>{_clipped(train_text(stage, index), words, max_chars)}</td></tr>"
                )
            parts.append(f"<div><h3 class='{css}'>{html.escape(label)}</h3><table>{''.join(rows)}</table></div>")
        parts.append("</div>")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    atomic_write_bytes(path, page.encode("utf-8", "backslashreplace"))  # a lone surrogate as \udXXX
    return Path(path)


def _names(query_names: Sequence[str] | None, count: int) -> list[str]:
    """A heading per query: the given ones (one each), else ``query 0``, ``query 1``, …"""
    if query_names is None:
        return [f"query {q}" for q in range(count)]
    if len(query_names) != count:
        raise TaskError(f"{len(query_names)} query names were given for {count} queries; give one each.")
    return list(query_names)


def _check_bound(value: int | None, name: str) -> None:
    """Refuses a bound on a shown text that is not ``None`` or a whole number ≥ 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise TaskError(f"{name} is {value!r}; pass a whole number ≥ 1, or None to show every text whole.")


def _expandable(shown: str, full: str, what: str) -> str:
    """HTML of the shown part of a text, then the whole text behind a click (``what``: how much it holds)."""
    return f"{shown}<details><summary>show all {what}</summary>{full}</details>"


def _clipped(text: str, words: set[str], max_chars: int | None) -> str:
    """HTML of ``text`` with ``words`` marked (``_marked``): whole when it has at most ``max_chars`` characters
    (or ``max_chars`` is None), else its first ``max_chars`` (cut at the last whitespace in their second half, where
    there is one) and "…", the whole text behind a click."""
    if max_chars is None or len(text) <= max_chars:
        return _marked(text, words)
    space = max(text.rfind(c, max_chars // 2, max_chars + 1) for c in (" ", "\n", "\t"))
    head = text[: space if space > 0 else max_chars]
    return _expandable(f"{_marked(head, words)} …", _marked(text, words), f"{len(text):,} characters")


def _windowed(text: ShadedText, top: float, max_tokens: int | None) -> tuple[str, bool]:
    """HTML of ``text``'s pieces shaded on the scale ``top`` (``_shaded``, joined without spaces): all of them, or
    (more than ``max_tokens``) the ``max_tokens`` consecutive pieces centred on the one of largest finite |value|
    (the first where there is none), "…" marking what is left out; and whether pieces were left out. The shading's
    scale is the caller's (the whole text's), so a shown piece is as dark as it is in the whole text."""
    count = len(text.pieces)
    if max_tokens is None or count <= max_tokens:
        return _shaded(text, top, ""), False
    size = np.abs(np.asarray(text.values, dtype=np.float64))
    centre = int(np.argmax(np.where(np.isfinite(size), size, -1.0)))
    start = min(max(0, centre - max_tokens // 2), count - max_tokens)
    stop = start + max_tokens
    shown = _shaded(ShadedText(text.pieces[start:stop], text.values[start:stop]), top, "")
    return f"{'… ' if start else ''}{shown}{' …' if stop < count else ''}", True


def _marked(text: str, words: set[str]) -> str:
    """HTML of ``text`` with the words in ``words`` (lower-cased) marked."""
    out, last = [], 0
    for match in _WORD.finditer(text):
        if match.group().lower() in words:
            out.append(html.escape(text[last : match.start()]) + f"<mark>{html.escape(match.group())}</mark>")
            last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def _largest(values: Sequence[float] | np.ndarray) -> float:
    """The largest |value| of the finite ``values`` (0 where there is none): the darkest shade."""
    finite = np.abs(np.asarray(values, dtype=np.float64))
    return float(finite[np.isfinite(finite)].max(initial=0.0))


def _shaded(text: ShadedText, top: float, joiner: str = " ") -> str:
    """Pieces shaded by |value| / top: orange for positive values, blue for negative ones; a value that is not a
    number (NaN, ±inf) is not shaded but outlined in red (its title says which)."""
    spans = []
    for piece, value in zip(text.pieces, text.values, strict=True):
        if not math.isfinite(value):
            style = "outline: 1px dashed #b42318"
        else:
            alpha = 0.0 if top <= 0 else max(0.0, min(1.0, abs(value) / top))
            colour = "220, 80, 40" if value >= 0 else "40, 110, 220"
            style = f"background: rgba({colour}, {0.75 * alpha:.2f})"
        spans.append(f"<span class='tok' style='{style}' title='{value:.3g}'>{html.escape(piece)}</span>")
    return joiner.join(spans)


def token_report(
    scores: TokenScores,
    queries: Sequence[str | ShadedText],
    decode: Callable[[int], str],
    path: str | Path,
    *,
    title: str = "Per-token attribution",
    score_labels: tuple[str, str] | None = None,
    query_names: Sequence[str] | None = None,
    max_tokens: int | None = 200,
) -> Path:
    """Write an HTML page of per-token scores (``per_token.token_scores``); returns its path.

    For every query: its text, then each training sequence with its score and its tokens shaded by
    the share of the score they carry (orange > 0, blue < 0, darkest = the sequence's largest finite share
    in absolute value; a NaN or infinite share is outlined in red, not shaded; hover a token for its value).
    A seq2seq pair shows its source, an arrow, then its target, shaded on one scale.

    Args:
        scores: per-token scores ``[Q, n, T]`` of n training sequences.
        queries: each query's text, or a `ShadedText`.
        decode: the text of one token id (e.g. ``lambda t: tokenizer.decode([t])``).
        path: the ``.html`` file to write (replaced atomically).
        title: the page's heading.
        score_labels: what a positive and a negative score mean (default: the scores' own, their task's
            ``score_labels``).
        query_names: one heading per query (default ``query 0``, ``query 1``, …); other counts are refused.
        max_tokens: the tokens of a training sequence shown (of a seq2seq pair: of each side), centred on its
            token of largest |share| and shaded on the whole sequence's scale, then the whole sequence behind a
            click (a ``<details>`` element); ``None``: every sequence whole.
    """
    _check_bound(max_tokens, "max_tokens")
    score_labels = scores.score_labels if score_labels is None else score_labels
    count = scores.tokens.shape[0]
    if len(queries) != count:
        raise TaskError(f"{len(queries)} query texts were given for the {count} queries of the scores; give one each.")
    names = _names(query_names, count)
    legend = [
        f"score &gt; 0 = {html.escape(score_labels[0])}; score &lt; 0 = {html.escape(score_labels[1])}.",
        "Each token of a training sequence is shaded by the share of the sequence's score carried by its position "
        "(orange &gt; 0, blue &lt; 0; the shares sum to the score; one that is not a number is outlined in red). "
        "Hover a token for its share.",
    ]
    parts = [f"<h1>{html.escape(title)}</h1>", *(f'<p class="legend">{line}</p>' for line in legend)]
    for q in range(count):
        query = queries[q]
        if isinstance(query, ShadedText):
            body = _shaded(query, _largest(query.values))
        else:
            body = html.escape(query)
        rows = []
        for i, (stage, index) in enumerate(scores.where):
            keep = scores.attention_mask[i].astype(bool)
            values = scores.tokens[q, i][keep]
            pieces = ShadedText([decode(int(t)) for t in scores.input_ids[i][keep]], values.tolist())
            sides = [(pieces, values)]
            if scores.target_ids is not None and scores.target_tokens is not None:  # a seq2seq pair: source → target
                said = scores.target_ids[i] != IGNORE_INDEX
                target = scores.target_tokens[q, i][said]
                words = [decode(int(t)) for t in scores.target_ids[i][said]]
                sides.append((ShadedText(words, target.tolist()), target))
            top = max(_largest(v) for _, v in sides)
            arrow = " <span class='arrow'>→</span> "
            shown = [_windowed(side, top, max_tokens) for side, _ in sides]
            text = arrow.join(html_text for html_text, _ in shown)
            if any(cut for _, cut in shown):
                length = sum(len(side.pieces) for side, _ in sides)
                text = _expandable(text, arrow.join(_shaded(side, top, "") for side, _ in sides), f"{length:,} tokens")
            rest = f" ({scores.unplaced[q, i]:+.2e} unplaced)" if scores.unplaced[q, i] else ""
            rows.append(
                f"<tr><td class='score'>{scores.scores[q, i]:+.3e}{rest}</td><td class='where'>"
                f"{html.escape(stage)}[{index}]</td><td>{text}</td></tr>"
            )
        parts.append(
            f"<h2>{html.escape(names[q])}</h2><div class='query'>{body}</div><table>{''.join(rows)}</table>"
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    atomic_write_bytes(path, page.encode("utf-8", "backslashreplace"))  # a lone surrogate as \udXXX
    return Path(path)
