"""serve.py: the JSON API, the continuous-batching scheduler behind it and their failure modes, on a real uvicorn
server over a tiny checkpoint. Every image a client gets is checked against generate.py's for the same seed and
settings."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from conftest import free_port
from PIL import Image
from test_generate import CAPTIONS, tiny_checkpoint

import generate
import serve
from engine.model.config import GUIDED_COND_SCALE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), null_cond_prob=0.1,
                           attn_types=("full", "axial_row", "axial_col", "conv_like"))


@contextlib.contextmanager
def serving(ckpt: Path, *flags: str):
    """serve.py's app on a free port, in this process; yields (base url, the app's scheduler)."""
    port = free_port()
    args = serve.parse_args(["--dalle_path", str(ckpt), "--device", "cpu", "--port", str(port), *flags])
    app = serve.build(args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app.state.scheduler
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(ckpt):
    with serving(ckpt, "--batch_size", "12") as running:
        yield running


def events(client: httpx.Client, url: str, until=("done", "cancelled", "failed")):
    """The (name, data) SSE events of a request until one named in `until`."""
    seen = []
    with client.stream("GET", url) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                seen.append((name, json.loads(line[len("data: "):])))
                if name in until:
                    return seen
    return seen


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def as_jpg(png: bytes, tmp_path: Path, name: str) -> bytes:
    """The server's image written as generate.py writes its images."""
    path = tmp_path / name
    generate.save_jpg(torch.from_numpy(pixels(png).copy()).permute(2, 0, 1), path)
    return path.read_bytes()


# Mixed settings: guided at the model's default or another scale, unguided, counts, fractions, nucleus, temperature.
KINDS = [dict(), dict(cond_scale=1.0, top_p=0.8), dict(cond_scale=3.0, top_k=5), dict(top_k=0.5, temperature=0.7),
         dict(cond_scale=1.0, top_k=1)]
FLAGS = {"cond_scale": "--cond_scale", "top_p": "--top_p", "top_k": "--top_k", "temperature": "--temperature"}


def test_32_concurrent_clients_each_get_exactly_their_own_images(server, ckpt, tmp_path):
    """32 clients at once, with mixed prompts, seeds, counts and settings: each follows its events to the end and
    gets its own images, equal to what generate.py writes for the same prompt, seed and settings."""
    base, scheduler = server
    clients = [dict(prompt=CAPTIONS[i % 9], seed=i // 4, num_images=1 + i % 2, **KINDS[i % 5]) for i in range(32)]

    def run(body: dict) -> tuple[dict, list[tuple[str, dict]], list[bytes]]:
        with httpx.Client(base_url=base, timeout=120) as client:
            answer = client.post("/api/requests", json=body)
            assert answer.status_code == 202, answer.text
            submitted = answer.json()
            seen = events(client, submitted["events"])
            status = client.get(submitted["url"]).json()
            images = [client.get(image["url"]).content for image in status["images"]]
            return status, seen, images

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, clients))
    assert max(scheduler.peak_rows, 0) > 2  # requests really shared decode steps

    for i, (body, (status, seen, images)) in enumerate(zip(clients, results)):
        assert status["state"] == "done" and status["prompts"] == [body["prompt"]] and status["seed"] == body["seed"]
        assert [name for name, _ in seen][-1] == "done" and status["progress"] == 1.0
        assert len(images) == body["num_images"] and [im["index"] for im in status["images"]] == list(
            range(body["num_images"]))
        flags = [x for key, value in body.items() if key in FLAGS for x in (FLAGS[key], str(value))]
        out = tmp_path / f"gen{i}"
        generate.main(["--dalle_path", str(ckpt), "--text", body["prompt"], "--num_images", str(body["num_images"]),
                       "--seed", str(body["seed"]), "--device", "cpu", "--outputs_dir", str(out), *flags])
        folder = next(out.iterdir())
        assert json.loads((folder / "settings.json").read_text())["cond_scale"] == body.get("cond_scale",
                                                                                          GUIDED_COND_SCALE)
        for k, png in enumerate(images):
            assert as_jpg(png, tmp_path, f"{i}-{k}.jpg") == (folder / f"{k}.jpg").read_bytes(), (i, k, body)
    assert scheduler.batch.used == 0 and not scheduler.waiting


