"""`python -m mlx_qwen35.generate`: one reply, streamed to stdout."""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from . import options as cli
from .options import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported: the examples use it

DEFAULT_PROMPT = "hello"


@click.command(context_settings=cli.CONTEXT_SETTINGS)
@cli.model_option
@click.option(
    "--prompt",
    "-p",
    default=DEFAULT_PROMPT,
    show_default=True,
    help="The user message; - reads it from stdin.",
)
@cli.system_option
@cli.image_option("An image to show the model (repeatable; shown before the prompt, in order).")
@cli.video_option("A video (file, animated GIF/WebP or folder of frames; repeatable).")
@cli.fps_option("Video frames sampled per second (default: the checkpoint's, usually 2).")
@cli.max_pixels_option(
    "Pixel cap per image and per video frame; larger ones are scaled down before the "
    "vision tower (default: the checkpoint's)."
)
@cli.max_frames_option("Most frames sampled from one video (default: the checkpoint's).")
@cli.max_tokens_option(256)
@cli.sampling_options(model_card=False)
@cli.seed_option
@cli.think_option
@cli.dtype_option
@cli.prefill_step_size_option("Prompt tokens per prefill step (bounds memory for long prompts).")
@cli.speculative_options
@cli.kv_cache_options
@cli.distributed_option
@click.option(
    "--verbose",
    is_flag=True,
    help="Print the memory estimate, prompt/generation speed, peak memory (and the draft "
    "acceptance rate).",
)
def main(
    model: str,
    prompt: str,
    system: str | None,
    images: tuple[str, ...],
    videos: tuple[str, ...],
    fps: float | None,
    max_pixels: int | None,
    max_frames: int | None,
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: float | None,
    presence_penalty: float | None,
    seed: int | None,
    think: bool | None,
    dtype: str | None,
    prefill_step_size: int,
    draft_model: str | None,
    num_draft_tokens: int,
    draft_vocab: int | None,
    kv_bits: int | None,
    kv_group_size: int,
    quantized_kv_start: int,
    distributed: str | None,
    verbose: bool,
) -> None:
    """Generate a reply from a Qwen3.5 model, streaming it to stdout."""
    from ..engine.generate import _print_stream, stream_generate
    from ..engine.sampling import check_sampling
    from ..inputs.processor import check_media_options
    from ..inputs.prompt import _check_text_prompt
    from ..model.cache import check_kv_settings
    from ..weights import fit
    from ..weights.loading import load, resolve_model_path

    rank0 = True
    try:
        prompt = cli.read_stdin("the prompt on stdin") if prompt == "-" else prompt
        cli.check_utf8(prompt, "the prompt")
        if system is not None:
            cli.check_utf8(system, "the system prompt")
        sampling = dict(
            temp=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
        )
        # Check what needs no model before loading one (which may mean a download).
        check_sampling(
            max_tokens=max_tokens, prefill_step_size=prefill_step_size, seed=seed, **sampling
        )
        check_media_options(fps=fps, max_pixels=max_pixels, max_frames=max_frames)
        cli.check_speculative(draft_model, num_draft_tokens, draft_vocab)
        if distributed is not None and draft_model is not None:
            # The MTP head and draft models are not sharded: each rank would draft on its own.
            raise UserError("--draft-model does not run with --distributed; drop one of them")
        check_kv_settings(kv_bits, kv_group_size, quantized_kv_start)
        _check_text_prompt(prompt)
        model_dir = resolve_model_path(model)
        group = None
        if distributed is not None:
            from ..model.distributed import launched_group, load_distributed, shared_seed

            group = launched_group(distributed, "generate")
            rank0 = group.rank() == 0
            seed = shared_seed(seed, group)  # every rank must sample the same tokens
        # Will it fit? Checked before any weight is read.
        context = fit.count_tokens(model_dir, [prompt, system or ""]) + max_tokens
        estimate = fit.check_fit(
            model_dir,
            context,
            dtype=dtype,
            machines=group.size() if group is not None else 1,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            prefill_step_size=prefill_step_size,
        )
        warning = fit.tight_warning(estimate)
        if rank0 and warning:
            click.echo(warning, err=True)
        if rank0 and verbose:
            click.echo(f"Will it fit? {estimate.summary()}", err=True)
        if distributed is not None:
            qwen, processor, _ = load_distributed(model_dir, distributed, dtype, group)
        else:
            qwen, processor = load(model_dir, dtype=dtype)
        responses = stream_generate(
            qwen,
            processor,
            prompt,
            max_tokens,
            images=list(images),
            videos=list(videos),
            fps=fps,
            max_pixels=max_pixels,
            max_frames=max_frames,
            system=system,
            enable_thinking=think,
            seed=seed,
            prefill_step_size=prefill_step_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=quantized_kv_start,
            verbose=verbose,
            draft_model=draft_model,
            num_draft_tokens=num_draft_tokens,
            draft_vocab=draft_vocab,
            **sampling,
        )
        if rank0:
            _print_stream(responses, verbose=verbose)
        else:
            for _ in responses:  # every rank computes every token; only rank 0 prints
                pass
    except UserError as e:
        if rank0:
            click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)
