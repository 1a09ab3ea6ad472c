"""Builds WebTorch's wheel with the request path compiled by mypyc, as mypy and black ship theirs.

Everything else about the package is in pyproject.toml; this file only adds the extensions: the
modules src/webtorch/compiled.py lists (MODULES), compiled with ``mypyc.build.mypycify`` from the
same typed sources. The wheel carries the ``.py`` sources beside the extensions (which win on
import) and ``webtorch/compiled.json``, the stamp of what they were built from, so that
``python -m webtorch.compiled --current`` and ``webtorch serve``'s stale check hold there too.

The build never fails for want of a compiler: the request path is the same code uncompiled, only
slower. It builds a pure-Python wheel (py3-none-any) when

- ``WEBTORCH_COMPILE=0`` is set (to force it),
- mypyc is not importable (a build without isolation in an environment without mypy),
- no C compiler can build a Python extension here (probed with a one-line extension first),
- or mypyc or the C compiler fails on the real sources (then after that failure).

Development does not go through here: ``scripts/setup`` installs editable and ``scripts/compile``
builds the same extensions in place, beside the sources in src/.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"


def _say(message: str) -> None:
    # stderr: pip shows a build's stderr with -v, and a fallback should be visible there.
    print(f"webtorch setup.py: {message}", file=sys.stderr, flush=True)


def _compiled_module() -> Any:
    """src/webtorch/compiled.py, loaded by path: importing the package would run its __init__ in
    an environment that may lack its dependencies (an isolated build has only the build's)."""
    path = SRC / "webtorch" / "compiled.py"
    spec = importlib.util.spec_from_file_location("_webtorch_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _can_build_extension() -> bool:
    """Whether the configured C compiler builds a one-line extension against Python.h: no
    compiler, or no Python headers, is found here in a fraction of a second rather than after
    mypyc's minutes of type checking and code generation."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text("#include <Python.h>\nint webtorch_probe(void) { return 0; }\n")
        try:
            compiler = new_compiler()
            customize_compiler(compiler)
            compiler.compile(
                [str(source)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except Exception as exc:  # CompileError, DistutilsExecError, a missing program...
            _say(f"no working C compiler ({type(exc).__name__}: {exc})")
            return False
    return True


# mypy's checks that only matter to a human reading its report, off for the build: an isolated
# build environment has the build's requirements but not the package's own (torch, numpy,
# pydantic...), whose names then type as Any. `mypy --strict` over the full environment (scripts/
# test) is where the code is checked; here mypy only has to give mypyc the types. With every
# dependency installed these change nothing in what is compiled.
MYPYC_FLAGS = [
    "--config-file=pyproject.toml",
    "--ignore-missing-imports",
    "--no-warn-unused-ignores",
    "--no-warn-return-any",
    "--no-warn-redundant-casts",
    "--allow-subclassing-any",
    "--allow-untyped-decorators",
]


# The commands that build the extensions. Not the metadata ones (egg_info, dist_info: pip asks
# for those before the build, and mypyc's type check would double the build's time), nor the
# editable install's (editable_wheel: scripts/setup, whose scripts/compile builds in place).
BUILDS = {"build", "build_ext", "bdist_wheel", "bdist", "install"}


def _extensions() -> list[Extension]:
    if not BUILDS & set(sys.argv[1:]):
        return []
    if os.environ.get("WEBTORCH_COMPILE", "1") == "0":
        _say("WEBTORCH_COMPILE=0: building the pure-Python wheel")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc (part of mypy) is not installed: building the pure-Python wheel")
        return []
    if not _can_build_extension():
        _say("building the pure-Python wheel: the request path runs uncompiled, only slower")
        return []
    # Relative to the project root, where setuptools runs this file: mypy reads pyproject.toml
    # from here and names the modules by their paths under src/ (webtorch.http.protocol...).
    modules = [f"src/{m}" for m in _compiled_module().MODULES]
    _say(f"compiling {len(modules)} modules with mypyc (minutes)")
    try:
        return list(mypycify([*MYPYC_FLAGS, *modules], opt_level="3", debug_level="1"))
    except (Exception, SystemExit) as exc:  # mypy reports its errors by exiting
        _say(f"mypyc failed ({type(exc).__name__}: {exc}): building the pure-Python wheel")
        return []


def _drop_compiled(build_lib: str) -> None:
    """Removes extensions and the stamp from build_lib: an in-tree build (pip without isolation)
    reuses build/, and a pure wheel must not pick up the last compiled build's leftovers."""
    lib = Path(build_lib)
    for pattern in ("*.so", "*.pyd"):
        for path in lib.rglob(pattern):
            path.unlink()
    (lib / "webtorch" / "compiled.json").unlink(missing_ok=True)


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        _drop_compiled(self.build_lib)  # build_ext runs after build_py and adds this build's


class BuildExt(build_ext):
    """Compiles the extensions, or leaves the wheel pure when the compiler fails on them."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, DistutilsExecError...
            _say(f"compiling the extensions failed ({exc}): building the pure-Python wheel")
            self.extensions = []
            self.distribution.ext_modules = []
            _drop_compiled(self.build_lib)
            return
        # The stamp of the sources the extensions were built from (webtorch/compiled.py).
        compiled = _compiled_module()
        stamp = Path(self.build_lib) / "webtorch" / "compiled.json"
        stamp.write_text(compiled.stamp_text())
        _say(f"compiled {len(compiled.MODULES)} modules with mypyc")


class BdistWheel(bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        # Decided before the build ran: a build whose compiler failed is pure after all.
        if not self.distribution.has_ext_modules():
            self.root_is_pure = True
        return super().get_tag()


if __name__ == "__main__":
    setup(
        ext_modules=_extensions(),
        cmdclass={"build_py": BuildPy, "build_ext": BuildExt, "bdist_wheel": BdistWheel},
    )
