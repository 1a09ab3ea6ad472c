"""The tools' commands (``webtorch demo|lab|guard``): the CLI hands everything after the command
to the tool's own parser, and a tool whose extra is not installed says which extra to install."""

from __future__ import annotations

import sys

import pytest

from webtorch import cli


def test_a_tool_parses_its_own_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lab", "--list"]) == 0
    assert "slow-node" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["guard", "train", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: webtorch guard train")


def test_other_commands_still_refuse_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_missing_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed: find_spec says None
    assert cli.main(["demo", "--max-seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs tqdm" in err and "scripts/setup demo" in err, err
