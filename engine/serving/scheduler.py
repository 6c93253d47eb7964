"""The server's scheduler: one model, one thread, one continuous batch shared by every request.

Requests queue their images (bounded: a full queue refuses new work with the wait it expects); at every step the
thread lets waiting images into the batch's free rows, samples one code for every image in it, decodes the finished
ones (and the previews asked for) with the VAE, and publishes what happened to each request's ``Feed``. A request's
failure (a VAE or CLIP error) fails that request alone; a failing step fails the images in the batch, which starts
again empty.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import math
import threading
import time
import traceback
from collections.abc import Callable

import torch

from engine.pictures import make_grid, png_bytes, to_uint8
from engine.sampling import Settings, row_keys
from engine.sampling.continuous import ContinuousBatch, Image

FINAL = ("done", "cancelled", "failed")


class Busy(Exception):
    """The queue is full, or the scheduler is not running (``status``: 429 or 503), for about ``retry_after`` s."""

    def __init__(self, message: str, status: int, retry_after: int):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Feed:
    """A request's events, kept for clients that follow late (a newer preview of an image replaces the older one);
    ``follow`` awaits them from an event loop while the scheduler thread publishes."""

    def __init__(self):
        self.events: list[tuple[str, dict] | None] = []
        self._preview_at: dict[int, int] = {}
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def publish(self, name: str, data: dict) -> None:
        with self._lock:
            if name == "preview":
                old = self._preview_at.get(data["image"])
                if old is not None:
                    self.events[old] = None
                self._preview_at[data["image"]] = len(self.events)
            self.events.append((name, data))
            for loop, event in self._waiters:
                loop.call_soon_threadsafe(event.set)

    async def follow(self, seen: int, timeout: float) -> tuple[int, list[tuple[str, dict]]]:
        """(how many events there are now, the new ones after the first ``seen``), waiting up to ``timeout`` s for
        one."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            waiting = len(self.events) == seen
            if waiting:
                self._waiters.add(waiter)
        try:
            if waiting:
                await asyncio.wait_for(waiter[1].wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)
                events = self.events[seen:]
        return seen + len(events), [event for event in events if event is not None]


@dataclasses.dataclass(eq=False)
class Request:
    """One client request: every prompt's ``num_images`` images, image k = prompt k // num_images, index
    k % num_images, drawing from the stream of (seed, index) as generate.py's image of that prompt and index does."""

    id: str
    prompts: list[str]
    texts: list[torch.Tensor]  # per prompt, (text_seq_len,) ids, 0-padded
    num_images: int
    settings: Settings  # resolved
    seed: int
    preview_every: int = 0  # grid rows between previews, 0: none
    state: str = "queued"
    error: str | None = None
    created: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None
    feed: Feed = dataclasses.field(default_factory=Feed)
    # PNG bytes of each image once done, and of the grid once all are: encoded by the scheduler, so that the threads
    # answering HTTP never run torch ops (see Scheduler.run).
    images: list[bytes | None] = dataclasses.field(default_factory=list)
    pixels: list[torch.Tensor | None] = dataclasses.field(default_factory=list)  # uint8 (c, h, w), until done
    grid: bytes | None = None
    scores: list[float | None] = dataclasses.field(default_factory=list)
    order: list[int] | None = None  # image numbers best first per prompt (reranked), once done
    codes_done: int = 0
    progress: float = 0.0  # codes sampled / codes to sample
    progress_sent: float = -math.inf  # when the last progress event went out
    cancel_requested: bool = False
    followers: int = 0  # clients following its events

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def images_done(self) -> int:
        return sum(image is not None for image in self.images)


