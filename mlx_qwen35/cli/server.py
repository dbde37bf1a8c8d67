"""`python -m mlx_qwen35.server`: OpenAI, Anthropic and Responses APIs over the engine.

Options that the other workers add (--kv-bits, --draft-model, --distributed) go into
`server_options` below as shared decorators from options.py, and into `ServerConfig`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import UserError
from . import options as cli

API_KEY_ENV = "MLX_QWEN35_API_KEY"


def server_options(f: Any) -> Any:
    return cli.options(
        cli.model_option,
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind."),
        click.option("--port", type=int, default=8080, show_default=True, help="Port to bind."),
        click.option(
            "--api-key",
            default=None,
            envvar=API_KEY_ENV,
            help=f"Require this key on every endpoint but /health (env {API_KEY_ENV}).",
        ),
        click.option(
            "--served-model-name",
            "served_model_names",
            multiple=True,
            help="Model name clients send (repeatable; default: the --model argument).",
        ),
        cli.max_tokens_option(
            4096, "Reply length when a request gives none (requests are capped by the context)."
        ),
        cli.sampling_options(model_card=True),
        click.option(
            "--frequency-penalty",
            type=float,
            default=None,
            help="Subtracted per occurrence in the reply so far [off].",
        ),
        cli.seed_option,
        cli.think_option,
        cli.thinking_budget_option("Close the thinking block after this many tokens."),
        cli.dtype_option,
        click.option(
            "--max-concurrency",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Requests generated at once (the engine's batch size).",
        ),
        click.option(
            "--max-queue",
            type=click.IntRange(min=0),
            default=64,
            show_default=True,
            help="Requests waiting beyond those; more get 429.",
        ),
        click.option(
            "--prefix-cache-gb",
            type=click.FloatRange(min=0),
            default=4.0,
            show_default=True,
            help="Memory for cached conversation prefixes (KV and DeltaNet snapshots).",
        ),
        click.option(
            "--allow-local-files",
            is_flag=True,
            help="Let image/video parts name local paths (refused by default).",
        ),
        click.option(
            "--max-body-mb",
            type=click.FloatRange(min=0.001),
            default=64.0,
            show_default=True,
            help="Largest request body accepted (413 beyond).",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default="info",
            show_default=True,
        ),
    )(f)


@click.command(context_settings=cli.CONTEXT_SETTINGS)
@server_options
def main(**flags: Any) -> None:
    """Serve a Qwen3.5 model over the OpenAI, Anthropic and Responses APIs."""
    try:
        config = config_from_flags(flags)
        serve(config, flags["host"], flags["port"], flags["dtype"], flags["log_level"])
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def config_from_flags(flags: dict[str, Any]) -> Any:
    from ..engine.sampling import check_sampling
    from ..server.media import MediaLimits
    from ..server.state import ServerConfig

    sampling = {
        k: flags[k]
        for k in (
            "temp",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
        )
    }
    defaults = dict(temp=0.0, top_p=1.0, top_k=0, min_p=0.0)
    checked = {k: sampling[k] if sampling[k] is not None else v for k, v in defaults.items()}
    check_sampling(
        max_tokens=flags["max_tokens"],
        prefill_step_size=2048,
        repetition_penalty=sampling["repetition_penalty"],
        presence_penalty=sampling["presence_penalty"],
        **checked,
    )
    return ServerConfig(
        model=flags["model"],
        served_model_names=list(flags["served_model_names"]),
        api_key=flags["api_key"] or None,
        max_tokens=flags["max_tokens"],
        sampling=sampling,
        enable_thinking=flags["think"],
        thinking_budget=flags["thinking_budget"],
        max_concurrency=flags["max_concurrency"],
        max_queue=flags["max_queue"],
        prefix_cache_gb=flags["prefix_cache_gb"],
        max_body_bytes=int(flags["max_body_mb"] * 1024 * 1024),
        media=MediaLimits(allow_local_files=flags["allow_local_files"]),
    )


def build_state(config: Any, dtype: str | None = None) -> Any:
    """Load the model and start the engine: the ServerState an app serves."""
    from ..engine.scheduler import Engine
    from ..server.state import ServerState
    from ..weights.loading import load

    model, processor = load(config.model, dtype=dtype)
    engine = Engine(
        model,
        processor,
        max_batch_size=config.max_concurrency,
        prefix_cache_bytes=int(config.prefix_cache_gb * 1e9),
    )
    engine.start()
    return ServerState(config, model, processor, engine)


def serve(config: Any, host: str, port: int, dtype: str | None, log_level: str) -> None:
    """Load the model, bind the address, print the URL, serve until Ctrl-C or SIGTERM."""
    import logging
    import signal
    import socket

    import uvicorn

    from ..server.app import create_app

    logging.getLogger("mlx_qwen35.server").setLevel(log_level.upper())
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        message = f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port"
        raise UserError(message) from e
    state = build_state(config, dtype)
    app = create_app(state)
    shown = f"[{host}]" if ":" in host else host
    # The socket is listening already: a client that reads this line can connect at once.
    click.echo(f"Serving {', '.join(config.model_names)} at http://{shown}:{port}/v1", err=True)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off")
    )
    # uvicorn handles Ctrl-C and SIGTERM: it stops accepting, lets requests end, then raises the
    # signal again for the handler it found. SIGTERM's is a no-op here, so the server returns and
    # exits 0 once the engine has stopped; Ctrl-C ends as KeyboardInterrupt (exit 130).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        state.engine.stop()
        sock.close()
