"""The whole config (:class:`Config`): its sections, the checks across them, and loading it from
TOML with errors that name the file and the key."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from webtorch.config.base import Strict, is_loopback, parse_listen
from webtorch.config.guard import GuardConfig
from webtorch.config.models import MODEL_NAME, ModelConfig, model_paths, train_paths
from webtorch.config.pipelines import PipelineConfig, pipeline_paths
from webtorch.config.plugins import PLUGIN_NAME, PluginConfig
from webtorch.config.routes import BUILTIN_ROUTES, RouteConfig
from webtorch.config.server import ServerConfig
from webtorch.config.streams import StreamsConfig
from webtorch.config.upstreams import UpstreamConfig
from webtorch.errors import ConfigError


class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    # The request guard; absent: off.
    guard: GuardConfig | None = None
    # Python files that join the request's phases (plugins/), in order.
    plugins: list[PluginConfig] = Field(default_factory=list)
    # WebSocket: model streams, proxied WebSocket routes; absent: off.
    streams: StreamsConfig | None = None
    # Directory that relative paths in the file are resolved against.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _check_refs(self) -> Config:
        seen: dict[tuple[str, str | None], int] = {}
        served = {path for name in self.models for path in (*model_paths(name), *train_paths(name))}
        pipelined = {
            path for name, pc in self.pipelines.items() for path in pipeline_paths(name, pc.stages)
        }
        for i, route in enumerate(self.routes):
            if route.path in served:
                raise ValueError(f"routes[{i}].path: {route.path!r} is a model's built-in route")
            if route.path in pipelined:
                raise ValueError(f"routes[{i}].path: {route.path!r} is a pipeline's built-in route")
            if route.model is not None and route.model not in self.models:
                raise ValueError(f"routes[{i}].model: no model named {route.model!r}")
            if route.websocket and self.streams is None:
                raise ValueError(f"routes[{i}].websocket: needs a [streams] section")
            if route.upstream is not None and route.upstream not in self.upstreams:
                raise ValueError(f"routes[{i}].upstream: no upstream named {route.upstream!r}")
            key = ("path", route.path) if route.path is not None else ("prefix", route.prefix)
            if key in BUILTIN_ROUTES:
                raise ValueError(f"routes[{i}].{key[0]}: {key[1]!r} is a built-in route")
            if key in seen:
                raise ValueError(f"routes[{i}].{key[0]}: {key[1]!r} repeats routes[{seen[key]}]")
            seen[key] = i
        for name in self.models:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(f"models.{name}: invalid model name (letters, digits, _ . -)")
        for name, pc in self.pipelines.items():
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"pipelines.{name}: invalid pipeline name (letters, digits, _ . -)"
                )
            for stage, sc in pc.stages.items():
                if sc.remote is not None and sc.remote not in self.upstreams:
                    raise ValueError(
                        f"pipelines.{name}.stages.{stage}.remote: no upstream named {sc.remote!r}"
                    )
        names: dict[str, int] = {}
        for i, plugin in enumerate(self.plugins):
            label = plugin.label
            if not PLUGIN_NAME.fullmatch(label):
                raise ValueError(f"plugins[{i}].name: {label!r} is not a plugin name: set name")
            if label in names:
                raise ValueError(f"plugins[{i}].name: {label!r} repeats plugins[{names[label]}]")
            names[label] = i
        problem = self.exposure_problem(parse_listen(self.server.listen)[0])
        if problem is not None:
            raise ValueError(problem)
        problem = self.workers_problem()
        if problem is not None:
            raise ValueError(problem)
        return self

    def workers_problem(self) -> str | None:
        """What several workers cannot serve yet, if the config asks for it (issue 22): the
        repository API and /admin/reload would change the one worker a request reaches.
        (Training is served: one worker trains each model, the others forward to it.)"""
        count = self.server.worker_count
        if count <= 1:
            return None
        if self.server.management:
            return (
                f"server.workers: the management endpoints would load, unload and reload in the "
                f"one worker of {count} that a request reaches (issue 22; ARCHITECTURE.md, "
                "'Management across workers', says what relaying them safely needs); serve with "
                "workers = 1, or set management = false (SIGHUP reloads every worker)"
            )
        return None

    def exposure_problem(self, host: str) -> str | None:
        """Why serving on ``host`` would let anyone on the network train the models, if it does.
        Checked at validation and again at start, where ``--listen`` may have changed the host."""
        if self.server.bearer_token is not None or is_loopback(host):
            return None
        training = [name for name, mc in self.models.items() if mc.train.enabled]
        if training:
            return (
                f"server.token: training is enabled for {', '.join(training)} and the server "
                f"listens on {host}, beyond this machine: set server.token (or token_env) so "
                "that only holders of the token can change the model"
            )
        if self.server.management:
            return (
                f"server.token: the management endpoints are enabled and the server listens on "
                f"{host}, beyond this machine: set server.token (or token_env) so that only "
                "holders of the token can load and unload models"
            )
        return None

    def weights(self, model: ModelConfig) -> Path | Literal[False] | None:
        """A model's ``weights`` setting with a path resolved against the config's directory."""
        if isinstance(model.weights, Path):
            return self.resolve(model.weights)
        return model.weights

    def state_dir(self, name: str, model: ModelConfig) -> Path:
        """Where a model's WAL and checkpoints live."""
        configured = model.train.state_dir
        if configured is None:
            return Path.cwd() / "webtorch-state" / name
        return self.resolve(configured)

    def access_log_path(self) -> Path | None:
        """The access log's file, resolved; None for standard output or no access log."""
        access_log = self.server.access_log
        if access_log is None or access_log.path == "-":
            return None
        return self.resolve(Path(access_log.path))

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir / path


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def from_dict(
    data: dict[str, object], source: str = "<config>", base_dir: Path = Path(".")
) -> Config:
    try:
        return Config.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def load(path: Path) -> Config:
    return loads(read(path), path)


def read(path: Path) -> str:
    """A config file's text (ConfigError when there is none)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None


def loads(text: str, path: Path) -> Config:
    """``text``, read from ``path`` (what errors name, and the directory paths are relative to):
    the master reads a file once and hands its workers the text it validated."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "base_dir" in data:
        raise ConfigError(f"{path}: base_dir: unknown key")
    return from_dict(data, str(path), path.resolve().parent)


def default_config_path() -> Path:
    """The embedded default: the bundled XOR example."""
    return Path(str(resources.files("webtorch.examples") / "xor.toml"))


def load_default() -> Config:
    return load(default_config_path())
