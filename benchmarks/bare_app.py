"""The ceiling: a bare FastAPI endpoint that parses the same JSON body and returns an
orjson-serialised array of the same shape, with no lookup, validation or batching.

    uvicorn benchmarks.bare_app:app --port 8001

``BARE_DIM`` sets the answered width (128; 64 for the text benchmark's model).
"""

from __future__ import annotations

import os

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI()
DIM = int(os.environ.get("BARE_DIM", "128"))
ROW = np.linspace(-1, 1, DIM, dtype=np.float32)


@app.post("/v1/models/{name}/embed")
async def embed(name: str, request: Request) -> Response:
    bags = orjson.loads(await request.body())["bags"]
    # A real (contiguous) array: orjson refuses broadcast views, which answered 500 to
    # every request of more than one bag.
    rows = np.tile(ROW, (len(bags), 1))
    return Response(orjson.dumps({"model": name, "dim": DIM, "embeddings": rows},
                                 option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


@app.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    """OpenAI's shape for a text (or texts): parsed, answered with constant vectors."""
    body = orjson.loads(await request.body())
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = [{"object": "embedding", "embedding": ROW, "index": i} for i in range(len(texts))]
    return Response(orjson.dumps({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": 0, "total_tokens": 0}},
                                 option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
