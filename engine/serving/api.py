"""The HTTP API and web page over a ``Scheduler`` (FastAPI): submit a request, follow it as Server-Sent Events, fetch
its images and grid, cancel it. Request fields are checked by the same parsers as generate.py's flags, with a 400 that
names the field; a full queue answers 429 (503 when the model is not running) with a Retry-After."""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from engine.cli import fraction, non_negative_int, number, positive_float, positive_int, rng_seed, top_k_arg
from engine.codecs.tokenizers import caption_ids
from engine.sampling import Settings, resolve
from engine.serving.scheduler import FINAL, Busy, Request, Scheduler, grid_url, image_url

PAGE = Path(__file__).with_name("page.html")
HEARTBEAT_S = 15.0  # an SSE comment this often: proxies keep the stream open, and a gone client is noticed

_finite = number(float, math.isfinite, "a finite number")
# Field -> (parser of its text, as generate.py parses the flag of that name; None allowed).
FIELDS: dict[str, tuple[Callable[[str], Any], bool]] = {
    "num_images": (positive_int, False),
    "seed": (rng_seed, True),
    "top_k": (top_k_arg, False),
    "top_p": (fraction, True),
    "temperature": (positive_float, False),
    "cond_scale": (_finite, True),
    "preview_every": (non_negative_int, False),
}
DEFAULTS = {"num_images": 4, "seed": None, "top_k": 0.9, "top_p": None, "temperature": 1.0, "cond_scale": None,
            "preview_every": 0, "truncate_captions": False}


class BadRequest(ValueError):
    pass


