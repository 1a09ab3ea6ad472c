"""HTTP/1.1 server core: messages, limits, the asyncio protocol, routing and the server shell."""
