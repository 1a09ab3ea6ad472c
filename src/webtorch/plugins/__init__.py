"""Plugins: Python files that join the phases of a request (docs/PLUGINS.md).

A plugin file defines ``plugin = ...``, an object whose methods are named after the phases it
joins (``request``, ``response``, ``log``...); the phases it does not define cost nothing. What a
plugin file imports from here: :func:`every` (periodic work), :class:`Context` (the per-request
object every phase gets), :class:`Host` (what ``startup`` gets: settings, models, the log) and
:class:`Response` (an answer: a ``request`` phase that returns one short-circuits the route).

Modules: ``api.py`` (the phases, ``every``), ``context.py`` (Context, Host), ``loader.py`` (a
file -> a loaded plugin, errors naming file and line), ``table.py`` (the phase table built once
per set, per-plugin-per-phase stats), ``calls.py`` (a hook called: timed, counted, isolated,
under its timeout), ``bodies.py`` (request and response bodies through the plugins),
``runner.py`` (the shell on the request path: the handler wrapper, the log hook, the
connection gate, the picker), ``host.py`` (the running set: start,
reload, periodic work, shutdown), ``models.py`` (``ctx.model(name)``: a served model's batches),
``metrics.py`` (their /metrics families).
"""

from webtorch.http.messages import Response
from webtorch.plugins.api import PHASES, every
from webtorch.plugins.context import Context, Host
from webtorch.plugins.later import Later

__all__ = ["PHASES", "Context", "Host", "Later", "Response", "every"]