def test_progress_previews_images_and_grid(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=60) as client:
        submitted = client.post("/api/requests", json=dict(prompts=["a red cube", "a blue ball"], num_images=2,
                                                           seed=3, preview_every=1)).json()
        assert submitted["total_images"] == 4 and submitted["seed"] == 3
        seen = events(client, submitted["events"])
        names = [name for name, _ in seen]
        assert names[0] == "state" and names[-1] == "done" and names.count("image") == 4
        assert "progress" in names and "preview" in names
        previews = [data for name, data in seen if name == "preview"]
        assert all(p["data"].startswith("data:image/png;base64,") for p in previews)
        progress = [data["progress"] for name, data in seen if name == "progress"]
        assert progress == sorted(progress) and 0 < progress[0] and progress[-1] <= 1
        grid = client.get(seen[-1][1]["grid"])
        assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
        image = pixels(client.get(seen[-1][1]["images"][0]).content)
        assert pixels(grid.content).shape[0] == 2 * image.shape[0] + 3 * 2  # 2 x 2 images, 2-pixel padding
        # A late follower reads the whole story again.
        assert [name for name, _ in events(client, submitted["events"])][-1] == "done"


def test_cancel_mid_run_frees_the_rows_and_spares_the_others(server):
    base, scheduler = server
    with httpx.Client(base_url=base, timeout=60) as client:
        big = client.post("/api/requests", json=dict(prompt="a red cube", num_images=24, seed=1)).json()
        small = client.post("/api/requests", json=dict(prompt="a blue cone", num_images=1, seed=1)).json()
        seen = events(client, big["events"], until=("progress",))
        assert seen[-1][0] == "progress"
        assert client.delete(big["url"]).json() == {"state": "cancelled"}
        assert events(client, big["events"])[-1][0] == "cancelled"
        assert events(client, small["events"])[-1][0] == "done"
        status = client.get(big["url"]).json()
        assert status["state"] == "cancelled" and status["images_done"] < 24
        assert client.get(f"{big['url']}/grid.png").status_code == 409
    assert all(image.owner[0].id != big["id"] for image in list(scheduler.waiting) + scheduler.batch.images)


def test_a_client_that_disconnects_cancels_its_request(server):
    base, scheduler = server
    with httpx.Client(base_url=base, timeout=60) as client:
        submitted = client.post("/api/requests", json=dict(prompt="a green ball", num_images=24, seed=2)).json()
        events(client, submitted["events"], until=("progress",))  # leaves the stream
        deadline = time.monotonic() + 30
        while client.get(submitted["url"]).json()["state"] != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(submitted["url"]).json()["state"] == "cancelled"


def test_a_full_queue_answers_429_with_retry_after(ckpt):
    with serving(ckpt, "--batch_size", "2", "--max_queue", "6", "--max_images_per_request", "4") as (base, _):
        with httpx.Client(base_url=base, timeout=60) as client:
            answers = [client.post("/api/requests", json=dict(prompt="a red cube", num_images=4, seed=s))
                       for s in range(4)]
            codes = [a.status_code for a in answers]
            assert 202 in codes and 429 in codes, codes
            refused = answers[codes.index(429)]
            assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["error"]
            for answer in answers:
                if answer.status_code == 202:
                    assert events(client, answer.json()["events"])[-1][0] == "done"


