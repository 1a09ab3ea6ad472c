"""TOML -> typed, validated config. Errors name the file and the key.

The same models are the Python API: ``Config(models={"xor": ModelConfig(path=...)})`` is what a TOML
file becomes. Validation is pydantic's (a library, not hand-written checks); unknown keys are errors
so a typo never silently does nothing.

One module per part of the file: ``server.py`` ([server]), ``models.py`` ([models.X]),
``upstreams.py`` ([upstreams.X]), ``pipelines.py`` ([pipelines.X]), ``routes.py`` ([[routes]]),
``guard.py`` ([guard]), ``plugins.py`` ([[plugins]]), and ``root.py``, the whole
(:class:`Config`: the checks across sections, loading); ``reload.py`` says what a reload of a
running server may change. ``base.py`` holds what they share. The names below are the
package's API: import them from ``webtorch.config``.
"""

from webtorch.config.base import is_loopback, parse_listen
from webtorch.config.guard import GuardConfig
from webtorch.config.models import (
    MODEL_NAME,
    ModelConfig,
    TrainConfig,
    model_paths,
    train_paths,
)
from webtorch.config.pipelines import PipelineConfig, StageConfig, pipeline_paths
from webtorch.config.plugins import PluginConfig
from webtorch.config.reload import RELOADABLE, RestartRequired, reloaded, server_changes
from webtorch.config.root import (
    Config,
    default_config_path,
    from_dict,
    load,
    load_default,
    loads,
    read,
)
from webtorch.config.routes import BUILTIN_ROUTES, RouteConfig
from webtorch.config.server import (
    AccessLogConfig,
    LimitsConfig,
    MasterConfig,
    ServerConfig,
    TLSConfig,
)
from webtorch.config.streams import StreamsConfig
from webtorch.config.upstreams import (
    RetryConfig,
    ServerEntry,
    StickyConfig,
    UpstreamConfig,
)
from webtorch.errors import ConfigError  # what loading raises

__all__ = [
    "BUILTIN_ROUTES",
    "MODEL_NAME",
    "RELOADABLE",
    "AccessLogConfig",
    "Config",
    "ConfigError",
    "GuardConfig",
    "LimitsConfig",
    "MasterConfig",
    "ModelConfig",
    "PipelineConfig",
    "PluginConfig",
    "RestartRequired",
    "RetryConfig",
    "RouteConfig",
    "ServerConfig",
    "ServerEntry",
    "StageConfig",
    "StickyConfig",
    "StreamsConfig",
    "TLSConfig",
    "TrainConfig",
    "UpstreamConfig",
    "default_config_path",
    "from_dict",
    "is_loopback",
    "load",
    "load_default",
    "loads",
    "model_paths",
    "parse_listen",
    "pipeline_paths",
    "read",
    "reloaded",
    "server_changes",
    "train_paths",
]
