"""The request body limit against the real service over raw sockets: a declared size
over the limit is refused before the body is sent, a chunked body is cut off at the
limit, and neither the proxy nor the ingress is left holding the refused body."""
import json
import select
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from helpers import actor_pid, deploy_one_tiny_replica, replica_actor_name, rss_bytes, start_local_serve

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

LIMIT = 2**20
BIG = 64 * 2**20
SMALL = {"prompt": "q", "max_tokens": 1}


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from ray import serve
    url = start_local_serve(2)
    deploy_one_tiny_replica(tiny_model_dir, {"max_body_bytes": LIMIT, "request_timeout_s": 60})
    yield url
    serve.shutdown()
    ray.shutdown()


def connect(base: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", urlparse(base).port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(content_length=None, chunked=False, path="/v1/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_reply(sock: socket.socket, timeout_s: float = 10) -> tuple[int, dict, bytes]:
    """Status, headers and body of one response; fails past ``timeout_s``."""
    deadline, data = time.time() + timeout_s, b""
    while time.time() < deadline:
        if b"\r\n\r\n" in data:
            top, _, body = data.partition(b"\r\n\r\n")
            lines = top.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            if len(body) >= int(headers.get("content-length", 0)):
                return int(lines[0].split()[1]), headers, body
        ready, _, _ = select.select([sock], [], [], min(0.2, max(deadline - time.time(), 0)))
        if not ready:
            continue
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            got = b""
        if not got:
            break
        data += got
    raise AssertionError(f"no complete response within {timeout_s} s: {data[:300]!r}")


def send_until_reply(sock: socket.socket, pieces, pause_s: float = 0.0) -> int:
    """Sends ``pieces`` until the server answers or stops taking them; the bytes sent."""
    sent = 0
    for piece in pieces:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            break
        sent += len(piece)
        if pause_s:
            time.sleep(pause_s)
    return sent


def refusal(status: int, body: bytes) -> str:
    assert 400 <= status < 500, (status, body[:300])
    return json.loads(body)["error"]["message"]


def padded(size: int) -> bytes:
    """A valid small request, padded with JSON whitespace to exactly ``size`` bytes."""
    raw = json.dumps(SMALL).encode()
    return raw + b" " * (size - len(raw))


def test_declared_size_over_the_limit_is_refused_before_the_body(service):
    with connect(service) as sock:
        sock.sendall(head(content_length=BIG))
        status, headers, body = read_reply(sock, timeout_s=10)
    assert status == 413 and str(LIMIT) in refusal(status, body)
    assert headers.get("connection") == "close"


def test_chunked_body_is_cut_off_at_the_limit(service):
    piece, total = 64 * 1024, 16 * 2**20
    frame = b"%x\r\n" % piece + b"x" * piece + b"\r\n"
    with connect(service) as sock:
        sock.sendall(head(chunked=True))
        # Paced like a real upload, so the answer can overtake the rest of the body.
        sent = send_until_reply(sock, (frame for _ in range(total // piece)), pause_s=0.005)
        if sent == len(frame) * (total // piece):
            sock.sendall(b"0\r\n\r\n")
        status, _, body = read_reply(sock, timeout_s=10)
    assert status == 413 and str(LIMIT) in refusal(status, body)
    assert LIMIT <= sent < total // 2, f"the server read {sent} bytes of a refused body"


def test_body_exactly_at_the_limit_and_small_requests_work(service):
    url = service + "/v1/completions"
    headers = {"content-type": "application/json"}
    ok = httpx.post(url, content=padded(LIMIT), headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text[:300]

    def pieces():        # no length known in advance: httpx sends it chunked
        body = padded(LIMIT)
        for i in range(0, LIMIT, 100_000):
            yield body[i:i + 100_000]
    ok = httpx.post(url, content=pieces(), headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text[:300]
    over = httpx.post(url, content=padded(LIMIT + 1), headers=headers, timeout=60)
    assert over.status_code == 413 and str(LIMIT) in over.json()["error"]["message"]
    small = httpx.post(url, json=SMALL, timeout=60)
    assert small.status_code == 200 and small.json()["choices"], small.text[:300]


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "5, 6", "\u00b2"])
def test_malformed_content_length_is_a_4xx_not_a_hang(service, value):
    # uvicorn's parser refuses all of these before the app sees them; read_body's own
    # 400 is for servers that pass them on.
    with connect(service) as sock:
        sock.sendall(head(content_length=value))
        status, _, body = read_reply(sock, timeout_s=10)
    assert 400 <= status < 500, (status, body[:300])


def test_a_refused_big_body_is_not_kept_by_proxy_or_ingress(service):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    proxy = next(n for n in names if n.startswith("SERVE_PROXY_ACTOR"))
    ingress = next(n for n in names if n.startswith(replica_actor_name("mepic", "", "OpenAIIngress")))
    pids = {"proxy": actor_pid(proxy), "ingress": actor_pid(ingress)}
    assert httpx.post(service + "/v1/completions", json=SMALL, timeout=60).status_code == 200
    before = {k: rss_bytes(p) for k, p in pids.items()}
    with connect(service) as sock:
        sock.sendall(head(content_length=BIG))
        # As fast as the client can: the worst case for what the server buffers.
        sent = send_until_reply(sock, (b"x" * 2**20 for _ in range(BIG // 2**20)))
        status, _, body = read_reply(sock, timeout_s=30)
    assert status == 413, (status, body[:300])
    time.sleep(1.0)
    after = {k: rss_bytes(p) for k, p in pids.items()}
    growth = {k: (after[k] - before[k]) / 2**20 for k in pids}
    print(f"\nsent {sent / 2**20:.1f} MiB; RSS before {before}, after {after}, growth MiB {growth}")
    for k in pids:
        assert growth[k] < 32, f"the {k} grew by {growth[k]:.1f} MiB after a refused {BIG >> 20} MiB body"
