"""How a plugin's hook is called: timed and counted per plugin and phase, isolated (a failure
is logged with the plugin's name and, per ``on_error``, ignored or turned into the 500 naming
it), async phases under the plugin's timeout; and the route's handler called as the server's
dispatch would (its errors as answers), so that the response phases see what the client will."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from webtorch.errors import HTTPError
from webtorch.http.messages import (
    Handler,
    HandlerResult,
    Pending,
    Request,
    Response,
    error_response,
    response_for_error,
)
from webtorch.plugins.context import Context
from webtorch.plugins.table import Plugin

log: Final = logging.getLogger("webtorch.plugins")

_clock: Final = time.perf_counter
# A failing phase is logged at most this often per plugin and phase (the rest are counted).
LOG_INTERVAL: Final = 1.0
# A plain phase's seconds are sampled: one call in TIMED is timed (the first included) and
# counts TIMED times. Two clock reads cost more than a typical hook (the guard's log phase, a
# header check), and per plugin and phase the calls are many: the sum stays a fair estimate.
# An async phase, whose waits can be long and rare, is timed on every call.
TIMED: Final = 8


class Refused(Exception):
    """A plugin with on_error = "closed" failed: ``response`` (a 500 naming it) answers."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Open:
    """A plugin with on_error = "open" failed: its result is ignored."""


OPEN: Final = _Open()


def failed(
    plugin: Plugin, phase: str, ctx: Context | None, exc: BaseException | None, why: str = ""
) -> _Open:
    """Count and log a failed phase; raise Refused when the plugin fails closed."""
    stats = plugin.stats[phase]
    stats.errors += 1
    timeout = isinstance(exc, TimeoutError)
    if timeout:
        stats.timeouts += 1
        why = why or f"timed out after {plugin.timeout}s"
    if ctx is not None:
        ctx.errors.append(f"{plugin.name}.{phase}")
    now = time.monotonic()
    if now >= _logged.get((plugin.name, phase), -LOG_INTERVAL) + LOG_INTERVAL:
        _logged[(plugin.name, phase)] = now
        where = "" if ctx is None else f" for {ctx.request.method} {ctx.request.path!r}"
        if exc is not None and not timeout:
            log.error(
                "plugin %s failed in %s%s (%d failures so far)",
                plugin.name,
                phase,
                where,
                stats.errors,
                exc_info=exc,
            )
        else:
            log.error("plugin %s failed in %s%s: %s", plugin.name, phase, where, why)
    if plugin.closed:
        what = "timed out" if timeout else "failed"
        raise Refused(error_response(500, f"plugin {plugin.name!r} {what} in its {phase} phase"))
    return OPEN


_logged: dict[tuple[str, str], float] = {}


def run_hook(
    plugin: Plugin, phase: str, fn: Callable[..., Any], ctx: Context | None, *args: Any
) -> Any:
    """``fn(*args)``, counted and timed (one call in TIMED); OPEN if it raised (Refused if it
    fails closed)."""
    stats = plugin.stats[phase]
    calls = stats.calls
    stats.calls = calls + 1
    if calls % TIMED:
        try:
            return fn(*args)
        except Exception as exc:
            return failed(plugin, phase, ctx, exc)
    started = _clock()
    try:
        return fn(*args)
    except Exception as exc:
        return failed(plugin, phase, ctx, exc)
    finally:
        stats.seconds += (_clock() - started) * TIMED


def run_quiet(
    plugin: Plugin, phase: str, fn: Callable[..., Any], ctx: Context | None, *args: Any
) -> Any:
    """:func:`run_hook` where failing closed changes nothing (log, a streamed body's chunks,
    periodic work): OPEN instead of Refused."""
    try:
        return run_hook(plugin, phase, fn, ctx, *args)
    except Refused:
        return OPEN


async def run_waiting(plugin: Plugin, phase: str, fn: Callable[..., Any], ctx: Context) -> Any:
    """An async-capable phase: its awaitable waited for up to the plugin's timeout."""
    stats = plugin.stats[phase]
    started = _clock()
    try:
        result = fn(ctx) if phase == "request" else fn(ctx, ctx.request.body)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, plugin.timeout)
        return result
    except Exception as exc:
        return failed(plugin, phase, ctx, exc)
    finally:
        stats.calls += 1
        stats.seconds += _clock() - started


def call_handler(handler: Handler, request: Request) -> HandlerResult:
    """The route's handler, with the errors the server's dispatch would turn into answers (so
    that the response phase sees them as the client will)."""
    try:
        return handler(request)
    except HTTPError as exc:
        return response_for_error(exc)
    except Exception:
        log.exception("handler failed for %s %r", request.method, request.path)
        return error_response(500, "internal server error")


def bad_result(plugin: Plugin, phase: str, ctx: Context | None, result: object) -> _Open:
    return failed(plugin, phase, ctx, None, f"returned a {type(result).__name__}, which it may not")


def read_chunk(
    plugin: Plugin, fn: Callable[..., Any], ctx: Context, data: bytes, end: bool
) -> Response | None:
    """A stream-mode request_body call: None to let the body go on, or the Response that
    answers the request instead (a plugin that fails closed answers its 500)."""
    try:
        result = run_hook(plugin, "request_body", fn, ctx, ctx, data, end)
    except Refused as refused:
        return refused.response
    if result is None or result is OPEN:
        return None
    if isinstance(result, Response):
        return result
    try:
        bad_result(plugin, "request_body", ctx, result)
    except Refused as refused:
        return refused.response
    return None


def _set_result(fut: asyncio.Future[Response], response: Response) -> None:
    if not fut.done():
        fut.set_result(response)


async def settle(result: HandlerResult) -> Response:
    """A handler's result as a Response (its errors as the server would answer them)."""
    if isinstance(result, Response):
        return result
    try:
        if isinstance(result, Pending):
            fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            result.subscribe(_set_result, fut)
            try:
                return await fut
            except asyncio.CancelledError:
                result.cancel()  # the client went away: the work behind it stops
                raise
        return await result
    except HTTPError as exc:
        return response_for_error(exc)
    except Exception:
        log.exception("handler failed")
        return error_response(500, "internal server error")
