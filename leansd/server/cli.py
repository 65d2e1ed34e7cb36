"""`sd-serve`: serve model folders over HTTP (the job API, AUTOMATIC1111's API, OpenAI's Images API, a web page)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from leansd.runtime.errors import LeanSDError
from leansd.server.config import Limits

log = logging.getLogger("leansd.server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Limits()
    p = argparse.ArgumentParser(
        prog="sd-serve", description="Serve model folders over HTTP: the job API, AUTOMATIC1111's API, OpenAI's Images API "
                                     "and a web page.",
        epilog="Clients: AUTOMATIC1111 ones (Open WebUI, webuiapi, SillyTavern) at http://HOST:PORT (API under /sdapi/v1); "
               "OpenAI ones with base_url http://HOST:PORT/v1; a browser at http://HOST:PORT/.",
    )
    p.add_argument("--model", action="append", type=Path, metavar="DIR", dest="models",
                   help="a model folder to serve (repeat for several; requests name one by its folder name; the first "
                        "is the default). Default: the model bundled with leansd")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as AUTOMATIC1111)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("SD_SERVE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on the API routes (HTTP Basic auth with KEY as the password "
                        "works too). Default: the SD_SERVE_API_KEY environment variable, which other users cannot "
                        "read in the process list")
    p.add_argument("--backend", choices=("onnxruntime", "openvino"), help="backend (default: the first installed one)")
    p.add_argument("--num-threads", type=int, metavar="N", help="CPU threads per model (default: the backend's)")
    p.add_argument("--low-memory", action="store_true", help="load each model part only while it is needed")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="keep compiled models here for faster starts")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (exact, default), int8 when exported, bf16 (OpenVINO, CPUs with native bf16), or auto")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="folder of LoRA .safetensors files that <lora:NAME:WEIGHT> in prompts name (listed at /sdapi/v1/loras)")
    p.add_argument("--embedding", action="append", type=Path, metavar="FILE", dest="embeddings",
                   help="a textual-inversion embedding prompts may name (repeatable; listed at /sdapi/v1/embeddings)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-size", type=int, default=d.max_width, metavar="PX", help=f"largest width and height (default {d.max_width})")
    limits.add_argument("--max-steps", type=int, default=d.max_steps, metavar="N", help=f"most steps per image (default {d.max_steps})")
    limits.add_argument("--max-images", type=int, default=d.max_images, metavar="N",
                        help=f"most images per request (default {d.max_images})")
    limits.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, metavar="MB",
                        help=f"largest request body (default {d.max_body_bytes // 2**20})")
    limits.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                        help=f"jobs that may wait; more get HTTP 429 (default {d.max_queue})")
    limits.add_argument("--history", type=int, default=d.history, metavar="N", help=f"finished jobs kept with their images (default {d.history})")
    limits.add_argument("--preview-interval", type=float, default=d.preview_interval, metavar="S",
                        help="fewest seconds between step previews in a progress stream (default 0: each new one; "
                             "previews are decoded only while someone watches, and take at most a fifth of a job's time)")
    # For tests that watch or cancel a running job: seconds slept after every step (also LEANSD_SERVE_STEP_DELAY).
    p.add_argument("--step-delay", type=float, default=float(os.environ.get("LEANSD_SERVE_STEP_DELAY") or 0), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("max_size", "max_steps", "max_images", "max_queue", "history"):
        if getattr(args, name) < (0 if name in ("max_queue", "history") else 1):
            p.error(f"--{name.replace('_', '-')} must be a positive whole number")
    if args.max_body_mb <= 0 or args.preview_interval < 0 or not 0 <= args.port <= 65535:
        p.error("--max-body-mb must be > 0, --preview-interval >= 0 and --port from 0 to 65535")
    return args


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps, max_images=args.max_images,
                  max_body_bytes=int(args.max_body_mb * 2**20), max_queue=args.max_queue, history=args.history,
                  preview_interval=args.preview_interval)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        import uvicorn

        from leansd.server.app import create_app
        from leansd.server.registry import ModelRegistry
    except ImportError as exc:
        print(f"sd-serve: {exc.name} is not installed; pip install 'leansd[server]'", file=sys.stderr)
        return 2
    if not is_local(args.host) and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the server", args.host)
    try:
        registry = ModelRegistry.load(args.models or [None], backend=args.backend, num_threads=args.num_threads,
                                      low_memory=args.low_memory, cache_dir=args.cache_dir, precision=args.precision,
                                      lora_dir=args.lora_dir, embeddings=args.embeddings)
    except LeanSDError as exc:
        print(f"sd-serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(registry, limits_of(args), api_key=args.api_key, step_delay=args.step_delay)
    for model in registry.models.values():
        log.info("serving %s (%s %s, %s)", model.name, model.pipe.backend, model.pipe.precision, model.pipe.bundle.root)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=10, log_level="info"))
    stop_jobs_first(server, app.state.manager)
    server.run()
    registry.close()
    return 0


def stop_jobs_first(server, manager) -> None:
    """On SIGINT/SIGTERM, cancel the jobs before uvicorn waits for open requests: a waiting A1111 call or an
    open progress stream then ends at once with the job's final state, and the server exits with status 0
    (a second Ctrl+C stops without waiting)."""
    import signal
    import threading

    def handle(sig, frame) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
            return
        log.info("stopping: cancelling the queued and running jobs")
        threading.Thread(target=manager.stop, name="sd-serve-stop", daemon=True).start()
        server.should_exit = True

    server.handle_exit = handle


if __name__ == "__main__":
    raise SystemExit(main())
