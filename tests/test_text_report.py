"""The reports of top-k results (HTML and PNG) show each list's rows of its own sign only, escaped."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from source_proj.errors import TaskError
from source_proj.query.attributor import QueryResult, StageRows
from source_proj.query.per_token import TokenScores
from source_proj.query.report import topk_figure
from source_proj.query.text_report import ShadedText, text_report, token_report
from source_proj.tasks.text import LanguageModelingTask, Seq2SeqTask, SequenceClassificationTask

TEXTS = ["the first", "the second", "the third"]


def _one_sided(task: object = None) -> QueryResult:
    """One query over three rows scoring 2, 0 and -1: one row of each sign, one neither; with ``task``, carrying what
    its sign means (as ``Attributor.top_k`` records it)."""
    meaning = {} if task is None else {"positive_helps": task.positive_helps, "score_labels": task.score_labels}
    return QueryResult(
        positive_ids=np.array([[0, 1, 2]]),
        positive_scores=np.array([[2.0, 0.0, -1.0]], dtype=np.float32),
        negative_ids=np.array([[2, 1, 0]]),
        negative_scores=np.array([[-1.0, 0.0, 2.0]], dtype=np.float32),
        rows=[StageRows("main", 0, 3)],
        **meaning,
    )


class _Cells(HTMLParser):
    """The text of every table cell, table by table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.tables[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


class _Headings(HTMLParser):
    """Each list heading's class and text, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[tuple[str | None, str]] = []
        self._css: str | None = None
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h3":
            self._css, self._open = dict(attrs).get("class"), True

    def handle_endtag(self, tag: str) -> None:
        self._open = self._open and tag != "h3"

    def handle_data(self, data: str) -> None:
        if self._open:
            self.headings.append((self._css, data))


@pytest.mark.parametrize(
    ("task", "positive"),
    [
        (SequenceClassificationTask(), "pos"),
        (SequenceClassificationTask(problem_type="regression"), "neg"),
        (LanguageModelingTask(tokens_per_sequence=4), "neg"),
        (Seq2SeqTask(tokens_per_sequence="own"), "neg"),
    ],
)
def test_the_list_of_examples_that_raised_a_loss_is_headed_in_red(tmp_path: Path, task, positive: str) -> None:
    """For a language model a positive score means the example raised the query's loss: its list was headed in the
    helpful green, whatever its label said. Each list is coloured by what its sign means for the task, and the helpful
    one (for a loss: the negative scores) comes first, as ``records()`` and ``source-proj query`` order them."""
    helpful, harmful = task.score_labels if positive == "pos" else task.score_labels[::-1]
    for result, given in (
        (_one_sided(), {"score_labels": task.score_labels, "positive_helps": task.positive_helps}),
        (_one_sided(task), {}),  # the result's own meaning, without a word from the caller
    ):
        page = text_report(result, ["a query"], lambda stage, i: TEXTS[i], tmp_path / "r.html", **given)
        headings, cells = _Headings(), _Cells()
        headings.feed(page.read_text())
        cells.feed(page.read_text())
        assert headings.headings == [("pos", helpful), ("neg", harmful)]
        first = "-1.000e+00" if positive == "neg" else "+2.000e+00"  # a loss's helpful example scores -1
        assert cells.tables[0][0] == first, cells.tables
    helpful = {"score_labels": ("up", "down"), "positive_helps": True}  # the caller's words override the result's
    page = text_report(_one_sided(task), ["a query"], lambda stage, i: TEXTS[i], tmp_path / "r.html", **helpful)
    headings = _Headings()
    headings.feed(page.read_text())
    assert headings.headings == [("pos", "up"), ("neg", "down")]


def test_html_lists_stop_where_the_scores_change_sign(tmp_path: Path) -> None:
    page = text_report(_one_sided(), ["a query"], lambda stage, i: TEXTS[i], tmp_path / "r.html")
    cells = _Cells()
    cells.feed(page.read_text())
    helpful, harmful = cells.tables
    assert helpful == ["+2.000e+00", "main[0]", "the first", "no other training example has a score > 0"]
    assert harmful == ["-1.000e+00", "main[2]", "the third", "no other training example has a score < 0"]


def test_the_figure_shows_only_rows_of_each_lists_sign(tmp_path: Path) -> None:
    drawn: list[int] = []

    def image(row: int) -> np.ndarray:
        drawn.append(row)
        return np.zeros((4, 4))

    path = topk_figure([np.zeros((4, 4))], ["q"], image, str, _one_sided(), tmp_path / "f.png")
    assert path.stat().st_size > 0
    assert drawn == [0, 2]  # row 0 as helpful (score 2), row 2 as harmful (-1); row 1 (0) and the others nowhere


class _Tokens(HTMLParser):
    """(style, text) of every token span."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[tuple[str, str]] = []
        self._style: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "span" and ("class", "tok") in attrs:
            self._style = dict(attrs)["style"] or ""

    def handle_data(self, data: str) -> None:
        if self._style is not None:
            self.tokens.append((self._style, data))
            self._style = None


def _token_page(shares: list[list[float]], path: Path) -> list[tuple[str, str]]:
    """The token spans of a per-token page of one query over sequences of three tokens with these shares."""
    n = len(shares)
    scores = TokenScores(
        rows=np.arange(n),
        where=[("main", i) for i in range(n)],
        input_ids=np.tile(np.arange(3), (n, 1)),
        attention_mask=np.ones((n, 3), dtype=np.int64),
        tokens=np.array([shares], dtype=np.float32),
        unplaced=np.zeros((1, n), dtype=np.float32),
        scores=np.nansum(np.array([shares], dtype=np.float32), axis=-1),
    )
    pieces = ["<script>alert(1)</script>", " & 'x'", "\u0120b"]
    page = token_report(scores, ["q"], lambda t: pieces[t], path)
    parser = _Tokens()
    parser.feed(page.read_text())
    assert [text for _, text in parser.tokens] == pieces * n  # escaped, then read back as the same text
    return [style for style, _ in parser.tokens]


def test_a_token_share_that_is_not_a_number_is_outlined_and_leaves_the_others_shading(tmp_path: Path) -> None:
    styles = _token_page([[float("nan"), 1.0, -0.5], [0.0, 0.0, 0.0]], tmp_path / "t.html")
    assert styles[0] == "outline: 1px dashed #b42318"  # no colour: neither helpful nor harmful
    assert styles[1:3] == ["background: rgba(220, 80, 40, 0.75)", "background: rgba(40, 110, 220, 0.38)"]
    assert styles[3:] == ["background: rgba(220, 80, 40, 0.00)"] * 3  # all zero: unshaded, no division by zero


def test_query_names_not_one_per_query_are_refused(tmp_path: Path) -> None:
    for names in ([], ["a", "b"]):  # one query
        with pytest.raises(TaskError, match=f"{len(names)} query names were given for 1 queries; give one each"):
            text_report(_one_sided(), ["q"], lambda stage, i: TEXTS[i], tmp_path / "r.html", query_names=names)
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("task", "positive_colour"),
    [
        (SequenceClassificationTask(), "green"),
        (SequenceClassificationTask(problem_type="regression"), "red"),
        (LanguageModelingTask(tokens_per_sequence=4), "red"),
        (Seq2SeqTask(tokens_per_sequence="own"), "red"),
    ],
)
def test_the_figure_colours_and_names_each_list_by_what_its_sign_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task, positive_colour: str
) -> None:
    """For a loss or an error a positive score means the example raised it: the figure drew those examples in the
    helpful green under a "most helpful (green, score > 0)" title, whatever the task measured. The helpful list (for
    a loss: the negative scores) comes first, in green, as in ``records()`` and the HTML report."""
    import source_proj.query.report as report

    drawn = []
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: (drawn.append(fig), save(fig, path, dpi))[1])
    topk_figure([np.zeros((4, 4))], ["q"], lambda row: np.zeros((4, 4)), str, _one_sided(), tmp_path / "f.png",
                score_labels=task.score_labels, positive_helps=task.positive_helps)  # fmt: skip
    topk_figure([np.zeros((4, 4))], ["q"], lambda row: np.zeros((4, 4)), str, _one_sided(task), tmp_path / "f.png")
    assert len(drawn) == 2 and drawn[0]._suptitle.get_text() == drawn[1]._suptitle.get_text()  # the result's own
    fig = drawn[1]
    _, first, _, _, second, _, _ = fig.axes
    positive, negative = ("0\n+2.0e+00", "2\n-1.0e+00")
    helpful, harmful = (positive, negative) if positive_colour == "green" else (negative, positive)
    assert first.get_title() == helpful and first.title.get_color() == "green"
    assert second.get_title() == harmful and second.title.get_color() == "red"
    short = [label.split(" (")[0] for label in task.score_labels]
    if positive_colour == "green":
        assert fig._suptitle.get_text() == f"query  |  {short[0]} (green, score > 0)  |  {short[1]} (red, score < 0)"
    else:
        assert fig._suptitle.get_text() == f"query  |  {short[1]} (green, score < 0)  |  {short[0]} (red, score > 0)"


