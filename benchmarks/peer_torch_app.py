"""The obvious competent server a user would write instead: FastAPI + torch.

One ``torch.nn.EmbeddingBag`` call per request, bodies parsed with orjson, ids turned
into a tensor with ``np.fromiter`` (no per-element Python checks), the answer encoded by
orjson. No batching across requests. Serves the same route and answer shape as
bagserve's native one, over ``BAGSERVE_PEER_TABLE`` (a .safetensors file with one
``weight``), mean pooling:

    BAGSERVE_PEER_TABLE=table.safetensors uvicorn benchmarks.peer_torch_app:app --port 8001

torch is the benchmark's own dependency (``pip install torch``), never the project's.
"""

from __future__ import annotations

import os
from itertools import chain

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from safetensors.numpy import load_file

app = FastAPI()
_weight = torch.from_numpy(load_file(os.environ["BAGSERVE_PEER_TABLE"])["weight"])
BAG = torch.nn.EmbeddingBag.from_pretrained(_weight, mode="mean").eval()


@app.post("/v1/models/{name}/embed")
async def embed(name: str, request: Request) -> Response:
    bags = orjson.loads(await request.body())["bags"]
    lengths = np.fromiter(map(len, bags), dtype=np.int64, count=len(bags))
    ids = np.fromiter(chain.from_iterable(bags), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.zeros(len(bags), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    with torch.inference_mode():
        rows = BAG(torch.from_numpy(ids), torch.from_numpy(offsets)).numpy()
    return Response(orjson.dumps({"model": name, "dim": rows.shape[1], "embeddings": rows},
                                 option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
