"""Reading a request body under a size limit, refusing as early as the request allows."""
from contextlib import aclosing

from starlette.requests import Request

from deployments.protocol import ApiError


class BodyRefused(ApiError):
    """A refusal that also closes the connection: otherwise uvicorn, to keep the
    connection alive, goes on reading (and discarding) the rest of a refused body
    for as long as the client sends it."""

    def response(self, retry_after: int | None = None):
        reply = super().response(retry_after)
        reply.headers["connection"] = "close"
        return reply


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or BodyRefused: 413 beyond ``limit`` bytes, 400 for a malformed
    Content-Length. Ray Serve's proxy and replica buffer what the client sends until
    the response goes out, so refusing early is what bounds the memory."""
    declared = request.headers.getlist("content-length")
    if declared:
        # isascii: str.isdigit also accepts digits such as "²" that int() refuses.
        if len(set(declared)) > 1 or not (declared[0].isascii() and declared[0].strip().isdigit()):
            raise BodyRefused(f"malformed Content-Length header: {', '.join(declared)!r}", status=400)
        if int(declared[0]) > limit:
            raise BodyRefused(f"request body of {int(declared[0])} bytes exceeds the limit of {limit} bytes",
                              status=413)
    # A chunked body declares no size (and a declared one is only checked once all has
    # arrived), so count what arrives.
    chunks, received = [], 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            received += len(chunk)
            if received > limit:
                raise BodyRefused(f"request body exceeds the limit of {limit} bytes", status=413)
            chunks.append(chunk)
    return b"".join(chunks)
