"""``webtorch serve [CONFIG]``, ``webtorch check CONFIG``, ``webtorch demo``, ``webtorch lab``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from webtorch import __version__, compiled, config
from webtorch import demo as xor_demo
from webtorch.errors import ConfigError, ModelLoadError
from webtorch.guard import cli as guard_cli
from webtorch.http.server import HttpServer
from webtorch.lab import cli as lab_cli


def _load(path: str | None) -> config.Config:
    return config.load(Path(path)) if path else config.load_default()


def cmd_serve(args: argparse.Namespace) -> int:
    from webtorch.app import App

    cfg = _load(args.config)
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
    app = App(cfg, Path(args.config) if args.config else None, listen_from_cli=bool(args.listen))

    def ready(server: HttpServer) -> None:
        scheme = "https" if cfg.server.tls else "http"
        for host, port in server.addresses:
            models = ", ".join(app.models) or "no models"
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
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate a config and load its models")
    check.add_argument("config", nargs="?", help="TOML config file")
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="train the XOR example over HTTP from concurrent clients")
    xor_demo.add_arguments(demo)
    demo.set_defaults(func=xor_demo.run)
    lab = sub.add_parser(
        "lab",
        help="compare balancers on simulated upstreams under open-loop load",
        description=lab_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lab_cli.add_arguments(lab)
    lab.set_defaults(func=lab_cli.run)
    guard = sub.add_parser(
        "guard",
        help="build the guard's corpus, train its detector, evaluate it against baselines",
        description=guard_cli.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    guard_cli.add_arguments(guard)
    guard.set_defaults(func=guard_cli.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
