"""``webtorch serve [CONFIG]``, ``webtorch check CONFIG``, and the tools: ``webtorch demo``,
``webtorch lab``, ``webtorch guard``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple

from webtorch import __version__, compiled, config
from webtorch.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from webtorch.http.server import HttpServer


class Tool(NamedTuple):
    module: str  # defines add_arguments(parser), run(args) -> int, and its help as __doc__
    extra: str  # the pyproject extra holding its dependencies ("" for none beyond the core)
    needs: tuple[str, ...]  # what that extra brings, checked before the tool starts
    help: str


# The tools live in packages of their own beside the runtime package (ARCHITECTURE.md): they are
# named here and imported only when their command runs, so `webtorch serve` loads none of them
# (tests/test_runtime_imports.py pins it). Their arguments are parsed by the tool itself.
TOOLS: Final = {
    "demo": Tool(
        "webtorch_demo.demo",
        "demo",
        ("tqdm",),
        "train the XOR example over HTTP from concurrent clients",
    ),
    "lab": Tool(
        "webtorch_lab.cli",
        "lab",
        ("matplotlib", "tqdm"),  # plots come at the end of a run: fail before it, not after
        "compare balancers on simulated upstreams under open-loop load",
    ),
    "guard": Tool(
        # Its CRS baseline (the guard-eval extra) is optional: without it the evaluation says
        # so and goes on.
        "webtorch_guardlab.cli",
        "",
        (),
        "build the guard's corpus, train its detector, evaluate it against baselines",
    ),
}


def _load(path: str | None) -> config.Config:
    return config.load(Path(path)) if path else config.load_default()


def cmd_serve(args: argparse.Namespace) -> int:
    # What the master of several workers imports is this module, config and the master: the
    # server (app.py and below, uvloop, torch) is imported by a single server and by workers.
    path = Path(args.config) if args.config else None
    text = config.read(path if path is not None else config.default_config_path())
    cfg = config.loads(text, path if path is not None else config.default_config_path())
    if args.listen:
        try:
            config.parse_listen(args.listen)  # model_copy does not validate
        except ValueError as exc:
            raise ConfigError(f"--listen: {exc}") from None
        cfg = cfg.model_copy(
            update={"server": cfg.server.model_copy(update={"listen": args.listen})}
        )
    problem = cfg.exposure_problem(config.parse_listen(cfg.server.listen)[0])
    if problem is not None:
        raise ConfigError(problem)  # before any model or state directory is touched
    outdated = compiled.stale()
    if outdated:
        logging.getLogger("webtorch").warning(
            "compiled modules older than their sources run instead of them: %s "
            "(scripts/compile rebuilds them, scripts/compile --clean removes them)",
            ", ".join(outdated),
        )
    stages = None
    if args.stages is not None:
        stages = {s.strip() for s in args.stages.split(",") if s.strip()}
        if not stages:
            raise ConfigError("--stages: name at least one stage (a,b,...)")
    if cfg.server.worker_count > 1:
        if stages is not None:
            # Workers build their App from the config text alone (workers/worker.py).
            raise ConfigError(
                "--stages: serving some stages of a pipeline runs in one process for now; "
                "set server.workers = 1 or serve the whole pipeline"
            )
        from webtorch.workers.master import serve

        return serve(cfg, text, path, listen_from_cli=bool(args.listen), log_level=args.log_level)
    return _serve_here(cfg, path, listen_from_cli=bool(args.listen), stages=stages)


def _serve_here(
    cfg: config.Config, path: Path | None, *, listen_from_cli: bool, stages: set[str] | None
) -> int:
    """One process serves (server.workers = 1): no master."""
    import uvloop

    from webtorch.app import App

    app = App(cfg, path, listen_from_cli=listen_from_cli, stages=stages)

    def ready(server: HttpServer) -> None:
        scheme = "https" if cfg.server.tls else "http"
        for host, port in server.addresses:
            models = ", ".join([*app.models, *app.pipeline_names]) or "no models"
            print(
                f"webtorch {__version__} listening on {scheme}://{host}:{port} ({models})",
                flush=True,
            )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(app.run(ready))
    print("webtorch stopped", flush=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from webtorch.serve.model import load_model

    cfg = _load(args.config)
    for name, mc in cfg.models.items():
        model = load_model(
            name,
            cfg.resolve(mc.path),
            mc.device,
            cfg.weights(mc),
        )
        ins = ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in model.inputs)
        outs = ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in model.outputs)
        print(f"model {name}: {ins} -> {outs} on {model.device}")
        if mc.train.enabled:
            if model.spec.loss is None or model.spec.optimizer is None:
                raise ModelLoadError(
                    f"model {name}: training is enabled but it has no loss/optimizer"
                )
            print(
                f"  training: max_batch {mc.train.max_batch}, durability {mc.train.durability}, "
                f"state in {cfg.state_dir(name, mc)}"
            )
    if cfg.pipelines:
        from webtorch.metrics import Metrics
        from webtorch.pipeline.service import Pipelines

        for name, served in Pipelines(cfg, Metrics()).served.items():
            described = []
            for stage_name in served.graph.order:
                stage = served.graph.stages[stage_name]
                where = (
                    f"model {stage.model}"
                    if stage.model is not None
                    else served.settings(stage_name).placement
                )
                if stage_name in served.remote:
                    where = f"remote {served.settings(stage_name).remote}"
                described.append(f"{stage_name} ({stage.takes}, {where})")
            print(f"pipeline {name}: {' -> '.join(described)}")
    if cfg.plugins:
        from webtorch.plugins.host import load_set

        for plugin in load_set(cfg.plugins, cfg.base_dir, {}).plugins:
            phases = [
                *plugin.loaded.hooks,
                *(f"every({s:g}s)" for s, _, _ in plugin.loaded.periodic),
            ]
            print(f"plugin {plugin.name} (order {plugin.loaded.config.order}): {', '.join(phases)}")
    print(f"{args.config or 'embedded default'}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webtorch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"webtorch {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a config (default: the bundled XOR example)")
    serve.add_argument("config", nargs="?", help="TOML config file")
    serve.add_argument("--listen", help="HOST:PORT, overrides server.listen (port 0: any)")
    serve.add_argument(
        "--stages",
        help="serve only these pipeline stages (comma-separated) and the models they need",
    )
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate a config and load its models")
    check.add_argument("config", nargs="?", help="TOML config file")
    check.set_defaults(func=cmd_check)
    for name, tool in TOOLS.items():
        # No arguments here: everything after the command goes to the tool's own parser.
        sub.add_parser(name, help=tool.help, add_help=False).set_defaults(func=None)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in TOOLS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in TOOLS:
            return run_tool(args.command, rest)
        return int(args.func(args))
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_tool(command: str, argv: list[str]) -> int:
    """Imports the tool behind ``command`` and runs it on ``argv`` (what followed the command)."""
    tool = TOOLS[command]
    missing = [name for name in tool.needs if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: webtorch {command} needs {', '.join(missing)}, which the {tool.extra!r} "
            f"extra installs: scripts/setup {tool.extra} (or pip install 'webtorch[{tool.extra}]')",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(tool.module)
    parser = argparse.ArgumentParser(
        prog=f"webtorch {command}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
