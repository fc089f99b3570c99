"""Calibration for the lookup figures: an almost empty FastAPI app served the way
``imagefarm serve-lookup`` serves (uvicorn, one process, no access log, a sync
endpoint, a pydantic response model). ``python -m bench.floor PORT``."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Answer(BaseModel):
    image: str


app = FastAPI()


@app.get("/v1/lookup", response_model=Answer)
def lookup(image: str) -> Answer:
    return Answer(image=image)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
