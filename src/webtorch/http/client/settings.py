"""A connection pool's settings, typed, with the one copy of their defaults and bounds.

``[upstreams.X]`` in the config is one of these (``config/upstreams.py``'s ``UpstreamConfig``
extends it, so the keys sit flat in the group's table under the same names), and the prober
builds its own. A pydantic model, as the policies' settings are (``balance/settings.py``):
validated once where it is built, never on the request path, where
:class:`~webtorch.http.client.pool.ConnectionPool` copies what it reads into its own (compiled)
attributes. Not compiled: a pydantic model cannot be a native class.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class PoolSettings(BaseModel):
    """Connections per server of an upstream group, their timeouts and the bounds on what the
    upstream may answer."""

    # As the config's own sections: an unknown key is an error (a typo is not a default).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Idle connections kept per server (a burst's surplus: briefly, see pool.TRIM_AFTER).
    keepalive: Annotated[int, Field(ge=0)] = 32
    max_connections: Annotated[int, Field(ge=0)] = 0  # open at once per server; 0: no limit
    idle_timeout: Annotated[float, Field(gt=0)] = 60.0
    max_requests_per_connection: Annotated[int, Field(ge=0)] = 1000  # 0: no limit
    # Timeouts: connect; read (between two reads while a response is awaited or arriving, as
    # nginx's proxy_read_timeout); total (a whole exchange, 0: none).
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 60.0
    total_timeout: Annotated[float, Field(ge=0)] = 0.0
    # A response's head (status line, headers, and any interim 1xx heads before it) is refused
    # (502, the upstream logged) above these: nginx's proxy_buffer_size. Without them an
    # upstream could make the proxy hold any amount of memory before a byte of body arrives.
    max_response_header_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    max_response_headers: Annotated[int, Field(gt=0)] = 100
