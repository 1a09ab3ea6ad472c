"""The wheel: what ``pip install .`` and ``python -m build`` make (setup.py, pyproject.toml).

Each test builds a wheel from a copy of the sources with the environment's own setuptools and
mypy (``--no-build-isolation --no-index``: nothing is downloaded), installs it into a fresh venv
that sees this one's packages (torch...) but not its editable WebTorch, and serves the embedded
XOR default from there. The pure-Python wheel takes seconds; the compiled one minutes (mypyc),
so it runs only from ``scripts/check-wheel``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from webtorch import compiled
from webtorch_harness.process import LISTEN

ROOT = Path(__file__).resolve().parent.parent
# What a build reads: pyproject.toml names README.md as the long description.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "src")
# The tree's own build outputs: never sources of the wheel (the .so files and compiled.json that
# scripts/compile leaves beside the sources are copied on purpose: they must not leak into it).
_NOT_SOURCES = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")

COMPILED_WHEEL = os.environ.get("WEBTORCH_TEST_COMPILED_WHEEL") == "1"


def _env(**extra: str) -> dict[str, str]:
    # No PYTHONPATH: the installed package must be the one that runs, not src/.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WEBTORCH_COMPILE")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _setup_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webtorch_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def build_wheel(tmp_path: Path, timeout: float, **env: str) -> tuple[Path, str]:
    """A wheel built from a copy of the sources with ``env`` added; its path and the build log."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=_NOT_SOURCES)
        else:
            shutil.copy2(source, tree / name)
    # Leftovers of an earlier compiled in-tree build (pip builds in the tree's build/).
    stale = tree / "build" / "lib" / "webtorch"
    (stale / "http").mkdir(parents=True)
    (stale / "http" / f"protocol{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"old")
    (stale / "compiled.json").write_text("{}")
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(tree), "-w", str(out), "-v"]
    cmd += ["--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir"]
    done = subprocess.run(
        cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    (wheel,) = out.glob("webtorch-*.whl")
    return wheel, log


def package_data() -> set[str]:
    """The files beside the code that the installed package needs, as wheel paths: every file
    under src/webtorch and src/webtorch_lab that is not Python source or a build output."""
    found = set()
    for package in ("webtorch", "webtorch_lab"):
        for path in (ROOT / "src" / package).rglob("*"):
            relative = path.relative_to(ROOT / "src")
            if path.is_dir() or "__pycache__" in relative.parts:
                continue
            if (
                path.suffix in (".py", ".so", ".pyd")
                or relative.as_posix() == "webtorch/compiled.json"
            ):
                continue
            found.add(relative.as_posix())
    return found


@contextmanager
def installed(wheel: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh venv with ``wheel`` installed: its python. This environment's site-packages come
    after its own (a .pth line: they give torch & co., not their .pth files, so not the editable
    WebTorch)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "site-packages" / "shared-deps.pth").write_text("\n".join(sorted(paths)) + "\n")
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel)]
    cmd += ["--no-deps", "--no-index", "--no-cache-dir"]
    subprocess.run(cmd, check=True, env=_env(), timeout=120)
    yield python


def compiled_state(python: Path, cwd: Path) -> dict[str, object]:
    """What the installed webtorch.compiled says, and where the package and the protocol live."""
    code = (
        "import json, webtorch, webtorch.compiled as c, webtorch.http.protocol as p;"
        "print(json.dumps({'package': webtorch.__file__, 'protocol': p.__file__,"
        " 'built': c.built(), 'stale': c.stale(), 'current': c.current()}))"
    )
    done = subprocess.run(
        [str(python), "-c", code], env=_env(), capture_output=True, text=True, cwd=cwd, check=True
    )
    state: dict[str, object] = json.loads(done.stdout)
    return state


