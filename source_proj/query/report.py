"""Pictures of results: a grid of each query with its most helpful and most harmful examples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from source_proj.figures import pyplot, save_figure
from source_proj.query.attributor import QueryResult


def topk_figure(
    query_images: Sequence[np.ndarray],
    query_titles: Sequence[str],
    train_image: Callable[[int], np.ndarray],
    train_title: Callable[[int], str],
    result: QueryResult,
    path: str | Path,
) -> Path:
    """Save a PNG: one row per query — the query, then its top-k helpful (green) and harmful (red); a list
    stops where the scores change sign (its remaining cells are left empty).

    Args:
        query_images: one 2-D (or H×W×3) image per query.
        query_titles: one caption per query.
        train_image: the image of a feature row id of the result.
        train_title: the caption of a feature row id of the result.
        result: the top-k result (row ids and scores).
        path: where the PNG goes.
    """
    plt = pyplot()

    queries, k = result.helpful_ids.shape
    fig, axes = plt.subplots(queries, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.5 * queries), squeeze=False)
    for q in range(queries):
        cells: list[tuple[np.ndarray, str, str] | None] = [(query_images[q], query_titles[q], "black")]
        for sign, colour, ids, scores in (
            (1.0, "green", result.helpful_ids[q], result.helpful_scores[q]),
            (-1.0, "red", result.harmful_ids[q], result.harmful_scores[q]),
        ):  # a list stops where the scores change sign (QueryResult.short_lists): the rest of its cells stay empty
            cells += [(train_image(int(i)), f"{train_title(int(i))}\n{s:+.1e}", colour) if sign * s > 0 else None
                      for i, s in zip(ids, scores, strict=True)]  # fmt: skip
        for ax, cell in zip(axes[q], cells, strict=True):
            if cell is None:
                ax.axis("off")
                continue
            image, title, colour = cell
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("query  |  most helpful (green, score > 0)  |  most harmful (red, score < 0)", fontsize=9)
    return save_figure(fig, path, dpi=110)
