"""Benchmark: nodechat as users run it, beside a naive Starlette+httpx proxy and the upstream alone.

    python bench/bench.py                       # every point once (3 to 4 minutes)
    python bench/bench.py --repeat 3            # medians of three runs of each point (about 10)
    python bench/bench.py --pure                # on the pure-Python server (h11, asyncio, wsproto)
    python bench/bench.py --storage --postgres  # also the stores, and 3 processes on PostgreSQL
    python bench/bench.py --quick               # a smoke run: every kind of point, briefly

What runs.  nodechat is started as the README runs it, ``python nodechat.py --port P
--log-level warning``, which picks httptools, uvloop and websockets-sansio when installed (the
``server`` extra), and is configured through the environment only: OPENAI_BASE_URL (the fake
upstream), NODECHAT_MODEL, NODECHAT_TOKENS, NODECHAT_DATA_DIR, and for the agent points
NODECHAT_MAX_TURNS_PER_USER (all bench streams are one user, and up to 16 of its turns run at
once; the default cap of 8 applies to /api/chat and /chat only, never to /v1).  With
``--pure`` it is ``python -m uvicorn nodechat:create_app --factory --http h11 --loop asyncio
--ws wsproto``, the pure-Python stack a host that mounts nodechat may run.  The naive proxy runs
on the same uvicorn http and loop as nodechat in each mode.  Proxy settings (HTTP_PROXY...) and
NODECHAT_* / OPENAI_* variables of the calling shell are not passed on.

Three kinds of process, pinned apart on a 2-core machine: the fake upstream and this load
generator on core 0, the server under test alone on core 1.  The upstream and the load
generator are raw asyncio sockets (on uvloop when installed) so neither is the bottleneck.
Each request asks the upstream for ``N`` chunks of 194 bytes (chunked SSE), paced ``P``
seconds apart, through fields nodechat passes through on /v1 (``bench_chunks``...) or the
last message's text on the agent paths ("bench N P").

Points: the OpenAI path unpaced (1, 16, 64 streams x 20, 200 chunks); "chunk per write", meant
as one event per read (64 streams x 20 and 200 chunks, the upstream writing each chunk on its
own, draining and yielding, ``await asyncio.sleep(0)``, between them: how many events one read
of the server really carried is reported, counted from /proc/<pid>/io on uvloop); /api/chat
and /chat (1x20, 1x200, 16x20; each /chat stream starts a new thread every 10 turns, so its
history stays the length of a real conversation), /chat again with its data dir on /dev/shm
(tmpfs: its fsyncs cost nothing); an upstream over TLS (a throwaway CA made at start, trusted by nodechat through
SSL_CERT_FILE; 1x20 and 1x200); paced at 20 ms per chunk, 100 chunks per stream, scanning 64
to 1024 streams, the streams' starts spread over one request's length and only requests made
while all streams run timed (each stream's middle one of three).

Reported per point: requests/s, CPU ms per request of the server under test (from
/proc/<pid>/stat), time to first content chunk (TTFC) p50/p99 and what the server adds to the
upstream alone, and in paced points the p99 gap between chunks (added).  Then the fits: CPU
per streamed event and fixed CPU per request, from the 20- and 200-chunk points at one stream
count; the added TTFC p50 at one stream; the most paced streams held within +5 ms TTFC p50
and +20 ms gap p99; start to ready, idle and peak RSS, import time, 1,000 idle WebSockets.
``--storage``: JSONFileStore appends, memory search and listing; ``--postgres`` (with
PostgreSQL 15 binaries): the same for PostgresStore on a throwaway cluster with fsync on, and
/api/chat turns per second through three nodechat processes on one database against one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import pwd
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICKS = os.sysconf("SC_CLK_TCK")
PG_BIN = os.environ.get("NODECHAT_PG_BIN", "/usr/lib/postgresql/15/bin")


class Point(NamedTuple):
    kind: str  # "" plain HTTP upstream, SPLIT (each chunk its own write), "TLS", "PostgreSQL"
    streams: int
    chunks: int
    pace: float = 0.0


PACE = 0.02
PACED_CHUNKS = 100
PACED_SCAN = (64, 256, 384, 512, 768, 1024)
UNPACED = [Point("", s, c) for c in (20, 200) for s in (1, 16, 64)]
SPLIT = "chunk per write"
SPLIT_POINTS = [Point(SPLIT, 64, 20), Point(SPLIT, 64, 200)]
AGENT_POINTS = [Point("", 1, 20), Point("", 1, 200), Point("", 16, 20)]
TLS_POINTS = [Point("TLS", 1, 20), Point("TLS", 1, 200)]
AGENT_TURN_CAP = 64  # NODECHAT_MAX_TURNS_PER_USER for the agent points: 16 turns of one user at once
PG_POINT = Point("PostgreSQL", 16, 20)
TURNS_PER_CONVERSATION = 10


def run_async(coro, loop: str = "uvloop"):
    """Run ``coro`` on uvloop when installed (and asked for), else on asyncio."""
    if loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop
            return uvloop.run(coro)
    return asyncio.run(coro)


# -- the fake upstream: raw asyncio, HTTP/1.1 keep-alive, chunked SSE ----------------------------

def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD = ('{"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,"model":"bench",'
        '"choices":[{"index":0,"delta":')
PIECE = _chunk(b"data: " + (HEAD + '{"content":"tok "},"finish_reason":null}]}').encode() + b"\n\n")
TAIL = _chunk(b"data: " + (HEAD + '{},"finish_reason":"stop"}]}').encode() + b"\n\n"
              + b'data: {"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,'
              b'"model":"bench","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,'
              b'"total_tokens":10}}\n\ndata: [DONE]\n\n') + b"0\r\n\r\n"
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
# The same answer in Anthropic's Messages events (the native Anthropic provider's upstream)
MESSAGES_HEAD = _chunk(
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_up","type":"message",'
    b'"role":"assistant","model":"bench","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\nevent: content_block_start\ndata: '
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n')
MESSAGES_PIECE = _chunk(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                        b'"delta":{"type":"text_delta","text":"tok "}}\n\n')
MESSAGES_TAIL = _chunk(
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\nevent: message_delta\n'
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":5}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n') + b"0\r\n\r\n"


def stream_request(body: dict) -> tuple[int, float, bool]:
    """(chunks, pace, one write per chunk) asked for: /v1 passes bench_* fields through; the
    agent paths pass none, so their last message says "bench N PACE [split]"."""
    content = (body.get("messages") or [{}])[-1].get("content", "")
    if isinstance(content, list):  # Messages: text blocks
        content = " ".join(block.get("text", "") for block in content)
    words = str(content).split()
    if words[:1] == ["bench"] and len(words) >= 3:
        return int(words[1]), float(words[2]), "split" in words[3:]
    return (int(body.get("bench_chunks", 20)), float(body.get("bench_pace", 0)),
            bool(body.get("bench_split")))


async def upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in request.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if b"/models" in request.split(b"\r\n")[0]:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(MODELS), MODELS))
                continue
            chunks, pace, split = stream_request(body)
            messages_api = b"/messages" in request.split(b"\r\n")[0]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" + (MESSAGES_HEAD if messages_api else b""))
            piece = MESSAGES_PIECE if messages_api else PIECE
            for index in range(chunks):
                if index and (pace or split):  # split: each chunk its own write, drained
                    await writer.drain()
                    await asyncio.sleep(pace)
                writer.write(piece)
            writer.write(MESSAGES_TAIL if messages_api else TAIL)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int, cert: str | None, key: str | None) -> None:
    context = None
    if cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

    async def run() -> None:
        server = await asyncio.start_server(upstream_connection, "127.0.0.1", port, backlog=4096,
                                            ssl=context)
        async with server:
            await server.serve_forever()
    run_async(run())


def make_certificates(folder: str) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 it signs: (ca, cert, key) paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodechat bench CA")])
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)

    def builder(subject, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))

    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                       **usage), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         **usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(folder, name) for name in ("ca.pem", "cert.pem", "key.pem")]
    pem = serialization.Encoding.PEM
    for path, data in zip(paths, (ca.public_bytes(pem), leaf.public_bytes(pem), key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))):
        with open(path, "wb") as fh:
            fh.write(data)
    return paths[0], paths[1], paths[2]


# -- the naive proxy: Starlette StreamingResponse over httpx aiter_lines (the reference) ----------

NAIVE_PROXY = '''
import json, os, sys, httpx, uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ["OPENAI_BASE_URL"]
client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=4096,
                                                              max_keepalive_connections=4096))

async def completions(request: Request):
    body = await request.body()
    upstream = await client.send(client.build_request(
        "POST", UPSTREAM + "/chat/completions", content=body,
        headers={"content-type": "application/json"}), stream=True)

    async def relay():
        try:
            async for line in upstream.aiter_lines():
                if line == "data: [DONE]":
                    yield "data: [DONE]\\n\\n"
                elif line.startswith("data: "):
                    yield "data: " + json.dumps(json.loads(line[6:])) + "\\n\\n"
        finally:
            await upstream.aclose()

    return StreamingResponse(relay(), media_type="text/event-stream")

app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            http=sys.argv[2], loop=sys.argv[3])
'''


# -- the load generator: raw asyncio sockets -------------------------------------------------------

class ChunkClock:
    """Time to the first content chunk, and the gaps between the following ones."""

    def __init__(self, started: float):
        self.started, self.first, self.last, self.gaps = started, None, None, []

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.started
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def result(self) -> tuple[float, list[float], float]:
        return self.first or 0.0, self.gaps, time.perf_counter() - self.started


async def chunked_answer(reader, writer, payload: bytes, on_chunk) -> None:
    """Send one request on a kept-alive connection and read its chunked answer as it comes
    (one parse per read): ``on_chunk(arrival time, buffer, start, end)`` for each chunk, a
    plain call and no copy, since the load generator shares its core with the upstream."""
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    buffer = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("the server closed the connection mid-answer")
        now = time.perf_counter()
        buffer += data
        pos = 0
        while (eol := buffer.find(b"\r\n", pos)) >= 0:
            size = int(buffer[pos:eol], 16)
            end = eol + 2 + size + 2
            if end > len(buffer):
                break
            if size == 0:
                return
            on_chunk(now, buffer, eol + 2, end)
            pos = end
        buffer = buffer[pos:]


async def one_request(reader, writer, payload: bytes, content: bytes = b'"content"'
                      ) -> tuple[float, list[float], float]:
    """One request's (ttfc, gaps between content chunks, total); ``content`` marks a chunk
    that carries the answer's text."""
    clock = ChunkClock(time.perf_counter())

    def on_chunk(now: float, buffer: bytes, start: int, end: int) -> None:
        if buffer.find(content, start, end) >= 0:
            clock.tick()

    await chunked_answer(reader, writer, payload, on_chunk)
    return clock.result()


