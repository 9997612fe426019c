"""Pictures of results: a grid of each query with the training examples that helped it most, then those that harmed it
most, coloured by what the sign means for the task (helpful green, harmful red)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from source_proj.errors import TaskError
from source_proj.figures import pyplot, save_figure
from source_proj.query.attributor import QueryResult


def topk_figure(
    query_images: Sequence[np.ndarray],
    query_titles: Sequence[str],
    train_image: Callable[[int], np.ndarray],
    train_title: Callable[[int], str],
    result: QueryResult,
    path: str | Path,
    *,
    score_labels: tuple[str, str] | None = None,
    positive_helps: bool | None = None,
) -> Path:
    """Save a PNG: one row per query — the query, then the k examples that helped it most, drawn in green, then the
    k that harmed it most, in red (for a margin the largest scores, then the most negative; for a loss or an error
    the other way round); a list stops where the scores change sign (its remaining cells are left empty).

    Args:
        query_images: one 2-D (or H×W×3) image per query.
        query_titles: one caption per query (shown as it is: a ``$`` starts no mathtext).
        train_image: the image of a feature row id of the result.
        train_title: the caption of a feature row id of the result (shown as it is).
        result: the top-k result (``[Q, k]`` row ids and scores; score = −Δf, docs/concepts/scores.md).
        path: where the PNG goes.
        score_labels: what a positive and a negative score mean for the task's measurement (default: the result's
            own, its task's ``score_labels``; the figure's title shows each up to its first " (").
        positive_helps: whether a positive score means the example helped the query (default: the result's own,
            its task's ``positive_helps``): ``False`` for a measurement that is a loss or an error, where a positive
            score means the example raised it, and the positive list is drawn second, in red.
    """
    plt = pyplot()
    score_labels = result.score_labels if score_labels is None else score_labels
    positive_helps = result.positive_helps if positive_helps is None else positive_helps
    queries, k = result.positive_ids.shape
    for given, what in ((query_images, "query images"), (query_titles, "query titles")):
        if len(given) != queries:
            raise TaskError(f"{len(given)} {what} were given for the {queries} queries of the result; give one each.")
    short = [label.split(" (")[0] for label in score_labels]
    by_sign = [(short[0], ">", 1.0, result.positive_ids, result.positive_scores),
               (short[1], "<", -1.0, result.negative_ids, result.negative_scores)]  # fmt: skip
    lists = by_sign if positive_helps else by_sign[::-1]  # the helpful list first, in green
    fig, axes = plt.subplots(queries, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.5 * queries), squeeze=False)
    for q in range(queries):
        cells: list[tuple[np.ndarray, str, str] | None] = [(query_images[q], query_titles[q], "black")]
        for colour, (_, _, sign, ids, scores) in zip(("green", "red"), lists, strict=True):
            # a list stops where the scores change sign (QueryResult.short_lists): the rest of its cells stay empty
            cells += [(train_image(int(i)), f"{train_title(int(i))}\n{s:+.1e}", colour) if sign * s > 0 else None
                      for i, s in zip(ids[q], scores[q], strict=True)]  # fmt: skip
        for ax, cell in zip(axes[q], cells, strict=True):
            if cell is None:
                ax.axis("off")
                continue
            image, title, colour = cell
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
            ax.set_title(title, fontsize=7, color=colour, parse_math=False)  # a "$" in a caption is a dollar
            ax.set_xticks([])
            ax.set_yticks([])
    (helpful, helpful_sign, *_), (harmful, harmful_sign, *_) = lists
    heading = f"query  |  {helpful} (green, score {helpful_sign} 0)  |  {harmful} (red, score {harmful_sign} 0)"
    fig.suptitle(heading, fontsize=9, parse_math=False)
    return save_figure(fig, path, dpi=110)
