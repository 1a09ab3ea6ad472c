"""The compiled core: which modules ``scripts/compile`` (in the tree) and ``setup.py`` (in a wheel)
build with mypyc, and whether the builds beside the sources are current.

Every request crosses the HTTP protocol, the router, a codec or the proxy's forwarding, dozens of
Python calls each time. mypyc (part of mypy) compiles these modules, unchanged and as typed as
the rest (``mypy --strict``), to C extensions: their classes become native (attributes in C
structs, methods called through a vtable), which measured 25-40% less CPU per request (see
BENCHMARKS.md). The extensions land next to the sources, where they win on import; the
``.py`` files stay the reference and run as they are when nothing is compiled.

That is also the trap: an edited source behind a stale extension runs the old code. So
``scripts/compile`` writes a stamp with each source's hash, and :func:`stale` compares: the
test suite refuses to run on stale builds and ``webtorch serve`` warns.

Rules the compiled modules keep (mypyc's): a compiled class cannot subclass an interpreted one
(so ``HttpProtocol`` is not an ``asyncio.Protocol`` subclass: the loop only calls its methods),
an interpreted class cannot subclass a compiled one unless it allows it
(``@mypyc_attr(allow_interpreted_subclasses=True)``, as ``Policy`` does), and instances of
compiled classes take no new attributes or method overrides at runtime. A class attribute of a
compiled class is an instance default unless it is ``ClassVar`` or ``Final`` (so HTTP errors,
whose ``status`` is per class, live in the interpreted ``errors.py``); module constants are
``Final`` (C statics, not dict lookups), except tuples of constants, which mypyc 2.4 leaves
unset; and a value from an untyped library gets a declared type saying what it may be
(``bytes | None``), because compiled code checks declared types when it assigns. And a class
built per request is a written-out class, not a dataclass: compiled, a dataclass keeps the
``__init__`` the dataclasses module generates, which is interpreted bytecode (0.6 us for a
``Request``); dataclasses stay fine for what is built once (``Limits``, ``Route``). On the hot
path: methods of non-native objects are looked up by name on each call (bind the per-request
ones once), bytes ``%`` formatting with ``%s``/``%d`` compiles into one allocation (``+`` chains
and ``%x`` do not), and ``b"?" in data`` tries its needle as an int first (use ``ord("?")``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from importlib import machinery
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SRC = PACKAGE.parent
STAMP = PACKAGE / "compiled.json"

# The request path, from the bytes on the socket to the model and back, and the proxy's. Paths
# are relative to src/. Not here: anything that runs once per process or per second (config,
# CLI, health probes' scheduling) and the guard's detector and tables (numpy does its work).
MODULES = [
    "webtorch/vocab.py",
    "webtorch/http/protocol.py",
    "webtorch/http/connection.py",
    "webtorch/http/flow.py",
    "webtorch/http/delivery.py",
    "webtorch/http/streams.py",
    "webtorch/http/serialise.py",
    "webtorch/http/state.py",
    "webtorch/http/target.py",
    "webtorch/http/messages.py",
    "webtorch/http/client/connection.py",
    "webtorch/http/client/pool.py",
    "webtorch/http/client/fetch.py",
    "webtorch/http/router.py",
    "webtorch/http/limits.py",
    "webtorch/http/authority.py",
    "webtorch/proxy/forward.py",
    "webtorch/proxy/headers.py",
    "webtorch/proxy/retry.py",
    "webtorch/proxy/upstream.py",
    "webtorch/proxy/health.py",
    "webtorch/balance/base.py",
    "webtorch/balance/classic.py",
    "webtorch/metrics.py",
    "webtorch/serve/wire/tensors.py",
    "webtorch/serve/wire/short.py",
    "webtorch/serve/wire/oip_json.py",
    "webtorch/serve/wire/oip_binary.py",
    "webtorch/serve/batcher.py",
    "webtorch/serve/scheduler.py",
    "webtorch/serve/executor.py",
    "webtorch/serve/endpoint.py",
    "webtorch/serve/oip.py",
    "webtorch/train/trainer.py",
    "webtorch/train/batch.py",
    "webtorch/train/fastpath.py",
    "webtorch/train/pipeline.py",
    "webtorch/train/wal.py",
    "webtorch/train/forms.py",
    # With [[plugins]] or [guard] (the first plugin), every request crosses the plugins' runner
    # and a context; their streamed bodies (bodies.py) and loading stay interpreted.
    "webtorch/plugins/later.py",
    "webtorch/plugins/context.py",
    "webtorch/plugins/table.py",
    "webtorch/plugins/calls.py",
    "webtorch/plugins/runner.py",
    "webtorch/guard/shell.py",
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension(module: str) -> Path | None:
    """The built extension of ``module`` (a path relative to src/), if there is one."""
    base = SRC / module
    for suffix in machinery.EXTENSION_SUFFIXES:
        candidate = base.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def built() -> list[str]:
    """The modules that have an extension in the tree (whatever its age)."""
    return [m for m in MODULES if extension(m) is not None]


def stale(modules: list[str] | None = None) -> list[str]:
    """Of ``modules`` (default: those built), those whose extension does not match the source
    beside it (edited since the build, or built by another module list): importing them would
    run something else than the source."""
    try:
        stamp: dict[str, str] = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        stamp = {}
    checked = built() if modules is None else modules
    return [m for m in checked if stamp.get(m) != _digest(SRC / m)]


def current() -> bool:
    """Every module in MODULES is compiled from its present source."""
    have = built()
    return len(have) == len(MODULES) and not stale(have)


def stamp_text() -> str:
    """The stamp of the sources as they are now (setup.py puts it in a compiled wheel)."""
    return json.dumps({m: _digest(SRC / m) for m in MODULES}, indent=1) + "\n"


def write_stamp() -> None:
    STAMP.write_text(stamp_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The compiled core's module list and state.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="print the modules, one per line")
    action.add_argument(
        "--current", action="store_true", help="exit 0 if all are built and current"
    )
    action.add_argument("--stamp", action="store_true", help="record the sources just compiled")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(MODULES))
        return 0
    if args.stamp:
        write_stamp()
        return 0
    return 0 if current() else 1


if __name__ == "__main__":
    sys.exit(main())
