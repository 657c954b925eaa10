"""`lmforge serve`: the OpenAI-compatible HTTP API and the web chat page, over lmforge.api.

    from lmforge.server import load_service, create_app
    service = load_service(["smollm2-135m-instruct"], embed_model="minilm-l6")
    app = create_app(service)          # a FastAPI app; run it with uvicorn

The routes (app.py) are thin; what they do lives in service.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.server.service import Limits, Service

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED = "minilm-l6"


def model_name(spec: str) -> str:
    """The id a model is served under: a pulled model's name, or a file's or folder's name (the
    server never shows a path)."""
    p = Path(spec)
    if p.exists():
        return p.stem if p.is_file() else p.resolve().name
    return spec


def load_service(models: Sequence[str] = (DEFAULT_MODEL,), embed_model: str | None = "auto",
                 collections: Sequence[str] = (), limits: Limits | None = None, device: str = "auto",
                 quantize: str = "auto", log: Callable[[str], None] = lambda s: None) -> Service:
    """Load what the server serves. embed_model "auto": MiniLM when it has been pulled (else no
    embeddings); None or "none": no embeddings."""
    from lmforge import store
    from lmforge.api import LM

    encoder, enc_name = None, None  # (the encoder and collections first: their errors come before a long load)
    if embed_model == "auto":
        embed_model = DEFAULT_EMBED if store.find(DEFAULT_EMBED) is not None else None
    if embed_model not in (None, "none"):
        from lmforge.encoders import Encoder

        log(f"loading {embed_model}")
        encoder, enc_name = Encoder.load(embed_model, device=device), model_name(embed_model)
    from lmforge.rag.manage import open_for_search

    for name in collections:
        with open_for_search(name, use_vectors=False, log=log) as col:  # (it exists; the default one is built once)
            have = col.embed_model
        if encoder is not None and have is not None and have != str(encoder.spec):
            raise LMForgeError(f"collection {name!r} was embedded with {have}; serve it with --embed-model {have}")
    lms = {}
    for spec in models:
        name = model_name(spec)
        if name in lms:
            raise LMForgeError(f"two models would be served as {name!r}")
        log(f"loading {spec}")
        lms[name] = LM.load(spec, device=device, quantize=quantize)
    return Service(lms, encoder, enc_name, list(collections), limits)


def serve(models: Sequence[str] = (DEFAULT_MODEL,), *, embed_model: str | None = "auto",
          collections: Sequence[str] = (), host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cors: Sequence[str] = (), limits: Limits | None = None, device: str = "auto", quantize: str = "auto",
          log: Callable[[str], None] = print) -> None:
    """Load the models and serve them until interrupted. The HTTP side runs in a thread of its
    own; the main thread steps the engines (Engine.start says why)."""
    import threading
    import time

    import uvicorn

    from lmforge.server.app import create_app

    api_key = api_key or os.environ.get("LMFORGE_API_KEY") or None
    _check_port(host, port)
    service = load_service(models or (DEFAULT_MODEL,), embed_model, collections, limits, device, quantize, log)
    app = create_app(service, api_key=api_key, cors=cors)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=3))
    stop = threading.Event()

    def http():
        try:
            server.run()
        finally:
            stop.set()
            service.driver.halt()

    thread = threading.Thread(target=http, name="lmforge-http", daemon=True)
    thread.start()
    while not server.started:
        if stop.is_set():
            raise LMForgeError(f"the server could not start on {host}:{port}")
        time.sleep(0.05)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    log(f"chat page: http://{shown}:{port}/   API: http://{shown}:{port}/v1"
        + ("   (API key required)" if api_key else ""))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log("warning: listening beyond this machine without --api-key: anyone who can reach it can use it")
    try:
        service.driver.run()  # (the main thread: see Engine.start)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        server.should_exit = True
        thread.join(10)


def _check_port(host: str, port: int) -> None:
    import socket

    if not 0 < port < 65536:
        raise LMForgeError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LMForgeError(f"cannot listen on {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise LMForgeError(f"cannot listen on {host}:{port} ({e.strerror}); is another server there? "
                               f"Use --port") from None


__all__ = ["Limits", "Service", "load_service", "serve", "model_name"]