def test_a_sequences_unplaced_part_is_written_with_one_sign(tmp_path: Path) -> None:
    """The unplaced part (a classifier head's) was written "(++1.00e+00 unplaced)", or "(+-…" for a negative one."""
    scores = TokenScores(
        rows=np.arange(2), where=[("main", 0), ("main", 1)], input_ids=np.zeros((2, 1), dtype=np.int64),
        attention_mask=np.ones((2, 1), dtype=np.int64), tokens=np.array([[[2.0], [1.0]]], dtype=np.float32),
        unplaced=np.array([[1.0, -0.5]], dtype=np.float32), scores=np.array([[3.0, 0.5]], dtype=np.float32),
    )  # fmt: skip
    cells = _Cells()
    cells.feed(token_report(scores, ["q"], lambda t: "a", tmp_path / "t.html").read_text())
    assert cells.tables[0][0::3] == ["+3.000e+00 (+1.00e+00 unplaced)", "+5.000e-01 (-5.00e-01 unplaced)"]


def test_the_token_page_words_the_signs_as_the_scores_task_does(tmp_path: Path) -> None:
    """token_report said "score > 0 = helpful" unless told otherwise, also for a language model's scores, where a
    positive score means the sequence raised the query's loss; the scores now carry their task's words."""
    task = LanguageModelingTask(tokens_per_sequence=4)
    scores = TokenScores(
        rows=np.arange(1), where=[("main", 0)], input_ids=np.zeros((1, 1), dtype=np.int64),
        attention_mask=np.ones((1, 1), dtype=np.int64), tokens=np.array([[[2.0]]], dtype=np.float32),
        unplaced=np.zeros((1, 1), dtype=np.float32), scores=np.array([[2.0]], dtype=np.float32),
        score_labels=task.score_labels,
    )  # fmt: skip
    page = token_report(scores, ["q"], lambda t: "a", tmp_path / "t.html").read_text()
    raised, lowered = (label.replace("'", "&#x27;") for label in task.score_labels)
    assert f"score &gt; 0 = {raised}; score &lt; 0 = {lowered}." in page and "helpful" not in page