async def delta_times(reader, writer, payload: bytes) -> list[float]:
    """When each text delta of one request's UI stream arrived."""
    times: list[float] = []
    await chunked_answer(reader, writer, payload,
                         lambda now, buffer, start, end: times.extend([now] * buffer.count(b'"text-delta"', start, end)))
    return times


async def resume_elsewhere(post_port: int, read_port: int, turns: int, point: Point) -> dict:
    """Turns POSTed to one process and read (``GET /api/chat/{id}/stream``) on another, one at a
    time: how much later each live text delta reaches the reader than the POST."""
    added = []
    for _ in range(turns):
        cid = f"bench-resume-{uuid.uuid4().hex[:12]}"
        body = {"id": cid, "trigger": "submit-message", "messages": [
            {"id": "u1", "role": "user", "parts": [{"type": "text", "text": prompt(point)["content"]}]}]}
        poster = await asyncio.open_connection("127.0.0.1", post_port, limit=1 << 20)
        follower = await asyncio.open_connection("127.0.0.1", read_port, limit=1 << 20)
        posted = asyncio.ensure_future(delta_times(*poster, http_payload("/api/chat", body)))
        await asyncio.sleep(point.pace * point.chunks / 4)  # a quarter in: the rest is live
        attached = time.perf_counter()
        read = await delta_times(*follower, (f"GET /api/chat/{cid}/stream HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                             "authorization: Bearer bench\r\n\r\n").encode())
        sent = await posted
        if len(read) != len(sent):
            raise RuntimeError(f"the reader got {len(read)} deltas of {len(sent)}")
        added += [got - put for put, got in zip(sent, read) if put > attached + 0.05]
        for _, writer in (poster, follower):
            writer.close()
    return {"p50": 1000 * pct(added, 0.5), "p99": 1000 * pct(added, 0.99), "deltas": len(added)}


def http_payload(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer bench\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data


async def ws_open(port: int):
    """A minimal WebSocket client: the upgrade, then frames by hand (masked with zeros)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /chat?api_key=bench HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
                 f"connection: Upgrade\r\nsec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
                 .encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    return reader, writer


def ws_frame(payload: bytes) -> bytes:
    size = len(payload)
    head = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


async def ws_read(reader) -> bytes:
    first = await reader.readexactly(2)
    size = first[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    return await reader.readexactly(size)


async def ws_turn(reader, writer, payload: bytes) -> tuple[float, list[float], float]:
    started = time.perf_counter()
    writer.write(payload)
    clock = ChunkClock(started)
    while True:
        data = await ws_read(reader)
        if b'"done":true' in data:
            return clock.result()
        if b'"type":"error"' in data:
            raise RuntimeError(data.decode()[:200])
        if b'"type":"chunk"' in data:
            clock.tick()


def prompt(point: Point) -> dict:
    split = " split" if point.kind == SPLIT else ""
    return {"role": "user", "content": f"bench {point.chunks} {point.pace}{split}"}


async def load(ports: list[int], target: str, point: Point, duration: float,
               per_stream: int | None, tls: ssl.SSLContext | None = None) -> dict:
    """``point.streams`` clients spread over ``ports``, each making requests back to back on one
    kept-alive connection.  Targets: ``openai`` (/v1/chat/completions), ``sse`` (/api/chat),
    ``sse-conversation`` (/api/chat continuing a stored conversation), ``ws`` (/chat).

    Paced points: the streams start spread over one request's length (as requests arrive in
    real traffic, never all at once), and only requests that are neither a stream's first nor
    its last are timed, so that every timed request runs while all the others do."""
    openai = http_payload("/v1/chat/completions", {
        "model": "bench", "stream": True, "bench_chunks": point.chunks, "bench_pace": point.pace,
        "bench_split": point.kind == SPLIT, "messages": [prompt(point)]})
    sse = http_payload("/api/chat", {"messages": [prompt(point)]})
    doors = {"messages": (http_payload("/v1/messages", {"model": "bench", "max_tokens": 4096, "stream": True,
                                                        "messages": [prompt(point)]}), b'"text_delta"'),
             "responses": (http_payload("/v1/responses", {"model": "bench", "stream": True,
                                                          "input": [prompt(point)]}), b'"response.output_text.delta"'),
             "claude": (http_payload("/v1/chat/completions", {"model": "claude/bench", "stream": True,  # Messages upstream
                                                              "messages": [prompt(point)]}), b'"content"')}
    ttfcs, gaps, done = [], [], 0
    deadline = time.perf_counter() + duration

    async def worker(number: int) -> None:
        nonlocal done
        if point.pace:
            await asyncio.sleep(point.pace * point.chunks * number / point.streams)
        port = ports[number % len(ports)]
        tag = f"bench-{os.getpid()}-{number}-{uuid.uuid4().hex[:8]}"
        if target == "ws":
            reader, writer = await ws_open(port)  # a new thread every few turns, as people chat
            request = lambda count: ws_turn(reader, writer, ws_frame(json.dumps(
                {**prompt(point), "thread_id": f"{tag}-{count // TURNS_PER_CONVERSATION}"}).encode()))
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20, ssl=tls)
            if target == "sse-conversation":  # a new conversation every few turns
                request = lambda count: one_request(reader, writer, http_payload("/api/chat", {
                    "messages": [prompt(point)],
                    "conversationId": f"{tag}-{count // TURNS_PER_CONVERSATION}"}))
            elif target in doors:
                request = lambda count: one_request(reader, writer, *doors[target])
            else:
                request = lambda count: one_request(reader, writer, openai if target == "openai" else sse)
        count = 0
        while (per_stream is None and time.perf_counter() < deadline) or \
                (per_stream is not None and count < per_stream):
            ttfc, chunk_gaps, _ = await request(count)
            if not point.pace or 0 < count < per_stream - 1:
                ttfcs.append(ttfc)
                gaps.extend(chunk_gaps)
            done += 1
            count += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(point.streams)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "elapsed": elapsed, "ttfc": ttfcs, "gaps": gaps}


async def hold_idle_websockets(port: int, count: int, pid: int) -> dict:
    """Open ``count`` WebSockets, each answered once (a ping), and keep them open a moment."""
    held = []
    for _ in range(count):
        reader, writer = await ws_open(port)
        writer.write(ws_frame(b'{"type":"ping"}'))
        await ws_read(reader)
        held.append(writer)
    await asyncio.sleep(0.5)
    after = rss_mb(pid)
    for writer in held:
        writer.close()
    return {"ws_count": count, "rss_with_ws": after}


# -- processes ---------------------------------------------------------------------------------------

def cpu_seconds(pid: int, children: bool = False) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (sum(int(f) for f in fields[11:15 if children else 13])) / TICKS


def read_calls(pid: int) -> int:
    """read(2) calls so far (/proc/<pid>/io syscr): uvloop reads sockets with read(2), asyncio
    with recv(2), which is not counted."""
    with contextlib.suppress(OSError):
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("syscr:"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child_pids(pid: int) -> set[int]:
    children = set()
    for stat in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if stat.isdigit() and int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                children.add(int(stat))
    return children


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(extra: dict) -> dict:
    """The caller's environment less proxies (nodechat would hand its stream to httpx) and
    less NODECHAT_*/OPENAI_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("NODECHAT_", "OPENAI_")) and not k.lower().endswith("_proxy")}
    return {**env, **extra}


