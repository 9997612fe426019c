"""Pictures of results: a grid of each query with its training examples of the largest positive and the most negative
scores, coloured by what the sign means for the task (helpful green, harmful red)."""

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
    """Save a PNG: one row per query — the query, then its k largest positive scores and its k most negative; a
    list stops where the scores change sign (its remaining cells are left empty). The list of the examples that
    helped the query is drawn in green, the other in red.

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
            score means the example raised it, and the positive list is drawn in red.
    """
    plt = pyplot()
    score_labels = result.score_labels if score_labels is None else score_labels
    positive_helps = result.positive_helps if positive_helps is None else positive_helps
    queries, k = result.positive_ids.shape
    for given, what in ((query_images, "query images"), (query_titles, "query titles")):
        if len(given) != queries:
            raise TaskError(f"{len(given)} {what} were given for the {queries} queries of the result; give one each.")
    colours = ("green", "red") if positive_helps else ("red", "green")
    fig, axes = plt.subplots(queries, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.5 * queries), squeeze=False)
    for q in range(queries):
        cells: list[tuple[np.ndarray, str, str] | None] = [(query_images[q], query_titles[q], "black")]
        for sign, colour, ids, scores in (
            (1.0, colours[0], result.positive_ids[q], result.positive_scores[q]),
            (-1.0, colours[1], result.negative_ids[q], result.negative_scores[q]),
        ):  # a list stops where the scores change sign (QueryResult.short_lists): the rest of its cells stay empty
            cells += [(train_image(int(i)), f"{train_title(int(i))}\n{s:+.1e}", colour) if sign * s > 0 else None
                      for i, s in zip(ids, scores, strict=True)]  # fmt: skip
        for ax, cell in zip(axes[q], cells, strict=True):
            if cell is None:
                ax.axis("off")
                continue
            image, title, colour = cell
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
            ax.set_title(title, fontsize=7, color=colour, parse_math=False)  # a "$" in a caption is a dollar
            ax.set_xticks([])
            ax.set_yticks([])
    short = [label.split(" (")[0] for label in score_labels]
    heading = f"query  |  {short[0]} ({colours[0]}, score > 0)  |  {short[1]} ({colours[1]}, score < 0)"
    fig.suptitle(heading, fontsize=9, parse_math=False)
    return save_figure(fig, path, dpi=110)
