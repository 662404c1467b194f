"""`paddle-scorer serve`: an OpenAI-compatible completions server (FastAPI + uvicorn) over one loaded model."""

from __future__ import annotations

import signal
import socket
from typing import Optional

import typer

from paddle_scorer.cli import flags
from paddle_scorer.cli import helptext
from paddle_scorer.cli.common import cli_errors, err, escape, out, styled
from paddle_scorer.cli.options import hooks
from paddle_scorer import parse_size
from paddle_scorer.errors import UsageError

EXAMPLES = """
  paddle-scorer serve --model checkpoints/demo-base \\
      --lora checkpoints/demo-lora --port 8000

  # several fine-tunes of one base; the request's "model" picks one
  paddle-scorer serve -m BASE --lora support=ADAPTER1 --lora sales=ADAPTER2

  # lm-evaluation-harness against it (pip install 'lm-eval[api]')
  URL=http://127.0.0.1:8000/v1/completions
  lm_eval --model local-completions \\
      --model_args base_url=$URL,max_length=256 \\
      --tasks demo_goods_life --include_path tests/lm_eval

  # reachable from other machines: all interfaces, and a key
  PADDLE_SCORER_API_KEY=secret paddle-scorer serve -m BASE -l ADAPTER \\
      --host 0.0.0.0
"""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class _Terminated(Exception):
    """SIGTERM: stop the way Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def bind(host: str, port: int) -> socket.socket:
    """Reserve the address before the (slow) model load: a taken port is an error in a second, not a minute."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r} is not an address this machine can listen on ({exc.strerror}).") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == 98 else exc.strerror
        raise UsageError(f"cannot listen on {host}:{port} ({why}); pick another --port (0: any free port) or stop "
                         "the program that holds it.") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def register(app: typer.Typer) -> None:
    @app.command("serve", **helptext.command(
        "Serve the model over HTTP, OpenAI-compatible, for lm-evaluation-harness, the openai SDK and chat UIs.",
        """Routes: /v1/completions (echo + logprobs, streaming, n), /v1/chat/completions, /v1/classify (what classify
        computes, per prompt), /v1/models, /tokenize, /health. The reference is docs/serve.md.""",
        EXAMPLES))
    @cli_errors
    def serve(
        model: flags.Model = None,
        lora: Optional[list[str]] = typer.Option(None, "--lora", "-l", help="LoRA adapter folder; repeat as NAME=FOLDER to serve several adapters on one base (the request's model picks one; the base is served too, as --model-name)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only; 0.0.0.0 for all interfaces)."),
        port: int = typer.Option(8000, "--port", help="Port (0: any free port; the URL is printed)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PADDLE_SCORER_API_KEY", help="Require `Authorization: Bearer KEY` on every route but /health."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id clients send and /v1/models lists (default: the adapter's folder name, else the model's)."),
        max_batch: int = typer.Option(32, "--max-batch", help="Most sequences in one forward (requests that arrive together share forwards)."),
        batch_window_ms: float = typer.Option(2.0, "--batch-window-ms", help="How long the first request of a batch waits for others (ms; 0: no wait)."),
        max_tokens_cap: int = typer.Option(2048, "--max-tokens", help="Largest max_tokens a request may ask for."),
        max_logprobs: int = typer.Option(20, "--max-logprobs", help="Largest logprobs / top_logprobs a request may ask for."),
        max_body: str = typer.Option("8MB", "--max-body", help="Largest request body (e.g. 8MB)."),
        mode: flags.Mode = "attach",
        device: flags.Device = "auto",
        dtype: flags.Dtype = "auto",
        tokenizer: flags.Tokenizer = None,
        log_level: str = typer.Option("warning", "--log-level", help="Server log level: " + " | ".join(LOG_LEVELS) + "."),
        access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="Log every request."),
        prefix_cache: Optional[str] = typer.Option(None, "--prefix-cache", help="Memory for computed prompt prefixes that later requests reuse (e.g. 2GB; 0: none kept; default: half of what the memory budget leaves after the model, at most 2GB), least recently used evicted first, per served model."),
        prefix_reuse: flags.PrefixReuse = True,
    ):
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        sock = None
        try:
            opts = _check(port, max_batch, batch_window_ms, max_tokens_cap, max_logprobs, max_body, log_level)
            import os

            if api_key is None and os.environ.get("PADDLE_SCORER_API_KEY") is not None:
                api_key = os.environ["PADDLE_SCORER_API_KEY"]  # set but empty: typer reads that as unset
            if api_key is not None and not api_key.strip():
                raise UsageError("--api-key is empty (is PADDLE_SCORER_API_KEY set to nothing?): give a key, or leave "
                                 "the option and the variable out to serve without one.")
            cache = None if prefix_cache is None else parse_size(prefix_cache, "--prefix-cache", allow_zero=True)
            from paddle_scorer.serve.models import parse_adapters

            adapters = parse_adapters(lora or [])
            sock = bind(host, port)
            _serve(sock, model, adapters, host, api_key, model_name, opts, mode, device, dtype, tokenizer, log_level,
                   access_log, cache, prefix_reuse)
        except (KeyboardInterrupt, _Terminated) as exc:
            what = "SIGTERM" if isinstance(exc, _Terminated) else "interrupted"
            err.print(f"{what}: the server stopped.", highlight=False)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if sock is not None:
                sock.close()