class Server:
    """One process under test on core 1: start to ready, idle RSS, peak RSS, its log."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict, log_dir: str, cores: set = frozenset({1})):
        self.name, self.port = name, port
        self.log = os.path.join(log_dir, f"{name.replace(' ', '_').replace('/', '')}-{port}.log")
        began = time.perf_counter()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=out,
                                         stderr=subprocess.STDOUT)
        os.sched_setaffinity(self.proc.pid, cores)  # before --workers forks: they inherit it
        wait_for_port(port, self.proc, self.log)
        self.ready_s = time.perf_counter() - began
        time.sleep(0.3)
        self.idle_mb = rss_mb(self.proc.pid)
        self.peak_mb = self.idle_mb

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.peak_mb = rss_mb(self.proc.pid, "VmHWM")
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        text = open(self.log, errors="replace").read()
        if "Traceback" in text or "ERROR" in text:
            print(f"warning: {self.name} logged errors:\n{text[-3000:]}", file=sys.stderr)


def wait_for_port(port: int, proc: subprocess.Popen, log: str | None = None) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    proc.kill()
    tail = open(log, errors="replace").read()[-3000:] if log else ""
    raise RuntimeError(f"{proc.args} did not start\n{tail}")


def nodechat_command(port: int, pure: bool) -> list[str]:
    """How users run it (the README's command), or as a host mounting it on the pure-Python stack."""
    if pure:
        return [sys.executable, "-m", "uvicorn", "nodechat:create_app", "--factory", "--http", "h11",
                "--loop", "asyncio", "--ws", "wsproto", "--port", str(port), "--log-level", "warning"]
    return [sys.executable, "nodechat.py", "--port", str(port), "--log-level", "warning"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(ports: list[int], pids: list[int], target: str, point: Point, duration: float,
            per_stream: int | None = None, tls: ssl.SSLContext | None = None) -> dict:
    """One point: the load, and the CPU the processes ``pids`` spent on it."""
    before, reads = sum(cpu_seconds(pid) for pid in pids), sum(read_calls(pid) for pid in pids)
    result = run_async(load(ports, target, point, duration, per_stream, tls))
    cpu = sum(cpu_seconds(pid) for pid in pids) - before
    reads = sum(read_calls(pid) for pid in pids) - reads - result["requests"]  # less the requests' own
    return {"rps": result["requests"] / result["elapsed"], "cpu_ms": 1000 * cpu / result["requests"],
            "ttfc50": 1000 * pct(result["ttfc"], 0.5), "ttfc99": 1000 * pct(result["ttfc"], 0.99),
            "gap99": 1000 * pct(result["gaps"], 0.99), "requests": result["requests"],
            "events_per_read": result["requests"] * (point.chunks + 3) / reads if reads > 0 else float("nan")}


# -- the run --------------------------------------------------------------------------------------

class Bench:
    """Runs the points against each process and keeps the results for the report."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="nodechat-bench-")
        self.results: dict[Point, dict[str, list[dict]]] = {}
        self.servers: dict[str, Server] = {}
        self.idle_ws: dict = {}
        self.pg_cluster: PostgresCluster | None = None
        self.pg_storage: dict | None = None
        self.pg_resume: dict | None = None
        self.duration = 0.5 if args.quick else args.duration
        self.paced_chunks = 20 if args.quick else PACED_CHUNKS
        self.paced_requests = 3  # the middle one is timed
        self.scan = args.scan or (PACED_SCAN[:2] if args.quick else PACED_SCAN)
        if args.pure:
            self.options = {"http": "h11", "loop": "asyncio", "ws": "wsproto"}
        else:
            sys.path.insert(0, ROOT)
            import nodechat
            self.options = nodechat.server_options()  # what python nodechat.py picks
        self.ca, self.cert, self.key = make_certificates(self.work)
        self.client_tls = ssl.create_default_context(cafile=self.ca)
        self.up_port, self.tls_port = free_port(), free_port()
        self.env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{self.up_port}/v1", "NODECHAT_MODEL": "bench",
                    "NODECHAT_TOKENS": "bench:bench",
                    "NODECHAT_DATA_DIR": os.path.join(self.work, "data")}
        self.upstreams: list[subprocess.Popen] = []

    def start_upstreams(self) -> None:
        """The fake upstream on plain HTTP and over TLS, both on core 0."""
        self._upstream(self.up_port)
        self._upstream(self.tls_port, self.cert, self.key)

    def _upstream(self, port: int, cert: str | None = None, key: str | None = None) -> None:
        cmd = [sys.executable, __file__, "--serve-upstream", str(port)]
        if cert:
            cmd += ["--tls-cert", cert, "--tls-key", key]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.upstreams.append(proc)
        os.sched_setaffinity(proc.pid, {0})
        wait_for_port(port, proc)

    def paced(self, streams: int) -> Point:
        return Point("", streams, self.paced_chunks, PACE)

    def run_points(self, name: str, ports: list[int], pids: list[int], target: str,
                   points: list[Point], tls: ssl.SSLContext | None = None) -> None:
        for point in points:
            if self.args.paced_only and not point.pace:
                continue
            runs = self.results.setdefault(point, {}).setdefault(name, [])
            for _ in range(self.args.repeat):
                runs.append(measure(ports, pids, target, point, self.duration,
                                    self.paced_requests if point.pace else None, tls))

    def warm(self, port: int, target: str) -> None:
        """A few unmeasured requests: connections, caches and first-call imports."""
        run_async(load([port], target, Point("", 4, 20), 0.3, None))

    @contextlib.contextmanager
    def server(self, name: str, cmd_for, env: dict | None = None, cores: set = frozenset({1})):
        port = free_port()
        server = Server(name, cmd_for(port), port, {**self.env, **(env or {})}, self.work, cores)
        self.servers[name] = server
        try:
            yield server
        finally:
            server.stop()

    def run(self) -> None:
        self.start_upstreams()
        parts = {"upstream": self.measure_upstream, "naive": self.measure_naive,
                 "openai": self.measure_openai_path, "tls": self.measure_tls,
                 "agent": self.measure_agent, "idle": self.measure_idle_websockets,
                 "against": self.measure_against, "doors": self.measure_front_doors,
                 "kinds": self.measure_upstream_kinds, "workers": self.measure_workers}
        for name, part in parts.items():
            if not self.args.only or name in self.args.only or name == "upstream":
                part()
        if self.args.postgres:
            self.measure_postgres()

    def measure_upstream(self) -> None:
        """The upstream alone: the floor each point is compared with."""
        pid = self.upstreams[0].pid
        self.run_points("upstream", [self.up_port], [pid], "openai", UNPACED + SPLIT_POINTS)
        self.run_points("upstream", [self.up_port], [pid], "openai", [self.paced(s) for s in self.scan])
        self.run_points("upstream", [self.tls_port], [self.upstreams[1].pid], "openai", TLS_POINTS,
                        self.client_tls)

    def measure_naive(self) -> None:
        naive_file = os.path.join(self.work, "naive_proxy.py")
        with open(naive_file, "w") as fh:
            fh.write(NAIVE_PROXY)
        command = lambda port: [sys.executable, naive_file, str(port), self.options["http"],
                                self.options["loop"]]
        with self.server("naive", command) as naive:
            self.warm(naive.port, "openai")
            self.run_points("naive", [naive.port], [naive.pid], "openai", UNPACED + SPLIT_POINTS)
            self.run_points("naive", [naive.port], [naive.pid], "openai",
                            [self.paced(s) for s in self.scan[:2]])

    def nodechat(self, port: int) -> list[str]:
        return nodechat_command(port, self.args.pure)

    def measure_openai_path(self) -> None:
        """/v1/chat/completions with the default settings: no turn cap applies there."""
        with self.server("nodechat", self.nodechat) as node:
            self.warm(node.port, "openai")
            self.run_points("nodechat", [node.port], [node.pid], "openai", UNPACED + SPLIT_POINTS)
            self.run_points("nodechat", [node.port], [node.pid], "openai", [self.paced(s) for s in self.scan])

    def measure_tls(self) -> None:
        """The upstream over TLS, its CA trusted through SSL_CERT_FILE."""
        env = {"OPENAI_BASE_URL": f"https://127.0.0.1:{self.tls_port}/v1", "SSL_CERT_FILE": self.ca}
        with self.server("nodechat TLS upstream", self.nodechat, env) as node:
            self.warm(node.port, "openai")
            self.run_points("nodechat", [node.port], [node.pid], "openai", TLS_POINTS)

    def measure_agent(self) -> None:
        """/api/chat (stateless and on stored conversations) and /chat, then both stored kinds
        again with the data dir on tmpfs (no fsync cost, which hides their cost per event)."""
        cap = {"NODECHAT_MAX_TURNS_PER_USER": str(AGENT_TURN_CAP)}
        with self.server("nodechat agent", self.nodechat, cap) as node:
            self.warm(node.port, "sse")
            self.run_points("nodechat /api/chat", [node.port], [node.pid], "sse", AGENT_POINTS)
            self.run_points("nodechat /api/chat stored", [node.port], [node.pid], "sse-conversation",
                            AGENT_POINTS)
            self.run_points("nodechat /chat ws", [node.port], [node.pid], "ws", AGENT_POINTS)
        shm = tempfile.mkdtemp(prefix="nodechat-bench-", dir="/dev/shm")
        try:
            with self.server("nodechat agent tmpfs", self.nodechat,
                             {**cap, "NODECHAT_DATA_DIR": shm}) as node:
                self.warm(node.port, "sse")
                self.run_points("nodechat /chat ws tmpfs", [node.port], [node.pid], "ws", AGENT_POINTS)
                self.run_points("nodechat /api/chat stored tmpfs", [node.port], [node.pid], "sse-conversation",
                                AGENT_POINTS)
        finally:
            shutil.rmtree(shm, ignore_errors=True)

    def measure_against(self) -> None:
        """With ``--against DIR``: the agent paths of this checkout and of DIR's nodechat.py in one
        run, servers side by side, each point's repeats alternating between them (runs apart
        differ more than the changes measured).  Stored conversations on tmpfs, where no fsync
        hides the cost per event."""
        if not self.args.against:
            return
        other = os.path.join(os.path.abspath(self.args.against), "nodechat.py")
        against = lambda port: [sys.executable, other, *nodechat_command(port, False)[2:]]
        shm = tempfile.mkdtemp(prefix="nodechat-bench-", dir="/dev/shm")
        env = {"NODECHAT_MAX_TURNS_PER_USER": str(AGENT_TURN_CAP), "NODECHAT_DATA_DIR": shm,
               "NODECHAT_METRICS": "1"}  # a checkout without metrics ignores it
        try:
            with self.server("nodechat ab", self.nodechat, env) as mine, \
                    self.server("nodechat ab against", against, env) as theirs:
                for node in (mine, theirs):
                    self.warm(node.port, "sse-conversation")
                self._alternate(mine, theirs, (("openai", "/v1"), ("sse", "/api/chat"),
                                               ("sse-conversation", "/api/chat stored tmpfs")))
            disk = os.path.join(self.work, "against-disk")  # the stores' fsyncs in the figures
            with self.server("nodechat ab disk", self.nodechat, {**env, "NODECHAT_DATA_DIR": disk + "-this"}) as mine, \
                    self.server("nodechat ab disk against", against,
                                {**env, "NODECHAT_DATA_DIR": disk + "-against"}) as theirs:
                for node in (mine, theirs):
                    self.warm(node.port, "sse-conversation")
                self._alternate(mine, theirs, (("sse-conversation", "/api/chat stored disk"), ("ws", "/chat disk")))
        finally:
            shutil.rmtree(shm, ignore_errors=True)

    def _alternate(self, mine: Server, theirs: Server, targets: tuple) -> None:
        """Each point's repeats alternating between the two servers."""
        for target, label in targets:
            for point in AGENT_POINTS:
                for _ in range(self.args.repeat):
                    for node, name in ((mine, "this"), (theirs, "against")):
                        runs = self.results.setdefault(point, {}).setdefault(f"{label} ({name})", [])
                        runs.append(measure([node.port], [node.pid], target, point, self.duration))

    def measure_front_doors(self) -> None:
        """/v1/chat/completions, /v1/messages and /v1/responses on one server, each point's
        repeats alternating between them: the cost of each protocol's encoder per event."""
        with self.server("nodechat doors", self.nodechat) as node:
            for target in ("openai", "messages", "responses"):
                self.warm(node.port, target)
            for point in AGENT_POINTS:
                for _ in range(self.args.repeat):
                    for target, label in (("openai", "/v1/chat/completions"), ("messages", "/v1/messages"),
                                          ("responses", "/v1/responses")):
                        runs = self.results.setdefault(point, {}).setdefault(f"door {label}", [])
                        runs.append(measure([node.port], [node.pid], target, point, self.duration))

    def measure_upstream_kinds(self) -> None:
        """/v1/chat/completions on one server with two providers, the same fake answer in
        chat-completions chunks and in Messages events, each point's repeats alternating:
        the native Anthropic provider's cost per event against the OpenAI provider's."""
        config = os.path.join(self.work, "two-providers.toml")
        with open(config, "w") as file:
            file.write(f'[[providers]]\nname = "openai"\nbase_url = "http://127.0.0.1:{self.up_port}/v1"\n\n'
                       f'[[providers]]\nname = "claude"\nkind = "anthropic"\n'
                       f'base_url = "http://127.0.0.1:{self.up_port}"\nmodels = ["bench"]\n')
        with self.server("nodechat upstreams", self.nodechat, {"NODECHAT_CONFIG": config}) as node:
            for target in ("openai", "claude"):
                self.warm(node.port, target)
            for point in AGENT_POINTS:
                for _ in range(self.args.repeat):
                    for target, label in (("openai", "OpenAI"), ("claude", "Anthropic")):
                        runs = self.results.setdefault(point, {}).setdefault(f"upstream kind {label}", [])
                        runs.append(measure([node.port], [node.pid], target, point, self.duration))

    def measure_workers(self) -> None:
        """``--workers 1`` against ``--workers 2``, both free to run on either core (where the
        fake upstream and the load generator run too: on this 2-core machine a second worker
        competes with them), data dir on disk: /api/chat turns on stored conversations at 16
        streams, and paced /v1 streams.  CPU is the workers' own."""
        cap = {"NODECHAT_MAX_TURNS_PER_USER": str(AGENT_TURN_CAP)}
        for count in (1, 2):
            command = lambda port: [*self.nodechat(port), "--workers", str(count)]
            with self.server(f"nodechat {count} worker", command, cap, cores={0, 1}) as node:
                deadline = time.time() + 10
                while count > 1 and len(child_pids(node.pid)) < count and time.time() < deadline:
                    time.sleep(0.1)
                pids = sorted(child_pids(node.pid)) if count > 1 else [node.pid]
                self.warm(node.port, "sse-conversation")
                name = f"nodechat --workers {count}"
                self.run_points(name, [node.port], pids, "sse-conversation", [Point("", 16, 20)])
                self.run_points(name, [node.port], pids, "openai", [self.paced(s) for s in self.scan[-3:]])

    def measure_idle_websockets(self) -> None:
        """Idle WebSockets on a fresh process, so that memory freed earlier hides nothing."""
        with self.server("nodechat idle ws", self.nodechat) as node:
            before = rss_mb(node.pid)
            held = run_async(hold_idle_websockets(node.port, 200 if self.args.quick else 1000, node.pid))
            self.idle_ws = {**held, "rss_before_ws": before}

    def measure_postgres(self) -> None:
        """A throwaway cluster: PostgresStore's figures, then /api/chat turns stored in it."""
        if not os.path.exists(os.path.join(PG_BIN, "pg_ctl")):
            print(f"--postgres: no PostgreSQL binaries in {PG_BIN}; skipped", file=sys.stderr)
            return
        self.pg_cluster = PostgresCluster()
        self.pg_storage = postgres_store_figures(self.pg_cluster, self.options["loop"])
        self.measure_postgres_processes(self.pg_cluster)
        self.measure_resume_elsewhere(self.pg_cluster)

    def measure_postgres_processes(self, cluster: PostgresCluster) -> None:
        """Three nodechat processes on one database, then one, at the same point."""
        env = {"NODECHAT_MAX_TURNS_PER_USER": str(AGENT_TURN_CAP)}
        for count in (3, 1):
            env["NODECHAT_DATABASE_URL"] = cluster.create_database()
            name = f"nodechat /api/chat, {count} process{'es' if count > 1 else ''}"
            runs = self.results.setdefault(PG_POINT, {}).setdefault(name, [])
            with contextlib.ExitStack() as stack:
                nodes = [stack.enter_context(self.server(f"nodechat pg {n + 1} of {count}", self.nodechat, env))
                         for n in range(count)]
                for node in nodes:
                    self.warm(node.port, "sse")
                for _ in range(self.args.repeat):
                    before = cluster.cpu_seconds()
                    run = measure([n.port for n in nodes], [n.pid for n in nodes], "sse-conversation",
                                  PG_POINT, 1.5 if self.args.quick else 4.0)
                    run["pg_cpu_ms"] = 1000 * (cluster.cpu_seconds() - before) / run["requests"]
                    runs.append(run)

    def measure_resume_elsewhere(self, cluster: PostgresCluster) -> None:
        """A turn on one process read on another (the chunk table and NOTIFY between them):
        the added latency per chunk, and the database writes per turn."""
        url = cluster.create_database()
        point = Point("", 1, 100, 0.02)
        with self.server("nodechat resume A", self.nodechat, {"NODECHAT_DATABASE_URL": url}) as a, \
                self.server("nodechat resume B", self.nodechat, {"NODECHAT_DATABASE_URL": url}) as b:
            self.warm(a.port, "sse")
            before = run_async(database_counts(url))
            turns = 4 if self.args.quick else 12
            self.pg_resume = run_async(resume_elsewhere(a.port, b.port, turns, point))
            after = run_async(database_counts(url))
        self.pg_resume.update(turns=turns, point=point, **{
            key: (after[key] - before[key]) / turns for key in before})

    def close(self) -> None:
        for proc in self.upstreams:
            proc.terminate()
            proc.wait(10)
        if self.pg_cluster:
            self.pg_cluster.destroy()
        shutil.rmtree(self.work, ignore_errors=True)


# -- PostgreSQL ------------------------------------------------------------------------------------

class PostgresCluster:
    """A throwaway PostgreSQL cluster (fsync on: durable as in production) in a temp dir on a
    free loopback port, trust auth, user ``nodechat``, run as a non-root user; on core 0."""

    def __init__(self):
        self.user = pg_server_user()
        self.dir = tempfile.mkdtemp(prefix="nodechat-bench-pg-")
        self.port = free_port()
        if self.user:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", f"{self.dir}/data", "-U", "nodechat", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        self._run("pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/server.log", "-w", "-t", "30",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
                  "-c max_connections=200", "start")
        self.pid = int(open(f"{self.dir}/data/postmaster.pid").readline())
        os.sched_setaffinity(self.pid, {0})  # backends inherit it: core 1 stays nodechat's

    def url(self, database: str) -> str:
        return f"postgresql://nodechat@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = "bench_" + uuid.uuid4().hex[:12]
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "nodechat", name)
        return self.url(name)

    def cpu_seconds(self) -> float:
        """The postmaster with its exited children, plus its live backends."""
        total = cpu_seconds(self.pid, children=True)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                    if int(fields[1]) == self.pid:
                        total += (int(fields[11]) + int(fields[12])) / TICKS
        return total

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", f"{self.dir}/data", "-m", "fast", "-w", "-t", "30", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        as_user = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[]) if self.user else {}
        done = subprocess.run([os.path.join(PG_BIN, program), *args], capture_output=True, text=True,
                              timeout=60, **as_user)
        if done.returncode:
            raise RuntimeError(f"{program} failed: {done.stderr.strip()[-500:]}")


