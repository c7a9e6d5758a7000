"""Benchmark: nodechat vs a naive Starlette+httpx proxy vs the upstream hit directly.

    python bench/bench.py                 # every point once (about 2 minutes)
    python bench/bench.py --repeat 3      # medians of three runs
    python bench/bench.py --quick         # a smoke run

Three processes, pinned apart on a 2-core machine: the fake upstream and this load generator
on core 0, the server under test alone on core 1.  The upstream and the load generator are
raw asyncio sockets (no httpx, no framework) so neither is the bottleneck.  Each request asks
the upstream, through fields that nodechat passes through unchanged, for ``bench_chunks``
chunks paced ``bench_pace`` seconds apart.

Reported per point: requests/s, CPU ms per request of the server under test (from
/proc/<pid>/stat), time to first content chunk p50/p99 and what the proxy adds to the direct
figure, and in paced points the p99 gap between chunks; then idle and peak RSS and import time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICKS = os.sysconf("SC_CLK_TCK")


# -- the fake upstream: raw asyncio, HTTP/1.1 keep-alive, chunked SSE ----------------------

def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = ('{"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,"model":"bench",'
            '"choices":[{"index":0,"delta":')
    piece = _chunk(b"data: " + (head + '{"content":"tok "},"finish_reason":null}]}').encode() + b"\n\n")
    tail = _chunk(b"data: " + (head + '{},"finish_reason":"stop"}]}').encode() + b"\n\n"
                  + b'data: {"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,'
                  b'"model":"bench","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,'
                  b'"total_tokens":10}}\n\ndata: [DONE]\n\n') + b"0\r\n\r\n"
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in request.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            words = str((body.get("messages") or [{}])[-1].get("content", "")).split()
            if words[:1] == ["bench"]:  # agent paths pass no extra fields: "bench N PACE"
                body["bench_chunks"], body["bench_pace"] = words[1], words[2]
            if b"/models" in request.split(b"\r\n")[0]:
                data = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(data), data))
                continue
            chunks, pace = int(body.get("bench_chunks", 20)), float(body.get("bench_pace", 0))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for index in range(chunks):
                if pace and index:
                    await writer.drain()
                    await asyncio.sleep(pace)
                writer.write(piece)
            writer.write(tail)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int) -> None:
    async def run() -> None:
        server = await asyncio.start_server(upstream_connection, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()
    asyncio.run(run())


# -- the naive proxy: Starlette StreamingResponse over httpx aiter_lines (the reference) ------

NAIVE_PROXY = '''
import json, sys, httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

UPSTREAM = sys.argv[1]
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
'''


# -- the load generator: raw asyncio sockets ---------------------------------------------------

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


async def one_request(reader, writer, payload: bytes) -> tuple[float, list[float], float]:
    """Send one request on a kept-alive connection; (ttfc, gaps between content chunks, total)."""
    started = time.perf_counter()
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    clock = ChunkClock(started)
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return clock.result()
        if b'"content"' in data:
            clock.tick()


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
        if b'"type":"chunk"' in data:
            clock.tick()


async def load(port: int, target: str, streams: int, chunks: int, pace: float,
               duration: float, per_stream: int | None) -> dict:
    """``streams`` clients, each making requests back to back on one kept-alive connection."""
    prompt = {"role": "user", "content": f"bench {chunks} {pace}"}
    payload = b""  # WebSocket turns build theirs per connection: one thread each
    if target == "sse":
        payload = http_payload("/api/chat", {"messages": [prompt]})
    elif target == "openai":
        payload = http_payload("/v1/chat/completions", {
            "model": "bench", "stream": True, "bench_chunks": chunks, "bench_pace": pace, "messages": [prompt]})
    ttfcs, gaps, done = [], [], 0
    deadline = time.perf_counter() + duration

    async def worker(number: int) -> None:
        nonlocal done
        if pace:  # real streams do not tick in lockstep: spread their starts over one interval
            await asyncio.sleep(pace * number / streams)
        if target == "ws":
            reader, writer = await ws_open(port)
            thread = json.dumps({**prompt, "thread_id": f"bench-{os.getpid()}-{number}-{time.time_ns()}"})
            request = lambda: ws_turn(reader, writer, ws_frame(thread.encode()))
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            request = lambda: one_request(reader, writer, payload)
        count = 0
        while (per_stream is None and time.perf_counter() < deadline) or \
                (per_stream is not None and count < per_stream):
            ttfc, chunk_gaps, _ = await request()
            ttfcs.append(ttfc)
            gaps.extend(chunk_gaps)
            done += 1
            count += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(streams)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "elapsed": elapsed, "ttfc": ttfcs, "gaps": gaps}


async def idle_websockets(port: int, count: int) -> list:
    """Open ``count`` WebSockets, each answered once (a ping), and keep them open."""
    held = []
    for _ in range(count):
        reader, writer = await ws_open(port)
        writer.write(ws_frame(b'{"type":"ping"}'))
        await ws_read(reader)
        held.append(writer)
    return held


# -- orchestration -----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(cmd: list[str], core: int, port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.sched_setaffinity(proc.pid, {core})
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            import socket
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


UNPACED = [(s, c) for c in (20, 200) for s in (1, 16, 64)]
AGENT_POINTS = [(1, 20), (1, 200), (16, 20)]
PACED_SCAN = (64, 256, 512, 1024)
PACE = 0.02


def measure(port: int, pid: int, target: str, streams: int, chunks: int, pace: float,
            duration: float) -> dict:
    before = cpu_seconds(pid)
    result = asyncio.run(load(port, target, streams, chunks, pace, duration, per_stream=2 if pace else None))
    cpu = cpu_seconds(pid) - before
    return {"rps": result["requests"] / result["elapsed"], "cpu_ms": 1000 * cpu / result["requests"],
            "ttfc50": 1000 * pct(result["ttfc"], 0.5), "ttfc99": 1000 * pct(result["ttfc"], 0.99),
            "gap99": 1000 * pct(result["gaps"], 0.99), "requests": result["requests"]}


def launch(name: str, up_url: str, naive_file: str, options: dict) -> list[str]:
    run = (f"uvicorn.run(app, host='127.0.0.1', port=int(os.environ['PORT']), log_level='error', "
           f"access_log=False, http={options['http']!r}, loop={options['loop']!r})")
    if name == "naive":
        return [sys.executable, "-c", f"import os, sys, uvicorn; sys.argv=['', {up_url!r}]; "
                f"exec(open({naive_file!r}).read()); {run}"]
    return [sys.executable, "-c", f"import os, uvicorn, nodechat; app = nodechat.create_app(max_turns_per_user=10**6); {run}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per point; medians are reported")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per unpaced point")
    parser.add_argument("--quick", action="store_true", help="one short pass, fewer points")
    parser.add_argument("--http", default="auto", help="uvicorn --http for both proxies (h11, httptools)")
    parser.add_argument("--loop", default="auto", help="uvicorn --loop for both proxies (asyncio, uvloop)")
    parser.add_argument("serve_upstream", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("port", nargs="?", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream == "upstream":
        return serve_upstream(args.port)
    os.sched_setaffinity(0, {0})
    up_port = free_port()
    upstream = start([sys.executable, __file__, "upstream", str(up_port)], 0, up_port)
    up_url = f"http://127.0.0.1:{up_port}/v1"
    naive_file = os.path.join(HERE, "_naive_proxy.py")
    with open(naive_file, "w") as fh:
        fh.write(NAIVE_PROXY)
    data_dir = tempfile.mkdtemp(prefix="nodechat-bench-")
    env = {"OPENAI_BASE_URL": up_url, "NODECHAT_MODEL": "bench", "NODECHAT_TOKENS": "bench:bench",
           "NODECHAT_DATA_DIR": data_dir}
    unpaced = UNPACED[:2] if args.quick else UNPACED
    scan = PACED_SCAN[:2] if args.quick else PACED_SCAN
    duration = 1.0 if args.quick else args.duration
    options = {"http": args.http, "loop": args.loop}
    results: dict = {}
    extras: dict = {}

    def run_points(name, port, pid, target, points, pace=0.0):
        for streams, chunks in points:
            runs = results.setdefault((streams, chunks, pace), {}).setdefault(name, [])
            for _ in range(args.repeat):
                runs.append(measure(port, pid, target, streams, chunks, pace, duration))

    try:
        run_points("upstream", up_port, upstream.pid, "openai", unpaced)
        run_points("upstream", up_port, upstream.pid, "openai", [(s, 20) for s in scan], PACE)
        for name in ("naive", "nodechat"):
            port = free_port()
            began = time.perf_counter()
            proc = start(launch(name, up_url, naive_file, options), 1, port, {**env, "PORT": str(port)})
            extras[name] = {"ready_s": time.perf_counter() - began}
            time.sleep(0.3)
            extras[name]["idle_mb"] = rss_mb(proc.pid)
            run_points(name, port, proc.pid, "openai", unpaced)
            run_points(name, port, proc.pid, "openai",
                       [(s, 20) for s in (scan if name == "nodechat" else scan[:2])], PACE)
            if name == "nodechat":
                run_points("nodechat /api/chat", port, proc.pid, "sse", AGENT_POINTS[:2] if args.quick else AGENT_POINTS)
                run_points("nodechat /chat ws", port, proc.pid, "ws", AGENT_POINTS[:2] if args.quick else AGENT_POINTS)
            extras[name]["peak_mb"] = rss_mb(proc.pid, "VmHWM")
            proc.terminate()
            proc.wait(10)
        port = free_port()  # idle WebSockets on a fresh process, so freed memory hides nothing
        proc = start(launch("nodechat", up_url, naive_file, options), 1, port, {**env, "PORT": str(port)})
        time.sleep(0.3)
        before = rss_mb(proc.pid)
        held = asyncio.run(hold_idle(port, 200 if args.quick else 1000, proc.pid))
        extras["nodechat"].update(held, rss_before_ws=before)
        proc.terminate()
        proc.wait(10)
    finally:
        upstream.terminate()
        os.unlink(naive_file)
    report(results, extras, options)
    report_storage()


async def hold_idle(port: int, count: int, pid: int) -> dict:
    held = await idle_websockets(port, count)
    await asyncio.sleep(0.5)
    after = rss_mb(pid)
    for writer in held:
        writer.close()
    return {"ws_count": count, "rss_with_ws": after}


def fit(results: dict, name: str) -> tuple[float, float] | None:
    """Per-event CPU (µs) and fixed CPU per request (ms) from the 1x20 and 1x200 points."""
    try:
        c20 = statistics.median(r["cpu_ms"] for r in results[(1, 20, 0.0)][name])
        c200 = statistics.median(r["cpu_ms"] for r in results[(1, 200, 0.0)][name])
    except KeyError:
        return None
    per_event = (c200 - c20) / 180
    return per_event * 1000, c20 - 20 * per_event


def report(results: dict, extras: dict, options: dict) -> None:
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"\nuvicorn http={options['http']} loop={options['loop']}")
    print("\n| streams x chunks | pace | server | req/s | CPU ms/req | TTFC p50 ms (added) | "
          "TTFC p99 ms (added) | gap p99 ms (added) |")
    print("|---|---|---|---|---|---|---|---|")
    for (streams, chunks, pace), by_name in results.items():
        base = by_name.get("upstream")
        for name, runs in by_name.items():
            def added(key):
                if name == "upstream" or base is None:
                    return ""
                return f" ({med(runs, key) - med(base, key):+.2f})"
            gap = f"{med(runs, 'gap99'):.1f}{added('gap99')}" if pace else "—"
            print(f"| {streams} x {chunks} | {'%d ms' % (pace * 1000) if pace else '—'} | {name} | "
                  f"{med(runs, 'rps'):.0f} | {med(runs, 'cpu_ms'):.2f} | {med(runs, 'ttfc50'):.2f}{added('ttfc50')} | "
                  f"{med(runs, 'ttfc99'):.2f}{added('ttfc99')} | {gap} |")
    print("\n| server | CPU per streamed event | fixed CPU per request |")
    print("|---|---|---|")
    for name in ("upstream", "naive", "nodechat", "nodechat /api/chat", "nodechat /chat ws"):
        fitted = fit(results, name)
        if fitted:
            print(f"| {name} | {fitted[0]:.1f} µs | {fitted[1]:.2f} ms |")
    held = []
    for streams in PACED_SCAN:
        point = results.get((streams, 20, PACE), {})
        if "nodechat" in point and "upstream" in point:
            ttfc = med(point["nodechat"], "ttfc50") - med(point["upstream"], "ttfc50")
            gap = med(point["nodechat"], "gap99") - med(point["upstream"], "gap99")
            if ttfc <= 5 and gap <= 20:
                held.append(streams)
    print(f"\npaced at 20 ms: most streams tried that nodechat held within +5 ms TTFC p50 and "
          f"+20 ms gap p99: {max(held) if held else 'none of ' + str(PACED_SCAN)}")
    for name, info in extras.items():
        line = (f"{name}: start to ready {info['ready_s']:.2f} s, idle RSS {info['idle_mb']:.1f} MB, "
                f"peak RSS {info['peak_mb']:.1f} MB")
        if "ws_count" in info:
            per = (info["rss_with_ws"] - info["rss_before_ws"]) * 1024 / info["ws_count"]
            line += (f"; {info['ws_count']} idle WebSockets held: RSS {info['rss_before_ws']:.1f} -> "
                     f"{info['rss_with_ws']:.1f} MB ({per:.1f} KB each)")
        print(line)
    import py_compile
    py_compile.compile(os.path.join(ROOT, "nodechat.py"))  # as after pip install: a .pyc exists
    imports = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nodechat"],
                             cwd=ROOT, capture_output=True, text=True).stderr.strip().splitlines()
        imports.append(int(out[-1].split("|")[1]) / 1000)
    print(f"import nodechat: {statistics.median(imports):.0f} ms (python -X importtime with its .pyc, median of 5)")


def report_storage() -> None:
    """Appending to a long conversation vs a short one; searching 10,000 memories."""
    sys.path.insert(0, ROOT)
    import nodechat

    async def timed(work, repeat: int = 30) -> float:
        times = []
        for _ in range(repeat):
            began = time.perf_counter()
            await work()
            times.append(time.perf_counter() - began)
        return 1000 * statistics.median(times)

    async def run() -> None:
        store = nodechat.JSONFileStore(tempfile.mkdtemp(prefix="nodechat-store-"))
        message = {"role": "user", "content": "a message of ordinary length " * 4}
        for cid, size in (("short", 10), ("long", 10_000)):
            await store.create_conversation(cid, "u")
            await store.append_messages(cid, [message] * size)
        short = await timed(lambda: store.append_messages("short", [message]))
        long = await timed(lambda: store.append_messages("long", [message]))
        words = [f"w{i}" for i in range(5000)] + "tea coffee bicycle oslo piano".split()
        memories = [{"id": f"m{i}", "content": " ".join(words[(i * 7 + k * 13) % len(words)] for k in range(8)),
                     "created_at": ""} for i in range(10_000)]
        nodechat._write_json(store._memories("u"), memories)
        first = await timed(lambda: store.search_memories("u", "which bicycle and tea", 10), 1)
        warm = await timed(lambda: store.search_memories("u", "which bicycle and tea", 10))
        print(f"storage: append one message to a 10-message conversation {short:.2f} ms, to a "
              f"10,000-message one {long:.2f} ms; search 10,000 memories {warm:.2f} ms "
              f"({first:.0f} ms the first time, building the index)")

    asyncio.run(run())


if __name__ == "__main__":
    main()
