"""``vist2 serve``: an OpenAI-compatible HTTP server with global context compression.

    vist2 serve --model runs/tiny                       # http://127.0.0.1:8000/v1
    python -m vist2.serve --model runs/tiny --port 8001 --api-key "$KEY" --max-batch 8 --max-queue 64
    vist2 serve --model runs/tiny --api-key "$KEY" --cors-allow-origin https://app.example
    vist2 serve --model runs/tiny --host 0.0.0.0 --api-key-file keys.txt     # one 'name:key' a line: tenants

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming
or not; ``n``, ``stop``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``), ``GET /health`` and
``GET /metrics`` (Prometheus). The compression mode is chosen per request with the body field
``"mode": "gcc" | "pcc" | "none"`` (default: ``--mode``, itself ``gcc``); ``usage.compression``
reports what it did. Modules: :mod:`.protocol` (bodies), :mod:`.serving` (requests to engine calls),
:mod:`.engine_bridge` (the thread that owns the engine, bridged to asyncio), :mod:`.guard` (keys and
tenants, body and header limits), :mod:`.app` (routes, errors). Security: docs/serving.md#security.

Example, once a server runs::

    >>> from openai import OpenAI
    >>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")          # doctest: +SKIP
    >>> chat = client.chat.completions.create(model="tiny", max_tokens=32,
    ...     messages=[{"role": "user", "content": "Hello"}], extra_body={"mode": "gcc"})  # doctest: +SKIP
    >>> chat.choices[0].message.content, chat.usage.compression                         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ..chat import DEFAULT_MAX_CHAT_MESSAGES
from ..modes import MODES

log = logging.getLogger(__name__)

# Prefill entries per step while others decode. On CPU a step over 2,048 prompt entries of the nano
# model takes about 1 s, a stall every running stream sees: with 2,048 the streams' longest gap while a
# 32k-character prompt is admitted was 5 s on a loaded 2-core machine, with 64 it was 0.5-0.9 s; the long
# prompt's own answer then comes later (33 s instead of 17-20 s; bench/notes/serve.md). On a GPU the
# larger budget costs milliseconds. (Never below one chunk's visual tokens.)
CPU_PREFILL_BUDGET = 64
GPU_PREFILL_BUDGET = 2048
# The encoder cache's default bound. One chunk's visual tokens are n_visual x D x dtype bytes: 16 KiB for
# the nano model (16 x 256, float32; K = 64), 80 KiB for Qwen3-4B in bfloat16 (D = 2560). 256 MiB holds
# 16k nano chunks (1M prompt tokens) or 3.2k 4B chunks: the histories of many chats at once. It is what
# the nano server's KV cache takes at its defaults (8 rows x 8192 entries x 4 KiB), and small beside a
# large model's (one 32k-entry row of Qwen3-4B in bfloat16 is 4.5 GiB).
DEFAULT_ENCODER_CACHE_BYTES = 256 << 20
# Connection limits (uvicorn's keep-alive and concurrency options; the header deadline is our own).
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0  # a 2 MiB body (the nano model's default limit) in 60 s needs 35 KB/s
DEFAULT_KEEP_ALIVE = 5.0
DEFAULT_MAX_CONNECTIONS = 1024


def _add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--model", required=True, metavar="DIR", help="a VIST2 checkpoint folder")
    q.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send (default: the folder's name)")
    q.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    q.add_argument("--port", type=int, default=8000)
    q.add_argument("--api-key", metavar="KEY", default=os.environ.get("VIST2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every path but /health (default: $VIST2_API_KEY; "
                        "unset = open)")
    q.add_argument("--api-key-file", metavar="FILE",
                   help="several API keys, one 'name:key' a line ('#' comments); the name is the caller's tenant: "
                        "tenants never share cache entries (see --shared-cache). Not with --api-key")
    q.add_argument("--shared-cache", action="store_true",
                   help="let every tenant's requests share the memory and prefix caches (single-tenant "
                        "deployments; a hit then tells one client what another sent). Default: per tenant")
    q.add_argument("--open-metrics", action="store_true",
                   help="serve /metrics and /openapi.json without a key (default: they need one whenever a key "
                        "is set; /health never does)")
    q.add_argument("--protect-metrics", action="store_true",
                   help="kept for old command lines: /metrics needs the key whenever one is set")
    q.add_argument("--cors-allow-origin", action="append", metavar="ORIGIN", default=None,
                   help="a web origin (https://app.example, or *) whose pages may call the API from a browser; "
                        "repeat for several (default: none, every cross-site call is refused)")
    q.add_argument("--max-batch", type=int, default=8, metavar="N", help="sequences decoded together (cache rows)")
    q.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="sequences allowed to wait for a row; more get 429 (default 256)")
    q.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longer prompts get 413 (default: only the memory limit, --max-cache-tokens)")
    q.add_argument("--max-cache-tokens", type=int, default=None, metavar="N",
                   help="KV entries one sequence may hold (default: the LLM's max positions)")
    q.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                   help="the most tokens one choice may generate; larger max_tokens get 400 (default: the "
                        "LLM's max positions; in gcc the memory limit alone would never stop a generation)")
    q.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                   help="larger request bodies get 413 unread (default: 1 MiB + 32 bytes per token of the "
                        "longest prompt accepted)")
    q.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                   help="on shutdown, requests in flight get this long to finish before they end with a "
                        "503 error; new ones get 503 at once (default 10)")
    q.add_argument("--prefill-budget", type=int, default=None, metavar="N",
                   help="prompt entries fed per engine step while other streams decode: a smaller budget "
                        f"keeps streams smooth while a long prompt is admitted (default: {CPU_PREFILL_BUDGET} on "
                        f"CPU, {GPU_PREFILL_BUDGET} on CUDA; at least one chunk's visual tokens)")
    q.add_argument("--encoder-cache-bytes", "--memory-cache-bytes", type=int, default=DEFAULT_ENCODER_CACHE_BYTES,
                   metavar="N", dest="encoder_cache_bytes",
                   help="keep prompt chunks' visual tokens across requests, up to N bytes: a chunk seen before "
                        "(a chat's history, a document asked about again) is not rendered or read by the "
                        "vision tower again; the LLM's K/V of a prompt's cached start (the prefix cache) gets "
                        "a second bound of N bytes, so a request that begins like an earlier one skips that "
                        f"prefill; 0 turns both off (default {DEFAULT_ENCODER_CACHE_BYTES >> 20} MiB each; "
                        "--memory-cache-bytes is its old name, deprecated)")
    q.add_argument("--chat-history", choices=("raw", "compressed"), default="raw",
                   help="chat requests: 'raw' compresses the last user message and keeps every earlier turn "
                        "as text (what models trained on the raw split read); 'compressed' makes the whole chat "
                        "through the last user message memory, styled by role, so long chats fit and earlier "
                        "turns are encoder cache hits (default raw)")
    q.add_argument("--max-chat-messages", type=int, default=DEFAULT_MAX_CHAT_MESSAGES, metavar="N",
                   help=f"chats with more messages get 400 (default {DEFAULT_MAX_CHAT_MESSAGES})")
    q.add_argument("--allow-special-tokens", action="store_true",
                   help="let text prompts on /v1/completions spell control tokens ('<|im_start|>' becomes that "
                        "token: raw completions that write their own template). Chat message contents are "
                        "always plain text; without this flag, so are prompts")
    q.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                   help="close a connection whose request headers are not complete this long after it opened "
                        f"or after its last answer (default {DEFAULT_HEADER_TIMEOUT:g})")
    q.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                   help=f"a request body must arrive within this long of its headers, else 408 and the "
                        f"connection closes (default {DEFAULT_BODY_TIMEOUT:g})")
    q.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE, metavar="SECONDS",
                   help=f"close an idle kept-alive connection after this long (default {DEFAULT_KEEP_ALIVE:g})")
    q.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help=f"open connections (and requests in progress) at once; more get 503 "
                        f"(default {DEFAULT_MAX_CONNECTIONS})")
    q.add_argument("--mode", choices=MODES, default="gcc",
                   help="compression mode of requests that do not choose one (default gcc)")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    q.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    q.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve as a Ray Serve application of N engine replicas (one device each) behind one "
                        "address; each conversation is routed to the replica holding its memory and prefix "
                        "caches (needs the 'cluster' extra: pip install 'vist2[cluster]'; default: one process, "
                        "no Ray)")
    q.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="with --replicas: join this Ray cluster ('auto': the one 'ray start' began on this "
                        "machine; default: start a local Ray for this server alone)")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to the ``vist2`` parser's sub-parsers."""
    q = sub.add_parser("serve", help="OpenAI-compatible HTTP server with global context compression",
                       description="Serve a VIST2 checkpoint over /v1/completions and /v1/chat/completions "
                                   "(FastAPI + uvicorn). Binds 127.0.0.1 unless --host says otherwise.")
    _add_arguments(q)
    q.set_defaults(func=cmd_serve)
    return q


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_keys(args):
    """The tenants' keys of ``--api-key-file`` (``{key: name}``), or None."""
    from ..errors import CLIError

    if args.api_key_file is None:
        return None
    from .guard import read_api_key_file

    try:
        return read_api_key_file(args.api_key_file)
    except ValueError as e:
        raise CLIError(f"--api-key-file: {e}") from e