def pg_server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, take (or make) a system user.

    The tests' ``server_user`` does the same; the bench keeps its own copy because it runs
    without the test extras (importing test_nodechat would need pytest and the clients)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nodechat-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "nodechat-pg"], check=True, capture_output=True)
    return pwd.getpwnam("nodechat-pg")


# -- the report ------------------------------------------------------------------------------------

def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def point_label(point: Point) -> str:
    label = f"{point.streams} x {point.chunks}"
    return f"{label} ({point.kind})" if point.kind else label


def fit(results: dict, name: str, kind: str, streams: int) -> tuple[float, float] | None:
    """CPU per streamed event (µs) and fixed CPU per request (ms) from the 20- and 200-chunk
    points at ``streams``."""
    try:
        c20 = med(results[Point(kind, streams, 20)][name], "cpu_ms")
        c200 = med(results[Point(kind, streams, 200)][name], "cpu_ms")
    except KeyError:
        return None
    per_event = (c200 - c20) / 180
    return per_event * 1000, c20 - 20 * per_event


def report_points(results: dict) -> None:
    print("\n| streams x chunks | pace | server | req/s | CPU ms/req | TTFC p50 ms (added) | "
          "TTFC p99 ms (added) | gap p99 ms (added) |")
    print("|---|---|---|---|---|---|---|---|")
    for point, by_name in results.items():
        base = by_name.get("upstream")
        for name, runs in by_name.items():
            def added(key):
                if name == "upstream" or base is None:
                    return ""
                return f" ({med(runs, key) - med(base, key):+.2f})"
            gap = f"{med(runs, 'gap99'):.1f}{added('gap99')}" if point.pace else "—"
            print(f"| {point_label(point)} | {'%d ms' % (point.pace * 1000) if point.pace else '—'} | "
                  f"{name} | {med(runs, 'rps'):.0f} | {med(runs, 'cpu_ms'):.2f} | "
                  f"{med(runs, 'ttfc50'):.2f}{added('ttfc50')} | {med(runs, 'ttfc99'):.2f}{added('ttfc99')} | "
                  f"{gap} |")