def parse_fields(body: Any) -> dict:
    """The request's options with their defaults, each checked as generate.py checks its flag (BadRequest)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - set(DEFAULTS) - {"prompt", "prompts"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}; fields: prompt or prompts, {', '.join(DEFAULTS)}")
    if ("prompt" in body) == ("prompts" in body):
        raise BadRequest("give either prompt (a string) or prompts (a list of strings)")
    prompts = [body["prompt"]] if "prompt" in body else body["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompts must be a non-empty list of strings")
    prompts = [p.strip() for p in prompts]
    if not all(prompts):
        raise BadRequest("a prompt is empty")
    fields = dict(DEFAULTS, prompts=prompts)
    for name, (parse, nullable) in FIELDS.items():
        value = body.get(name, DEFAULTS[name])
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadRequest(f"{name}: expected a number, got {json.dumps(value)}")
        try:
            fields[name] = parse(str(value))
        except Exception as e:  # argparse.ArgumentTypeError: the flag's message
            raise BadRequest(f"{name}: {e}") from None
    fields["truncate_captions"] = body.get("truncate_captions", False)
    if not isinstance(fields["truncate_captions"], bool):
        raise BadRequest("truncate_captions: expected true or false")
    return fields


def build_request(body: Any, model, tokenizer, max_images: int) -> Request:
    """A ``Request`` from a JSON body (BadRequest when anything is wrong, before anything is queued)."""
    f = parse_fields(body)
    c = model.config
    total = len(f["prompts"]) * f["num_images"]
    if total > max_images:
        raise BadRequest(f"{total} images ({len(f['prompts'])} prompts x num_images {f['num_images']}) are more than "
                         f"the {max_images} a request may ask for")
    texts = []
    for prompt in f["prompts"]:
        try:
            ids = caption_ids(prompt, tokenizer, c.text_seq_len, f["truncate_captions"],
                              too_long="shorten it or set truncate_captions")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        texts.append(F.pad(ids, (0, c.text_seq_len - len(ids))))
    # A float top_k is DALLE-pytorch's threshold, an int a count (as generate.py's --top_k).
    filter_thres, top_k = (f["top_k"], None) if isinstance(f["top_k"], float) else (None, f["top_k"])
    settings = resolve(model, Settings(temperature=f["temperature"], filter_thres=filter_thres, top_k=top_k,
                                       top_p=f["top_p"], cond_scale=f["cond_scale"]), 1)[0]
    seed = secrets.randbelow(2**31) if f["seed"] is None else f["seed"]
    return Request(id=secrets.token_urlsafe(9), prompts=f["prompts"], texts=texts, num_images=f["num_images"],
                   settings=settings, seed=seed, preview_every=f["preview_every"])


def status(request: Request) -> dict:
    order = request.order or [k for k, image in enumerate(request.images) if image is not None]
    return {
        "id": request.id, "state": request.state, "prompts": request.prompts, "seed": request.seed,
        "total_images": request.total_images, "images_done": request.images_done, "progress": request.progress,
        "images": [{"prompt": k // request.num_images, "index": k % request.num_images, "url": image_url(request, k),
                    "score": request.scores[k]} for k in order if request.images[k] is not None],
        "grid": grid_url(request) if request.state == "done" else None, "error": request.error,
        "elapsed_s": round((request.finished or time.monotonic()) - request.created, 3),
    }


def create_app(scheduler: Scheduler, tokenizer, *, max_images: int, model_name: str = "",
               start_scheduler: bool = True) -> FastAPI:
    """The app. With ``start_scheduler`` it starts the scheduler in a thread of its own when it starts; either way it
    stops the scheduler when it stops."""
    model = scheduler.model
    c = model.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_scheduler:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="DALL-E engine", lifespan=lifespan)
    app.state.scheduler = scheduler

    def error(status_code: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status_code, headers=headers or None)

    def find(request_id: str) -> Request | None:
        return scheduler.requests.get(request_id)

    page_html = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/api/info")
    def info() -> dict:
        return {"model": model_name, "text_seq_len": c.text_seq_len, "image_size": model.vae.image_size,
                "image_seq_len": c.image_seq_len, "fmap_size": c.image_fmap_size,
                "defaults": dict(DEFAULTS, cond_scale=c.default_cond_scale), "max_images_per_request": max_images,
                "capacity_rows": scheduler.capacity, "max_queue": scheduler.max_queue}

    @app.post("/api/requests", status_code=202)
    async def submit(http: HTTPRequest):
        try:
            body = json.loads(await http.body())
        except ValueError as e:
            return error(400, f"the body is not JSON: {e}")
        try:
            request = build_request(body, model, tokenizer, max_images)
            scheduler.submit(request)
        except Busy as e:
            return error(e.status, str(e), **{"Retry-After": str(e.retry_after)})
        except ValueError as e:  # BadRequest included
            return error(400, str(e))
        return JSONResponse({"id": request.id, "url": f"/api/requests/{request.id}",
                             "events": f"/api/requests/{request.id}/events", "seed": request.seed,
                             "total_images": request.total_images}, status_code=202)

    @app.get("/api/requests/{request_id}")
    def get(request_id: str):
        request = find(request_id)
        return error(404, f"no request {request_id!r}") if request is None else status(request)

    @app.delete("/api/requests/{request_id}")
    def cancel(request_id: str):
        request = find(request_id)
        if request is None:
            return error(404, f"no request {request_id!r}")
        scheduler.cancel(request)
        deadline = time.monotonic() + 10  # the scheduler takes it out at its next step
        while request.state not in FINAL and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"state": request.state}

    @app.get("/api/requests/{request_id}/events")
    async def events(request_id: str):
        request = find(request_id)
        if request is None:
            return error(404, f"no request {request_id!r}")
        return StreamingResponse(follow(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def follow(request: Request):
        """The request's events as SSE, from its first; if every follower leaves before it ends, it is cancelled."""
        request.followers += 1
        seen, ended = 0, False
        try:
            while not ended:
                seen, new = await request.feed.follow(seen, HEARTBEAT_S)
                if not new:
                    yield ": keep-alive\n\n"
                for name, data in new:
                    yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
                    ended = ended or name in FINAL
        finally:
            request.followers -= 1
            if request.followers == 0 and request.state not in FINAL:
                scheduler.cancel(request)

    @app.get("/api/requests/{request_id}/images/{k}.png")
    def image(request_id: str, k: int):
        request = find(request_id)
        if request is None or not 0 <= k < request.total_images:
            return error(404, f"no image {k} in request {request_id!r}")
        if request.images[k] is None:
            return error(409, f"image {k} is not done yet")
        return Response(request.images[k], media_type="image/png")

    @app.get("/api/requests/{request_id}/grid.png")
    def grid(request_id: str):
        request = find(request_id)
        if request is None:
            return error(404, f"no request {request_id!r}")
        if request.state != "done":
            return error(409, f"request {request_id!r} is {request.state}: the grid comes when it is done")
        return Response(request.grid, media_type="image/png")

    return app