def test_query_shading_scales_by_the_largest_absolute_value(tmp_path: Path) -> None:
    """The darkest shade was the largest *signed* value: a query of negative values (a score's shares, a log-prob)
    was left unshaded, and one of −4 and 2 shaded −4 as dark as 2."""
    query = ShadedText(["a", "b", "c"], [-4.0, 2.0, 0.0])
    page = text_report(_one_sided(), [query], lambda stage, i: TEXTS[i], tmp_path / "r.html", shading="share")
    parser = _Tokens()
    parser.feed(page.read_text())
    assert [style for style, _ in parser.tokens] == [
        "background: rgba(40, 110, 220, 0.75)", "background: rgba(220, 80, 40, 0.38)",
        "background: rgba(220, 80, 40, 0.00)",
    ]  # fmt: skip
    assert "up to 4;" in page.read_text()


def test_an_empty_list_says_no_training_example_not_no_other(tmp_path: Path) -> None:
    """Every score zero (or one example only): a list with no row said "no other training example has …"."""
    result = QueryResult(np.array([[0, 1]]), np.zeros((1, 2), dtype=np.float32), np.array([[1, 0]]),
                         np.zeros((1, 2), dtype=np.float32), [StageRows("main", 0, 2)])  # fmt: skip
    cells = _Cells()
    cells.feed(text_report(result, ["q"], lambda stage, i: TEXTS[i], tmp_path / "r.html").read_text())
    assert cells.tables == [["no training example has a score > 0"], ["no training example has a score < 0"]]