AGAINST_LABELS = ("/v1", "/api/chat", "/api/chat stored tmpfs", "/api/chat stored disk", "/chat disk")


def report_fits(results: dict) -> None:
    rows = [(name, "", streams) for streams in (1, 16, 64) for name in ("upstream", "naive", "nodechat")]
    rows += [(name, SPLIT, 64) for name in ("upstream", "naive", "nodechat")]
    rows += [(name, "TLS", 1) for name in ("upstream", "nodechat")]
    agents = ("nodechat /api/chat", "nodechat /api/chat stored", "nodechat /chat ws", "nodechat /chat ws tmpfs",
              "nodechat /api/chat stored tmpfs")
    rows += [(name, "", 1) for name in agents]
    rows += [(f"{label} ({name})", "", 1) for label in AGAINST_LABELS for name in ("this", "against")]
    print("\n| server | upstream | streams | CPU per streamed event | fixed CPU per request |")
    print("|---|---|---|---|---|")
    fits = {}
    for name, kind, streams in rows:
        fitted = fits[name, kind, streams] = fit(results, name, kind, streams)
        if fitted:
            print(f"| {name} | {kind or 'plain HTTP'} | {streams} | {fitted[0]:.1f} µs | {fitted[1]:.2f} ms |")
    openai = fits.get(("nodechat", "", 1))
    if openai:
        for name in agents:
            if fits.get((name, "", 1)):
                print(f"{name}: {fits[name, '', 1][0] / openai[0]:.2f}x the OpenAI path per event (1 stream)")
    doors = {label: fit(results, f"door {label}", "", 1)
             for label in ("/v1/chat/completions", "/v1/messages", "/v1/responses")}
    if all(doors.values()):
        base = doors["/v1/chat/completions"]
        print("front doors, one server, alternating: " + "; ".join(
            f"{label} {f[0]:.1f} µs per event ({f[0] / base[0]:.2f}x), {f[1]:.2f} ms per request"
            for label, f in doors.items()))
    kinds = {label: fit(results, f"upstream kind {label}", "", 1) for label in ("OpenAI", "Anthropic")}
    if all(kinds.values()):
        base = kinds["OpenAI"]
        print("upstream kinds, /v1 on one server, alternating: " + "; ".join(
            f"{label} {f[0]:.1f} µs per event ({f[0] / base[0]:.2f}x), {f[1]:.2f} ms per request"
            for label, f in kinds.items()))
    for label in AGAINST_LABELS:
        mine, theirs = fits.get((f"{label} (this)", "", 1)), fits.get((f"{label} (against)", "", 1))
        if mine and theirs:
            print(f"{label}: this checkout {mine[0] / theirs[0]:.2f}x the other per event, "
                  f"{mine[1] / theirs[1]:.2f}x per request (same run, alternating)")
    for label in ("/api/chat stored disk", "/chat disk"):  # 16 streams: what group commit is for
        runs = {name: results.get(Point("", 16, 20), {}).get(f"{label} ({name})") for name in ("this", "against")}
        if all(runs.values()):
            print(f"{label}, 16 streams x 20 chunks: this checkout {med(runs['this'], 'rps'):.0f} turns/s, "
                  f"{med(runs['this'], 'cpu_ms'):.2f} ms CPU a turn; the other {med(runs['against'], 'rps'):.0f} "
                  f"turns/s, {med(runs['against'], 'cpu_ms'):.2f} ms")
    disk, tmpfs = fits.get(("nodechat /chat ws", "", 1)), fits.get(("nodechat /chat ws tmpfs", "", 1))
    if disk and tmpfs:
        print(f"/chat fixed cost per turn: {disk[1]:.2f} ms with its two durable appends (data dir on disk), "
              f"{tmpfs[1]:.2f} ms without (tmpfs)")
    tls, plain = fits.get(("nodechat", "TLS", 1)), openai
    if tls and plain:
        print(f"nodechat per event, 1 stream: {plain[0]:.1f} µs plain HTTP, {tls[0]:.1f} µs over TLS "
              f"(fixed {plain[1]:.2f} / {tls[1]:.2f} ms)")


