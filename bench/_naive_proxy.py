
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
                    yield "data: [DONE]\n\n"
                elif line.startswith("data: "):
                    yield "data: " + json.dumps(json.loads(line[6:])) + "\n\n"
        finally:
            await upstream.aclose()

    return StreamingResponse(relay(), media_type="text/event-stream")

app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