class Scheduler:
    """Runs ``model`` (with its VAE) for every request, ``capacity`` model rows at a time, holding at most
    ``max_queue`` waiting images and the results of the last ``keep_finished`` finished requests. ``rank``:
    optional, (request, its images (n, c, h, w) uint8) -> the image numbers, best first within each prompt's (e.g.
    by a CLIP)."""

    def __init__(self, model, *, capacity: int, max_queue: int, device: torch.device | str,
                 rank: Callable[[Request, torch.Tensor], list[int]] | None = None, keep_finished: int = 256,
                 log=print):
        self.model, self.capacity, self.max_queue, self.device = model, capacity, max_queue, torch.device(device)
        self.rank, self.keep_finished, self.log = rank, keep_finished, log
        self.batch = ContinuousBatch(model, capacity, self.device)
        self.waiting: collections.deque[Image] = collections.deque()
        self.requests: dict[str, Request] = {}
        self._finished: collections.deque[str] = collections.deque()  # ids of the finished requests, oldest first
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancelling = False  # a cancel waits for the next step
        self._running = False
        self._rate = collections.deque(maxlen=64)  # (time, images finished) for the Retry-After estimate
        self.peak_rows = 0  # the most model rows one step has decoded

    # --- the clients' side (any thread) ---------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue ``request`` (Busy if it does not fit or the scheduler is not running)."""
        if request.total_images > self.max_queue:
            raise ValueError(f"{request.total_images} images are more than the queue holds ({self.max_queue})")
        with self._lock:
            if not self._running or self._stopping:
                raise Busy("the server is not running its model", 503, 5)
            if len(self.waiting) + request.total_images > self.max_queue:
                raise Busy(f"the queue is full ({len(self.waiting)} images waiting)", 429, self._retry_after())
            request.images = [None] * request.total_images
            request.pixels = [None] * request.total_images
            request.scores = [None] * request.total_images
            keys = row_keys(request.seed, torch.arange(request.num_images))
            for k in range(request.total_images):
                prompt, index = divmod(k, request.num_images)
                self.waiting.append(Image(request.texts[prompt], request.settings, keys[index],
                                          owner=(request, k)))
            self.requests[request.id] = request
            request.feed.publish("state", {"state": "queued"})
            self._lock.notify_all()

    def cancel(self, request: Request) -> None:
        """Ask for ``request`` to stop; its rows are freed at the next step."""
        with self._lock:
            if request.state not in FINAL:
                request.cancel_requested = self._cancelling = True
                self._lock.notify_all()

    def _retry_after(self) -> int:
        """Seconds until the queue has room for about one more request, from the recent rate (at least 1)."""
        if len(self._rate) < 2:
            return 5
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        per_s = (n1 - n0) / max(t1 - t0, 1e-3)
        return max(1, min(600, math.ceil(len(self.waiting) / max(per_s, 1e-3) / 4)))

    # --- the thread that runs the model ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve requests in this thread until ``stop``. On the CPU, make it the thread that loaded the model (the
        main thread): each thread that runs torch ops gets an OpenMP thread pool of its own, and with more pool
        threads than cores libgomp stops spinning between parallel regions, which makes decoding 1.6x slower."""
        with self._lock:
            self._running = True
        try:
            self._loop()
        finally:
            with self._lock:
                self._running = False

    def start(self) -> None:
        """``run`` in a thread of its own (what tests do)."""
        self._thread = threading.Thread(target=self.run, name="scheduler", daemon=True)
        self._thread.start()
        with self._lock:
            self._lock.wait_for(lambda: self._running)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        finished_total = 0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or self.waiting or self.batch.images or self._cancelling)
                if self._stopping:
                    return
                self._drop_cancelled()
                joining = []
                rows = self.batch.used
                while self.waiting and rows + 1 + self.waiting[0].guided <= self.capacity:
                    image = self.waiting.popleft()
                    rows += 1 + image.guided
                    joining.append(image)
            for request in {image.owner[0]: None for image in joining}:
                if request.state == "queued":
                    request.state = "running"
                    request.feed.publish("state", {"state": "running"})
            try:
                self.batch.admit(joining)
                self.peak_rows = max(self.peak_rows, self.batch.used)
                done = self.batch.step()
            except Exception as error:  # a failing step fails what was in the batch, never the server
                self.log(f"decode step failed: {error}\n{traceback.format_exc()}")
                self._fail({image.owner[0] for image in self.batch.images + joining}, f"sampling failed: {error}")
                self.batch = ContinuousBatch(self.model, self.capacity, self.device)
                continue
            finished_total += len(done)
            self._rate.append((time.monotonic(), finished_total))
            self._deliver(done)
            self._progress()

    def _drop_cancelled(self) -> None:
        """(With the lock held.) Take cancelled requests' images out of the queue and the batch."""
        if not self._cancelling:
            return
        self._cancelling = False
        cancelled = {r for r in self.requests.values() if r.cancel_requested and r.state not in FINAL}
        if not cancelled:
            return
        self._withdraw(cancelled)
        for request in cancelled:
            self._end(request, "cancelled", {})

    def _fail(self, requests, message: str) -> None:
        with self._lock:
            self._withdraw(requests)
            for request in requests:
                if request.state not in FINAL:
                    self._end(request, "failed", {"error": message}, error=message)

    def _withdraw(self, requests) -> None:
        """(With the lock held.) Take the images of ``requests`` out of the queue and the batch."""
        self.waiting = collections.deque(i for i in self.waiting if i.owner[0] not in requests)
        self.batch.cancel([i for i in self.batch.images if i.owner[0] in requests])

    def _end(self, request: Request, state: str, data: dict, error: str | None = None) -> None:
        request.state, request.error, request.finished = state, error, time.monotonic()
        request.feed.publish(state, data)
        with self._lock:  # forget the oldest finished requests beyond keep_finished
            self._finished.append(request.id)
            while len(self._finished) > self.keep_finished:
                del self.requests[self._finished.popleft()]

    def _deliver(self, done: list[Image]) -> None:
        """Decode finished images, store them in their requests, and finish the requests they complete."""
        if not done:
            return
        try:
            pixels = to_uint8(self.model.vae.decode(torch.stack([image.codes for image in done])))
        except Exception as error:
            self._fail({image.owner[0] for image in done}, f"decoding images failed: {error}")
            return
        for image, picture in zip(done, pixels):
            request, k = image.owner
            if request.state in FINAL:
                continue
            request.images[k], request.pixels[k] = png_bytes(picture), picture
            request.scores[k] = float(image.score)
            request.feed.publish("image", {"image": k, "prompt": k // request.num_images,
                                           "index": k % request.num_images, "url": image_url(request, k)})
            if request.images_done == request.total_images:
                self._complete(request)

    def _complete(self, request: Request) -> None:
        order = list(range(request.total_images))
        pixels = torch.stack(request.pixels)
        if self.rank is not None:
            try:
                order = self.rank(request, pixels)
            except Exception as error:
                self._fail({request}, f"ranking images failed: {error}")
                return
        request.grid, request.pixels = png_bytes(make_grid(pixels[order])), []
        request.order, request.progress = order, 1.0
        self._end(request, "done", {"images": [image_url(request, k) for k in order], "grid": grid_url(request)})

    def _progress(self) -> None:
        """Progress of every running request, and the previews due."""
        c = self.model.config
        running: dict[Request, list[Image]] = {}
        for image in self.batch.images:
            running.setdefault(image.owner[0], []).append(image)
        previews = []
        for request, images in running.items():
            done = request.images_done * c.image_seq_len + sum(image.done for image in images)
            total = request.total_images * c.image_seq_len
            now = time.monotonic()
            if done * 100 // total != request.codes_done * 100 // total and now >= request.progress_sent + 0.2:
                request.progress_sent = now  # at most 5 a second: clients and the network have better things to do
                request.feed.publish("progress", {"progress": done / total, "images_done": request.images_done,
                                                  "total_images": request.total_images})
            request.codes_done, request.progress = done, done / total
            every = request.preview_every * c.image_fmap_size
            previews += [image for image in images if every and image.done % every == 0]
        if previews:
            try:
                self._publish_previews(previews)
            except Exception as error:  # a preview is a courtesy: its failure ends nothing
                self.log(f"preview failed: {error}")

    def _publish_previews(self, images: list[Image]) -> None:
        """Each image decoded from the codes sampled so far, the rows still to come grey."""
        c, vae = self.model.config, self.model.vae
        pixels = to_uint8(vae.decode(self.batch.partial_codes(images)))
        for image, picture in zip(images, pixels):
            rows_done = image.done // c.image_fmap_size
            picture[:, rows_done * picture.shape[1] // c.image_fmap_size:] = 128
            request, k = image.owner
            request.feed.publish("preview", {"image": k, "data": "data:image/png;base64,"
                                             + base64.b64encode(png_bytes(picture)).decode()})


def image_url(request: Request, k: int) -> str:
    return f"/api/requests/{request.id}/images/{k}.png"


def grid_url(request: Request) -> str:
    return f"/api/requests/{request.id}/grid.png"