def report_reads(results: dict, loop: str) -> None:
    """How many upstream events one read(2) of the server carried: what "chunk per write" got."""
    if loop != "uvloop":
        print("upstream events per read: not counted (asyncio reads sockets with recv(2), "
              "which /proc/<pid>/io does not count)")
        return
    parts = []
    for point in (Point("", 64, 200), Point(SPLIT, 64, 20), Point(SPLIT, 64, 200)):
        found = [f"{name} {med(runs, 'events_per_read'):.1f}" for name, runs in results.get(point, {}).items()
                 if name in ("naive", "nodechat")]
        if found:
            parts.append(f"{point_label(point)}: {', '.join(found)}")
    print("upstream events per read(2) call of the server (about; /proc/<pid>/io): " + "; ".join(parts))


def report_first_chunk(results: dict) -> None:
    point = results.get(Point("", 1, 20), {})
    if "upstream" not in point:
        return
    base = med(point["upstream"], "ttfc50")
    added = ", ".join(f"{name} {med(runs, 'ttfc50') - base:+.2f} ms" for name, runs in point.items()
                      if name != "upstream")
    print(f"\nadded TTFC p50 at 1 stream (1 x 20, upstream alone {base:.2f} ms): {added}")


def report_paced(results: dict, scan: tuple, chunks: int) -> None:
    for name in ("naive", "nodechat"):
        held, tried = [], []
        for streams in scan:
            point = results.get(Point("", streams, chunks, PACE), {})
            if name in point and "upstream" in point:
                tried.append(streams)
                ttfc = med(point[name], "ttfc50") - med(point["upstream"], "ttfc50")
                gap = med(point[name], "gap99") - med(point["upstream"], "gap99")
                if ttfc <= 5 and gap <= 20:
                    held.append(streams)
        if tried:
            print(f"paced at 20 ms x {chunks} chunks: most streams {name} held within +5 ms TTFC p50 "
                  f"and +20 ms gap p99: {max(held) if held else 'none'} (tried {', '.join(map(str, tried))})")


