"""The client side of HTTP/1.1, for talking to upstreams.

Built like the server (``protocol.py``): an asyncio Protocol driving httptools' response parser,
with callbacks instead of tasks per request, because a proxied request pays for both sides and
the proxy must stay within reach of nginx. One request at a time per connection (no upstream
pipelining, as nginx); a connection is reused when both sides allow keep-alive.

- ``connection.py``: one connection: writing a request, parsing its response, its limits;
- ``pool.py``: the connections to one upstream, reused, bounded, their deadlines swept by the
  periodic tick instead of timers armed and cancelled per read; and the writes' flusher;
- ``fetch.py``: the proxy's own requests (load probes, active health checks), a one-shot GET
  with a deadline through the same pools and parser, so that the limits on what an upstream
  may send (head size, header count, invalid framing, 101) bound them too.
"""
