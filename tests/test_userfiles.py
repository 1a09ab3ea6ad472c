"""The loader of users' Python files (model files, pipeline files, plugins) names the file and
the line where it failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from webtorch.userfiles import UserFileError, import_user_file


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("x = 1\ndef broken(:\n", 2),  # a syntax error
        ("x = 1\n\ndef f():\n    raise RuntimeError('boom')\n\nf()\n", 4),  # raised in the file
        ("import json\njson.loads('{')\n", 2),  # raised below the file: its own last line counts
    ],
)
def test_an_error_names_the_file_and_line(tmp_path: Path, source: str, line: int) -> None:
    path = tmp_path / "user.py"
    path.write_text(source)
    with pytest.raises(UserFileError, match=rf"^plugin {path}:{line} failed to import: ") as info:
        import_user_file(path, "plugin")
    assert info.value.__cause__ is not None


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserFileError, match=r"^model file .*nope\.py does not exist$"):
        import_user_file(tmp_path / "nope.py", "model file")


def test_two_files_of_one_name_are_two_modules(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "same.py").write_text(f"NAME = {name!r}\n")
    first = import_user_file(tmp_path / "a" / "same.py", "model file")
    second = import_user_file(tmp_path / "b" / "same.py", "model file")
    assert (first.NAME, second.NAME) == ("a", "b")