def report_processes(bench: Bench) -> None:
    for name, server in bench.servers.items():
        if name.startswith("nodechat pg"):
            continue
        line = (f"{name}: start to ready {server.ready_s:.2f} s, idle RSS {server.idle_mb:.1f} MB, "
                f"peak RSS {server.peak_mb:.1f} MB")
        if name == "nodechat idle ws" and bench.idle_ws:
            info = bench.idle_ws
            per = (info["rss_with_ws"] - info["rss_before_ws"]) * 1024 / info["ws_count"]
            line += (f"; {info['ws_count']} idle WebSockets held: RSS {info['rss_before_ws']:.1f} -> "
                     f"{info['rss_with_ws']:.1f} MB ({per:.1f} KB each)")
        print(line)


def report_postgres_processes(results: dict) -> None:
    point = results.get(PG_POINT)
    if not point:
        return
    print(f"\n/api/chat on PostgreSQL (fsync on), {PG_POINT.streams} streams x {PG_POINT.chunks} chunks, "
          f"each stream continuing a stored conversation for {TURNS_PER_CONVERSATION} turns; "
          "every nodechat process on core 1, PostgreSQL on core 0:")
    for name, runs in point.items():
        rps, cpu, pg = med(runs, "rps"), med(runs, "cpu_ms"), med(runs, "pg_cpu_ms")
        print(f"  {name}: {rps:.0f} turns/s, nodechat CPU {cpu:.2f} ms/turn (all processes: core 1 "
              f"{rps * cpu / 10:.0f}% busy), PostgreSQL CPU {pg:.2f} ms/turn ({rps * pg / 10:.0f}% of core 0), "
              f"TTFC p50 {med(runs, 'ttfc50'):.2f} ms, p99 {med(runs, 'ttfc99'):.2f} ms")


def report_resume_elsewhere(figures: dict | None) -> None:
    if not figures:
        return
    point = figures["point"]
    print(f"\n/api/chat turn POSTed to one process, read on another (PostgreSQL, fsync on), "
          f"{point.chunks} chunks {point.pace * 1000:.0f} ms apart, {figures['turns']} turns: each live text "
          f"delta reaches the other process's reader {figures['p50']:.1f} ms later (p50), "
          f"{figures['p99']:.1f} ms (p99), over {figures['deltas']} deltas; per turn "
          f"{figures['chunk_rows']:.1f} chunk INSERTs, about {figures['commits']:.0f} commits in all "
          f"(the turn's row, its messages, heartbeats, reads)")