def _check(port, max_batch, window_ms, max_tokens_cap, max_logprobs, max_body, log_level) -> dict:
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number (0-65535).")
    if max_batch < 1:
        raise UsageError("--max-batch must be at least 1.")
    if window_ms < 0:
        raise UsageError("--batch-window-ms must be 0 or more.")
    if max_tokens_cap < 1:
        raise UsageError("--max-tokens must be at least 1.")
    if max_logprobs < 0:
        raise UsageError("--max-logprobs must be 0 or more.")
    if log_level not in LOG_LEVELS:
        raise UsageError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}.")
    body = parse_size(max_body, "--max-body")
    if body < 1024:
        raise UsageError("--max-body must be at least 1KB.")
    return {"max_batch": max_batch, "window_ms": window_ms, "max_tokens": max_tokens_cap,
            "max_logprobs": max_logprobs, "max_body_bytes": body}


def _serve(sock, model, adapters, host, api_key, model_name, opts, mode, device, dtype, tokenizer, log_level, access_log,
           cache_bytes, prefix_reuse):
    import logging
    import sys

    import uvicorn

    from paddle_scorer.serve.app import create_app
    from paddle_scorer.serve.models import serve_models
    from paddle_scorer.serve.service import ServeOptions, Service
    from paddle_scorer.tasks.loading import LoadOptions

    served = serve_models(LoadOptions(model, None, mode, device, dtype, tokenizer), adapters, model_name=model_name,
                          prefix_cache=cache_bytes, prefix_reuse=prefix_reuse, hooks=hooks())
    loaded, backends = served.loaded, served.backends
    service = Service(loaded, None, ServeOptions(model_name=served.name, prefix_cache_bytes=served.cache_bytes,
                                                 adapters=served.adapter_dirs, **opts),
                      backends=backends, defaults=served.defaults)
    app = create_app(service, api_key=api_key)
    log = logging.getLogger("paddle_scorer.serve")
    log.setLevel(log_level.upper())
    handler = logging.StreamHandler(sys.stderr)  # our own: never a handler a library import left on a captured stream
    handler.setFormatter(logging.Formatter("%(levelname)s paddle-scorer serve: %(message)s"))
    log.handlers = [handler]
    log.propagate = False
    url = url_of(sock)
    sock.listen(2048)  # from here on clients queue until uvicorn accepts them, never "connection refused"
    p = loaded.facts.policy
    served = ", ".join(backends)
    out.print(f"serving {served} ({p['device']}, {p['dtype']}) on {url}", highlight=False)
    out.print(f"  OpenAI base_url: {url}/v1   lm-eval: --model local-completions --model_args "
              f"base_url={url}/v1/completions,max_length={service.limits.context}", highlight=False, soft_wrap=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(styled(f"[yellow]warning:[/] listening on {escape(host)} without --api-key: anyone who can reach "
                         "this machine can use the model."))
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=30,
                            lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn catches SIGINT/SIGTERM, finishes the requests in flight, stops the engine (lifespan), then
    # re-raises the signal: KeyboardInterrupt or _Terminated, caught by the caller.
    server.run(sockets=[sock])
    err.print("the server stopped.", highlight=False)
