"""`python -m mlx_qwen35.server`: OpenAI, Anthropic and Responses APIs over the engine.

With `--distributed tensor|pipeline` under mlx.launch, rank 0 serves HTTP and every other rank
runs the same engine steps as a follower (engine/step_sync.py); only rank 0 prints.
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
        cli.speculative_options,
        cli.kv_cache_options,
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
        cli.distributed_option,
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
    rank0 = True
    try:
        config = config_from_flags(flags)
        group = None
        if config.distributed is not None:
            from ..model.distributed import launched_group

            group = launched_group(config.distributed, "server")
            rank0 = group.rank() == 0
        check_fit(config, flags["dtype"], group, warn=rank0)
        if rank0:
            serve(config, flags["host"], flags["port"], flags["dtype"], flags["log_level"], group)
        else:
            follow_rank0(config, flags["dtype"], group)
    except UserError as e:
        if rank0:
            click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except RuntimeError as e:  # a follower whose rank 0 went away (the ring says so)
        if rank0:
            raise
        click.echo(f"Error: rank {group.rank()} lost rank 0 ({e})", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


# The server's fit check: each of --max-concurrency rows may hold a prompt of this many tokens
# plus a --max-tokens reply (capped by the model's context). Longer prompts are served, in
# whatever memory is left; this is the load the server must at least carry.
FIT_PROMPT_TOKENS = 4096


def check_fit(config: Any, dtype: str | None, group: Any, warn: bool = True) -> Any:
    """Will it fit? Before any weight is read: refuse in one line, or warn when tight."""
    from ..model.config import load_config
    from ..weights import fit
    from ..weights.loading import resolve_model_path

    model_dir = resolve_model_path(config.model)
    limit = load_config(model_dir).text.max_position_embeddings
    context = min(FIT_PROMPT_TOKENS + config.max_tokens, limit)
    estimate = fit.check_fit(
        model_dir,
        context,
        dtype=dtype,
        batch=config.max_concurrency,
        machines=group.size() if group is not None else 1,
        kv_bits=config.kv_bits,
        kv_group_size=config.kv_group_size,
    )
    warning = fit.tight_warning(estimate)
    if warn and warning:
        click.echo(warning, err=True)
    return estimate


def config_from_flags(flags: dict[str, Any]) -> Any:
    from ..engine.sampling import check_sampling
    from ..model.cache import check_kv_settings
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
    cli.check_speculative(flags["draft_model"], flags["num_draft_tokens"], flags["draft_vocab"])
    check_kv_settings(flags["kv_bits"], flags["kv_group_size"], flags["quantized_kv_start"])
    if flags["distributed"] is not None and flags["draft_model"] is not None:
        raise UserError("--draft-model does not run with --distributed; drop one of them")
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
        draft_model=flags["draft_model"],
        num_draft_tokens=flags["num_draft_tokens"],
        draft_vocab=flags["draft_vocab"],
        kv_bits=flags["kv_bits"],
        kv_group_size=flags["kv_group_size"],
        quantized_kv_start=flags["quantized_kv_start"],
        distributed=flags["distributed"],
    )


def build_engine(config: Any, dtype: str | None = None, group: Any = None) -> Any:
    """Load the model (this rank's part of it with --distributed) and make its engine."""
    from ..engine.scheduler import Engine

    prefix_bytes = int(config.prefix_cache_gb * 1e9)
    if config.distributed is not None:
        from ..engine.step_sync import StepSync, prefix_cache_ok
        from ..model.distributed import load_distributed

        model, processor, group = load_distributed(config.model, config.distributed, dtype, group)
        if not prefix_cache_ok(config.distributed):
            prefix_bytes = 0
    else:
        from ..weights.loading import load

        model, processor = load(config.model, dtype=dtype)
    engine = Engine(
        model, processor, max_batch_size=config.max_concurrency, prefix_cache_bytes=prefix_bytes
    )
    if config.distributed is not None:
        engine.sync = StepSync(group)
    return engine


def build_state(config: Any, dtype: str | None = None, group: Any = None) -> Any:
    """Load the model and start the engine: the ServerState an app serves."""
    from ..server.state import ServerState

    engine = build_engine(config, dtype, group)
    engine.start()
    return ServerState(config, engine.model, engine.processor, engine)


def follow_rank0(config: Any, dtype: str | None, group: Any) -> None:
    """A rank > 0 of a --distributed server: no HTTP, the same engine steps as rank 0 until it
    stops (engine/step_sync.py)."""
    import signal

    from ..engine.step_sync import follow

    engine = build_engine(config, dtype, group)
    # Rank 0 decides when to stop and says so (or goes away, which the ring reports): a Ctrl-C
    # that the terminal sends every rank must not end a follower while rank 0 still steps.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    follow(engine, engine.sync)


def serve(
    config: Any, host: str, port: int, dtype: str | None, log_level: str, group: Any = None
) -> None:
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
    try:
        state = build_state(config, dtype, group)
    except BaseException:
        sock.close()
        raise
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
        if state.engine.sync is not None:
            state.engine.sync.close(state.engine)  # the followers exit
        sock.close()