def test_a_failing_request_fails_alone(server, monkeypatch):
    """A request whose images cannot be finished (here its ranking raises) fails with its error; a request beside
    it is done."""
    base, scheduler = server

    def rank(request, images):
        if request.prompts == ["a red ball"]:
            raise RuntimeError("planted failure")
        return list(range(len(images)))

    monkeypatch.setattr(scheduler, "rank", rank)
    with httpx.Client(base_url=base, timeout=60) as client:
        bad = client.post("/api/requests", json=dict(prompt="a red ball", num_images=2, seed=0)).json()
        good = client.post("/api/requests", json=dict(prompt="a red cube", num_images=2, seed=0)).json()
        failed = events(client, bad["events"])[-1]
        assert failed == ("failed", {"error": "ranking images failed: planted failure"})
        assert events(client, good["events"])[-1][0] == "done"
        assert client.get(bad["url"]).json()["state"] == "failed"


@pytest.mark.parametrize("body, message", [
    ("not json", "not JSON"),
    ([], "JSON object"),
    ({}, "either prompt"),
    ({"prompt": "a", "prompts": ["b"]}, "either prompt"),
    ({"prompts": []}, "non-empty list"),
    ({"prompt": "  "}, "empty"),
    ({"prompt": "a red cube", "num_images": 0}, "num_images: expected an integer >= 1, got 0"),
    ({"prompt": "a red cube", "num_images": 2.5}, "num_images: expected an integer >= 1"),
    ({"prompt": "a red cube", "top_k": 1.5}, "top_k: expected a fraction in [0, 1) or a whole count >= 1"),
    ({"prompt": "a red cube", "top_p": 0}, "top_p: expected a number in (0, 1]"),
    ({"prompt": "a red cube", "temperature": -1}, "temperature: expected a finite number > 0"),
    ({"prompt": "a red cube", "cond_scale": "nan"}, "cond_scale: expected a finite number"),
    ({"prompt": "a red cube", "seed": -1}, "seed: expected an integer in [0, 4294967295]"),
    ({"prompt": "a red cube", "seed": True}, "seed: expected a number"),
    ({"prompt": "a red cube", "truncate_captions": "yes"}, "truncate_captions: expected true or false"),
    ({"prompt": "a red cube", "steps": 3}, "unknown field 'steps'"),
    ({"prompt": "a red cube " * 20}, "more than the model's caption length 5; shorten it or set truncate_captions"),
    ({"prompts": ["a red cube"] * 9, "num_images": 8}, "72 images (9 prompts x num_images 8) are more than the 64"),
], ids=lambda x: str(x)[:40])
def test_malformed_requests_get_a_400_naming_the_problem(server, body, message):
    base, scheduler = server
    content = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(f"{base}/api/requests", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert not scheduler.waiting


def test_long_prompts_may_be_truncated_and_unknown_requests_are_404(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=60) as client:
        answer = client.post("/api/requests", json=dict(prompt="a red cube " * 20, truncate_captions=True,
                                                         num_images=1, seed=0))
        assert answer.status_code == 202
        assert events(client, answer.json()["events"])[-1][0] == "done"
        for path in ("/api/requests/nope", "/api/requests/nope/events", "/api/requests/nope/grid.png",
                     f"{answer.json()['url']}/images/5.png"):
            assert client.get(path).status_code == 404, path
        assert client.delete("/api/requests/nope").status_code == 404
        info = client.get("/api/info").json()
        assert info["defaults"]["cond_scale"] == GUIDED_COND_SCALE and info["text_seq_len"] == 5
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_bad_server_flags_exit_with_a_message(ckpt, capsys):
    for flags, message in ((["--port", "0"], "--port"), (["--max_queue", "2", "--max_images_per_request", "4"],
                                                        "more than --max_queue")):
        with pytest.raises(SystemExit):
            serve.parse_args(["--dalle_path", str(ckpt), *flags])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot load --dalle_path"):
        serve.build(serve.parse_args(["--dalle_path", str(ckpt.parent / "missing.safetensors"), "--device", "cpu"]))