def test_the_page_escapes_every_text_and_fetches_nothing(tmp_path: Path) -> None:
    """Texts, stage names, headings and labels that hold markup, quotes, non-ASCII or a lone surrogate are shown as
    they are, inject nothing, and the page loads no script, style sheet, font or image from anywhere."""
    evil = "<script>alert('x')</script> \"q\" & é 字 \ud800 " + "long " * 2000
    result = QueryResult(np.array([[0]]), np.array([[1.0]], dtype=np.float32), np.array([[0]]),
                         np.array([[1.0]], dtype=np.float32), [StageRows("<b>stage", 0, 1)])  # fmt: skip
    page = text_report(result, [evil], lambda stage, i: evil, tmp_path / "r.html", title=evil,
                       score_labels=("<i>up", "\"down"), query_names=["<h1>"], max_chars=None).read_text()  # fmt: skip
    evil_written = evil.replace("\ud800", "\\ud800")  # UTF-8 holds no lone surrogate: written as its escape
    cells, headings = _Cells(), _Headings()
    cells.feed(page)
    headings.feed(page)
    assert cells.tables[0][:3] == ["+1.000e+00", "<b>stage[0]", evil_written]
    assert headings.headings == [("pos", "<i>up"), ("neg", "\"down")]
    assert "<script" not in page and "<b>" not in page and "<i>" not in page
    assert not any(word in page.lower() for word in ("http", "src=", "url(", "@import", "<link"))
    # a word longer than its column (a URL, base64, a tokenizer's pieces joined without spaces) wraps inside it
    assert "td, .query { overflow-wrap: anywhere; }" in page


def test_figure_captions_are_shown_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib reads text between two "$" as mathtext: a caption such as "$x^$" stopped the figure with a parse
    error, and "$5 or $6" was drawn as "5 or " in italics."""
    import source_proj.query.report as report

    drawn = []
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path, dpi: (drawn.append(fig), save(fig, path, dpi))[1])
    path = topk_figure([np.zeros((4, 4))], ["q $x^$"], lambda row: np.zeros((4, 4)), lambda row: "$5 or $6",
                       _one_sided(), tmp_path / "f.png", score_labels=("up $", "$down"))  # fmt: skip
    assert path.read_bytes().startswith(b"\x89PNG")
    titles = [text for ax in drawn[0].axes for text in [ax.title] if text.get_text()]
    assert [t.get_text() for t in titles] == ["q $x^$", "$5 or $6\n+2.0e+00", "$5 or $6\n-1.0e+00"]
    assert not any(t.get_parse_math() for t in [*titles, drawn[0]._suptitle])


def test_figure_query_images_and_titles_not_one_per_query_are_refused(tmp_path: Path) -> None:
    """One too few was an IndexError traceback, one too many silently dropped (a caption under the wrong query)."""
    image = np.zeros((4, 4))
    for images, titles in (([image], []), ([image, image], ["q"]), ([image], ["q", "r"])):
        wrong, what = (len(images), "query images") if len(images) != 1 else (len(titles), "query titles")
        with pytest.raises(TaskError, match=f"^{wrong} {what} were given for the 1 queries of the result; give one"):
            topk_figure(images, titles, lambda row: image, str, _one_sided(), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


class _Shown(HTMLParser):
    """Of every table cell: the text a reader sees before expanding anything (outside ``<details>``, or in its
    ``<summary>``), the text behind a click, and the (style, text) of the token spans in each of the two."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, list]] = []
        self._depth = self._summary = 0
        self._style: str | None = None
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "td":
            self.cells.append({"shown": [], "hidden": [], "shown_tokens": [], "hidden_tokens": []})
            self._open = True
        self._depth += tag == "details"
        self._summary += tag == "summary"
        if tag == "span" and ("class", "tok") in attrs:
            self._style = dict(attrs)["style"] or ""

    def handle_endtag(self, tag: str) -> None:
        self._open = self._open and tag != "td"
        self._depth -= tag == "details"
        self._summary -= tag == "summary"

    def handle_data(self, data: str) -> None:
        if not self._open:
            return
        part = "hidden" if self._depth and not self._summary else "shown"
        self.cells[-1][part].append(data)
        if self._style is not None:
            self.cells[-1][f"{part}_tokens"].append((self._style, data))
            self._style = None