def build_app(args):
    """The engine and the app of ``vist2 serve``'s flags: what the one process serves, and what each
    replica of ``--replicas`` serves. Returns ``(app, engine, info)``; info: device, dtype, name, folder."""
    from ..engine import Engine
    from ..errors import CLIError
    from ..runtime import CheckpointError, default_device, load_checkpoint, require_checkpoint, torch_dtype
    from .app import create_app

    folder = require_checkpoint(args.model, error=CLIError)
    device = default_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = torch_dtype(dtype_name)
    try:
        model, processor = load_checkpoint(folder, device, dtype)
        budget = args.prefill_budget or max(  # the engine feeds one chunk's visual tokens together
            GPU_PREFILL_BUDGET if device.startswith("cuda") else CPU_PREFILL_BUDGET, model.config.n_visual)
        engine = Engine(model, processor, max_batch=args.max_batch, max_cache_tokens=args.max_cache_tokens,
                        prefill_budget=budget, encoder_cache_bytes=args.encoder_cache_bytes)
    except CheckpointError as e:  # a damaged folder: the message names the file
        raise CLIError(str(e)) from e
    except (ValueError, OSError) as e:
        raise CLIError(f"--model {folder}: {e}") from e
    name = args.served_model_name or folder.resolve().name
    app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue,
                     max_prompt_tokens=args.max_prompt_tokens, default_mode=args.mode,
                     max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                     shutdown_grace=args.shutdown_grace, cors_origins=args.cors_allow_origin,
                     protect_metrics=args.protect_metrics, chat_history=args.chat_history, api_keys=_api_keys(args),
                     shared_cache=args.shared_cache, open_metrics=args.open_metrics,
                     max_chat_messages=args.max_chat_messages, allow_special_tokens=args.allow_special_tokens,
                     body_timeout=args.body_timeout)
    return app, engine, {"device": device, "dtype": dtype_name, "name": name, "folder": folder}


