"""`generate`, `stream_generate` and `batch_generate`: thin front doors over the engine.

    model, processor = mlx_qwen35.load("tiny-random")
    text = generate(model, processor, "Tell me a story", max_tokens=64)
    for response in stream_generate(model, processor, messages, temp=0.7, top_p=0.8):
        print(response.text, end="", flush=True)
    text = generate(model, processor, "What is in the picture?", images=["cat.png"])
    out = batch_generate(model, processor, ["Hi", "Name a river"], max_tokens=32)  # out.texts

Each call turns its prompt into token ids (with images or videos: the merged embeddings and 3-D
positions, the vision tower running once, in `inputs/prompt.py`), submits a `Request` to the
model's shared engine (`engine_for`) and turns the TokenEvents back into text. Calls from several
threads batch together in the engine; none of them needs a thread of its own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..inputs.processor import apply_media_options
from ..inputs.prompt import prepare_prompt
from .request import LogitsProcessor, Request, SamplingParams
from .sampling import check_sampling
from .scheduler import engine_for

# Prefill progress bar: for multi-step prompts at least this long, or any multi-step one if verbose.
PROGRESS_MIN_TOKENS = 4096

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int] | mx.array


@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    text: the next piece of decoded text (may be empty while a character is incomplete).
    token: the token id of this step.
    logprobs: log-probabilities [vocab] this token was sampled from.
    prompt_tokens / prompt_tps: prompt length and prompt-processing speed (tokens/s).
    generation_tokens / generation_tps: tokens generated so far and decoding speed (tokens/s).
    peak_memory: peak memory used so far, in GB.
    finish_reason: None while generating, then "stop" (an end-of-turn token) or "length".
    from_draft: the token was accepted from a speculative draft.
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    from_draft: bool = False


def check_enable_thinking(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise UserError(f"enable_thinking must be True, False or None, got {value!r}")
    return value


def _sampling(
    *,
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: float | None,
    repetition_context_size: int,
    presence_penalty: float | None,
    frequency_penalty: float | None,
    seed: int | None,
    prefill_step_size: int,
) -> SamplingParams:
    check_sampling(
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        prefill_step_size=prefill_step_size,
    )
    params = SamplingParams(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    params.check()
    return params


def _fit_context(processor: Any, ids: list[int], max_tokens: int) -> int:
    context = processor.max_position_embeddings
    if len(ids) >= context:
        raise UserError(
            f"the prompt has {len(ids)} tokens but the model's context is {context} tokens; "
            "shorten the prompt"
        )
    return min(max_tokens, context - len(ids))


def stream_generate(
    model: Any,
    processor: Any,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    fps: float | None = None,
    max_pixels: int | None = None,
    max_frames: int | None = None,
    system: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 2048,
    verbose: bool = False,
    response_format: Mapping[str, Any] | None = None,
) -> Iterator[GenerationResponse]:
    """Generate a reply to `prompt`, one `GenerationResponse` per token.

    prompt: text (one user turn through the chat template), chat messages, or token ids.
    images / videos: media for the prompt (paths, PIL images, uint8 arrays; videos also folders of
        frames, GIF/WebP, video files with PyAV, frame lists or processing.VideoFrames). A text
        prompt shows them before the text; chat messages place them with image/video parts.
    fps / max_frames: video frame sampling rate and frame limit; max_pixels: pixel cap per image
        and per video frame (None keeps the checkpoint's preprocessor settings).
    system: a system prompt for text/message prompts. enable_thinking: True/False switch the
        template's thinking mode; None keeps the template's default. tools: tool schemas.
    temp/top_p/top_k/min_p: sampling (temp 0 = greedy). repetition_penalty: multiplicative, over
        the last `repetition_context_size` tokens. presence_penalty: subtracted once from every
        token generated so far; frequency_penalty: once per occurrence. seed: this request's own
        random stream (the same seed gives the same tokens, whatever else runs).
    logits_processors: mlx-lm style `(tokens, logits) -> logits`, tokens = prompt + generated.
    response_format: OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"schema": ...}}, enforced while sampling (after the thinking block, if one is open).
    Stops at an end-of-turn token (<|im_end|>, generation_config's eos) or after `max_tokens`.
    """
    if prompt is None:
        raise UserError("the prompt is empty; pass some text, messages or token ids")
    check_enable_thinking(enable_thinking)
    sampling = _sampling(
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        prefill_step_size=prefill_step_size,
    )
    processor = apply_media_options(
        processor, fps=fps, max_pixels=max_pixels, max_frames=max_frames
    )
    ids, embeddings, positions = prepare_prompt(
        model,
        processor,
        prompt,
        images=images,
        videos=videos,
        system=system,
        enable_thinking=enable_thinking,
        tools=tools,
    )
    max_tokens = _fit_context(processor, ids, max_tokens)
    logits_processors = list(logits_processors)
    if response_format is not None:
        from ..inputs.structured import constraint_processor, thinking_open

        constraint = constraint_processor(
            processor,
            model.language_model.args.vocab_size,
            response_format=response_format,
            after_think=thinking_open(processor, ids),
        )
        logits_processors += [constraint] if constraint is not None else []
    progress = _progress_bar(len(ids), prefill_step_size, verbose)
    request = Request(
        prompt=ids,
        max_tokens=max_tokens,
        sampling=sampling,
        input_embeddings=embeddings,
        position_ids=positions,
        logits_processors=logits_processors,
        stop_token_ids=processor.eos_token_ids,
        prefill_step_size=prefill_step_size,
        on_prefill=None
        if progress is None
        else lambda done, total: progress.update(done - progress.n),
    )
    handle = engine_for(model, processor).submit(request)
    return _responses(handle, processor, progress)


def _responses(handle: Any, processor: Any, progress: Any) -> Iterator[GenerationResponse]:
    detokenizer = processor.tokenizer.detokenizer
    stats = handle.stats
    try:
        for event in handle:
            if progress is not None:
                progress.close()
                progress = None
            finish = event.finish_reason
            if finish != "stop":
                detokenizer.add_token(event.token)
            if finish is not None:
                detokenizer.finalize()
            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=event.token,
                logprobs=event.logprobs,
                prompt_tokens=stats.prompt_tokens,
                prompt_tps=stats.prompt_tps,
                generation_tokens=stats.generation_tokens,
                generation_tps=stats.generation_tps,
                peak_memory=stats.peak_memory,
                finish_reason=finish,
                from_draft=event.from_draft,
            )
    finally:
        # A consumer that stops early (break, close) frees the row at the next step.
        handle.cancel()
        if progress is not None:
            progress.close()


def _progress_bar(prompt_len: int, step: int, verbose: bool) -> Any:
    """A prefill bar for prompts that take several steps, when verbose or long."""
    if prompt_len <= step or not (verbose or prompt_len >= PROGRESS_MIN_TOKENS):
        return None
    from tqdm import tqdm

    return tqdm(total=prompt_len, desc="Prefill", unit="tok", leave=False, file=sys.stderr)


def generate(
    model: Any,
    processor: Any,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole reply as one string; keyword arguments as for `stream_generate`.

    With `verbose`, the text is printed as it streams, followed by prompt and generation speed
    and peak memory, as mlx-lm prints them.
    """
    responses = stream_generate(model, processor, prompt, max_tokens, verbose=verbose, **kwargs)
    if verbose:
        return _print_stream(responses, verbose=True)
    return "".join(response.text for response in responses)


@dataclass
class BatchStats:
    """Totals of a `batch_generate` call (mlx-lm's fields)."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    generation_time: float = 0.0
    peak_memory: float = 0.0


@dataclass
class BatchResponse:
    """What `batch_generate` returns (mlx-lm's shape). texts: one reply per prompt; stats;
    caches: always None (prompt caches live in the engine's prefix cache); token_ids / logprobs:
    the generated ids and each one's log-probability, when asked for."""

    texts: list[str]
    stats: BatchStats
    caches: list[Any] | None = None
    token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None


def batch_generate(
    model: Any,
    processor: Any,
    prompts: Sequence[Prompt],
    max_tokens: int | Sequence[int] = 128,
    verbose: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    *,
    system: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    prefill_step_size: int = 2048,
) -> BatchResponse:
    """Replies to several prompts, decoded together (mlx-lm's `batch_generate`).

    prompts: each a text, chat messages or token ids (as for `generate`). max_tokens: one for all
    or one per prompt. A seed gives prompt i the seed + i. The stop token is not part of a text.
    """
    prompts = list(prompts)
    if not prompts:
        raise UserError("batch_generate needs at least one prompt")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise UserError(f"max_tokens has {len(limits)} values for {len(prompts)} prompts")
    check_enable_thinking(enable_thinking)
    settings = dict(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        prefill_step_size=prefill_step_size,
    )
    requests = []
    for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
        own_seed = None if seed is None else (seed + i) % 2**64
        sampling = _sampling(max_tokens=limit, seed=own_seed, **settings)
        if prompt is None:
            raise UserError(f"prompt {i} is empty")
        ids, embeddings, positions = prepare_prompt(
            model, processor, prompt, system=system, enable_thinking=enable_thinking, tools=tools
        )
        requests.append(
            Request(
                prompt=ids,
                max_tokens=_fit_context(processor, ids, limit),
                sampling=sampling,
                input_embeddings=embeddings,
                position_ids=positions,
                stop_token_ids=processor.eos_token_ids,
                prefill_step_size=prefill_step_size,
            )
        )
    engine = engine_for(model, processor)
    tic = time.perf_counter()
    mx.reset_peak_memory()
    handles = [engine.submit(r) for r in requests]
    texts: list[str] = []
    tokens: list[list[int]] = []
    logprobs: list[list[float]] = []
    try:
        for n, handle in enumerate(handles):
            ids, lps = [], []
            # The streaming detokenizer, so that each text is what `generate` would return.
            detokenizer = processor.tokenizer.detokenizer
            text = ""
            for event in handle:
                if event.finish_reason != "stop":
                    ids.append(event.token)
                    detokenizer.add_token(event.token)
                    if return_logprobs:
                        lps.append(event.logprobs[event.token].item())
                if event.finish_reason is not None:
                    detokenizer.finalize()
                text += detokenizer.last_segment
            texts.append(text)
            tokens.append(ids)
            logprobs.append(lps)
            if verbose:
                print(f"[batch_generate] Finished processing {n + 1}/{len(handles)} ...", end="\r")
    finally:
        for handle in handles:
            handle.cancel()
    stats = _batch_stats(handles, time.perf_counter() - tic)
    if verbose:
        print(f"[batch_generate] Finished processing {len(handles)}/{len(handles)}")
        print(
            f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, "
            f"{stats.prompt_tps:.3f} tokens-per-sec"
        )
        print(
            f"[batch_generate] Generation: {stats.generation_tokens} tokens, "
            f"{stats.generation_tps:.3f} tokens-per-sec"
        )
        print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB")
    return BatchResponse(
        texts=texts,
        stats=stats,
        token_ids=tokens if return_token_ids else None,
        logprobs=logprobs if return_logprobs else None,
    )


def _batch_stats(handles: list[Any], elapsed: float) -> BatchStats:
    stats = BatchStats()
    stats.prompt_tokens = sum(h.stats.prefilled_tokens for h in handles)
    stats.generation_tokens = sum(h.stats.generation_tokens for h in handles)
    # Prompt time: until the last first token; generation time: the rest.
    firsts = [h.stats.prompt_tokens / h.stats.prompt_tps for h in handles if h.stats.prompt_tps]
    stats.prompt_time = min(max(firsts, default=0.0), elapsed)
    stats.generation_time = max(elapsed - stats.prompt_time, 0.0)
    if stats.prompt_time > 0:
        stats.prompt_tps = stats.prompt_tokens / stats.prompt_time
    if stats.generation_time > 0:
        stats.generation_tps = stats.generation_tokens / stats.generation_time
    stats.peak_memory = mx.get_peak_memory() / 1e9
    return stats


def _print_stream(responses: Iterator[GenerationResponse], *, verbose: bool) -> str:
    """Print the text as it streams and return it; with `verbose` it stands between two lines of
    "=" and the speeds and peak memory follow, as mlx-lm prints them."""
    text = ""
    response = None
    for response in responses:
        if verbose and response.generation_tokens == 1:
            print("=" * 10)
        print(response.text, end="", flush=True)
        text += response.text
    print()
    if verbose and response is not None:
        print("=" * 10)
        print_stats(response)
    return text


def print_stats(response: GenerationResponse) -> None:
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec"
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB")
