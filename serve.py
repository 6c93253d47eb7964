"""Serve a trained DALL-E over HTTP: a web page at / and a JSON API, one model shared by every request.

    python serve.py --dalle_path dalle.safetensors [--clip_path clip.safetensors] [--host 127.0.0.1 --port 8000]

Open http://127.0.0.1:8000/ for the page, or use the API:

    curl -X POST localhost:8000/api/requests -H 'content-type: application/json' \\
         -d '{"prompts": ["a red circle"], "num_images": 4, "seed": 0}'        # -> {"id": ..., "events": ...}
    curl -N localhost:8000/api/requests/ID/events                            # progress, previews, images (SSE)
    curl -o grid.png localhost:8000/api/requests/ID/grid.png                 # once done
    curl -X DELETE localhost:8000/api/requests/ID                            # cancel

Requests share one decode batch (continuous batching): a request's images join it at the next step and leave it as
soon as they are done. An image is the one generate.py samples for the same prompt, seed, index and settings. Request
fields are checked like generate.py's flags (a 400 names the field); a full queue answers 429 with a Retry-After.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import uvicorn

from engine.cli import check_device, positive_int
from engine.model.precision import add_sampling_precision_arg, prepare_sampling
from engine.model.quantize import add_weights_arg
from engine.serving.api import create_app
from engine.serving.scheduler import Request, Scheduler
from generate import add_checkpoint_args, clip_scores, load_model, load_reranker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle_path", required=True,
                   help="checkpoint written by train.py, or a DALLE-pytorch dalle.pt (or its -ds-cp folder)")
    p.add_argument("--clip_path", default=None,
                   help="a CLIP checkpoint (engine.save_clip): each prompt's images are listed best first by its score")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--batch_size", type=positive_int, default=16,
                   help="guided images decoded together, as generate.py's --batch_size (a guided image decodes two "
                        "sequences, its caption's and the null caption's: the batch holds 2 x batch_size sequences, "
                        "so twice as many unguided images)")
    p.add_argument("--max_queue", type=positive_int, default=256,
                   help="images waiting at most; past it, requests are refused with 429 and a Retry-After")
    p.add_argument("--max_images_per_request", type=positive_int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_sampling_precision_arg(p)
    add_weights_arg(p)
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    check_device(p, args.device)
    if args.max_images_per_request > args.max_queue:
        p.error(f"--max_images_per_request {args.max_images_per_request} is more than --max_queue {args.max_queue}")
    return args


def build(args: argparse.Namespace, start_scheduler: bool = True):
    """The app for ``args``: model, tokenizer, optional CLIP, scheduler (everything checked before serving).
    ``start_scheduler``: run the scheduler in a thread of its own once the app starts (else call its ``run``)."""
    model, tokenizer, trained = load_model(args)
    prepare_sampling(model, args.precision, args.device, trained, args.weights)
    rank = None
    if args.clip_path is not None:
        clip, clip_tokenizer = load_reranker(args, [], tokenizer, model.vae)

        def by_clip(request: Request, images: torch.Tensor) -> list[int]:
            """Image numbers, each prompt's best first by the CLIP's score."""
            n, order = request.num_images, []
            for p, prompt in enumerate(request.prompts):
                scores = clip_scores(clip, clip_tokenizer, prompt, images[p * n:(p + 1) * n], args)
                order += [p * n + int(i) for i in scores.argsort(descending=True, stable=True)]
            return order

        rank = by_clip
    scheduler = Scheduler(model, capacity=2 * args.batch_size, max_queue=args.max_queue, device=args.device,
                          rank=rank)
    return create_app(scheduler, tokenizer, max_images=args.max_images_per_request, model_name=args.dalle_path,
                      start_scheduler=start_scheduler)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    app = build(args, start_scheduler=False)
    # HTTP in a second thread, the model in this one: the thread that loaded it (see Scheduler.run).
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise SystemExit(f"error: cannot serve on {args.host}:{args.port} (is the port in use?)")
    print(f"serving {args.dalle_path} on http://{args.host}:{args.port}/", flush=True)
    try:
        app.state.scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=30)


if __name__ == "__main__":
    main()
