"""A size-capping HTTP proxy in front of Triton's HTTP endpoint (aiohttp, in a thread of its own).

The bundled Triton 2.51 crashes on HTTP bodies of about 4 MiB (CVE-2025-23310, fixed in 25.07). The
proxy reads each body itself, up to the card's `serve.max_request_bytes` (Content-Length announced or
chunked: a million one-byte chunks are counted as they come), answers 413 for anything longer, and
passes the rest to Triton with a plain Content-Length. Responses are streamed back as they arrive
(generate_stream's server-sent events), headers pass both ways (the admin key too), and a Triton that
is down or restarting is a 502, so readiness probed through the proxy fails while it is.
"""

from __future__ import annotations

import asyncio
import json
import threading

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes: never forwarded.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


def _error(status: int, message: str):
    from aiohttp import web

    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")


class BodyLimitProxy:
    """Listen on host:port and forward to `upstream` (host:port of Triton's HTTP endpoint)."""

    def __init__(self, host: str, port: int, upstream: str, max_body_bytes: int):
        self.host, self.port, self.upstream = host, port, upstream
        self.max_body_bytes = max_body_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> BodyLimitProxy:
        self._thread = threading.Thread(target=self._run, name="dms-http-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # a bind failure: start() reports it
            self._failed = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        # No total timeout (generations run for minutes); connection reuse keeps the overhead small.
        timeout = aiohttp.ClientTimeout(total=None, connect=10)
        connector = aiohttp.TCPConnector(limit=0)
        client = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        async with client as session:
            app = web.Application(client_max_size=self.max_body_bytes)
            app.router.add_route("*", "/{tail:.*}", lambda request: self._forward(session, request))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
                self._ready.set()
                await self._stop.wait()
            finally:
                await runner.cleanup()

    def _too_large(self, size: str) -> object:
        return _error(
            413,
            f"request body is {size} bytes; this server takes at most {self.max_body_bytes} "
            "(serve.max_request_bytes in the model card)",
        )

    async def _forward(self, session, request):
        import aiohttp
        from aiohttp import web

        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._too_large(str(request.content_length))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(f"more than {self.max_body_bytes}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = f"http://{self.upstream}{request.rel_url}"
        reply = None
        try:
            async with session.request(request.method, url, data=body, headers=headers) as upstream:
                reply = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        reply.headers.add(key, value)
                await reply.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await reply.write(chunk)
                await reply.write_eof()
                return reply
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            if reply is not None and reply.prepared:  # mid-reply: all that is left is to cut it off
                raise
            return _error(502, f"the Triton server behind this proxy is not answering ({exc}); it may be "
                               "restarting: try again shortly")  # fmt: skip
