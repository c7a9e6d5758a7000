"""nodechat: an embeddable chat backend in one module.

An LLM agent with tools, memory and saved conversations behind the protocols chat
front ends already speak:

* ``POST /v1/chat/completions`` and ``GET /v1/models`` -- OpenAI-compatible, streaming or not;
* ``POST /v1/messages`` -- Anthropic's Messages API (its SDKs, Claude Code);
* ``POST /v1/responses`` -- OpenAI's Responses API (the Agents SDK, Codex), kept for
  ``previous_response_id``;
* ``POST /api/chat`` -- Server-Sent Events for AI SDK front ends (``useChat``), with
  conversations, auto titles, memory and a 20-step tool limit;
* ``/chat`` -- NodeTool's WebSocket (MessagePack or JSON), with workflows and job updates.

Run it::

    python nodechat.py                      # offline "echo" model, no key needed
    OPENAI_API_KEY=sk-... python nodechat.py --model gpt-4o-mini
    python nodechat.py --workers 4          # four processes on one port (README: Several cores)
    uvicorn nodechat:create_app --factory --workers 4

Mount it in a Starlette or FastAPI app (every route answers under the prefix)::

    chat = NodeChat(model="gpt-4o-mini", tokens={"s3cret": "alice"})
    app = Starlette(routes=[Mount("/ai", app=chat)], lifespan=chat.lifespan)

Settings come from keyword arguments, else a TOML file (``--config`` or ``NODECHAT_CONFIG``),
else the environment (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, and
``NODECHAT_<NAME>`` for every setting); see :class:`Settings` and the README.  ``GET /`` is a small chat page.

Scale out with ``NODECHAT_DATABASE_URL=postgresql://...`` (the ``postgres`` extra): any number
of processes on any number of machines share one PostgreSQL.

Sections, each using only those above it: Settings, Errors, Events, Wire, Store (JSON files;
PostgreSQL), Tools, MCP, Upstream HTTP client, Providers, Accounting (the usage ledger, budgets,
rate limits, metrics), Agent, Workflows, Turns, HTTP server, one section per protocol (OpenAI
``/v1``, Anthropic ``/v1/messages``, OpenAI ``/v1/responses``, ``/api/chat``, the ``/chat``
WebSocket), Chat page, App, CLI.  ``grep -A1 '^####' nodechat.py`` prints the outline.

Follow a request from the bottom up:

1. App: ``NodeChat.__call__`` matches the route (``Router``) and asks the ``Gate`` (HTTP
   server) who is calling, on the headers alone; then it reads the body.
2. The protocol's section: its handler decodes the body into a ``Turn`` and picks its encoder;
   errors take the protocol's own shape.  ``/chat`` starts at ``chat_websocket``.
3. ``run_turn`` (Workflows): ``Turns`` admits the turn (the ``Ledger``'s rate limit and budget
   first), then ``Agent.run`` (or a workflow) yields events: the provider's stream (Providers;
   ``Agent._open`` tries once more, then the model's fallbacks, until one begins) through
   nodechat's HTTP/1.1 client (Upstream HTTP client) over the sans-IO readers in Wire, and
   the tools' results.  Each model call holds its share of the budget, and its usage goes
   to the ledger (Accounting).
4. Back in the protocol's section, its encoder turns each event into bytes, written by
   ``stream_sse`` (HTTP server) or ``ChatSession.send``.  An ``/api/chat`` turn on a stored
   conversation runs instead as the server's own task (``run_detached``), its bytes kept in a
   ``TurnStream`` (Turns) that the POST and any later ``GET .../stream`` read
   (``ReplayResponse``).
"""

from __future__ import annotations

import os
import sys


def _reexec_as_import() -> None:
    """Turn ``python nodechat.py ARGS`` into an import of this file, in the same process.

    CPython keeps a script's syntax tree until the script returns, and a server's never does
    (a quarter of the idle server: README, "Performance"); an import frees it once compiled,
    and reuses the .pyc.  Called before the rest of the module runs, the exec costs only the
    compile.  The new process (same pid, environment and descriptors) loads this very file by
    its real path, whatever its name, with ``sys.path`` as a script gets it: its folder first,
    never the working directory.  Its ``-c`` program starts with that path, which is what
    ``ps`` and ``top`` show.  With interpreter options, under a tracer or ``-i``, on Windows,
    or if the exec fails, the script runs as it is.
    """
    plain = getattr(sys, "orig_argv", [])[1:2] == sys.argv[:1]  # no options before the script
    if not (plain and os.name == "posix" and sys.gettrace() is None and not sys.flags.inspect
            and os.path.isfile(sys.argv[0])):
        return
    script = os.path.realpath(sys.argv[0])
    program = (f"# {script!r}\n"
               "import importlib.util, sys\n"
               f"if not sys.flags.safe_path: sys.path[0] = {os.path.dirname(script)!r}\n"
               f"spec = importlib.util.spec_from_file_location('nodechat', {script!r})\n"
               "module = sys.modules['nodechat'] = importlib.util.module_from_spec(spec)\n"
               f"sys.argv[0] = {sys.argv[0]!r}\n"
               "spec.loader.exec_module(module)\n"
               "module.main()\n")
    try:
        os.execv(sys.executable, [sys.executable, "-c", program, *sys.argv[1:]])
    except OSError:  # no usable sys.executable (an embedded interpreter): run as a script
        pass


if __name__ == "__main__":
    _reexec_as_import()

import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import functools
import hashlib
import hmac
import inspect
import ipaddress
import itertools
import json
import logging
import math
import re
import socket
import ssl
import time
import queue
import threading
import tomllib
import types
import typing
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import parse_qsl, unquote, urlsplit

import msgpack

if typing.TYPE_CHECKING:
    import httpx


def _httpx() -> types.ModuleType:
    """httpx, imported on first use: it is a third of nodechat's import time."""
    import httpx

    return httpx


def spawn(tasks: set[asyncio.Task], work: Awaitable) -> asyncio.Task:
    """Run ``work`` as a task held in ``tasks`` until it ends (the loop keeps only a weak
    reference to a task), so its owner can cancel what is left when it closes."""
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "BudgetExceeded",
    "Conflict",
    "Fallback",
    "Finished",
    "Forbidden",
    "InsufficientStorage",
    "JSONFileStore",
    "Job",
    "JobUpdate",
    "MCPError",
    "MethodNotAllowed",
    "NodeChat",
    "NodeChatError",
    "NotFound",
    "OfflineProvider",
    "OpenAIProvider",
    "PayloadTooLarge",
    "PostgresStore",
    "Provider",
    "ProviderConfig",
    "ReasoningDelta",
    "RequestTimeout",
    "Saved",
    "Settings",
    "StepFinished",
    "Store",
    "StoreUnavailable",
    "TextDelta",
    "TooManyRequests",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolRegistry",
    "ToolResult",
    "Unauthorized",
    "UpstreamError",
    "UpstreamTimeout",
    "Usage",
    "Workflow",
    "WorkflowError",
    "copy_json_store",
    "create_app",
    "main",
    "tool",
]

log = logging.getLogger("nodechat")

OFFLINE_MODEL = "echo"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Use the tools you are given when they help."


###############################################################################
# Settings: keyword arguments, then a TOML file, then the environment
###############################################################################


ENV_KEYS = types.MappingProxyType({
    "OPENAI_BASE_URL": "base_url",
    "OPENAI_API_KEY": "api_key",
    "NODECHAT_MODEL": "model",
    "NODECHAT_TOKENS": "tokens",
    "NODECHAT_INTERNAL_TOKENS": "internal_tokens",
    "NODECHAT_ADMIN_TOKENS": "admin_tokens",
    "NODECHAT_DATA_DIR": "data_dir",
    "NODECHAT_CORS_ORIGINS": "cors_origins",
    "NODECHAT_MCP_CONFIG": "mcp_config",
    "NODECHAT_SEARCH": "search_provider",
    "SEARXNG_URL": "search_url",
})
ENV_TYPES = types.MappingProxyType({"int": int, "float": float, "bool": bool, "str": str,
                                    "tuple[str, ...]": str})  # Settings field types read from text
BOOL_WORDS = types.MappingProxyType({"1": True, "true": True, "yes": True, "on": True,
                                     "0": False, "false": False, "no": False, "off": False})
SEARCH_KEY_ENV = types.MappingProxyType({"brave": "BRAVE_API_KEY", "tavily": "TAVILY_API_KEY"})
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
PROVIDER_KINDS = ("openai", "anthropic")


@dataclass(frozen=True)
class ProviderConfig:
    """One upstream: a name, where it is, its key, (optionally) its models, and the API it
    speaks: ``openai`` (chat completions) or ``anthropic`` (Messages)."""

    name: str
    base_url: str
    api_key: str = ""
    models: tuple[str, ...] = ()
    stream_usage: bool = True  # send stream_options.include_usage (false: for servers that refuse it)
    kind: str = "openai"
    send_reasoning: bool | None = None  # the model's reasoning back with a turn's tool calls (None: DeepSeek's only)


@dataclass(kw_only=True)
class Settings:
    """Every knob of a NodeChat instance, in one place.

    Build it with :meth:`from_sources`; each limit is per instance, never global.
    """

    #: Default model, bare (``gpt-4o-mini``) or ``provider/model``; empty: the provider's first.
    model: str = ""
    #: The default provider's base URL (``OPENAI_BASE_URL``); empty with a key: OpenAI's.
    base_url: str = ""
    #: The default provider's key (``OPENAI_API_KEY``).
    api_key: str = ""
    #: Named providers; the first is the default.  Filled from ``[[providers]]`` in TOML.
    providers: tuple[ProviderConfig, ...] = ()
    #: Bearer token -> user id.  Empty: the server is open (and binds to loopback only).
    tokens: dict[str, str] = field(default_factory=dict)
    #: Tokens whose callers may act for another user by sending ``userId`` in the body.
    internal_tokens: frozenset[str] = frozenset()
    #: Where conversations and memories are kept as JSON files.
    data_dir: str = "./nodechat-data"
    #: ``postgresql://user:password@host/db``: keep conversations and memories in
    #: PostgreSQL, shared by every nodechat process, instead of ``data_dir``
    #: (needs ``nodechat[postgres]``).
    database_url: str = ""
    #: The system prompt of the agent endpoints (/api/chat, /chat).
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    #: Largest request body accepted, in bytes (413 above).
    max_body_bytes: int = 4 * 1024 * 1024
    #: Model calls per agent turn before it stops with ``finish`` reason ``max_steps``.
    max_steps: int = 20
    #: Seconds to connect to a provider.
    connect_timeout: float = 10.0
    #: Seconds of silence allowed between two reads of a provider's answer.
    read_timeout: float = 120.0
    #: Seconds a whole model call may take, however steadily it streams.
    stream_timeout: float = 600.0
    #: Messages one request may carry (413 above).
    max_messages: int = 1000
    #: Characters one message may carry (413 above).
    max_message_chars: int = 1_000_000
    #: Characters of a tool result the model reads; the rest is cut, saying so.
    max_tool_result_chars: int = 100_000
    #: Agent turns one user may run at once, over every endpoint (429 above).
    max_turns_per_user: int = 8
    #: Tokens (input + output) one user may use per ``budget_period``; 0: no budget.  Past it
    #: a turn is refused (429 ``budget_exceeded``) and a running one stops at its next step.
    token_budget: int = 0
    #: ``hour``, ``day``, ``week`` (from Monday) or ``month``, calendar-aligned in UTC.
    budget_period: str = "month"
    #: Turns one user may start per minute; 0: no limit (429 ``rate_limit_exceeded`` beyond).
    requests_per_minute: int = 0
    #: Per-user overrides of the four limits above, by user id (TOML ``[users.alice]``).
    users: dict[str, dict] = field(default_factory=dict)
    #: Per model, the models to answer instead, in order, when it fails before its answer
    #: begins (TOML ``[fallbacks] "gpt-4o" = ["claude/claude-sonnet-4-5", "local/llama"]``).
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Longest ``Retry-After`` waited for before a failed provider's one retry (longer: the next model).
    max_retry_wait: float = 5.0
    #: Failures in a row after which a provider is skipped for ``circuit_seconds``, then tried
    #: again with one call.
    circuit_failures: int = 5
    circuit_seconds: float = 30.0
    #: Tokens whose callers may read every user's usage (``GET /api/usage?user=``).
    admin_tokens: frozenset[str] = frozenset()
    #: ``GET /metrics`` in Prometheus' text format, outside the chat auth (off by default).
    metrics: bool = False
    #: The bearer token ``/metrics`` asks for (never a user's token); empty: none.
    metrics_token: str = ""
    #: ``text`` (uvicorn's look), or ``json``: one JSON line per record, one per turn.
    log_format: str = "text"
    #: Ask the provider made from ``base_url``/``api_key`` for usage on streams
    #: (``stream_options.include_usage``); off for a server that refuses the field.
    stream_usage: bool = True
    #: Tool calls the agent runs in one step; the model gets an error for the rest.
    max_tool_calls_per_step: int = 16
    #: Conversations stored per user (403 beyond).
    max_conversations_per_user: int = 10_000
    #: Memories stored per user (403 beyond).
    max_memories_per_user: int = 1_000
    #: ``/v1/responses`` kept per user for ``previous_response_id`` (the oldest go first).
    max_responses_per_user: int = 1_000
    #: Largest image or file a message carries inline (base64), decoded (413 beyond); it does
    #: not count against ``max_message_chars``.
    max_attachment_bytes: int = 3 * 1024 * 1024
    #: Models that see images (``fnmatch`` patterns of their names); for any other, an agent
    #: turn's images are left out of what it reads, and the answer says so.
    vision_models: tuple[str, ...] = ("*",)
    #: Longest line accepted in a provider's event stream (502 beyond).
    max_upstream_line_bytes: int = 4 * 1024 * 1024
    #: On SIGTERM (``python nodechat.py``) or when the app closes, seconds in-flight turns
    #: get to finish.
    shutdown_grace_seconds: float = 30.0
    #: An ``/api/chat`` turn on a stored conversation goes on when its client leaves, and
    #: ``GET /api/chat/{id}/stream`` reads it again (``NODECHAT_RESUME=0``: leaving cancels it).
    resume: bool = True
    #: Bytes of a turn's stream kept for readers that come later (past them, a turn goes on
    #: but cannot be resumed).
    resume_buffer_bytes: int = 8 * 1024 * 1024
    #: PostgreSQL: a process that stops heartbeating its turns loses them after this long.
    turn_lease_seconds: float = 15.0
    #: Upstream connections in all.
    max_upstream_connections: int = 4096
    #: What reads the token stream: ``nodechat``'s own HTTP/1.1 client (see
    #: :class:`UpstreamClient`), or ``httpx``.
    upstream_client: str = "nodechat"
    #: Seconds of silence before an SSE comment keeps the connection alive.
    keepalive_seconds: float = 15.0
    #: The built-in chat page at ``/`` (``NODECHAT_UI=0`` turns it off).
    ui: bool = True
    #: Cookie that carries a session token for /api/chat (mapped through ``tokens``).
    cookie_name: str = "nodechat_session"
    #: Origins allowed by CORS: exact origins (``https://app.example``, with credentials),
    #: ``http://localhost:*`` (any port), ``file://``, ``null`` and ``*`` (these three never
    #: with credentials).  An open server refuses every other cross-origin browser request.
    cors_origins: tuple[str, ...] = ()
    #: Host names the server answers to.  Empty: loopback names only on an open server
    #: (DNS rebinding), any host when tokens are set; ``*`` means any.
    allowed_hosts: tuple[str, ...] = ()
    #: Seconds a client has to send its whole request body (408 after).
    body_timeout: float = 30.0
    #: Let the model call registered tools on /v1/chat/completions too (off: pure pass-through).
    openai_server_tools: bool = False
    #: Names of the tools offered by default; None offers every registered tool.
    tools: tuple[str, ...] | None = None
    #: How many of the user's memories go into the system context of each conversation.
    memory_context_limit: int = 5
    #: /chat: seconds between the server's pings.
    ws_heartbeat_seconds: float = 25.0
    #: /chat: seconds a client-side tool has to answer.
    client_tool_timeout: float = 60.0
    #: /chat: messages queued behind the running turn (``busy`` error beyond).
    ws_queue_size: int = 8
    #: /chat: largest frame accepted, in bytes.
    max_ws_frame_bytes: int = 4 * 1024 * 1024
    #: MCP servers as other clients write them (``command``/``args``/``env``/``cwd`` or
    #: ``url``/``headers``), inline (TOML ``[mcpServers.name]``).
    mcp_servers: dict[str, dict] = field(default_factory=dict)
    #: A JSON file of MCP servers (``{"mcpServers": {...}}``), merged under ``mcp_servers``.
    mcp_config: str = ""
    #: Web search backend: ``searxng`` (at ``search_url``), ``brave`` or ``tavily``; empty: no tool.
    search_provider: str = ""
    #: The SearXNG server (``SEARXNG_URL``).
    search_url: str = ""
    #: The Brave or Tavily key (else ``BRAVE_API_KEY`` / ``TAVILY_API_KEY``).
    search_api_key: str = ""
    #: The fetch tool (on by default); it reaches public addresses only, unless allowed below.
    fetch_tool: bool = True
    #: Let the fetch tool reach private and loopback addresses too.
    allow_private_fetch: bool = False
    #: Networks (CIDRs) the fetch tool may reach although they are private.
    fetch_allowed_networks: tuple[str, ...] = ()
    #: Characters of a fetched page the model reads.
    fetch_max_chars: int = 20_000
    #: Bytes one fetch reads at most.
    fetch_max_bytes: int = 1024 * 1024
    #: Seconds one fetch may take.
    fetch_timeout: float = 30.0

    @classmethod
    def from_sources(
        cls,
        overrides: Mapping[str, Any] | None = None,
        config_path: str | os.PathLike | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Merge keyword arguments over a TOML file over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):  # NODECHAT_<NAME> for every plain setting
            env_key = "NODECHAT_" + item.name.upper()
            if item.type in ENV_TYPES and environ.get(env_key):
                values[item.name] = _from_env(env_key, environ[env_key], ENV_TYPES[item.type])
        for env_key, name in ENV_KEYS.items():
            if environ.get(env_key):
                values[name] = _from_env(env_key, environ[env_key])
        config_path = config_path or environ.get("NODECHAT_CONFIG")
        if config_path:
            values.update(_read_toml(Path(config_path)))
        if "mcpServers" in values:  # the spelling other MCP clients use
            values["mcp_servers"] = values.pop("mcpServers")
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        values["providers"] = _providers(values, environ)
        values["tokens"] = _tokens(values.get("tokens", {}), "tokens")
        for user in values["tokens"].values():  # user ids become file names
            if not ID_PATTERN.fullmatch(user) or ".." in user:
                raise ValueError(f"tokens: user id {user[:40]!r} must be 1-128 of [A-Za-z0-9_.@:-]")
        for name in ("internal_tokens", "admin_tokens"):
            values[name] = frozenset(_split(values.get(name, ())))
        values["users"] = _user_limits(values.get("users", {}), values)
        values["fallbacks"] = _fallbacks(values.get("fallbacks", {}))
        for name in ("cors_origins", "allowed_hosts", "fetch_allowed_networks", "vision_models"):
            if name in values:
                values[name] = tuple(_split(values[name]))
        if values.get("tools") is not None:
            values["tools"] = tuple(_split(values["tools"]))
        if values.get("mcp_config"):
            values["mcp_servers"] = {**read_mcp_config(values["mcp_config"]),
                                     **values.get("mcp_servers", {})}
        if values.get("log_format", "text") not in ("text", "json"):
            raise ValueError("log_format: use 'text' (the default) or 'json'")
        if values.get("upstream_client", "nodechat") not in ("nodechat", "httpx"):
            raise ValueError("upstream_client: use 'nodechat' (the default) or 'httpx'")
        provider = values.get("search_provider", "")
        if provider and not values.get("search_api_key") and provider in SEARCH_KEY_ENV:
            values["search_api_key"] = environ.get(SEARCH_KEY_ENV[provider], "")
        return cls(**values)

    @property
    def offline(self) -> bool:
        """True when no provider is configured and the built-in echo model serves."""
        return not self.providers

    def limits(self, user: str) -> UserLimits:
        """The user's limits: the global ones, overridden by ``users[user]``."""
        override = self.users.get(user)
        return UserLimits(**{**self.default_limits.__dict__, **override}) if override else self.default_limits

    @functools.cached_property
    def default_limits(self) -> UserLimits:
        """Everyone's limits but those of ``users`` (asked for three times a turn: made once)."""
        return UserLimits(**{k: getattr(self, k) for k in USER_LIMIT_KEYS})


USER_LIMIT_KEYS = ("token_budget", "budget_period", "requests_per_minute", "max_turns_per_user")
BUDGET_PERIODS = ("hour", "day", "week", "month")


@dataclass(frozen=True)
class UserLimits:
    """One user's limits (see the Settings fields of the same names)."""

    token_budget: int
    budget_period: str
    requests_per_minute: int
    max_turns_per_user: int


def _user_limits(users: Any, values: Mapping[str, Any]) -> dict[str, dict]:
    """``[users.NAME]`` tables, checked: only the limits' names, of their types."""
    if not isinstance(users, Mapping):
        raise ValueError("users: a table of user id -> limits")
    for name, value in [("budget_period", values.get("budget_period", "month")),
                        *((f"users.{u}.budget_period", v.get("budget_period", "month"))
                          for u, v in users.items() if isinstance(v, Mapping))]:
        if value not in BUDGET_PERIODS:
            raise ValueError(f"{name}: {str(value)[:20]!r} is not one of {', '.join(BUDGET_PERIODS)}")
    checked = {}
    for user, limits in users.items():
        if not isinstance(limits, Mapping) or set(limits) - set(USER_LIMIT_KEYS):
            raise ValueError(f"users.{user}: only {', '.join(USER_LIMIT_KEYS)} may be set per user")
        for key, value in limits.items():
            if key != "budget_period" and (type(value) is not int or value < 0):
                raise ValueError(f"users.{user}.{key}: a whole number, 0 or more")
        checked[str(user)] = dict(limits)
    return checked


def _fallbacks(fallbacks: Any) -> dict[str, tuple[str, ...]]:
    """``[fallbacks]``: model -> the models to try instead, in order."""
    if not isinstance(fallbacks, Mapping) or not all(
            isinstance(v, (list, tuple)) and all(isinstance(m, str) and m for m in v) for v in fallbacks.values()):
        raise ValueError('fallbacks: a table of model -> a list of models, e.g. "gpt-4o" = ["local/llama"]')
    return {str(model): tuple(others) for model, others in fallbacks.items()}


def _split(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _from_env(key: str, raw: str, kind: type = str) -> Any:
    if key == "NODECHAT_TOKENS":  # parsed here so that an error names the variable
        return _tokens(raw, key)
    if kind is bool:
        if raw.strip().lower() not in BOOL_WORDS:
            raise ValueError(f"{key}: {raw[:40]!r} is not one of {', '.join(sorted(BOOL_WORDS))}")
        return BOOL_WORDS[raw.strip().lower()]
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{key}: {raw[:40]!r} is not a valid {kind.__name__}") from None


def _tokens(value: str | Mapping[str, str], source: str) -> dict[str, str]:
    """``"tok"`` or ``"tok:user"`` entries (comma-separated), or a mapping, to token -> user."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    table = {}
    for entry in _split(value):
        token, sep, user = entry.partition(":")
        if sep and not user:
            raise ValueError(f"{source}: entry {token[:4]!r}... has no user id after ':'")
        table[token] = user or "user-" + hashlib.sha256(token.encode()).hexdigest()[:8]
    return table


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config {path}: {exc}") from exc
    return data


def _providers(values: dict[str, Any], environ: Mapping[str, str]) -> tuple[ProviderConfig, ...]:
    providers = []
    for entry in values.pop("providers", None) or ():
        if isinstance(entry, ProviderConfig):
            providers.append(entry)
            continue
        name, base_url = entry.get("name"), entry.get("base_url")
        if not name or not base_url:
            raise ValueError("providers: every entry needs a name and a base_url")
        kind = entry.get("kind", "openai")
        if kind not in PROVIDER_KINDS:
            raise ValueError(f"providers: {name!r} has kind {str(kind)[:40]!r}; use one of {', '.join(PROVIDER_KINDS)}")
        api_key = entry.get("api_key") or environ.get(entry.get("api_key_env", ""), "")
        reasoning = entry.get("send_reasoning")
        if reasoning is not None and type(reasoning) is not bool:
            raise ValueError(f"providers: {name!r} has send_reasoning {str(reasoning)[:20]!r}; use true or false")
        providers.append(ProviderConfig(name, base_url, api_key, tuple(entry.get("models", ())),
                                        entry.get("stream_usage", True) is not False, kind, reasoning))
    if providers:
        return tuple(providers)
    base_url, api_key = values.get("base_url", ""), values.get("api_key", "")
    if base_url or api_key:
        providers.append(ProviderConfig("openai", base_url or DEFAULT_OPENAI_BASE_URL, api_key,
                                        stream_usage=values.get("stream_usage", True) is not False))
    if environ.get("ANTHROPIC_API_KEY"):  # beside OpenAI's (the default when both are set)
        providers.append(ProviderConfig("anthropic", environ.get("ANTHROPIC_BASE_URL") or DEFAULT_ANTHROPIC_BASE_URL,
                                        environ["ANTHROPIC_API_KEY"], kind="anthropic"))
    return tuple(providers)


###############################################################################
# Errors: each knows its HTTP status and OpenAI error type
###############################################################################


class NodeChatError(Exception):
    """Base of every error nodechat reports to a client.

    NodeChatError
     +-- BadRequest (400)          +-- NotFound (404)         +-- PayloadTooLarge (413)
     +-- Unauthorized (401)        +-- MethodNotAllowed (405) +-- TooManyRequests (429)
     +-- Forbidden (403)           +-- RequestTimeout (408)   +-- Conflict (409)
     +-- UpstreamError (502)       +-- StoreUnavailable (503) +-- UpstreamTimeout (504)
     +-- InsufficientStorage (507)                            +-- BudgetExceeded (429)

    The status travels with the error; each protocol's encoder renders it.
    """

    status = 500
    kind = "server_error"
    retry_after: str | None = None  # an upstream's Retry-After, passed on

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(NodeChatError):
    status, kind = 400, "invalid_request_error"


class Unauthorized(NodeChatError):
    status, kind = 401, "authentication_error"


class Forbidden(NodeChatError):
    status, kind = 403, "permission_error"


class NotFound(NodeChatError):
    status, kind = 404, "not_found_error"


class MethodNotAllowed(NodeChatError):
    status, kind = 405, "invalid_request_error"

    def __init__(self, message: str, *, allow: Iterable[str] = (), **options: Any):
        super().__init__(message, **options)
        self.allow = tuple(sorted(set(allow)))  # the methods the path does take (``Allow``)


class RequestTimeout(NodeChatError):
    status, kind = 408, "invalid_request_error"


class Conflict(NodeChatError):
    status, kind = 409, "invalid_request_error"


class PayloadTooLarge(NodeChatError):
    status, kind = 413, "invalid_request_error"


class TooManyRequests(NodeChatError):
    status, kind = 429, "rate_limit_error"


class BudgetExceeded(TooManyRequests):
    """The user's token budget for the period is spent.  Retrying before it resets is no use:
    the response says ``x-should-retry: false``, which the openai and anthropic SDKs obey
    (they retry a plain 429 twice)."""

    kind = "budget_exceeded"


class UpstreamError(NodeChatError):
    status, kind = 502, "upstream_error"


class UpstreamTimeout(NodeChatError):
    status, kind = 504, "timeout_error"


class StoreUnavailable(NodeChatError):
    """The store (a database) cannot be reached now; clients may retry after ``retry_after``."""

    status, kind, retry_after = 503, "server_error", "5"


class InsufficientStorage(NodeChatError):
    status, kind = 507, "server_error"


###############################################################################
# Events: what the agent yields and every protocol encodes
###############################################################################

# Frozen and final: the agent's hot path compares exact types (``type(event) is TextDelta``).


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the assistant's answer."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (``reasoning_content`` / ``reasoning`` upstream, or
    Anthropic's thinking).  A ``signature`` ends a signed thinking block (Anthropic's: a
    tool-use turn sends its blocks back, signed); its ``text`` may be empty.  ``redacted``
    is a whole encrypted block, sent back the same way."""

    text: str
    signature: str = ""
    redacted: str = ""  # an Anthropic ``redacted_thinking`` block's data (its text is empty)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A whole tool call, assembled from the provider's deltas.

    ``client_side`` calls are for the caller to run (OpenAI pass-through); the agent runs the rest.
    """

    id: str
    name: str
    arguments: str
    client_side: bool = False

    @property
    def args(self) -> Any:
        """The arguments as JSON, None when the model wrote something that is not JSON."""
        return parse_arguments(self.arguments)


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool returned (or the error it raised, with ``is_error``)."""

    id: str
    name: str
    result: Any
    is_error: bool = False


MAX_TOKENS_PER_CALL = 1 << 30  # what an upstream may claim for one call (a store's integer column holds it)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens used by one model call, or summed over a turn.  ``input`` includes the
    ``cached`` tokens and ``output`` the ``reasoning`` ones, as OpenAI counts them.
    ``estimated``: the upstream did not say (an old server, a cut stream, the echo model),
    so nodechat counted characters / 4, rounded up."""

    input: int = 0
    output: int = 0
    cached: int = 0
    reasoning: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input + self.output

    def __add__(self, other: Usage | None) -> Usage:
        if other is None:
            return self
        return Usage(self.input + other.input, self.output + other.output, self.cached + other.cached,
                     self.reasoning + other.reasoning, self.estimated or other.estimated)

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """An upstream's ``usage`` object; None when it holds no token count."""
        if type(usage) is not dict:
            return None
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is not int and type(completion) is not int:
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if type(details) is dict else None
        details = usage.get("completion_tokens_details")
        reasoning = details.get("reasoning_tokens") if type(details) is dict else None
        prompt, completion, cached, reasoning = (min(max(v, 0), MAX_TOKENS_PER_CALL) if type(v) is int else 0
                                                 for v in (prompt, completion, cached, reasoning))
        return cls(prompt, completion, min(cached, prompt), min(reasoning, completion))

    @classmethod
    def estimate(cls, input_chars: int, output_chars: int) -> Usage:
        return cls(-(-input_chars // 4), -(-output_chars // 4), estimated=True)

    def openai(self) -> dict:
        """OpenAI's ``usage`` (the details only when they are not zero)."""
        usage: dict[str, Any] = {"prompt_tokens": self.input, "completion_tokens": self.output,
                                 "total_tokens": self.total}
        if self.cached:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        if self.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning}
        return usage

    def ui(self) -> dict:
        """The AI SDK's ``LanguageModelUsage``: ai 5's names and ai 6's details both."""
        usage: dict[str, Any] = {
            "inputTokens": self.input, "outputTokens": self.output, "totalTokens": self.total,
            "reasoningTokens": self.reasoning, "cachedInputTokens": self.cached,
            "inputTokenDetails": {"noCacheTokens": self.input - self.cached, "cacheReadTokens": self.cached},
            "outputTokenDetails": {"textTokens": self.output - self.reasoning,
                                   "reasoningTokens": self.reasoning}}
        if self.estimated:
            usage["estimated"] = True
        return usage

    def record(self) -> dict:
        """How stores and the ledger keep it."""
        return {"input": self.input, "output": self.output, "cached": self.cached,
                "reasoning": self.reasoning, "estimated": self.estimated}

    @classmethod
    def from_record(cls, record: Any) -> Usage:
        if type(record) is not dict:
            return cls()
        return cls(*(record.get(k) if type(record.get(k)) is int else 0
                     for k in ("input", "output", "cached", "reasoning")), record.get("estimated") is True)


@dataclass(frozen=True, slots=True)
class StepFinished:
    """One model call is over: why it stopped and what it used."""

    reason: str
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Fallback:
    """The model asked for failed before its answer began: ``model`` answers instead
    (``reason`` says why), and the protocols that name the model say so."""

    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The turn is over: the last step's reason (``stop``, ``length``, ``tool_calls``,
    ``content_filter``), ``max_steps``, or ``budget`` (the user's token budget ran out
    between two steps; ``note`` says so); usage summed over its steps, and the model."""

    reason: str
    usage: Usage | None = None
    model: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Saved:
    """A message was stored in the conversation (with its real id and time)."""

    message: dict


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """A workflow job changed state: running, progress, completed, failed or cancelled."""

    job_id: str
    workflow_id: str
    status: str
    result: Any = None
    error: str | None = None
    message: str | None = None
    progress: float | None = None


Event = Union[
    TextDelta, ReasoningDelta, ToolCall, ToolResult, StepFinished, Finished, Saved, JobUpdate, Fallback,
]


def parse_arguments(arguments: str) -> Any:
    """Tool-call arguments as JSON (empty: ``{}``); None when they are not JSON."""
    if not arguments:
        return {}
    try:
        return parse_json(arguments)
    except ValueError:
        return None


###############################################################################
# Wire: JSON, server-sent events and HTTP/1.1 framing; bytes in, values out, no I/O
###############################################################################


#: Longest line of an event stream read (a provider's, an MCP server's), in bytes.
MAX_LINE_BYTES = 1024 * 1024
SSE_KEEPALIVE = b": keep-alive\n\n"
SSE_DONE = b"data: [DONE]\n\n"


def _json_default(value: Any) -> Any:
    """JSON cannot carry bytes: they go as base64 text rather than being dropped."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_json_default).encode
_json_string = json.encoder.encode_basestring  # a str as _encode_json writes it (C; non-ASCII kept)


def parse_json(raw: bytes | str) -> Any:
    """JSON from a client, strictly: ValueError for NaN or Infinity (no provider accepts
    them), a lone surrogate (not encodable as UTF-8) or nesting too deep to handle.

    Every upstream event comes through here, so the usual document (no space before it) goes
    straight to the C scanner, skipping ``decode()``'s two whitespace regexes.  Anything the
    scanner refuses is decoded again in full for the error's message."""
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode()  # strict UTF-8: json.loads would let encoded surrogates through
        try:
            value, end = _scan_strict(raw, 0)
        except StopIteration:
            value, end = _decode_strict(raw), len(raw)  # leading space, or the error
        if end != len(raw) and raw[end:].strip(" \t\n\r"):
            _decode_strict(raw)  # raises "Extra data" with its position
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if "\\u" in raw and SURROGATE_ESCAPE.search(raw):  # only then: this runs on every upstream event
        try:
            _encode_json(value).encode()
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff)") from None
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# one decoder, made once: json.loads with keyword arguments builds a new one per call
_strict_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_decode_strict = _strict_decoder.decode
_scan_strict = json.scanner.make_scanner(_strict_decoder)  # (value, end) from an index
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def compact_json(value: Any) -> str:
    """JSON without spaces, with U+2028/2029 escaped (JavaScript line terminators)."""
    return _encode_json(value).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def sse_json(value: Any) -> bytes:
    return b"data: " + compact_json(value).encode() + b"\n\n"


class SSEDecoder:
    """Splits a server-sent event stream into the ``data`` of each event, in one pass.

    Lines end at CR, LF or CRLF only (WHATWG "parsing an event stream"), never at U+2028 as
    ``str.splitlines()`` and httpx ``aiter_lines()`` would (httpx-sse#34); a CRLF may straddle
    two reads.  An unfinished line is kept as a list of pieces and joined once, when its end
    arrives, so the work is linear in the input however it is cut (re-scanning a buffer on
    every read is quadratic).  Comments and fields other than ``data`` are
    dropped.  Raises ValueError when a line, or one event's data, passes ``max_line_bytes``.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self._line: list[bytes] = []  # pieces of the unfinished last line
        self._line_bytes = 0
        self._data: list[bytes] = []  # data lines of the unfinished event
        self._data_bytes = 0
        self._cr = False  # the last chunk ended with CR: a leading LF completes that CRLF

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event this chunk completes, multi-line data joined by LF."""
        if (chunk[:6] == b"data: " and chunk.find(b"\n") == len(chunk) - 2 and chunk[-1] == 10
                and not (self._line or self._data or self._cr) and b"\r" not in chunk
                and len(chunk) <= self.max_line_bytes):
            return [chunk[6:-2]]  # the usual read of a paced stream: one whole one-line event
        if not chunk:
            return []
        if self._cr:
            self._cr = False
            if chunk[0] == 10:
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._cr = chunk[-1] == 13
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        last = lines.pop()
        limit = self.max_line_bytes
        if not lines:  # no line ends here
            self._line_bytes += len(last)
            if self._line_bytes > limit:
                raise ValueError(f"an SSE line is longer than {limit} bytes")
            self._line.append(last)
            return []
        if self._line:
            if self._line_bytes + len(lines[0]) > limit:
                raise ValueError(f"an SSE line is longer than {limit} bytes")
            self._line.append(lines[0])
            lines[0] = b"".join(self._line)
        if len(chunk) > limit and max(len(last), *map(len, lines)) > limit:
            raise ValueError(f"an SSE line is longer than {limit} bytes")
        self._line, self._line_bytes = ([last], len(last)) if last else ([], 0)
        events, data = [], self._data
        before = len(data)
        for line in lines:
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = []
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":
                data.append(b"")
        if not data:
            self._data_bytes = 0
        else:  # count what this chunk added to the unfinished event, once
            added = data[before:] if data is self._data else data
            self._data_bytes = (self._data_bytes if data is self._data else 0) + sum(map(len, added))
            if self._data_bytes > limit:
                raise ValueError(f"an SSE event's data is longer than {limit} bytes")
        self._data = data
        return events

    def close(self) -> list[bytes]:
        """The data of an event the stream ended without a blank line after (servers forget it)."""
        tail = self.feed(b"\n\n") if self._line or self._data else []
        self._cr = False
        return tail


async def sse_batches(chunks: AsyncIterator[bytes], max_line_bytes: int = MAX_LINE_BYTES
                      ) -> AsyncIterator[list[bytes]]:
    """The data of the events completed by each chunk, for streams read through httpx;
    a chunk that completes none still yields (empty), so a reader can check its deadline."""
    decoder = SSEDecoder(max_line_bytes)
    async for chunk in chunks:
        yield decoder.feed(chunk)
    if batch := decoder.close():
        yield batch


#: Longest response head (status line and headers), in bytes.
MAX_HEADER_BYTES = 64 * 1024


_HEX_DIGITS = b"0123456789abcdefABCDEF"
_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)  # ChunkedDecoder's steps


class ChunkedDecoder:
    """Decodes a ``Transfer-Encoding: chunked`` body (RFC 9112 section 7.1) as it arrives.

    ``feed`` returns the body bytes a read carries, in one call however many chunks it
    holds; chunk extensions and trailers are read and dropped.  Afterwards ``done`` is true
    and ``extra`` holds any bytes that followed the body.  Raises ValueError on a malformed
    chunk, or a size line or trailer section longer than ``max_line_bytes``.
    """

    def __init__(self, max_line_bytes: int = MAX_HEADER_BYTES):
        self.max_line_bytes = max_line_bytes
        self.done = False
        self.extra = b""
        self._buffer = b""  # an unfinished size line, CRLF or trailer line: short
        self._size = 0  # bytes of chunk data still to come
        self._trailer_bytes = 0
        self._step = _SIZE

    def feed(self, data: bytes) -> bytes:
        """The body bytes in ``data``."""
        if self._step == _SIZE and not self._buffer:  # a paced stream's read: exactly one chunk
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0 and not data[:eol].strip(_HEX_DIGITS):
                end = eol + 2 + int(data[:eol], 16)
                if end > eol + 2 and len(data) == end + 2 and data[end:] == b"\r\n":
                    return data[eol + 2:end]
        if self.done:
            self.extra += data
            return b""
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        out: list[bytes] = []
        pos = self._decode(data, out)
        if pos < len(data):
            self._buffer = data[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _decode(self, data: bytes, out: list[bytes]) -> int:
        """Take the steps ``data`` holds, each chunk's data into ``out``; where it stopped."""
        pos, end, step, limit = 0, len(data), self._step, self.max_line_bytes
        while pos < end:
            if step == _SIZE:
                eol = data.find(b"\r\n", pos, pos + limit + 2)
                if eol < 0:
                    if end - pos > limit:
                        raise ValueError(f"chunk size line longer than {limit} bytes")
                    break
                size = _chunk_size(data[pos:eol])
                pos = eol + 2
                if not size:
                    step = _TRAILER
                elif pos + size + 2 <= end:  # the whole chunk is here: the usual case
                    if data[pos + size:pos + size + 2] != b"\r\n":
                        raise ValueError("malformed chunk: no CRLF after the chunk data")
                    out.append(data[pos:pos + size])
                    pos += size + 2
                else:
                    step, self._size = _DATA, size
            elif step == _DATA:
                take = min(self._size, end - pos)
                out.append(data[pos:pos + take])
                pos += take
                self._size -= take
                if self._size:
                    break
                step = _CRLF
            elif step == _CRLF:
                if end - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise ValueError("malformed chunk: no CRLF after the chunk data")
                pos, step = pos + 2, _SIZE
            else:  # trailer fields, read and dropped, up to an empty line
                after = self._trailer_line(data, pos)
                if after is None:
                    break
                pos, step = after, _DONE if self.done else _TRAILER
        self._step = step
        return pos

    def _trailer_line(self, data: bytes, pos: int) -> int | None:
        """Where the trailer line at ``pos`` ends (None: not here yet); the empty one ends the
        body, and what follows it is ``extra``."""
        limit = self.max_line_bytes
        eol = data.find(b"\r\n", pos, pos + limit + 2)
        if eol < 0:
            if len(data) - pos > limit:
                raise ValueError(f"chunked trailers longer than {limit} bytes")
            return None
        if eol == pos:
            self.done, self.extra = True, data[pos + 2:]
            return len(data)
        self._trailer_bytes += eol + 2 - pos
        if self._trailer_bytes > limit:
            raise ValueError(f"chunked trailers longer than {limit} bytes")
        return eol + 2


def _chunk_size(line: bytes) -> int:
    # chunk-size [ BWS ";" chunk-ext ]: hex digits only (int() would take "0x", "+", "_")
    size = line if b";" not in line else line.partition(b";")[0].rstrip(b" \t")
    if not size or size.strip(_HEX_DIGITS) or len(size) > 16:
        raise ValueError(f"malformed chunk size line {line[:40]!r}")
    return int(size, 16)


def post_request(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[tuple, str, bytes]:
    """A POST of ``body`` to ``url`` as bytes to write: ``((scheme, host, port), origin, bytes)``.

    ``headers`` go out as given, after ``Host``, ``Content-Length`` and ``Accept-Encoding:
    identity``.  ValueError names what is wrong: not an http(s) URL, a header that would
    smuggle a line, one that is not Latin-1."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"{url}: not an http:// or https:// URL")
    host = parts.netloc.rpartition("@")[2]
    origin = f"{parts.scheme}://{host}"
    lines = [f"POST {parts.path or '/'}{'?' if parts.query else ''}{parts.query} HTTP/1.1",
             f"Host: {host}", f"Content-Length: {len(body)}", "Accept-Encoding: identity"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"{origin}: header {name!r} holds a line break or colon")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    try:
        head = "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{origin}: request headers must be Latin-1 ({exc})") from None
    return (parts.scheme, parts.hostname, port), origin, head + body


class ResponseReader:
    """Reads one HTTP/1.1 response (RFC 9112) from a connection's bytes as they arrive.

    ``feed(data)`` returns the body bytes ``data`` carries.  Once the head is complete
    (``head_done``; interim 1xx responses are skipped) ``status``, ``reason`` and ``headers``
    (lower-case names) are set; ``done`` turns true at the end of the body, however it is
    framed: chunked, by length, or by ``eof()``, the connection's close.  Then ``reusable``
    says whether the connection may carry another request.  Raises ValueError on a malformed
    response, and from ``eof()`` when the close cut it short.
    """

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES):
        self.max_header_bytes = max_header_bytes
        self.status, self.reason, self.headers = 0, "", {}
        self.head_done = self.done = False
        self.reusable = True
        self._head = bytearray()  # the head while it arrives
        self._chunks: ChunkedDecoder | None = None
        self._remaining = 0  # body bytes still to come, for a Content-Length body
        self._read = self._read_head  # what the next bytes are: head, then the body's framing

    def feed(self, data: bytes) -> bytes:
        """The body bytes in ``data`` (none while the head arrives)."""
        return self._read(data)

    def eof(self) -> None:
        """The connection closed: the end of a body that runs to the close, else ValueError."""
        if self._read == self._read_to_close:
            self._end()
        elif not self.done:
            raise ValueError(f"connection closed {self.where}")

    @property
    def where(self) -> str:
        return "mid-body" if self.head_done else "before the response"

    def _read_head(self, data: bytes) -> bytes:
        head, limit = self._head, self.max_header_bytes
        start = max(0, len(head) - 3)
        head += data
        while True:
            end = head.find(b"\r\n\r\n", start)
            if end < 0 and len(head) <= limit:
                return b""
            if end < 0 or end > limit:
                raise ValueError(f"response headers longer than {limit} bytes")
            self._parse_status_and_headers(bytes(head[:end]))
            del head[:end + 4]
            if not 100 <= self.status < 200:
                break
            if self.status == 101:
                raise ValueError("unexpected 101 Switching Protocols")
            start = 0  # an interim response (100 Continue, 103 Early Hints): the real one follows
        self._begin_body()
        self.head_done, self._head = True, bytearray()
        return self._read(bytes(head)) if head else b""

    def _parse_status_and_headers(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise ValueError(f"malformed status line {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1] in b" \t" or name[0] in b" \t":
                raise ValueError(f"malformed header line {line[:100]!r}")
            key, value = name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.status, self.reason, self.headers = int(code), reason.decode("latin-1"), headers
        options = headers.get("connection", "").lower()
        self.reusable = "close" not in options if version == b"HTTP/1.1" else "keep-alive" in options

    def _begin_body(self) -> None:
        """Choose how the body ends (RFC 9112 section 6.3)."""
        headers = self.headers
        if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            raise ValueError(f"unrequested content-encoding {headers['content-encoding']!r}")
        codings, length = headers.get("transfer-encoding"), headers.get("content-length")
        if self.status in (204, 304):
            self._end()
        elif codings is not None:
            if [c.strip() for c in codings.lower().split(",")] != ["chunked"]:
                raise ValueError(f"unsupported transfer-encoding {codings!r}")
            self.reusable = self.reusable and length is None  # both: a smuggling smell
            self._chunks, self._read = ChunkedDecoder(self.max_header_bytes), self._read_chunked
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not (value := values.pop()).isdigit():
                raise ValueError(f"malformed content-length {length!r}")
            self._remaining, self._read = int(value), self._read_length
            if not self._remaining:
                self._end()
        else:
            self.reusable, self._read = False, self._read_to_close

    def _read_chunked(self, data: bytes) -> bytes:
        chunks = self._chunks
        body = chunks.feed(data)
        if chunks.done:
            self.reusable = self.reusable and not chunks.extra
            self._end()
        return body

    def _read_length(self, data: bytes) -> bytes:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            return data
        if len(data) > self._remaining:
            self.reusable, data = False, data[:self._remaining]
        self._end()
        return data

    def _read_to_close(self, data: bytes) -> bytes:
        return data

    def _read_past_end(self, data: bytes) -> bytes:
        self.reusable = False  # bytes after the response: never reuse the connection
        return b""

    def _end(self) -> None:
        self.done, self._read = True, self._read_past_end


###############################################################################
# Store: the contract, and conversations and memories as JSON files
###############################################################################


try:  # POSIX file locks serialise writers across worker processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: in-process safety only
    fcntl = None


ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}")
STORE_THREADS = 8
WORD_PATTERN = re.compile(r"\w+")
MAX_QUERY_CHARS, MAX_TERM_CHARS = 4096, 64  # what a memory search reads of its query


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None and ".." not in value


def validate_id(value: Any, what: str = "id") -> str:
    """An id that becomes a file name: 1-128 of ``[A-Za-z0-9_.@:-]``, no ``..``, else 400."""
    if not valid_id(value):
        raise BadRequest(f"invalid {what}: use 1-128 letters, digits, '_', '-', '.', '@' or ':'",
                         code=f"invalid_{what.replace(' ', '_')}")
    return value


def require_owner(meta: dict | None, user_id: str) -> dict:
    """A conversation's meta when ``user_id`` owns it; NotFound otherwise, exactly as for an id
    that does not exist, so that guessing ids reveals nothing."""
    if meta is None or meta.get("user_id") != user_id:
        raise NotFound("conversation not found", code="conversation_not_found")
    return meta


def now_iso() -> str:
    """UTC with microseconds, from one clock reading (so it never runs backwards at a second's
    turn); as text these sort in time order, which listings rely on."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Store(typing.Protocol):
    """Where conversations and memories live.  Every method is async; ids are validated.

    What every store guarantees: a conversation belongs to the user who created it;
    ``append_messages`` stores a message whose ``ui_id`` the conversation already holds at
    most once, and refuses (NotFound) a conversation that no longer exists, so a deleted
    one stays deleted; messages without an owner are never served.  Plug another backend
    by passing ``NodeChat(store=...)`` an object with these methods.  One whose
    ``append_messages`` also takes ``durable=False`` gets it for a turn's question: return once
    written, durable with the answer's append that follows (as the two built-in stores do).
    """

    async def get_conversation(self, conversation_id: str) -> dict | None: ...
    async def create_conversation(self, conversation_id: str, user_id: str, title: str = "") -> dict: ...
    async def update_conversation(self, conversation_id: str, **fields: Any) -> None: ...
    async def list_conversations(self, user_id: str, limit: int = 100,
                                 before: str | None = None) -> list[dict]: ...
    async def delete_conversation(self, conversation_id: str) -> None: ...
    async def append_messages(self, conversation_id: str, messages: list[dict]) -> list[dict]: ...
    async def load_messages(self, conversation_id: str) -> list[dict]: ...
    async def truncate_messages(self, conversation_id: str, after_id: str) -> None: ...
    async def add_memory(self, user_id: str, content: str) -> dict: ...
    async def list_memories(self, user_id: str) -> list[dict]: ...
    async def delete_memory(self, user_id: str, memory_id: str) -> bool: ...
    async def search_memories(self, user_id: str, query: str, limit: int = 10) -> list[dict]: ...


def rank_memories(memories: list[dict], query: str, limit: int) -> list[dict]:
    """Memories ranked by keyword relevance to ``query``, best first (see :class:`MemoryIndex`)."""
    return MemoryIndex(memories).search(query, limit)


class MemoryIndex:
    """Memories ready for keyword search: which memories hold each word.

    A query word matches a memory word when equal, or when one is a prefix of the other and
    both have four letters or more ("coffee" finds "coffees"; "tea" does not find "teacher").
    Scores are tf-idf-like: rarer words weigh more, prefix matches 0.6 of an exact one.
    ``total`` is how many memories the user has when ``memories`` holds only candidates
    (PostgresStore), so that the weights, and so the ranking, match a search over all of them.
    """

    def __init__(self, memories: list[dict], total: int | None = None):
        self.memories = memories
        self.total = len(memories) if total is None else total
        self.postings: dict[str, list[int]] = {}
        for index, memory in enumerate(memories):
            for word in set(WORD_PATTERN.findall(str(memory.get("content", "")).lower())):
                self.postings.setdefault(word, []).append(index)
        self.vocabulary = sorted(self.postings)  # words that start with a term sit together

    def search(self, query: str, limit: int) -> list[dict]:
        scores: dict[int, float] = {}
        # a term's prefixes are tried one by one: past MAX_TERM_CHARS a word is no keyword
        for term in {t for t in WORD_PATTERN.findall(query[:MAX_QUERY_CHARS].lower()) if len(t) <= MAX_TERM_CHARS}:
            exact = set(self.postings.get(term, ()))
            near: set[int] = set()
            if len(term) >= 4:
                at = bisect.bisect_right(self.vocabulary, term)
                while at < len(self.vocabulary) and self.vocabulary[at].startswith(term):
                    near.update(self.postings[self.vocabulary[at]])
                    at += 1
                for size in range(4, len(term)):  # the memory's word is a prefix of the term
                    near.update(self.postings.get(term[:size], ()))
            near -= exact
            if not exact and not near:
                continue
            weight = math.log(1 + self.total / (1 + len(exact) + len(near)))
            for index in exact:
                scores[index] = scores.get(index, 0.0) + weight
            for index in near:
                scores[index] = scores.get(index, 0.0) + 0.6 * weight
        ranked = sorted(scores.items(), key=lambda item: (-item[1], -item[0]))[:limit]
        return [{**self.memories[index], "score": round(score, 3)} for index, score in ranked]


@dataclass
# -- JSONFileStore: the embedded default, one folder of files ----------------------------------


class _Cached:
    """A file's parsed content, valid while the file's (inode, mtime, size) key holds."""

    key: tuple | None
    value: Any
    index: Any = None
    offset: int = 0  # bytes of an append-only file read so far
    lines: int = 0


class JSONFileStore:
    """The default store: plain JSON files under one directory.

    ``conversations/<id>.json`` holds a conversation's owner and title (rewritten atomically),
    ``conversations/<id>.jsonl`` its messages (appended, one per line), ``users/<user>.jsonl``
    a log of the user's conversation metas, and of each append's ``updated_at`` (listing reads
    it, not every conversation), and
    ``memories/<user>.json`` a user's memories, ``usage/<user>/<month>.jsonl`` the ledger and
    ``responses/<user>/<id>.json`` the ``/v1/responses`` kept.  Writers take a file lock, so several worker
    processes can share one directory; file work runs in a thread, off the event loop.

    Appends are made durable by group commit (``_synced``): a writer appends under the file's
    lock, lets go of it, and waits for a flush that fsyncs each file written since the last
    one began, once, while later writers gather for the next (PostgreSQL's WAL flush works
    so).  Sixteen turns of one user appending to their listing share one fsync of it instead of
    queueing on its lock for one each.  A message append no longer rewrites the owner file
    either: a conversation's ``updated_at`` is its newest listing line.  A turn's question is
    appended with ``durable=False``: written, and flushed with its answer's append.
    """

    def __init__(self, root: str | os.PathLike, *, max_conversations_per_user: int = 0,
                 max_memories_per_user: int = 0, max_responses_per_user: int = 0, cached_users: int = 256):
        self.root = Path(root)
        self._conversations, self._users = self.root / "conversations", self.root / "users"  # joined once
        self.max_conversations = max_conversations_per_user
        self.max_memories = max_memories_per_user
        self.max_responses = max_responses_per_user
        self._responses_put = LRU(cached_users)  # user -> responses put by this process (when to prune)
        self._threads = FileThreads(STORE_THREADS, "nodechat-store")
        self._unsynced: dict[Path, None] = {}  # appended to since the flush under way began
        self._next_flush: asyncio.Future | None = None  # what the writers of _unsynced wait for
        self._flushing: asyncio.Task | None = None
        self._memories_seen = LRU(cached_users)  # user -> _Cached(memories, MemoryIndex)
        self._listings_seen = LRU(cached_users)  # user -> _Cached({id: meta}, offset read)
        self._folding = threading.Lock()  # one thread at a time brings a listing's fold up to date

    # -- conversations -----------------------------------------------------------------------

    async def get_conversation(self, conversation_id: str) -> dict | None:
        def get() -> dict | None:
            meta = self._meta(conversation_id)
            if meta is not None and ID_PATTERN.fullmatch(str(meta.get("user_id", ""))):
                listed = self._read_listing(meta["user_id"], compact=False).get(conversation_id)
                if listed and listed.get("updated_at", "") > meta.get("updated_at", ""):
                    meta = {**meta, "updated_at": listed["updated_at"]}
            return meta

        return await self._in_thread(get)

    async def create_conversation(self, conversation_id: str, user_id: str, title: str = "") -> dict:
        path = self._conversation(conversation_id, ".json")
        validate_id(user_id, "user id")

        def create() -> dict:
            with _locked(path):
                existing = self._meta(conversation_id)
                if existing is not None:
                    return existing
                if self._conversation(conversation_id, ".jsonl").exists():
                    raise _unavailable(conversation_id, "holds messages with no owner")
                with _locked(self._listing(user_id)):
                    count = len(self._read_listing(user_id, compact=False))
                    if self.max_conversations and count >= self.max_conversations:
                        raise Forbidden(f"you have {self.max_conversations} conversations, the most "
                                        "kept per user; delete some first", code="conversation_quota")
                    stamp = now_iso()
                    meta = {"id": conversation_id, "user_id": user_id, "title": title,
                            "created_at": stamp, "updated_at": stamp}
                    _write_json(path, meta)
                    _append_lines(self._listing(user_id), [meta], sync=False)
                return meta

        meta = await self._in_thread(create)
        await self._synced(self._listing(user_id))
        return meta

    async def update_conversation(self, conversation_id: str, **fields: Any) -> None:
        await self._in_thread(self._update, conversation_id, fields)

    async def list_conversations(self, user_id: str, limit: int = 100,
                                 before: str | None = None) -> list[dict]:
        """The user's conversations, most recently updated first; ``before`` (an
        ``updated_at``) asks for the page after the one that ended there."""
        def page() -> list[dict]:
            metas = list(self._read_listing(user_id).values())
            if before:
                metas = [m for m in metas if m["updated_at"] < before]
            return sorted(metas, key=lambda m: (m["updated_at"], m["id"]), reverse=True)[:limit]

        return await self._in_thread(page)

    async def delete_conversation(self, conversation_id: str) -> None:
        messages = self._conversation(conversation_id, ".jsonl")
        path = self._conversation(conversation_id, ".json")

        def delete() -> None:
            with _locked(messages), _locked(path):
                try:
                    meta = _read_json(path, strict=True)
                except Conflict:
                    meta = None
                messages.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                if meta and ID_PATTERN.fullmatch(str(meta.get("user_id", ""))):
                    with _locked(self._listing(meta["user_id"])):
                        _append_lines(self._listing(meta["user_id"]), [{"id": conversation_id, "deleted": True}])
                for held in (messages, path):  # a waiter finds its lock file gone and retries
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_lock_path(held))

        await self._in_thread(delete)

    async def append_messages(self, conversation_id: str, messages: list[dict],
                              durable: bool = True) -> list[dict]:
        """``durable=False``: return once written, and leave the fsync to the next flush (a
        turn's question: its answer's append flushes the same file)."""
        path = self._conversation(conversation_id, ".jsonl")
        stamped = [{"id": new_id("msg"), "created_at": "", **m} for m in messages]

        def append() -> tuple[list[dict], Path | None]:
            with _locked(path):
                meta = self._meta(conversation_id)
                if meta is None:
                    raise NotFound("conversation not found", code="conversation_not_found")
                fresh = _new_ui_ids(_read_lines(path) if any("ui_id" in m for m in stamped) else [], stamped)
                if not fresh:
                    return fresh, None
                listing, stamp = self._listing(meta["user_id"]), now_iso()  # in order, under the lock
                for message in fresh:
                    message["created_at"] = message["created_at"] or stamp
                size = _append_lines(path, fresh, sync=False)
                try:
                    with _locked(listing):
                        _append_lines(listing, [{"id": conversation_id, "updated_at": stamp}], sync=False)
                except OSError:  # all or nothing: the messages go again too
                    os.truncate(path, size)
                    raise
                return fresh, listing

        fresh, listing = await self._in_thread(append)
        if listing is not None:
            if durable:
                await self._synced(path, listing)
            else:
                self._unsynced.update(dict.fromkeys((path, listing)))
        return fresh

    async def load_messages(self, conversation_id: str) -> list[dict]:
        return await self._in_thread(_read_lines, self._conversation(conversation_id, ".jsonl"))

    async def truncate_messages(self, conversation_id: str, after_id: str) -> None:
        """Drop every message stored after ``after_id`` (an answer to regenerate)."""
        path = self._conversation(conversation_id, ".jsonl")

        def truncate() -> None:
            with _locked(path):
                records = _read_lines(path)
                keep = next((i + 1 for i, r in enumerate(records) if r.get("id") == after_id), None)
                if keep is None:
                    raise NotFound("message not found", code="message_not_found")
                if keep < len(records):
                    _write_bytes(path, _jsonl(records[:keep]), replaces_appends=True)

        await self._in_thread(truncate)

    # -- memories ------------------------------------------------------------------------------

    async def add_memory(self, user_id: str, content: str) -> dict:
        memory = {"id": new_id("mem"), "content": content, "created_at": now_iso()}

        def add(memories: list[dict] | None) -> list[dict]:
            memories = memories or []
            if self.max_memories and len(memories) >= self.max_memories:
                raise Forbidden(f"{self.max_memories} memories are kept per user; delete some first",
                                code="memory_quota")
            return memories + [memory]

        await self._in_thread(_modify_json, self._memories(user_id), add)
        return memory

    async def list_memories(self, user_id: str) -> list[dict]:
        return list((await self._in_thread(self._cached_memories, user_id)).value)

    async def delete_memory(self, user_id: str, memory_id: str) -> bool:
        removed = []

        def without(memories: list[dict] | None) -> list[dict]:
            kept = [m for m in memories or [] if m["id"] != memory_id]
            removed.append(len(kept) != len(memories or []))
            return kept

        await self._in_thread(_modify_json, self._memories(user_id), without)
        return removed[0]

    async def search_memories(self, user_id: str, query: str, limit: int = 10) -> list[dict]:
        def search() -> list[dict]:
            entry = self._cached_memories(user_id)
            if entry.index is None:
                entry.index = MemoryIndex(entry.value)
            return entry.index.search(query, limit)

        return await self._in_thread(search)

    # -- the usage ledger ----------------------------------------------------------------------

    async def append_usage(self, entries: list[dict]) -> None:
        """Ledger entries, appended to ``usage/<user>/<YYYY-MM>.jsonl`` (one file per user
        and month: a period's budget reads a month or two, never the user's whole history)."""
        def append() -> None:
            files: dict[tuple[str, str], list[dict]] = {}
            for entry in entries:
                files.setdefault((entry["user"], entry["at"][:7]), []).append(entry)
            for (user, month), batch in files.items():
                path = self._usage(user, month)
                with _locked(path):
                    _append_lines(path, batch)

        await self._in_thread(append)

    async def read_usage(self, user_id: str | None, start: datetime.datetime,
                         end: datetime.datetime | None) -> list[dict]:
        """The entries of ``user_id`` (None: everyone) in the months from ``start`` to ``end``."""
        last = (end or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m")
        first = start.strftime("%Y-%m")

        def read() -> list[dict]:
            folders = [self._usage(user_id, "x").parent] if user_id is not None else \
                sorted(p for p in (self.root / "usage").glob("*") if p.is_dir())
            return [entry for folder in folders for path in sorted(folder.glob("*.jsonl"))
                    if first <= path.stem <= last for entry in _read_lines(path)]

        return await self._in_thread(read)

    def _usage(self, user_id: str, month: str) -> Path:
        """A user's ledger file for ``month``."""
        return self.root / "usage" / user_folder(user_id) / f"{month}.jsonl"

    # -- attachments: stored once per user, by their content, however many messages hold them ---

    async def put_blob(self, user_id: str, digest: str, data: bytes) -> None:
        """``blobs/<user>/<ab>/<sha256>``, written once (fsynced, then renamed into place).
        Per user: a name anyone could compute from a file tells nobody else it was sent."""
        path = self._blob(user_id, digest)
        await self._in_thread(lambda: path.exists() or _write_bytes(path, data))

    async def get_blob(self, user_id: str, digest: str, named: bool = False) -> bytes | None:
        """The user's blob.  ``named``: the caller read the digest from the user's own stored
        message, so one kept before blobs were per user (``blobs/<ab>/<sha256>``) is theirs too."""
        paths = [self._blob(user_id, digest)] + ([self.root / "blobs" / digest[:2] / digest] if named else [])

        def read() -> bytes | None:
            for path in paths:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    return path.read_bytes()
            return None

        return await self._in_thread(read)

    def _blob(self, user_id: str, digest: str) -> Path:
        if not BLOB_DIGEST.fullmatch(digest):
            raise BadRequest("an attachment is named by its SHA-256, 64 hexadecimal digits", code="invalid_blob")
        return self.root / "blobs" / user_folder(user_id) / digest[:2] / digest

    # -- /v1/responses kept for previous_response_id ---------------------------------------------

    async def put_response(self, user_id: str, response_id: str, record: dict) -> None:
        """``responses/<user>/<id>.json``, the user's oldest beyond ``max_responses`` removed:
        every sixteenth of the bound, so a user may briefly keep up to a sixteenth more (a scan
        of a thousand files on every put made it 4.9 ms; amortized it is 0.7)."""
        path = self._response(user_id, response_id)
        puts = self._responses_put[user_id] = self._responses_put.get(user_id, -1) + 1
        prune = self.max_responses and puts % max(1, self.max_responses // 16) == 0

        def put() -> None:
            _write_json(path, record)
            if prune:
                kept = []
                for entry in os.scandir(path.parent):
                    with contextlib.suppress(OSError):  # deleted meanwhile, by a DELETE or another worker
                        if entry.name.endswith(".json") and not entry.name.startswith("."):
                            kept.append((entry.stat().st_mtime_ns, entry.path))
                for _, old in sorted(kept, reverse=True)[self.max_responses:]:
                    with contextlib.suppress(OSError):
                        os.unlink(old)

        await self._in_thread(put)

    async def get_response(self, user_id: str, response_id: str) -> dict | None:
        """The user's response ``response_id`` (None for another user's, or none)."""
        if not valid_id(response_id):
            return None
        return await self._in_thread(_read_json, self._response(user_id, response_id))

    async def delete_response(self, user_id: str, response_id: str) -> bool:
        if not valid_id(response_id):
            return False
        path = self._response(user_id, response_id)

        def delete() -> bool:
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return False

        return await self._in_thread(delete)

    def _response(self, user_id: str, response_id: str) -> Path:
        return self.root / "responses" / user_folder(user_id) / (validate_id(response_id, "response id") + ".json")

    async def check(self) -> None:
        """At start-up: move aside (with a warning) any JSON file that is torn or invalid,
        and build the per-user listings of a data directory written before they existed."""
        def scan() -> None:
            for folder in ("conversations", "memories"):
                for path in (self.root / folder).glob("*.json"):
                    _read_json(path)
            users = self.root / "users"
            if not users.is_dir():
                metas = [_read_json(p) for p in (self.root / "conversations").glob("*.json")]
                for meta in sorted(filter(None, metas), key=lambda m: m.get("updated_at", "")):
                    _append_lines(self._listing(meta["user_id"]), [meta])
                users.mkdir(parents=True, exist_ok=True)

        await self._in_thread(scan)

    # -- paths, caches and errors --------------------------------------------------------------

    def _conversation(self, conversation_id: str, suffix: str) -> Path:
        return self._conversations / (validate_id(conversation_id, "conversation id") + suffix)

    def _memories(self, user_id: str) -> Path:
        return self.root / "memories" / (validate_id(user_id, "user id") + ".json")

    def _listing(self, user_id: str) -> Path:
        return self._users / (validate_id(user_id, "user id") + ".jsonl")

    def _update(self, conversation_id: str, fields: dict) -> None:
        def update(meta: Any) -> Any:
            if meta is None:
                return None
            meta = {**meta, **fields, "updated_at": now_iso()}
            with _locked(self._listing(meta["user_id"])):
                _append_lines(self._listing(meta["user_id"]), [meta])
            return meta

        _modify_json(self._conversation(conversation_id, ".json"), update, strict=True)

    def _meta(self, conversation_id: str) -> dict | None:
        """A conversation's owner file; a torn one makes the id unavailable, never new."""
        try:
            return _read_json(self._conversation(conversation_id, ".json"), strict=True)
        except Conflict:
            raise _unavailable(conversation_id, "has a damaged owner file") from None

    def _cached_memories(self, user_id: str) -> _Cached:
        """A user's memories (and search index), read again only when the file changed;
        the key (inode, mtime, size) changes with every atomic replace, in any process."""
        path = self._memories(user_id)
        key = _file_key(path)
        entry = self._memories_seen.get(user_id)
        if entry is None or entry.key != key:
            entry = _Cached(key, (_read_json(path) or []) if key else [])
            self._memories_seen[user_id] = entry
        return entry

    def _read_listing(self, user_id: str, compact: bool = True) -> dict[str, dict]:
        """The user's conversations by id, folded from the listing log; only lines
        appended since the last read are parsed, and a log mostly made of superseded
        lines is rewritten compactly (folded again under its lock, so that no line
        appended meanwhile is lost).  The dict is shared: iterate a ``list()`` of it."""
        with self._folding:
            entry = self._fold_listing(user_id)
            crowded = entry.lines > 2 * len(entry.value) + 64
        if compact and crowded:
            path = self._listing(user_id)
            with _locked(path):
                with self._folding:
                    self._listings_seen.pop(user_id, None)
                    folded = _jsonl(list(self._fold_listing(user_id).value.values()))
                _write_bytes(path, folded, replaces_appends=True)
                with self._folding:
                    self._listings_seen.pop(user_id, None)
                    entry = self._fold_listing(user_id)
        return entry.value

    def _fold_listing(self, user_id: str) -> _Cached:
        """The cached fold of a listing, brought up to date (the caller holds ``_folding``)."""
        path = self._listing(user_id)
        try:
            listing = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            listing = None
        try:
            # the key of the file opened, not of the path: a compaction elsewhere may replace it
            stat = os.fstat(listing) if listing is not None else None
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size) if stat else None
            entry = self._listings_seen.get(user_id)
            if entry is None or key is None or entry.key is None or entry.key[0] != key[0] \
                    or key[2] < entry.offset:
                entry = _Cached(key, {})
            tail = _read_from(listing, entry.offset) if key is not None and key[2] > entry.offset else b""
        finally:
            if listing is not None:
                os.close(listing)
        if tail:
            complete = tail[:tail.rfind(b"\n") + 1]
            for record in _parse_lines(complete, path):
                entry.lines += 1
                if record.get("deleted"):
                    entry.value.pop(record.get("id"), None)
                elif "user_id" in record:  # the whole meta: created, or a new title
                    entry.value[record["id"]] = record
                elif record.get("id") in entry.value:  # a message appended: a newer updated_at
                    entry.value[record["id"]] = {**entry.value[record["id"]], **record}
            entry.offset += len(complete)
        entry.key = key
        self._listings_seen[user_id] = entry
        return entry

    async def _synced(self, *paths: Path) -> None:
        """Wait until ``paths`` (appended to, their locks let go) are on disk: the next
        flush fsyncs every file appended to before it began, each once.  One flush runs at a
        time; writers arriving during it gather for the next.  A failed fsync fails every
        writer of that flush."""
        self._unsynced.update(dict.fromkeys(paths))
        if self._next_flush is None:
            self._next_flush = asyncio.get_running_loop().create_future()
        flushed = self._next_flush
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())
        await asyncio.shield(flushed)

    async def aclose(self) -> None:
        """Flush what was written with ``durable=False`` and not flushed since, and wait for a
        flush under way (its writers may have been cancelled: its fsync is still owed)."""
        if self._unsynced or self._flushing is not None:
            await self._synced()

    async def _flush(self) -> None:
        try:
            while self._next_flush is not None:
                paths, flushed = list(self._unsynced), self._next_flush
                self._unsynced, self._next_flush = {}, None
                try:
                    await self._in_thread(_fsync_files, paths)
                except BaseException as exc:
                    flushed.set_exception(exc)
                    flushed.exception()  # retrieved: a writer that left meanwhile leaves no warning
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                else:
                    flushed.set_result(None)
        finally:  # cleared here, not by a done callback a later writer could run before
            self._flushing = None

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        """File work in the store's own threads (tools' DNS lookups and HTML parsing in the
        default pool never hold it up); a full disk is 507 and a read-only one a clear 500."""
        try:
            return await self._threads.run(fn, *args)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage("the data directory is full", code="storage_full") from exc
            log.error("data directory: %s", exc)
            reason = "read-only" if exc.errno == errno.EROFS else f"not writable ({exc.strerror})"
            raise NodeChatError(f"the data directory is {reason}", code="storage_error") from exc


class FileThreads:
    """The JSON store's threads.  A job goes on a queue with the future it settles; a thread
    runs it and hands its result to the loop with one ``call_soon_threadsafe``.

    ``run_in_executor`` chains a concurrent future to an asyncio one through four callbacks
    and a semaphore: 13 µs of CPU a hop against 2.9 µs this way (16 callers on uvloop,
    measured alone), and a stored turn makes eight hops.  The threads start with the first
    job and end when their owner is collected.  A job whose caller was cancelled still runs
    to its end (as with an executor): file work is never cut half-way."""

    def __init__(self, count: int, name: str):
        self.count, self.name = count, name
        self._jobs: queue.SimpleQueue | None = None

    async def run(self, fn: Callable, *args: Any) -> Any:
        if self._jobs is None:
            self._jobs = jobs = queue.SimpleQueue()
            for number in range(self.count):
                threading.Thread(target=_run_jobs, args=(jobs,), name=f"{self.name}_{number}", daemon=True).start()
            weakref.finalize(self, _stop_jobs, jobs, self.count)
        loop = asyncio.get_running_loop()
        settled = loop.create_future()
        self._jobs.put((loop, settled, fn, args))
        return await settled


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        loop, settled, fn, args = job
        job = None  # nothing of a finished job is kept while the thread waits for the next
        try:
            outcome = (fn(*args), None)
        except BaseException as exc:
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, settled, *outcome)
        loop = settled = fn = args = outcome = None


def _settle(settled: asyncio.Future, result: Any, failure: BaseException | None) -> None:
    if not settled.cancelled():
        settled.set_result(result) if failure is None else settled.set_exception(failure)


def _stop_jobs(jobs: queue.SimpleQueue, count: int) -> None:
    for _ in range(count):
        jobs.put(None)


class LRU(collections.OrderedDict):
    """A dict that forgets its least recently used entries past ``size``."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


BLOB_DIGEST = re.compile(r"[0-9a-f]{64}")


def user_folder(user_id: str) -> str:
    """A user's folder name: a user id that is no file name (a host's ``authenticate`` may
    return any string) is hashed."""
    return user_id if valid_id(user_id) else "h-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]


def _unavailable(conversation_id: str, why: str) -> Conflict:
    return Conflict(f"conversation {conversation_id!r} {why}; it cannot be used until an "
                    "operator repairs it", code="conversation_unavailable")


def _new_ui_ids(stored: list[dict], incoming: list[dict]) -> list[dict]:
    """``incoming`` without the messages whose ``ui_id`` is stored (or repeated)."""
    seen = {m.get("ui_id") for m in stored if m.get("ui_id")}
    fresh = []
    for message in incoming:
        if message.get("ui_id") in seen:
            continue
        if message.get("ui_id"):
            seen.add(message["ui_id"])
        fresh.append(message)
    return fresh


def _file_key(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _lock_path(path: str | Path) -> str:
    """The file ``_locked`` locks for ``path`` (a string: pathlib was a tenth of a stored
    turn's CPU)."""
    return os.fspath(path) + ".lock"


def _open_in_folder(path: str | Path, flags: int) -> int:
    """``os.open`` (creating the file) that makes its folder when it is missing: once, not a
    mkdir per call (a lock and an append per message each made one).

    The store's small reads, appends and locks use descriptors, not Python file objects:
    a buffered file object cost as much again as its system calls (a lock 21 → 11 µs, an
    append 17 → 9 µs, a read 12 → 7 µs, measured alone), and a turn makes about ten."""
    flags |= os.O_CREAT | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o666)


def _read_whole(path: str | Path) -> bytes:
    """A file's bytes through one descriptor (FileNotFoundError when missing)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        return _read_from(fd, 0)
    finally:
        os.close(fd)


def _read_from(fd: int, offset: int) -> bytes:
    """Everything from ``offset`` to the end: one read, unless one read returns less than
    the file holds (past 2 GiB; a network file system) or the file grows meanwhile."""
    os.lseek(fd, offset, os.SEEK_SET)
    chunks = []
    while True:
        size = os.fstat(fd).st_size
        want = max(size - offset, 0) + 1  # a byte more than there is: a short read at the size is the end
        chunk = os.read(fd, want)
        chunks.append(chunk)
        offset += len(chunk)
        if not chunk or (len(chunk) < want and offset >= size):
            return b"".join(chunks)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (through ``path.lock``) across threads and processes.

    A deleted conversation removes its lock files while holding them, so a waiter that
    wakes up holding a removed file's lock tries again on the new one."""
    if fcntl is None:  # pragma: no cover
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        yield
        return
    lock_path = _lock_path(path)
    while True:
        lock = _open_in_folder(lock_path, os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if _same_file(lock, lock_path):
                    yield
                    return
            finally:  # before the close: a forked child's copy of the descriptor holds no lock
                fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _modify_json(path: Path, change: Callable[[Any], Any], strict: bool = False) -> Any:
    """Read-modify-write one JSON file under its lock; ``change`` gets None for a missing
    file and returns the new content (None: leave the file alone)."""
    with _locked(path):
        value = change(_read_json(path, strict))
        if value is not None:
            _write_json(path, value)
        return value


def _read_json(path: Path, strict: bool = False) -> Any:
    """A JSON file's content, None when missing.  An invalid file raises Conflict when
    ``strict``; otherwise it is moved aside with a warning and counts as missing."""
    try:
        return json.loads(_read_whole(path))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        if strict:
            raise Conflict(f"{path.name} is not valid JSON", code="damaged_file") from None
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.warning("%s is not valid JSON; moved aside to %s", path, aside.name)
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        return None


def _write_json(path: Path, value: Any) -> None:
    _write_bytes(path, json.dumps(value, ensure_ascii=False).encode())


def _write_bytes(path: Path, data: bytes, replaces_appends: bool = False) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then os.replace.
    ``replaces_appends``: the file is one that appends go to, made durable by a flush that
    opens it by name (``_synced``); the rename is made durable first (the directory fsynced),
    or a crash could bring back the old file, whose last appends that flush never saw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if replaces_appends:
            _fsync_files([path.parent])
    finally:
        tmp.unlink(missing_ok=True)


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _append_lines(path: Path, records: list[dict], sync: bool = True) -> int:
    """Append records (the caller holds the lock) and return the size before; a failed
    write is cut off again, so a full disk leaves no half-written line behind.  With
    ``sync=False`` the caller makes them durable later (``JSONFileStore._synced``)."""
    data = _jsonl(records)
    fd = _open_in_folder(path, os.O_RDWR | os.O_APPEND)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)  # the caller holds the lock: no writer moves it
        if size > 0:  # a torn last line (a crash mid-write) must not swallow the next record
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                data = b"\n" + data
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if sync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    return size


def _fsync_files(paths: list[Path]) -> None:
    """fsync each file or folder (any descriptor of a file flushes what every writer wrote
    to it)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # deleted meanwhile: nothing of it to keep
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_lines(path: Path) -> list[dict]:
    try:
        raw = _read_whole(path)
    except FileNotFoundError:
        return []
    return _parse_lines(raw, path)


def _parse_lines(raw: bytes, path: Path) -> list[dict]:
    """Each line's record; a torn or invalid line is skipped with a warning.

    The lines are parsed as one JSON array first: one call into the C scanner instead of
    one per line (20 messages: 71 → 41 µs).  A torn line never parses so (it leaves a
    bracket, a string or a UTF-8 sequence open, and the next record's first key then ends
    the string with a bare word), and then the lines are parsed one by one to find it."""
    lines = [line for line in raw.splitlines() if line.strip()]
    with contextlib.suppress(ValueError, RecursionError):
        return json.loads(b"[" + b",".join(lines) + b"]")
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            log.warning("%s: line %d is torn or invalid; ignored", path, number)
    return records


###############################################################################
# Store: PostgreSQL, for several processes on several machines
###############################################################################


DB_CONNECT_TIMEOUT_SECONDS = 10  # connecting, or waiting for a free pooled connection
DB_QUERY_TIMEOUT_SECONDS = 60  # a query on a hung server fails (503) instead of hanging a turn
DB_MIGRATION_LOCK = 0x6E6F64656368  # advisory lock key ("nodech") serialising migrations
DB_QUOTAS = types.MappingProxyType({"conversation": (1, "conversations"),  # lock key, table
                                    "memory": (2, "memories")})
DB_NOW = "statement_timestamp()"  # unlike now(), read after the locks earlier statements took
DB_ISO = """to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""  # as now_iso() writes

#: The schema, one entry per version; append, never edit.  Message bodies are ``json``, not
#: ``jsonb``: kept byte for byte (key order, ``\u0000``, which jsonb refuses) and never queried.
#: ``memories.words`` is filled from nodechat's own tokenizer (WORD_PATTERN), not to_tsvector,
#: whose parser splits "foo_bar", "e-mail" or "3.14" differently: candidates must not be missed.
#: Its GIN index has no pending list (fastupdate off): searches never scan unindexed entries,
#: whose cost grows with every insert; memories are added one at a time anyway.
PG_MIGRATIONS = (
    """
    CREATE TABLE conversations (
        id text PRIMARY KEY,
        user_id text NOT NULL,
        title text NOT NULL DEFAULT '',
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL);
    CREATE INDEX conversations_by_user ON conversations (user_id, updated_at DESC, id DESC);
    CREATE TABLE messages (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        conversation_id text NOT NULL REFERENCES conversations ON DELETE CASCADE,
        id text NOT NULL,
        ui_id text,
        created_at timestamptz NOT NULL,
        body json NOT NULL,
        PRIMARY KEY (conversation_id, seq),
        UNIQUE (conversation_id, id));
    CREATE UNIQUE INDEX messages_ui_id ON messages (conversation_id, ui_id) WHERE ui_id IS NOT NULL;
    CREATE TABLE memories (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        user_id text NOT NULL,
        content text NOT NULL,
        created_at timestamptz NOT NULL,
        words tsvector NOT NULL);
    CREATE INDEX memories_by_user ON memories (user_id, seq);
    CREATE INDEX memories_words ON memories USING gin (words) WITH (fastupdate = off);
    """,
    # PostgresTurns: the turns running in every process, and the bytes of their streams
    """
    CREATE TABLE nodechat_turns (
        turn_id text PRIMARY KEY,
        user_id text NOT NULL,
        conversation_id text,
        capped boolean NOT NULL,
        ui boolean,
        resumable boolean NOT NULL DEFAULT false,
        orphaned bytea NOT NULL DEFAULT '',
        owner text NOT NULL,
        stop_requested boolean NOT NULL DEFAULT false,
        lease_until timestamptz NOT NULL);
    CREATE UNIQUE INDEX nodechat_turns_one_per_conversation ON nodechat_turns (user_id, conversation_id);
    CREATE TABLE nodechat_turn_chunks (
        turn_id text NOT NULL,
        seq integer NOT NULL,
        data bytea NOT NULL,
        last boolean NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (turn_id, seq));
    """,
    # Ledger: one row per upstream call; PostgresLedger's budget and rate counters
    """
    CREATE TABLE nodechat_usage (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at timestamptz NOT NULL,
        user_id text NOT NULL,
        conversation_id text,
        protocol text NOT NULL,
        model text NOT NULL,
        provider text NOT NULL,
        input_tokens integer NOT NULL,
        output_tokens integer NOT NULL,
        cached_tokens integer NOT NULL,
        reasoning_tokens integer NOT NULL,
        estimated boolean NOT NULL);
    CREATE INDEX nodechat_usage_by_user ON nodechat_usage (user_id, at);
    CREATE INDEX nodechat_usage_by_time ON nodechat_usage (at);
    CREATE TABLE nodechat_limits (
        user_id text NOT NULL,
        key text NOT NULL,
        used bigint NOT NULL,
        until timestamptz NOT NULL,
        PRIMARY KEY (user_id, key));
    """,
    # /v1/responses kept for previous_response_id, per user
    """
    CREATE TABLE nodechat_responses (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        user_id text NOT NULL,
        id text NOT NULL,
        body json NOT NULL,
        PRIMARY KEY (user_id, id));
    CREATE INDEX nodechat_responses_by_age ON nodechat_responses (user_id, seq);
    """,
    # attachments (images in stored messages), by their content's SHA-256
    """
    CREATE TABLE nodechat_blobs (
        digest text PRIMARY KEY,
        data bytea NOT NULL);
    """,
    # ... per user: the name is the content's hash, which tells whoever can compute it nothing
    # of anyone else's (rows from before have no user, and nobody reads them)
    """
    ALTER TABLE nodechat_blobs ADD COLUMN user_id text NOT NULL DEFAULT '';
    ALTER TABLE nodechat_blobs DROP CONSTRAINT nodechat_blobs_pkey;
    ALTER TABLE nodechat_blobs ADD PRIMARY KEY (user_id, digest);
    """,
)

CONVERSATION_COLUMNS = "id, user_id, title, created_at, updated_at"
# formatted by the server: decoding datetimes and strftime in Python cost more than the query
CONVERSATION_FIELDS = f"id, user_id, title, {DB_ISO.format('created_at')}, {DB_ISO.format('updated_at')}"
INSERT_MESSAGES = (  # one INSERT for a batch, in order; a ui_id already stored is skipped
    "INSERT INTO messages (conversation_id, id, ui_id, created_at, body) "
    f"SELECT $1, m.id, m.ui_id, coalesce(m.created_at, {DB_NOW}), m.body "
    "FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::json[]) "
    "WITH ORDINALITY AS m(id, ui_id, created_at, body, n) ORDER BY m.n "
    "ON CONFLICT DO NOTHING RETURNING id")
INSERT_USAGE = (
    "INSERT INTO nodechat_usage (at, user_id, conversation_id, protocol, model, provider, input_tokens, "
    "output_tokens, cached_tokens, reasoning_tokens, estimated) SELECT * FROM unnest($1::timestamptz[], "
    "$2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::int[], $9::int[], $10::int[], "
    "$11::bool[])")
INSERT_MEMORIES = (
    "INSERT INTO memories (id, user_id, content, created_at, words) "
    f"SELECT m.id, $1, m.content, coalesce(m.created_at, {DB_NOW}), "
    "array_to_tsvector(string_to_array(m.words, ' ')) "
    "FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::text[]) "
    "WITH ORDINALITY AS m(id, content, created_at, words, n) ORDER BY m.n "
    f"ON CONFLICT DO NOTHING RETURNING {DB_ISO.format('created_at')}")


class PostgresStore:
    """Conversations and memories in PostgreSQL, shared by any number of nodechat processes.

    Chosen by ``database_url``; needs the ``nodechat[postgres]`` extra (asyncpg).  The
    connection pool opens on first use, in the running loop, and the schema is created or
    migrated then.  While the database is down every call raises StoreUnavailable (503);
    calls succeed again once it is back, with no restart.

    ``max_conversations_per_user``, ``max_memories_per_user`` and ``max_responses_per_user``:
    0 means no limit.
    """

    def __init__(self, url: str, *, max_conversations_per_user: int = 0,
                 max_memories_per_user: int = 0, max_responses_per_user: int = 0, pool_size: int = 10):
        self._asyncpg = _import_asyncpg()
        self.url = url
        self.max_conversations_per_user = max_conversations_per_user
        self.max_memories_per_user = max_memories_per_user
        self.max_responses = max_responses_per_user
        self.pool_size = pool_size
        self._outages = (OSError, self._asyncpg.PostgresConnectionError, self._asyncpg.InterfaceError,
                         self._asyncpg.OperatorInterventionError,  # shutdown, crash, "starting up"
                         self._asyncpg.InsufficientResourcesError)  # too many connections
        self._pool = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._down = False  # log an outage once, and its end

    # -- conversations -----------------------------------------------------------------------

    async def get_conversation(self, conversation_id: str) -> dict | None:
        cid = validate_id(conversation_id, "conversation id")
        async with self._connection() as db:
            row = await db.fetchrow(f"SELECT {CONVERSATION_FIELDS} FROM conversations WHERE id = $1", cid)
        return _conversation(row) if row else None

    async def create_conversation(self, conversation_id: str, user_id: str, title: str = "") -> dict:
        """The new conversation, or the existing one with that id (the caller checks its owner)."""
        cid, uid = validate_id(conversation_id, "conversation id"), validate_id(user_id, "user id")
        select = f"SELECT {CONVERSATION_FIELDS} FROM conversations WHERE id = $1"
        async with self._transaction() as db:
            row = await db.fetchrow(select, cid)
            if row is None:
                await self._check_quota(db, "conversation", uid, self.max_conversations_per_user)
                row = await db.fetchrow(
                    f"INSERT INTO conversations ({CONVERSATION_COLUMNS}) "
                    f"VALUES ($1, $2, $3, {DB_NOW}, {DB_NOW}) "
                    f"ON CONFLICT (id) DO NOTHING RETURNING {CONVERSATION_FIELDS}",
                    cid, uid, _text(title))
                row = row or await db.fetchrow(select, cid)  # created by another process meanwhile
        return _conversation(row)

    async def update_conversation(self, conversation_id: str, **fields: Any) -> None:
        """Set the title (the only field a conversation has beyond its owner) and updated_at."""
        cid = validate_id(conversation_id, "conversation id")
        if set(fields) - {"title"}:
            raise ValueError(f"PostgresStore cannot update {', '.join(sorted(set(fields) - {'title'}))}")
        async with self._connection() as db:
            await db.execute(f"UPDATE conversations SET title = coalesce($2, title), "
                             f"updated_at = {DB_NOW} WHERE id = $1", cid, _text(fields.get("title")))

    async def list_conversations(self, user_id: str, limit: int = 100,
                                 before: str | None = None) -> list[dict]:
        """The user's conversations, last updated first; ``before`` (an ``updated_at``) pages on."""
        args: list[Any] = [validate_id(user_id, "user id"), max(0, limit)]
        sql = f"SELECT {CONVERSATION_FIELDS} FROM conversations WHERE user_id = $1"
        if before is not None:  # a separate statement, so that the index serves the range too
            sql += " AND updated_at < $3"
            args.append(_parse_time(before, "before"))
        async with self._connection() as db:
            rows = await db.fetch(sql + " ORDER BY updated_at DESC, id DESC LIMIT $2", *args)
        return [_conversation(row) for row in rows]

    async def delete_conversation(self, conversation_id: str) -> None:
        cid = validate_id(conversation_id, "conversation id")
        async with self._connection() as db:
            await db.execute("DELETE FROM conversations WHERE id = $1", cid)  # messages cascade

    async def append_messages(self, conversation_id: str, messages: list[dict],
                              durable: bool = True) -> list[dict]:
        """Store ``messages`` after the others and return those stored, each with a new
        ``id`` and ``created_at``: a message whose ``ui_id`` the conversation already holds
        is skipped (a client resending its history).  ``updated_at`` moves if any was stored.
        ``durable=False`` commits without waiting for the WAL flush (``synchronous_commit``
        off for this transaction only), as the JSON store leaves its fsync to the next flush.

        NotFound when the conversation is gone (deleted while a turn ran): never recreated.
        """
        cid = validate_id(conversation_id, "conversation id")
        bodies = [{k: v for k, v in m.items() if k not in ("id", "created_at")} for m in messages]
        ids = [new_id("msg") for _ in bodies]
        commit = "true" if durable else "set_config('synchronous_commit', 'off', true) IS NOT NULL"
        async with self._transaction() as db:
            # the row lock orders concurrent appends and waits out a concurrent delete
            if not await db.fetchval(f"SELECT {commit} FROM conversations WHERE id = $1 FOR UPDATE", cid):
                raise NotFound("conversation not found", code="conversation_not_found")
            created_at, added = await db.fetchrow(
                f"WITH added AS ({INSERT_MESSAGES}), bumped AS (UPDATE conversations "
                f"SET updated_at = {DB_NOW} WHERE id = $1 AND EXISTS (SELECT FROM added)) "
                f"SELECT {DB_ISO.format(DB_NOW)}, array_agg(id) FROM added",
                cid, ids, [str(b["ui_id"]) if b.get("ui_id") else None for b in bodies],
                [None] * len(bodies), [json.dumps(b, ensure_ascii=False) for b in bodies])
        stored = set(added or ())
        return [{"id": i, "created_at": created_at, **b} for i, b in zip(ids, bodies) if i in stored]

    async def load_messages(self, conversation_id: str) -> list[dict]:
        cid = validate_id(conversation_id, "conversation id")
        async with self._connection() as db:
            rows = await db.fetch(f"SELECT id, {DB_ISO.format('created_at')}, body FROM messages "
                                  "WHERE conversation_id = $1 ORDER BY seq", cid)
        return [{"id": i, "created_at": at, **json.loads(body)} for i, at, body in rows]

    async def truncate_messages(self, conversation_id: str, after_id: str) -> None:
        """Delete every message stored after message ``after_id`` (to answer it again)."""
        cid = validate_id(conversation_id, "conversation id")
        async with self._transaction() as db:
            seq = await db.fetchval("SELECT seq FROM messages WHERE conversation_id = $1 AND id = $2",
                                    cid, after_id)
            if seq is None:
                raise NotFound("message not found", code="message_not_found")
            await db.execute("DELETE FROM messages WHERE conversation_id = $1 AND seq > $2", cid, seq)

    # -- memories ------------------------------------------------------------------------------

    async def add_memory(self, user_id: str, content: str) -> dict:
        uid, memory_id, content = validate_id(user_id, "user id"), new_id("mem"), _text(content)
        async with self._transaction() as db:
            await self._check_quota(db, "memory", uid, self.max_memories_per_user)
            created_at = await db.fetchval(f"WITH added AS ({INSERT_MEMORIES}) SELECT * FROM added",
                                           uid, [memory_id], [content], [None], [_words(content)])
        return {"id": memory_id, "content": content, "created_at": created_at}

    async def list_memories(self, user_id: str) -> list[dict]:
        uid = validate_id(user_id, "user id")
        async with self._connection() as db:
            rows = await db.fetch(f"SELECT id, content, {DB_ISO.format('created_at')} FROM memories "
                                  "WHERE user_id = $1 ORDER BY seq", uid)
        return [_memory(row) for row in rows]

    async def delete_memory(self, user_id: str, memory_id: str) -> bool:
        uid = validate_id(user_id, "user id")
        async with self._connection() as db:
            status = await db.execute("DELETE FROM memories WHERE user_id = $1 AND id = $2", uid, memory_id)
        return status == "DELETE 1"

    async def search_memories(self, user_id: str, query: str, limit: int = 10) -> list[dict]:
        """Ranked as JSONFileStore ranks: the GIN index finds every memory sharing a word (or
        a 4+ letter prefix either way) with the query; MemoryIndex scores those candidates."""
        uid, match = validate_id(user_id, "user id"), _tsquery(query)
        if not match:
            return []
        async with self._connection() as db:
            rows = await db.fetch(
                f"SELECT id, content, {DB_ISO.format('created_at')}, "
                "(SELECT count(*) FROM memories WHERE user_id = $1) "
                "FROM memories WHERE user_id = $1 AND words @@ $2::tsquery ORDER BY seq", uid, match)
        if not rows:
            return []
        return MemoryIndex([_memory(row) for row in rows], total=rows[0][3]).search(query, limit)

    # -- the usage ledger ----------------------------------------------------------------------

    async def append_usage(self, entries: list[dict]) -> None:
        columns = list(zip(*((e["at"], e["user"], e["conversation"], e["protocol"], e["model"], e["provider"],
                             e["input"], e["output"], e["cached"], e["reasoning"], e["estimated"])
                            for e in entries)))
        columns[0] = [_parse_time(at, "usage time") for at in columns[0]]
        async with self._connection() as db:
            await db.execute(INSERT_USAGE, *columns)

    async def read_usage(self, user_id: str | None, start: datetime.datetime,
                         end: datetime.datetime | None) -> list[dict]:
        async with self._connection() as db:
            rows = await db.fetch(
                f"SELECT {DB_ISO.format('at')}, user_id, conversation_id, protocol, model, provider, "
                "input_tokens, output_tokens, cached_tokens, reasoning_tokens, estimated FROM nodechat_usage "
                "WHERE ($1::text IS NULL OR user_id = $1) AND at >= $2 AND ($3::timestamptz IS NULL OR at < $3) "
                "ORDER BY at, seq", user_id, start, end)
        keys = ("at", "user", "conversation", "protocol", "model", "provider", "input", "output", "cached",
                "reasoning", "estimated")
        return [dict(zip(keys, row)) for row in rows]

    # -- attachments: stored once, by their content -------------------------------------------

    async def put_blob(self, user_id: str, digest: str, data: bytes) -> None:
        async with self._connection() as db:
            await db.execute("INSERT INTO nodechat_blobs (user_id, digest, data) VALUES ($1, $2, $3) "
                             "ON CONFLICT DO NOTHING", user_id, digest, data)

    async def get_blob(self, user_id: str, digest: str, named: bool = False) -> bytes | None:
        """As :meth:`JSONFileStore.get_blob`: ``named``, a row from before migration 6 (no user) too."""
        async with self._connection() as db:
            return await db.fetchval("SELECT data FROM nodechat_blobs WHERE digest = $2 AND (user_id = $1 OR "
                                     "($3 AND user_id = '')) ORDER BY user_id DESC LIMIT 1", user_id, digest, named)

    # -- /v1/responses kept for previous_response_id ---------------------------------------------

    async def put_response(self, user_id: str, response_id: str, record: dict) -> None:
        async with self._transaction() as db:
            await db.execute("INSERT INTO nodechat_responses (user_id, id, body) VALUES ($1, $2, $3) "
                             "ON CONFLICT (user_id, id) DO UPDATE SET body = excluded.body",
                             user_id, validate_id(response_id, "response id"), compact_json(record))
            if self.max_responses:
                await db.execute(
                    "DELETE FROM nodechat_responses WHERE user_id = $1 AND seq <= (SELECT seq FROM "
                    "nodechat_responses WHERE user_id = $1 ORDER BY seq DESC OFFSET $2 LIMIT 1)",
                    user_id, self.max_responses)

    async def get_response(self, user_id: str, response_id: str) -> dict | None:
        async with self._connection() as db:
            body = await db.fetchval("SELECT body FROM nodechat_responses WHERE user_id = $1 AND id = $2",
                                     user_id, response_id)
        return None if body is None else json.loads(body)

    async def delete_response(self, user_id: str, response_id: str) -> bool:
        async with self._connection() as db:
            return await db.execute("DELETE FROM nodechat_responses WHERE user_id = $1 AND id = $2",
                                    user_id, response_id) != "DELETE 0"

    # -- connections ---------------------------------------------------------------------------

    async def check(self) -> None:
        """At start-up: connect, and create or migrate the schema (StoreUnavailable if down)."""
        await self._ready()

    async def aclose(self) -> None:
        """Close the pool (in the loop that opened it); a later call opens a new one."""
        pool, self._pool = self._pool, None
        if pool is not None and self._loop is asyncio.get_running_loop():
            await pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self):
        """A pooled connection; a lost or refused database becomes StoreUnavailable (503)."""
        pool = await self._ready()
        try:
            async with pool.acquire(timeout=DB_CONNECT_TIMEOUT_SECONDS) as db:
                if self._down:
                    self._down = False
                    log.warning("the database is reachable again")
                yield db
        except self._asyncpg.DiskFullError as exc:
            raise InsufficientStorage(f"the database is full: {exc}", code="database_full") from exc
        except self._outages as exc:
            raise self._unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def _transaction(self):
        async with self._connection() as db, db.transaction():
            yield db

    async def _ready(self):
        """The pool, opened (and the schema migrated) on first use; after a failed attempt
        the next call tries again, which is how the store recovers from an outage at start."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a pool serves only the loop it was made in
            self._loop, self._lock, self._pool = loop, asyncio.Lock(), None
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                # min_size=0: no idle connection to keep, so no background reconnect
                # task logging a traceback every few seconds of an outage (asyncpg 0.32)
                pool = await self._asyncpg.create_pool(
                    self.url, min_size=0, max_size=self.pool_size,
                    timeout=DB_CONNECT_TIMEOUT_SECONDS, command_timeout=DB_QUERY_TIMEOUT_SECONDS)
                try:
                    async with pool.acquire(timeout=DB_CONNECT_TIMEOUT_SECONDS) as db:
                        await _migrate(db)
                except BaseException as exc:  # the next call starts over with a new pool
                    pool.terminate()
                    if isinstance(exc, self._outages):
                        raise self._unavailable(exc) from exc
                    raise
                self._pool = pool
        return self._pool

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        if not self._down:
            self._down = True
            log.warning("the database is unavailable: %s: %s", type(exc).__name__, exc)
        return StoreUnavailable(f"the database is unavailable: {type(exc).__name__}: {exc}",
                                code="database_unavailable")

    async def _check_quota(self, db: Any, what: str, user_id: str, limit: int) -> None:
        """Forbidden when the user already has ``limit`` of ``what``; the per-user advisory
        lock (held to the end of the transaction) keeps two processes from both taking the last."""
        if not limit:
            return
        lock, table = DB_QUOTAS[what]
        await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", lock, user_id)
        if await db.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user_id) >= limit:
            raise Forbidden(f"{what} quota reached: at most {limit} {table} per user",
                            code=f"{what}_quota")


async def _migrate(db: Any) -> None:
    """Bring the schema up to date.  Instances starting together queue on one advisory lock
    taken first thing in the transaction: even ``CREATE TABLE IF NOT EXISTS`` races without it."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", DB_MIGRATION_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS nodechat_schema_version ("
                         "version integer PRIMARY KEY, migrated_at timestamptz NOT NULL DEFAULT now())")
        current = await db.fetchval("SELECT coalesce(max(version), 0) FROM nodechat_schema_version")
        if current > len(PG_MIGRATIONS):  # a newer nodechat migrated it: additive, so carry on
            log.warning("database schema version %d is newer than this nodechat's %d",
                        current, len(PG_MIGRATIONS))
        for version in range(current + 1, len(PG_MIGRATIONS) + 1):
            await db.execute(PG_MIGRATIONS[version - 1])
            await db.execute("INSERT INTO nodechat_schema_version (version) VALUES ($1)", version)
            log.info("database schema migrated to version %d", version)


def _import_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise ValueError("database_url is set but asyncpg is not installed: "
                         "pip install 'nodechat[postgres]'") from None
    return asyncpg


def _parse_time(value: Any, what: str) -> datetime.datetime:
    try:
        stamp = datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise BadRequest(f"invalid {what}: use a timestamp such as 2026-12-01T05:36:12.123456Z",
                         code=f"invalid_{what}") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)


def _conversation(row: Any) -> dict:
    return {"id": row[0], "user_id": row[1], "title": row[2], "created_at": row[3], "updated_at": row[4]}


def _memory(row: Any) -> dict:
    return {"id": row[0], "content": row[1], "created_at": row[2]}


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL, which a user can type: it is dropped."""
    return value.replace("\x00", "") if value else value


def _words(content: str) -> str:
    """The words MemoryIndex sees, space-separated for ``string_to_array``; a word over
    2046 bytes is left out (PostgreSQL's limit for one lexeme)."""
    words = set(WORD_PATTERN.findall(content.lower()))
    return " ".join(sorted(w for w in words if len(w.encode()) < 2047))


def _tsquery(query: str) -> str:
    """A tsquery matching every memory MemoryIndex could score for ``query``: the word itself,
    and for 4+ letters any longer word (``'term':*``) or any 4+ letter prefix of it."""
    parts: set[str] = set()
    for term in set(WORD_PATTERN.findall(query.lower())):
        if len(term.encode()) >= 2047:
            continue
        parts.add(f"'{term}':*" if len(term) >= 4 else f"'{term}'")  # \w has no quote to escape
        parts.update(f"'{term[:size]}'" for size in range(4, len(term)))
    return " | ".join(sorted(parts))


def make_store(settings: Settings) -> JSONFileStore | PostgresStore:
    """The store the settings ask for: PostgreSQL when ``database_url`` is set."""
    limits = dict(max_conversations_per_user=settings.max_conversations_per_user,
                  max_memories_per_user=settings.max_memories_per_user,
                  max_responses_per_user=settings.max_responses_per_user)
    if settings.database_url:
        return PostgresStore(settings.database_url, **limits)
    return JSONFileStore(settings.data_dir, **limits)


# -- copy-store: a JSON data directory into PostgreSQL, once, when moving past one machine ------


async def copy_json_store(source_dir: str | os.PathLike, store: PostgresStore,
                          progress: Callable[[str], Any] = print) -> dict:
    """Copy a JSON data directory into ``store``, keeping every id and timestamp.

    Idempotent: rows already there are left alone (ON CONFLICT DO NOTHING), so a copy that
    stopped half-way just runs again.  Torn files and lines are skipped with a warning; the
    source is never changed.  Returns what the source holds and how much of it was new.
    """
    root = Path(source_dir)
    counts = dict.fromkeys(("conversations", "messages", "memories", "new_rows", "skipped"), 0)
    metas = sorted((root / "conversations").glob("*.json"))
    for number, path in enumerate(metas, 1):
        meta = _source_json(path)
        if not isinstance(meta, dict) or not _copyable(meta.get("id"), meta.get("user_id")):
            counts["skipped"] += 1
            continue
        messages, torn = _source_lines(path.with_suffix(".jsonl"))
        counts["skipped"] += torn
        if messages and str(messages[-1].get("created_at", "")) > str(meta.get("updated_at", "")):
            meta = {**meta, "updated_at": messages[-1]["created_at"]}  # appends move only the listing's
        counts["new_rows"] += await _copy_conversation(store, meta, messages)
        counts["conversations"] += 1
        counts["messages"] += len(messages)
        if number % 100 == 0:
            progress(f"copy-store: {number}/{len(metas)} conversations")
    for path in sorted((root / "memories").glob("*.json")):
        memories = _source_json(path)
        if not isinstance(memories, list) or not _copyable(path.stem):
            counts["skipped"] += 1
            continue
        kept = [m for m in memories if isinstance(m, dict) and isinstance(m.get("content"), str)]
        counts["skipped"] += len(memories) - len(kept)
        counts["new_rows"] += await _copy_memories(store, path.stem, kept)
        counts["memories"] += len(kept)
    progress("copy-store: {conversations} conversations, {messages} messages, {memories} memories "
             "({new_rows} rows new, {skipped} torn or invalid skipped)".format(**counts))
    return counts


async def _copy_conversation(store: PostgresStore, meta: dict, messages: list[dict]) -> int:
    created = _parse_time_or(meta.get("created_at"), None)
    updated = _parse_time_or(meta.get("updated_at"), created)
    async with store._transaction() as db:
        status = await db.execute(
            f"INSERT INTO conversations ({CONVERSATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (id) DO NOTHING",
            meta["id"], meta["user_id"], _text(str(meta.get("title") or "")), created, updated)
        bodies = [{k: v for k, v in m.items() if k not in ("id", "created_at")} for m in messages]
        added = await db.fetchval(
            f"WITH added AS ({INSERT_MESSAGES}) SELECT count(*) FROM added", meta["id"],
            [str(m.get("id") or f"msg_copy_{n}") for n, m in enumerate(messages)],  # stable on rerun
            [str(b["ui_id"]) if b.get("ui_id") else None for b in bodies],
            [_parse_time_or(m.get("created_at"), updated) for m in messages],
            [json.dumps(b, ensure_ascii=False) for b in bodies])
    return int(status.split()[-1]) + added


async def _copy_memories(store: PostgresStore, user_id: str, memories: list[dict]) -> int:
    async with store._transaction() as db:
        return await db.fetchval(
            f"WITH added AS ({INSERT_MEMORIES}) SELECT count(*) FROM added", user_id,
            [str(m.get("id") or f"mem_copy_{user_id}_{n}") for n, m in enumerate(memories)],
            [_text(m["content"]) for m in memories],
            [_parse_time_or(m.get("created_at"), None) for m in memories],
            [_words(m["content"]) for m in memories])


def _parse_time_or(value: Any, default: datetime.datetime | None) -> datetime.datetime:
    try:
        return _parse_time(value, "timestamp")
    except BadRequest:
        return default or datetime.datetime.now(datetime.timezone.utc)


def _copyable(*ids: Any) -> bool:
    try:
        for value in ids:
            validate_id(value)
    except BadRequest:
        log.warning("copy-store: skipped an entry with an invalid id: %r", ids)
        return False
    return True


def _source_json(path: Path) -> Any:
    """A JSON file of the source, or None (with a warning) when torn; never moved aside."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        log.warning("copy-store: %s skipped: %s", path, exc)
        return None


def _source_lines(path: Path) -> tuple[list[dict], int]:
    """The messages of a ``.jsonl`` file and how many torn lines were skipped."""
    try:
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    except FileNotFoundError:
        return [], 0
    records = []
    for number, line in enumerate(lines, 1):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
                continue
        log.warning("copy-store: %s line %d is torn or invalid; skipped", path, number)
    return records, len(lines) - len(records)


###############################################################################
# Tools: a dict-based registry, schemas from type hints, built-in memory tools
###############################################################################


TOOL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI-style APIs accept
JSON_TYPES = types.MappingProxyType({str: "string", int: "integer", float: "number", bool: "boolean",
              list: "array", tuple: "array", dict: "object", type(None): "null"})


MAX_MEMORY_CHARS = 2000
SEARCH_BACKENDS = types.MappingProxyType({"searxng": "", "brave": "https://api.search.brave.com/res/v1/web/search",
                   "tavily": "https://api.tavily.com/search"})
FETCH_REDIRECTS = 5
IPV6_EMBEDDING_V4 = ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")  # the last 32 bits are IPv4
IPV6_NEVER_PUBLIC = ("64:ff9b:1::/48", "fec0::/10")


@dataclass
class ToolContext:
    """Handed to a tool that declares a parameter of this type: who is asking, and where."""

    user_id: str
    conversation_id: str | None
    store: Store
    http: Callable[[], httpx.AsyncClient]
    call_id: str | None = None


@dataclass
class Tool:
    """A function the model may call: its name, description, JSON-schema parameters and code.

    ``fn`` may be sync (run in a thread) or async.  ``needs_approval`` tools are never offered
    unless their name is listed explicitly; ``dynamic`` marks tools loaded at run time (MCP).
    """

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    needs_approval: bool = False
    dynamic: bool = False
    context_param: str | None = None
    render: Callable[[Any], str] | None = None  # what the model reads of a result, if not JSON

    def schema(self) -> dict:
        """The OpenAI ``tools`` entry for this tool."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}

    async def __call__(self, args: dict, context: ToolContext | None = None) -> Any:
        kwargs = dict(args)
        if self.context_param:
            kwargs[self.context_param] = context
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**kwargs)
        result = await asyncio.to_thread(self.fn, **kwargs)
        return await result if inspect.isawaitable(result) else result


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         needs_approval: bool = False) -> Any:
    """Make a :class:`Tool` from a function, its type hints and its docstring.

    Example::

        @tool
        def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
            \"\"\"Current weather for a city.\"\"\"
    """
    def make(fn: Callable) -> Tool:
        parameters, context_param = schema_from_function(fn)
        doc = inspect.getdoc(fn) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ").strip()
        tool_name = name or fn.__name__
        if not TOOL_NAME_PATTERN.fullmatch(tool_name):
            raise ValueError(f"tool name {tool_name!r}: use 1-64 of [A-Za-z0-9_-]")
        return Tool(tool_name, description or summary or tool_name, parameters, fn,
                    needs_approval=needs_approval, context_param=context_param)

    return make(fn) if fn is not None else make


def schema_from_function(fn: Callable) -> tuple[dict, str | None]:
    """A JSON schema for ``fn``'s parameters, and the name of its ToolContext parameter if any."""
    hints = _type_hints(fn)
    docs = _param_docs(inspect.getdoc(fn) or "")
    properties, required, context_param = {}, [], None
    for param in inspect.signature(fn).parameters.values():
        hint = hints.get(param.name, Any)
        if hint is ToolContext:
            context_param = param.name
            continue
        prop = _json_schema(hint)
        if param.name in docs:
            prop["description"] = docs[param.name]
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
        elif isinstance(param.default, (str, int, float, bool, type(None), list, dict)):
            prop["default"] = param.default
        properties[param.name] = prop
    schema = {"type": "object", "properties": properties, "required": required}
    return schema, context_param


def _type_hints(fn: Callable) -> dict[str, Any]:
    """Resolved hints; names the module cannot see (a local ``Literal`` import under
    ``from __future__ import annotations``) are tried against ``typing``, else left untyped."""
    try:
        return typing.get_type_hints(fn)
    except NameError:
        namespace = {**vars(typing), **getattr(fn, "__globals__", {}), "ToolContext": ToolContext}
        hints = {}
        for name, hint in inspect.get_annotations(fn).items():
            try:
                hints[name] = eval(hint, namespace) if isinstance(hint, str) else hint
            except Exception:
                hints[name] = Any
        return hints


def _json_schema(hint: Any) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        kinds = {JSON_TYPES.get(type(a), "string") for a in args}
        return {"type": kinds.pop(), "enum": list(args)} if len(kinds) == 1 else {"enum": list(args)}
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _json_schema(options[0])
        return {"anyOf": [_json_schema(a) for a in options]}
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        return {"type": "array", "items": _json_schema(args[0])} if args else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint in JSON_TYPES:
        return {"type": JSON_TYPES[hint]}
    return {}


def _param_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` section."""
    found = {}
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.+\n?)+)", doc, re.M)
    for line in (section.group(1).splitlines() if section else ()):
        match = re.match(r"\s+(\w+)(?:\s*\(.*?\))?:\s*(.+)", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


class ToolRegistry:
    """Tools by name: ``add``, ``remove``, ``[name]``, ``in``, iteration and ``schemas()``."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    def add(self, fn: Callable | Tool, *, name: str | None = None, description: str | None = None,
            needs_approval: bool = False) -> Tool:
        """Register a function (or a ready Tool) and return the Tool; the same name replaces."""
        item = fn if isinstance(fn, Tool) else tool(
            fn, name=name, description=description, needs_approval=needs_approval)
        self._tools[item.name] = item
        return item

    def remove(self, name: str) -> None:
        self._tools.pop(name, None)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def select(self, names: Iterable[str] | None = None) -> list[Tool]:
        """The tools offered for ``names`` (None: all that need no approval)."""
        if names is None:
            return [t for t in self._tools.values() if not t.needs_approval]
        return [self._tools[n] for n in names if n in self._tools]

    def schemas(self, names: Iterable[str] | None = None) -> list[dict]:
        return [t.schema() for t in self.select(names)]

    def offered(self, allowed: Iterable[str] | None, names: Any) -> list[Tool]:
        """The tools a request may use: the operator's ``allowed`` (the ``tools`` setting,
        else every tool that needs no approval), narrowed by the request's own list of names."""
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise BadRequest("tools must be a list of tool names", code="invalid_tools")
        tools = self.select(allowed)
        return tools if names is None else [t for t in tools if t.name in names]


def memory_tools() -> list[Tool]:
    """The built-in memory tools, named as the seed's application names them."""

    async def addMemory(content: str, context: ToolContext) -> dict:
        """Save a fact about the user to remember in later conversations.

        Args:
            content: The fact, as one short sentence.
        """
        if len(content) > MAX_MEMORY_CHARS:  # every later conversation's context carries it
            raise ValueError(f"a memory is one short fact: at most {MAX_MEMORY_CHARS} characters")
        return {"success": True, "memory": await context.store.add_memory(context.user_id, content)}

    async def searchMemory(query: str, context: ToolContext, limit: int = 10) -> dict:
        """Search what you remember about the user, best matches first.

        Args:
            query: Keywords to look for.
            limit: Most results to return.
        """
        found = await context.store.search_memories(context.user_id, query, max(1, min(limit, 50)))
        return {"success": True, "results": found}

    async def getAllMemories(context: ToolContext) -> dict:
        """List everything you remember about the user."""
        return {"success": True, "memories": await context.store.list_memories(context.user_id)}

    async def deleteMemory(id: str, context: ToolContext) -> dict:
        """Forget one memory by its id.

        Args:
            id: The memory's id, as listed by getAllMemories or searchMemory.
        """
        return {"success": await context.store.delete_memory(context.user_id, id)}

    return [tool(fn) for fn in (addMemory, searchMemory, getAllMemories, deleteMemory)]


def web_search_tool(settings: Settings) -> Tool | None:
    """``webSearch`` over the configured backend; None (no tool) when none is configured."""
    backend = settings.search_provider.lower()
    if not backend:
        return None
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"search_provider: {backend!r} is not one of {', '.join(SEARCH_BACKENDS)}")
    url = settings.search_url or SEARCH_BACKENDS[backend]
    if not url:
        raise ValueError("search_provider 'searxng' needs search_url (SEARXNG_URL)")

    async def webSearch(query: str, context: ToolContext, limit: int = 5) -> dict:
        """Search the web; returns titles, URLs and snippets.

        Args:
            query: What to search for.
            limit: Most results to return.
        """
        limit = max(1, min(limit, 20))
        http = context.http()
        if backend == "searxng":
            response = await http.get(url.rstrip("/") + "/search", params={"q": query, "format": "json"})
            items = [(r.get("title"), r.get("url"), r.get("content")) for r in _search_json(response).get("results", [])]
        elif backend == "brave":
            response = await http.get(url, params={"q": query, "count": limit},
                                      headers={"X-Subscription-Token": settings.search_api_key})
            items = [(r.get("title"), r.get("url"), r.get("description"))
                     for r in _search_json(response).get("web", {}).get("results", [])]
        else:
            response = await http.post(url, json={"query": query, "max_results": limit},
                                       headers={"Authorization": f"Bearer {settings.search_api_key}"})
            items = [(r.get("title"), r.get("url"), r.get("content")) for r in _search_json(response).get("results", [])]
        return {"results": [{"title": t or "", "url": u or "", "snippet": s or ""} for t, u, s in items[:limit]]}

    return tool(webSearch)


def _search_json(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise UpstreamError(f"search backend returned HTTP {response.status_code}")
    return response.json()


def fetch_url_tool(settings: Settings) -> Tool:
    """``fetchUrl``: a page as readable text (the seed's Scrape-Tool role), kept off private networks."""

    try:
        allowed = tuple(ipaddress.ip_network(n, strict=False) for n in settings.fetch_allowed_networks)
    except ValueError as exc:
        raise ValueError(f"fetch_allowed_networks: {exc}") from None

    async def fetchUrl(url: str, context: ToolContext) -> dict:
        """Fetch a web page (http or https) and return its readable text.

        Args:
            url: The address of the page.
        """
        try:
            async with asyncio.timeout(settings.fetch_timeout):
                return await fetch_page(url, context.http(), settings, allowed)
        except TimeoutError:
            raise TimeoutError(f"the page took longer than {settings.fetch_timeout:g} s") from None

    return tool(fetchUrl)


async def fetch_page(url: str, http: httpx.AsyncClient, settings: Settings,
                     allowed: tuple = ()) -> dict:
    """GET a page, following redirects; each hop's host is resolved once, checked, and
    connected to at that very address (Host header and TLS name kept), so a DNS answer
    that changes between the check and the connection (rebinding) cannot reach a private
    address.  At most ``fetch_max_bytes`` are read; HTML is parsed in a thread."""
    for _ in range(FETCH_REDIRECTS + 1):
        target, extra = await pinned_target(url, settings.allow_private_fetch, allowed)
        async with http.stream("GET", target, follow_redirects=False, timeout=20.0, extensions=extra,
                               headers={"User-Agent": f"nodechat/{__version__}",
                                        **({"Host": _host_header(url)} if target != url else {})}) as response:
            if response.is_redirect and "location" in response.headers:
                url = str(_httpx().URL(url).join(response.headers["location"]))
                continue  # each target is resolved and checked again before it is fetched
            body = bytearray()
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            binary = not kind.startswith("text/") and kind not in READABLE_TYPES and not kind.endswith(("+json", "+xml"))
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) >= (FILE_SNIFF_BYTES if binary else settings.fetch_max_bytes):
                    break
            if binary:  # an image or another file: what it is, not its bytes
                return {"url": url, "status": response.status_code, "title": "",
                        "text": describe_file(kind, bytes(body), response.headers.get("content-length")),
                        "truncated": False}
            text = bytes(body[:settings.fetch_max_bytes]).decode(response.encoding or "utf-8", errors="replace")
            if "html" in kind or text.lstrip()[:1] == "<":
                title, text = await asyncio.to_thread(html_to_text, text)
            else:
                title = ""
            return {"url": url, "status": response.status_code, "title": title,
                    "text": text[:settings.fetch_max_chars],
                    "truncated": len(text) > settings.fetch_max_chars or len(body) >= settings.fetch_max_bytes}
    raise ValueError(f"more than {FETCH_REDIRECTS} redirects")


READABLE_TYPES = frozenset({"", "application/json", "application/xml", "application/xhtml+xml",
                            "application/javascript", "application/x-javascript"})
FILE_SNIFF_BYTES = 65536  # of an image or other file, enough for its size in pixels


def describe_file(kind: str, head: bytes, length: str | None) -> str:
    """A fetched image or file in a sentence (the model reads no bytes): its type, size and,
    for an image, its width and height."""
    size = image_size(head)
    what = "An image" if kind.startswith("image/") else "A file"
    parts = [kind] + ([f"{size[0]}x{size[1]} pixels"] if size else []) + (
        [f"{int(length):,} bytes"] if length and length.isdigit() else [])
    return f"{what} ({', '.join(parts)}); its content is not text, so it is not shown here."


def image_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from the first bytes of a PNG, GIF, JPEG or WebP; None for others."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:4] == b"GIF8" and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if head[:2] == b"\xff\xd8":
        at = 2
        while at + 9 < len(head) and head[at] == 0xFF:
            marker, length = head[at + 1], int.from_bytes(head[at + 2:at + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                return int.from_bytes(head[at + 7:at + 9], "big"), int.from_bytes(head[at + 5:at + 7], "big")
            at += 2 + length
    return None


async def pinned_target(url: str, allow_private: bool = False, allowed: tuple = ()) -> tuple[str, dict]:
    """The URL to connect to (its host replaced by the one checked address) and the httpx
    extensions that keep the TLS name; ValueError for other schemes and private addresses."""

    address = await check_public_url(url, allow_private, allowed)
    if address is None:
        return url, {}
    parts = urlsplit(url)
    target = str(_httpx().URL(url).copy_with(host=str(address)))
    return target, ({"sni_hostname": parts.hostname} if parts.scheme == "https" else {})


def _host_header(url: str) -> str:

    return urlsplit(url).netloc.rpartition("@")[2]


async def check_public_url(url: str, allow_private: bool = False, allowed: tuple = ()) -> Any:
    """The address ``url``'s host resolves to (None when ``allow_private``), refused
    (ValueError) unless it and every other answer is public or in ``allowed`` networks.
    The error never names the address: a tool result must not map the server's network."""

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"only http and https URLs can be fetched, not {url[:100]!r}")
    if allow_private:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.to_thread(socket.getaddrinfo, parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError:
        raise ValueError(f"cannot resolve {parts.hostname}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(public_address(a, allowed) for a in addresses):
        raise ValueError(f"refusing to fetch {parts.hostname}: not a public address")
    return addresses[0]


def public_address(address: Any, allowed: tuple = ()) -> bool:
    """Global unicast only, including the IPv4 address that an IPv6 form embeds
    (``::ffff:a.b.c.d``, 6to4, NAT64 ``64:ff9b::/96``, ``::a.b.c.d``, ``::ffff:0:a.b.c.d``);
    local NAT64 ``64:ff9b:1::/48`` and site-local ``fec0::/10`` are never public."""

    if any(address in network for network in allowed):
        return True
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in ipaddress.ip_network(n) for n in IPV6_EMBEDDING_V4):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return public_address(embedded, allowed)
        if address.teredo or any(address in ipaddress.ip_network(n) for n in IPV6_NEVER_PUBLIC):
            return False
    return address.is_global and not address.is_multicast


def html_to_text(html: str) -> tuple[str, str]:
    """The title and readable text of a page: scripts, styles and markup dropped."""
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        skip_tags = {"script", "style", "noscript", "template", "svg", "head"}
        block_tags = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
                      "article", "header", "footer", "pre", "blockquote", "table", "ul", "ol"}

        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts, self.title, self.skipping, self.in_title = [], [], 0, False

        def handle_starttag(self, tag, attrs):
            self.skipping += tag in self.skip_tags
            self.in_title = self.in_title or tag == "title"
            if tag in self.block_tags:
                self.parts.append("\n")

        def handle_endtag(self, tag):
            self.skipping -= tag in self.skip_tags and self.skipping > 0
            self.in_title = self.in_title and tag != "title"
            if tag in self.block_tags:
                self.parts.append("\n")

        def handle_data(self, data):
            if self.in_title:
                self.title.append(data)
            elif not self.skipping:
                self.parts.append(data)

    reader = Reader()
    reader.feed(html)
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(reader.parts).split("\n"))
    return "".join(reader.title).strip(), "\n".join(line for line in lines if line)


###############################################################################
# MCP: tools from Model Context Protocol servers (stdio and Streamable HTTP)
###############################################################################


MCP_PROTOCOL_VERSION = "2025-11-25"
MCP_ACCEPTED_VERSIONS = frozenset({"2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"})
MCP_LINE_LIMIT_BYTES = 64 * 1024 * 1024  # screenshots arrive as base64 far over asyncio's 64 KiB
MCP_START_SECONDS = 60.0   # first runs of uvx/npx servers download packages
MCP_CALL_SECONDS = 120.0
MCP_MAX_TOOLS = 1000  # per server
STDIO_ENV_KEYS = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "TMPDIR",
                  "APPDATA", "LOCALAPPDATA", "PATHEXT", "SYSTEMROOT", "TEMP", "USERPROFILE")


class MCPError(UpstreamError):
    """An MCP server failed: it did not start, answered with a JSON-RPC error, or timed out."""


class MCPToolError(Exception):
    """An MCP tool ran and reported ``isError``: its text goes back to the model."""


class MCPSession:
    """JSON-RPC 2.0 with one MCP server over a transport (stdio or Streamable HTTP).

    Handles the ``initialize`` handshake, ``tools/list`` pages, ``tools/call``, a server's
    ``ping`` (answered) and other requests (-32601), ``notifications/tools/list_changed``, and
    timeouts (``notifications/cancelled``).  A stdio server that dies is started again on the
    next call.
    """

    def __init__(self, name: str, config: Mapping[str, Any], http: Callable[[], httpx.AsyncClient],
                 on_tools_changed: Callable[[MCPSession], Awaitable[None]] | None = None):
        self.name = name
        self.config = dict(config)
        self.http = http
        self.on_tools_changed = on_tools_changed
        self.protocol_version = MCP_PROTOCOL_VERSION
        self.transport: StdioTransport | HTTPTransport | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._refresh: asyncio.Task | None = None
        self._refresh_again = False

    async def start(self, timeout: float = MCP_START_SECONDS) -> None:
        """Open the transport and shake hands; raises MCPError (the transport is closed then)."""
        self.transport = (HTTPTransport(self) if "url" in self.config else StdioTransport(self))
        try:
            await self.transport.open()
            result = await self.request("initialize", {
                "protocolVersion": MCP_PROTOCOL_VERSION, "capabilities": {},
                "clientInfo": {"name": "nodechat", "version": __version__}}, timeout)
            version = result.get("protocolVersion")
            if version not in MCP_ACCEPTED_VERSIONS:
                raise MCPError(f"MCP server {self.name!r} speaks protocol {version!r}")
            self.protocol_version = version
            await self.notify("notifications/initialized")
        except BaseException:
            await self.close()
            raise

    async def ensure_started(self) -> None:
        async with self._lock:
            if self.transport is None or not self.transport.alive:
                if self.transport is not None:
                    log.warning("MCP server %r is gone; starting it again", self.name)
                    await self.close()
                await self.start()

    async def list_tools(self) -> list[dict]:
        tools, cursor = [], None
        while True:
            page = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            tools += [t for t in page.get("tools") or () if isinstance(t, dict) and t.get("name")]
            cursor = page.get("nextCursor")
            if not cursor or len(tools) > MCP_MAX_TOOLS:  # a server paging forever ends here
                return tools

    async def call_tool(self, name: str, arguments: dict) -> dict:
        await self.ensure_started()
        return await self.request("tools/call", {"name": name, "arguments": arguments},
                                  float(self.config.get("timeout", MCP_CALL_SECONDS)))

    async def request(self, method: str, params: dict | None = None,
                      timeout: float = MCP_CALL_SECONDS) -> dict:
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        try:
            await asyncio.wait_for(self._exchange(message, future), timeout)
        except asyncio.TimeoutError:
            if method != "initialize":  # initialize must not be cancelled (spec)
                with contextlib.suppress(Exception):
                    await self.notify("notifications/cancelled",
                                      {"requestId": request_id, "reason": "timed out"})
            raise MCPError(f"MCP server {self.name!r}: {method} timed out after {timeout:g} s") from None
        finally:
            self._pending.pop(request_id, None)
        reply = future.result()
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {"message": reply["error"]}
            raise MCPError(f"MCP server {self.name!r}: {error.get('message')} (code {error.get('code')})")
        return reply.get("result") or {}

    async def _exchange(self, message: dict, future: asyncio.Future) -> None:
        await self.transport.send(message)
        await future

    async def notify(self, method: str, params: dict | None = None) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self.transport.send(message)

    def receive(self, message: Any) -> None:
        """Called by the transport for every message from the server."""
        if not isinstance(message, dict):
            return
        if "method" not in message:
            future = self._pending.get(message.get("id"))
            if future is not None and not future.done():
                future.set_result(message)
            return
        if "id" in message:  # a request from the server: answer it
            reply = {"jsonrpc": "2.0", "id": message["id"]}
            if message["method"] == "ping":
                reply["result"] = {}
            else:
                reply["error"] = {"code": -32601, "message": "Method not found"}
            spawn(self._background, self.transport.send(reply))
        elif message["method"] == "notifications/tools/list_changed" and self.on_tools_changed:
            if self._refresh is None or self._refresh.done():  # a burst costs one or two refreshes
                self._refresh = asyncio.ensure_future(self._refresh_tools())
            else:
                self._refresh_again = True

    async def _refresh_tools(self) -> None:
        while True:
            self._refresh_again = False
            try:
                await self.on_tools_changed(self)
            except (NodeChatError, OSError, ValueError) as exc:
                log.warning("MCP server %r: refreshing its tools failed: %s", self.name, exc)
            if not self._refresh_again:
                return

    def fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(MCPError(f"MCP server {self.name!r} {reason}"))

    async def close(self) -> None:
        for task in [*self._background, *([self._refresh] if self._refresh else [])]:
            task.cancel()
        if self.transport is not None:
            transport, self.transport = self.transport, None
            await transport.close()
        self.fail_pending("was closed")


class StdioTransport:
    """A server process speaking newline-delimited JSON on stdin/stdout; stderr goes to our log."""

    def __init__(self, session: MCPSession):
        self.session = session
        self.process: asyncio.subprocess.Process | None = None
        self.tasks: list[asyncio.Task] = []

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def open(self) -> None:
        config = self.session.config
        env = {k: os.environ[k] for k in STDIO_ENV_KEYS if k in os.environ}
        env.update({str(k): str(v) for k, v in (config.get("env") or {}).items()})
        try:
            self.process = await asyncio.create_subprocess_exec(
                config["command"], *[str(a) for a in config.get("args", [])], env=env,
                cwd=config.get("cwd"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=MCP_LINE_LIMIT_BYTES,
                start_new_session=os.name == "posix")
        except (OSError, KeyError) as exc:
            raise MCPError(f"MCP server {self.session.name!r} could not start: {exc}") from exc
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._stderr())]

    async def send(self, message: dict) -> None:
        if not self.alive:
            raise MCPError(f"MCP server {self.session.name!r} is not running")
        self.process.stdin.write(compact_json(message).encode() + b"\n")
        try:
            await self.process.stdin.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            raise MCPError(f"MCP server {self.session.name!r} closed its input") from exc

    async def _read(self) -> None:
        try:
            while line := await self._readline():
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError):  # servers print banners on stdout: skip
                    log.info("MCP %s stdout: %s", self.session.name, line[:200].decode(errors="replace").rstrip())
                    continue
                self.session.receive(message)
        finally:
            code = await self.process.wait()
            log.warning("MCP server %r exited with code %s", self.session.name, code)
            self.session.fail_pending(f"exited with code {code}")

    async def _readline(self) -> bytes:
        """The next line; a line past the limit stops the server (it is started again on
        the next call) rather than leaving a live process nobody reads."""
        try:
            return await self.process.stdout.readline()
        except ValueError:
            log.error("MCP server %r sent a line over %d bytes; stopping it", self.session.name,
                      MCP_LINE_LIMIT_BYTES)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.name == "posix":
                    os.killpg(self.process.pid, 9)
                else:  # pragma: no cover
                    self.process.kill()
            return b""

    async def _stderr(self) -> None:
        while line := await self.process.stderr.readline():
            log.info("MCP %s: %s", self.session.name, line.decode(errors="replace").rstrip())

    async def close(self) -> None:
        """Close stdin, then SIGTERM, then SIGKILL the whole process group."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(Exception):
                process.stdin.close()
            for signal_number in (None, 15, 9):
                if signal_number is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        if os.name == "posix":
                            os.killpg(process.pid, signal_number)
                        else:  # pragma: no cover
                            process.kill()
                try:
                    await asyncio.wait_for(process.wait(), 2.0)
                    break
                except asyncio.TimeoutError:
                    continue
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class HTTPTransport:
    """Streamable HTTP: each message is a POST; the answer is JSON or an SSE stream."""

    def __init__(self, session: MCPSession):
        self.session = session
        self.url = session.config["url"]
        self.session_id: str | None = None
        self.alive = True
        self.listener: asyncio.Task | None = None

    async def open(self) -> None:
        pass

    def _headers(self, accept: str, initializing: bool = False) -> dict[str, str]:
        headers = {"Accept": accept,
                   **{str(k): str(v) for k, v in (self.session.config.get("headers") or {}).items()}}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        if not initializing:
            headers["MCP-Protocol-Version"] = self.session.protocol_version
        return headers

    async def send(self, message: dict) -> None:
        initializing = message.get("method") == "initialize"
        headers = {**self._headers("application/json, text/event-stream", initializing),
                   "Content-Type": "application/json"}
        if message.get("method") == "notifications/initialized" and self.listener is None:
            self.listener = asyncio.create_task(self._listen())
        http = self.session.http()
        try:
            async with http.stream("POST", self.url, content=compact_json(message).encode(),
                                   headers=headers, follow_redirects=True) as response:
                if message.get("method") == "initialize":
                    self.session_id = response.headers.get("mcp-session-id")
                if response.status_code >= 400:
                    if response.status_code == 404 and self.session_id:
                        self.alive = False  # the session expired: start again next time
                    body = (await response.aread())[:300].decode(errors="replace")
                    raise MCPError(f"MCP server {self.session.name!r} returned HTTP "
                                   f"{response.status_code}: {body}")
                if response.headers.get("content-type", "").startswith("text/event-stream"):
                    async for batch in sse_batches(response.aiter_bytes()):
                        for data in batch:
                            if data.strip():  # 2025-11-25 servers prime with an empty event
                                self.session.receive(json.loads(data))
                elif response.status_code != 202:
                    body = await response.aread()
                    if body.strip():
                        self.session.receive(json.loads(body))
        except _httpx().HTTPError as exc:
            raise MCPError(f"MCP server {self.session.name!r}: {type(exc).__name__}: {exc}") from exc

    async def _listen(self) -> None:
        """The optional GET stream on which a server sends what no POST asked for
        (``tools/list_changed``, pings); a 405 means the server has none."""
        try:
            async with self.session.http().stream(
                    "GET", self.url, headers=self._headers("text/event-stream"),
                    timeout=_httpx().Timeout(10.0, read=None)) as response:
                if response.status_code != 200:
                    return
                async for batch in sse_batches(response.aiter_bytes()):
                    for data in batch:
                        if data.strip():
                            self.session.receive(json.loads(data))
        except (_httpx().HTTPError, ValueError) as exc:
            log.info("MCP %s: the server's event stream ended: %s", self.session.name, exc)

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            await asyncio.gather(self.listener, return_exceptions=True)
        if self.session_id:
            with contextlib.suppress(_httpx().HTTPError):
                await self.session.http().delete(self.url, headers={"Mcp-Session-Id": self.session_id},
                                                 timeout=5.0)
        self.alive = False


class MCPTools:
    """Every configured MCP server, its tools kept registered in a ToolRegistry.

    Tool names come from each server's ``tools/list`` (never a fixed list), made safe for
    OpenAI-style APIs; a name two servers share is registered as ``server_name``.
    """

    def __init__(self, servers: Mapping[str, Mapping], registry: ToolRegistry,
                 http: Callable[[], httpx.AsyncClient]):
        self.registry = registry
        self.sessions = {name: MCPSession(name, config, http, self.refresh)
                         for name, config in servers.items() if not config.get("disabled")}
        self.registered: dict[str, list[str]] = {}

    async def start(self) -> None:
        """Start every server at once; one that fails is logged and skipped."""
        async def start_one(session: MCPSession) -> None:
            try:
                await session.start(float(session.config.get("startTimeout", MCP_START_SECONDS)))
                await self.refresh(session)
            except (NodeChatError, OSError, ValueError) as exc:
                log.error("MCP server %r skipped: %s", session.name, getattr(exc, "message", exc))
                await session.close()

        await asyncio.gather(*(start_one(s) for s in self.sessions.values()))

    async def refresh(self, session: MCPSession) -> None:
        """(Re)register a server's tools, as on ``notifications/tools/list_changed``: the new
        set replaces the old in one step, with no await between removing and adding."""
        specs = await session.list_tools()
        if len(specs) > MCP_MAX_TOOLS:
            log.warning("MCP server %r lists %d tools; using the first %d", session.name, len(specs),
                        MCP_MAX_TOOLS)
        for name in self.registered.pop(session.name, []):
            self.registry.remove(name)
        exclude = set(session.config.get("exclude", ()))
        approval = set(session.config.get("needsApproval", ()))
        names = []
        for spec in specs[:MCP_MAX_TOOLS]:
            if spec["name"] in exclude or not isinstance(spec["name"], str):
                continue
            name = re.sub(r"[^A-Za-z0-9_-]", "_", spec["name"])[:64]
            if name in self.registry:
                name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{session.name}_{spec['name']}")[:64]
            self.registry.add(mcp_tool(session, spec, name, spec["name"] in approval))
            names.append(name)
        self.registered[session.name] = names
        log.info("MCP server %r: %d tools (%s)", session.name, len(names), ", ".join(names))

    async def aclose(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions.values()))


def mcp_tool(session: MCPSession, spec: dict, name: str, needs_approval: bool) -> Tool:
    """A registry entry calling ``spec["name"]`` on ``session``; an ``isError`` result raises."""
    remote_name = spec["name"]

    async def call(**arguments: Any) -> dict:
        result = await session.call_tool(remote_name, arguments)
        if result.get("isError"):
            raise MCPToolError(mcp_text(result))
        return result

    schema = {k: v for k, v in (spec.get("inputSchema") or {}).items() if k != "$schema"}
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return Tool(name, spec.get("description") or spec.get("title") or remote_name, schema, call,
                needs_approval=needs_approval, dynamic=True, render=mcp_text)


def mcp_text(result: dict) -> str:
    """What the model reads of a CallToolResult: the text, with media and links named."""
    parts = []
    for block in result.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.get('mimeType', '')}, {len(block.get('data', '')) * 3 // 4} bytes]")
        elif kind == "resource":
            resource = block.get("resource") or {}
            parts.append(resource.get("text") or f"[resource {resource.get('uri', '')}]")
        elif kind == "resource_link":
            parts.append(f"[{block.get('name', 'link')}: {block.get('uri', '')}]")
    if not parts and "structuredContent" in result:
        parts.append(compact_json(result["structuredContent"]))
    return "\n".join(parts)


def read_mcp_config(path: str | os.PathLike) -> dict[str, dict]:
    """The ``mcpServers`` object of a JSON file in the format other MCP clients use."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"MCP config {path}: {exc}") from exc
    servers = data.get("mcpServers", data) if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"MCP config {path}: expected an object with 'mcpServers'")
    return servers


###############################################################################
# Upstream HTTP client: nodechat's own HTTP/1.1 client for the token stream
###############################################################################


#: Decoded body bytes held for a slow reader before the socket stops being read.
PAUSE_BYTES = 1024 * 1024


class UpstreamClient:
    """An HTTP/1.1 client that POSTs JSON and streams server-sent events back, on asyncio.

    It exists for speed alone (the figures are in the README, "Performance"): it decodes
    each network read once, chunked framing and SSE together, and hands on every event the
    read completed, so "merge the deltas of one read" merges; httpcore gives one HTTP chunk
    at a time, through more layers.  httpx still does everything else.

    One per app instance, bound to the running event loop on first use (a new loop starts
    an empty pool).  Connections are kept alive per (scheme, host, port), ``max_connections``
    in all, for ``keepalive_expiry`` seconds; a request waits ``pool_timeout`` seconds for a
    free one.  A request on a reused connection that the server had closed is sent once more
    on a new one.  ``read_timeout`` is the longest silence while a response is expected.
    ``ssl_context`` makes the context for ``https`` (once, on first use).  Failures raise
    ``error(message)``, timeouts ``timeout(message)``; messages start with the origin.

    Example::

        async with client.stream(url, body, {"content-type": "application/json"}) as response:
            if response.status >= 400:
                raise RuntimeError(await response.read(4096))
            async for events in response.events():
                for data in events:
                    ...
    """

    def __init__(self, *, connect_timeout: float | None = 10.0, read_timeout: float | None = 120.0,
                 pool_timeout: float | None = 10.0, max_connections: int = 100,
                 keepalive_expiry: float = 5.0, max_line_bytes: int = MAX_LINE_BYTES,
                 max_header_bytes: int = MAX_HEADER_BYTES,
                 ssl_context: Callable[[], ssl.SSLContext] | None = None,
                 error: Callable[[str], BaseException] = ConnectionError,
                 timeout: Callable[[str], BaseException] = TimeoutError):
        self.connect_timeout, self.pool_timeout = connect_timeout, pool_timeout
        self.read_timeout = math.inf if read_timeout is None else read_timeout
        self.max_connections, self.keepalive_expiry = max_connections, keepalive_expiry
        self.max_line_bytes, self.max_header_bytes = max_line_bytes, max_header_bytes
        self.error, self.timeout = error, timeout
        self._ssl_factory = ssl_context or ssl.create_default_context
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[tuple, list[_Connection]] = {}  # per origin, most recently used last
        self._open = 0  # connections open or opening: slots taken of max_connections
        self._waiters: collections.deque = collections.deque()  # (key, future) awaiting a slot

    def stream(self, url: str, body: bytes, headers: Mapping[str, str] | None = None,
               total_timeout: float | None = None) -> UpstreamResponse:
        """POST ``body`` to ``url``; use as ``async with client.stream(...) as response``.

        ``headers`` (content type, authorization, accept) go out as given, after ``Host``,
        ``Content-Length`` and ``Accept-Encoding: identity``, which must not be repeated.
        ``total_timeout`` bounds the whole answer, however steadily bytes arrive (the same
        watchdog checks it).
        """
        return UpstreamResponse(self, url, body, headers or {}, total_timeout)

    async def aclose(self) -> None:
        """Close the idle connections; streams still open close when their reader leaves."""
        for idle in list(self._idle.values()):
            while idle:
                idle.pop().close()

    # -- requests ------------------------------------------------------------------------------

    async def _exchange(self, url: str, body: bytes, headers: Mapping[str, str],
                        total_timeout: float | None = None) -> _Connection:
        """Send the request and wait for the response head, retrying once on a stale connection."""
        try:
            key, origin, request = post_request(url, body, headers)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        self._bind()
        deadline = math.inf if total_timeout is None else self._loop.time() + total_timeout
        retried = False
        while True:
            conn = await self._acquire(key, origin, fresh=retried)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, origin)
            conn.send_request(request, reused, deadline, total_timeout)
            try:
                await conn.response_head()
                return conn
            except BaseException as exc:
                conn.close()
                # the server closed an idle keep-alive connection as we sent: not a failure
                if retried or exc is not conn.exc or not conn.stale:
                    raise
                retried = True

    # -- the pool ------------------------------------------------------------------------------

    def _bind(self) -> None:
        """Start an empty pool when the running loop is not the one the pool belongs to."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(RuntimeError):  # that loop may be closed already
                    conn.transport.abort()
        self._loop, self._idle, self._open, self._waiters = loop, {}, 0, collections.deque()

    async def _acquire(self, key: tuple, origin: str, fresh: bool) -> _Connection | None:
        """An idle connection to ``key``, or None once a slot for a new one is reserved."""
        deadline = None if self.pool_timeout is None else self._loop.time() + self.pool_timeout
        while True:
            idle = self._idle.get(key)
            while idle and not fresh:
                conn = idle.pop()
                # past its expiry a server may close it any moment (its timer may run late)
                expired = self._loop.time() - conn.idle_since >= self.keepalive_expiry
                conn.ready()
                if conn.usable() and not expired:
                    return conn
                conn.close()
            if self._open < self.max_connections:
                self._open += 1
                return None
            for other in self._idle.values():  # full: close the oldest idle connection elsewhere
                if other:
                    conn = other.pop(0)
                    conn.holds_slot = False  # its slot is ours now
                    conn.close()
                    return None
            conn = await self._wait_for_slot(key, origin, deadline)
            if conn is None or conn.usable():
                return conn
            conn.close()  # lost as it was handed over: its slot went on to the next waiter

    async def _wait_for_slot(self, key: tuple, origin: str, deadline: float | None) -> _Connection | None:
        waiter = self._loop.create_future()
        self._waiters.append((key, waiter))
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # handed one as we gave up: pass it on
                self._hand_back(waiter.result())
            waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise self.timeout(f"{origin}: no free connection within {self.pool_timeout:g} s "
                                   f"({self.max_connections} in use)") from None
            raise

    async def _connect(self, key: tuple, origin: str) -> _Connection:
        scheme, host, port = key
        context = None
        if scheme == "https":
            context = self._ssl = self._ssl or self._ssl_factory()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self._loop.create_connection(
                    lambda: _Connection(self, key, origin), host, port,
                    ssl=context, server_hostname=host if context else None)
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):
                raise self.timeout(f"{origin}: no connection within {self.connect_timeout:g} s") from exc
            if isinstance(exc, ssl.SSLError):
                raise self.error(f"{origin}: TLS failed: {exc}") from exc
            if isinstance(exc, OSError):
                reason = os.strerror(exc.errno) if (exc.errno or 0) > 0 else str(exc)
                raise self.error(f"{origin}: cannot connect: {reason}") from exc
            raise
        conn.holds_slot = True  # not before: a connection lost while connecting never held one
        if conn.state is CLOSED:
            self._discard(conn, was_idle=False)
            raise self.error(f"{origin}: connection closed as it opened")
        return conn

    def _release(self, conn: _Connection) -> None:
        """Hand a fully read connection to a waiter, or keep it idle."""
        if conn.state is CLOSED:  # its slot went back when it closed
            return
        conn.ready()
        if conn.loop is not self._loop:
            return conn.close()
        while self._waiters:
            key, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if key != conn.key:  # its slot is worth more than it
                conn.holds_slot = False
                conn.close()
                conn = None
            return waiter.set_result(conn)
        conn.park(self._loop.time())
        self._idle.setdefault(conn.key, []).append(conn)

    def _hand_back(self, conn: _Connection | None) -> None:
        if conn is None:
            self._free_slot()
        else:
            self._release(conn)

    def _free_slot(self) -> None:
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter.set_result(None)
        self._open -= 1

    def _discard(self, conn: _Connection, was_idle: bool) -> None:
        """Give back the slot of a closed connection, once."""
        if not conn.holds_slot or conn.loop is not self._loop:
            return
        conn.holds_slot = False
        if was_idle:
            idle = self._idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)
        self._free_slot()


class UpstreamResponse:
    """One streamed answer: ``status``, ``reason``, ``headers`` (lower-case keys), then
    ``read()`` or ``events()``.

    Leaving the ``async with`` returns the connection to the pool only when the body was read
    to its end and nothing went wrong; otherwise the connection is closed.
    """

    def __init__(self, client: UpstreamClient, url: str, body: bytes, headers: Mapping[str, str],
                 total_timeout: float | None = None):
        self._client, self._request = client, (url, body, headers, total_timeout)
        self._conn: _Connection | None = None
        self.status, self.reason, self.headers = 0, "", {}

    async def __aenter__(self) -> UpstreamResponse:
        self._conn = conn = await self._client._exchange(*self._request)
        reader = conn.reader
        self.status, self.reason, self.headers = reader.status, reader.reason, reader.headers
        return self

    async def __aexit__(self, kind, exc, tb) -> None:
        conn = self._conn
        if kind is None and conn.reader.done and conn.reader.reusable and conn.state is not CLOSED:
            self._client._release(conn)
        else:
            conn.close()

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The data of the events each read completed (a slow reader gets several reads' worth)."""
        conn = self._conn
        conn.decode_events()
        while True:
            if conn.events:
                yield conn.take_events()
            elif conn.exc is not None:
                raise conn.exc
            elif conn.reader.done:
                return
            else:
                await conn.wait()

    async def read(self, limit: int | None = None) -> bytes:
        """The body, or its first ``limit`` bytes (for error responses; not with ``events()``)."""
        conn, pieces, size = self._conn, [], 0
        while True:
            if conn.raw:
                raw = conn.take_raw()
                pieces += raw
                size += sum(map(len, raw))
            if conn.reader.done or (limit is not None and size >= limit):
                return b"".join(pieces)[:limit]
            if conn.exc is not None:
                raise conn.exc
            await conn.wait()


# A connection's life: READY (open, no request on it) -> ACTIVE (a request is on it, until its
# reader leaves) -> IDLE (parked in the pool) -> ACTIVE ... -> CLOSED, from any state.
READY, ACTIVE, IDLE, CLOSED = "ready", "active", "idle", "closed"


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a :class:`ResponseReader` per response behind a thin
    ``asyncio.Protocol``, with the pool's slot, flow control and one watchdog timer.

    The timer (``_watch``) fires ``read_timeout`` after the last read while a response is
    expected, and ``keepalive_expiry`` after the connection was parked while idle.  Reads only
    record their time; the timer re-arms itself from that when it fires.
    """

    def __init__(self, client: UpstreamClient, key: tuple, origin: str):
        self.client, self.key, self.origin, self.loop = client, key, origin, client._loop
        self.transport: asyncio.Transport | None = None
        self.state = READY
        self.holds_slot = False  # holds one of the client's max_connections slots
        self.idle_since = 0.0  # when it was parked, while IDLE
        self.timer: asyncio.TimerHandle | None = None
        self.last_read = 0.0
        self.waiter: asyncio.Future | None = None
        # the current (or last) request's: its response, as bytes or SSE data, and how it failed
        self.reader: ResponseReader | None = None
        self.sse: SSEDecoder | None = None
        self.raw, self.events, self.buffered, self.paused = [], [], 0, False
        self.exc: BaseException | None = None
        self.reused = self.received = self.stale = False  # stale: closed by the server as we sent
        self.deadline, self.total_timeout = math.inf, None

    def send_request(self, request: bytes, reused: bool, deadline: float = math.inf,
                     total_timeout: float | None = None) -> None:
        """Send a request, with a new reader for its response."""
        self.state, self.reused, self.received, self.stale = ACTIVE, reused, False, False
        self.deadline, self.total_timeout = deadline, total_timeout
        self.reader = ResponseReader(self.client.max_header_bytes)
        self.sse = None
        self.raw, self.events, self.buffered, self.paused = [], [], 0, False
        self.exc = None
        self.last_read = now = self.loop.time()
        self._schedule(min(now + self.client.read_timeout, deadline))
        self.transport.write(request)

    async def response_head(self) -> None:
        while not self.reader.head_done:
            if self.exc is not None:
                raise self.exc
            await self.wait()

    def wait(self) -> asyncio.Future:
        """A future that the next read, the end or a failure completes (a plain future, no
        coroutine: this is awaited once per read)."""
        self.waiter = waiter = self.loop.create_future()
        return waiter

    def decode_events(self) -> None:
        """From now on decode the body as SSE, starting with what arrived already."""
        if self.sse is None:
            self.sse = SSEDecoder(self.client.max_line_bytes)
            raw, self.raw = self.raw, []
            try:
                for piece in raw:
                    self.events += self.sse.feed(piece)
                if self.reader.done:
                    self.events += self.sse.close()
            except ValueError as exc:
                self.fail(self.client.error(f"{self.origin}: {exc}"))
                self.transport.abort()

    def take_events(self) -> list[bytes]:
        """The data of the events buffered for the reader, taken."""
        events, self.events, self.buffered = self.events, [], 0
        if self.paused:
            self._resume()
        return events

    def take_raw(self) -> list[bytes]:
        """The body bytes buffered for the reader, taken."""
        raw, self.raw, self.buffered = self.raw, [], 0
        if self.paused:
            self._resume()
        return raw

    def _resume(self) -> None:
        """The slow reader caught up: read the socket again."""
        self.paused = False
        self.last_read = self.loop.time()
        if self.state is not CLOSED:
            self.transport.resume_reading()

    def ready(self) -> None:
        """No request on it now: taken from the pool, or its reader left."""
        self.state = READY

    def usable(self) -> bool:
        return self.state is not CLOSED and self.reader.reusable and not self.transport.is_closing()

    def park(self, now: float) -> None:
        self.state, self.idle_since = IDLE, now
        self._schedule(now + self.client.keepalive_expiry)

    def close(self) -> None:
        """Close for good (now, if a response is unfinished) and give back the pool slot."""
        if self.state is not CLOSED:
            was_idle, self.state = self.state is IDLE, CLOSED
            if self.timer is not None:
                self.timer.cancel()
            if self.reader is not None and self.reader.done:
                self.transport.close()
            else:
                self.transport.abort()
            self.client._discard(self, was_idle)

    def fail(self, exc: BaseException) -> None:
        """The response failed: its reader gets ``exc``."""
        if self.exc is None:
            self.exc = exc
        self.reader.reusable = False
        self._wake()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        self.received = True
        reader = self.reader
        if self.state is not ACTIVE or reader.done:  # bytes after the response, or while idle
            if self.state is IDLE:
                return self.close()
            if reader is not None:
                reader.reusable = False  # never reuse it
            return
        try:
            body = reader.feed(data)
            if body:
                self._deliver(body)
            if reader.done:
                self._finish()
            elif not body:
                self._wake()  # perhaps the head is complete
        except ValueError as exc:
            self.fail(self.client.error(f"{self.origin}: {exc}"))
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        state, self.state = self.state, CLOSED
        if state is not CLOSED:
            self.client._discard(self, state is IDLE)
        if state is not ACTIVE or self.reader.done:
            return
        try:
            if exc is not None:  # a reset ends nothing, not even a body that runs to the close
                raise ValueError(f"connection closed {self.reader.where} ({exc})")
            self.reader.eof()
            self._finish()
        except ValueError as error:
            self.stale = self.reused and not self.received
            self.fail(self.client.error(f"{self.origin}: {error}"))

    # -- the body, to its reader ---------------------------------------------------------------

    def _deliver(self, body: bytes) -> None:
        if self.sse is not None:
            events = self.sse.feed(body)
            if not events:
                return
            if self.events:
                self.events += events
            else:
                self.events = events
        else:
            self.raw.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_BYTES and not self.paused:
            self.paused = True  # the reader is slow: let TCP flow control hold the upstream
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        if self.sse is not None:
            self.events += self.sse.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the watchdog --------------------------------------------------------------------------

    def _schedule(self, deadline: float) -> None:
        timer = self.timer
        if deadline < math.inf and (timer is None or timer.when() > deadline):
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self._watch)

    def _watch(self) -> None:
        self.timer = None
        now, client = self.loop.time(), self.client
        expecting = self.state is ACTIVE and not self.reader.done and self.exc is None
        if self.state is IDLE:
            deadline = self.idle_since + client.keepalive_expiry
            if now >= deadline:
                return self.close()
        elif expecting and now >= self.deadline:
            self.fail(client.timeout(f"{self.origin}: the answer took longer than {self.total_timeout:g} s"))
            return self.transport.abort()
        elif expecting and not self.paused:
            deadline = min(self.last_read + client.read_timeout, self.deadline)
            if now >= self.last_read + client.read_timeout:
                what = "no response" if not self.reader.head_done else "no data mid-body"
                self.fail(client.timeout(f"{self.origin}: {what} for {client.read_timeout:g} s"))
                return self.transport.abort()
        else:
            deadline = now + client.read_timeout
        self._schedule(deadline)


class _StreamError(UpstreamError):
    """Raised by the UpstreamClient; the provider renames it after itself."""


class _StreamTimeout(UpstreamTimeout):
    """Raised by the UpstreamClient; the provider renames it after itself."""


class HTTPClients:
    """One app instance's HTTP clients, each opened on first use (mounts run no lifespan):
    nodechat's own :class:`UpstreamClient` for chat-completions streams, httpx for the rest
    and for streams too when a host passes its own ``http_client``, a proxy is set in the
    environment, or ``upstream_client = "httpx"``."""

    def __init__(self, settings: Settings, host_client: httpx.AsyncClient | None = None):
        self.settings = settings
        self._host_client = host_client
        self._httpx: httpx.AsyncClient | None = None
        self._stream: UpstreamClient | None = None
        self._ssl: ssl.SSLContext | None = None
        self._through_httpx = (host_client is not None or settings.upstream_client == "httpx"
                               or _proxy_configured())  # read once, as httpx reads the environment

    def http(self) -> httpx.AsyncClient:
        if self._host_client is not None:
            return self._host_client
        if self._httpx is None:
            httpx, s = _httpx(), self.settings
            self._httpx = httpx.AsyncClient(
                verify=self._ssl_context(),
                timeout=httpx.Timeout(s.read_timeout, connect=s.connect_timeout, pool=s.connect_timeout),
                limits=httpx.Limits(max_connections=s.max_upstream_connections, keepalive_expiry=30.0))
        return self._httpx

    def stream_client(self) -> UpstreamClient | httpx.AsyncClient:
        s = self.settings
        if self._through_httpx:
            return self.http()
        if self._stream is None:
            self._stream = UpstreamClient(
                connect_timeout=s.connect_timeout, read_timeout=s.read_timeout,
                pool_timeout=s.connect_timeout, max_connections=s.max_upstream_connections,
                keepalive_expiry=30.0, max_line_bytes=s.max_upstream_line_bytes,
                ssl_context=self._ssl_context, error=_StreamError, timeout=_StreamTimeout)
        return self._stream

    async def aclose(self) -> None:
        """Close what was opened here (a host's own client is the host's to close)."""
        client, self._httpx = self._httpx, None
        if client is not None:
            await client.aclose()
        if self._stream is not None:
            await self._stream.aclose()

    def _ssl_context(self) -> ssl.SSLContext:
        """httpx's verified context (certifi, or ``SSL_CERT_FILE``), made once for both clients."""
        self._ssl = self._ssl or _httpx().create_ssl_context()
        return self._ssl


def _proxy_configured() -> bool:
    """An HTTP proxy in the environment: only httpx knows how to go through one."""
    import urllib.request

    return bool({"http", "https", "all"} & set(urllib.request.getproxies_environment()))


###############################################################################
# Providers: OpenAI-compatible servers, Anthropic's Messages API, the built-in echo model, fallbacks
###############################################################################


PASSTHROUGH_STATUSES = frozenset({400, 404, 409, 413, 422, 429})  # the caller's fault: keep them
VIA_HEADER = "x-nodechat-via"  # which app sent an upstream request (one that comes back to it is a loop)


class Provider(typing.Protocol):
    """A model source.  ``stream`` yields TextDelta, ReasoningDelta, ToolCall, then StepFinished."""

    name: str
    models: tuple[str, ...]

    def stream(self, body: dict, http: httpx.AsyncClient) -> AsyncIterator[Event]: ...
    async def list_models(self, http: httpx.AsyncClient) -> list[str]: ...


class OpenAIProvider:
    """Any server that speaks OpenAI's ``/chat/completions`` (OpenAI, Ollama, vLLM, llama.cpp...).

    Streams always, so one code path serves streaming and non-streaming callers; parses SSE by
    hand, assembles ``tool_calls`` deltas into whole calls, and keeps reasoning deltas apart.
    """

    def __init__(self, name: str, base_url: str, api_key: str = "", models: Iterable[str] = (),
                 stream_timeout: float = 600.0, max_line_bytes: int = MAX_LINE_BYTES,
                 stream_usage: bool = True, send_reasoning: bool | None = None):
        self.max_line_bytes = max_line_bytes
        self.stream_usage = stream_usage  # ask for stream_options.include_usage (some servers refuse it)
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.models = tuple(models)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        #: How errors and logs name it: by URL, which says where it really is.
        # never repeated to clients or logs, even when the upstream echoes them back
        parts = urlsplit(self.base_url)
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()
        self.label = shown if name == "openai" else f"{name!r} at {shown}"
        self.secrets = (api_key, parts.password or "", *(v for _, v in parse_qsl(parts.query)))
        self.stream_timeout = stream_timeout
        #: DeepSeek's thinking mode wants its reasoning back with a turn's tool calls
        self.send_reasoning = "deepseek" in (parts.hostname or "") if send_reasoning is None else send_reasoning

    async def stream(self, body: dict, http: UpstreamClient | httpx.AsyncClient) -> AsyncIterator[Event]:
        """The answer to one chat-completions request, always streamed from the upstream.

        ``http`` is nodechat's own :class:`UpstreamClient` (the fast path) or an httpx client
        (a host's own client, a proxy, or ``upstream_client = "httpx"``)."""
        body = openai_request(body, self.base_url == DEFAULT_OPENAI_BASE_URL, self.send_reasoning)
        if self.stream_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        async for event in self._decode(CompletionDecoder(self), "/chat/completions", body, http):
            yield event

    async def _decode(self, decoder: CompletionDecoder | MessagesDecoder, path: str, body: dict,
                      http: UpstreamClient | httpx.AsyncClient, headers: Mapping[str, str] = {}
                      ) -> AsyncIterator[Event]:
        """POST ``body`` to ``path`` and turn the events of its stream into ours with ``decoder``."""
        deadline = time.monotonic() + self.stream_timeout  # a slow drip resets no clock here
        async with self._batches(path, body, http, headers) as batches:
            async for batch in batches:
                if time.monotonic() > deadline:  # checked on every read, keep-alive comments too
                    raise UpstreamTimeout(f"provider {self.label} took longer than {self.stream_timeout:g} s")
                for event in decoder.feed(batch):
                    yield event
        for event in decoder.close():
            yield event

    @contextlib.asynccontextmanager
    async def _batches(self, path: str, body: dict, http: UpstreamClient | httpx.AsyncClient,
                       headers: Mapping[str, str] = {}) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """The response's events, a list of ``data`` per network read; each client's errors
        become this provider's UpstreamError or UpstreamTimeout."""
        url = self.base_url + path
        headers = {**self.headers, **headers}
        if isinstance(http, UpstreamClient):
            headers.update({"Content-Type": "application/json", "Accept": "text/event-stream"})
            try:
                async with http.stream(url, _upstream_json(body), headers, self.stream_timeout) as response:
                    if response.status >= 400:
                        raise self._status_error(response.status, response.reason, response.headers,
                                                 await response.read(4097))
                    yield response.events()
            except (_StreamError, _StreamTimeout) as exc:  # "origin: what happened" -> this provider
                what = redact(exc.message.partition(": ")[2], self.secrets)
                if isinstance(exc, _StreamTimeout):
                    raise UpstreamTimeout(f"provider {self.label}: {what}") from None
                raise UpstreamError(f"provider {self.label}: {what}", code="upstream_connection") from None
            return
        with self._errors():
            response = await http.send(http.build_request("POST", url, json=body, headers=headers),
                                       stream=True)
            try:
                if response.status_code >= 400:
                    raise self._status_error(response.status_code, response.reason_phrase,
                                             response.headers, await _read_some(response, 4097))
                yield sse_batches(response.aiter_bytes(), self.max_line_bytes)
            finally:
                await response.aclose()

    models_path = "/models"

    async def list_models(self, http: httpx.AsyncClient) -> list[str]:
        if self.models:
            return list(self.models)
        with self._errors():
            response = await http.get(self.base_url + self.models_path, headers=self.headers, timeout=5.0)
            if response.status_code >= 400:
                raise self._status_error(response.status_code, response.reason_phrase,
                                         response.headers, await _read_some(response, 4097))
            try:
                return [str(m["id"]) for m in response.json().get("data", []) if isinstance(m, dict)]
            except (ValueError, AttributeError, KeyError, TypeError):
                raise UpstreamError(f"provider {self.label} answered /models with no model list") from None

    @contextlib.contextmanager
    def _errors(self):
        """Wrap httpx's errors (and the SSE decoder's) once, where they arrive, naming this
        provider."""
        httpx = _httpx()
        try:
            yield
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"provider {self.label} timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"provider {self.label} failed: {type(exc).__name__}: {exc}",
                                code="upstream_connection") from exc
        except ValueError as exc:  # SSEDecoder: a line or event past max_upstream_line_bytes
            raise UpstreamError(f"provider {self.label}: {exc}") from None

    def _status_error(self, status: int, reason: str, headers: Mapping[str, str],
                      raw: bytes) -> NodeChatError:
        try:
            detail = _error_text(json.loads(raw))
        except (ValueError, RecursionError):
            detail = raw.decode(errors="replace")[:500].strip() or reason
        retry_after = headers.get("retry-after")
        wait = f" (retry after {retry_after} s)" if retry_after else ""
        detail = redact(detail, self.secrets)[:1000]
        return UpstreamError(f"provider {self.label} returned HTTP {status}: {detail}{wait}",
                             code=f"upstream_{status}", retry_after=retry_after,
                             status=status if status in PASSTHROUGH_STATUSES else None)


class CompletionDecoder:
    """Turns the ``data`` of an upstream's ``chat.completion.chunk`` events into events,
    one batch (the events of one network read) at a time, as SSEDecoder turns bytes into data.

    The deltas of one batch are merged into one event: a burst of fifty chunks costs one
    encode and one send downstream instead of fifty.  Tool-call deltas are assembled and come
    out whole from ``close()``, before the StepFinished.  A malformed chunk, or an ``error``
    in the stream, is an UpstreamError naming the provider (its secrets redacted).
    """

    def __init__(self, provider: OpenAIProvider):
        self.label, self.secrets = provider.label, provider.secrets
        self.calls: dict[int, list] = {}  # index -> [id, name, argument pieces]
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.done = False  # [DONE] came: read on to the end, so the connection goes back to the pool

    def feed(self, batch: list[bytes]) -> list[Event]:
        events: list[Event] = []
        pending: list[str] = []
        pending_kind: type = TextDelta
        for data in batch:
            if self.done or data == b"[DONE]":
                self.done = True
                continue
            try:
                chunk = parse_json(data)  # strict: no NaN, no lone surrogate, bounded depth
            except ValueError:
                raise UpstreamError(f"provider {self.label} sent a malformed event: "
                                    f"{redact(repr(data[:200]), self.secrets)}") from None
            if type(chunk) is not dict:
                raise UpstreamError(f"provider {self.label} sent a non-object event: "
                                    f"{redact(repr(data[:200]), self.secrets)}")
            if "error" in chunk:
                raise UpstreamError(f"provider {self.label}: {redact(_error_text(chunk), self.secrets)[:1000]}")
            try:
                if chunk.get("usage") is not None:  # with empty choices or not, before or after finish_reason
                    self.usage = Usage.from_openai(chunk["usage"]) or self.usage
                for choice in chunk.get("choices") or ():
                    if choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if "reasoning_content" in delta or "reasoning" in delta or "reasoning_details" in delta:
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or \
                            "".join(d.get("text") or d.get("summary") or "" for d in delta.get("reasoning_details") or ()
                                    if type(d) is dict)  # OpenRouter's, when it sends no plain text beside
                        if reasoning:
                            if pending and pending_kind is not ReasoningDelta:
                                events.append(pending_kind("".join(pending)))
                                pending = []
                            pending_kind = ReasoningDelta
                            pending.append(reasoning)
                    if text:
                        if pending and pending_kind is not TextDelta:
                            events.append(pending_kind("".join(pending)))
                            pending = []
                        pending_kind = TextDelta
                        pending.append(text)
                    if "tool_calls" in delta:
                        for part in delta["tool_calls"] or ():
                            _assemble(self.calls, part)
                    reason = choice.get("finish_reason")
                    if reason:  # null, "" (and other empty values) say nothing yet
                        if type(reason) is not str:
                            raise TypeError("finish_reason is not a string")
                        self.reason = reason
            except (AttributeError, TypeError, KeyError) as exc:  # a chunk of the wrong shape
                raise UpstreamError(f"provider {self.label} sent a malformed chunk "
                                    f"({type(exc).__name__}: {exc})") from None
        if pending:
            try:
                events.append(pending_kind("".join(pending)))
            except TypeError as exc:  # a delta that is not a string
                raise UpstreamError(f"provider {self.label} sent a malformed chunk "
                                    f"(TypeError: {exc})") from None
        return events

    def close(self) -> list[Event]:
        """The assembled tool calls and the StepFinished, once the stream has ended."""
        if not self.done and self.reason is None:
            raise UpstreamError(f"provider {self.label} ended the stream before the answer was complete")
        calls = [ToolCall(call_id or new_id("call"), name, "".join(arguments))
                 for _, (call_id, name, arguments) in sorted(self.calls.items())]
        return [*calls, StepFinished(self.reason or "stop", self.usage)]


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    raw = b""
    async for piece in response.aiter_bytes():
        raw += piece
        if len(raw) >= limit:
            break
    return raw[:limit]


def _upstream_json(body: dict) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:  # NaN or a lone surrogate from a tool or workflow
        raise BadRequest(f"the request to the model cannot be encoded: {exc}", code="invalid_body") from None


def _assemble(calls: dict[int, list], part: dict) -> None:
    """Merge one ``delta.tool_calls`` entry into the call at its index (arguments kept as
    pieces, joined once: appending to a growing string would be quadratic)."""
    index = part.get("index", len(calls))
    entry = calls.setdefault(index, ["", "", []])
    function = part.get("function") or {}
    call_id, name, arguments = part.get("id"), function.get("name"), function.get("arguments")
    if not isinstance(index, int) or not all(isinstance(v, (str, type(None))) for v in (call_id, name, arguments)):
        raise TypeError("a tool call's index, id, name or arguments has the wrong type")
    entry[0] = call_id or entry[0]
    if name and not entry[1]:  # some servers repeat the name in every delta
        entry[1] = name
    if arguments:
        entry[2].append(arguments)


SECRET_PATTERN = re.compile(r"(?i)(bearer\s+|\bsk-)[A-Za-z0-9._~+/=-]{4,}")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` from an upstream without the keys it may echo back (``Bearer ...``, ``sk-...``,
    and the configured key itself, wherever it appears)."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    return SECRET_PATTERN.sub(r"\1***", text)


def _error_text(payload: Any) -> str:
    """An upstream error's message, whole (redact it, then cut it: cut first and a key at
    the edge would leak its start)."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload))
        return str(error.get("message") or error) if isinstance(error, dict) else str(error)
    return str(payload)

def openai_request(body: dict, cache_keys: bool = False, send_reasoning: bool = False) -> dict:
    """A streamed chat-completions body without what only Anthropic's API takes: the
    ``anthropic`` options, assistants' ``thinking_blocks`` and ``cache_control`` on parts (the
    Messages door and an Anthropic upstream leave them in the history).  Without them the
    messages are as before: text-only parts as one string.  A conversation's cache key
    goes out as ``prompt_cache_key`` where ``cache_keys`` says the server takes it (OpenAI's:
    requests with one key land where the conversation's prefix is cached).  The model's
    reasoning goes back only with ``send_reasoning`` (DeepSeek's thinking mode wants it on
    the tool-call messages of the turn under way, as ``reasoning_content``; others refuse
    it or pay for it again)."""
    body = {**body, "stream": True}
    body.pop("anthropic", None)
    cache_key = body.pop("nodechat_cache_key", None)
    if cache_key and cache_keys and "prompt_cache_key" not in body:
        body["prompt_cache_key"] = cache_key
    messages = body.get("messages") or ()
    if any("thinking_blocks" in m or "reasoning" in m or "reasoning_content" in m or type(m.get("content")) is list
           and any(type(p) is dict and "cache_control" in p for p in m["content"]) for m in messages):
        turn_starts = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
        body["messages"] = [plain_message(m, send_reasoning and i > turn_starts and "tool_calls" in m)
                            for i, m in enumerate(messages)]
    return body


def plain_message(message: dict, with_reasoning: bool = False) -> dict:
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    message = {k: v for k, v in message.items() if k not in ("thinking_blocks", "reasoning", "reasoning_content")}
    if with_reasoning and reasoning:
        message["reasoning_content"] = reasoning
    content = message.get("content")
    if type(content) is list:
        parts = [{k: v for k, v in p.items() if k != "cache_control"} if type(p) is dict else p for p in content]
        text_only = all(type(p) is dict and p.get("type") == "text" for p in parts)
        message["content"] = "\n\n".join(str(p.get("text", "")) for p in parts) if text_only else parts
    return message


ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_MAX_TOKENS = 8192  # Messages requires max_tokens: this when the caller set none
ANTHROPIC_FINISH = types.MappingProxyType({  # stop_reason -> finish reason
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"})
ANTHROPIC_CHOICES = types.MappingProxyType({"auto": "auto", "required": "any", "none": "none"})
MESSAGES_ERROR_STATUS = types.MappingProxyType({  # an error event's type -> the status it stands for
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "request_too_large": 413, "rate_limit_error": 429, "api_error": 500, "overloaded_error": 529})
BETA_PATTERN = re.compile(r"[A-Za-z0-9._-]+([ \t]*,[ \t]*[A-Za-z0-9._-]+)*")  # anthropic-beta: a header value


class AnthropicProvider(OpenAIProvider):
    """Anthropic's Messages API, natively: thinking (signed, so a tool-use turn can send it
    back), ``cache_control`` breakpoints and ``anthropic-beta`` reach Claude, which its
    OpenAI-compatible layer drops.  The same HTTP client and fast path as the OpenAI stream;
    its errors, 429 and 529 (overloaded, with ``retry-after``) named as this provider's."""

    models_path = "/models?limit=1000"

    def __init__(self, name: str, base_url: str, api_key: str = "", models: Iterable[str] = (),
                 stream_timeout: float = 600.0, max_line_bytes: int = MAX_LINE_BYTES):
        base_url = base_url.rstrip("/")  # ANTHROPIC_BASE_URL is the host; the API is under /v1
        super().__init__(name, base_url if base_url.endswith("/v1") else base_url + "/v1", "", models,
                         stream_timeout, max_line_bytes)
        self.headers = {"anthropic-version": ANTHROPIC_VERSION} | ({"x-api-key": api_key} if api_key else {})
        self.secrets = (api_key, *self.secrets)

    async def stream(self, body: dict, http: UpstreamClient | httpx.AsyncClient) -> AsyncIterator[Event]:
        try:
            request, headers = messages_request(body)
        except (AttributeError, TypeError, ValueError) as exc:  # a /v1 caller's history of the wrong shape
            raise BadRequest(f"the messages cannot be put in Anthropic's shape for provider {self.label} "
                             f"({type(exc).__name__}: {exc})", code="invalid_messages") from None
        async for event in self._decode(MessagesDecoder(self), "/messages", request, http, headers):
            yield event

    async def count_tokens(self, body: dict, beta: str, http: httpx.AsyncClient) -> int:
        """Its own count of a Messages request's input tokens."""
        headers = {**self.headers, **({"anthropic-beta": beta} if BETA_PATTERN.fullmatch(beta) else {})}
        with self._errors():
            response = await http.post(self.base_url + "/messages/count_tokens", json=body, headers=headers,
                                       timeout=10.0)
            if response.status_code >= 400:
                raise self._status_error(response.status_code, response.reason_phrase, response.headers,
                                         await _read_some(response, 4097))
            counted = response.json().get("input_tokens") if response.content.startswith(b"{") else None
        if type(counted) is not int:
            raise UpstreamError(f"provider {self.label} answered count_tokens with no input_tokens")
        return counted


def messages_request(body: dict) -> tuple[dict, dict[str, str]]:
    """A chat-completions body as a Messages request (and its ``anthropic-beta`` header):
    system messages as ``system``, tool calls as ``tool_use`` blocks, tool messages as
    ``tool_result`` blocks in the user's turn, images as image blocks; consecutive messages
    of one role as one; a ``response_format`` JSON schema as ``output_config.format`` (a
    ``json_object`` has no equivalent: left out).  ``body["anthropic"]`` holds what only this
    API takes (``thinking``, ``top_k``, ``metadata``, ``output_config``'s other keys, the
    betas), from the Messages door."""
    native = body.get("anthropic") if isinstance(body.get("anthropic"), dict) else {}
    system = [b for b in native.get("system") or () if isinstance(b, dict) and b.get("type") == "text"]  # Claude's only
    messages: list[dict] = []
    for message in body.get("messages") or ():
        role = message.get("role")
        if role in ("system", "developer"):
            system += anthropic_blocks(message.get("content"))
            continue
        if role == "tool":
            role, blocks = "user", [tool_result_block(message)]
        elif role == "assistant":
            thinking = message.get("thinking_blocks")
            blocks = [b for b in thinking if signed_thinking(b)] if isinstance(thinking, list) else []
            blocks += anthropic_blocks(message.get("content"))
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                args = parse_arguments(function.get("arguments") or "{}")
                blocks.append({"type": "tool_use", "id": re.sub(r"[^A-Za-z0-9_-]", "_", str(call.get("id") or "")),
                               "name": str(function.get("name", "")), "input": args if isinstance(args, dict) else {}})
        else:
            role, blocks = "user", anthropic_blocks(message.get("content"))
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})
    request: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": True,
                               "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens")
                               or ANTHROPIC_MAX_TOKENS}
    if body.get("nodechat_cache_key") and messages and not any(
            "cache_control" in b for m in messages for b in m["content"]) and not any("cache_control" in b for b in system):
        if system:  # a conversation: cache its system prompt, and all of it up to the newest message
            system[-1] = {**system[-1], "cache_control": {"type": "ephemeral"}}
        messages[-1]["content"][-1] = {**messages[-1]["content"][-1], "cache_control": {"type": "ephemeral"}}
    if system:
        request["system"] = system
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            request[key] = body[key]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("tools"):
        request["tools"] = [{"name": f.get("name", ""), "description": f.get("description", ""),
                             "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
                            for f in (t.get("function") or {} for t in body["tools"])]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = {"type": "tool", "name": str((choice.get("function") or {}).get("name", ""))}
    elif choice in ANTHROPIC_CHOICES:
        choice = {"type": ANTHROPIC_CHOICES[choice]}
    if body.get("parallel_tool_calls") is False and body.get("tools"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice:
        request["tool_choice"] = choice
    for key in ("thinking", "top_k", "metadata"):  # as the client sent them; never model, messages or stream
        value = native.get(key, body.get(key) if key != "metadata" else None)  # /v1 callers: LiteLLM's spelling
        if value is not None:
            request[key] = value
    output = dict(native.get("output_config") or {})  # Claude's own (``effort``), from the Messages door
    form = body.get("response_format")
    spec = form.get("json_schema") if isinstance(form, dict) and form.get("type") == "json_schema" else None
    if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):  # Claude's structured outputs
        output["format"] = {"type": "json_schema", "schema": spec["schema"]}
    if output:
        request["output_config"] = output
    beta = native.get("beta", "")
    return request, {"anthropic-beta": beta} if isinstance(beta, str) and BETA_PATTERN.fullmatch(beta) else {}


def signed_thinking(block: Any) -> bool:
    """A thinking block Claude takes back: signed (another model's reasoning, passed on as
    thinking with an empty signature, would be refused on every later request)."""
    return isinstance(block, dict) and (
        block.get("type") == "thinking" and isinstance(block.get("signature"), str) and bool(block["signature"])
        or block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str))


def anthropic_blocks(content: Any) -> list[dict]:
    """Message content (a string, or text and image parts) as Messages blocks; the parts'
    ``cache_control`` kept, empty text left out (Messages refuses it)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and part.get("text"):
            block = {"type": "text", "text": str(part["text"])}
        elif part.get("type") == "image_url":
            url = str((part.get("image_url") or {}).get("url", ""))
            head, _, data = url.partition(";base64,")
            block = {"type": "image", "source": {"type": "base64", "media_type": head[5:], "data": data}
                     if head.startswith("data:") and data else {"type": "url", "url": url}}
        elif part.get("type") == "file" and isinstance(part.get("file"), dict):
            head, _, data = str(part["file"].get("file_data", "")).partition(";base64,")
            if head[5:].startswith("text/"):  # Claude reads a text document as text
                source = {"type": "text", "media_type": "text/plain", "data": base64.b64decode(data).decode(
                    errors="replace")}
            else:
                source = {"type": "base64", "media_type": head[5:] or "application/pdf", "data": data}
            block = {"type": "document", "source": source, "title": str(part["file"].get("filename", ""))[:200]}
        else:
            continue
        if "cache_control" in part:
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def tool_result_block(message: dict) -> dict:
    content = message.get("content")
    block = {"type": "tool_result", "tool_use_id": re.sub(r"[^A-Za-z0-9_-]", "_", str(message.get("tool_call_id") or "")),
             "content": content if isinstance(content, str) else anthropic_blocks(content)}
    if isinstance(content, str) and content.startswith("Error: "):  # how tool_message says a tool failed
        block["is_error"] = True
    return block


class MessagesDecoder:
    """Turns the events of a Messages stream into ours, a batch at a time, as
    CompletionDecoder does chat-completions chunks: text and thinking deltas merged per
    batch, a signature ending its thinking, ``tool_use`` blocks assembled and out whole from
    ``close()`` with the StepFinished (the stop reason mapped, the usage added up)."""

    def __init__(self, provider: AnthropicProvider):
        self.label, self.secrets = provider.label, provider.secrets
        self.calls: dict[int, list] = {}  # block index -> [id, name, input pieces]
        self.reason: str | None = None
        self.tokens = {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                       "output_tokens": 0}
        self.counted = False
        self.done = False

    def feed(self, batch: list[bytes]) -> list[Event]:
        events: list[Event] = []
        pending: list[str] = []
        pending_kind: type = TextDelta
        for data in batch:
            try:
                event = parse_json(data)
            except ValueError:
                raise UpstreamError(f"provider {self.label} sent a malformed event: "
                                    f"{redact(repr(data[:200]), self.secrets)}") from None
            try:
                kind = event["type"]
                if kind == "content_block_delta":
                    delta = event["delta"]
                    what = delta["type"]
                    if what == "text_delta" or what == "thinking_delta":
                        piece, now = (delta["text"], TextDelta) if what == "text_delta" else (delta["thinking"], ReasoningDelta)
                        if pending and pending_kind is not now:
                            events.append(pending_kind("".join(pending)))
                            pending = []
                        pending_kind = now
                        pending.append(piece)
                    elif what == "input_json_delta":
                        self.calls[event["index"]][2].append(delta["partial_json"])
                    elif what == "signature_delta":
                        thought = "".join(pending) if pending_kind is ReasoningDelta else ""
                        if pending and pending_kind is not ReasoningDelta:
                            events.append(pending_kind("".join(pending)))
                        pending = []
                        events.append(ReasoningDelta(thought, signature=str(delta["signature"])))
                elif kind == "content_block_start":
                    block = event["content_block"]
                    if block["type"] == "tool_use":
                        given = block.get("input")
                        self.calls[event["index"]] = [str(block["id"]), str(block["name"]),
                                                      [compact_json(given)] if given else []]
                    elif block["type"] == "redacted_thinking":
                        if pending:
                            events.append(pending_kind("".join(pending)))
                            pending = []
                        events.append(ReasoningDelta("", redacted=str(block.get("data", ""))))
                    elif block.get("text") or block.get("thinking"):  # a server that starts a block with text
                        now = TextDelta if block["type"] == "text" else ReasoningDelta
                        if pending and pending_kind is not now:
                            events.append(pending_kind("".join(pending)))
                            pending = []
                        pending_kind = now
                        pending.append(block.get("text") or block["thinking"])
                elif kind == "message_start":
                    self._count(event["message"].get("usage"))
                elif kind == "message_delta":
                    self.reason = event["delta"].get("stop_reason") or self.reason
                    self._count(event.get("usage"))
                elif kind == "message_stop":
                    self.done = True
                elif kind == "error":  # overloaded before any answer: worth another try, as a 529 is
                    status = MESSAGES_ERROR_STATUS.get(str((event.get("error") or {}).get("type")), 500)
                    raise UpstreamError(f"provider {self.label}: {redact(_error_text(event), self.secrets)[:1000]}",
                                        code=f"upstream_{status}", status=status if status in PASSTHROUGH_STATUSES
                                        else None)
            except (AttributeError, TypeError, KeyError) as exc:  # an event of the wrong shape
                raise UpstreamError(f"provider {self.label} sent a malformed event "
                                    f"({type(exc).__name__}: {exc})") from None
        if pending:
            try:
                events.append(pending_kind("".join(pending)))
            except TypeError as exc:  # a delta that is not a string
                raise UpstreamError(f"provider {self.label} sent a malformed event (TypeError: {exc})") from None
        return events

    def _count(self, usage: Any) -> None:
        """``message_delta``'s usage is cumulative: its figures replace ``message_start``'s."""
        if type(usage) is dict:
            for key in self.tokens:
                if type(usage.get(key)) is int:
                    self.tokens[key] = min(max(usage[key], 0), MAX_TOKENS_PER_CALL)
                    self.counted = True

    def close(self) -> list[Event]:
        if not self.done:
            raise UpstreamError(f"provider {self.label} ended the stream before the answer was complete")
        calls = [ToolCall(call_id, name, "".join(pieces) or "{}")
                 for _, (call_id, name, pieces) in sorted(self.calls.items())]
        tokens = self.tokens
        cached = tokens["cache_read_input_tokens"]
        usage = Usage(tokens["input_tokens"] + tokens["cache_creation_input_tokens"] + cached,
                      tokens["output_tokens"], cached) if self.counted else None
        return [*calls, StepFinished(ANTHROPIC_FINISH.get(self.reason or "", "stop"), usage)]


class OfflineProvider:
    """The built-in ``echo`` model: replies with the last user message, word by word.

    It lets ``python nodechat.py`` serve with no key, and front ends be tried with no
    upstream: a message ``/tool NAME {json}`` makes it call that tool (when offered), and
    after a tool it says what the tool returned.
    """

    name = "offline"
    models = (OFFLINE_MODEL,)
    command = re.compile(r"/tool\s+([A-Za-z0-9_-]{1,64})\s*(\{.*\})?\s*", re.S)

    async def stream(self, body: dict, http: httpx.AsyncClient) -> AsyncIterator[Event]:
        messages = body.get("messages") or [{}]
        offered = {t.get("function", {}).get("name") for t in body.get("tools") or ()}
        if messages[-1].get("role") == "tool":
            text = f"{messages[-1].get('name') or 'The tool'} returned: {message_text(messages[-1])}"
        else:
            text = message_text(next((m for m in reversed(messages) if m.get("role") == "user"), {}))
            asked = self.command.fullmatch(text)
            if asked and asked.group(1) in offered:
                yield ToolCall(new_id("call"), asked.group(1), asked.group(2) or "{}")
                yield StepFinished("tool_calls")  # no usage: the agent estimates it
                return
        pieces = re.findall(r"\s*\S+", text) or ["(empty message)"]
        for piece in pieces:
            yield TextDelta(piece)
        yield StepFinished("stop")

    async def list_models(self, http: httpx.AsyncClient) -> list[str]:
        return [OFFLINE_MODEL]


class ModelRouter:
    """Routes a model name to its provider: ``provider/model``, or a bare name to the default."""

    def __init__(self, settings: Settings, providers: Iterable[Provider] = ()):
        self.via = uuid.uuid4().hex  # this app's mark on its upstream requests
        self._by_name: dict[str, Provider] = {p.name: p for p in providers}
        for config in settings.providers:
            if config.kind == "anthropic":
                provider = AnthropicProvider(config.name, config.base_url, config.api_key, config.models,
                                             settings.stream_timeout, settings.max_upstream_line_bytes)
            else:
                provider = OpenAIProvider(config.name, config.base_url, config.api_key, config.models,
                                          settings.stream_timeout, settings.max_upstream_line_bytes,
                                          config.stream_usage, config.send_reasoning)
            provider.headers[VIA_HEADER] = self.via  # a base_url that points back at this app: 508, no loop
            self._by_name.setdefault(config.name, provider)
        if not self._by_name:
            self._by_name["offline"] = OfflineProvider()
        self.default = next(iter(self._by_name.values()))
        self.fallbacks = settings.fallbacks
        self.default_model = settings.model or next(iter(self.default.models), "")
        if not self.default_model and getattr(self.default, "base_url", "") == DEFAULT_OPENAI_BASE_URL:
            self.default_model = "gpt-4o-mini"

    def __iter__(self):
        return iter(self._by_name.values())

    def __getitem__(self, name: str) -> Provider:
        return self._by_name[name]

    def resolve(self, model: str | None) -> tuple[Provider, str]:
        """The provider and its own name for ``model``; NotFound when no provider serves it."""
        model = model or self.default_model
        if not model:
            raise BadRequest("no model given and no default model configured (NODECHAT_MODEL)",
                             code="model_required")
        provider, name = self.split(model)
        if provider.models and name not in provider.models:
            raise NotFound(f"The model '{model[:100]}' does not exist; available: "
                           f"{', '.join(provider.models[:20])}", code="model_not_found")
        return provider, name

    def split(self, model: str) -> tuple[Provider, str]:
        """``provider/model`` -> that provider and ``model``; a bare name -> the default."""
        prefix, slash, rest = model.partition("/")
        return (self._by_name[prefix], rest) if slash and prefix in self._by_name else (self.default, model)

    def candidates(self, model: str | None) -> list[tuple[Provider, str, str]]:
        """``model`` and its ``fallbacks``, each as (provider, its name for it, the full name);
        a fallback no provider serves is left out, with a warning."""
        model = model or self.default_model
        found = [(*self.resolve(model), model)]
        for other in self.fallbacks.get(model, ()):
            try:
                found.append((*self.resolve(other), other))
            except NodeChatError as exc:
                log.warning("fallback %r of %r: %s", other, model, exc.message)
        return found

    async def list_models(self, http: httpx.AsyncClient) -> list[dict]:
        """Every provider's models in OpenAI's shape; a provider that is down is skipped."""
        async def one(provider: Provider) -> list[dict]:
            try:
                names = await provider.list_models(http)
            except NodeChatError as exc:
                log.warning("listing models: %s", exc.message)
                return []
            prefix = "" if provider is self.default else provider.name + "/"
            return [{"id": prefix + n, "object": "model", "created": 0, "owned_by": provider.name,
                     "type": "model", "display_name": prefix + n, "created_at": "1970-01-01T00:00:00Z"}
                    for n in names]  # OpenAI's fields and Anthropic's: both SDKs read one list

        lists = await asyncio.gather(*(one(p) for p in self._by_name.values()))
        return [model for models in lists for model in models]


RETRIED_STATUSES = frozenset({408, 409, 429})  # and every 5xx (529 too): the upstream's trouble, not the caller's


def upstream_status(exc: BaseException) -> int | None:
    """The HTTP status an upstream answered with, from the error it became (None: no answer)."""
    code = getattr(exc, "code", None) or ""
    return int(code[9:]) if code.startswith("upstream_") and code[9:].isdigit() else None


def worth_another_try(exc: BaseException) -> bool:
    """Whether a call that failed before its answer began may go to another try: no
    connection, a timeout, 408, 409, 429 or any 5xx.  Never the caller's own errors (400,
    401, 403, 404, 422...): another model would refuse the same request; nor a malformed
    answer."""
    if isinstance(exc, UpstreamTimeout):
        return True
    if not isinstance(exc, UpstreamError) or isinstance(exc, MCPError):
        return False
    if exc.code == "upstream_connection":  # refused, reset, cut, or no HTTP at all
        return True
    status = upstream_status(exc)  # None: it answered, with something malformed
    return status is not None and status != 508 and (status in RETRIED_STATUSES or status >= 500)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (it may be seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime  # rare: not worth its import at start-up
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class Circuits:
    """Each provider's failures in a row: past ``failures`` it is skipped for ``seconds``
    (open), then one call may try it (half-open); an answer closes it.  Per app: two
    instances in one process share nothing."""

    def __init__(self, failures: int, seconds: float):
        self.failures, self.seconds = failures, seconds
        self._state: dict[str, list] = {}  # provider -> [failures in a row, opened at, a trial runs]

    def allows(self, provider: str) -> bool:
        state = self._state.get(provider)
        if not self.failures or state is None or state[0] < self.failures:
            return True
        if state[2] or time.monotonic() - state[1] < self.seconds:
            return False
        state[2] = True  # half-open: this call is the one that tries it
        return True

    def reopens_in(self, provider: str) -> float:
        state = self._state.get(provider)
        return max(0.0, state[1] + self.seconds - time.monotonic()) if state else 0.0

    def succeeded(self, provider: str) -> None:
        state = self._state.pop(provider, None)
        if state is not None and self.failures and state[0] >= self.failures:
            log.warning("provider %s answers again: no longer skipped", provider)

    def abandoned(self, provider: str) -> None:
        """A call that ended telling nothing of the provider (stopped by its caller): the
        next call may try it, as this one would have."""
        state = self._state.get(provider)
        if state is not None:
            state[2] = False

    def failed(self, provider: str) -> None:
        state = self._state.setdefault(provider, [0, 0.0, False])
        state[0] += 1
        if self.failures and state[0] >= self.failures and (state[0] == self.failures or state[2]):
            log.warning("provider %s failed %d times in a row: skipped for %g s", provider, state[0], self.seconds)
            state[1] = time.monotonic()
        state[2] = False


def message_text(message: dict) -> str:
    """The text of an OpenAI-style message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


###############################################################################
# Accounting: the usage ledger, budgets and rate limits, and metrics
###############################################################################


OUTPUT_HOLD_TOKENS = 1024  # a model call holds this much of a budget for its answer (or max_tokens)
LEDGER_FLUSH_SECONDS = 0.5  # ledger entries go to the store in batches, at most this often
MAX_LEDGER_PENDING = 10_000  # ... or when this many wait


def budget_window(period: str, now: float | None = None) -> tuple[datetime.datetime, datetime.datetime]:
    """The calendar period (UTC) that ``now`` falls in: its start and the next one's."""
    at = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    if period == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        return start, start + datetime.timedelta(hours=1)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + datetime.timedelta(days=1)
    if period == "week":
        start = day - datetime.timedelta(days=day.weekday())
        return start, start + datetime.timedelta(days=7)
    start = day.replace(day=1)
    return start, (start + datetime.timedelta(days=32)).replace(day=1)


def iso_z(at: datetime.datetime) -> str:
    """A time as the API shows it: ``2026-12-05T00:00:00Z``."""
    return at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_stamp(at: datetime.datetime) -> str:
    """A time as ledger entries carry it (``now_iso``'s form), to compare them as text."""
    return at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def estimate_input(body: dict) -> int:
    """Characters the model reads in a chat-completions body (for a usage estimate)."""
    chars = 0
    for message in body.get("messages") or ():
        chars += len(message_text(message))
        for call in message.get("tool_calls") or ():
            chars += len(str((call.get("function") or {}).get("arguments") or ""))
    return chars + (len(compact_json(body["tools"])) if body.get("tools") else 0)


@dataclass
class Call:
    """One upstream call, as the ledger keeps it."""

    user: str
    conversation: str | None
    protocol: str  # openai, aisdk, seed, ws
    provider: str  # its name (metrics)
    url: str  # where it is (the ledger)
    model: str
    hold: int = 0  # tokens of the user's budget it held while it ran...
    period: datetime.datetime | None = None  # ... in the period that started then
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None


class Ledger:
    """What each user spends, and the limits on it.

    Every upstream call records one entry (user, conversation, protocol, model, provider,
    tokens, ``estimated``, time), written to the store in batches: not one write per call,
    never one per token.  A turn passes the user's rate limit and budget before it starts
    (429 otherwise), and each model call holds its share of the budget while it runs
    (:meth:`hold`): once the budget is spent no further call starts, so a turn stops at its
    next step and concurrent turns overshoot by at most one call.  This class counts in this
    process, from the store's entries of the period on first use; :class:`PostgresLedger`
    counts in the database, for every process.
    """

    def __init__(self, settings: Settings, store: Any, metrics: Metrics):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.pending: list[dict] = []
        self._kept: list[dict] = []  # a store with no ledger methods (a host's own): in memory
        self._spent: dict[tuple[str, str], int] = {}  # (user, period start) -> tokens, holds included
        self._minutes: dict[str, list[int]] = {}  # user -> [minute, turns started in it]
        self._timer: asyncio.TimerHandle | None = None  # the next flush, when entries wait
        self._flushes: set[asyncio.Task] = set()
        self._writing = asyncio.Lock()  # a flush and a first count of a period never interleave

    # -- before a turn, before each call ---------------------------------------------------------

    async def admit(self, user: str) -> None:
        """Count a turn against the user's rate limit and check the budget: TooManyRequests
        (``rate_limit_exceeded``) or BudgetExceeded."""
        limits = self.settings.limits(user)
        if limits.requests_per_minute:
            minute = int(time.time() // 60)
            if not await self._count_request(user, minute, limits.requests_per_minute):
                self.metrics.rejected("rate")
                raise TooManyRequests(
                    f"rate limit: at most {limits.requests_per_minute} requests per minute for this user",
                    code="rate_limit_exceeded", retry_after=str(max(1, (minute + 1) * 60 - int(time.time()))))
        if limits.token_budget:
            start, end = budget_window(limits.budget_period)
            used = await self._used(user, start)
            if used >= limits.token_budget:
                raise self._over(limits, used, end)

    async def hold(self, call: Call, body: dict) -> None:
        """Before a model call: hold its share of the user's budget (its prompt, estimated,
        and ``max_tokens`` or OUTPUT_HOLD_TOKENS for its answer); BudgetExceeded when the
        budget is spent, counting what running calls hold."""
        limits = self.settings.limits(call.user)
        if not limits.token_budget:
            return
        start, end = budget_window(limits.budget_period)
        answer = body.get("max_completion_tokens") or body.get("max_tokens")
        amount = min(-(-estimate_input(body) // 4) + (answer if type(answer) is int and answer > 0
                                                      else OUTPUT_HOLD_TOKENS), limits.token_budget)
        used = await self._take(call.user, start, amount, limits.token_budget)
        if used is not None:
            raise self._over(limits, used, end)
        call.hold, call.period = amount, start

    def _over(self, limits: UserLimits, used: int, end: datetime.datetime) -> BudgetExceeded:
        self.metrics.rejected("budget")
        wait = end.timestamp() - time.time()
        return BudgetExceeded(
            f"token budget exceeded: {used} of {limits.token_budget} tokens used this "
            f"{limits.budget_period}; it resets at {iso_z(end)}", code="budget_exceeded",
            retry_after=str(max(1, math.ceil(wait))) if wait <= 120 else None)

    # -- after each call -------------------------------------------------------------------------

    async def record(self, call: Call, usage: Usage) -> None:
        """The call's entry, and its real tokens in place of what it held."""
        entry = {"at": now_iso(), "user": call.user, "conversation": call.conversation,
                 "protocol": call.protocol, "model": call.model, "provider": call.url, **usage.record()}
        self.pending.append(entry)
        self.metrics.used(call, usage)
        limits = self.settings.limits(call.user)
        if limits.token_budget or call.hold:
            start, _ = budget_window(limits.budget_period)
            try:
                if call.hold and call.period != start:  # a period began while it ran
                    await self._settle(call.user, call.period, -call.hold)
                    call.hold = 0
                await self._settle(call.user, start, usage.total - call.hold)
            except NodeChatError as exc:  # the answer stands; the counter is off by this call
                log.warning("cannot count %d tokens of %s against the budget: %s", usage.total,
                            call.user, exc.message)
        call.hold = 0
        if len(self.pending) >= MAX_LEDGER_PENDING and not self._writing.locked():
            spawn(self._flushes, self.flush())  # never awaited here: a turn does not wait for a slow store
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                LEDGER_FLUSH_SECONDS, lambda: spawn(self._flushes, self.flush()))

    async def flush(self) -> None:
        """Write the waiting entries (one store call for the batch)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._writing:
            batch, self.pending = self.pending, []
            if not batch:
                return
            append = getattr(self.store, "append_usage", None)
            if append is None:
                self._kept += batch
                return
            try:
                await append(batch)
            except (StoreUnavailable, InsufficientStorage) as exc:  # kept for the next flush
                log.warning("cannot write %d usage entries yet: %s", len(batch), exc.message)
                self.pending[:0] = batch
                if len(self.pending) > 10 * MAX_LEDGER_PENDING:  # a store down for long: memory is bounded
                    log.error("dropping %d usage entries", len(self.pending) - 10 * MAX_LEDGER_PENDING)
                    del self.pending[:len(self.pending) - 10 * MAX_LEDGER_PENDING]
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(
                        LEDGER_FLUSH_SECONDS * 10, lambda: spawn(self._flushes, self.flush()))
            except Exception:  # an entry the store refuses (it is logged): the others go on
                log.exception("cannot write %d usage entries; dropped", len(batch))

    async def entries(self, user: str | None, start: datetime.datetime,
                      end: datetime.datetime) -> list[dict]:
        """Every entry of ``user`` (None: every user) from ``start`` to ``end``."""
        await self.flush()
        read = getattr(self.store, "read_usage", None)
        found = self._kept if read is None else await read(user, start, end)
        first, last = utc_stamp(start), utc_stamp(end)
        return [e for e in found if (user is None or e.get("user") == user)
                and first <= str(e.get("at", "")) < last]

    async def aclose(self) -> None:
        await asyncio.gather(*self._flushes, return_exceptions=True)
        await self.flush()
        if self.pending:  # the store is down as the app closes
            log.error("%d usage entries could not be written and are lost", len(self.pending))
            self.pending = []
        if self._timer is not None:
            self._timer.cancel()

    # -- the counters: in this process -----------------------------------------------------------

    async def _count_request(self, user: str, minute: int, limit: int) -> bool:
        count = self._minutes.get(user)
        if count is None or count[0] != minute:
            count = self._minutes[user] = [minute, 0]
        if count[1] >= limit:
            return False
        count[1] += 1
        return True

    async def _used(self, user: str, start: datetime.datetime) -> int:
        key = (user, iso_z(start))
        if key not in self._spent:
            async with self._writing:  # the store's entries and the pending ones, none twice
                read = getattr(self.store, "read_usage", None)
                stored = self._kept if read is None else await read(user, start, None)
                since = utc_stamp(start)
                total = sum(e.get("input", 0) + e.get("output", 0) for e in [*stored, *self.pending]
                            if e.get("user") == user and str(e.get("at", "")) >= since)
                for old in [k for k in self._spent if k[0] == user]:
                    del self._spent[old]  # a period that is over
                self._spent.setdefault(key, total)
        return self._spent[key]

    async def _take(self, user: str, start: datetime.datetime, amount: int, limit: int) -> int | None:
        """Add ``amount`` if the budget is not spent; else the tokens used."""
        used = await self._used(user, start)
        if used >= limit:
            return used
        self._spent[user, iso_z(start)] = used + amount
        return None

    async def _settle(self, user: str, start: datetime.datetime, change: int) -> None:
        key = (user, iso_z(start))
        if key in self._spent:
            self._spent[key] += change


class PostgresLedger(Ledger):
    """:class:`Ledger` with its counters in the database, for every process: a budget is
    one row per user and period (``nodechat_limits``), taken with one atomic statement
    (``UPDATE ... WHERE used < limit RETURNING``), so two processes never both pass the last
    check.  A process killed during a call leaves what the call held counted until the
    period ends (on the safe side)."""

    def __init__(self, settings: Settings, store: Any, metrics: Metrics):
        super().__init__(settings, store, metrics)
        self._opened: set[tuple[str, str]] = set()  # periods whose row exists (this process saw it)
        self._opening = asyncio.Lock()  # first uses of a period, rare: one at a time
        self._swept = 0.0  # when this process last deleted counters that are over

    async def _count_request(self, user: str, minute: int, limit: int) -> bool:
        async with self.store._connection() as db:
            count = await db.fetchval(
                "INSERT INTO nodechat_limits AS l (user_id, key, used, until) "
                "VALUES ($1, $2, 1, to_timestamp($3)) ON CONFLICT (user_id, key) DO UPDATE "
                "SET used = l.used + 1 WHERE l.used < $4 RETURNING used",
                user, f"rpm:{minute}", (minute + 1) * 60, limit)
            if time.monotonic() - self._swept > 600:  # now and then: the minutes and periods over
                self._swept = time.monotonic()
                await db.execute("DELETE FROM nodechat_limits WHERE until < now() - interval '1 minute'")
        return count is not None

    async def _used(self, user: str, start: datetime.datetime) -> int:
        for _ in range(2):  # a row gone (a period swept early) is made again, once
            await self._open(user, start)
            async with self.store._connection() as db:
                used = await db.fetchval("SELECT used FROM nodechat_limits WHERE user_id = $1 AND key = $2",
                                         user, "tokens:" + iso_z(start))
            if used is not None:
                return used
            self._opened.discard((user, iso_z(start)))
        return 0

    async def _open(self, user: str, start: datetime.datetime) -> None:
        """The period's row, counted from the ledger the first time (the entries still
        waiting in this process included); known to exist only once it does."""
        key = (user, iso_z(start))
        if key in self._opened:
            return
        async with self._opening:
            if key in self._opened:
                return
            await self.flush()
            end = budget_window(self.settings.limits(user).budget_period, start.timestamp())[1]
            async with self.store._connection() as db:
                await db.execute(
                    "INSERT INTO nodechat_limits (user_id, key, used, until) "
                    "SELECT $1, $2, coalesce(sum(input_tokens::bigint + output_tokens), 0), $4 "
                    "FROM nodechat_usage WHERE user_id = $1 AND at >= $3 ON CONFLICT DO NOTHING",
                    user, "tokens:" + key[1], start, end)
            self._opened.add(key)

    async def _take(self, user: str, start: datetime.datetime, amount: int, limit: int) -> int | None:
        await self._open(user, start)
        async with self.store._connection() as db:
            taken = await db.fetchval(
                "UPDATE nodechat_limits SET used = used + $3 WHERE user_id = $1 AND key = $2 "
                "AND used < $4 RETURNING used", user, "tokens:" + iso_z(start), amount, limit)
        if taken is not None:
            return None
        used = await self._used(user, start)  # spent; or the row was gone, and is made again
        return used if used >= limit else await self._take(user, start, amount, limit)

    async def _settle(self, user: str, start: datetime.datetime, change: int) -> None:
        if change:
            async with self.store._connection() as db:
                await db.execute("UPDATE nodechat_limits SET used = used + $3 WHERE user_id = $1 AND key = $2",
                                 user, "tokens:" + iso_z(start), change)


def make_ledger(settings: Settings, store: Any, metrics: Metrics) -> Ledger:
    return (PostgresLedger if isinstance(store, PostgresStore) else Ledger)(settings, store, metrics)


#: Buckets of OpenTelemetry's GenAI metrics (vLLM's time-to-first-token set).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
MAX_LABEL_CHARS = 100  # of a model name in the ledger and the metrics
MAX_SERIES = 2000  # label sets per family; past it new ones count under "_other" (model names come from clients)
PROCESS_STARTED = time.time()
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Family:
    """One Prometheus metric family: a counter, a gauge or a histogram, by label values."""

    def __init__(self, name: str, kind: str, doc: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = ()):
        self.name, self.kind, self.doc, self.labels, self.buckets = name, kind, doc, labels, buckets
        self.samples: dict[tuple, Any] = {}  # label values -> value, or [bucket counts..., sum]

    def _key(self, values: tuple) -> tuple:
        if values in self.samples or len(self.samples) < MAX_SERIES:
            return values
        return ("_other",) * len(values)

    def inc(self, values: tuple = (), amount: float = 1) -> None:
        key = self._key(values)
        self.samples[key] = self.samples.get(key, 0) + amount

    def set(self, values: tuple, value: float) -> None:
        self.samples[self._key(values)] = value

    def observe(self, values: tuple, value: float) -> None:
        key = self._key(values)
        counts = self.samples.get(key)
        if counts is None:
            counts = self.samples[key] = [0] * (len(self.buckets) + 2)  # buckets, +Inf, sum
        counts[bisect.bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def render(self, out: list[str]) -> None:
        """The family in the text format 0.0.4: HELP and TYPE once, then its samples;
        histogram buckets cumulative, ``+Inf`` equal to ``_count``."""
        doc = self.doc.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {self.name} {doc}\n# TYPE {self.name} {self.kind}\n")
        for values, value in sorted(self.samples.items()):
            pairs = [f'{k}="{_label_value(v)}"' for k, v in zip(self.labels, values)]
            if self.kind != "histogram":
                out.append(f"{self.name}{_braces(pairs)} {_number(value)}\n")
                continue
            running = 0
            for bound, count in zip((*self.buckets, math.inf), value):
                running += count
                out.append(f'{self.name}_bucket{_braces([*pairs, f"le={chr(34)}{_number(bound)}{chr(34)}"])} '
                           f"{running}\n")
            out.append(f"{self.name}_sum{_braces(pairs)} {_number(value[-1])}\n"
                       f"{self.name}_count{_braces(pairs)} {running}\n")


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _braces(pairs: list[str]) -> str:
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


class Metrics:
    """This instance's metrics, for ``GET /metrics`` (Prometheus' text format 0.0.4).

    Written by hand, not with ``prometheus_client``: its registry is process-wide, and two
    nodechat instances in one process share nothing.  Labels are few-valued: never a user
    or conversation id.  Counting costs a dict update per request, turn or upstream call,
    nothing per streamed token."""

    def __init__(self):
        F = Family
        self.requests = F("nodechat_requests_total", "counter", "HTTP requests and WebSocket sessions, "
                          "by protocol and status.", ("protocol", "status"))
        self.durations = F("nodechat_request_duration_seconds", "histogram", "Seconds from a request "
                           "to the end of its response.", ("protocol",), DURATION_BUCKETS)
        self.streams = F("nodechat_active_streams", "gauge", "Streaming responses and WebSocket "
                         "sessions open now.", ("protocol",))
        self.turns = F("nodechat_active_turns", "gauge", "Agent turns running now.")
        self.turns.set((), 0)
        self.ttft = F("nodechat_time_to_first_token_seconds", "histogram", "Seconds from a turn's "
                      "request to its first streamed token.", ("protocol", "model"), TTFT_BUCKETS)
        self.tpot = F("nodechat_time_per_output_token_seconds", "histogram", "Seconds per output "
                      "token after the first, per upstream call.", ("model",), TPOT_BUCKETS)
        self.tokens = F("nodechat_tokens_total", "counter", "Tokens used, by model and type "
                        "(input, output, cached, reasoning); estimated: counted as characters / 4.",
                        ("model", "type", "estimated"))
        self.upstream = F("nodechat_upstream_requests_total", "counter", "Calls to upstream "
                          "providers, by provider and HTTP status (0: no answer).", ("provider", "status"))
        self.upstream_errors = F("nodechat_upstream_errors_total", "counter", "Failed upstream calls, "
                                 "by provider and kind.", ("provider", "kind"))
        self.tool_calls = F("nodechat_tool_calls_total", "counter", "Tool calls the agent ran, by "
                            "tool and outcome (ok, error).", ("tool", "outcome"))
        self.rejections = F("nodechat_limit_rejections_total", "counter", "Requests and model calls "
                            "refused by a limit: budget, rate, concurrency.", ("kind",))
        self.build = F("nodechat_build_info", "gauge", "The nodechat version serving.", ("version",))
        self.build.set((__version__,), 1)
        self.started = F("process_start_time_seconds", "gauge", "Start time of the process since "
                         "the Unix epoch, in seconds.")
        self.started.set((), PROCESS_STARTED)

    def families(self) -> list[Family]:
        return [value for value in vars(self).values() if isinstance(value, Family)]

    def render(self) -> str:
        out: list[str] = []
        for family in self.families():
            family.render(out)
        return "".join(out)

    def rejected(self, kind: str) -> None:
        self.rejections.inc((kind,))

    def used(self, call: Call, usage: Usage) -> None:
        """What an upstream call used, whether it answered or not (a refusal used nothing:
        no series for a model name no upstream knows)."""
        if not usage.total:
            return
        model, estimated = call.model, "true" if usage.estimated else "false"
        for kind, count in (("input", usage.input), ("output", usage.output),
                            ("cached", usage.cached), ("reasoning", usage.reasoning)):
            if count or kind in ("input", "output"):
                self.tokens.inc((model, kind, estimated), count)

    def answered(self, call: Call, usage: Usage) -> None:
        """An upstream call that answered whole: its pace."""
        self.upstream.inc((call.provider, "200"))
        if call.first_token is not None and usage.output > 1:
            self.tpot.observe((call.model,), (time.monotonic() - call.first_token) / (usage.output - 1))

    def failed(self, provider: str, err: BaseException) -> None:
        """An upstream call that failed (or was cut) before its answer was whole."""
        status = getattr(err, "code", None) or ""
        status = status[9:] if status.startswith("upstream_") and status[9:].isdigit() else "0"
        kind = ("timeout" if isinstance(err, UpstreamTimeout) else "status" if status != "0"
                else "cancelled" if isinstance(err, (asyncio.CancelledError, GeneratorExit))
                else "connection" if isinstance(err, UpstreamError) else "other")
        self.upstream.inc((provider, status))
        self.upstream_errors.inc((provider, kind))


###############################################################################
# Agent: the one loop behind every endpoint
###############################################################################


TITLE_PROMPT = ("Generate a very short title (max 5 words) for this chat based on the user's "
                "first message. Return ONLY the title, no quotes or punctuation.")
TITLE_MAX_TOKENS = 24  # a title is five words; a small model left alone wrote 1,378 tokens
TITLE_SECONDS = 30.0
MODEL_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name", "thinking_blocks", "reasoning",
                      "reasoning_content")


@dataclass
class Turn:
    """One request to the agent, already decoded from its protocol.

    ``messages`` is the history in OpenAI's shape, the new message(s) last.  With a
    ``conversation_id`` the agent continues the stored conversation and stores the turn.
    """

    messages: list[dict]
    user_id: str
    model: str | None = None
    tools: list[Tool] = field(default_factory=list)
    client_tools: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    conversation_id: str | None = None
    remember: bool = False
    system: str | None = None
    max_steps: int = 20
    regenerate: bool = False  # answer the last user message again, dropping its stored answer
    capped: bool = False  # counts against max_turns_per_user (end users' agent turns)
    message_id: str | None = None  # the answer's id, as its stream announced it: see Agent._save
    on_title: Callable[[str], Awaitable[None]] | None = None  # told the title once it is made
    protocol: str = "openai"  # for the ledger and metrics: openai, aisdk, seed, ws
    request_id: str = ""  # the x-request-id of the request that started it (logs)
    started: float = field(default_factory=time.monotonic)
    notice: str | None = None  # said with the answer's end (an image the model could not see)
    # what happened, for the turn's log line and metrics: filled in as it runs
    first_token: float | None = None
    usage: Usage = field(default_factory=Usage)
    outcome: str = "error"


def content_from_parts(parts: Iterable[Any]) -> str | list[dict]:
    """OpenAI message content from a message's parts (AI SDK ``text``/``file`` parts,
    NodeTool ``text``/``image_url`` parts): one string when they are all text."""
    content: list[dict] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            content.append({"type": "text", "text": part["text"]})
        elif kind == "file" and str(part.get("mediaType", "")).startswith("image/"):
            content.append({"type": "image_url", "image_url": {"url": str(part.get("url", ""))}})
        elif kind == "file" and str(part.get("url", "")).startswith("data:"):  # a PDF, a text file...
            content.append(file_part(str(part["url"]), str(part.get("filename") or "attachment")))
        elif kind == "image_url":
            image = part.get("image") or part.get("image_url") or {}
            url = image.get("uri") or image.get("url") if isinstance(image, dict) else image
            if url:
                content.append({"type": "image_url", "image_url": {"url": str(url)}})
    if all(p["type"] == "text" for p in content):
        return "".join(p["text"] for p in content)
    return content


def file_part(url: str, filename: str) -> dict:
    """A file (a ``data:`` URL) as OpenAI's chat content part for one."""
    return {"type": "file", "file": {"filename": filename[:200], "file_data": url}}


# a data: URL (a JSON value: after a colon, where text's own quotes, escaped, never are), Anthropic's base64
INLINE_ATTACHMENT = re.compile(r'(?:(?<=:)"data:[\w.+/-]*;base64,|"data":")([A-Za-z0-9+/=]*)"')


def check_messages(messages: list, settings: Settings) -> None:
    """PayloadTooLarge past the message count or a message's size."""
    if len(messages) > settings.max_messages:
        raise PayloadTooLarge(f"{len(messages)} messages; at most {settings.max_messages} are accepted",
                              code="too_many_messages")
    for index, message in enumerate(messages):
        content = message.get("content") or message.get("parts") if isinstance(message, dict) else message
        if isinstance(content, str):
            size = len(content)
        else:  # an image or file inline (base64) counts against max_attachment_bytes, not the text's limit
            encoded = compact_json(content)
            size = len(encoded)
            for attached in INLINE_ATTACHMENT.finditer(encoded):
                size -= len(attached.group(1))
                if len(attached.group(1)) * 3 // 4 > settings.max_attachment_bytes:
                    raise PayloadTooLarge(f"message {index} has an attachment of about "
                                          f"{len(attached.group(1)) * 3 // 4} bytes; at most "
                                          f"{settings.max_attachment_bytes} are accepted", code="attachment_too_large")
        if size > settings.max_message_chars:
            raise PayloadTooLarge(f"message {index} has {size} characters; at most "
                                  f"{settings.max_message_chars} are accepted", code="message_too_large")


class Agent:
    """Provider stream -> text and reasoning -> tool calls -> results -> next step.

    ``run`` is an async generator of events and the only code that calls providers and tools;
    each endpoint encodes its events.  Closing the generator closes the upstream request and
    cancels running tools.
    """

    def __init__(self, providers: ModelRouter, store: Store, http: Callable[[], httpx.AsyncClient],
                 settings: Settings, upstream: Callable[[], Any] | None = None,
                 ledger: Ledger | None = None):
        self.providers = providers
        self.store = store
        self.http = http  # for tools
        self.upstream = upstream or http  # for model calls
        self.settings = settings
        self.ledger = ledger or Ledger(settings, store, Metrics())
        self.metrics = self.ledger.metrics
        self.circuits = Circuits(settings.circuit_failures, settings.circuit_seconds)
        self.attachments = DataURLs(ATTACHMENT_CACHE_BYTES)  # stored images as the model reads them
        self.background: set[asyncio.Task] = set()  # titles being made; cancelled on close
        # a store that can append without waiting for the disk (ours: see open_conversation)
        try:
            takes_durable = "durable" in inspect.signature(store.append_messages).parameters
        except (TypeError, ValueError):  # a host's store whose method has no signature to read
            takes_durable = False
        self._question_commit = {"durable": False} if takes_durable else {}

    async def run(self, turn: Turn) -> AsyncIterator[Event]:
        candidates = self.providers.candidates(turn.model)
        model = candidates[0][1]
        self.metrics.turns.inc((), 1)
        try:
            history, created = turn.messages, None
            if turn.conversation_id:
                history, created = await self.open_conversation(turn)
            system = await self._system_prompt(turn, history)
            messages = [{"role": "system", "content": system}] if system else []
            messages += [model_message(m) for m in history]
            if turn.conversation_id:
                messages = await self._show_attachments(messages, turn.user_id)
            if self._blind(turn.capped, candidates[0][2]):
                messages, turn.notice = without_images(messages, candidates[0][2])
            async with contextlib.aclosing(self._steps(turn, candidates, messages)) as steps:
                async for event in steps:  # closed with run(): a partial answer is saved then
                    yield event
            if created:  # after the answer, never holding its stream, never competing with it
                spawn(self.background, self._make_title(turn, _first_user_text(history), created))
        except (asyncio.CancelledError, GeneratorExit):
            turn.outcome = "stopped"
            raise
        finally:
            self.metrics.turns.inc((), -1)
            if turn.first_token is not None:
                self.metrics.ttft.observe((turn.protocol, model_label(model)), turn.first_token - turn.started)
            if self.settings.log_format == "json":
                log.info("turn", extra={"fields": turn_record(turn, model)})

    async def _make_title(self, turn: Turn, text: str, created_at: str) -> None:
        title = await self.title(text, turn.model, turn=turn)
        try:
            meta = await self.store.get_conversation(turn.conversation_id)
            if not meta or meta.get("user_id") != turn.user_id or meta.get("created_at") != created_at:
                return  # deleted meanwhile (and perhaps the id taken again): not this title's
            await self.store.update_conversation(turn.conversation_id, title=title)
        except NodeChatError as exc:  # deleted or damaged meanwhile: no title to keep
            log.warning("cannot store the title of %s: %s", turn.conversation_id, exc.message)
            return
        if turn.on_title is not None:
            await turn.on_title(title)

    async def open_conversation(self, turn: Turn) -> tuple[list[dict], str | None]:
        """Load (or create) the conversation and store the turn's new messages.

        The client may send only its new message or the whole history: what is already
        stored (everything up to the last assistant message, or a known message id) is
        not stored twice.  Another user's conversation is refused, never adopted.
        """
        cid = turn.conversation_id
        meta = await self.store.get_conversation(cid)
        created = meta is None
        if created:
            meta = await self.store.create_conversation(
                cid, turn.user_id, fallback_title(_first_user_text(turn.messages)))
        require_owner(meta, turn.user_id)
        stored = [] if created else await self.store.load_messages(cid)
        if turn.regenerate:
            stored = await self._drop_answer(cid, stored, turn.messages)
        last = turn.messages[-1] if turn.messages else {}
        asked = last.get("ui_id") if last.get("role") == "user" else None
        at = next((i for i, m in enumerate(stored) if asked and m.get("ui_id") == asked), None)
        if at is not None and any(m.get("role") == "assistant" for m in stored[at + 1:]):
            raise Conflict("this message was already answered; regenerate it for a new answer",
                           code="already_answered")
        try:
            kept = await self._keep_attachments(unstored_messages(stored, turn.messages), turn.user_id)
            # the question is durable with its answer (the same file's, the same WAL's flush)
            saved = await self.store.append_messages(cid, kept, **self._question_commit)
        except NodeChatError:
            if created:  # refused, or the store failed, before its first message: no empty conversation
                with contextlib.suppress(NodeChatError):
                    await self.store.delete_conversation(cid)
            raise
        if asked and at is None and all(m.get("ui_id") != asked for m in saved):
            raise Conflict("this message is already being answered", code="already_answered")
        return stored + saved, meta["created_at"] if created else None

    async def _keep_attachments(self, messages: list[dict], user_id: str) -> list[dict]:
        """Messages as they are stored: each inline image (a ``data:`` URL) put in the store
        once, by its content, and named by a ``nodechat-blob:`` URL, so a conversation's
        message file does not grow by the image every time it is sent."""
        if not hasattr(self.store, "put_blob"):  # a host's store without attachments: kept inline
            return messages
        kept, blobs = [], {}  # every part checked before any is kept: a refused turn keeps nothing
        for message in messages:
            content = message.get("content")
            if type(content) is list and any(attachment_url(p) for p in content):
                parts = []
                for part in content:
                    url = attachment_url(part)
                    if url.startswith(BLOB_URL):
                        raise BadRequest("an image's url must be a data: or http(s) URL", code="invalid_messages")
                    if url.startswith("data:") and ";base64," in url:
                        media, _, payload = url[5:].partition(";base64,")
                        try:
                            data = base64.b64decode(payload, validate=True)
                        except ValueError:
                            raise BadRequest("an image's data: URL is not valid base64", code="invalid_messages") from None
                        digest = hashlib.sha256(data).hexdigest()
                        blobs[digest] = data
                        self.attachments.put(f"{media};{digest}", url)
                        part = with_attachment_url(part, f"{BLOB_URL}{media};sha256,{digest}")
                    parts.append(part)
                message = {**message, "content": parts}
            kept.append(message)
        for digest, data in blobs.items():
            await self.store.put_blob(user_id, digest, data)
        return kept

    async def _show_attachments(self, messages: list[dict], user_id: str) -> list[dict]:
        """Stored messages as the model reads them: each ``nodechat-blob:`` image a ``data:``
        URL again, read from the store once and then kept in memory (a turn never reads or
        encodes the same image again)."""
        shown = []
        for message in messages:
            content = message.get("content")
            if type(content) is list and any(attachment_url(p).startswith(BLOB_URL) for p in content):
                parts = []
                for part in content:
                    url = attachment_url(part)
                    if url.startswith(BLOB_URL):
                        media, _, digest = url[len(BLOB_URL):].partition(";sha256,")
                        inline = self.attachments.get(f"{media};{digest}")
                        if inline is None:
                            data = await self.store.get_blob(user_id, digest, named=True) \
                                if BLOB_DIGEST.fullmatch(digest) else None
                            if data is None:  # gone: the model is told, rather than the turn failing
                                parts.append({"type": "text", "text": "[an attachment that is no longer stored]"})
                                continue
                            inline = f"data:{media};base64,{base64.b64encode(data).decode()}"
                            self.attachments.put(f"{media};{digest}", inline)
                        part = with_attachment_url(part, inline)
                    parts.append(part)
                message = {**message, "content": parts}
            shown.append(message)
        return shown

    async def _drop_answer(self, cid: str, stored: list[dict], incoming: list[dict]) -> list[dict]:
        """Forget the stored answer (and its tool messages) to the message being regenerated:
        the incoming last user message, else the last stored one."""
        asked = next((m.get("ui_id") for m in reversed(incoming) if m.get("role") == "user"), None)
        users = [i for i, m in enumerate(stored) if m.get("role") == "user"]
        at = next((i for i in reversed(users) if asked and stored[i].get("ui_id") == asked),
                  users[-1] if users else None)
        if at is None or at == len(stored) - 1:
            return stored
        await self.store.truncate_messages(cid, stored[at]["id"])
        return stored[:at + 1]

    async def complete(self, messages: list[dict], model: str | None = None, *, turn: Turn,
                       **params: Any) -> str:
        """One model call without tools, its text only (titles, workflows), on ``turn``'s
        user's ledger and budget."""
        candidates = self.providers.candidates(model)
        provider, name, _ = candidates[0]
        body = {**params, "model": name, "messages": messages}
        call = model_call(turn, provider, name)
        await self.ledger.hold(call, body)
        parts, usage = [], None
        def take(event: Event) -> None:
            nonlocal usage
            if type(event) is TextDelta:
                parts.append(event.text)
            elif type(event) is StepFinished:
                usage = reported(event)

        try:
            stream, first = await self._open(call, candidates, body)
            async with contextlib.aclosing(stream):
                for event in first:
                    take(event)
                async for event in stream:
                    take(event)
        except BaseException as exc:
            await asyncio.shield(self.ledger.record(
                call, call_usage(body, parts, 0, []) if read_by_model(exc, parts) else Usage()))
            raise
        usage = usage or call_usage(body, parts, 0, [])
        self.metrics.answered(call, usage)
        await self.ledger.record(call, usage)
        return "".join(parts)

    async def title(self, text: str, model: str | None = None, *, turn: Turn) -> str:
        """A title of at most five words for a chat that starts with ``text`` (one extra model
        call per new conversation); the message itself when the model fails."""
        try:
            answer = await asyncio.wait_for(self.complete(
                [{"role": "system", "content": TITLE_PROMPT}, {"role": "user", "content": text[:500]}],
                model, turn=turn, max_tokens=TITLE_MAX_TOKENS), timeout=TITLE_SECONDS)
        except NodeChatError as exc:
            log.warning("title generation failed, using the message itself: %s", exc.message)
            answer = ""
        except asyncio.TimeoutError:
            log.warning("title generation took over %g s, using the message itself", TITLE_SECONDS)
            answer = ""
        return fallback_title(answer) if answer.strip() else fallback_title(text)

    def _blind(self, capped: bool, model: str) -> bool:
        """An end user's turn (``capped``) on a model that ``vision_models`` says sees no images."""
        return capped and not any(fnmatch.fnmatchcase(model, p) for p in self.settings.vision_models)

    async def _open(self, call: Call, candidates: list[tuple[Provider, str, str]], body: dict,
                    turn: Turn | None = None) -> tuple[AsyncIterator[Event], list[Event]]:
        """Start one model call: the model asked for, else its fallbacks in order, until one
        answers; its stream, and the events it began with (a Fallback first, when it fell back).

        A provider that failed before its answer began (no connection, 408, 409, 429, 5xx) is
        tried once more first, after its ``Retry-After`` when that is at most
        ``max_retry_wait`` (longer: the next model); one that timed out goes straight to the
        next model, since a second try would wait as long again.  Once any of the answer has come, an
        error is the caller's to see.  A provider that keeps failing is skipped a while
        (``Circuits``); the last one left is not skipped but refused at once.  ``call`` says
        which provider answered, for the ledger.

        It hands the provider's own stream on rather than yielding from it: a generator in
        between cost every event a hop (0.2 µs of the 7 a /v1 event costs).  A fallback that sees
        no images where the model asked for does (``vision_models``) reads that one was there,
        and ``turn`` gets the notice that says so."""
        failure: NodeChatError | None = None
        for index, (provider, name, full) in enumerate(candidates):
            if not self.circuits.allows(provider.name):
                if index < len(candidates) - 1:
                    continue
                wait = max(1, math.ceil(self.circuits.reopens_in(provider.name)))  # never 0: a trial may be under way
                raise failure or UpstreamError(
                    f"provider {getattr(provider, 'label', provider.name)} failed {self.settings.circuit_failures} "
                    f"times in a row; it is tried again in {wait} s",
                    code="upstream_unavailable", status=503, retry_after=str(wait))
            if index:
                call.provider, call.url, call.model = (provider.name, getattr(provider, "base_url", provider.name),
                                                       model_label(name))
            request = {**body, "model": name}
            if index and turn is not None and self._blind(turn.capped, full):
                request["messages"], notice = without_images(body["messages"], full)
                turn.notice = turn.notice or notice
            for attempt in (0, 1):
                stream = provider.stream(request, self.upstream())
                try:
                    first = [await anext(stream)]
                except StopAsyncIteration:
                    first = []
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await stream.aclose()
                    self.metrics.failed(provider.name, exc)
                    if not isinstance(exc, NodeChatError) or not worth_another_try(exc):
                        if upstream_status(exc) is not None:  # it answered (the caller's 4xx): it is up
                            self.circuits.succeeded(provider.name)
                        else:  # stopped, or a malformed answer: a trial it was, if any, is over untold
                            self.circuits.abandoned(provider.name)
                        raise
                    self.circuits.failed(provider.name)
                    failure = exc
                    wait = retry_after_seconds(exc.retry_after) or 0.0
                    if attempt or wait > self.settings.max_retry_wait or not self.circuits.allows(provider.name) \
                            or isinstance(exc, UpstreamTimeout):  # a stalled provider: not a second wait as long
                        break
                    log.info("provider %s failed (%s); trying it once more in %g s", provider.name, exc.message, wait)
                    await asyncio.sleep(wait)
                    continue
                self.circuits.succeeded(provider.name)
                if index:
                    first.insert(0, Fallback(full, failure.message if failure else
                                             f"{candidates[0][2]} is skipped: it failed again and again"))
                return stream, first
            if index < len(candidates) - 1:
                log.warning("model %s failed (%s); falling back to %s", full, failure.message, candidates[index + 1][2])
        raise failure

    async def _steps(self, turn: Turn, candidates: list[tuple[Provider, str, str]],
                     messages: list[dict]) -> AsyncIterator[Event]:
        answering = candidates[0][1]  # the model that answers: another when it falls back
        by_name = {t.name: t for t in turn.tools}
        client_names = {spec.get("function", {}).get("name") for spec in turn.client_tools}
        schemas = [t.schema() for t in turn.tools] + list(turn.client_tools)
        context = ToolContext(turn.user_id, turn.conversation_id, self.store, self.http)
        text, stopped, cut = [], False, None
        try:
            cache_key = turn.conversation_id and hashlib.sha256(
                f"{turn.user_id}\0{turn.conversation_id}".encode()).hexdigest()[:32]
            for number in range(turn.max_steps):
                provider, model, _ = candidates[0]
                body = {**turn.params, "model": model, "messages": messages}
                if cache_key:  # a conversation: its requests share their prefix (see openai_request)
                    body["nodechat_cache_key"] = cache_key
                if schemas:
                    body["tools"] = schemas
                call = model_call(turn, provider, model)
                try:
                    await self.ledger.hold(call, body)
                except BudgetExceeded as exc:  # spent between two steps: the turn ends here
                    if not number:
                        raise
                    turn.outcome = "budget"
                    yield Finished("budget", turn.usage, answering, exc.message)
                    return
                calls, finish, reasoning = [], StepFinished("stop"), 0
                thought, signed, reasoned = [], [], []  # reasoning pieces: since the last signature, signed, all
                try:
                    stream, pending = await self._open(call, candidates, body, turn)  # its failures: counted there
                except BaseException:
                    await asyncio.shield(self.ledger.record(call, Usage()))
                    raise
                try:
                    async with contextlib.aclosing(stream):
                        following = stream.__anext__
                        while True:
                            if pending:
                                event = pending.pop(0)
                            else:
                                try:
                                    event = await following()
                                except StopAsyncIteration:
                                    break
                            kind = type(event)
                            if kind is TextDelta:
                                text.append(event.text)
                                if call.first_token is None:
                                    call.first_token = time.monotonic()
                            elif kind is ToolCall:
                                calls.append(event)
                                continue
                            elif kind is StepFinished:
                                finish = event
                                continue
                            elif kind is ReasoningDelta:
                                reasoning += len(event.text)
                                thought.append(event.text)
                                reasoned.append(event.text)
                                if event.signature:  # Anthropic's: sent back with this step's tool calls
                                    signed.append({"type": "thinking", "thinking": "".join(thought),
                                                   "signature": event.signature})
                                    thought = []
                                elif event.redacted:
                                    signed.append({"type": "redacted_thinking", "data": event.redacted})
                                if call.first_token is None:
                                    call.first_token = time.monotonic()
                            elif kind is Fallback:  # the turn's next steps start where this one answered
                                answering = event.model
                                candidates = candidates[[c[2] for c in candidates].index(event.model):]
                            yield event
                except BaseException as exc:  # failed or cut: what it used, estimated
                    self.metrics.failed(call.provider, exc)
                    if isinstance(exc, NodeChatError) and worth_another_try(exc):
                        self.circuits.failed(call.provider)
                    cut = call_usage(body, text, reasoning, calls) if read_by_model(exc, text or reasoning or calls) \
                        else Usage()
                    await asyncio.shield(self.ledger.record(call, cut))
                    raise
                step_usage = reported(finish) or call_usage(body, text, reasoning, calls)
                self.metrics.answered(call, step_usage)
                await asyncio.shield(self.ledger.record(call, step_usage))  # a stop now: counted all the same
                turn.usage += step_usage
                if turn.first_token is None:
                    turn.first_token = call.first_token
                if any(c.name in client_names for c in calls):
                    for call_ in calls:
                        if call_.name in client_names:
                            yield dataclasses.replace(call_, client_side=True)
                    yield StepFinished("tool_calls", step_usage)
                    turn.outcome = "tool_calls"
                    yield Finished("tool_calls", turn.usage, answering, turn.notice)
                    return
                step = [assistant_message("".join(text), calls, step_usage, signed, "".join(reasoned))]
                text = []
                for call_ in calls:
                    yield call_
                results = {}
                async for event in self._run_tools(calls, by_name, context):
                    if type(event) is ToolResult:
                        results[event.id] = event
                    yield event
                step += [tool_message(results[c.id], by_name.get(c.name),  # in call order
                                      self.settings.max_tool_result_chars)
                         for c in calls if c.id in results]
                messages.extend(model_message(m) for m in step)
                for saved in await self._save(turn, step):
                    yield Saved(saved)
                yield StepFinished(finish.reason, step_usage)
                if not calls:
                    turn.outcome = finish.reason
                    yield Finished(finish.reason, turn.usage, answering, turn.notice)
                    return
            turn.outcome = "max_steps"
            yield Finished("max_steps", turn.usage, answering, turn.notice)
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, or closed by its reader
            stopped = True
            raise
        finally:
            if text:  # stopped or failed mid-answer: keep what was said (unless it was deleted)
                partial = assistant_message("".join(text), [], cut)
                if stopped:
                    partial["stopped"] = True
                with contextlib.suppress(NotFound):
                    await asyncio.shield(self._save(turn, [partial]))

    async def _run_tools(self, calls: list[ToolCall], by_name: dict[str, Tool],
                         context: ToolContext) -> AsyncIterator[Event]:
        """Run one step's calls concurrently; results as they finish.
        Past ``max_tool_calls_per_step`` a call is not run: the model reads why."""
        limit = self.settings.max_tool_calls_per_step
        for call in calls[limit:]:
            yield ToolResult(call.id, call.name, f"not run: at most {limit} tool calls run in one step",
                             is_error=True)
        pending = {asyncio.create_task(self._call(call, by_name.get(call.name), context))
                   for call in calls[:limit]}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()

    async def _call(self, call: ToolCall, item: Tool | None, context: ToolContext) -> ToolResult:
        result = await self._result(call, item, context)
        self.metrics.tool_calls.inc((call.name if item is not None else "_unknown",
                                     "error" if result.is_error else "ok"))
        return result

    async def _result(self, call: ToolCall, item: Tool | None, context: ToolContext) -> ToolResult:
        if item is None:
            return ToolResult(call.id, call.name, f"unknown tool {call.name!r}", is_error=True)
        args = call.args
        if not isinstance(args, dict):
            return ToolResult(call.id, call.name, "arguments are not a JSON object", is_error=True)
        try:
            result = await item(args, dataclasses.replace(context, call_id=call.id))
            return ToolResult(call.id, call.name, jsonable(result))
        except Exception as exc:  # a tool's failure goes back to the model, never kills the turn
            log.info("tool %s raised %s: %s", call.name, type(exc).__name__, exc)
            return ToolResult(call.id, call.name, f"{type(exc).__name__}: {exc}", is_error=True)

    async def _save(self, turn: Turn, messages: list[dict]) -> list[dict]:
        """Store a step's messages.  With the turn's ``message_id`` (the id its stream
        announced: one UI message for the whole answer) each carries it as ``answer_id``.
        Not as ``ui_id``: a message with one costs the JSON store a read of the conversation
        to skip a resend, and a resent answer is skipped anyway (``unstored_messages``)."""
        if not turn.conversation_id:
            return []
        if turn.message_id:
            messages = [{**m, "answer_id": turn.message_id} for m in messages]
        return await self.store.append_messages(turn.conversation_id, messages)

    async def _system_prompt(self, turn: Turn, history: list[dict]) -> str | None:
        """The system prompt and what the model remembers of the user.  The memories are
        the ones the conversation's first message finds (then the newest), not the newest
        message's: the prompt then stays the same turn after turn until a memory changes,
        and a provider's prompt cache keeps the whole conversation (searched per message, it
        missed from the first byte on most turns)."""
        system = turn.system
        if turn.remember:
            query = _first_user_text(history)
            limit = self.settings.memory_context_limit
            remembered = await self.store.list_memories(turn.user_id)  # one call for a user with none
            found = await self.store.search_memories(turn.user_id, query, limit) if remembered else []
            if len(found) < limit:  # top up with the newest memories
                known = {m["id"] for m in found}
                found += [m for m in reversed(remembered) if m["id"] not in known][:limit - len(found)]
            if found:
                lines = "\n".join(f"- {m['content']} (memory id {m['id']})" for m in found)
                system = f"{system or ''}\n\nWhat you remember about this user:\n{lines}".strip()
        return system


def unstored_messages(stored: list[dict], incoming: list[dict]) -> list[dict]:
    """The messages of ``incoming`` that ``stored`` does not hold yet."""
    if not stored:
        return list(incoming)
    last_assistant = max((i for i, m in enumerate(incoming) if m.get("role") == "assistant"),
                         default=-1)
    known_ids = {m.get("ui_id") for m in stored if m.get("ui_id")}
    return [m for m in incoming[last_assistant + 1:] if not m.get("ui_id") or m["ui_id"] not in known_ids]


BLOB_URL = "nodechat-blob:"  # an image in a stored message: nodechat-blob:<media type>;sha256,<hex>
ATTACHMENT_CACHE_BYTES = 64 * 1024 * 1024  # stored images kept as data: URLs per app


def without_images(messages: list[dict], model: str) -> tuple[list[dict], str | None]:
    """The messages a text-only model reads: each image a line saying one was there; and
    the notice for the user (None when there was no image)."""
    left_out = 0
    read = []
    for message in messages:
        content = message.get("content")
        if type(content) is list and any(p.get("type") == "image_url" for p in content if type(p) is dict):
            left_out += sum(1 for p in content if type(p) is dict and p.get("type") == "image_url")
            message = {**message, "content": [{"type": "text", "text": "[an image the model cannot see]"}
                                              if type(p) is dict and p.get("type") == "image_url" else p
                                              for p in content]}
        read.append(message)
    if not left_out:
        return messages, None
    return read, (f"{model} cannot see images: {left_out} image{'s were' if left_out > 1 else ' was'} left out "
                  "of what it read")


def attachment_url(part: Any) -> str:
    """The URL of an ``image_url`` or ``file`` content part ("" for any other part)."""
    if type(part) is dict:
        holder, key = ATTACHMENT_KEYS.get(part.get("type"), (None, None))
        inner = part.get(holder) if holder else None
        if type(inner) is dict and type(inner.get(key)) is str:
            return inner[key]
    return ""


def with_attachment_url(part: dict, url: str) -> dict:
    holder, key = ATTACHMENT_KEYS[part["type"]]
    return {**part, holder: {**part[holder], key: url}}


ATTACHMENT_KEYS = types.MappingProxyType({"image_url": ("image_url", "url"), "file": ("file", "file_data")})


class DataURLs:
    """Stored images as ``data:`` URLs, the most recently used first, at most ``limit``
    bytes of them (an LRU by size, not by count: one image may be megabytes)."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._urls: collections.OrderedDict[str, str] = collections.OrderedDict()

    def get(self, digest: str) -> str | None:
        url = self._urls.get(digest)
        if url is not None:
            self._urls.move_to_end(digest)
        return url

    def put(self, digest: str, url: str) -> None:
        if digest in self._urls or len(url) > self.limit:
            return
        self._urls[digest] = url
        self.size += len(url)
        while self.size > self.limit:
            self.size -= len(self._urls.popitem(last=False)[1])


def model_message(message: dict) -> dict:
    return {k: message[k] for k in MODEL_MESSAGE_KEYS if k in message}


def assistant_message(text: str, calls: list[ToolCall], usage: Usage | None = None,
                      thinking: list[dict] | None = None, reasoning: str = "") -> dict:
    """The stored (and replayed) assistant message of one step; ``usage`` is kept with it,
    the model's ``reasoning``, and Anthropic's signed ``thinking`` blocks.  Which of them go
    back to a model is the provider's to say (``openai_request``, ``messages_request``)."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if reasoning:
        message["reasoning"] = reasoning
    if thinking:
        message["thinking_blocks"] = thinking
    if calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
    if usage is not None:
        message["usage"] = usage.record()
    return message


def model_call(turn: Turn, provider: Provider, model: str) -> Call:
    """The ledger's record of one call of ``provider`` for ``turn``."""
    return Call(turn.user_id, turn.conversation_id, turn.protocol, provider.name,
                getattr(provider, "base_url", provider.name), model_label(model))


def model_label(model: str) -> str:
    """A model name as the ledger and metrics keep it: a client chooses it, so it is cut
    short and loses NUL (which PostgreSQL's text refuses)."""
    return model[:MAX_LABEL_CHARS].replace("\x00", "")


def read_by_model(exc: BaseException, answered: Any) -> bool:
    """Whether a call that failed with ``exc`` cost tokens: it answered something, or it was
    cut while the model worked (a stop, a timeout: hidden reasoning is billed too), rather
    than refused (an HTTP error, no connection)."""
    return bool(answered) or isinstance(exc, (asyncio.CancelledError, GeneratorExit, UpstreamTimeout))


def reported(finish: StepFinished) -> Usage | None:
    """What the provider said a call used (a host's provider may say it in OpenAI's shape)."""
    return Usage.from_openai(finish.usage) if type(finish.usage) is dict else finish.usage


def call_usage(body: dict, text: list[str], reasoning: int, calls: list[ToolCall]) -> Usage:
    """A model call's usage when the upstream did not say: characters / 4."""
    return Usage.estimate(estimate_input(body), sum(map(len, text)) + reasoning +
                          sum(len(c.arguments) + len(c.name) for c in calls))


def turn_record(turn: Turn, model: str) -> dict:
    """A turn's log line (``log_format = "json"``): never the user id itself, a hash of it."""
    ended = time.monotonic()
    return {"request_id": turn.request_id, "protocol": turn.protocol, "model": model,
            "user": hashlib.sha256(turn.user_id.encode()).hexdigest()[:16],
            "conversation": turn.conversation_id, "outcome": turn.outcome,
            "input_tokens": turn.usage.input, "output_tokens": turn.usage.output,
            "estimated": turn.usage.estimated,
            "ttft_ms": None if turn.first_token is None else round((turn.first_token - turn.started) * 1000, 1),
            "duration_ms": round((ended - turn.started) * 1000, 1)}


def tool_message(result: ToolResult, item: Tool | None = None, limit: int | None = None) -> dict:
    """The ``tool`` message the model reads; past ``limit`` characters it is cut, saying so."""
    if item is not None and item.render is not None and not result.is_error:
        content = item.render(result.result)
    else:
        content = result.result if isinstance(result.result, str) else compact_json(result.result)
    if limit is not None and len(content) > limit:
        content = content[:limit] + f"\n[truncated: {len(content) - limit} more characters]"
    return {"role": "tool", "tool_call_id": result.id, "name": result.name,
            "content": f"Error: {content}" if result.is_error else content}


def jsonable(value: Any) -> Any:
    """``value`` if JSON can carry it (bytes go as base64), else its ``str()``."""
    try:
        compact_json(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def fallback_title(text: str) -> str:
    words = re.sub(r"[\"'`*#_.!?:;,]+", " ", text).split()
    return " ".join(words[:5])[:80] or "New Chat"


def _first_user_text(messages: list[dict]) -> str:
    return next((message_text(m) for m in messages if m.get("role") == "user"), "")


###############################################################################
# Workflows: named jobs started by a message's workflow_id
###############################################################################


TERMINAL_JOB_STATUSES = frozenset({"completed", "failed", "cancelled"})


class WorkflowError(Exception):
    """Raise from a workflow to fail its job with this message."""


@dataclass
class Job:
    """What a running workflow gets: who and where, and ways to report, stream and ask.

    ``progress()`` and ``text()`` reach the client as ``job_update`` and ``chunk`` messages;
    ``complete()`` calls the model; ``tool()`` runs a registered tool.
    """

    job_id: str
    workflow_id: str
    user_id: str
    thread_id: str | None
    agent: Agent
    tools: ToolRegistry
    _events: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)

    def progress(self, progress: float, message: str | None = None) -> None:
        self._events.put_nowait(JobUpdate(self.job_id, self.workflow_id, "running",
                                          progress=progress, message=message))

    def text(self, text: str) -> None:
        self._events.put_nowait(TextDelta(text))

    async def complete(self, messages: list[dict] | str, model: str | None = None) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        turn = Turn([], self.user_id, conversation_id=self.thread_id, protocol="ws")
        return await self.agent.complete(messages, model, turn=turn)

    async def tool(self, name: str, args: dict | None = None) -> Any:
        context = ToolContext(self.user_id, self.thread_id, self.agent.store, self.agent.http)
        return await self.tools[name](args or {}, context)


@dataclass
class Workflow:
    """A named async function (returns the result) or async generator (yields text or
    progress dicts; the text is the result), called as ``fn(message, history, job)``."""

    name: str
    fn: Callable[..., Any]
    description: str = ""


class WorkflowRegistry:
    """Workflows by name; ``run()`` turns one into a job's events."""

    def __init__(self):
        self._workflows: dict[str, Workflow] = {}

    def add(self, name: str, fn: Callable, description: str = "") -> Workflow:
        workflow = Workflow(name, fn, description or (inspect.getdoc(fn) or "").split("\n")[0])
        self._workflows[name] = workflow
        return workflow

    def __contains__(self, name: object) -> bool:
        return name in self._workflows

    def __getitem__(self, name: str) -> Workflow:
        return self._workflows[name]

    def __iter__(self):
        return iter(list(self._workflows.values()))

    async def run_job(self, workflow_id: str, turn: Turn, agent: Agent, tools: ToolRegistry) -> AsyncIterator[Event]:
        """A workflow started by a chat message: the message stored in its conversation, the
        job's updates, then (on success only) the final message, stored."""
        if workflow_id not in self._workflows:
            raise NotFound(f"workflow {workflow_id!r} not found", code="workflow_not_found")
        history, _ = await agent.open_conversation(turn)
        job = Job(new_id("job"), workflow_id, turn.user_id, turn.conversation_id, agent, tools)
        outcome = None
        async for event in self.run(workflow_id, history[-1], history, job):
            if type(event) is JobUpdate and event.status in TERMINAL_JOB_STATUSES:
                outcome = event
            yield event
        if outcome is not None and outcome.status == "completed":
            result = outcome.result
            content = result if isinstance(result, str) else compact_json(result)
            final = {"role": "assistant", "content": content, "workflow_id": workflow_id, "job_id": job.job_id}
            for saved in await agent.store.append_messages(turn.conversation_id, [final]):
                yield Saved(saved)

    async def run(self, name: str, message: dict, history: list[dict], job: Job) -> AsyncIterator[Event]:
        """``running``, progress and text, then exactly one ``completed``, ``failed`` or
        ``cancelled`` update; a failure is never reported as success."""
        if name not in self._workflows:
            raise NotFound(f"workflow {name!r} not found", code="workflow_not_found")
        started = time.monotonic()
        yield JobUpdate(job.job_id, name, "running")
        task = asyncio.create_task(self._call(self._workflows[name], message, history, job))
        try:
            while not task.done():
                getter = asyncio.ensure_future(job._events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not job._events.empty():
                yield job._events.get_nowait()
            result = task.result()
        except asyncio.CancelledError:
            task.cancel()
            yield JobUpdate(job.job_id, name, "cancelled")
            raise
        except Exception as exc:
            log.info("workflow %s failed: %s: %s", name, type(exc).__name__, exc)
            yield JobUpdate(job.job_id, name, "failed", error=f"{type(exc).__name__}: {exc}"[:1000])
            return
        seconds = time.monotonic() - started
        yield JobUpdate(job.job_id, name, "completed", result=jsonable(result),
                        message=f"Workflow {name} completed in {seconds:.2f} seconds")

    @staticmethod
    async def _call(workflow: Workflow, message: dict, history: list[dict], job: Job) -> Any:
        outcome = workflow.fn(message, history, job)
        if inspect.isasyncgen(outcome):
            parts = []
            async for item in outcome:
                if isinstance(item, str):
                    parts.append(item)
                    job.text(item)
                elif isinstance(item, dict):
                    job.progress(item.get("progress", 0), item.get("message"))
            return "".join(parts)
        return await outcome if inspect.isawaitable(outcome) else outcome


def workflow_tool(workflow: Workflow, registry: WorkflowRegistry, agent: Agent,
                  tools: ToolRegistry) -> Tool:
    """Offer a workflow to the model as a tool taking one ``input`` string."""
    async def run(input: str, context: ToolContext) -> Any:
        job = Job(new_id("job"), workflow.name, context.user_id, context.conversation_id, agent, tools)
        result = None
        async for event in registry.run(workflow.name, {"role": "user", "content": input}, [], job):
            if type(event) is JobUpdate and event.status == "completed":
                result = event.result
            elif type(event) is JobUpdate and event.status == "failed":
                raise WorkflowError(event.error)
        return result

    return Tool(workflow.name, workflow.description or f"Run the {workflow.name} workflow",
                {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]},
                run, context_param="context")


async def run_turn(chat: NodeChat, turn: Turn, workflow_id: str | None = None) -> AsyncIterator[Event]:
    """What every protocol runs for a turn: the agent, or the workflow a ``/chat`` message
    names, once the app's :class:`Turns` admits it.

    The gate is checked on the first event, so an SSE response still gets a proper error."""
    admitted = await chat.turns.enter(turn)
    events = chat.workflows.run_job(workflow_id, turn, chat.agent, chat.tools) if workflow_id is not None \
        else chat.agent.run(turn)
    try:
        async for event in events:
            yield event
    finally:
        try:
            await events.aclose()  # a stopped answer is saved before the conversation is free again
        finally:
            await chat.turns.leave(admitted)


###############################################################################
# Turns: who may start one, and streams that outlive their connection
###############################################################################


STOP_WAIT_SECONDS = 10.0  # a stop waits this long for the turn to have saved its partial answer
SINK_STALL_SECONDS = 2.0  # a write of the turn's to its POST's client may wait this long (see lend)
REPLAY_SLICE_BYTES = 256 * 1024  # what a reader catching up writes at once
MAX_READERS_PER_TURN = 32  # GET .../stream readers of one turn at once (204 beyond)


class TurnStream:
    """The bytes a running turn's encoder wrote, from its first, for every reader.

    The turn's own task ``push``es; each reader (the ``POST`` that started the turn, each
    ``GET /api/chat/{id}/stream``) reads from where it is and waits for more, so several
    read one turn at once and one that leaves costs the others nothing.  Past ``limit``
    bytes the stream is ``full``: no new reader is let in, what every reader has passed is
    let go, and a reader more than ``limit`` bytes behind is cut off.
    """

    def __init__(self, stream_id: str, ui: bool, limit: int, orphaned: bytes = b""):
        self.id = stream_id  # the answer's message id (the UI stream's start.messageId)
        self.ui = ui  # AI SDK UI stream, else the seed's events
        self.limit = limit
        self.orphaned = orphaned  # what a reader elsewhere is told if the turn's process dies
        self.chunks: list[bytes] = []
        self.first = 0  # how many chunks before chunks[0] were let go (once full)
        self.end = 0  # how many chunks were pushed
        self.size = 0  # bytes pushed
        self.held = 0  # bytes still in chunks
        self.full = False
        self.complete = False  # every byte is in (what PostgresTurns writes last)
        self.done = False  # ... and the turn has let go of its conversation: readers end here
        self.failure: NodeChatError | None = None  # the turn failed before its first byte
        self.failure_frames = b""  # ... and what a reader other than its POST is told
        self.readers: dict[object, int] = {}  # reader -> the next chunk it reads
        self.cut: set[object] = set()  # readers left too far behind, once full
        self.task: asyncio.Task | None = None  # the turn, for a stop
        self.started = False  # the task has begun: a stop before then is seen when it does
        self.stopping = False
        self.unsticking = False  # lend() is freeing the task from a stalled write
        self.sink: Any = None  # the POST's reader while it keeps up: see deliver()
        self._handback: asyncio.Future | None = None
        self._waiters: list[asyncio.Future] = []

    def push(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.end += 1
            self.size += len(data)
            self.held += len(data)
            if self.size > self.limit:
                self.full = True
                self._let_go()
        if self._waiters:
            self._wake()

    def _let_go(self) -> None:
        """Drop what every reader has passed; while more than ``limit`` bytes are still
        held, cut off the reader furthest behind (a client that stopped reading)."""
        while True:
            low = min(self.readers.values(), default=self.end)
            self.held -= sum(map(len, self.chunks[:low - self.first]))
            del self.chunks[:low - self.first]
            self.first = low
            if self.held <= self.limit or not self.readers:
                return
            laggard = min(self.readers, key=self.readers.__getitem__)
            del self.readers[laggard]
            self.cut.add(laggard)
            self._wake()

    async def deliver(self, data: bytes) -> None:
        """``push``, then write to the ``sink`` what it has not had yet, from the turn's own
        task.  The reader that keeps up (the POST, nearly always) then costs no task switch
        of its own per upstream read: that switch was a sixth of the cost of an event
        (README, "Performance").  Its slow client slows the turn, as before turns outlived
        their connection; any other reader reads at its own pace."""
        self.push(data)
        if self.sink is not None:
            await self.sink.catch_up()

    def stop(self) -> None:
        """Stop the turn, once."""
        if not self.stopping:
            self.stopping = True
            if self.started and self.task is not None:
                self.task.cancel()

    async def lend(self, reader: Any) -> None:
        """Be written to by the turn (``reader.catch_up()``) until handed back: at the end,
        when a write fails, or when one has waited ``SINK_STALL_SECONDS`` on a client that
        stopped reading (a phone gone from Wi-Fi keeps its connection): then the turn's task
        is freed from that write, and the reader writes at its own pace again."""
        self.sink = reader
        self._handback = handback = asyncio.get_running_loop().create_future()
        while not handback.done():
            await asyncio.wait([handback], timeout=SINK_STALL_SECONDS)
            since = reader.writing_since
            if not handback.done() and since is not None and time.monotonic() - since >= SINK_STALL_SECONDS:
                reader.stalled = self.unsticking = True
                self.hand_back()
                self.task.cancel()  # caught in catch_up(), unless a stop came too

    def hand_back(self) -> None:
        self.sink = None
        handback, self._handback = self._handback, None
        if handback is not None and not handback.done():
            handback.set_result(None)

    def fail(self, failure: NodeChatError, frames: bytes) -> None:
        """The turn failed before its first byte: its POST gets ``failure`` as its HTTP
        error, any other reader ``frames``."""
        self.failure, self.failure_frames = failure, frames
        self.finish()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def close(self) -> None:
        self.complete = self.done = True
        self.hand_back()
        self._wake()

    def since(self, position: int, most: int | None = None) -> tuple[bytes, int]:
        """The bytes from chunk ``position`` on (about ``most`` of them at most), and the
        position after them."""
        if position == self.end - 1:  # the reader keeps up: one chunk, no copy
            return self.chunks[-1], self.end
        at = position - self.first
        if most is None:
            return b"".join(self.chunks[at:]), self.end
        taken, size = at, 0
        while taken < len(self.chunks) and size < most:
            size += len(self.chunks[taken])
            taken += 1
        return b"".join(self.chunks[at:taken]), self.first + taken

    def reader(self, key: object) -> None:
        """Count ``key`` as a reader from the first byte, before it reads: nothing it has not
        read is let go, however full the stream gets meanwhile."""
        self.readers[key] = self.first

    async def wait(self) -> None:
        """Until the next push or the end."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


@dataclass(frozen=True)
class Admitted:
    """A turn let in by :class:`Turns`; give it back to ``leave`` when the turn ends."""

    user: str
    conversation_id: str | None
    capped: bool
    stream: TurnStream | None = None
    turn_id: str | None = None  # its row (PostgresTurns)


class Turns:
    """The turns running now, and the rules a turn passes before it runs: an end user's
    turns capped at ``max_turns_per_user`` at once (429 beyond; ``/v1`` callers are services
    with one key and many requests: uncapped), and one turn at a time per conversation (409).

    An ``/api/chat`` turn on a stored conversation also has a :class:`TurnStream` and its own
    task (``tasks``), so it goes on when its client leaves, and a reload reads it again.
    This class holds all of that in this process; :class:`PostgresTurns` holds it for every
    process that shares the database.  With ``held_in`` (a JSON data directory's
    ``turns/``), one turn per conversation also holds across the processes sharing that
    directory (``--workers``): see :meth:`_hold`.
    """

    def __init__(self, settings: Settings, ledger: Ledger, held_in: Path | None = None):
        self.settings = settings
        self.ledger = ledger  # the rate limits and budgets a turn passes first
        self.held_in = held_in if fcntl is not None else None
        self._held: dict[tuple[str, str], int] = {}  # (user, conversation) -> its locked file's descriptor
        self.tasks: set[asyncio.Task] = set()  # turns that outlive their connection
        self._turns: dict[str, int] = {}  # user -> capped turns running now
        # (user, conversation) -> its turn's stream, or None (a turn without one); per user:
        # another user's conversation id says nothing about this one
        self._busy: dict[tuple[str, str], TurnStream | None] = {}

    async def enter(self, turn: Turn, stream: TurnStream | None = None) -> Admitted:
        """Admit the turn (with the stream its readers will read), or raise TooManyRequests
        (a rate limit, the user's turns at once), BudgetExceeded or Conflict."""
        await self.ledger.admit(turn.user_id)
        return self._enter(turn, stream)

    def _enter(self, turn: Turn, stream: TurnStream | None) -> Admitted:
        user, cid, capped = turn.user_id, turn.conversation_id, turn.capped
        limit = self.settings.limits(user).max_turns_per_user
        if capped and self._turns.get(user, 0) >= limit:
            raise self._too_many(limit)
        if cid is not None and (user, cid) in self._busy:
            raise self._busy_conversation()
        if cid is not None and self.held_in is not None:
            held = self._hold(user, cid)
            if held is not None:
                self._held[user, cid] = held
        if capped:
            self._turns[user] = self._turns.get(user, 0) + 1
        if cid is not None:
            self._busy[user, cid] = stream
        return Admitted(user, cid, capped, stream)

    def _hold(self, user: str, cid: str) -> int | None:
        """Lock ``turns/<user>/<conversation>.lock`` for the turn, without waiting (another
        process's turn there: 409).  The kernel lets it go when the descriptor closes or the
        process dies, kill -9 included, so a dead worker never leaves a conversation busy.
        A directory it cannot write to is left to the store to report."""
        path = os.path.join(self.held_in, user_folder(user), validate_id(cid, "conversation id") + ".lock")
        try:
            held = _open_in_folder(path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(held)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise self._busy_conversation() from None
            return None
        return held

    @staticmethod
    def _busy_conversation() -> Conflict:
        return Conflict("a turn is already running in this conversation; wait for it or stop it",
                        code="conversation_busy")

    def _too_many(self, limit: int) -> TooManyRequests:
        self.ledger.metrics.rejected("concurrency")
        return TooManyRequests(f"{limit} turns are already running for this user; try again "
                               "when one ends", code="too_many_turns")

    async def leave(self, admitted: Admitted) -> None:
        self._leave(admitted)

    def _leave(self, admitted: Admitted) -> None:
        user = admitted.user
        if admitted.capped:
            self._turns[user] -= 1
            if not self._turns[user]:
                del self._turns[user]
        if admitted.conversation_id is not None:
            self._busy.pop((user, admitted.conversation_id), None)
            held = self._held.pop((user, admitted.conversation_id), None)
            if held is not None:
                os.close(held)

    async def stream(self, user: str, conversation_id: str) -> TurnStream | None:
        """The stream of the user's turn running on that conversation, if a reader may
        still start on it (not past ``resume_buffer_bytes``)."""
        stream = self._busy.get((user, conversation_id))
        if stream is None or stream.full or stream.done or len(stream.readers) >= MAX_READERS_PER_TURN:
            return None
        return stream

    async def running(self, user: str, conversation_id: str) -> str | None:
        """The id of the answer being written in that conversation ("" for a turn without
        a stream); None when no turn runs there."""
        if (user, conversation_id) not in self._busy:
            return None
        stream = self._busy[user, conversation_id]
        return stream.id if stream is not None else ""

    async def stop(self, user: str, conversation_id: str, stream_id: str | None = None) -> None:
        """Stop the user's turn on that conversation (only if its stream is ``stream_id``,
        when given) and wait, a while, for it to save what it said."""
        stream = self._busy.get((user, conversation_id))
        if stream is None or stream_id not in (None, stream.id):
            return
        stream.stop()
        if stream.task is not None:
            await asyncio.wait({stream.task}, timeout=STOP_WAIT_SECONDS)

    async def aclose(self, grace: float) -> None:
        """Give the turns that outlive their connection ``grace`` seconds, then stop them."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


TURN_CHUNK_SECONDS = 0.02  # a turn's bytes go to PostgreSQL at most this often: one INSERT each
TURN_FOLLOW_SECONDS = 1.0  # a reader on another process looks at the table this often without a NOTIFY
TURN_CHUNKS_KEPT_SECONDS = 60  # chunks outlive their turn this long, for readers still catching up
TURN_CHANNEL = "nodechat_turns"  # NOTIFY "c:<turn>:<seq>" (new chunk), "s:<turn>" (stop it)


class PostgresTurns(Turns):
    """:class:`Turns` for every process that shares the database.

    A turn holds a row in ``nodechat_turns`` while it runs, taken under a per-user advisory
    lock: the unique (user, conversation) index is the one-turn-per-conversation rule, and
    the count of the user's capped rows is ``max_turns_per_user``.  The process renews its
    rows' lease every third of ``turn_lease_seconds``; a process that dies (kill -9) stops
    renewing, and its rows are let go once the lease is over.  A turn that finds its own row
    gone (its lease ran out while the database was away) stops: two processes never answer
    one conversation.

    A turn's stream goes to ``nodechat_turn_chunks``, batched (one INSERT per
    ``TURN_CHUNK_SECONDS`` while it streams), each INSERT announced with a NOTIFY of its
    number, never its bytes (payloads are capped at 8,000 bytes).  A reader on another
    process reads the table from the first chunk, then follows the notifications (and looks
    anyway every ``TURN_FOLLOW_SECONDS``: a notification sent while it was not listening is
    never replayed).  When the producer's lease runs out with no last chunk, the reader is
    sent the turn's ``orphaned`` bytes (an error, then the stream's end).  A stop from
    another process sets ``stop_requested`` and NOTIFYs the owner; its heartbeat sees the
    flag too, should the notification be lost.
    """

    def __init__(self, settings: Settings, store: PostgresStore, ledger: Ledger):
        super().__init__(settings, ledger)
        self.store = store
        self.owner = new_id("process")
        self._rows: dict[str, TurnStream | None] = {}  # turn id -> its stream, for this process's rows
        self._followers: dict[str, tuple[TurnStream, asyncio.Event]] = {}  # other processes' turns read here
        self._writers: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None
        self._listener: Any = None
        self._listening: asyncio.Lock | None = None

    # -- this process's turns --------------------------------------------------------------

    async def enter(self, turn: Turn, stream: TurnStream | None = None) -> Admitted:
        await self.ledger.admit(turn.user_id)
        admitted = self._enter(turn, stream)  # this process's own count first: no round trip to refuse
        if not (turn.capped or turn.conversation_id):
            return admitted  # a /v1 call: nothing to hold across processes
        turn_id = stream.id if stream is not None else new_id("turn")
        try:
            await self._claim(turn, turn_id, stream)
        except BaseException:
            self._leave(admitted)
            raise
        self._rows[turn_id] = stream
        self._start_background()
        if stream is not None:
            stream.reader(self)  # what is not written yet is never let go
            self._writers[turn_id] = spawn(self._background, self._write_chunks(stream))
        return dataclasses.replace(admitted, turn_id=turn_id)

    async def _claim(self, turn: Turn, turn_id: str, stream: TurnStream | None) -> None:
        user, limit = turn.user_id, self.settings.limits(turn.user_id).max_turns_per_user
        async with self.store._transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock(3, hashtext($1))", user)
            await db.execute("DELETE FROM nodechat_turns WHERE user_id = $1 AND lease_until < now()", user)
            if turn.capped and await db.fetchval("SELECT count(*) FROM nodechat_turns WHERE user_id = $1 "
                                                 "AND capped", user) >= limit:
                raise self._too_many(limit)
            claimed = await db.fetchval(
                "INSERT INTO nodechat_turns (turn_id, user_id, conversation_id, capped, ui, resumable, "
                "orphaned, owner, lease_until) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
                "now() + $9 * interval '1 second') ON CONFLICT DO NOTHING RETURNING true",
                turn_id, user, turn.conversation_id, turn.capped, stream.ui if stream else None,
                stream is not None, stream.orphaned if stream else b"", self.owner,
                self.settings.turn_lease_seconds)
        if not claimed:
            raise Conflict("a turn is already running in this conversation; wait for it or stop it",
                           code="conversation_busy")

    async def leave(self, admitted: Admitted) -> None:
        self._leave(admitted)
        turn_id = admitted.turn_id
        if turn_id is None or turn_id not in self._rows:
            return
        del self._rows[turn_id]
        writer = self._writers.pop(turn_id, None)
        if writer is not None:  # its last chunk first: a reader elsewhere ends on it, not on the lease
            await asyncio.wait({writer}, timeout=self.settings.turn_lease_seconds + TURN_FOLLOW_SECONDS)
        try:
            async with self.store._connection() as db:
                await db.execute("DELETE FROM nodechat_turns WHERE turn_id = $1", turn_id)
        except StoreUnavailable:  # the row goes when its lease runs out
            pass

    async def _write_chunks(self, stream: TurnStream) -> None:
        """The turn's bytes to the chunk table, batched, until its end (always written last).
        A chunk whose INSERT fails is tried again with what came since, for a lease at most."""
        seq, position, failing_since, resumable = 0, stream.readers[self], None, True
        try:
            while True:
                if self in stream.cut:  # the database was away for a full buffer: readers elsewhere lose it
                    log.warning("turn %s: its stream fell too far behind to be written to the database", stream.id)
                    return
                if position == stream.end and not stream.complete:
                    await stream.wait()
                last = stream.complete
                data, upto = stream.since(position)
                data += stream.failure_frames if last and stream.failure else b""
                try:
                    async with self.store._connection() as db:
                        await db.execute(  # ON CONFLICT: an INSERT whose answer was lost is not a failure
                            "WITH chunk AS (INSERT INTO nodechat_turn_chunks (turn_id, seq, data, last) "
                            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING) "
                            "SELECT pg_notify($5, 'c:' || $1 || ':' || $2)",
                            stream.id, seq + 1, data, last, TURN_CHANNEL)
                except Exception as exc:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.settings.turn_lease_seconds:
                        log.warning("turn %s: its stream cannot be written to the database (%s); readers "
                                    "on other processes will be told it stopped", stream.id, exc)
                        return
                    await asyncio.sleep(TURN_FOLLOW_SECONDS)
                    continue
                failing_since, seq, position = None, seq + 1, upto
                stream.readers[self] = position
                if last:
                    return
                if stream.full and resumable:  # past resume_buffer_bytes: no new reader anywhere
                    resumable = False
                    with contextlib.suppress(Exception):
                        async with self.store._connection() as db:
                            await db.execute("UPDATE nodechat_turns SET resumable = false WHERE turn_id = $1",
                                             stream.id)
                await asyncio.sleep(TURN_CHUNK_SECONDS)
        finally:
            stream.readers.pop(self, None)

    # -- any process's turns ---------------------------------------------------------------

    async def stream(self, user: str, conversation_id: str) -> TurnStream | None:
        local = await super().stream(user, conversation_id)
        if local is not None or (user, conversation_id) in self._busy:
            return local
        async with self.store._connection() as db:
            row = await db.fetchrow("SELECT turn_id, ui, orphaned FROM nodechat_turns WHERE user_id = $1 "
                                    "AND conversation_id = $2 AND resumable AND lease_until > now()",
                                    user, conversation_id)
        if row is None:
            return None
        turn_id = row["turn_id"]
        follower = self._followers.get(turn_id)
        if follower is not None and (follower[0].full or follower[0].done):
            return None
        if follower is None:
            stream = TurnStream(turn_id, row["ui"], self.settings.resume_buffer_bytes, bytes(row["orphaned"]))
            self._followers[turn_id] = (stream, asyncio.Event())
            spawn(self._background, self._follow(stream))
        return self._followers[turn_id][0]

    async def _follow(self, stream: TurnStream) -> None:
        """Another process's turn into a local stream, from its first chunk to its last."""
        woken = self._followers[stream.id][1]
        seq, lost_since, recheck = 0, None, False
        try:
            with contextlib.suppress(StoreUnavailable):  # then it only looks every second
                await self._listen()
            while True:
                woken.clear()
                try:
                    async with self.store._connection() as db:
                        rows = await db.fetch("SELECT seq, data, last FROM nodechat_turn_chunks WHERE turn_id = $1 "
                                              "AND seq > $2 ORDER BY seq", stream.id, seq)
                        alive = rows or await db.fetchval("SELECT true FROM nodechat_turns WHERE turn_id = $1 "
                                                          "AND lease_until > now()", stream.id)
                    lost_since = None
                except StoreUnavailable:
                    rows, alive = [], True
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > self.settings.turn_lease_seconds:
                        alive = False
                for row in rows:
                    seq = row["seq"]
                    stream.push(bytes(row["data"]))
                    if row["last"]:
                        return
                if not alive:  # its process is gone (or the database is, for a whole lease) ...
                    if lost_since is None and not recheck:
                        recheck = True  # ... unless it ended between the two reads: look once more
                        continue
                    stream.push(stream.orphaned)
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), TURN_FOLLOW_SECONDS)
        finally:
            stream.close()
            self._followers.pop(stream.id, None)

    async def running(self, user: str, conversation_id: str) -> str | None:
        local = await super().running(user, conversation_id)
        if local is not None:
            return local
        async with self.store._connection() as db:
            row = await db.fetchrow("SELECT turn_id, ui FROM nodechat_turns WHERE user_id = $1 AND "
                                    "conversation_id = $2 AND lease_until > now()", user, conversation_id)
        return None if row is None else row["turn_id"] if row["ui"] is not None else ""

    async def stop(self, user: str, conversation_id: str, stream_id: str | None = None) -> None:
        if (user, conversation_id) in self._busy:
            return await super().stop(user, conversation_id, stream_id)
        async with self.store._connection() as db:
            turn_id = await db.fetchval(
                "UPDATE nodechat_turns SET stop_requested = true WHERE user_id = $1 AND conversation_id = $2 "
                "AND ($3::text IS NULL OR turn_id = $3) AND ui IS NOT NULL AND lease_until > now() "
                "RETURNING turn_id", user, conversation_id, stream_id)
            if turn_id is None:
                return
            await db.execute("SELECT pg_notify($1, 's:' || $2)", TURN_CHANNEL, turn_id)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while time.monotonic() < deadline:  # until it has saved what it said
            await asyncio.sleep(0.05)
            async with self.store._connection() as db:
                if not await db.fetchval("SELECT true FROM nodechat_turns WHERE turn_id = $1 "
                                         "AND lease_until > now()", turn_id):
                    return

    # -- the process's own: a heartbeat, and one connection that LISTENs ---------------------

    def _start_background(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = spawn(self._background, self._beat())

    async def _beat(self) -> None:
        """Renew this process's leases; stop the turns asked to stop, and those whose row is
        gone; let go of chunks nobody needs any more."""
        every = self.settings.turn_lease_seconds / 3
        while self._rows or self._followers:
            with contextlib.suppress(Exception):
                await self._listen()
            try:
                async with self.store._connection() as db:
                    ids = list(self._rows)
                    rows = await db.fetch(
                        "UPDATE nodechat_turns SET lease_until = now() + $2 * interval '1 second' "
                        "WHERE turn_id = ANY($1::text[]) RETURNING turn_id, stop_requested",
                        ids, self.settings.turn_lease_seconds)
                    await db.execute(
                        "DELETE FROM nodechat_turn_chunks c WHERE created_at < now() - $1 * interval '1 second' "
                        "AND NOT EXISTS (SELECT 1 FROM nodechat_turns t WHERE t.turn_id = c.turn_id "
                        "AND t.lease_until > now())", TURN_CHUNKS_KEPT_SECONDS)
            except StoreUnavailable:
                await asyncio.sleep(every)
                continue
            held = {row["turn_id"]: row["stop_requested"] for row in rows}
            for turn_id in ids:
                if held.get(turn_id, True) and turn_id in self._rows:
                    if turn_id not in held:
                        log.warning("turn %s lost its lease (the database was away): stopping it", turn_id)
                    self._cancel(turn_id)
            await asyncio.sleep(every)

    def _cancel(self, turn_id: str) -> None:
        stream = self._rows.get(turn_id)
        if stream is not None:
            stream.stop()

    async def _listen(self) -> None:
        """One connection per process LISTENs on ``TURN_CHANNEL`` (opened on first need)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listening = self._listening or asyncio.Lock()
        async with self._listening:
            if self._listener is not None and not self._listener.is_closed():
                return
            try:
                listener = await self.store._asyncpg.connect(self.store.url, timeout=DB_CONNECT_TIMEOUT_SECONDS)
                await listener.add_listener(TURN_CHANNEL, self._notified)
            except self.store._outages as exc:
                raise self.store._unavailable(exc) from exc
            self._listener = listener

    def _notified(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        if kind == "c":
            follower = self._followers.get(rest.rpartition(":")[0])
            if follower is not None:
                follower[1].set()
        elif kind == "s":
            self._cancel(rest)

    async def aclose(self, grace: float) -> None:
        await super().aclose(grace)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.close(timeout=2)


def make_turns(settings: Settings, store: Store, ledger: Ledger) -> Turns:
    if isinstance(store, PostgresStore):
        return PostgresTurns(settings, store, ledger)
    return Turns(settings, ledger, store.root / "turns" if isinstance(store, JSONFileStore) else None)


###############################################################################
# HTTP server: requests, responses, streaming, routing, and who may call
###############################################################################


Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"connection", b"keep-alive"),
               (b"x-accel-buffering", b"no"))


@dataclass(frozen=True)
class Request:
    """An HTTP request read whole (within the size limit), with its path inside the app.

    ``body`` is None only in the request an error format is given when the failure came
    before the body was read (a 401, a 404)."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: bytes | None
    scope: Scope
    params: dict[str, str] = field(default_factory=dict)
    user_id: str | None = None
    request_id: str = ""  # x-request-id: the client's, or one made for it

    def json(self) -> Any:
        try:
            return parse_json(self.body)
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def request_cookies(headers: Mapping[str, str]) -> dict[str, str]:
    pairs = (part.strip().partition("=") for part in headers.get("cookie", "").split(";"))
    return {name: unquote(value) for name, _, value in pairs if name}


def route_path(scope: Scope) -> str:
    """The path inside this app: a mount's (or ``--root-path``) prefix removed."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def scope_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def scope_query(scope: Scope) -> dict[str, str]:
    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def build_request(scope: Scope, headers: dict[str, str], params: dict[str, str] | None = None,
                 body: bytes | None = None, user_id: str | None = None, request_id: str = "") -> Request:
    return Request(scope.get("method", "GET"), route_path(scope), headers, scope_query(scope), body, scope,
                   params or {}, user_id, request_id)


REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(headers: Mapping[str, str]) -> str:
    """The request's ``x-request-id`` when it sends a sane one (a proxy's), else a new one."""
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID_PATTERN.fullmatch(given) else "req_" + uuid.uuid4().hex


async def read_body(receive: Receive, headers: Mapping[str, str], limit: int, timeout: float) -> bytes:
    """The only body reader: PayloadTooLarge past ``limit`` bytes, RequestTimeout when the
    whole body has not arrived within ``timeout`` seconds (a client that never finishes)."""
    if int(headers.get("content-length") or 0) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise asyncio.CancelledError("client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes",
                                          code="body_too_large")
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s",
                             code="body_timeout") from None
    return b"".join(chunks)


@dataclass
class JSONResponse:
    """A whole JSON body with a status."""

    body: Any
    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()

    async def __call__(self, send: Send, receive: Receive) -> None:
        if self.status == 204:  # No Content: no body, no content type
            await send({"type": "http.response.start", "status": 204, "headers": list(self.headers)})
            await send({"type": "http.response.body", "body": b""})
            return
        await TextResponse(compact_json(self.body), self.status, self.headers, b"application/json")(send, receive)


@dataclass
class TextResponse:
    """A whole text body with a status (plain text unless told otherwise)."""

    text: str
    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"text/plain; charset=utf-8"

    async def __call__(self, send: Send, receive: Receive) -> None:
        payload = self.text.encode()
        await send({"type": "http.response.start", "status": self.status, "headers": [
            (b"content-type", self.content_type), (b"content-length", str(len(payload)).encode()),
            *self.headers]})
        await send({"type": "http.response.body", "body": payload})


@dataclass
class WaitedResponse:
    """A JSON body worked out while the client waits: if it leaves first, the work (and
    the upstream request under it) is cancelled, as for a stream."""

    work: Callable[[], Awaitable[Any]]

    async def __call__(self, send: Send, receive: Receive) -> None:
        task = asyncio.current_task()
        watcher = asyncio.create_task(watch_disconnect(receive, task))
        try:
            body = await self.work()
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                task.uncancel()  # the client left: nothing to answer
                return
            raise
        finally:
            watcher.cancel()
        await JSONResponse(body)(send, receive)


@dataclass
class SSEResponse:
    """An event stream: ``events`` from the agent, framed by ``encoder``."""

    streaming = True  # counted in nodechat_active_streams

    events: AsyncIterator[Event]
    encoder: Any
    headers: tuple[tuple[bytes, bytes], ...] = ()
    keepalive: float = 15.0

    def __call__(self, send: Send, receive: Receive) -> Awaitable[None]:
        return stream_sse(send, receive, self.events, self.encoder, self.headers, self.keepalive)


async def stream_sse(send: Send, receive: Receive, events: AsyncIterator[Event], encoder: Any,
                     headers: Iterable[tuple[bytes, bytes]] = (), keepalive: float = 15.0) -> None:
    """The only code that starts an event stream.

    The first event is awaited before the response starts, so a failure before anything
    streamed (bad model, upstream down) is a proper HTTP error, unless ``keepalive`` seconds
    passed first: then the stream has started with a comment line, as it sends one after
    every such silence (a slow first token, a long tool call).  Later failures become the
    encoder's in-stream error frames.  Cancellation flow::

        client disconnects -> watch_disconnect() cancels this task
          -> CancelledError inside events (the agent) -> upstream response closed,
             running tools cancelled -> events.aclose() here, nothing left running
    """
    task = asyncio.current_task()
    watcher = asyncio.create_task(watch_disconnect(receive, task))
    out = SSEWriter(send, headers, keepalive, getattr(encoder, "ping", SSE_KEEPALIVE))
    opened = False
    try:
        try:
            first = await anext(events, None)
            frames, opened = encoder.start() + (encoder.encode(first) if first is not None else []), True
            if first is not None:
                await out.write(b"".join(frames))
                frames = []
                async for event in events:
                    if event_frames := encoder.encode(event):
                        await out.write(b"".join(event_frames))
            frames += encoder.end()
        except Exception as exc:
            if not out.started:
                raise  # nothing streamed yet: the protocol's HTTP error
            frames = ([] if opened else encoder.start()) + encoder.error(client_error(exc))
        await out.write(b"".join(frames), more=False)
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.result():
            task.uncancel()  # the client left: a normal end, not an error
            return
        raise
    finally:
        watcher.cancel()
        out.close()
        await events.aclose()


class SendGuard:
    """One send at a time on a connection, for the rare moment two tasks meet there (a ping
    or a title while a frame waits on a slow client).

    An ``asyncio.Lock`` does this with three coroutine calls per frame, which cost more than
    encoding the frame; here an uncontended send costs a flag::

        if guard.busy:
            await guard.wait()
        guard.busy = True
        try:
            await send(message)
        finally:
            guard.release()
    """

    def __init__(self):
        self.busy = False
        self._idle: asyncio.Future | None = None

    async def wait(self) -> None:
        while self.busy:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)  # one waiter's cancellation is not the others'

    def release(self) -> None:
        self.busy = False
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set_result(None)


class SSEWriter:
    """Writes an event stream's frames, and a comment line after ``keepalive`` seconds of
    silence (as sse-starlette's ping), starting the response if need be.

    The silence is watched by one timer, not a task: a task per response cost a creation and
    a cancellation on every request.  A ping and a frame never send at once (``SendGuard``).
    """

    def __init__(self, send: Send, headers: Iterable[tuple[bytes, bytes]], keepalive: float,
                 ping: bytes = SSE_KEEPALIVE):
        self.send, self.headers, self.keepalive = send, list(headers), keepalive
        self.ping = ping  # a protocol's own keep-alive (Anthropic's ``ping`` event), else a comment
        self.started = False
        self.last = time.monotonic()
        self._guard = SendGuard()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(keepalive, self._silence)
        self._ping: asyncio.Task | None = None

    async def write(self, body: bytes, more: bool = True) -> None:
        guard = self._guard
        if guard.busy:
            await guard.wait()
        guard.busy = True
        try:
            if not more:
                self.close()
            if not self.started:
                self.started = True
                await self.send({"type": "http.response.start", "status": 200,
                                 "headers": [*SSE_HEADERS, *self.headers]})
            await self.send({"type": "http.response.body", "body": body, "more_body": more})
            self.last = time.monotonic()
        finally:
            guard.release()

    @property
    def writing(self) -> bool:
        return self._guard.busy

    async def idle(self) -> None:
        """Until no write is under way."""
        if self._guard.busy:
            await self._guard.wait()

    def close(self) -> None:
        """No more pings (the stream is ending, or has ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ping is not None and self._ping is not asyncio.current_task():
            self._ping.cancel()

    def _silence(self) -> None:
        silent = time.monotonic() - self.last
        if silent < self.keepalive:
            wait = self.keepalive - silent
        else:  # unless a send is stuck on a slow client: then look again later
            wait = self.keepalive
            if not self._guard.busy and (self._ping is None or self._ping.done()):
                self._ping = asyncio.ensure_future(self._send_ping())
        self._timer = self._loop.call_later(wait, self._silence)

    async def _send_ping(self) -> None:
        try:
            await self.write(self.ping)
        except OSError:  # the client is gone; the stream's own task sees the disconnect
            return


def client_error(exc: BaseException) -> NodeChatError:
    """What a client is told of a failure: a NodeChatError as it is, anything else (logged
    here, with its traceback) as an internal error naming only its type."""
    if isinstance(exc, NodeChatError):
        return exc
    log.error("request failed", exc_info=exc)
    return NodeChatError(f"internal error: {type(exc).__name__}", code="internal_error")


async def watch_disconnect(receive: Receive, task: asyncio.Task) -> bool:
    """Wait for ``http.disconnect`` and cancel ``task`` (the streaming one) when it comes."""
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()
    return True


ErrorFormat = Callable[[NodeChatError, Request], Any]  # the error, the request -> a response


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    handler: Callable[[Any, Request], Awaitable[Any]]  # (the app, the request) -> a response
    auth: str  # "anyone"; "token": a bearer token; "session": a bearer token or the session cookie;
    #            "metrics": anyone, from any Host (the handler asks for metrics_token)
    errors: ErrorFormat  # the protocol's error body, for whatever fails before the response starts


@dataclass(frozen=True)
class Routes:
    """One protocol's routes and its error format, which also answers for a path under
    ``prefix`` that no route matches.  Each entry is ``(method, path, handler, auth)``, or
    with a fifth item, the route's own error format."""

    prefix: str
    errors: ErrorFormat
    table: tuple[tuple, ...]
    protocol: str = "other"  # the metrics' label for its requests


class Router:
    """Matches a method and path to a route, built per app from the protocols' ``Routes``."""

    def __init__(self, *groups: Routes):
        self.routes = tuple(Route(method, compile_path(path), handler, auth, errors[0] if errors else group.errors)
                            for group in groups for method, path, handler, auth, *errors in group.table)
        self.prefixes = sorted(((g.prefix, g.errors, g.protocol) for g in groups), key=lambda p: -len(p[0]))

    def match(self, method: str, path: str) -> tuple[Route | None, dict, list[str]]:
        """The route and its params; or None with the methods the path allows (404 vs 405)."""
        allowed = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found:
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    return route, found.groupdict(), []
                allowed.append(route.method)
        return None, {}, allowed

    def errors_for(self, path: str) -> ErrorFormat:
        """The error format of a path no route takes: its protocol's, by prefix."""
        return next((errors for prefix, errors, _ in self.prefixes if path.startswith(prefix)), json_error)

    def protocol_for(self, path: str) -> str:
        return next((name for prefix, _, name in self.prefixes if path.startswith(prefix)), "other")


def compile_path(path: str) -> re.Pattern:
    """``{name}`` path parameters become named regex groups.  A parameter takes the rest of
    the path, slashes included, so an id like ``../x`` reaches validation (400), not a 404."""
    return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>.+)", path) + "$")


def error_headers(err: NodeChatError) -> tuple[tuple[bytes, bytes], ...]:
    """What every protocol's error response carries besides its body."""
    headers = ((b"www-authenticate", b"Bearer"),) if err.status == 401 else ()
    if isinstance(err, BudgetExceeded):
        headers += ((b"x-should-retry", b"false"),)
    if err.retry_after:
        headers += ((b"retry-after", err.retry_after.encode("latin-1")),)
    if isinstance(err, MethodNotAllowed):
        headers += ((b"allow", ", ".join(err.allow).encode()),)
    return headers


def error_response(err: NodeChatError, body: dict, request: Request | None) -> JSONResponse:
    """A protocol's JSON error body, with the request's id beside it (as in ``x-request-id``)."""
    if request is not None and request.request_id:
        body["request_id"] = request.request_id
    return JSONResponse(body, err.status, error_headers(err))


def json_error(err: NodeChatError, request: Request | None = None) -> JSONResponse:
    """``{"error": text, "request_id": ...}``: the error body of the chat page, ``/healthz``
    and ``/api/*``."""
    body = {"error": err.message}
    return error_response(err, body, request)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def lookup_token(tokens: Mapping[str, str], token: str | None) -> str | None:
    """The user of ``token``, comparing against every known token in constant time."""
    if not token:
        return None
    user = None
    candidate = token.encode()
    for known, owner in tokens.items():
        if hmac.compare_digest(known.encode(), candidate):
            user = owner
    return user


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CORS_NO_CREDENTIALS = frozenset({"*", "null", "file://"})


def cors_rule(origin: str, rules: Iterable[str]) -> str | None:
    """The CORS rule that admits ``origin``, if any.

    ``*``, ``null`` and ``file://`` match only themselves (``file://`` exactly, not
    ``file://evil``); ``http://localhost:*`` matches any port of that scheme and host.
    """
    for rule in rules:
        if rule == "*" or rule == origin:
            return rule
        if rule.endswith(":*") and re.fullmatch(re.escape(rule[:-2]) + r"(:\d+)?", origin):
            return rule
    return None


def cors_headers(origin: str, rules: Iterable[str], preflight: bool) -> list[tuple[bytes, bytes]]:
    """The Access-Control headers for ``origin``: credentials only for a real origin
    listed by name, never for ``*``, ``null`` or ``file://`` (the Fetch standard's rule for
    ``*``; any sandboxed iframe sends ``Origin: null``)."""
    rule = cors_rule(origin, rules)
    if rule is None:
        return []
    if rule == "*":
        headers = [(b"access-control-allow-origin", b"*")]
    else:
        headers = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if rule not in CORS_NO_CREDENTIALS:
            headers.append((b"access-control-allow-credentials", b"true"))
    if preflight:
        headers += [(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
                    (b"access-control-allow-headers", b"Authorization, Content-Type, Accept, "
                     b"User-Agent, X-Requested-With, X-Nodechat-Stream, X-Api-Key, Anthropic-Version, "
                     b"Anthropic-Beta"),
                    (b"access-control-max-age", b"86400")]
    return headers


def host_name(host: str) -> str:
    """The name in a Host header: ``[::1]:8000`` -> ``::1``, ``Example.COM:80`` -> ``example.com``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    name = host_name(host)
    for rule in allowed:
        if rule == "*" or rule == name or (rule.startswith("*.") and name.endswith(rule[1:])):
            return True
    return False


def same_origin(origin: str, host: str, scheme: str = "http") -> bool:
    """True when a browser's ``Origin`` names the very scheme, host and port the request
    went to (a WebSocket's ``ws``/``wss`` count as ``http``/``https``)."""
    origin_scheme, _, rest = origin.partition("://")
    if origin_scheme.lower() != {"ws": "http", "wss": "https"}.get(scheme, scheme):
        return False
    default = {"http": ":80", "https": ":443"}.get(origin_scheme.lower(), "")
    rest, host = rest.lower(), host.strip().lower()
    return bool(rest) and (rest == host or rest + default == host or rest == host + default)


class Gate:
    """Who may call, decided on the headers alone, before any body is read: an unknown
    caller never gets to make the server hold a body in memory.

    The Host and Origin rules keep web pages from driving the server (DNS rebinding,
    cross-site requests), CORS answers the browsers that are allowed, and the caller's user
    comes from a bearer token, the session cookie or the host's ``authenticate(scope)``.
    """

    def __init__(self, settings: Settings, authenticate: Callable[[Scope], Any] | None = None):
        self.settings = settings
        self.authenticate = authenticate
        self.allowed_hosts = settings.allowed_hosts or (LOOPBACK_NAMES if self.open else ("*",))

    @property
    def open(self) -> bool:
        """True when anyone who reaches the server is a user: no tokens, no ``authenticate``."""
        return not self.settings.tokens and self.authenticate is None

    def with_cors(self, headers: Mapping[str, str], method: str, send: Send) -> Send:
        """``send`` with the Access-Control headers an allowed origin gets (if any)."""
        origin = headers.get("origin")
        extra = cors_headers(origin, self.settings.cors_origins, method == "OPTIONS") if origin else []
        if not extra:
            return send

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_cors

    def check_browser(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Refuse what a web page could make a browser send.

        A Host that is not allowed is DNS rebinding (an open server answers loopback names
        only).  An ``Origin`` that is neither this server nor listed in ``cors_origins`` is a
        cross-site request: refused on an open server, as Jupyter and MCP's local servers do,
        and for every WebSocket (browsers apply no CORS to them, and a host's ``authenticate``
        may read a cookie)."""
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            raise Forbidden(f"Host {host[:80]!r} is not allowed here; add it to allowed_hosts "
                            "(NODECHAT_ALLOWED_HOSTS)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin and (self.open or scope["type"] == "websocket") and \
                not self._origin_allowed(origin, host, scope.get("scheme", "http")):
            raise Forbidden(f"cross-origin request from {origin[:80]!r} refused; add the origin to "
                            "cors_origins (NODECHAT_CORS_ORIGINS)", code="origin_not_allowed")

    def _origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        return same_origin(origin, host, scheme) or cors_rule(origin, self.settings.cors_origins) is not None

    def credentials(self, headers: Mapping[str, str], auth: str) -> tuple[str | None, bool]:
        """The token a request carries, and whether it came in the session cookie (which
        counts only on ``session`` routes)."""
        token = bearer_token(headers) or headers.get("x-api-key", "").strip() or None  # Anthropic's SDKs
        if token is None and auth == "session":
            token = request_cookies(headers).get(self.settings.cookie_name)
            return token, token is not None
        return token, False

    async def user(self, scope: Scope, headers: Mapping[str, str], method: str, auth: str) -> str:
        """The caller's user id from the headers alone, or Unauthorized.

        A cookie is sent by the browser with any page's requests: so a cookie-authenticated
        call must come from this server or an origin listed with credentials, and a POST
        must be ``application/json`` (which a cross-site form cannot send)."""
        token, via_cookie = self.credentials(headers, auth)
        user = await self.identify(scope, token)
        if not user:
            raise Unauthorized("Unauthorized", code="invalid_api_key")
        if via_cookie or self.authenticate is not None:  # a host's check may read its cookie
            origin = headers.get("origin")
            rule = cors_rule(origin, self.settings.cors_origins) if origin else None
            if origin and not same_origin(origin, headers.get("host", ""), scope.get("scheme", "http")) \
                    and (rule is None or rule in CORS_NO_CREDENTIALS):
                raise Forbidden(f"cookie sent from {origin[:80]!r}, an origin not allowed with "
                                "credentials", code="origin_not_allowed")
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if method == "POST" and media != "application/json":
                raise BadRequest("a request authenticated by cookie must send Content-Type: "
                                 "application/json", code="unsupported_media_type", status=415)
        return user

    async def identify(self, scope: Scope, token: str | None) -> str | None:
        """The host's ``authenticate(scope)``, else the token table (open when it is empty)."""
        if self.authenticate is not None:
            user = self.authenticate(scope)
            user = await user if inspect.isawaitable(user) else user
            return str(user) if user else None
        if not self.settings.tokens:
            return "local"
        return lookup_token(self.settings.tokens, token)

    def is_internal(self, headers: Mapping[str, str]) -> bool:
        """True for a caller that may act for other users: one with an internal token, or
        anyone on an open server."""
        token = bearer_token(headers) or request_cookies(headers).get(self.settings.cookie_name)
        return self.open or lookup_token({t: t for t in self.settings.internal_tokens}, token) is not None


###############################################################################
# Protocol: OpenAI /v1 (chat completions and models)
###############################################################################


def openai_turn(body: Any, user_id: str, settings: Settings, server_tools: list[Tool]) -> Turn:
    """A ``/v1/chat/completions`` body: the history as sent, the client's own tools passed
    through, every other field (temperature, max_tokens...) handed to the model unchanged."""
    body = _openai_body(body)
    check_messages(body["messages"], settings)
    params = {k: v for k, v in body.items()  # nodechat's own keys too: a /v1 caller never sets them
              if k not in ("model", "messages", "stream", "stream_options", "tools", "anthropic", "nodechat_cache_key")}
    if body.get("stream_options") is not None:
        params["stream_options"] = body["stream_options"]
    return Turn(messages=body["messages"], user_id=user_id, model=body.get("model"), tools=server_tools,
                client_tools=body.get("tools") or [], params=params,
                max_steps=settings.max_steps if server_tools else 1)


def _openai_body(body: Any) -> dict:
    """Check the parts of a chat.completions request that nodechat itself relies on."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", code="invalid_messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a 'role'",
                             code="invalid_messages")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("'model' must be a string", code="invalid_model")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_stream")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise BadRequest("'tools' must be an array of {\"type\": \"function\", \"function\": {\"name\": ...}}",
                         code="invalid_tools")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise BadRequest("'stream_options' must be an object", code="invalid_stream_options")
    return body


OPENAI_REASONS = types.MappingProxyType({"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                  "content_filter": "content_filter", "max_steps": "length", "budget": "length"})


class OpenAIEncoder:
    """``chat.completion.chunk`` SSE frames, and the ``chat.completion`` body when not streaming.

    One ``id`` and ``created`` per response; each chunk is a fixed head and tail around the
    only part that changes, the delta.
    """

    def __init__(self, model: str, include_usage: bool = False, id: str | None = None,
                 created: int | None = None):
        self.id = id or "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        self._calls = 0
        self._thought: list[str] = []  # reasoning since the last signed block
        self._answering(model)
        self._end = b']}\n\n' if not include_usage else b'],"usage":null}\n\n'  # OpenAI's: null until the last
        self._text_tail = b'},"logprobs":null,"finish_reason":null}' + self._end

    def _signed(self, event: ReasoningDelta) -> dict:
        """The signed (or redacted) thinking block ``event`` ends."""
        if event.redacted:
            return {"type": "redacted_thinking", "data": event.redacted}
        thought, self._thought = "".join(self._thought) + event.text, []
        return {"type": "thinking", "thinking": thought, "signature": event.signature}

    def _answering(self, model: str) -> None:
        """The model every chunk names from now on (another when the one asked for fell back)."""
        self.model = model
        self._head = ('data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,'
                      '"choices":[{"index":0,"delta":' % (
                          compact_json(self.id), self.created, compact_json(model))).encode()
        self._text_head = self._head + b'{"content":'

    def start(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def encode(self, event: Event) -> list[bytes]:
        match event:
            case TextDelta(text=text):  # the hot path: one string to quote, the rest fixed
                quoted = _json_string(text).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
                return [self._text_head + quoted.encode() + self._text_tail]
            case ReasoningDelta(text=text, signature="", redacted=""):
                if text:
                    self._thought.append(text)
                    return [self._chunk({"reasoning_content": text})]
            case ReasoningDelta():  # a signed block ends: whole, as LiteLLM's thinking_blocks, to send back
                delta = {"reasoning_content": event.text} if event.text else {}
                return [self._chunk({**delta, "thinking_blocks": [self._signed(event)]})]
            case ToolCall(client_side=True):
                self._calls += 1
                return [self._chunk({"tool_calls": [self._tool_call(event, self._calls - 1)]})]
            case Fallback(model=model):
                self._answering(model)
            case Finished(reason=reason, usage=usage):
                frames = [self._chunk({}, OPENAI_REASONS.get(reason, "stop"))]
                if self.include_usage:
                    frames.append(sse_json({**self._base("chat.completion.chunk"), "choices": [],
                                            "usage": (usage or Usage()).openai()}))
                return frames
        return []

    def end(self) -> list[bytes]:
        return [SSE_DONE]

    def error(self, err: NodeChatError) -> list[bytes]:
        return [sse_json(openai_error_body(err)), SSE_DONE]

    async def completion(self, events: AsyncIterator[Event]) -> dict:
        """Collect a whole turn into one ``chat.completion``."""
        text, reasoning, calls, reason, usage, signed = [], [], [], "stop", None, []
        async for event in events:
            match event:
                case TextDelta(text=piece):
                    text.append(piece)
                case ReasoningDelta(text=piece):
                    reasoning.append(piece)
                    if event.signature or event.redacted:
                        signed.append(self._signed(event))
                    else:
                        self._thought.append(piece)
                case ToolCall(client_side=True):
                    calls.append(self._tool_call(event, len(calls)))
                case Fallback(model=model):
                    self._answering(model)
                case Finished(reason=reason_, usage=usage):
                    reason = OPENAI_REASONS.get(reason_, "stop")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if signed:
            message["thinking_blocks"] = signed
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return {**self._base("chat.completion"), "choices": [choice], "usage": (usage or Usage()).openai()}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        tail = ',"logprobs":null,"finish_reason":%s}' % ('"%s"' % finish_reason if finish_reason else "null")
        return self._head + compact_json(delta).encode() + tail.encode() + self._end

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def _tool_call(call: ToolCall, index: int) -> dict:
        return {"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}


def openai_error_body(err: NodeChatError) -> dict:
    return {"error": {"message": err.message, "type": err.kind, "param": None, "code": err.code}}


def openai_errors(err: NodeChatError, request: Request | None = None) -> JSONResponse:
    """OpenAI's error envelope, which the ``openai`` clients turn into their exceptions
    (with the request id beside it, as in ``x-request-id``)."""
    body = openai_error_body(err)
    return error_response(err, body, request)


async def list_models(chat: NodeChat, request: Request) -> JSONResponse:
    """OpenAI's list, with the fields Anthropic's ``models.list`` pages by."""
    models = await chat.providers.list_models(chat.http())
    return JSONResponse({"object": "list", "data": models, "has_more": False,
                         "first_id": models[0]["id"] if models else None,
                         "last_id": models[-1]["id"] if models else None})


async def retrieve_model(chat: NodeChat, request: Request) -> JSONResponse:
    models = await chat.providers.list_models(chat.http())
    found = next((m for m in models if m["id"] == request.params["id"]), None)
    if found is None:
        raise NotFound(f"The model '{request.params['id'][:100]}' does not exist; available: "
                       f"{', '.join(m['id'] for m in models[:20]) or 'none'}", code="model_not_found")
    return JSONResponse(found)


async def chat_completions(chat: NodeChat, request: Request) -> JSONResponse | SSEResponse:
    body = request.json()
    turn = openai_turn(body, request.user_id, chat.settings, stateless_tools(chat))
    turn.request_id = request.request_id
    turn.model = turn.model or chat.providers.default_model
    chat.providers.resolve(turn.model)  # an unknown model is a 404 before anything streams
    encoder = OpenAIEncoder(turn.model, bool((turn.params.get("stream_options") or {}).get("include_usage")))
    return stateless_response(chat, turn, encoder, body.get("stream") is True)


def stateless_tools(chat: NodeChat) -> list[Tool]:
    """The server's tools on a stateless door (``/v1/*``): none unless ``openai_server_tools``."""
    return chat.tools.offered(chat.settings.tools, None) if chat.settings.openai_server_tools else []


def stateless_response(chat: NodeChat, turn: Turn, encoder: Any, stream: bool,
                       events: Callable[[], AsyncIterator[Event]] | None = None) -> SSEResponse | WaitedResponse:
    """A ``/v1/*`` turn's response: its encoder's stream, or the whole answer its encoder
    collects (``completion``); either way it ends with its connection.  ``events``: the
    turn's events, when more than ``run_turn`` makes them."""
    events = events or (lambda: run_turn(chat, turn))
    if stream:
        return SSEResponse(events(), encoder, keepalive=chat.settings.keepalive_seconds)
    return WaitedResponse(lambda: encoder.completion(events()))


def models_errors(err: NodeChatError, request: Request | None = None) -> JSONResponse:
    """``/v1/models`` serves both SDKs: Anthropic's error body to a caller that sends
    ``anthropic-version`` (Anthropic's SDKs, Claude Code's model discovery), else OpenAI's."""
    if request is not None and "anthropic-version" in request.headers:
        return anthropic_errors(err, request)
    return openai_errors(err, request)


OPENAI_ROUTES = Routes("/v1/", openai_errors, (
    ("GET", "/v1/models", list_models, "token", models_errors),
    ("GET", "/v1/models/{id}", retrieve_model, "token", models_errors),
    ("POST", "/v1/chat/completions", chat_completions, "token"),
), "openai")


###############################################################################
# Protocol: Anthropic /v1/messages (Anthropic's SDKs, Claude Code)
###############################################################################


ANTHROPIC_TOOL_CHOICE = types.MappingProxyType({"auto": "auto", "any": "required", "none": "none"})
ANTHROPIC_REASONS = types.MappingProxyType({
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal",
    "max_steps": "end_turn", "budget": "max_tokens"})
ANTHROPIC_ERRORS = types.MappingProxyType({  # status -> error.type, as Anthropic's API and SDKs name them
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    529: "overloaded_error"})


def anthropic_turn(body: Any, user_id: str, settings: Settings, server_tools: list[Tool], beta: str = "") -> Turn:
    """A Messages request as a turn: ``system``, text and image blocks, ``tool_use`` and
    ``tool_result`` in OpenAI's shape; the client's tools passed through.  Thinking blocks,
    ``cache_control``, ``thinking``, ``top_k``, ``metadata`` and the ``anthropic-beta`` header
    are kept for an Anthropic upstream (an OpenAI-compatible one never sees them:
    ``openai_request``); ``output_config.format``, a JSON schema, becomes ``response_format``."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("messages: a non-empty array is required", code="invalid_messages")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("model: a string is required", code="invalid_model")
    if type(body.get("max_tokens")) is not int or body["max_tokens"] < 1:
        raise BadRequest("max_tokens: a positive integer is required", code="invalid_max_tokens")
    check_messages(body["messages"], settings)
    system = body.get("system")
    attribution = [b for b in system if isinstance(b, dict) and str(b.get("text", "")).startswith(
        "x-anthropic-billing-header:")] if isinstance(system, list) else []
    if attribution:  # Claude Code's, for Anthropic; it changes with each prompt: another upstream's cache would miss
        system = [b for b in system if b not in attribution]
    if isinstance(system, list) and any(isinstance(b, dict) and "cache_control" in b for b in system):
        messages = [{"role": "system", "content": [{"type": "text", "text": b["text"]} | cached(b) for b in system
                                                   if isinstance(b, dict) and isinstance(b.get("text"), str)]}]
    else:
        messages = [{"role": "system", "content": text}] if (text := anthropic_text(system)) else []
    for index, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{index}: role must be user or assistant", code="invalid_messages")
        messages += anthropic_message(message["role"], message.get("content"), index)
    if not any(m["role"] != "system" for m in messages):
        raise BadRequest("messages: no text, image, tool_use or tool_result block to answer", code="invalid_messages")
    check_messages(messages, settings)  # the system prompt too
    params: dict[str, Any] = {"max_tokens": body["max_tokens"]}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            if type(body[key]) not in (int, float):
                raise BadRequest(f"{key}: a number", code=f"invalid_{key}")
            params[key] = body[key]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise BadRequest("stop_sequences: an array of strings", code="invalid_stop_sequences")
        params["stop"] = stops
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise BadRequest("tool_choice.type: auto, any, tool or none", code="invalid_tool_choice")
        params["tool_choice"] = {"type": "function", "function": {"name": str(choice.get("name", ""))}} \
            if kind == "tool" else ANTHROPIC_TOOL_CHOICE[kind]
        if choice.get("disable_parallel_tool_use") is True:
            params["parallel_tool_calls"] = False
    native = {key: body[key] for key in ("thinking", "top_k", "metadata") if body.get(key) is not None}
    output = body.get("output_config") if body.get("output_config") is not None else (
        {"format": body["output_format"]} if body.get("output_format") is not None else None)  # the beta's spelling
    if output is not None:
        form = output.get("format") if isinstance(output, dict) else None
        if not isinstance(output, dict) or (form is not None and not (
                isinstance(form, dict) and form.get("type") == "json_schema" and isinstance(form.get("schema"), dict))):
            raise BadRequest('output_config: {"format": {"type": "json_schema", "schema": {...}}}',
                             code="invalid_output_config")
        if form is not None:  # a schema any upstream can take: OpenAI's response_format, Claude's again
            params["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": form["schema"]}}
        if rest := {k: v for k, v in output.items() if k != "format"}:
            native["output_config"] = rest
    if beta:
        native["beta"] = beta
    if attribution:
        native["system"] = attribution
    if native:
        params["anthropic"] = native
    loaded = {block.get("tool_name") for message in body["messages"] if isinstance(message.get("content"), list)
              for result in message["content"] if isinstance(result, dict) and isinstance(result.get("content"), list)
              for block in result["content"] if isinstance(block, dict) and block.get("type") == "tool_reference"
              and isinstance(block.get("tool_name"), str)}
    return Turn(messages=messages, user_id=user_id, model=body["model"], tools=server_tools,
                client_tools=anthropic_tools(body.get("tools"), loaded), params=params, protocol="anthropic",
                max_steps=settings.max_steps if server_tools else 1)


def one_system_message(messages: list[dict]) -> list[dict]:
    """The system messages a request opens with, as one: several chat templates (Mistral's,
    Gemma's) refuse more than one, or one anywhere but first."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system" and isinstance(messages[lead]["content"], str):
        lead += 1
    if lead < 2:
        return messages
    return [{"role": "system", "content": "\n\n".join(m["content"] for m in messages[:lead])}, *messages[lead:]]


def anthropic_text(value: Any) -> str:
    """A ``system`` prompt or a ``tool_result``'s content: a string, or text blocks (one
    paragraph each: Claude Code's blocks are separate instructions).  A ``tool_reference``
    (what Claude Code's ToolSearch finds) says which tool it loaded."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n\n".join(b["text"] if isinstance(b.get("text"), str) else f"Tool loaded: {b['tool_name']}"
                            for b in value if isinstance(b, dict) and (isinstance(b.get("text"), str) or (
                                b.get("type") == "tool_reference" and isinstance(b.get("tool_name"), str))))
    return ""


def anthropic_message(role: str, content: Any, index: int) -> list[dict]:
    """One Messages message as OpenAI messages: its tool results first (each a ``tool``
    message), then the rest (text and images; an assistant's ``tool_use`` as tool calls)."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"messages.{index}.content: a string or an array of blocks", code="invalid_messages")
    results, parts, calls, thinking = [], [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]} | cached(block))
        elif kind == "image":
            source = block.get("source") if isinstance(block.get("source"), dict) else {}
            if source.get("type") == "url" and isinstance(source.get("url"), str):
                url = source["url"]
            elif source.get("type") == "base64" and isinstance(source.get("data"), str) and source["data"]:
                url = f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
            else:
                raise BadRequest(f"messages.{index}: an image needs a base64 or url source", code="invalid_messages")
            parts.append({"type": "image_url", "image_url": {"url": url}} | cached(block))
        elif kind == "document" and isinstance(block.get("source"), dict):
            source = block["source"]
            if source.get("type") == "base64" and isinstance(source.get("data"), str) and source["data"]:
                parts.append(file_part(f"data:{source.get('media_type', 'application/pdf')};base64,{source['data']}",
                                       str(block.get("title") or "document")) | cached(block))
            elif source.get("type") == "text" and isinstance(source.get("data"), str):
                parts.append({"type": "text", "text": source["data"]} | cached(block))
            else:
                raise BadRequest(f"messages.{index}: a document needs a base64 or text source", code="invalid_messages")
        elif kind in ("document", "search_result", "container_upload"):
            raise BadRequest(f"messages.{index}: {kind} blocks are not supported here", code="invalid_messages")
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": str(block.get("name", "")), "arguments": compact_json(block.get("input") or {})}})
        elif kind == "tool_result":
            text = anthropic_text(block.get("content"))
            text = f"Error: {text}" if block.get("is_error") else text
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": [{"type": "text", "text": text} | cached(block)] if "cache_control" in block
                            else text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            thinking.append(block)  # signed: for an Anthropic upstream only, as it was
    messages = results
    if parts or calls:
        text_only = all(p["type"] == "text" and "cache_control" not in p for p in parts)
        message: dict[str, Any] = {"role": role, "content": "\n\n".join(p["text"] for p in parts) if text_only
                                   else parts}
        if calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = calls
        if thinking:
            message["thinking_blocks"] = thinking
        messages.append(message)
    return messages


def cached(block: dict) -> dict:
    """A block's ``cache_control``, to carry on its part (``{}`` when it has none)."""
    return {"cache_control": block["cache_control"]} if "cache_control" in block else {}


def anthropic_tools(tools: Any, loaded: set = frozenset()) -> list[dict]:
    """Client tools (``name``, ``description``, ``input_schema``) as OpenAI function tools;
    Anthropic's server tools (they have a ``type``) cannot run on another upstream: 400.
    A ``defer_loading`` tool is offered once a ``tool_reference`` has ``loaded`` it, as
    Claude's tool search does."""
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise BadRequest("tools: an array of {name, input_schema}", code="invalid_tools")
    hosted = [t["name"] for t in tools if t.get("type") not in (None, "custom")]
    if hosted:
        raise BadRequest(f"tools: Anthropic's server tools are not available here: {', '.join(hosted[:5])}",
                         code="invalid_tools")
    return [{"type": "function", "function": {"name": t["name"], "description": str(t.get("description", "")),
                                              "parameters": t.get("input_schema") or {"type": "object"}}}
            for t in tools if t.get("defer_loading") is not True or t["name"] in loaded]


def sse_event(name: str, value: Any) -> bytes:
    """A server-sent event with its ``event:`` line (Anthropic's SDKs drop events without one)."""
    return b"event: " + name.encode() + b"\ndata: " + compact_json(value).encode() + b"\n\n"


class AnthropicEncoder:
    """The Messages stream: ``message_start``; content blocks with dense indexes, one open at
    a time, each started before its first delta; ``message_delta`` with the stop reason and
    the usage; ``message_stop``; ``ping`` to keep it alive.  And the Message object when not
    streaming."""

    ping = b'event: ping\ndata: {"type":"ping"}\n\n'

    def __init__(self, model: str, input_tokens: int, id: str | None = None):
        self.id = id or "msg_" + uuid.uuid4().hex
        self.model = model
        self.input_tokens = input_tokens  # an estimate until the upstream says (message_delta)
        self._index = -1
        self._open: str | None = None  # the type of the block open now

    def start(self) -> list[bytes]:
        return [sse_event("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}})]

    def encode(self, event: Event) -> list[bytes]:
        match event:
            case TextDelta(text=text):  # the hot path, as the OpenAI encoder's: one string to quote
                frames = self._block("text", {"type": "text", "text": ""}) if self._open != "text" else []
                quoted = _json_string(text).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
                frames.append(self._text_head + quoted.encode() + b"}}\n\n")
                return frames
            case ReasoningDelta(redacted=data) if data:  # encrypted: one whole block
                return self._close() + self._block("redacted_thinking", {"type": "redacted_thinking",
                                                                         "data": data}) + self._close()
            case ReasoningDelta(text=text, signature=signature):
                frames = self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                if text:
                    frames.append(self._delta({"type": "thinking_delta", "thinking": text}))
                if signature:  # the block is whole: an Anthropic upstream's, passed on to be sent back
                    frames.append(self._delta({"type": "signature_delta", "signature": signature}))
                    frames += self._close()
                return frames
            case ToolCall(client_side=True):
                frames = self._close() + self._block("tool_use", {"type": "tool_use", "id": event.id,
                                                                  "name": event.name, "input": {}})
                args = event.args  # the SDKs parse the whole input as an object: nothing else goes out
                frames.append(self._delta({"type": "input_json_delta",
                                           "partial_json": compact_json(args) if isinstance(args, dict) else "{}"}))
                return frames + self._close()
            case Finished(reason=reason, usage=usage):
                usage = usage or Usage()
                return self._close() + [
                    sse_event("message_delta", {"type": "message_delta", "delta": {
                        "stop_reason": ANTHROPIC_REASONS.get(reason, "end_turn"), "stop_sequence": None},
                        "usage": self._usage(usage)}),
                    sse_event("message_stop", {"type": "message_stop"})]
        return []

    def end(self) -> list[bytes]:
        return []

    def error(self, err: NodeChatError) -> list[bytes]:
        return [sse_event("error", anthropic_error_body(err))]

    async def completion(self, events: AsyncIterator[Event]) -> dict:
        """Collect a whole turn into one Message."""
        content: list[dict] = []
        reason, usage = "stop", Usage()
        async for event in events:
            match event:
                case ReasoningDelta(redacted=data) if data:
                    content.append({"type": "redacted_thinking", "data": data})
                case TextDelta(text=text) | ReasoningDelta(text=text):
                    kind, field_ = ("text", "text") if type(event) is TextDelta else ("thinking", "thinking")
                    if not content or content[-1]["type"] != kind or content[-1].get("signature"):
                        content.append({"type": kind, field_: ""} | ({"signature": ""} if kind == "thinking" else {}))
                    content[-1][field_] += text
                    if kind == "thinking" and event.signature:
                        content[-1]["signature"] = event.signature
                case ToolCall(client_side=True):
                    args = event.args
                    content.append({"type": "tool_use", "id": event.id, "name": event.name,
                                    "input": args if isinstance(args, dict) else {}})
                case Fallback(model=model):
                    self.model = model
                case Finished(reason=reason_, usage=usage_):
                    reason, usage = reason_, usage_ or Usage()
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": ANTHROPIC_REASONS.get(reason, "end_turn"), "stop_sequence": None,
                "usage": self._usage(usage)}

    def _usage(self, usage: Usage) -> dict:
        """Anthropic counts cached input apart from ``input_tokens``."""
        return {"input_tokens": usage.input - usage.cached, "output_tokens": usage.output,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": usage.cached}

    def _block(self, kind: str, start: dict) -> list[bytes]:
        if self._open == kind:
            return []
        frames = self._close()
        self._index += 1
        self._open = kind
        self._text_head = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                           b'"delta":{"type":"text_delta","text":' % self._index)
        return frames + [sse_event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                           "content_block": start})]

    def _delta(self, delta: dict) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index})]


def anthropic_error_body(err: NodeChatError) -> dict:
    kind = ANTHROPIC_ERRORS.get(err.status) or ("api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def anthropic_errors(err: NodeChatError, request: Request | None = None) -> JSONResponse:
    """Anthropic's error body, which its SDKs raise as their own exception classes."""
    body = anthropic_error_body(err)
    return error_response(err, body, request)


def anthropic_model(chat: NodeChat, model: str) -> str:
    """The model that answers: the one asked for; for a ``claude-*`` name that its provider
    does not list in ``models`` (Claude Code asks for its own names), the default model."""
    provider, name = chat.providers.split(model)
    if model.startswith("claude") and name not in provider.models:
        native = provider if isinstance(provider, AnthropicProvider) else \
            next((p for p in chat.providers if isinstance(p, AnthropicProvider)), None)
        if native is not None and not native.models:  # Claude itself: every claude-* name is its own
            return model if native is provider else f"{native.name}/{model}"
        if chat.providers.default_model:
            return chat.providers.default_model
    chat.providers.resolve(model)
    return model


async def create_message(chat: NodeChat, request: Request) -> JSONResponse | SSEResponse:
    """``POST /v1/messages`` (any query string, any ``anthropic-version``; ``anthropic-beta``
    goes on to an Anthropic upstream only)."""
    body = request.json()
    turn = anthropic_turn(body, request.user_id, chat.settings, stateless_tools(chat),
                          request.headers.get("anthropic-beta", ""))
    turn.request_id = request.request_id
    turn.model = anthropic_model(chat, turn.model)
    encoder = AnthropicEncoder(body["model"], -(-estimate_input({"messages": turn.messages}) // 4))
    return stateless_response(chat, turn, encoder, body.get("stream") is True)


async def count_tokens(chat: NodeChat, request: Request) -> JSONResponse:
    """``POST /v1/messages/count_tokens``: an Anthropic upstream's own count; elsewhere an
    estimate that errs high, as Claude Code compacts a conversation by it (too low and it
    never does): UTF-8 bytes / 3 (a CJK character is 3 bytes and about a token), and 1,600
    tokens an image."""
    body = request.json()
    if isinstance(body, dict):
        body = {"max_tokens": 1, **body}
    turn = anthropic_turn(body, request.user_id, chat.settings, [])
    provider, name = chat.providers.resolve(anthropic_model(chat, turn.model))
    if isinstance(provider, AnthropicProvider):
        asked = {k: v for k, v in body.items() if k in ("messages", "system", "tools", "tool_choice", "thinking")
                 } | {"model": name}
        try:
            return JSONResponse({"input_tokens": await provider.count_tokens(
                asked, request.headers.get("anthropic-beta", ""), chat.http())})
        except NodeChatError as exc:
            log.warning("counting tokens: %s; estimating instead", exc.message)
    text = compact_json([m.get("content") if isinstance(m.get("content"), str) else
                         [p for p in m["content"] or () if p.get("type") == "text"] for m in turn.messages])
    images = sum(1 for m in turn.messages if isinstance(m.get("content"), list)
                 for p in m["content"] if p.get("type") == "image_url")
    tools = compact_json(turn.client_tools) if turn.client_tools else ""
    calls = compact_json([m.get("tool_calls") for m in turn.messages if m.get("tool_calls")])
    return JSONResponse({"input_tokens": -(-len((text + tools + calls).encode()) // 3) + 1600 * images})


ANTHROPIC_ROUTES = Routes("/v1/messages", anthropic_errors, (
    ("POST", "/v1/messages", create_message, "token"),
    ("POST", "/v1/messages/count_tokens", count_tokens, "token"),
), "anthropic")


###############################################################################
# Protocol: OpenAI /v1/responses (OpenAI's newer clients: the Agents SDK, Codex)
###############################################################################


def responses_turn(body: Any, user_id: str, settings: Settings, server_tools: list[Tool],
                   history: list[dict] = ()) -> tuple[Turn, list[dict]]:
    """A Responses request as a turn: ``instructions`` and ``developer`` messages as system
    messages, ``function_call`` and ``function_call_output`` items as tool calls and
    results, reasoning items dropped, flat function tools, ``text.format`` as
    ``response_format``.  After ``history`` (a ``previous_response_id``'s), and with the
    conversation so far without the instructions: what the response keeps, as OpenAI does
    (instructions are not carried over)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_body")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise BadRequest("'model' must be a string", code="invalid_model")
    for key in ("conversation", "prompt"):  # kept elsewhere (OpenAI's Conversations, prompt templates): never ignored
        if body.get(key) is not None:
            raise BadRequest(f"'{key}' is not supported here; send the input (and previous_response_id)",
                             code="unsupported_parameter")
    if body.get("background") is True:
        raise BadRequest("'background' is not supported here; stream the response instead", code="unsupported_parameter")
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array of items", code="invalid_input")
    check_messages([*history, *items], settings)
    conversation = list(history)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{index}] must be an object", code="invalid_input")
        responses_item(item, conversation)
    messages = [{"role": "system", "content": body["instructions"]}] \
        if isinstance(body.get("instructions"), str) and body["instructions"] else []
    messages += conversation
    check_messages(messages, settings)  # instructions and function_call_output too
    if body.get("max_output_tokens") is not None and (type(body["max_output_tokens"]) is not int
                                                      or body["max_output_tokens"] < 1):
        raise BadRequest("'max_output_tokens' must be a positive integer", code="invalid_max_output_tokens")
    params: dict[str, Any] = {}
    for key, name in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                      ("parallel_tool_calls", "parallel_tool_calls"), ("prompt_cache_key", "prompt_cache_key")):
        if body.get(key) is not None:
            params[name] = body[key]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        params["tool_choice"] = {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    elif choice in ("auto", "required", "none"):
        params["tool_choice"] = choice
    form = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(form, dict) and form.get("type") == "json_schema":
        params["response_format"] = {"type": "json_schema", "json_schema": {
            k: form[k] for k in ("name", "schema", "strict", "description") if k in form}}
    elif isinstance(form, dict) and form.get("type") == "json_object":
        params["response_format"] = {"type": "json_object"}
    return Turn(messages=one_system_message(messages), user_id=user_id, model=body.get("model"),
                tools=server_tools, client_tools=responses_tools(body.get("tools")), params=params,
                protocol="responses",
                max_steps=settings.max_steps if server_tools else 1), conversation


def responses_item(item: dict, messages: list[dict]) -> None:
    """One input item onto the chat messages: consecutive function calls are one assistant
    message, as chat completions has them."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        role = "system" if role == "developer" else role
        if role not in ("user", "assistant", "system"):
            raise BadRequest("a message's role must be user, assistant, system or developer", code="invalid_input")
        content = item.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif part.get("type") == "input_image" and isinstance(part.get("image_url"), str):
                    parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
                elif part.get("type") == "input_file" and str(part.get("file_data", "")).startswith("data:"):
                    parts.append(file_part(part["file_data"], str(part.get("filename") or "attachment")))
            content = "".join(p["text"] for p in parts) if all(p["type"] == "text" for p in parts) else parts
        messages.append({"role": role, "content": content if isinstance(content, (str, list)) else ""})
    elif kind == "function_call":
        arguments = item.get("arguments", "")
        call = {"id": str(item.get("call_id", "")), "type": "function", "function": {
            "name": str(item.get("name", "")),
            "arguments": arguments if isinstance(arguments, str) else compact_json(arguments)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # its text and its calls: one message
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                         "content": output if isinstance(output, str) else compact_json(output)})
    elif kind != "reasoning":  # reasoning items: the upstream makes its own
        raise BadRequest(f"input items of type {str(kind)[:40]!r} are not supported here", code="invalid_input")


def responses_tools(tools: Any) -> list[dict]:
    """Flat function tools as chat tools; OpenAI's hosted tools cannot run elsewhere: 400."""
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRequest("'tools' must be an array", code="invalid_tools")
    hosted = [str(t.get("type")) for t in tools if t.get("type") != "function"]
    if hosted:
        raise BadRequest(f"tools: these are not available here: {', '.join(hosted[:5])}", code="invalid_tools")
    if not all(isinstance(t.get("name"), str) and t["name"] for t in tools):
        raise BadRequest("tools: every function tool needs a name", code="invalid_tools")
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                              if k in t}} for t in tools]


class ResponsesEncoder:
    """The Responses stream: ``response.created`` and ``.in_progress``; each output item
    added, its deltas, then done; ``response.completed`` (``.incomplete`` for a length cut)
    with the whole output and usage; a ``sequence_number`` on every event; no ``[DONE]``.
    Not streaming: the Response object the stream would have ended with."""

    def __init__(self, model: str, body: dict, id: str | None = None, created: int | None = None):
        self.id = id or "resp_" + uuid.uuid4().hex
        self.created = int(time.time()) if created is None else created
        self.model = model
        self.echo = {"parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
                     "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                     "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
                     "previous_response_id": body.get("previous_response_id"), "store": body.get("store") is not False}
        self.output: list[dict] = []
        self._sequence = itertools.count()
        self._items = itertools.count()
        self._open: dict | None = None  # the message item being written
        self._final_frames: list[bytes] | None = None

    def start(self) -> list[bytes]:
        response = self._response("in_progress")
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def encode(self, event: Event) -> list[bytes]:
        match event:
            case TextDelta(text=text):
                frames = self._open_item("message")
                item = self._open
                item["content"][0]["text"] += text
                return frames + [self._event("response.output_text.delta", item_id=item["id"],
                                             output_index=len(self.output) - 1, content_index=0, delta=text,
                                             logprobs=[])]
            case Fallback(model=model):
                self.model = model
            case ReasoningDelta(text=text) if text:  # a reasoning item with its text, as open models' have
                frames = self._open_item("reasoning")
                item = self._open
                item["content"][0]["text"] += text
                return frames + [self._event("response.reasoning_text.delta", item_id=item["id"],
                                             output_index=len(self.output) - 1, content_index=0, delta=text)]
            case ToolCall(client_side=True):
                frames = self._close()
                item = {"id": self._item_id("fc"), "type": "function_call", "status": "in_progress",
                        "call_id": event.id, "name": event.name, "arguments": ""}
                self.output.append(item)
                at = len(self.output) - 1
                frames.append(self._event("response.output_item.added", output_index=at, item=dict(item)))
                if event.arguments:
                    frames.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                              output_index=at, delta=event.arguments))
                item.update(arguments=event.arguments, status="completed")
                return frames + [
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                arguments=event.arguments),
                    self._event("response.output_item.done", output_index=at, item=item)]
            case Finished():
                self.final(event)
                return self._final_frames
        return []

    def final(self, event: Finished) -> dict:
        """The Response the turn ended with (worked out once: it is kept before it goes out)."""
        if self._final_frames is None:
            frames = self._close()
            cut = event.reason in ("length", "budget")
            response = self._response("incomplete" if cut else "completed", event.usage)
            if cut:
                response["incomplete_details"] = {"reason": "max_output_tokens"}
            self._final_frames = frames + [self._event("response.incomplete" if cut else "response.completed",
                                                       response=response)]
        return self._last

    def end(self) -> list[bytes]:
        return []

    def error(self, err: NodeChatError) -> list[bytes]:
        frames = self._close("incomplete")
        response = self._response("failed")
        response["error"] = {"code": err.code or "server_error", "message": err.message}
        return frames + [self._event("response.failed", response=response)]

    async def completion(self, events: AsyncIterator[Event]) -> dict:
        final: dict | None = None
        async for event in events:
            self.encode(event)
            if type(event) is Finished:
                final = self._last
        return final or self._response("completed")

    def _open_item(self, kind: str) -> list[bytes]:
        """Open a ``message`` or ``reasoning`` item (closing the other kind) with its one part."""
        if self._open is not None:
            if self._open["type"] == kind:
                return []
            frames = self._close()
        else:
            frames = []
        if kind == "message":
            item = {"id": self._item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": [{"type": "output_text", "text": "", "annotations": []}]}
        else:
            item = {"id": self._item_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}]}
        self.output.append(item)
        self._open = item
        at = len(self.output) - 1
        return frames + [self._event("response.output_item.added", output_index=at, item={**item, "content": []}),
                         self._event("response.content_part.added", item_id=item["id"], output_index=at,
                                     content_index=0, part=dict(item["content"][0]))]

    def _close(self, status: str = "completed") -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        at, part = len(self.output) - 1, item["content"][0]
        item["status"] = status
        done = self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                           text=part["text"], logprobs=[]) if item["type"] == "message" else \
            self._event("response.reasoning_text.done", item_id=item["id"], output_index=at, content_index=0,
                        text=part["text"])
        return [done, self._event("response.content_part.done", item_id=item["id"], output_index=at,
                                  content_index=0, part=part),
                self._event("response.output_item.done", output_index=at, item=item)]

    def _response(self, status: str, usage: Usage | None = None) -> dict:
        response = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                    "model": self.model, "output": list(self.output), **self.echo, "usage": None,
                    "error": None, "incomplete_details": None}
        if usage is not None:
            response["usage"] = {"input_tokens": usage.input, "input_tokens_details": {"cached_tokens": usage.cached},
                                 "output_tokens": usage.output,
                                 "output_tokens_details": {"reasoning_tokens": usage.reasoning},
                                 "total_tokens": usage.total}
        self._last = response
        return response

    def _event(self, kind: str, **fields: Any) -> bytes:
        return sse_event(kind, {"type": kind, "sequence_number": next(self._sequence), **fields})

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.id.removeprefix('resp_')}_{next(self._items)}"


async def create_response(chat: NodeChat, request: Request) -> JSONResponse | SSEResponse:
    """``POST /v1/responses``, stream and not; kept (``store``, true unless false) for a
    ``previous_response_id`` to continue, and for GET and DELETE."""
    body = request.json()
    history = []
    if isinstance(body, dict) and body.get("previous_response_id") is not None:
        history = (await kept_response(chat, request.user_id, body["previous_response_id"],
                                       "previous_response_not_found"))["messages"]
        size = len(compact_json(history)) + len(request.body)
        if size > chat.settings.max_body_bytes:  # kept, it would grow with every link of the chain
            raise PayloadTooLarge(f"the conversation is {size} bytes with this input; at most "
                                  f"{chat.settings.max_body_bytes} (max_body_bytes) are continued: start a new one",
                                  code="conversation_too_large")
    turn, conversation = responses_turn(body, request.user_id, chat.settings, stateless_tools(chat), history)
    turn.request_id = request.request_id
    turn.model = turn.model or chat.providers.default_model
    chat.providers.resolve(turn.model)
    encoder = ResponsesEncoder(turn.model, body)
    if body.get("store") is False or not hasattr(chat.store, "put_response"):
        return stateless_response(chat, turn, encoder, body.get("stream") is True)

    async def keeping() -> AsyncIterator[Event]:
        """The turn's events; the response is kept before its end goes out (a client may send
        its ``previous_response_id`` as soon as it reads it)."""
        async with contextlib.aclosing(run_turn(chat, turn)) as events:
            async for event in events:
                if type(event) is Finished:
                    response = encoder.final(event)
                    messages = list(conversation)
                    for item in response["output"]:
                        responses_item(item, messages)
                    await chat.store.put_response(turn.user_id, encoder.id,
                                                  {"messages": messages, "response": response})
                yield event

    return stateless_response(chat, turn, encoder, body.get("stream") is True, keeping)


async def kept_response(chat: NodeChat, user_id: str, response_id: Any, code: str = "response_not_found") -> dict:
    """The caller's kept response; NotFound for anyone else's, as for one never made."""
    if not isinstance(response_id, str):
        raise BadRequest("a response id must be a string", code="invalid_response_id")
    get = getattr(chat.store, "get_response", None)
    record = await get(user_id, response_id) if get is not None and valid_id(response_id) else None
    if record is None:
        raise NotFound(f"Response with id '{response_id[:100]}' not found.", code=code)
    return record


async def retrieve_response(chat: NodeChat, request: Request) -> JSONResponse:
    """``GET /v1/responses/{id}``: the Response as it ended."""
    return JSONResponse((await kept_response(chat, request.user_id, request.params["id"]))["response"])


async def delete_response(chat: NodeChat, request: Request) -> JSONResponse:
    """``DELETE /v1/responses/{id}``: a later ``previous_response_id`` to it is a 404."""
    response_id = request.params["id"]
    delete = getattr(chat.store, "delete_response", None)
    if delete is None or not valid_id(response_id) or not await delete(request.user_id, response_id):
        raise NotFound(f"Response with id '{response_id[:100]}' not found.", code="response_not_found")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


RESPONSES_ROUTES = Routes("/v1/responses", openai_errors, (
    ("POST", "/v1/responses", create_response, "token"),
    ("GET", "/v1/responses/{id}", retrieve_response, "token"),
    ("DELETE", "/v1/responses/{id}", delete_response, "token"),
), "responses")


###############################################################################
# Protocol: /api/chat (the seed's SSE and the AI SDK UI stream), conversations, memories
###############################################################################


def api_chat_turn(body: Any, user_id: str, settings: Settings, tools: list[Tool], ui_stream: bool) -> Turn:
    """A ``/api/chat`` body (seed 003, or a ``useChat`` request): UIMessages, a conversation
    (``conversationId``, or the AI SDK's chat ``id``), memory, the agent's tools."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("Missing messages", code="missing_messages")
    check_messages(body["messages"], settings)
    conversation_id = body.get("conversationId") or (body.get("id") if ui_stream else None)
    if conversation_id is not None:
        validate_id(conversation_id, "conversation id")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", code="invalid_model")
    return Turn(messages=decode_ui_messages(body["messages"]), user_id=user_id, model=model,
                tools=tools, conversation_id=conversation_id, remember=True,
                system=settings.system_prompt, max_steps=settings.max_steps, capped=True,
                regenerate=body.get("trigger") == "regenerate-message", params=response_format(body),
                protocol="aisdk" if ui_stream else "seed")


def response_format(body: dict) -> dict:
    """An agent request's ``response_format`` (OpenAI's: ``json_schema`` or ``json_object``)
    as the model's parameter: the answer's shape, on every step (a model calling tools
    answers in it at the end)."""
    form = body.get("response_format")
    if form is None:
        return {}
    if not isinstance(form, dict) or form.get("type") not in ("json_schema", "json_object", "text") or (
            form["type"] == "json_schema" and not isinstance(form.get("json_schema"), dict)):
        raise BadRequest('response_format: {"type": "json_schema", "json_schema": {"name", "schema"}} '
                         'or {"type": "json_object"}', code="invalid_response_format")
    return {"response_format": form}


def wants_ui_stream(query: Mapping[str, str], headers: Mapping[str, str], body: Any = None) -> bool:
    """AI SDK UI message stream or the seed's events: ``?protocol=`` / header, else the
    body's ``trigger`` (before the body is read: the AI SDK's own User-Agent, if sent)."""
    explicit = stream_choice(query, headers)
    if explicit is not None:
        return explicit
    if body is None:
        return ai_sdk_agent(headers)
    return isinstance(body, dict) and "trigger" in body


def stream_choice(query: Mapping[str, str], headers: Mapping[str, str]) -> bool | None:
    """The client's explicit choice, if any: ``?protocol=ui|seed`` or ``X-Nodechat-Stream``."""
    explicit = query.get("protocol") or headers.get("x-nodechat-stream")
    return explicit == "ui" if explicit in ("ui", "seed") else None


def ai_sdk_agent(headers: Mapping[str, str]) -> bool:
    return "ai-sdk/" in headers.get("user-agent", "")


UI_ROLES = frozenset({"user", "assistant", "system"})


def decode_ui_messages(messages: list) -> list[dict]:
    """OpenAI-shaped messages from AI SDK UIMessages; BadRequest("Invalid messages") otherwise.

    v5 messages carry only ``parts``; v4 ones a ``content`` string (and maybe
    ``toolInvocations``).  Each message's ``id`` is kept as ``ui_id`` so a resent history is
    not stored twice.
    """
    decoded = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in UI_ROLES:
            raise BadRequest("Invalid messages", code="invalid_messages")
        role, content, parts = message["role"], message.get("content"), message.get("parts")
        if isinstance(content, str) and not (isinstance(parts, list) and parts and role == "assistant"):
            out = [{"role": role, "content": content}]
            if role == "assistant" and isinstance(message.get("toolInvocations"), list):
                out = _assistant_steps([[{"type": "tool-invocation", "toolInvocation": t}
                                         for t in message["toolInvocations"]]], content)
        elif isinstance(parts, list):
            out = _from_parts(role, parts)
        else:
            raise BadRequest("Invalid messages", code="invalid_messages")
        if isinstance(message.get("id"), str) and out:
            out[0]["ui_id"] = message["id"]
        decoded += out
    return decoded


def _from_parts(role: str, parts: list) -> list[dict]:
    if not all(isinstance(p, dict) for p in parts):
        raise BadRequest("Invalid messages", code="invalid_messages")
    if role != "assistant":
        return [{"role": role, "content": content_from_parts(parts)}]
    steps: list[list[dict]] = [[]]
    for part in parts:
        if part.get("type") == "step-start" and steps[-1]:
            steps.append([])
        else:
            steps[-1].append(part)
    return _assistant_steps(steps)


def _assistant_steps(steps: list[list[dict]], text: str = "") -> list[dict]:
    """One assistant message per step, each followed by its tool results."""
    out = []
    for step in steps:
        texts = [p["text"] for p in step if p.get("type") == "text" and isinstance(p.get("text"), str)]
        calls, results = [], []
        for part in step:
            call = _ui_tool_part(part)
            if call is None:
                continue
            call_id, name, args, output, error = call
            calls.append(ToolCall(call_id, name, compact_json(args)))
            if output is not None or error is not None:
                results.append(ToolResult(call_id, name, error if error is not None else output,
                                          is_error=error is not None))
        if texts or calls or text:
            out.append(assistant_message("".join(texts) or text, calls))
            out += [tool_message(r) for r in results]
            text = ""
    return out


def _ui_tool_part(part: dict) -> tuple | None:
    """(id, name, input, output, error) of a v5 ``tool-*``/``dynamic-tool`` or v4 invocation part."""
    kind = str(part.get("type", ""))
    if kind == "tool-invocation" and isinstance(part.get("toolInvocation"), dict):
        inv = part["toolInvocation"]
        return (str(inv.get("toolCallId", "")), str(inv.get("toolName", "")), inv.get("args") or {},
                inv.get("result") if inv.get("state") == "result" else None, None)
    if kind == "dynamic-tool" or kind.startswith("tool-"):
        name = part.get("toolName") if kind == "dynamic-tool" else kind[5:]
        state = part.get("state")
        return (str(part.get("toolCallId", "")), str(name), part.get("input") or {},
                part.get("output") if state == "output-available" else None,
                part.get("errorText") if state == "output-error" else None)
    return None


class ChatSSEEncoder:
    """``/api/chat`` events in the seed's shape: text, reasoning, tool-call, tool-result, finish.

    Readers split the body on newlines and ``JSON.parse`` each ``data:`` line (seed 003), so
    every frame is one line of JSON and there is no ``[DONE]`` marker.
    """

    def __init__(self, conversation_id: str | None = None, message_id: str | None = None):
        self.message_id = message_id or new_id("msg")
        self.conversation_id = conversation_id

    def start(self) -> list[bytes]:
        return []

    def encode(self, event: Event) -> list[bytes]:
        match event:
            case TextDelta(text=text):
                return [sse_json({"type": "text", "content": text, "id": self.message_id})]
            case ReasoningDelta(text=text) if text:
                return [sse_json({"type": "reasoning", "content": text, "id": self.message_id})]
            case ToolCall(id=call_id, name=name):
                args = event.args
                return [sse_json({"type": "tool-call", "toolCallId": call_id, "toolName": name,
                                  "args": event.arguments if args is None else args})]
            case ToolResult(id=call_id, name=name, result=result, is_error=is_error):
                frame = {"type": "tool-result", "toolCallId": call_id, "toolName": name,
                         "result": result}
                return [sse_json({**frame, "isError": True} if is_error else frame)]
            case Finished(reason=reason, usage=usage, note=note):
                usage = (usage or Usage()).openai()
                frame = {"type": "finish", "id": self.message_id, "reason": reason, "usage": usage}
                if note:
                    frame["notice"] = note
                if self.conversation_id:
                    frame["conversationId"] = self.conversation_id
                return [sse_json({"type": "usage", "usage": usage, "id": self.message_id}), sse_json(frame)]
        return []

    def end(self) -> list[bytes]:
        return []

    def error(self, err: NodeChatError) -> list[bytes]:
        return [sse_json({"type": "error", "error": err.message, "id": self.message_id})]


UI_REASONS = types.MappingProxyType({"stop": "stop", "length": "length", "tool_calls": "tool-calls",
              "content_filter": "content-filter", "max_steps": "tool-calls", "budget": "length"})


class UIStreamEncoder:
    """The AI SDK v5 UI message stream that a stock ``useChat`` reads with no adapter.

    The client validates each chunk strictly: only the protocol's keys, no nulls, and a
    delta only after its ``*-start``; so text and reasoning parts are opened and closed here.
    """

    headers = (("x-vercel-ai-ui-message-stream", "v1"),)

    def __init__(self, dynamic_tools: Iterable[str] = (), message_id: str | None = None):
        self.message_id = message_id or str(uuid.uuid4())
        self.dynamic = frozenset(dynamic_tools)
        self._parts = itertools.count()  # part ids only need to differ within one message
        self._step = False
        self._bad_input: set[str] = set()
        self._part: tuple[str, str] | None = None  # ("text" | "reasoning", id) while open

    def start(self) -> list[bytes]:
        return [sse_json({"type": "start", "messageId": self.message_id})]

    def encode(self, event: Event) -> list[bytes]:
        match event:
            case TextDelta(text=text):
                return self._delta("text", text)
            case ReasoningDelta(text=text) if text:
                return self._delta("reasoning", text)
            case ToolCall(id=call_id, name=name):
                extra = {"dynamic": True} if name in self.dynamic else {}
                frames = self._open_step() + self._close_part() + [
                    sse_json({"type": "tool-input-start", "toolCallId": call_id, "toolName": name, **extra})]
                args = event.args
                if args is None:  # what the protocol has for input the model got wrong
                    self._bad_input.add(call_id)
                    return frames + [sse_json({
                        "type": "tool-input-error", "toolCallId": call_id, "toolName": name,
                        "input": event.arguments, "errorText": "the arguments are not valid JSON", **extra})]
                return frames + [sse_json({"type": "tool-input-available", "toolCallId": call_id,
                                           "toolName": name, "input": args, **extra})]
            case ToolResult(id=call_id, name=name, result=result, is_error=is_error):
                extra = {"dynamic": True} if name in self.dynamic else {}
                if call_id in self._bad_input:  # the input error already ended this call
                    return []
                if is_error:
                    return [sse_json({"type": "tool-output-error", "toolCallId": call_id,
                                      "errorText": str(result), **extra})]
                return [sse_json({"type": "tool-output-available", "toolCallId": call_id,
                                  "output": result, **extra})]
            case StepFinished():
                return self._close_step()
            case Finished(reason="stopped"):  # POST /api/chat/{id}/stop
                return self._close_step() + [sse_json({"type": "abort"})]
            case Finished(reason=reason, usage=usage, model=model, note=note):
                # useChat merges messageMetadata into message.metadata (ai 5.0.0 and later)
                metadata = {k: v for k, v in (("usage", usage and usage.ui()), ("model", model),
                                              ("notice", note)) if v}
                finish = {"type": "finish", "finishReason": UI_REASONS.get(reason, "other")}
                return self._close_step() + [sse_json({**finish, "messageMetadata": metadata} if metadata
                                                      else finish)]
        return []

    def end(self) -> list[bytes]:
        return [SSE_DONE]

    def error(self, err: NodeChatError) -> list[bytes]:
        frames = self._close_part() + [sse_json({"type": "error", "errorText": err.message})]
        return frames + self._close_step() + [sse_json({"type": "finish", "finishReason": "error"}),
                                              SSE_DONE]

    def _delta(self, kind: str, text: str) -> list[bytes]:
        frames = self._open_step()
        if self._part is None or self._part[0] != kind:
            frames += self._close_part()
            self._part = (kind, f"{kind}-{next(self._parts)}")
            frames.append(sse_json({"type": f"{kind}-start", "id": self._part[1]}))
        frames.append(sse_json({"type": f"{kind}-delta", "id": self._part[1], "delta": text}))
        return frames

    def _open_step(self) -> list[bytes]:
        if self._step:
            return []
        self._step = True
        return [sse_json({"type": "start-step"})]

    def _close_part(self) -> list[bytes]:
        if self._part is None:
            return []
        kind, part_id = self._part
        self._part = None
        return [sse_json({"type": f"{kind}-end", "id": part_id})]

    def _close_step(self) -> list[bytes]:
        if not self._step:
            return []
        frames = self._close_part()
        self._step = False
        return frames + [sse_json({"type": "finish-step"})]


def api_chat_errors(err: NodeChatError, request: Request) -> Any:
    """``POST /api/chat``'s error body, in the shape its stream would have had: plain text
    for the AI SDK (which shows the response text as the error), ``{"error": text}`` for the
    seed's clients.  An explicit choice wins, then the AI SDK's own User-Agent, then the
    body's ``trigger``; before the body is read (401, 403), a small body already on its way
    is worth a look for it (:class:`SmallBodyErrorResponse`)."""
    ui = stream_choice(request.query, request.headers)
    if ui is None and ai_sdk_agent(request.headers):
        ui = True
    if ui is None:
        if request.body is None:
            return SmallBodyErrorResponse(err, request.headers)
        body = None
        with contextlib.suppress(NodeChatError):
            body = request.json()
        ui = wants_ui_stream(request.query, request.headers, body)
    return text_error(err) if ui else json_error(err)


def text_error(err: NodeChatError) -> TextResponse:
    return TextResponse(err.message, err.status, error_headers(err))


@dataclass
class SmallBodyErrorResponse:
    """An error for ``/api/chat`` in the shape its unread body's ``trigger`` asks for.  A
    large or slow body is not waited for: it gets ``{"error": text}``."""

    err: NodeChatError
    headers: Mapping[str, str]
    max_bytes: int = 64 * 1024
    seconds: float = 1.0

    async def __call__(self, send: Send, receive: Receive) -> None:
        body = await self._peek(receive)
        ui = body is not None and wants_ui_stream({}, self.headers, body)
        await (text_error(self.err) if ui else json_error(self.err))(send, receive)

    async def _peek(self, receive: Receive) -> Any:
        if int(self.headers.get("content-length") or 0) > self.max_bytes:
            return None
        chunks, size = [], 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.seconds):
                while size <= self.max_bytes:
                    message = await receive()
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if not message.get("more_body"):
                        with contextlib.suppress(ValueError):
                            return parse_json(b"".join(chunks))
                        break
        return None


@dataclass(eq=False)  # a reader is its own key in ``stream.readers``
class ReplayResponse:
    """A reader of a :class:`TurnStream`: every byte from the turn's first, then each as it
    comes, ending with the turn's end.  Leaving affects no one else, the turn included.

    The ``POST`` that started the turn is its ``owner``: a failure before the turn's first
    byte is its HTTP error (as ``stream_sse`` gives); any other reader is told in-stream.
    """

    streaming = True  # counted in nodechat_active_streams

    stream: TurnStream
    headers: tuple[tuple[bytes, bytes], ...] = ()
    keepalive: float = 15.0
    owner: bool = False
    out: SSEWriter | None = field(default=None, init=False)
    position: int = field(default=0, init=False)  # the next chunk this reader is to get
    writing_since: float | None = field(default=None, init=False)  # a write of the turn's is under way
    stalled: bool = field(default=False, init=False)  # its client once stopped reading: never lent again

    async def __call__(self, send: Send, receive: Receive) -> None:
        stream, task = self.stream, asyncio.current_task()
        watcher = asyncio.create_task(watch_disconnect(receive, task))
        out = self.out = SSEWriter(send, self.headers, self.keepalive)
        self.position = stream.readers.setdefault(self, stream.first)
        try:
            while True:
                end = stream.end
                if self in stream.cut:  # too far behind a full stream: ended, without its end
                    await out.write(b"", more=False)
                    return
                if self.position < end:  # in slices: a replay is never one copy of the whole buffer
                    data, upto = stream.since(self.position, REPLAY_SLICE_BYTES)
                    more = not (stream.done and upto == end)
                    self.position = stream.readers[self] = upto
                    await out.write(data, more=more)
                    if not more:
                        return
                elif stream.done:
                    if stream.failure is not None and self.owner and not out.started:
                        raise stream.failure
                    await out.write(stream.failure_frames, more=False)
                    return
                elif self.owner and out.started and stream.sink is None and not self.stalled:
                    await stream.lend(self)  # the turn writes to this reader while it keeps up
                else:
                    await stream.wait()
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                task.uncancel()  # the client left: the turn goes on without it
                return
            raise
        finally:
            if stream.sink is self:
                stream.hand_back()
            if out.writing:  # a write of the turn's is under way: let it end first
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(out.idle(), self.keepalive)
            watcher.cancel()
            out.close()
            stream.readers.pop(self, None)

    async def catch_up(self) -> None:
        """From the turn's task (``TurnStream.deliver``): what this reader has not had yet."""
        stream = self.stream
        data, end = stream.since(self.position)
        self.writing_since = time.monotonic()
        try:
            await self.out.write(data)
        except asyncio.CancelledError:
            if not stream.unsticking or stream.stopping:
                raise
            stream.unsticking = False  # lend() let go of a stalled client: not a stop
            asyncio.current_task().uncancel()
            return
        except Exception:  # its client is gone: its own task ends it
            stream.hand_back()
            return
        finally:
            self.writing_since = None
        self.position = stream.readers[self] = end


async def api_chat(chat: NodeChat, request: Request) -> SSEResponse | ReplayResponse:
    """``POST /api/chat``.  A turn on a stored conversation belongs to the server (unless
    ``resume`` is off): it goes on when its client leaves, and is read through its
    :class:`TurnStream`, by this request and by any ``GET /api/chat/{id}/stream``."""
    body = request.json()
    ui_stream = wants_ui_stream(request.query, request.headers, body)
    user = acting_user(chat, request, body) if isinstance(body, dict) else request.user_id
    tools = chat.tools.offered(chat.settings.tools, body.get("tools") if isinstance(body, dict) else None)
    turn = api_chat_turn(body, user, chat.settings, tools, ui_stream)
    turn.request_id = request.request_id
    chat.providers.resolve(turn.model)
    cid = turn.conversation_id
    headers = ((b"x-conversation-id", cid.encode()),) if cid else ()
    if ui_stream:
        encoder = UIStreamEncoder(t.name for t in chat.tools if t.dynamic)
        headers += tuple((k.encode(), v.encode()) for k, v in encoder.headers)
    else:
        encoder = ChatSSEEncoder(cid)
    keepalive = chat.settings.keepalive_seconds
    if cid is not None:
        turn.message_id = encoder.message_id  # the answer is saved under the id its stream announces
    if cid is None or not chat.settings.resume:  # the turn ends with its connection
        return SSEResponse(run_turn(chat, turn), encoder, headers, keepalive)
    lost = NodeChatError("the server writing this answer stopped; reload the conversation",
                         code="turn_lost")
    orphaned = UIStreamEncoder().error(lost) if ui_stream else ChatSSEEncoder(cid, encoder.message_id).error(lost)
    stream = TurnStream(encoder.message_id, ui_stream, chat.settings.resume_buffer_bytes, b"".join(orphaned))
    admitted = await chat.turns.enter(turn, stream)
    response = ReplayResponse(stream, headers, keepalive, owner=True)
    stream.reader(response)
    stream.task = spawn(chat.turns.tasks, run_detached(chat, turn, admitted, encoder, stream))
    return response


async def resume_stream(chat: NodeChat, request: Request) -> ReplayResponse | JSONResponse:
    """``GET /api/chat/{id}/stream`` (``useChat({resume: true})`` on every mount): the
    caller's running turn on that conversation from its first byte, else 204, the one
    answer the AI SDK takes for "nothing to resume" (and which tells nothing of other
    users' conversations).  An internal token names the user with ``?userId=``."""
    cid = request.params["id"]
    user = acting_user(chat, request, {"userId": request.query.get("userId")})
    stream = await chat.turns.stream(user, cid) if valid_id(cid) else None
    if stream is None:
        return JSONResponse(None, 204)
    headers = ((b"x-conversation-id", cid.encode()),)
    if stream.ui:
        headers += tuple((k.encode(), v.encode()) for k, v in UIStreamEncoder.headers)
    response = ReplayResponse(stream, headers, chat.settings.keepalive_seconds)
    stream.reader(response)
    return response


async def stop_turn(chat: NodeChat, request: Request) -> JSONResponse:
    """``POST /api/chat/{id}/stop``, body optional (``{"activeStreamId"}``: stop only that
    answer's turn): the AI SDK's pattern for a stop that is not a disconnect.  The turn saves
    its partial answer, marked ``stopped``, before this answers; every reader gets its end.
    Always ``{"success": true}``."""
    cid = request.params["id"]
    body = {}
    with contextlib.suppress(NodeChatError):  # the body is optional, and never an error
        body = request.json() if request.body else {}
    body = body if isinstance(body, dict) else {}
    stream_id = body.get("activeStreamId")
    user = acting_user(chat, request, {"userId": body.get("userId") or request.query.get("userId")})
    if valid_id(cid) and (stream_id is None or isinstance(stream_id, str)):  # another id stops nothing
        await chat.turns.stop(user, cid, stream_id)
    return JSONResponse({"success": True})


async def run_detached(chat: NodeChat, turn: Turn, admitted: Admitted, encoder: Any,
                       stream: TurnStream) -> None:
    """An ``/api/chat`` turn as the server's own task: its encoded bytes go to ``stream``,
    whoever reads them, and it ends only by itself, by its limits, by a stop, or when the
    app closes.  A failure before the first byte is the ``POST``'s HTTP error."""
    events = chat.agent.run(turn)
    opened = False
    stream.started = True
    try:
        try:
            if stream.stopping:  # stopped before this task began
                raise asyncio.CancelledError
            first = await anext(events, None)
            opened = True
            await stream.deliver(b"".join(encoder.start() + (encoder.encode(first) if first is not None else [])))
            if first is not None:
                async for event in events:
                    if frames := encoder.encode(event):
                        await stream.deliver(b"".join(frames))
            await stream.deliver(b"".join(encoder.end()))
        except Exception as exc:
            err = client_error(exc)
            if not opened:
                stream.fail(err, b"".join(encoder.start() + encoder.error(err)))
                return
            await stream.deliver(b"".join(encoder.error(err)))
    except asyncio.CancelledError:  # stopped: every reader gets the stream's end
        task = asyncio.current_task()
        while task.cancelling():  # and the turn ends here, normally (a stop may have met lend()'s)
            task.uncancel()
        stream.hand_back()  # the end goes to each reader at its own pace
        await close_quietly(events)  # the agent saves what it said, marked stopped, first
        start = [] if opened else encoder.start()
        stream.push(b"".join(start + encoder.encode(Finished("stopped")) + encoder.end()))
    finally:  # the conversation is free before any reader sees the end: a next turn is not a 409
        stream.finish()
        try:
            await close_quietly(events)
            await asyncio.shield(chat.turns.leave(admitted))
        finally:
            stream.close()


async def close_quietly(events: AsyncIterator[Event]) -> None:
    """Close the agent's generator (which saves a partial answer); a failure is logged."""
    try:
        await events.aclose()
    except Exception as exc:
        log.warning("a stopped turn could not save what it said: %s", client_error(exc).message)


def acting_user(chat: NodeChat, request: Request, body: dict) -> str:
    """``userId`` in the body counts only for internal tokens (or an open server)."""
    claimed = body.get("userId")
    if not isinstance(claimed, str) or not claimed or claimed == request.user_id:
        return request.user_id
    if chat.gate.is_internal(request.headers):
        return validate_id(claimed, "user id")
    log.info("ignoring userId in the body of a caller that is not internal")
    return request.user_id


async def generate_title(chat: NodeChat, request: Request) -> JSONResponse:
    body = request.json()
    body = body if isinstance(body, dict) else {}
    message = body.get("message")
    if isinstance(message, dict):  # a UIMessage: v5 parts or v4 content
        parts = message.get("parts") if isinstance(message.get("parts"), list) else []
        text = message_text({"content": content_from_parts(parts)})
        text = text or (message["content"] if isinstance(message.get("content"), str) else "")
    else:
        text = message if isinstance(message, str) else ""
    if not text.strip():  # as the AI SDK apps do: no text, no model call
        return JSONResponse({"data": "New Chat"})
    model = body.get("model") if isinstance(body.get("model"), str) else None
    await chat.ledger.admit(request.user_id)  # a model call: the rate limit and budget hold
    turn = Turn([], request.user_id, protocol="aisdk", request_id=request.request_id)
    return JSONResponse({"data": await chat.agent.title(text, model, turn=turn)})


async def list_conversations(chat: NodeChat, request: Request) -> JSONResponse:
    """Newest first, ``limit`` (1-1000, default 100) a page; the next page is
    ``?before=<updated_at of the last one>`` while ``has_more``."""
    try:
        limit = int(request.query.get("limit", 100))
    except ValueError:
        raise BadRequest("limit must be a whole number", code="invalid_limit") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000", code="invalid_limit")
    page = await chat.store.list_conversations(request.user_id, limit + 1,
                                               request.query.get("before") or None)
    return JSONResponse({"conversations": page[:limit], "has_more": len(page) > limit})


async def get_conversation(chat: NodeChat, request: Request) -> JSONResponse:
    """The conversation and its messages.  While a turn runs in it (``"active": true``) its
    partial answer is left out: a reloaded page reads that from the turn's stream, and an
    AI SDK client that found it in the history too would show it twice."""
    meta = await own_conversation(chat, request)
    answer = await chat.turns.running(request.user_id, meta["id"])
    messages = await chat.store.load_messages(meta["id"])
    if answer:
        messages = [m for m in messages if m.get("answer_id") != answer]
    usage = sum((Usage.from_record(m.get("usage")) for m in messages if "usage" in m), Usage())
    return JSONResponse({**meta, "messages": messages, "active": answer is not None,
                         "usage": {**usage.record(), "total": usage.total}})


USAGE_EARLIEST = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
USAGE_SPAN = datetime.timedelta(days=400)  # what one GET /api/usage reads at most
USAGE_GROUPS = {"day": lambda e: str(e.get("at", ""))[:10], "model": lambda e: e.get("model"),
                "conversation": lambda e: e.get("conversation"), "user": lambda e: e.get("user")}


async def usage_report(chat: NodeChat, request: Request) -> JSONResponse:
    """``GET /api/usage?from=&to=&group_by=day|model|conversation``: the caller's tokens
    (by default over the current budget period, with the budget).  A caller with an
    ``admin_tokens`` token reads anyone's with ``?user=``, and without it the totals by user."""
    query = request.query
    admin = lookup_token({t: t for t in chat.settings.admin_tokens}, bearer_token(request.headers)) is not None
    if admin:
        user = query.get("user") or None
    else:
        user = await chat.gate.user(request.scope, request.headers, "GET", "session")
        if query.get("user") not in (None, user):
            raise Forbidden("reading another user's usage needs an admin token (admin_tokens)",
                            code="admin_required")
    group = query.get("group_by") or ("user" if admin and user is None else "")
    if group and group not in USAGE_GROUPS:
        raise BadRequest("group_by: use day, model, conversation (or user, with an admin token)",
                         code="invalid_group_by")
    limits = chat.settings.limits(user or "")
    period_start, period_end = budget_window(limits.budget_period)
    start = _parse_time(query["from"], "from").astimezone(datetime.timezone.utc) if query.get("from") \
        else period_start
    end = _parse_time(query["to"], "to").astimezone(datetime.timezone.utc) if query.get("to") else period_end
    if not USAGE_EARLIEST <= start <= end <= start + USAGE_SPAN:
        raise BadRequest("from and to: from before to, at most 400 days apart, from 2000 on",
                         code="invalid_range")
    entries = await chat.ledger.entries(user, start, end)
    report: dict[str, Any] = {"user": user, "from": iso_z(start), "to": iso_z(end),
                              "period": limits.budget_period, "total": usage_summary(entries)}
    if group:
        groups: dict[Any, list[dict]] = {}
        for entry in entries:
            groups.setdefault(USAGE_GROUPS[group](entry), []).append(entry)
        report["groups"] = [{group: key, **usage_summary(part)} for key, part in groups.items()]
    if user is not None and limits.token_budget:
        if (start, end) != (period_start, period_end):
            entries = await chat.ledger.entries(user, period_start, period_end)
        spent = usage_summary(entries)["total_tokens"]
        report["budget"] = {"limit": limits.token_budget, "period": limits.budget_period, "used": spent,
                            "resets_at": iso_z(period_end)}
    return JSONResponse(report)


def usage_summary(entries: list[dict]) -> dict:
    """Tokens and calls of some ledger entries."""
    total = sum((Usage.from_record(e) for e in entries), Usage())
    return {"input_tokens": total.input, "output_tokens": total.output, "cached_tokens": total.cached,
            "reasoning_tokens": total.reasoning, "total_tokens": total.total, "calls": len(entries),
            "estimated_calls": sum(1 for e in entries if e.get("estimated") is True)}


async def delete_conversation(chat: NodeChat, request: Request) -> JSONResponse:
    """Deleting a conversation stops the turn running in it."""
    meta = await own_conversation(chat, request)
    await chat.turns.stop(request.user_id, meta["id"])
    await chat.store.delete_conversation(meta["id"])
    return JSONResponse({"deleted": True, "id": meta["id"]})


async def own_conversation(chat: NodeChat, request: Request) -> dict:
    conversation_id = validate_id(request.params["id"], "conversation id")
    return require_owner(await chat.store.get_conversation(conversation_id), request.user_id)


async def list_memories(chat: NodeChat, request: Request) -> JSONResponse:
    return JSONResponse({"memories": await chat.store.list_memories(request.user_id)})


async def delete_memory(chat: NodeChat, request: Request) -> JSONResponse:
    memory_id = validate_id(request.params["id"], "memory id")
    if not await chat.store.delete_memory(request.user_id, memory_id):
        raise NotFound("memory not found", code="memory_not_found")
    return JSONResponse({"deleted": True, "id": memory_id})


@dataclass
class BytesResponse:
    """A stored attachment's bytes: never a document a browser would render (its type is
    not the client's to choose), cached by the browser (its name is its content)."""

    data: bytes

    async def __call__(self, send: Send, receive: Receive) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"), (b"content-length", str(len(self.data)).encode()),
            (b"x-content-type-options", b"nosniff"), (b"content-security-policy", b"sandbox; default-src 'none'"),
            (b"cache-control", b"private, max-age=31536000, immutable")]})
        await send({"type": "http.response.body", "body": self.data})


async def get_attachment(chat: NodeChat, request: Request) -> BytesResponse:
    """``GET /api/attachments/{sha256}``: an image stored with one of the caller's
    conversations.  Blobs are kept per user, so another user's is a 404 like an unknown one:
    a name computed from a guessed file tells nobody whether someone sent it."""
    digest = request.params["id"]
    data = await chat.store.get_blob(request.user_id, digest) if BLOB_DIGEST.fullmatch(digest) and hasattr(
        chat.store, "get_blob") else None
    if data is None:
        raise NotFound("no such attachment", code="attachment_not_found")
    return BytesResponse(data)


API_CHAT_ROUTES = Routes("/api/", json_error, (
    ("POST", "/api/chat", api_chat, "session", api_chat_errors),
    ("GET", "/api/chat/{id}/stream", resume_stream, "session"),
    ("POST", "/api/chat/{id}/stop", stop_turn, "session"),
    ("POST", "/api/generate-title", generate_title, "session"),
    ("GET", "/api/conversations", list_conversations, "session"),
    ("GET", "/api/conversations/{id}", get_conversation, "session"),
    ("DELETE", "/api/conversations/{id}", delete_conversation, "session"),
    ("GET", "/api/memories", list_memories, "session"),
    ("DELETE", "/api/memories/{id}", delete_memory, "session"),
    ("GET", "/api/attachments/{id}", get_attachment, "session"),
    ("GET", "/api/usage", usage_report, "anyone"),  # checks its caller itself: admin tokens too
), "api")


###############################################################################
# Protocol: /chat WebSocket (NodeTool's messages, MessagePack or JSON)
###############################################################################


def nodetool_turn(frame: dict, user_id: str, settings: Settings, tools: list[Tool], thread_id: str) -> Turn:
    """A NodeTool ``/chat`` message: one user message continuing the thread."""
    check_messages([frame], settings)
    model = frame.get("model") if isinstance(frame.get("model"), str) else None
    return Turn(messages=[nodetool_message(frame)], user_id=user_id, model=model, tools=tools,
                conversation_id=thread_id, remember=True, system=settings.system_prompt,
                max_steps=settings.max_steps, capped=True, protocol="ws", request_id=new_id("req"),
                params=response_format(frame))


def nodetool_message(frame: dict) -> dict:
    """A NodeTool chat message (content: a string or parts) as an OpenAI user message; its
    ``id``, if any, is kept as ``ui_id`` so that a resend is not stored (or answered) twice."""
    message = _nodetool_content(frame)
    if isinstance(frame.get("id"), str) and frame["id"]:
        message["ui_id"] = frame["id"]
    return message


def _nodetool_content(frame: dict) -> dict:
    content = frame.get("content")
    if isinstance(content, str):
        return {"role": "user", "content": content}
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of parts", code="invalid_message")
    return {"role": "user", "content": content_from_parts(content)}


class WSEncoder:
    """NodeTool ``/chat`` messages: chunk, tool_call, tool_result, message, job_update, error.

    Every message carries the turn's ``thread_id``.  A turn ends with exactly one
    ``{"type": "chunk", "content": "", "done": true}``; a workflow's comes right after its
    terminal ``job_update``, before the final message.
    """

    def __init__(self, thread_id: str | None, client_tools: Iterable[str] = ()):
        self.thread_id = thread_id
        self.client_tools = frozenset(client_tools)
        self.done_sent = False
        self._text_tail = f',"done":false,"thread_id":{_encode_json(thread_id)}}}'
        self.usage: Usage | None = None  # the turn's, on its done chunk
        self.model: str | None = None  # ... and the model that answered

    def encode(self, event: Event) -> list[dict]:
        match event:
            case TextDelta(text=text):
                return [self._with_thread({"type": "chunk", "content_type": "text", "content": text,
                                           "done": False})]
            case ReasoningDelta(text=text) if text:
                return [self._with_thread({"type": "chunk", "content_type": "text", "content": text,
                                           "done": False, "thinking": True})]
            case ToolCall(id=call_id, name=name):
                args = event.args
                return [self._with_thread({"type": "tool_call", "tool_call_id": call_id, "name": name,
                                           "args": event.arguments if args is None else args,
                                           "client_tool": name in self.client_tools})]
            case ToolResult(id=call_id, name=name, result=result, is_error=is_error):
                message = {"type": "tool_result", "tool_call_id": call_id, "name": name, "result": result}
                return [self._with_thread({**message, "error": str(result)} if is_error else message)]
            case Saved(message=message):
                return [self._with_thread({**message, "type": "message"})]
            case JobUpdate():
                update = {"type": "job_update", "job_id": event.job_id, "workflow_id": event.workflow_id,
                          "status": event.status}
                for key in ("result", "error", "message", "progress"):
                    if getattr(event, key) is not None:
                        update[key] = getattr(event, key)
                frames = [self._with_thread(update)]
                return frames + self.end() if event.status in TERMINAL_JOB_STATUSES else frames
            case Finished(reason=reason, usage=usage, note=note, model=model):
                self.usage, self.model = usage, model
                if note:  # the budget ran out between two steps, or an image was left out: as NodeTool shows errors
                    return [self._with_thread({"type": "error", "message": note, "error": note,
                                               "code": "budget_exceeded" if reason == "budget" else "notice"})]
        return []

    def text_json(self, text: str) -> str:
        """A text delta's chunk as JSON, from fixed pieces: what ``encode`` and the JSON
        encoder make of it, in 0.14 µs against 2.3 (it is the message sent per token)."""
        return '{"type":"chunk","content_type":"text","content":' + _json_string(text) + self._text_tail

    def start(self) -> list[dict]:
        return []

    def end(self) -> list[dict]:
        """The turn's one done chunk (none if a workflow's terminal update already sent it)."""
        if self.done_sent:
            return []
        self.done_sent = True
        done = {"type": "chunk", "content": "", "done": True}
        if self.usage is not None:
            done["usage"] = self.usage.openai()
        if self.model:
            done["model"] = self.model  # the one that answered (a fallback's, when it fell back)
        return [self._with_thread(done)]

    def error(self, err: NodeChatError) -> list[dict]:
        """NodeTool clients read either ``message`` or ``error``: both carry the text."""
        return [self._with_thread({"type": "error", "message": err.message, "error": err.message,
                                   "code": err.code})]

    def _with_thread(self, message: dict) -> dict:
        message["thread_id"] = self.thread_id
        return message


def ws_message(value: dict, binary: bool) -> Message:
    """The ASGI send message: MessagePack bytes or JSON text, matching how the client spoke."""
    if binary:
        return {"type": "websocket.send", "bytes": msgpack.packb(value, use_bin_type=True, default=str)}
    return {"type": "websocket.send", "text": _encode_json(value)}


class ChatSession:
    """One ``/chat`` WebSocket connection.

    A receive loop decodes each frame on its own (binary: MessagePack, text: JSON) and answers
    control frames at once; chat messages queue (bounded) for one worker, so one turn runs at
    a time and a new message never cancels the running one.  Each turn is its own task, so
    ``stop`` can cancel it while the connection stays open.  Closing, from either side,
    cancels everything the session started.
    """

    def __init__(self, user_id: str, send: Send, settings: Settings,
                 run_turn: Callable[..., AsyncIterator[Event]], offered: Callable[[Any], list[Tool]]):
        self.user_id = user_id
        self.settings = settings
        self.run_turn = run_turn  # run_turn(app, ...): the agent (or a workflow), past the app's Turns
        self.offered = offered  # ToolRegistry.offered: the server's tools a message may use
        self._send = send
        self._guard = SendGuard()
        self.queue: asyncio.Queue = asyncio.Queue(self.settings.ws_queue_size)
        self.client_tools: dict[str, dict] = {}
        self.waiting: dict[str, asyncio.Future] = {}
        self.turn: asyncio.Task | None = None
        self.turn_thread: str | None = None
        self.binary = True  # the encoding of the latest frame, for heartbeats
        self.closed = False

    async def run(self, receive: Receive) -> None:
        worker = asyncio.create_task(self._work(), name="nodechat-ws-worker")
        heartbeat = None
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message["type"] != "websocket.receive":
                    continue
                frame, binary = await self._decode(message)
                if heartbeat is None:  # nothing is sent before the client's first frame
                    heartbeat = asyncio.create_task(self._heartbeat(), name="nodechat-ws-heartbeat")
                if frame is not None:
                    await self._dispatch(frame, binary)
        finally:
            self.closed = True
            tasks = [t for t in (worker, heartbeat, self.turn) if t is not None]
            for task in tasks:
                task.cancel()
            for future in self.waiting.values():
                future.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def send(self, value: dict, binary: bool) -> None:
        await self.send_message(ws_message(value, binary))

    async def send_message(self, message: Message) -> None:
        if self.closed:
            return
        guard = self._guard
        try:
            if guard.busy:
                await guard.wait()
            guard.busy = True
            try:
                await self._send(message)
            finally:
                guard.release()
        except OSError:  # the client is gone; the receive loop will see the disconnect
            self.closed = True

    async def _decode(self, message: Message) -> tuple[dict | None, bool]:
        raw = message.get("bytes")
        binary = raw is not None
        raw = raw if binary else message.get("text") or ""
        self.binary = binary
        if len(raw) > self.settings.max_ws_frame_bytes:
            await self._error(f"frame larger than {self.settings.max_ws_frame_bytes} bytes", binary,
                              "frame_too_large")
            return None, binary
        try:
            frame = (msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=_unknown_ext)
                     if binary else parse_json(raw))
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
            kind = "MessagePack" if binary else "JSON"
            await self._error(f"could not decode the {kind} frame: {exc}", binary, "invalid_frame")
            return None, binary
        if not isinstance(frame, dict):
            await self._error("a frame must be an object (a map)", binary, "invalid_frame")
            return None, binary
        return frame, binary

    async def _dispatch(self, frame: dict, binary: bool) -> None:
        kind = frame.get("type")
        if kind == "ping":
            await self.send({"type": "pong", "ts": time.time()}, binary)
        elif kind == "stop":
            await self._stop(binary)
        elif kind == "client_tools_manifest":
            await self._manifest(frame, binary)
        elif kind == "tool_result":
            future = self.waiting.get(str(frame.get("tool_call_id")))
            if future is None or future.done():
                await self._error("no client tool call is waiting for that tool_call_id", binary,
                                  "unknown_tool_call")
            else:
                future.set_result(frame)
        elif kind in (None, "message"):
            if frame.get("role", "user") != "user" or "content" not in frame:
                await self._error("a chat message needs role 'user' and content", binary, "invalid_message")
                return
            try:
                self.queue.put_nowait((frame, binary))
            except asyncio.QueueFull:
                await self._error(f"{self.queue.maxsize} messages are already waiting; try later",
                                  binary, "busy", frame.get("thread_id"))
        else:
            await self._error(f"unknown message type {kind!r}", binary, "unknown_type")

    async def _stop(self, binary: bool) -> None:
        for future in self.waiting.values():
            future.cancel()
        if self.turn is not None and not self.turn.done():
            self.turn.cancel()
        await self.send({"type": "generation_stopped", "message": "Generation stopped by user",
                         "thread_id": self.turn_thread}, binary)

    async def _manifest(self, frame: dict, binary: bool) -> None:
        tools = frame.get("tools")
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and TOOL_NAME_PATTERN.fullmatch(str(t.get("name", ""))) for t in tools):
            await self._error("tools must be a list of {name, description, parameters}", binary,
                              "invalid_manifest")
            return
        self.client_tools = {t["name"]: t for t in tools}

    async def _work(self) -> None:
        while True:
            frame, binary = await self.queue.get()
            self.turn_thread = frame.get("thread_id") or new_id("thread")
            self.turn = asyncio.create_task(self._turn(frame, binary, self.turn_thread),
                                            name="nodechat-ws-turn")
            await asyncio.wait({self.turn})

    async def _turn(self, frame: dict, binary: bool, thread_id: str) -> None:
        encoder = WSEncoder(thread_id, self.client_tools)
        try:
            validate_id(thread_id, "thread id")
            async for event in self._events(frame, thread_id):
                if type(event) is TextDelta and not binary:
                    await self.send_message({"type": "websocket.send", "text": encoder.text_json(event.text)})
                    continue
                for message in encoder.encode(event):
                    await self.send(message, binary)
        except Exception as exc:
            for message in encoder.error(client_error(exc)):
                await self.send(message, binary)
        finally:
            for message in encoder.end():
                await self.send(message, binary)

    def _events(self, frame: dict, thread_id: str) -> AsyncIterator[Event]:
        turn = nodetool_turn(frame, self.user_id, self.settings,
                             self.offered(frame.get("tools")) + self._client_tools(), thread_id)
        turn.on_title = lambda title: self.send({"type": "title_update", "thread_id": thread_id,
                                                 "title": title}, self.binary)
        workflow = frame.get("workflow_id")
        return self.run_turn(turn, workflow_id=None if workflow is None else str(workflow))

    def _client_tools(self) -> list[Tool]:
        return [self._client_tool(spec) for spec in self.client_tools.values()]

    def _client_tool(self, spec: dict) -> Tool:
        """A tool the client runs: send ``tool_call``, wait for its ``tool_result``."""
        name, timeout = spec["name"], self.settings.client_tool_timeout

        async def ask_client(context: ToolContext, **args: Any) -> Any:
            future = asyncio.get_running_loop().create_future()
            self.waiting[context.call_id] = future
            try:
                reply = await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"client tool {name!r} timed out after {timeout:g} seconds") from None
            finally:
                self.waiting.pop(context.call_id, None)
            if reply.get("ok") is not True:
                raise RuntimeError(f"client tool {name!r} failed: {reply.get('error') or 'ok was not true'}")
            return reply.get("result")

        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return Tool(name, str(spec.get("description", "")), parameters, ask_client, context_param="context")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ws_heartbeat_seconds)
            await self.send({"type": "ping", "ts": time.time()}, self.binary)

    async def _error(self, text: str, binary: bool, code: str, thread_id: str | None = None) -> None:
        for message in WSEncoder(thread_id).error(BadRequest(text, code=code)):
            await self.send(message, binary)


def _unknown_ext(code: int, data: bytes) -> None:
    """MessagePack ext types we do not know (JS ``undefined`` from msgpackr) decode to None."""
    return None


WS_ROUTES = ("/chat", "/ws/chat")


async def chat_websocket(chat: NodeChat, scope: Scope, receive: Receive, send: Send) -> None:
    """``/chat``: a bad or missing token, Host or Origin is accepted, then closed with
    1008 and a reason, so clients see why (a close before accept is only an HTTP 403)."""
    if (await receive())["type"] != "websocket.connect":
        return
    if route_path(scope) not in WS_ROUTES:
        await send({"type": "websocket.close", "code": 1000})
        return
    headers = scope_headers(scope)
    query = scope_query(scope)
    token = bearer_token(headers) or query.get("api_key") or query.get("token")
    try:
        chat.gate.check_browser(scope, headers)
        user = await chat.gate.identify(scope, token)
        reason = None if user else "Missing authentication" if token is None else "Invalid authentication"
    except Forbidden as err:
        user, reason = None, err.message
    await send({"type": "websocket.accept"})
    chat.metrics.requests.inc(("ws", "101" if user else "1008"))  # a session, counted as it opens
    if user is None:
        log.warning("/chat refused (1008): %s", reason)
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    await chat.ensure_started()
    session = ChatSession(user, send, chat.settings, functools.partial(run_turn, chat),
                          lambda names: chat.tools.offered(chat.settings.tools, names))
    chat.sessions.add(session)
    chat.metrics.streams.inc(("ws",))
    try:
        await session.run(receive)
    finally:
        chat.sessions.discard(session)
        chat.metrics.streams.inc(("ws",), -1)


###############################################################################
# Chat page: the built-in UI at GET /, one string served under a strict CSP
###############################################################################


# Plain HTML, CSS and JavaScript: no framework, no build step, no request leaves the server.
# Every URL is relative to the page, so it works mounted under a prefix.  Model output is
# escaped first and then given a small Markdown subset, so it can never inject HTML.
# language=HTML
CHAT_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>nodechat</title>
<link rel="icon" href="data:,">
<style>
:root { --bg: #fff; --panel: #f6f7f9; --text: #1c1f24; --muted: #5d6470; --line: #e1e4e8;
  --accent: #2f5bd3; --on-accent: #fff; --mine: #eaf0ff; --code: #f1f3f6; --bad: #b42318;
  --good: #18794e; font: 15px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #15171b; --panel: #1c1f24; --text: #e5e7eb; --muted: #9aa2ae; --line: #2d3139;
    --accent: #7aa2ff; --on-accent: #0c1222; --mine: #243049; --code: #0e1013; --bad: #ff8f85;
    --good: #5fd19a; } }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; height: 100dvh; display: flex; flex-direction: column; background: var(--bg); color: var(--text); }
button, select, input, textarea { font: inherit; color: inherit; background: var(--bg);
  border: 1px solid var(--line); border-radius: 8px; }
button { cursor: pointer; padding: .35rem .8rem; white-space: nowrap; }
button:hover { background: var(--panel); }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--on-accent); }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
header { display: flex; align-items: center; gap: .6rem; padding: .55rem 1rem; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.05rem; margin: 0 auto 0 0; }
select { max-width: 12rem; padding: .3rem .4rem; }
#menu { display: none; }
.body { flex: 1; display: flex; min-height: 0; position: relative; }
aside { width: 17rem; flex: none; overflow-y: auto; padding: .75rem; background: var(--panel);
  border-right: 1px solid var(--line); }
h2 { font-size: .75rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: .6rem .4rem .3rem; }
aside ul { list-style: none; margin: 0 0 1rem; padding: 0; }
aside li { display: flex; align-items: center; border-radius: 8px; }
aside li:hover, aside li:has([aria-current]) { background: var(--line); }
aside li > :first-child { flex: 1; min-width: 0; padding: .4rem .5rem; overflow-wrap: anywhere; }
aside li button { border: 0; background: none; text-align: left; }
.item { overflow: hidden; text-overflow: ellipsis; }
.memory { font-size: .9rem; }
button.del { color: var(--muted); padding: .2rem .5rem; font-size: .85rem; }
button.armed { color: var(--bad); font-weight: 600; }
.empty { color: var(--muted); font-size: .9rem; margin: 0 .5rem 1rem; }
main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
#log { flex: 1; overflow-y: auto; padding: 1.25rem 1rem; }
#log > * { max-width: 46rem; margin-inline: auto; }
#hello { color: var(--muted); text-align: center; margin-top: 20vh; }
.msg { margin-bottom: 1.1rem; overflow-wrap: anywhere; }
.user { display: flex; justify-content: flex-end; flex-wrap: wrap; gap: .4rem; }
img.attachment { max-width: 12rem; max-height: 12rem; border-radius: 10px; }
#attached { display: flex; gap: .4rem; max-width: 48rem; margin: 0 auto; padding: 0 1rem; }
#attached[hidden] { display: none; }
.thumb { padding: 0; border: 1px solid var(--line); border-radius: 8px; background: none; }
.thumb img { display: block; height: 3.5rem; border-radius: 8px; }
.user p { margin: 0; background: var(--mine); padding: .55rem .85rem; border-radius: 14px;
  white-space: pre-wrap; max-width: 85%; }
.md > :first-child { margin-top: 0; } .md > :last-child { margin-bottom: 0; }
.md p, .md ul, .md ol, .md pre { margin: .5rem 0; }
.md h3, .md h4, .md h5, .md h6 { font-size: 1rem; margin: .9rem 0 .3rem; }
.md a { color: var(--accent); }
code { font: .88em ui-monospace, Menlo, Consolas, monospace; background: var(--code); padding: .1em .3em;
  border-radius: 4px; }
pre { background: var(--code); padding: .7rem .85rem; border-radius: 8px; overflow-x: auto; border: 1px solid var(--line); }
pre code { padding: 0; background: none; }
details { border: 1px solid var(--line); border-radius: 8px; margin: .5rem 0; background: var(--panel); }
summary { cursor: pointer; padding: .4rem .7rem; color: var(--muted); font-size: .9rem; list-style: none; }
summary::-webkit-details-marker { display: none; }
summary::before { content: "\25B8"; display: inline-block; width: 1em; transition: transform .15s; }
details[open] > summary::before { transform: rotate(90deg); }
details > div { padding: 0 .7rem .6rem; font-size: .9rem; }
.reasoning > div { white-space: pre-wrap; color: var(--muted); }
.tool summary { display: flex; gap: .4rem; align-items: center; }
.tool .name { font-family: ui-monospace, Menlo, Consolas, monospace; color: var(--text); }
.badge { font-size: .7rem; border: 1px solid var(--line); border-radius: 4px; padding: 0 .3rem; }
.state { margin-left: auto; font-size: .8rem; }
.state.done { color: var(--good); } .state.error { color: var(--bad); }
.tool h4 { margin: .4rem 0 .2rem; font-size: .75rem; color: var(--muted); text-transform: uppercase; }
.tool pre { margin: 0; max-height: 16rem; white-space: pre-wrap; }
.note { color: var(--muted); font-size: .9rem; font-style: italic; }
.usage { color: var(--muted); font-size: .75rem; margin: .2rem 0 0; }
#spend { color: var(--muted); font-size: .85rem; margin: .3rem .2rem; }
.note.error, #error { color: var(--bad); font-style: normal; }
#error { margin: 0 1rem .4rem; }
.pending::after { content: "\2022\2022\2022"; letter-spacing: .2em; color: var(--muted); animation: blink 1.2s infinite; }
[aria-busy="true"] > .md:last-child > :last-child::after { content: "\258D"; color: var(--muted);
  animation: blink 1s infinite; }
@keyframes blink { 50% { opacity: .3; } }
@media (prefers-reduced-motion: reduce) { *::after { animation: none !important; } }
#stop::before { content: "\25A0"; font-size: .8em; margin-right: .45rem; }
#composer { display: flex; gap: .5rem; align-items: flex-end; width: 100%; max-width: 48rem; margin: 0 auto;
  padding: .6rem 1rem 1rem; }
textarea { flex: 1; resize: none; max-height: 12rem; padding: .6rem .8rem; border-radius: 12px; font-size: 16px; }
#composer button { padding: .6rem 1rem; border-radius: 12px; }
dialog { border: 1px solid var(--line); border-radius: 12px; background: var(--bg); color: var(--text);
  padding: 1.25rem; width: min(24rem, 92vw); }
dialog::backdrop { background: rgb(0 0 0 / .45); }
dialog h2 { font-size: 1.1rem; text-transform: none; letter-spacing: 0; color: var(--text); margin: 0 0 .5rem; }
dialog input { width: 100%; margin: .3rem 0 .8rem; padding: .45rem .6rem; }
@media (max-width: 720px) {
  header { padding: .5rem .6rem; gap: .4rem; }
  h1 { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
  #menu { display: block; margin-right: auto; }
  select { min-width: 0; }
  aside { display: none; position: absolute; z-index: 2; top: 0; bottom: 0; left: 0;
    width: min(20rem, 86vw); box-shadow: 0 0 2rem rgb(0 0 0 / .3); }
  aside.open { display: block; }
  #composer { padding: .5rem .6rem .7rem; }
}
</style>
</head>
<body>
<header>
  <button type="button" id="menu" aria-expanded="false" aria-controls="side">Chats</button>
  <h1>nodechat</h1>
  <label for="model" class="sr">Model</label>
  <select id="model"><option value="">Default model</option></select>
  <button type="button" id="new">New chat</button>
  <button type="button" id="signout" hidden>Sign out</button>
</header>
<div class="body">
  <aside id="side" aria-label="History">
    <h2 id="convs-h">Conversations</h2>
    <ul id="convs" aria-labelledby="convs-h"></ul>
    <p class="empty" id="convs-empty">No conversations yet.</p>
    <h2 id="mems-h">Memories</h2>
    <ul id="mems" aria-labelledby="mems-h"></ul>
    <p class="empty" id="mems-empty">Nothing remembered yet.</p>
    <h2 id="spend-h">Usage</h2>
    <p id="spend" aria-labelledby="spend-h"></p>
  </aside>
  <main>
    <div id="log" role="log" aria-live="polite" aria-label="Messages" tabindex="-1">
      <p id="hello">Ask anything. Enter sends, Shift+Enter starts a new line.</p>
    </div>
    <p id="error" role="alert" hidden></p>
    <div id="attached" aria-label="Images to send" hidden></div>
    <form id="composer">
      <label for="input" class="sr">Message</label>
      <button type="button" id="attach" aria-label="Attach images" title="Attach images (or paste them)">+</button>
      <input type="file" id="attach-file" accept="image/*" multiple hidden>
      <textarea id="input" rows="1" placeholder="Message nodechat" autofocus></textarea>
      <button type="submit" id="send" class="primary">Send</button>
      <button type="button" id="stop" hidden>Stop</button>
    </form>
  </main>
</div>
<dialog id="login" aria-labelledby="login-h">
  <form id="login-form">
    <h2 id="login-h">Sign in</h2>
    <p>This server needs an access token. It is kept for this browser tab only.</p>
    <label for="token">Access token</label>
    <input id="token" type="password" autocomplete="current-password" required>
    <p id="login-error" class="note error" role="alert" hidden></p>
    <button type="submit" class="primary">Sign in</button>
  </form>
</dialog>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const ui = Object.fromEntries(["menu", "side", "model", "new", "signout", "convs", "convs-empty",
  "mems", "mems-empty", "spend", "log", "hello", "error", "composer", "input", "send", "stop", "login",
  "login-form", "token", "login-error", "attach", "attach-file", "attached"].map((id) => [id.replace("-", "_"), $(id)]));
// Relative URLs resolve against the mount root, with or without its trailing slash.
const BASE = new URL(location.pathname.replace(/\/*$/, "/"), location.origin);
const TOKEN_KEY = "nodechat.token", MODEL_KEY = "nodechat.model", CHAT_KEY = "nodechat.conversation";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
// The open conversation survives a reload (per tab); a new chat gets its id when it is first sent.
let conversationId = newId(), controller = null, answerId = null;

class AuthNeeded extends Error {}

function newId() {  // crypto.randomUUID needs a secure context; getRandomValues does not
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function make(tag, className, text, parent) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.append(node);
  return node;
}

// -- the server: same origin, relative URLs, a Bearer token only in a header ------------------
async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = "Bearer " + token;
  const res = await fetch(new URL(path, BASE), { ...options, headers, credentials: "same-origin" });
  if (res.status === 401) {
    askToken(token ? `That token was not accepted (${await errorText(res)}).` : "");
    throw new AuthNeeded();
  }
  if (!res.ok) throw Object.assign(new Error(await errorText(res)), { status: res.status });
  return res;
}

async function errorText(res) {  // {"error": "..."}, OpenAI's {"error": {"message"}}, or text
  let text = (await res.text().catch(() => "")).trim();
  try {
    const body = JSON.parse(text);
    text = typeof body.error === "string" ? body.error : body.error?.message || body.detail || text;
  } catch { /* not JSON: keep the text */ }
  return `Error ${res.status}` + (text ? ": " + text.slice(0, 500) : "");
}

async function load(path, render, options) {
  try {
    render(await (await api(path, options)).json());
    return true;
  } catch (err) {
    if (!(err instanceof AuthNeeded)) { ui.error.textContent = err.message; ui.error.hidden = false; }
    return false;
  }
}

// -- token: asked once, kept in sessionStorage, never in a URL ---------------------------------
function askToken(message) {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  ui.signout.hidden = true;
  ui.login_error.textContent = message;
  ui.login_error.hidden = !message;
  if (!ui.login.open) ui.login.showModal();
  ui.token.focus();
  ui.token.select();
}

ui.login.addEventListener("cancel", (event) => event.preventDefault());
ui.login_form.addEventListener("submit", async (event) => {
  event.preventDefault();
  token = ui.token.value.trim();
  if (!token || !(await loadConversations())) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  ui.token.value = "";
  ui.login.close();
  ui.signout.hidden = false;
  loadModels(); loadMemories(); loadUsage(); restore();
  ui.input.focus();
});

ui.signout.addEventListener("click", () => {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  ui.convs.replaceChildren(); ui.mems.replaceChildren();
  newChat();
  loadAll();
});

// -- lists: conversations and memories --------------------------------------------------------
function renderList(list, empty, items, label, kind, onDelete, onOpen) {
  const key = JSON.stringify([items, conversationId]);
  if (list.key === key) return;  // unchanged: keep the focus and a pending "Delete?"
  list.key = key;
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  empty.hidden = items.length > 0;
  list.replaceChildren(...items.map((item) => {
    const li = make("li");
    const main = make(onOpen ? "button" : "span", onOpen ? "item" : "memory", label(item), li);
    if (onOpen) {
      main.type = "button";
      main.addEventListener("click", () => onOpen(item));
      if (item.id === conversationId) main.setAttribute("aria-current", "true");
    }
    const del = make("button", "del", "\u00d7", li);
    del.type = "button";
    del.setAttribute("aria-label", `Delete ${kind}: ${label(item)}`);
    del.addEventListener("click", () => {  // two steps instead of a modal confirm()
      if (del.classList.toggle("armed")) {
        del.textContent = "Delete?";
        setTimeout(() => { del.classList.remove("armed"); del.textContent = "\u00d7"; }, 4000);
      } else onDelete(item);
    });
    main.dataset.id = del.dataset.id = item.id;
    return li;
  }));
  const again = focused && `.${focused.classList[0]}[data-id="${CSS.escape(focused.dataset.id)}"]`;
  if (again) list.querySelector(again)?.focus();
}

const loadConversations = () => load("api/conversations", ({ conversations }) => {
  renderList(ui.convs, ui.convs_empty, conversations, (c) => c.title || "New chat", "conversation",
    (c) => remove("api/conversations/", c.id), (c) => openConversation(c.id));
  ui.error.hidden = true;
});
const loadMemories = () => load("api/memories", ({ memories }) => renderList(
  ui.mems, ui.mems_empty, memories, (m) => m.content, "memory", (m) => remove("api/memories/", m.id)));
const loadModels = () => load("v1/models", ({ data }) => {
  const saved = localStorage.getItem(MODEL_KEY) || "";
  ui.model.replaceChildren(new Option("Default model", ""), ...data.map((m) => new Option(m.id, m.id)));
  if (data.some((m) => m.id === saved)) ui.model.value = saved;
});
const loadAll = () => { loadConversations(); loadMemories(); loadModels(); loadUsage(); };
const count = (n) => n.toLocaleString("en");
const loadUsage = () => load("api/usage", ({ total, budget, period }) => {  // the budget period's
  ui.spend.textContent = budget ? `${count(budget.used)} of ${count(budget.limit)} tokens this ${budget.period}`
    : `${count(total.total_tokens)} tokens this ${period}`;
});

function usageLine(turn, tokens, estimated) {  // an answer's tokens, under it
  make("p", "usage", `${count(tokens)} tokens${estimated ? " (estimated)" : ""}`, turn);
}

async function remove(collection, id) {
  if (await load(collection + encodeURIComponent(id), () => {}, { method: "DELETE" })) {
    if (id === conversationId) newChat();
    await (collection.includes("memories") ? loadMemories() : loadConversations());
  }
  ui.input.focus();
}

async function openConversation(id) {
  await load("api/conversations/" + encodeURIComponent(id), (conversation) => {
    showConversation(conversation);
    setMenu(false);
  });
  await loadConversations();
  ui.input.focus();
}

function showConversation({ id, messages, active }) {
  detach();
  conversationId = id;
  sessionStorage.setItem(CHAT_KEY, id);
  renderHistory(messages);
  if (active) resume(id);  // an answer still being written: read it from its start
}

async function restore() {  // after a reload: the conversation this tab had open
  const id = sessionStorage.getItem(CHAT_KEY);
  if (!id || controller || ui.log.querySelector("article")) return;
  try {
    showConversation(await (await api("api/conversations/" + encodeURIComponent(id))).json());
  } catch (err) {
    if (!(err instanceof AuthNeeded)) sessionStorage.removeItem(CHAT_KEY);  // deleted meanwhile
  }
}

function newChat() {
  detach();
  sessionStorage.removeItem(CHAT_KEY);
  conversationId = newId();
  ui.log.replaceChildren(ui.hello);
  ui.hello.hidden = false;
  for (const b of ui.convs.querySelectorAll("[aria-current]")) b.removeAttribute("aria-current");
}

// -- messages ------------------------------------------------------------------------------
function addMessage(role) {
  ui.hello.hidden = true;
  const article = make("article", "msg " + role, undefined, ui.log);
  article.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  return article;
}

function addUser(text, images = []) {
  const turn = addMessage("user");
  for (const url of images) showImage(turn, url);
  if (text) make("p", "", text, turn);
}

function showImage(parent, url) {  // a stored one is fetched with the token, then shown inline
  const img = make("img", "attachment", undefined, parent);
  img.alt = "An attached image";
  const stored = /^nodechat-blob:([\w.+\/-]+);sha256,([0-9a-f]{64})$/.exec(url);
  if (!stored) { img.src = url; return; }
  api("api/attachments/" + stored[2]).then((res) => res.arrayBuffer()).then((data) => {
    const reader = new FileReader();
    reader.onload = () => { img.src = reader.result; };
    reader.readAsDataURL(new Blob([data], { type: stored[1] }));
  }).catch(() => { img.alt = "An image that is no longer stored"; });
}

// -- images to send: picked or pasted, shown above the composer until sent ---------------------
let attached = [];  // data: URLs

function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => { attached.push(reader.result); showAttached(); };
    reader.readAsDataURL(file);
  }
}

function showAttached() {
  ui.attached.replaceChildren();
  attached.forEach((url, index) => {
    const button = make("button", "thumb", undefined, ui.attached);
    button.type = "button";
    button.setAttribute("aria-label", `Remove image ${index + 1}`);
    make("img", "", undefined, button).src = url;
    button.addEventListener("click", () => { attached.splice(index, 1); showAttached(); });
  });
  ui.attached.hidden = !attached.length;
}

function textPart(turn, text = "") {
  const div = make("div", "md", undefined, turn);
  div.raw = text;
  div.innerHTML = markdown(text);
  return div;
}

function reasoningPart(turn) {
  const details = make("details", "reasoning", undefined, turn);
  details.append(make("summary", "", "Reasoning"), make("div"));
  return details;
}

function toolCard(turn, name, dynamic) {
  const card = make("details", "tool", undefined, turn);
  const summary = make("summary", "", undefined, card);
  make("span", "name", name, summary);
  if (dynamic) make("span", "badge", "MCP", summary);
  card.state = make("span", "state", "running\u2026", summary);
  make("div", "", undefined, card);
  return card;
}

function show(value) {  // JSON pretty-printed, text as it is
  if (typeof value === "string") {
    try { value = JSON.parse(value); } catch { return value; }
  }
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function setToolInput(card, input) {
  card.lastChild.prepend(make("h4", "", "Input"), make("pre", "", show(input ?? {})));
}

function setToolResult(card, value, failed) {
  card.lastChild.append(make("h4", "", failed ? "Error" : "Result"), make("pre", "", show(value)));
  card.state.textContent = failed ? "\u2715 failed" : "\u2713 done";
  card.state.className = "state " + (failed ? "error" : "done");
}

function note(turn, text, isError) {
  const p = make("p", isError ? "note error" : "note", text, turn);
  if (isError) p.setAttribute("role", "alert");
}

function textOf(content) {
  if (typeof content === "string") return content;
  return Array.isArray(content) ? content.map((p) => p.text || "").join("") : "";
}

function renderHistory(messages) {  // stored messages are in OpenAI's shape
  ui.log.replaceChildren(ui.hello);
  let turn = null, tokens = 0, estimated = false;
  const cards = {};
  const endTurn = () => { if (turn && tokens) usageLine(turn, tokens, estimated); tokens = 0; estimated = false; };
  for (const m of messages) {
    const text = textOf(m.content);
    if (m.usage) { tokens += m.usage.input + m.usage.output; estimated ||= m.usage.estimated; }
    if (m.role === "user") {
      endTurn();
      addUser(text, Array.isArray(m.content) ? m.content.filter((p) => p.type === "image_url")
        .map((p) => p.image_url.url) : []);
      turn = null;
    } else if (m.role === "tool" && cards[m.tool_call_id]) {  // errors are stored as "Error: ..."
      setToolResult(cards[m.tool_call_id], text.replace(/^Error: /, ""), text.startsWith("Error: "));
    } else if (m.role === "assistant") {
      turn ||= addMessage("assistant");
      if (text) textPart(turn, text);
      for (const call of m.tool_calls || []) {
        const card = cards[call.id] = toolCard(turn, call.function.name, false);
        setToolInput(card, call.function.arguments);
        card.state.textContent = "no result";
      }
    }
  }
  endTurn();
  ui.hello.hidden = messages.length > 0;
  ui.log.scrollTop = ui.log.scrollHeight;
}

// -- a turn: POST api/chat, read the AI SDK UI message stream ---------------------------------
// The answer is the server's: leaving (a reload, another conversation) only stops reading it,
// GET api/chat/{id}/stream reads it again from its start, and Stop asks the server to stop it.
async function send(text) {
  const images = attached;
  attached = [];
  showAttached();
  const parts = images.map((url) => ({ type: "file", mediaType: url.slice(5, url.indexOf(";")), url }));
  if (text) parts.unshift({ type: "text", text });
  const message = { id: newId(), role: "user", parts };
  // The server keeps the history: sending only the new message is enough.
  const body = { id: conversationId, messages: [message], trigger: "submit-message" };
  if (ui.model.value) body.model = ui.model.value;
  const first = !ui.log.querySelector("article");
  sessionStorage.setItem(CHAT_KEY, conversationId);
  addUser(text, images);
  const result = await follow((signal) => postChat(body, signal));
  if (result === "auth") { ui.log.lastElementChild.remove(); ui.input.value = text; }
  // The title of a new conversation is written in the background after the answer.
  if (first) for (const ms of [1000, 3000, 8000]) setTimeout(loadConversations, ms);
}

async function resume(id) {
  const result = await follow((signal) => api(`api/chat/${encodeURIComponent(id)}/stream`, { signal }));
  if (result === "none" && conversationId === id) {  // it ended meanwhile: show it as stored
    await load("api/conversations/" + encodeURIComponent(id), ({ messages }) => renderHistory(messages));
  }
}

async function follow(request) {  // one answer's stream, into a new assistant message;
  // "none" (nothing to read: 204) and "auth" (a token is needed) take that message away again
  const turn = addMessage("assistant");
  turn.setAttribute("aria-busy", "true");
  ui.log.scrollTop = ui.log.scrollHeight;
  const pending = make("p", "pending", undefined, turn);
  make("span", "sr", "Waiting for the answer", pending);
  const mine = controller = new AbortController();
  answerId = null;
  setBusy(true);
  const state = { parts: {}, tools: {}, done: false, pending };
  state.settle = () => {  // the answer is over at "finish", even if the stream lasts a moment more
    if (state.settled) return;
    state.settled = true;
    pending.remove();
    turn.removeAttribute("aria-busy");
    if (controller === mine) { controller = null; setBusy(false); }
    loadConversations(); loadMemories(); loadUsage();
  };
  try {
    const res = await request(mine.signal);
    if (res.status === 204) { turn.remove(); return "none"; }
    await readStream(res, (chunk) => onChunk(chunk, turn, state));
    if (!state.done) note(turn, "The connection closed before the answer was complete.", true);
  } catch (err) {
    if (err instanceof AuthNeeded) { turn.remove(); return "auth"; }
    if (err.name !== "AbortError") note(turn, err.message, true);
    else if (mine.stopped && !state.done) note(turn, "Stopped.");
  } finally {
    state.settle();
  }
}

async function postChat(body, signal) {
  // 409 while another tab's answer in this conversation is being written: try again shortly.
  for (let attempt = 1; ; attempt++) {
    try {
      return await api("api/chat", { method: "POST", body: JSON.stringify(body), signal });
    } catch (err) {
      if (err.status !== 409 || attempt === 10) throw err;
      await new Promise((resolve, reject) => {  // a pause that Stop ends early
        const timer = setTimeout(resolve, 300);
        signal.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); });
      });
    }
  }
}

async function readStream(res, onChunk) {
  // SSE: lines end at CR, LF or CRLF; "data:" lines gather until a blank line; ":" is a comment.
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const lines = (buffer + value).split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
      if (line || !data.length) continue;
      const payload = data.join("\n");
      data = [];
      if (payload === "[DONE]") return;
      onChunk(JSON.parse(payload));
    }
  }
}

function onChunk(c, turn, s) {
  const stick = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
  if (/^(text|reasoning|tool|error)/.test(c.type)) s.pending.remove();
  const tool = () => s.tools[c.toolCallId] ||= toolCard(turn, c.toolName || "tool", c.dynamic);
  switch (c.type) {
    case "start": answerId = c.messageId; break;
    case "text-start": s.parts[c.id] = textPart(turn); break;
    case "text-delta": {
      const part = s.parts[c.id] ||= textPart(turn);
      part.raw += c.delta;
      part.innerHTML = markdown(part.raw);
      break;
    }
    case "reasoning-start": s.parts[c.id] = reasoningPart(turn); break;
    case "reasoning-delta": (s.parts[c.id] ||= reasoningPart(turn)).lastChild.textContent += c.delta; break;
    case "tool-input-start": tool(); break;
    case "tool-input-available": setToolInput(tool(), c.input); break;
    case "tool-input-error": setToolInput(tool(), c.input); setToolResult(tool(), c.errorText, true); break;
    case "tool-output-available": setToolResult(tool(), c.output, false); break;
    case "tool-output-error": setToolResult(tool(), c.errorText, true); break;
    case "error": note(turn, c.errorText || "The answer failed.", true); break;
    case "finish": {
      s.done = true;
      const { usage, notice } = c.messageMetadata || {};
      if (notice) note(turn, notice, true);  // the token budget ran out between two steps
      else if (c.finishReason === "length") note(turn, "The answer hit the length limit.");
      if (usage) usageLine(turn, usage.totalTokens, usage.estimated);
      s.settle();
      break;
    }
    case "abort": s.done = true; note(turn, "Stopped."); s.settle();
  }
  if (stick) ui.log.scrollTop = ui.log.scrollHeight;
}

function setBusy(busy) {
  const hadFocus = document.activeElement === ui.send || document.activeElement === ui.stop;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (hadFocus) ui.input.focus();
}

function stop() {  // Stop and Escape: the server stops the answer and saves what it said
  const mine = controller;
  if (!mine) return;
  mine.stopped = true;
  const body = JSON.stringify(answerId ? { activeStreamId: answerId } : {});
  api(`api/chat/${encodeURIComponent(conversationId)}/stop`, { method: "POST", body })
    .catch(() => {}).finally(() => mine.abort());  // its end has come through the stream by now
}

function detach() { controller?.abort(); }  // stop reading; the answer goes on, on the server

// -- Markdown: escape everything, then a small subset ------------------------------------------
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function markdown(source) {
  const stash = [];  // finished HTML, kept out of the later rules behind \0<index>\0
  const keep = (html) => "\u0000" + (stash.push(html) - 1) + "\u0000";
  let s = source.replace(/\u0000/g, "").replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
  // Code blocks first (a fence still open while streaming runs to the end), then inline code.
  s = s.replace(/^```[^\n]*\n?([\s\S]*?)(?:\n```[ \t]*(?=\n|$)|$(?![\s\S]))/gm,
    (_, code) => "\n" + keep("<pre><code>" + code + "</code></pre>") + "\n");
  s = s.replace(/`([^`\n]+)`/g, (_, code) => keep("<code>" + code + "</code>"));
  const inline = (t) => emphasis(t.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g,
    (_, label, url) => keep(`<a href="${url}" target="_blank" rel="noopener">${emphasis(label)}</a>`)));
  const out = [];
  let para = [], list = null;
  const flush = () => {
    if (para.length) out.push("<p>" + para.join("<br>") + "</p>");
    if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${i}</li>`).join("")}</${list.tag}>`);
    para = []; list = null;
  };
  for (const line of s.split("\n")) {
    let m;
    if (!line.trim()) flush();
    else if ((m = line.trim().match(/^\u0000(\d+)\u0000$/)) && stash[m[1]].startsWith("<pre>")) {
      flush(); out.push(line.trim());
    } else if ((m = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/))) {
      const tag = m[1] ? "ol" : "ul";
      if (para.length || (list && list.tag !== tag)) flush();
      list ||= { tag, items: [] };
      list.items.push(inline(m[2]));
    } else if ((m = line.match(/^(#{1,4})\s+(.*)$/))) {
      flush(); out.push(`<h${m[1].length + 2}>${inline(m[2])}</h${m[1].length + 2}>`);
    } else {
      if (list) flush();
      para.push(inline(line));
    }
  }
  flush();
  return out.join("").replace(/\u0000(\d+)\u0000/g, (_, i) => stash[i]);
}

function emphasis(t) {
  return t.replace(/\*\*(\S(?:.*?\S)?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w*])\*(\S(?:.*?\S)?)\*(?![\w*])/g, "$1<em>$2</em>")
    .replace(/(^|\W)_(\S(?:.*?\S)?)_(?!\w)/g, "$1<em>$2</em>");
}

// -- wiring ------------------------------------------------------------------------------------
function setMenu(open) {  // the phone layout's drawer
  ui.side.classList.toggle("open", open);
  ui.menu.setAttribute("aria-expanded", String(open));
  if (open) ui.side.querySelector("button")?.focus();
}

function grow() {  // CSSOM styles are allowed under the CSP; style attributes are not
  ui.input.style.height = "auto";
  ui.input.style.height = ui.input.scrollHeight + 2 + "px";
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if ((!text && !attached.length) || controller) return;
  ui.input.value = "";
  grow();
  send(text);
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  } else if (event.key === "Escape") stop();
});
ui.input.addEventListener("input", grow);
ui.input.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { event.preventDefault(); attach(files); }
});
ui.attach.addEventListener("click", () => ui.attach_file.click());
ui.attach_file.addEventListener("change", () => { attach(ui.attach_file.files); ui.attach_file.value = ""; });
ui.stop.addEventListener("click", stop);
ui.new.addEventListener("click", () => { newChat(); setMenu(false); ui.input.focus(); });
ui.model.addEventListener("change", () => localStorage.setItem(MODEL_KEY, ui.model.value));
ui.menu.addEventListener("click", () => setMenu(!ui.side.classList.contains("open")));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.side.classList.contains("open")) { setMenu(false); ui.menu.focus(); }
});
ui.signout.hidden = !token;
loadAll();
restore();
</script>
</body>
</html>
"""


def _csp_hashes(page: str, tag: str) -> str:
    """``'sha256-…'`` sources for each inline ``<tag>`` element's exact text."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
    return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
                    + "'" for body in bodies)


# Only the page's own script and style run; it may talk to its own origin and nothing else.
CHAT_PAGE_CSP = (f"default-src 'none'; script-src {_csp_hashes(CHAT_PAGE, 'script')}; "
                 f"style-src {_csp_hashes(CHAT_PAGE, 'style')}; connect-src 'self'; "
                 "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CHAT_PAGE_BYTES = CHAT_PAGE.encode()
CHAT_PAGE_HEADERS = (
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-length", str(len(CHAT_PAGE_BYTES)).encode()),
    (b"content-security-policy", CHAT_PAGE_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
)


class ChatPageResponse:
    """The chat page (``GET /``) with its Content-Security-Policy."""

    async def __call__(self, send: Send, receive: Receive) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(CHAT_PAGE_HEADERS)})
        await send({"type": "http.response.body", "body": CHAT_PAGE_BYTES})


async def chat_page(chat: NodeChat, request: Request) -> ChatPageResponse:
    if not chat.settings.ui:
        raise NotFound("Not Found")
    return ChatPageResponse()


CHAT_PAGE_ROUTES = Routes("/", json_error, (("GET", "/", chat_page, "anyone"),), "page")


###############################################################################
# App: the NodeChat object is the ASGI application
###############################################################################


async def healthz(chat: NodeChat, request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": __version__})


async def metrics(chat: NodeChat, request: Request) -> TextResponse:
    """``GET /metrics`` (``metrics = true``): this instance's metrics for Prometheus, behind
    ``metrics_token`` when one is set, never a user's token."""
    if not chat.settings.metrics:
        raise NotFound("Not Found")
    token = chat.settings.metrics_token
    if token and not hmac.compare_digest((bearer_token(request.headers) or "").encode(), token.encode()):
        raise Unauthorized("Unauthorized: /metrics takes the metrics_token", code="invalid_api_key")
    return TextResponse(chat.metrics.render(), content_type=METRICS_CONTENT_TYPE)


#: Every HTTP route, by protocol; each app compiles its own :class:`Router`.
ROUTES = (CHAT_PAGE_ROUTES, Routes("/healthz", json_error, (("GET", "/healthz", healthz, "anyone"),), "health"),
          Routes("/metrics", json_error, (("GET", "/metrics", metrics, "metrics"),), "metrics"),
          OPENAI_ROUTES, ANTHROPIC_ROUTES, RESPONSES_ROUTES, API_CHAT_ROUTES)


class NodeChat:
    """An embeddable chat backend; the instance is an ASGI app.

    Keyword arguments are :class:`Settings` fields; the rest are extension points:
    ``store`` (a :class:`Store`), ``providers`` (extra :class:`Provider` objects, the first
    wins as default), ``http_client`` (an ``httpx.AsyncClient`` to share), and ``authenticate``
    (``scope -> user_id | None``, sync or async) to replace the token table.

    Example::

        chat = NodeChat(model="gpt-4o-mini", tokens={"s3cret": "alice"})

        @chat.tool
        def get_weather(city: str) -> str:
            \"\"\"Current weather for a city.\"\"\"
            return "sunny"
    """

    def __init__(self, *, config: str | os.PathLike | None = None,
                 environ: Mapping[str, str] | None = None, store: Store | None = None,
                 providers: Iterable[Provider] = (), http_client: httpx.AsyncClient | None = None,
                 authenticate: Callable[[Scope], Any] | None = None, **settings: Any):
        self.settings = Settings.from_sources(settings, config, environ)
        self.store = store if store is not None else make_store(self.settings)
        self.providers = ModelRouter(self.settings, providers)
        self.tools = ToolRegistry(memory_tools())
        for extra in (web_search_tool(self.settings),
                      fetch_url_tool(self.settings) if self.settings.fetch_tool else None):
            if extra is not None:
                self.tools.add(extra)
        self.mcp = MCPTools(self.settings.mcp_servers, self.tools, self.http)
        self._started: asyncio.Task | None = None
        self.workflows = WorkflowRegistry()
        self.metrics = Metrics()
        self.ledger = make_ledger(self.settings, self.store, self.metrics)
        self.agent = Agent(self.providers, self.store, self.http, self.settings, self.upstream, self.ledger)
        self.turns = make_turns(self.settings, self.store, self.ledger)
        self.sessions: set[ChatSession] = set()  # open /chat WebSockets
        self.clients = HTTPClients(self.settings, http_client)
        self.gate = Gate(self.settings, authenticate)
        self.router = Router(*ROUTES)

    # -- public helpers ------------------------------------------------------------------------

    def tool(self, fn: Callable | None = None, **options: Any) -> Any:
        """Register a function as a tool; works with or without arguments.

        Example::

            @chat.tool(name="weather", description="Current weather")
            async def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict: ...
        """
        def register(fn: Callable) -> Callable:
            self.tools.add(fn, **options)
            return fn

        return register(fn) if fn is not None else register

    def workflow(self, name: str | Callable | None = None, *, description: str = "",
                 tool: bool = False) -> Any:
        """Register a workflow, started by a ``/chat`` message with its ``workflow_id``.

        ``tool=True`` also offers it to the model as a tool taking one ``input`` string.

        Example::

            @chat.workflow("summarize")
            async def summarize(message: dict, history: list[dict], job: Job) -> str:
                job.progress(0.5, "reading")
                return await job.complete("Summarize: " + message["content"])
        """
        def register(fn: Callable) -> Callable:
            workflow = self.workflows.add(name if isinstance(name, str) else fn.__name__, fn, description)
            if tool:
                self.tools.add(workflow_tool(workflow, self.workflows, self.agent, self.tools))
            return fn

        return register(name) if callable(name) else register

    def http(self) -> httpx.AsyncClient:
        """The instance's httpx client: ``/models``, web search, fetch, MCP over HTTP."""
        return self.clients.http()

    def upstream(self) -> UpstreamClient | httpx.AsyncClient:
        """The client that reads chat-completions streams (see :class:`HTTPClients`)."""
        return self.clients.stream_client()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None):
        """For a host's lifespan: ``Starlette(..., lifespan=chat.lifespan)``."""
        await self.startup()
        try:
            yield
        finally:
            await self.aclose()

    async def startup(self) -> None:
        """Start the MCP servers (concurrently) and say how the server is set up.

        A host that runs no lifespan gets the same on its first request."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        try:
            configure_logging(self.settings.log_format == "json")
            scrub_server_logs()
            check = getattr(self.store, "check", None)
            if check is not None:
                await check()
            await self.mcp.start()
            await self._check_models()
        except BaseException:
            self._started = None  # a host without lifespan tries again on the next request
            raise
        if self.settings.metrics and not self.settings.metrics_token:
            log.warning("GET /metrics needs no token (metrics_token): whoever reaches the server reads "
                        "its counters, model names included")
        if self.open:
            log.warning("no tokens configured (NODECHAT_TOKENS): anyone who can reach this server "
                        "is a user; browsers are held to loopback Host names and same-origin pages")
            for rule in {"null", "*"} & set(self.settings.cors_origins):
                log.warning("cors_origins has %r on a server with no tokens: any web page (%s) can "
                            "use it as you", rule, "every sandboxed iframe sends Origin: null"
                            if rule == "null" else "any origin")

    async def _check_models(self) -> None:
        """Say where each provider is and which model serves by default, and catch the usual
        mistakes at start-up rather than on every request: a default model that no provider
        serves, a base URL without ``/v1``, no model at all (then the provider's first)."""
        providers = self.providers
        for provider in providers:
            log.info("provider %s: %s", provider.name, getattr(provider, "label", "built in"))
        if self.settings.offline:
            if self.settings.model and self.settings.model != OFFLINE_MODEL:
                log.warning("model %r is served by no provider: none is configured (set OPENAI_API_KEY "
                            "or OPENAI_BASE_URL), so the offline model %r answers and requests for %r "
                            "get 404", self.settings.model, OFFLINE_MODEL, self.settings.model)
            log.info("serving the built-in offline model %r: it echoes your message, and "
                     "'/tool NAME {json}' calls a tool", OFFLINE_MODEL)
            log.info("for a real model set OPENAI_API_KEY (and OPENAI_BASE_URL for any other "
                     "OpenAI-compatible server, e.g. http://localhost:11434/v1 for Ollama) or "
                     "ANTHROPIC_API_KEY, or list [[providers]] in a TOML file given with --config")
            return
        try:
            names = await asyncio.wait_for(providers.default.list_models(self.http()), 5)
        except (NodeChatError, asyncio.TimeoutError) as exc:
            log.warning("cannot list the models of %s: %s", getattr(providers.default, "label", ""),
                        getattr(exc, "message", "timed out"))
            return
        base_url = getattr(providers.default, "label", "")
        if not names and base_url and not base_url.rstrip("/").endswith("/v1"):
            log.warning("%s lists no models: OpenAI-compatible servers usually answer under /v1 "
                        "(try %s/v1)", base_url, base_url.rstrip("/"))
        if not providers.default_model and names:
            providers.default_model = names[0]
        model = providers.default_model
        provider, own = providers.split(model) if model else (None, "")
        if provider is providers.default and names and own not in names:
            log.warning("default model %r is not among %s's models: %s", model, base_url, ", ".join(names[:10]))
        log.info("default model: %s", model or "(none: every request must name one)")

    async def aclose(self) -> None:
        """Close what this instance opened (its upstream connection pools), after the turns
        that outlive their connection had ``shutdown_grace_seconds`` to end."""
        await self.turns.aclose(self.settings.shutdown_grace_seconds)
        for task in list(self.agent.background):
            task.cancel()
        await asyncio.gather(*self.agent.background, return_exceptions=True)
        await self.ledger.aclose()  # after the turns: their last entries are written
        await self.mcp.aclose()
        try:
            if isinstance(self.store, (JSONFileStore, PostgresStore)):  # a host's own kind is the host's
                await self.store.aclose()
        except NodeChatError as exc:  # a last flush that failed: said, and the rest still closed
            log.error("the store could not be closed cleanly: %s", exc.message)
        self._started = None
        await self.clients.aclose()

    @property
    def open(self) -> bool:
        """True when anyone who reaches the server is a user: no tokens, no ``authenticate``."""
        return self.gate.open

    async def ensure_started(self) -> None:
        """Start on the first request if no lifespan did (a mounted app gets none)."""
        if self._started is None or not self._started.done():
            await self.startup()

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._handle_http(scope, receive, send)
        elif kind == "websocket":
            await chat_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            await self._handle_lifespan(receive, send)

    async def _handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gate on the headers, then the body, then the route's handler.  Whatever fails
        before the response starts is answered in the route's (the protocol's) error format.
        Every response carries its ``x-request-id``; every request is counted in the metrics."""
        path, method = route_path(scope), scope["method"]
        route, params, allowed = self.router.match(method, path)
        headers = scope_headers(scope)
        request_id = request_id_of(headers)
        send = self.gate.with_cors(headers, method, send)
        status, began = 0, time.monotonic()
        body, protocol = None, self.router.protocol_for(path)
        stamp = [(b"x-request-id", request_id.encode())]
        if protocol == "anthropic":  # where Anthropic's SDKs read it
            stamp.append((b"request-id", request_id.encode()))

        def tracking_send(message: Message) -> Awaitable[None]:  # no coroutine of its own per frame
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), *stamp]}
            return send(message)

        try:
            if headers.get(VIA_HEADER) == self.providers.via:
                raise NodeChatError("this request came from this nodechat itself: a provider's base_url "
                                    "(OPENAI_BASE_URL, ANTHROPIC_BASE_URL?) points back at it",
                                    code="loop_detected", status=508)
            if route is None or route.auth != "metrics":  # a scraper is no browser, its Host any
                self.gate.check_browser(scope, headers)
            if method == "OPTIONS" and (route or allowed) and self.settings.cors_origins:
                await JSONResponse(None, 204)(tracking_send, receive)
                return
            if route is None:
                raise MethodNotAllowed("Method Not Allowed", allow=allowed) if allowed else NotFound("Not Found")
            await self.ensure_started()
            user = await self.gate.user(scope, headers, method, route.auth) \
                if route.auth not in ("anyone", "metrics") else None
            body = await read_body(receive, headers, self.settings.max_body_bytes, self.settings.body_timeout)
            response = await route.handler(self, build_request(scope, headers, params, body, user, request_id))
            if getattr(response, "streaming", False):
                self.metrics.streams.inc((protocol,))
                try:
                    await response(tracking_send, receive)
                finally:
                    self.metrics.streams.inc((protocol,), -1)
            else:
                await response(tracking_send, receive)
        except Exception as exc:
            if status:
                if isinstance(exc, NodeChatError):
                    raise
                log.exception("%s %s failed after the response started", method, path)
                return
            errors = route.errors if route else self.router.errors_for(path)
            await errors(client_error(exc), build_request(scope, headers, params, body, None, request_id)
                         )(tracking_send, receive)
        finally:
            self.metrics.requests.inc((protocol, str(status)))
            self.metrics.durations.observe((protocol,), time.monotonic() - began)

    async def _handle_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class ScrubSecrets(logging.Filter):
    """Blank ``api_key``/``token`` query values in log lines (uvicorn logs WebSocket paths),
    however the name is percent-encoded (``api%5Fkey``, ``%61pi_key``, ``tok%65n``)."""

    pattern = re.compile(r"(?<=[?&;])([^=&\s\"'?]+)=([^&\s\"']*)")

    @classmethod
    def scrub(cls, text: str) -> str:
        def blank(found: re.Match) -> str:
            name = unquote(found.group(1))
            return f"{found.group(1)}=***" if name in ("api_key", "token") else found.group(0)

        return cls.pattern.sub(blank, text) if "=" in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self.scrub(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.scrub(record.msg)
        return True


class JSONLines(logging.Formatter):
    """``log_format = "json"``: each record one JSON object on one line, with the fields a
    record carries in ``extra={"fields": ...}`` (a turn's: see :func:`turn_record`)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return compact_json({**line, **getattr(record, "fields", {})})


def configure_logging(json_lines: bool = False) -> None:
    """Under ``uvicorn nodechat:create_app --factory`` nothing configures the ``nodechat``
    logger: give it uvicorn's own look and level (or JSON lines), unless the host set up
    logging itself.

    Records still propagate: a host that gives the root logger handlers later (Sentry,
    structlog) gets them, and this handler then steps aside so nothing prints twice."""
    if log.handlers or logging.getLogger().handlers:
        return
    try:
        from uvicorn.logging import DefaultFormatter
    except ImportError:  # pragma: no cover - a host on another server
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JSONLines() if json_lines else DefaultFormatter("%(levelprefix)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: not logging.getLogger().handlers)
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.getLogger("uvicorn.error").getEffectiveLevel())


def scrub_server_logs() -> None:
    """Put :class:`ScrubSecrets` on uvicorn's loggers (once)."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ScrubSecrets) for f in logger.filters):
            logger.addFilter(ScrubSecrets())


def create_app(**settings: Any) -> NodeChat:
    """Build an app from keyword settings (and TOML and environment): ``uvicorn --factory``."""
    return NodeChat(**settings)


###############################################################################
# CLI: python nodechat.py
###############################################################################


def main(argv: list[str] | None = None) -> None:
    """Serve nodechat with uvicorn: ``python nodechat.py --port 8000``."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["copy-store"]:
        return copy_store_command(argv[1:])
    parser = argparse.ArgumentParser(
        prog="nodechat", description="An embeddable chat backend: OpenAI-compatible API, "
        "/api/chat SSE and the /chat WebSocket over one agent.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_environment_help())
    parser.add_argument("--version", action="version", version=f"nodechat {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--config", help="TOML settings file (also NODECHAT_CONFIG)")
    parser.add_argument("--data-dir", help="where conversations and memories are kept")
    parser.add_argument("--model", help="default model, e.g. gpt-4o-mini or ollama/llama3.2")
    parser.add_argument("--allow-open", action="store_true",
                        help="serve without tokens on a non-loopback address (not recommended)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes sharing the port (default 1); see the README's "
                        "'Several cores' for what they share")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.workers > 1 and not hasattr(os, "fork")):
        parser.error("--workers takes a number from 1 up, and more than 1 needs os.fork (POSIX)")

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:  %(name)s: %(message)s")
    try:
        app = NodeChat(config=args.config, data_dir=args.data_dir, model=args.model)
    except ValueError as exc:
        parser.error(str(exc))
    if not app.settings.tokens and args.host not in LOOPBACK_NAMES and not args.allow_open:
        parser.error(f"refusing to serve on {args.host} with no tokens: set NODECHAT_TOKENS, "
                     "bind to 127.0.0.1, or pass --allow-open")
    if app.settings.log_format == "json":  # nodechat's records; uvicorn's own keep its look
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JSONLines())
    scrub_server_logs()
    _release_free_memory()
    _tune_collector()
    options = dict(host=args.host, port=args.port, log_level=args.log_level,
                   timeout_graceful_shutdown=max(1, int(app.settings.shutdown_grace_seconds)),
                   **server_options())
    if args.workers == 1:
        uvicorn.run(app, **options)
    else:
        serve_workers(uvicorn.Config(app, **options), args.workers)


WORKER_STARTUP_FAILURE = 3  # uvicorn's exit status when the app does not start


def serve_workers(config: Any, workers: int) -> None:
    """``--workers N``: N processes forked from this one, each serving the one listening
    socket with its own event loop (the kernel hands each connection to one of them).

    Forked, not spawned as uvicorn's own ``workers`` are: the app built from the command
    line goes to each as it is, whatever the file is called, and the module's pages are
    shared until written.  A worker that dies is started again (after a second, if it died
    within one), unless the app would not start in it: then all stop, with uvicorn's status
    3.  SIGINT or SIGTERM stops them all, each finishing its requests as uvicorn does, and a
    worker ends with its parent, even one killed with -9.  What the workers share is the data
    directory (the JSON store's file locks) or the database (and, with JSON files, one turn
    per conversation: ``Turns._hold``); the rest of what turns in flight hold, rate limits and
    metrics are per worker."""
    import signal

    import uvicorn

    listening = config.bind_socket()
    parent, signals = os.getpid(), {signal.SIGINT, signal.SIGTERM}
    children: dict[int, float] = {}  # pid -> when it started
    stopping = failed = False

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # no stop between the fork and its bookkeeping
        try:
            pid = os.fork()
            if pid == 0:  # the worker: uvicorn's own signal handling from here on
                server = None
                try:
                    for signum in signals:
                        signal.signal(signum, signal.SIG_DFL)
                    _end_with(parent)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
                    server = uvicorn.Server(config)
                    server.run(sockets=[listening])  # uvicorn exits (SystemExit) if the app will not start
                finally:
                    os._exit(0 if server is not None and server.started else WORKER_STARTUP_FAILURE)
            children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for signum in signals:
        signal.signal(signum, stop)
    log.info("serving with %d worker processes on %s:%s", workers, config.host, config.port)
    for _ in range(workers):
        start()
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code == WORKER_STARTUP_FAILURE:  # the app will not start: neither will the next worker
            log.error("worker %d could not start the app; stopping the others", pid)
            failed = True
            stop(signal.SIGTERM, None)
            continue
        log.warning("worker %d ended (status %d); starting another", pid, code)
        if time.monotonic() - started < 1:
            time.sleep(1)  # a worker that dies at once is not restarted in a tight loop
        if not stopping:
            start()
    listening.close()
    if failed:
        sys.exit(WORKER_STARTUP_FAILURE)



def _end_with(parent: int) -> None:
    """A worker ends with the process that forked it, even one killed with -9 (Linux's
    PR_SET_PDEATHSIG; elsewhere a worker outlives it until stopped)."""
    import signal

    with contextlib.suppress(ImportError, OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that was set
        os._exit(0)


def _tune_collector() -> None:
    """The cyclic collector, for a server process of our own (never a host's: mounted, its
    process is the host's to tune).  Everything built at start-up is frozen out of its scans,
    and it runs after 20,000 new container objects instead of 700: each streamed chunk makes a
    few (its parsed JSON, its event), and with 768 paced streams the collector took 10% of the
    server's core (py-spy --native).  What a turn leaves in cycles is still collected."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the system before serving (glibc only): start-up
    frees memory that would otherwise stay resident for the life of the server."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):  # no ctypes, or not glibc: nothing to give back
        pass


def server_options() -> dict[str, str]:
    """The fastest server parts installed: httptools, uvloop and websockets' sans-I/O
    protocol (the ``server`` extra; the README has the figures), else the pure-Python ones,
    with a notice."""
    import importlib.util

    import uvicorn.config

    have = {lib: importlib.util.find_spec(lib) is not None
            for lib in ("httptools", "uvloop", "websockets", "wsproto")}
    options = {"http": "httptools" if have["httptools"] else "h11",
               "loop": "uvloop" if have["uvloop"] else "asyncio"}
    if have["websockets"]:
        options["ws"] = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS \
            else "websockets"
    elif have["wsproto"]:
        options["ws"] = "wsproto"
    else:
        options["ws"] = "none"
        log.warning("no WebSocket library: /chat will not be served; pip install 'nodechat[server]'")
    slow = [name for name, fast in (("h11", "httptools"), ("asyncio", "uvloop")) if not have[fast]]
    if slow:
        log.info("serving on the pure-Python %s; pip install 'nodechat[server]' for the faster server",
                 " and ".join(slow))
    return options


def _environment_help() -> str:
    """The environment variables, for ``--help``: every setting has one."""
    lines = ["environment (every setting also has NODECHAT_<NAME>, e.g. NODECHAT_MAX_STEPS=30):"]
    lines += [f"  {key:<30} {name}" for key, name in ENV_KEYS.items()]
    lines.append(f"  {'ANTHROPIC_API_KEY':<30} an Anthropic provider (its Messages API), beside OpenAI's")
    lines.append(f"  {'ANTHROPIC_BASE_URL':<30} ... and where it is (https://api.anthropic.com)")
    lines.append(f"  {'BRAVE_API_KEY, TAVILY_API_KEY':<30} search_api_key for those backends")
    lines.append(f"  {'NODECHAT_CONFIG':<30} a TOML settings file (as --config)")
    return "\n".join(lines)


def copy_store_command(argv: list[str]) -> None:
    """``python nodechat.py copy-store --from ./nodechat-data --to postgresql://...``"""
    import argparse

    parser = argparse.ArgumentParser(prog="nodechat copy-store", description=
                                     "Copy a JSON data directory into PostgreSQL (safe to run again).")
    parser.add_argument("--from", dest="source", required=True, help="the JSON data directory")
    parser.add_argument("--to", dest="url", required=True, help="postgresql://user:password@host/db")
    args = parser.parse_args(argv)
    if not any((Path(args.source) / name).is_dir() for name in ("conversations", "memories")):
        parser.error(f"{args.source} holds no conversations/ or memories/ folder")
    logging.basicConfig(level="INFO", format="%(levelname)s:  %(name)s: %(message)s")

    async def copy() -> None:
        store = PostgresStore(args.url)
        try:
            await copy_json_store(args.source, store)
        finally:
            await store.aclose()

    try:
        asyncio.run(copy())
    except (ValueError, NodeChatError) as exc:
        parser.exit(1, f"nodechat copy-store: {exc}\n")


if __name__ == "__main__":
    main()
