"""The generation loop: `generate_step`, `stream_generate`, `generate`.

    model, processor = mlx_qwen35.load("tiny-random")
    text = generate(model, processor, "Tell me a story", max_tokens=64)
    for response in stream_generate(model, processor, messages, temp=0.7, top_p=0.8):
        print(response.text, end="", flush=True)
    text = generate(model, processor, "What is in the picture?", images=["cat.png"])

The loop follows gpt-fast / mlx-lm: the prompt is prefilled in steps of `prefill_step_size`
evaluating only the caches (the head never runs on prompt positions), the last step runs the head
on the last position only, and each next token is queued (async eval) before the current one is
handed out, so the Python side overlaps the device.

With images or videos the vision tower runs once, before prefill (`Model.prepare_inputs`): the
prefill steps take slices of the merged embeddings and of the precomputed 3-D positions, and
decoding continues from the position the cache records.
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
from .sampling import check_sampling

# Prefill progress bar: for multi-step prompts at least this long, or any multi-step one if verbose.
PROGRESS_MIN_TOKENS = 4096

# A stream of its own for generation, one per thread, as mlx-lm does.
GENERATION_STREAM = mx.new_thread_local_stream(mx.default_device())


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


def _last_logits(model: Any, tokens: mx.array, cache: list[Any], **kwargs: Any) -> mx.array:
    """Logits [1, vocab] of the last position of `tokens` [1, T]: the head runs there only."""
    hidden = model.hidden_states(tokens, cache, **kwargs)
    return model.language_model.logits(hidden[:, -1:, :])[:, -1, :]


def generate_step(
    model: Any,
    prompt: mx.array,
    *,
    max_tokens: int,
    sampler: Any,
    logits_processors: Sequence[Any] = (),
    presence_processors: Sequence[Any] = (),
    prefill_step_size: int = 2048,
    cache: list[Any] | None = None,
    on_prefill: Any = None,
    input_embeddings: mx.array | None = None,
    position_ids: mx.array | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to `max_tokens` steps after the 1-D `prompt`.

    `logits_processors` see the prompt and the generated tokens; `presence_processors` only the
    generated ones (the OpenAI/vLLM presence penalty); `on_prefill(n)` is told about each prefill
    step of n tokens. `input_embeddings` [1, T, H] and `position_ids` [3, 1, T] (from
    `Model.prepare_inputs`, for prompts with images or videos) replace the prompt's embeddings and
    positions; prefill steps take slices of them, decoding continues from the cache.
    """
    cache = model.make_cache() if cache is None else cache
    input_embeddings, position_ids = _check_prepared(prompt, input_embeddings, position_ids)
    if input_embeddings is not None:
        mx.eval(input_embeddings)  # the vision tower runs once, not once per prefill step

    def chunk(start: int, end: int | None) -> dict[str, mx.array]:
        kwargs = {}
        if input_embeddings is not None:
            kwargs["input_embeddings"] = input_embeddings[:, start:end]
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[..., start:end]
        return kwargs

    history = prompt if logits_processors else None
    generated: mx.array | None = None

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        for processor in logits_processors:
            logits = processor(history, logits)
        if generated is not None:
            for processor in presence_processors:
                logits = processor(generated, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs[0]

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history, generated
        if history is not None:
            history = mx.concatenate([history, y])
        if presence_processors:
            generated = y if generated is None else mx.concatenate([generated, y])
        return sample(model(y[None], cache=cache)[:, -1, :])

    with mx.stream(GENERATION_STREAM):
        # All chunks but the last only fill the caches; nothing asks for their hidden states.
        last = (prompt.size - 1) // prefill_step_size * prefill_step_size
        for start in range(0, last, prefill_step_size):
            end = start + prefill_step_size
            model.hidden_states(prompt[None, start:end], cache, **chunk(start, end))
            mx.eval([c.state for c in cache])
            if on_prefill is not None:
                on_prefill(prefill_step_size)
            mx.clear_cache()
        y, logprobs = sample(_last_logits(model, prompt[None, last:], cache, **chunk(last, None)))
        mx.async_eval(y, logprobs)
        for n in range(max_tokens):
            if n + 1 < max_tokens:
                next_y, next_logprobs = step(y)
                mx.async_eval(next_y, next_logprobs)
            if n == 0 and on_prefill is not None:
                mx.eval(y)
                on_prefill(prompt.size - last)
            yield y.item(), logprobs
            if n + 1 < max_tokens:
                y, logprobs = next_y, next_logprobs
            if n % 256 == 255:
                mx.clear_cache()


def _check_prepared(
    prompt: mx.array, embeddings: mx.array | None, positions: mx.array | None
) -> tuple[mx.array | None, mx.array | None]:
    """Embeddings as [1, T, H] and positions as [3, 1, T] for the 1-D `prompt` of T tokens."""
    T = prompt.size
    if embeddings is not None:
        if embeddings.ndim == 2:
            embeddings = embeddings[None]
        if embeddings.ndim != 3 or embeddings.shape[:2] != (1, T):
            raise UserError(
                f"input_embeddings must be [1, {T}, hidden] for a prompt of {T} tokens, got "
                f"{list(embeddings.shape)}"
            )
    if positions is not None:
        positions = mx.array(positions)
        if positions.ndim == 2:
            positions = positions[:, None]
        if positions.shape != (3, 1, T):
            raise UserError(
                f"position_ids must be [3, 1, {T}] for a prompt of {T} tokens, got "
                f"{list(positions.shape)}"
            )
    return embeddings, positions


def stream_generate(
    model: Any,
    processor: Any,
    prompt: str | Sequence[Mapping[str, Any]] | Sequence[int] | mx.array,
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
    seed: int | None = None,
    prefill_step_size: int = 2048,
    verbose: bool = False,
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
        token generated so far. seed: seeds MLX's random generator.
    Stops at an end-of-turn token (<|im_end|>, generation_config's eos) or after `max_tokens`.
    """
    check_sampling(
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        prefill_step_size=prefill_step_size,
        seed=seed,
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
    context = processor.max_position_embeddings
    if len(ids) >= context:
        raise UserError(
            f"the prompt has {len(ids)} tokens but the model's context is {context} tokens; "
            "shorten the prompt"
        )
    max_tokens = min(max_tokens, context - len(ids))
    from mlx_lm.generate import wired_limit
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    logits_processors = make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    # vLLM semantics: every generated token counts, the prompt does not.
    presence_processors = make_logits_processors(
        presence_penalty=presence_penalty, presence_context_size=max_tokens
    )
    progress = _progress_bar(len(ids), prefill_step_size, verbose)
    tokens = generate_step(
        model,
        mx.array(ids, dtype=mx.uint32),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        presence_processors=presence_processors,
        prefill_step_size=prefill_step_size,
        on_prefill=progress.update if progress is not None else None,
        input_embeddings=embeddings,
        position_ids=positions,
    )
    detokenizer = processor.tokenizer.detokenizer
    eos = processor.eos_token_ids
    with wired_limit(model, [GENERATION_STREAM]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        for n, (token, logprobs) in enumerate(tokens):
            if n == 0:
                prompt_tps = len(ids) / (time.perf_counter() - tic)
                tic = time.perf_counter()
                if progress is not None:
                    progress.close()
            finish = "stop" if token in eos else ("length" if n + 1 == max_tokens else None)
            if finish != "stop":
                detokenizer.add_token(token)
            if finish is not None:
                detokenizer.finalize()
            elapsed = time.perf_counter() - tic
            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=logprobs,
                prompt_tokens=len(ids),
                prompt_tps=prompt_tps,
                generation_tokens=n + 1,
                generation_tps=n / elapsed if n > 0 and elapsed > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
            )
            if finish is not None:
                break


def _progress_bar(prompt_len: int, step: int, verbose: bool) -> Any:
    """A prefill bar for prompts that take several steps, when verbose or long."""
    if prompt_len <= step or not (verbose or prompt_len >= PROGRESS_MIN_TOKENS):
        return None
    from tqdm import tqdm

    return tqdm(total=prompt_len, desc="Prefill", unit="tok", leave=False, file=sys.stderr)


def generate(
    model: Any,
    processor: Any,
    prompt: str | Sequence[Mapping[str, Any]] | Sequence[int] | mx.array,
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