async def database_counts(url: str) -> dict:
    """Rows in the chunk table, and the database's commits (as its statistics have them), so far."""
    import asyncpg
    await asyncio.sleep(1.0)  # statistics are flushed about once a second
    db = await asyncpg.connect(url)
    try:
        # chunks outlive their turn a minute: every bench turn's are still there
        return {"chunk_rows": await db.fetchval("SELECT count(*) FROM nodechat_turn_chunks"),
                "commits": await db.fetchval(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")}
    finally:
        await db.close()


def report_import_time() -> None:
    import py_compile
    py_compile.compile(os.path.join(ROOT, "nodechat.py"))  # as after pip install: a .pyc exists
    imports = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nodechat"],
                             cwd=ROOT, capture_output=True, text=True).stderr.strip().splitlines()
        imports.append(int(out[-1].split("|")[1]) / 1000)
    print(f"import nodechat: {statistics.median(imports):.0f} ms (python -X importtime with its .pyc, median of 5)")


def report(bench: Bench) -> None:
    options = bench.options
    how = ("python -m uvicorn nodechat:create_app --factory --http h11 --loop asyncio --ws wsproto"
           if bench.args.pure else "python nodechat.py")
    print(f"\nnodechat served by `{how}` (http={options['http']} loop={options['loop']} ws={options['ws']}); "
          f"the naive proxy on the same http and loop; agent points with "
          f"NODECHAT_MAX_TURNS_PER_USER={AGENT_TURN_CAP} (all streams are one user: up to 16 turns at once)")
    report_points(bench.results)
    report_fits(bench.results)
    report_reads(bench.results, options["loop"])
    report_first_chunk(bench.results)
    report_paced(bench.results, bench.scan, bench.paced_chunks)
    report_processes(bench)
    report_postgres_processes(bench.results)
    report_import_time()
    report_metrics_scrape()


def report_metrics_scrape() -> None:
    """GET /metrics's own work with 50 models x 10 tools of label sets (the issue's target: 5 ms)."""
    sys.path.insert(0, ROOT)
    import nodechat

    metrics = nodechat.Metrics()
    for model in range(50):
        for tool in range(10):
            metrics.tool_calls.inc((f"tool-{tool}", "ok"))
            metrics.ttft.observe(("openai", f"model-{model}"), tool / 10)
            metrics.tokens.inc((f"model-{model}", "input", "false"), 10)
        metrics.tpot.observe((f"model-{model}",), 0.02)
        for status in ("200", "429", "502"):
            metrics.upstream.inc((f"provider-{model % 5}", status))
    times = []
    for _ in range(50):
        started = time.perf_counter()
        body = metrics.render()
        times.append(time.perf_counter() - started)
    print(f"GET /metrics rendering, 50 models x 10 tools: {statistics.median(times) * 1000:.2f} ms, "
          f"{len(body) // 1024} KiB, {body.count(chr(10))} lines (median of 50)")


# -- the stores ------------------------------------------------------------------------------------

MESSAGE = {"role": "user", "content": "a message of ordinary length " * 4}


def bench_memories() -> list[dict]:
    """10,000 memories of 8 words each out of 5,005, a few of them the query's."""
    words = [f"w{i}" for i in range(5000)] + "tea coffee bicycle oslo piano".split()
    return [{"id": f"m{i}", "content": " ".join(words[(i * 7 + k * 13) % len(words)] for k in range(8)),
             "created_at": "2026-01-01T00:00:00.000000Z"} for i in range(10_000)]


def bench_listing(count: int = 10_000) -> list[dict]:
    """The metas of ``count`` conversations of user ``lister``, one a second."""
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    stamps = [(start + datetime.timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S.000000Z") for n in range(count)]
    return [{"id": f"list-{n}", "user_id": "lister", "title": f"conversation {n}",
             "created_at": stamps[n], "updated_at": stamps[n]} for n in range(count)]


async def timed(work, repeat: int = 30) -> float:
    """Median ms of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        await work()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


async def store_figures(store) -> dict:
    """The figures both stores report, the data already in place."""
    query = "which bicycle and tea"
    return {"short": await timed(lambda: store.append_messages("short", [MESSAGE])),
            "long": await timed(lambda: store.append_messages("long", [MESSAGE])),
            "search_first": await timed(lambda: store.search_memories("u", query, 10), 1),
            "search": await timed(lambda: store.search_memories("u", query, 10)),
            "list_first": await timed(lambda: store.list_conversations("lister"), 1),
            "list": await timed(lambda: store.list_conversations("lister")),
            "list_all": await timed(lambda: store.list_conversations("lister", limit=10_000), 5)}


def print_store_figures(name: str, f: dict) -> None:
    print(f"storage, {name}: append one message to a 10-message conversation {f['short']:.2f} ms, to a "
          f"10,000-message one {f['long']:.2f} ms; search 10,000 memories {f['search']:.2f} ms "
          f"({f['search_first']:.0f} ms the first time); a user with 10,000 conversations: list the "
          f"newest 100 {f['list']:.2f} ms ({f['list_first']:.0f} ms the first time), all {f['list_all']:.1f} ms")


async def fill_json_store(root: str) -> None:
    """Conversations of 10 and 10,000 messages and 10,000 memories through JSONFileStore, and
    the listing log (users/<user>.jsonl, one meta a line) of a user with 10,000 conversations."""
    import nodechat

    store = nodechat.JSONFileStore(root)
    for cid, size in (("short", 10), ("long", 10_000)):
        await store.create_conversation(cid, "u")
        await store.append_messages(cid, [MESSAGE] * size)
    nodechat._write_json(store._memories("u"), bench_memories())
    os.makedirs(os.path.join(root, "users"), exist_ok=True)
    with open(os.path.join(root, "users", "lister.jsonl"), "w") as fh:
        fh.writelines(json.dumps(meta) + "\n" for meta in bench_listing())


def report_storage(loop: str) -> None:
    """JSONFileStore (data dir in /tmp, fsync on every write): appending to a long conversation
    vs a short one (each append also writes the meta and a per-user listing line), searching
    10,000 memories, listing a user's 10,000 conversations."""
    sys.path.insert(0, ROOT)
    import nodechat

    async def run() -> dict:
        root = tempfile.mkdtemp(prefix="nodechat-store-")
        try:
            await fill_json_store(root)
            return await store_figures(nodechat.JSONFileStore(root))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print_store_figures("JSONFileStore (fsync on)", run_async(run(), loop))


def postgres_store_figures(cluster: PostgresCluster, loop: str) -> dict:
    """PostgresStore on the throwaway cluster (fsync on): the same figures.  Memories come in
    through copy_json_store (one transaction), the 10,000 conversations by one INSERT."""
    sys.path.insert(0, ROOT)
    import asyncpg
    import nodechat

    async def run() -> dict:
        url = cluster.create_database()
        store = nodechat.PostgresStore(url)
        source = tempfile.mkdtemp(prefix="nodechat-store-")
        try:
            await store.check()
            for cid, size in (("short", 10), ("long", 10_000)):
                await store.create_conversation(cid, "u")
                await store.append_messages(cid, [MESSAGE] * size)
            nodechat._write_json(nodechat.JSONFileStore(source)._memories("u"), bench_memories())
            await nodechat.copy_json_store(source, store, progress=lambda text: None)
            db = await asyncpg.connect(url)
            try:
                metas = bench_listing()
                await db.executemany(
                    "INSERT INTO conversations (id, user_id, title, created_at, updated_at) "
                    "VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz)",
                    [(m["id"], m["user_id"], m["title"], m["created_at"], m["updated_at"]) for m in metas])
                await db.execute("ANALYZE")
            finally:
                await db.close()
            return await store_figures(store)
        finally:
            await store.aclose()
            shutil.rmtree(source, ignore_errors=True)

    return run_async(run(), loop)


# -- main ------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per point; medians are reported")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per unpaced point")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: every kind of point, 0.5 s each, paced 64 and 256 x 20 chunks")
    parser.add_argument("--pure", action="store_true",
                        help="serve on uvicorn's pure-Python h11, asyncio and wsproto (a host mounting nodechat)")
    parser.add_argument("--storage", action="store_true",
                        help="also JSONFileStore's figures: appends, memory search, listing")
    parser.add_argument("--postgres", action="store_true",
                        help="also PostgresStore's figures, and /api/chat through three nodechat processes "
                             f"on one PostgreSQL vs one (needs {PG_BIN})")
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=set(),
                        help="only these parts besides the upstream alone, comma-separated: "
                             "naive, openai, tls, agent, idle, against, doors, kinds (and with --paced-only, paced "
                             "points only)")
    parser.add_argument("--paced-only", action="store_true", help="only the paced scan")
    parser.add_argument("--against", metavar="DIR",
                        help="with --only against: another checkout's nodechat.py measured in the same run")
    parser.add_argument("--scan", type=lambda v: tuple(map(int, v.split(","))),
                        help=f"paced stream counts to try (default {','.join(map(str, PACED_SCAN))})")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", help=argparse.SUPPRESS)
    parser.add_argument("--tls-key", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve_upstream:
        return serve_upstream(args.serve_upstream, args.tls_cert, args.tls_key)
    os.sched_setaffinity(0, {0})
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()
    report(bench)
    if args.storage:
        report_storage(bench.options["loop"])
    if bench.pg_storage:
        print_store_figures("PostgresStore (fsync on)", bench.pg_storage)
    report_resume_elsewhere(bench.pg_resume)


if __name__ == "__main__":
    main()