def test_a_long_training_text_shows_its_start_and_the_rest_behind_a_click(tmp_path: Path) -> None:
    """A training text of 2,000 words filled the report's column whole: one such example made the page unreadable.
    It shows its first ``max_chars`` characters (cut between words) and "…", the whole text behind a click;
    ``max_chars=None`` shows it whole, and a short text is shown whole either way."""
    long = " ".join(f"word{i}" for i in range(2000))
    texts = [long, "short", long]
    for max_chars, bounded in ((500, True), (None, False)):
        page = text_report(_one_sided(), ["word7 query"], lambda stage, i: texts[i], tmp_path / "r.html",
                           max_chars=max_chars).read_text()  # fmt: skip
        shown = _Shown()
        shown.feed(page)
        cell = shown.cells[2]  # row 0 (score +2): the long text
        visible, hidden = "".join(cell["shown"]), "".join(cell["hidden"])
        if bounded:
            head = visible.split(" …")[0]
            assert long.startswith(head + " ") and 250 <= len(head) <= 500, visible
            assert visible.endswith(f" …show all {len(long):,} characters") and hidden == long
            assert "<mark>word7</mark>" in page  # words shared with the query are marked in both parts
        else:
            assert visible == long and hidden == "" and "<details>" not in page
    with pytest.raises(TaskError, match="max_chars is 0; pass a whole number ≥ 1, or None"):
        text_report(_one_sided(), ["q"], lambda stage, i: texts[i], tmp_path / "r.html", max_chars=0)


def test_a_long_sequence_shows_the_tokens_around_its_largest_share_shaded_as_in_the_whole(tmp_path: Path) -> None:
    """The per-token page printed every token of every sequence: a 2,000-token sequence shows the ``max_tokens``
    around its largest |share| (shaded on the whole sequence's scale, so each shown token is exactly as dark as on
    the full page), "…" either side, the whole sequence behind a click; ``max_tokens=None`` shows it whole."""
    length, peak = 2000, 1500
    shares = np.linspace(-0.2, 0.3, length, dtype=np.float32)
    shares[peak] = -1.0
    scores = TokenScores(rows=np.arange(1), where=[("main", 0)], input_ids=np.arange(length)[None],
                         attention_mask=np.ones((1, length), dtype=np.int64), tokens=shares[None, None],
                         unplaced=np.zeros((1, 1), dtype=np.float32),
                         scores=shares.sum(keepdims=True)[None])  # fmt: skip
    cells = {}
    for max_tokens in (200, None):
        page = token_report(scores, ["q"], lambda t: f"t{t} ", tmp_path / "t.html", max_tokens=max_tokens)
        parsed = _Shown()
        parsed.feed(page.read_text())
        cells[max_tokens] = parsed.cells[2]  # score, stage[index], tokens
    whole = cells[None]["shown_tokens"]
    assert [text for _, text in whole] == [f"t{t} " for t in range(length)] and not cells[None]["hidden"]
    window = cells[200]["shown_tokens"]
    assert window == whole[peak - 100 : peak + 100]  # the same tokens in the same shades as on the whole page
    visible = "".join(cells[200]["shown"])
    assert visible.startswith("… t1400 t1401 ") and visible.endswith("t1599  …show all 2,000 tokens"), visible
    assert cells[200]["hidden_tokens"] == whole  # behind the click: the whole sequence, shaded the same
    with pytest.raises(TaskError, match="max_tokens is True; pass a whole number ≥ 1, or None"):
        token_report(scores, ["q"], str, tmp_path / "t.html", max_tokens=True)
