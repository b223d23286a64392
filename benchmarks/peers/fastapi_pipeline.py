"""The 3-stage image pipeline as a FastAPI app, written as FastAPI's docs recommend for blocking
model code: a plain ``def`` endpoint (FastAPI runs it in its thread pool), served by uvicorn
with ``--workers 2`` (two processes, as flowkit's two workers), one torch thread per process.

    uvicorn fastapi_pipeline:app --app-dir benchmarks/peers --workers 2 --no-access-log
"""

import base64

import torch
from fastapi import FastAPI

from flowkit.demo import TinyResNet, postprocess, preprocess

torch.set_num_threads(1)
app = FastAPI()
model = TinyResNet()


@app.post("/predict")
def predict(body: dict) -> dict:
    out = []
    for i, row in enumerate(body["rows"]):
        x = preprocess({"img": base64.b64decode(row["img"])})
        label, prob = postprocess({"logits": model({"x": x})})
        out.append({"qid": i, "label": label, "prob": prob})
    return {"rows": out}


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}