def cmd_serve(args) -> int:
    from ..errors import CLIError
    from ..runtime import require_checkpoint

    for flag, value, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                             ("--max-queue", args.max_queue, 1), ("--max-prompt-tokens", args.max_prompt_tokens, 1),
                             ("--max-cache-tokens", args.max_cache_tokens, 1),
                             ("--max-tokens-limit", args.max_tokens_limit, 1),
                             ("--max-body-bytes", args.max_body_bytes, 1),
                             ("--shutdown-grace", args.shutdown_grace, 0),
                             ("--prefill-budget", args.prefill_budget, 1),
                             ("--encoder-cache-bytes", args.encoder_cache_bytes, 0),
                             ("--max-chat-messages", args.max_chat_messages, 1),
                             ("--max-connections", args.max_connections, 1),
                             ("--replicas", args.replicas, 1)):
        if value is not None and value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                        ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not value > 0:
            raise CLIError(f"{flag} must be > 0 seconds, got {value}")
    if args.port > 65535:
        raise CLIError(f"--port must be <= 65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise CLIError("--api-key must not be empty")
    if args.api_key_file is not None and args.api_key is not None:
        raise CLIError("give --api-key (or $VIST2_API_KEY) or --api-key-file, not both")
    keys = _api_keys(args)
    if args.protect_metrics and args.api_key is None and keys is None:
        raise CLIError("--protect-metrics needs --api-key (or $VIST2_API_KEY)")
    for origin in args.cors_allow_origin or ():
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise CLIError(f"--cors-allow-origin must be '*' or an origin such as https://app.example, got {origin!r}")
    if args.ray_address is not None and args.replicas is None:
        raise CLIError("--ray-address needs --replicas")
    folder = require_checkpoint(args.model, error=CLIError)
    if not _is_loopback(args.host) and args.api_key is None and keys is None:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    if args.replicas is not None:  # a Ray Serve application; nothing imports Ray otherwise
        try:
            from .cluster import serve_cluster
        except ImportError as e:
            raise CLIError(f"--replicas: {e}") from e
        return serve_cluster(args, build_app)

    import uvicorn

    from .app import Server
    from .guard import uvicorn_protocol

    app, engine, info = build_app(args)
    device, dtype_name, name = info["device"], info["dtype"], info["name"]
    print(f"vist2 serve: {folder} as {name!r} on http://{args.host}:{args.port}/v1 ({device}, {dtype_name}; "
          f"batch {args.max_batch}, queue {args.max_queue}, KV limit {engine.max_cache_tokens}/sequence, "
          f"prefill {engine.prefill_budget}/step, default mode {args.mode}; at most "
          f"{app.state.serving.max_tokens_limit} generated tokens/choice)",
          file=sys.stderr, flush=True)
    # the app drains itself first (Server.shutdown); uvicorn's own grace is only a backstop after that
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                          http=uvicorn_protocol(args.header_timeout), timeout_keep_alive=args.keep_alive_timeout,
                          limit_concurrency=args.max_connections)).run()
    # Drained and shut down. The interpreter's own teardown (torch, three tokenizers) would take 2-4 s
    # more on a CPU, past the grace a service manager was promised: nothing is left to clean, so leave.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """``python -m vist2.serve ...``: the same command without the ``vist2`` front end."""
    from ..errors import CLIError

    p = argparse.ArgumentParser(prog="vist2 serve", description=add_parser.__doc__)
    _add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return cmd_serve(args)
    except CLIError as e:
        print(f"vist2 serve: error: {e}", file=sys.stderr)
        return 2


__all__ = ["add_parser", "build_app", "cmd_serve", "main"]
