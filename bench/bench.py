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
import json
import os
import statistics
import subprocess
import sys
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

async def one_request(reader, writer, payload: bytes) -> tuple[float, list[float], float]:
    """Send one request on a kept-alive connection; (ttfc, gaps between content chunks, total)."""
    started = time.perf_counter()
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    first, last, gaps = None, None, []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        if b'"content"' in data:
            now = time.perf_counter()
            if first is None:
                first = now - started
            else:
                gaps.append(now - last)
            last = now
    return first or 0.0, gaps, time.perf_counter() - started


async def load(port: int, path: str, streams: int, chunks: int, pace: float,
               duration: float, per_stream: int | None) -> dict:
    body = json.dumps({"model": "bench", "stream": True, "bench_chunks": chunks, "bench_pace": pace,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    payload = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               f"authorization: Bearer bench\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    ttfcs, gaps, done = [], [], 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        count = 0
        while (per_stream is None and time.perf_counter() < deadline) or \
                (per_stream is not None and count < per_stream):
            ttfc, chunk_gaps, _ = await one_request(reader, writer, payload)
            ttfcs.append(ttfc)
            gaps.extend(chunk_gaps)
            done += 1
            count += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "elapsed": elapsed, "ttfc": ttfcs, "gaps": gaps}


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
PACED = [(64, 20), (256, 20)]


def measure(port: int, pid: int, streams: int, chunks: int, pace: float, duration: float) -> dict:
    before = cpu_seconds(pid)
    result = asyncio.run(load(port, "/v1/chat/completions", streams, chunks, pace, duration,
                              per_stream=2 if pace else None))
    cpu = cpu_seconds(pid) - before
    return {"rps": result["requests"] / result["elapsed"], "cpu_ms": 1000 * cpu / result["requests"],
            "ttfc50": 1000 * pct(result["ttfc"], 0.5), "ttfc99": 1000 * pct(result["ttfc"], 0.99),
            "gap99": 1000 * pct(result["gaps"], 0.99), "requests": result["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per unpaced point")
    parser.add_argument("--quick", action="store_true", help="one short pass, fewer points")
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
    targets = {
        "upstream": None,
        "naive": [sys.executable, "-c", f"import sys; sys.argv=['', {up_url!r}]; "
                  f"exec(open({naive_file!r}).read()); import uvicorn; "
                  "uvicorn.run(app, host='127.0.0.1', port=int(__import__('os').environ['PORT']), "
                  "log_level='error', access_log=False)"],
        "nodechat": [sys.executable, "-c", "import os, uvicorn, nodechat; uvicorn.run("
                     "nodechat.create_app(), host='127.0.0.1', port=int(os.environ['PORT']), "
                     "log_level='error', access_log=False)"],
    }
    env = {"OPENAI_BASE_URL": up_url, "NODECHAT_MODEL": "bench", "NODECHAT_TOKENS": "bench:bench",
           "NODECHAT_DATA_DIR": "/tmp/nodechat-bench-data"}
    points = UNPACED[:2] + PACED[:1] if args.quick else UNPACED + PACED
    duration = 1.0 if args.quick else args.duration
    results: dict = {}
    memory = {}
    try:
        for name, cmd in targets.items():
            if cmd is None:
                port, proc = up_port, upstream
            else:
                port = free_port()
                proc = start(cmd, 1, port, {**env, "PORT": str(port)})
                time.sleep(0.3)
                memory[name] = {"idle": rss_mb(proc.pid)}
            for repeat in range(args.repeat):
                for streams, chunks in points:
                    pace = 0.02 if (streams, chunks) in PACED else 0.0
                    key = (streams, chunks, pace)
                    results.setdefault(key, {}).setdefault(name, []).append(
                        measure(port, proc.pid, streams, chunks, pace, duration))
            if cmd is not None:
                memory[name]["peak"] = rss_mb(proc.pid, "VmHWM")
                proc.terminate()
                proc.wait(10)
    finally:
        upstream.terminate()
        os.unlink(naive_file)
    report(results, memory)


def report(results: dict, memory: dict) -> None:
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"\n| streams x chunks | pace | server | req/s | CPU ms/req | TTFC p50 ms | added p50 | "
          f"TTFC p99 ms | added p99 | gap p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (streams, chunks, pace), by_name in results.items():
        base = by_name["upstream"]
        for name, runs in by_name.items():
            added50 = med(runs, "ttfc50") - med(base, "ttfc50")
            added99 = med(runs, "ttfc99") - med(base, "ttfc99")
            print(f"| {streams} x {chunks} | {int(pace * 1000)} ms | {name} | {med(runs, 'rps'):.0f} | "
                  f"{med(runs, 'cpu_ms'):.2f} | {med(runs, 'ttfc50'):.2f} | "
                  f"{'' if name == 'upstream' else f'{added50:+.2f}'} | {med(runs, 'ttfc99'):.2f} | "
                  f"{'' if name == 'upstream' else f'{added99:+.2f}'} | "
                  f"{med(runs, 'gap99') if pace else float('nan'):.1f} |")
    for name, mem in memory.items():
        print(f"\n{name}: idle RSS {mem['idle']:.1f} MB, peak RSS {mem.get('peak', 0):.1f} MB")
    imports = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nodechat"],
                             cwd=ROOT, capture_output=True, text=True).stderr.strip().splitlines()
        imports.append(int(out[-1].split("|")[1]) / 1000)
    print(f"import nodechat: {statistics.median(imports):.0f} ms (python -X importtime, median of 5)")


if __name__ == "__main__":
    main()
