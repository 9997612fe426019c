"""An option whose value the library refuses is named as the user typed it (``--subsets``), never by the Python
field it sets (``LDSArguments.num_subsets``), and is refused before any work: every store, run and spec path here
is missing, so a command that read one first would say so instead."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

import source_proj as sp
import source_proj.evaluation as ev
from source_proj.cli.main import _OPTIONS, main

FEATURIZE = ["featurize", "--ckpts", "/missing/run", "--spec", "/missing/spec.py", "--out", "/missing/new.sp"]
WHOLE = "pass a whole number ≥ {}."
STEPS = "pass a non-empty tuple of whole numbers ≥ 0."


@pytest.mark.parametrize(
    ("args", "expected", "field"),
    [
        ([*FEATURIZE, "--module-dim", "fc=0"], "--module-dim 'fc' is 0; " + WHOLE.format(1), "module_dims"),
        ([*FEATURIZE, "--checkpoints", "-1"], "--checkpoints is (-1,); " + STEPS, "checkpoint_steps"),
        ([*FEATURIZE, "--segments", "0"], "--segments is 0; " + WHOLE.format(1), "per_stage"),
        ([*FEATURIZE, "--segments", "at:-5"], "--segments is (-5,); " + STEPS, "boundaries"),
        ([*FEATURIZE, "--shard-chunks", "0"], "--shard-chunks is 0; " + WHOLE.format(1), "shard_chunks"),
        ([*FEATURIZE, "--basis-checkpoints", "2", "--projection", "rademacher"],
         "--basis-checkpoints sets the eigen projection's basis; --projection rademacher has none, so drop it (or "
         "use --projection eigen).", None),
        ([*FEATURIZE, "--module-dim", "fc=8"], "--module-dim sets the 'factored' projection's per-layer blocks; "
         "--projection eigen shares k between the layers itself, so drop it (or use --projection factored).",
         "module_dims"),
        ([*FEATURIZE, "--adam-rank", "2", "--projection", "rademacher"], "--adam-rank sets the rank of the per-layer "
         "projections' Adam scaling; --projection rademacher has no layers (the dense one scales exactly), so drop "
         "it (or use --projection eigen).", "kind="),
        (["fit", "/missing/s.sp", "--fast", "--average", "checkpoints"],
         "--average is 'checkpoints', which Fast-SOURCE does not take: featurize computed its features at each "
         "segment's step-averaged parameters; drop it, or fit SOURCE (without --fast).", "fast="),
        (["fit", "/missing/s.sp", "--segments", "-2"], "--segments is -2; " + WHOLE.format(1), "per_stage"),
        (["fit", "/missing/s.sp", "--segments", "at:"], "--segments is (); " + STEPS, "boundaries"),
        (["fit", "/missing/s.sp", "--boundaries", "-1"], "--boundaries is (-1,); " + STEPS, None),
        (["fit", "/missing/s.sp", "--damping-factor", "nan"], "--damping-factor is nan; pass a finite number ≥ 0.",
         None),
        (["trajectory", "/missing/s.sp", "--segments", "0"], "--segments is 0; " + WHOLE.format(1), "per_stage"),
        (["baseline", "/missing/s.sp", "--kind", "trak,datamodels"],  # before trak is fitted
         "--kind is 'datamodels'; use one of trak, if, tracin, grad-dot, grad-cos, repsim.", None),
        (["baseline", "/missing/s.sp", "--kind", "if", "--damping-factor", "inf"],
         "--damping-factor is inf; pass a finite number ≥ 0.", None),
        (["lds", "/missing/s.sp", "--alpha", "0.5,1.5"], "--alpha is 1.5; pass a number in (0, 1).", None),
        (["compare", "/missing/s.sp", "--alpha", "0"], "--alpha is 0.0; pass a number in (0, 1).", None),
    ],
)  # fmt: skip
def test_a_value_the_arguments_refuse_is_named_by_its_option(
    args: list[str], expected: str, field: str | None
) -> None:
    """``field``: the Python name of the field where it is not the option's (``--checkpoints``: checkpoint_steps)."""
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2, out.output  # a usage error, as click's own range checks are
    assert "Traceback" not in out.output and "failed unexpectedly" not in out.output, out.output
    assert out.output.splitlines()[-1] == f"Error: {expected}"
    assert "Arguments" not in out.output and (field is None or field not in out.output)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        ([*FEATURIZE, "--segments", "x"], "--segments"),
        (["fit", "/missing/s.sp", "--segments", "auto:0"], "--segments"),
        (["trajectory", "/missing/s.sp", "--segments", "at:a"], "--segments"),
        (["baseline", "/missing/s.sp", "--kind", ""], "--kind"),  # fitted nothing and said nothing
        (["baseline", "/missing/s.sp", "--kind", "trak", "--stages", ","], "--stages"),
        (["fit", "/missing/s.sp", "--stages", ""], "--stages"),  # attributed every stage
        (["query", "/missing/s.sp", "--search-devices", ","], "--search-devices"),  # searched on --device
        (["compare", "/missing/s.sp", "--methods", ","], "--methods"),  # compared every fitted method
    ],
)
def test_an_unreadable_value_is_refused_as_the_options(args: list[str], option: str) -> None:
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2, out.output
    assert out.output.splitlines()[-1].startswith(f"Error: Invalid value for {option}: "), out.output


def test_a_shard_featurize_cannot_read_is_refused_before_any_work() -> None:
    out = CliRunner().invoke(main, [*FEATURIZE, "--shard", "x"])
    assert out.exit_code == 1, out.output  # the sentence names the option already
    assert out.output.splitlines()[-1] == "Error: --shard takes i/n (e.g. 0/4) or slurm, not 'x'."


def test_every_renamed_field_is_a_field_set_by_an_option_of_that_name() -> None:
    """The table of fields set from an option of another name stays true to both: the field exists, and so does the
    option (a field mapped to ``None`` is one an option of its name does not set)."""
    options = {opt for command in main.commands.values() for p in command.params if isinstance(p, click.Option)
               for opt in p.opts}  # fmt: skip
    for field, option in _OPTIONS.items():
        owner, name = field.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(sp, owner, None) or getattr(ev, owner))}, field
        assert option is None or option in options, (field, option)


def test_python_keeps_the_field_name_the_command_line_replaces() -> None:
    with pytest.raises(sp.TrajectoryError) as err:
        sp.SegmentationArguments(per_stage=0)
    assert str(err.value) == "SegmentationArguments.per_stage is 0; " + WHOLE.format(1)
    assert err.value.subject == "SegmentationArguments.per_stage"


def test_a_number_option_given_a_word_says_it_is_not_a_number() -> None:
    """Every numeric option of every command, given a word: click's ranges said "'abc' is not a valid integer range"
    (of ``--dim abc``), as if a range were asked for."""
    said = []
    for name, command in main.commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            if isinstance(param.type, click.IntRange | click.FloatRange):
                required = [*FEATURIZE[1:]] if name == "featurize" else ["/missing/s.sp"]
                out = CliRunner().invoke(main, [name, *required, param.opts[0], "abc"])
                assert out.exit_code == 2, out.output
                said.append(out.output.splitlines()[-1])
    kinds = {line.rsplit("'abc' is not a valid ", 1)[-1] for line in said}
    assert len(said) >= 18 and kinds == {"integer.", "float."}, said