def serves_xor(python: Path, cwd: Path) -> None:
    """``webtorch serve`` (the installed console script) serves the embedded default: a predict
    answers, and so does the dashboard (package data)."""
    webtorch = python.parent / "webtorch"
    cmd = [str(webtorch), "serve", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=cwd
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            match = LISTEN.search(line.decode(errors="replace"))
            if match:
                break
        else:
            raise AssertionError(f"server exited before listening: {b''.join(lines).decode()}")
        url = f"http://127.0.0.1:{int(match.group(3))}"
        request = urllib.request.Request(
            f"{url}/models/xor/predict", data=b'{"inputs": [[0, 1], [1, 1]]}', method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            outputs = json.loads(response.read())["outputs"]
        assert len(outputs) == 2 and all(len(row) == 1 for row in outputs)
        with urllib.request.urlopen(f"{url}/dashboard", timeout=30) as response:
            assert b"uPlot" in response.read()
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    output = (b"".join(lines) + rest).decode()
    assert proc.returncode == 0, output
    assert "compiled modules older" not in output, output


def check_contents(wheel: Path, *, compiled_core: bool) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = package_data() - names
    assert not missing, f"package data missing from the wheel: {sorted(missing)}"
    assert set(compiled.MODULES) <= names  # sources ship either way
    extensions = {n for n in names if n.endswith((".so", ".pyd"))}
    if compiled_core:
        for module in compiled.MODULES:
            stem = module.removesuffix(".py")
            assert any(n.startswith(stem + ".") for n in extensions), module
        assert "webtorch/compiled.json" in names
    else:
        assert extensions == set()
        assert "webtorch/compiled.json" not in names
        assert wheel.name.endswith("-py3-none-any.whl")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"WEBTORCH_COMPILE": "0"}, "WEBTORCH_COMPILE=0"),
        # No compiler: the build goes on, pure, instead of failing.
        ({"CC": "/nonexistent/cc"}, "no working C compiler"),
    ],
    ids=["forced", "no-compiler"],
)
def test_pure_wheel_ships_package_data_and_serves(
    env: dict[str, str], reason: str, tmp_path: Path
) -> None:
    wheel, log = build_wheel(tmp_path, timeout=240, **env)
    assert reason in log, log[-3000:]
    check_contents(wheel, compiled_core=False)
    with installed(wheel, tmp_path) as python:
        state = compiled_state(python, tmp_path)
        assert str(state["package"]).startswith(str(tmp_path / "venv")), state
        assert state["built"] == [] and state["stale"] == [], state
        assert str(state["protocol"]).endswith(".py")
        serves_xor(python, tmp_path)


def test_isolated_build_type_checks_without_the_dependencies(tmp_path: Path) -> None:
    """An isolated build (plain ``pip install .``) has setuptools and mypy but not torch, numpy,
    pydantic...: mypyc's type check, with setup.py's flags, must pass there too, or the wheel
    would come out pure. A bare venv stands in for that environment."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    modules = [f"src/{m}" for m in compiled.MODULES]
    cmd = [sys.executable, "-m", "mypy", "--python-executable", str(bare / "bin" / "python")]
    cmd += ["--cache-dir", str(tmp_path / "cache"), *_setup_module().MYPYC_FLAGS, *modules]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=240)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    not COMPILED_WHEEL, reason="compiles with mypyc (minutes): scripts/check-wheel runs it"
)
def test_compiled_wheel_ships_extensions_and_serves(tmp_path: Path) -> None:
    wheel, log = build_wheel(tmp_path, timeout=1200)
    assert f"compiled {len(compiled.MODULES)} modules with mypyc" in log, log[-5000:]
    assert not wheel.name.endswith("-none-any.whl")
    check_contents(wheel, compiled_core=True)
    with installed(wheel, tmp_path) as python:
        state = compiled_state(python, tmp_path)
        assert str(state["package"]).startswith(str(tmp_path / "venv")), state
        assert state["current"] is True and state["stale"] == [], state
        assert len(state["built"]) == len(compiled.MODULES)  # type: ignore[arg-type]
        assert str(state["protocol"]).endswith(sysconfig.get_config_var("EXT_SUFFIX"))
        serves_xor(python, tmp_path)
