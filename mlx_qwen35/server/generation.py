"""One API-neutral call: chat messages (or raw prompt ids) and settings -> an engine Request ->
a stream of reasoning / answer / tool-call deltas, token log-probabilities and a final usage.

The three front doors build a `Call`, `prepare` checks it against the model (context, tools,
grammar) and renders it safely, and `events` runs it on the engine and parses what comes back
with the one ReplyParser, so streamed and whole replies agree by construction.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..engine.request import MediaSpan, Request, SamplingParams
from ..engine.rows import check_request
from ..errors import UserError
from ..inputs.render import render_chat
from ..inputs.reply_parser import Content, ReplyParser
from ..inputs.structured import grammar_processor, response_format_grammar, tool_call_grammar
from ..inputs.tools import CALL_START, normalize_tools
from .errors import APIError

# Model card sampling (Qwen3.5), by whether the reply thinks; a request or the server's flags
# override each value.
RECOMMENDED_SAMPLING = {
    True: dict(temp=1.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5),
    False: dict(temp=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5),
}
SAMPLING_KEYS = (
    "temp",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
)


@dataclass
class Call:
    """What any API asks for, in the engine's terms (None = the server's default)."""

    messages: list[dict[str, Any]] | None = None
    prompt_ids: list[int] | None = None  # a raw prompt (/v1/completions)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"  # "auto", "none", "required" or "function" (tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no log-probabilities
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    request: Request
    prompt_tokens: int
    thinking: bool  # the reply starts inside <think>
    tools: list[dict[str, Any]] | None
    parse_calls: bool
    stop: list[str]
    top_logprobs: int | None  # None: no log-probabilities
    raw: bool = False  # a raw completion: text as generated, no reasoning or calls parsed


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenInfo:
    """A generated token with its log-probability and the top alternatives (text, logprob)."""

    token: int
    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Finished:
    """finish_reason: "stop", "length", "tool_calls" or "cancelled"; stop_sequence: the stop
    string that ended the reply, if one did."""

    finish_reason: str
    usage: Usage
    stop_sequence: str | None = None


def prepare(state: Any, call: Call) -> Prepared:
    """Render and check `call`; raises APIError (4xx) for anything the model cannot do."""
    processor, config = state.processor, state.config
    try:
        tools = normalize_tools(call.tools) if call.tools else None
    except UserError as e:
        raise APIError(400, str(e), param="tools") from e
    try:
        thinking_flag = call.enable_thinking
        if thinking_flag is None:
            thinking_flag = config.enable_thinking
        if call.messages is not None:
            rendered = render_chat(
                processor,
                call.messages,
                tools=tools,
                enable_thinking=thinking_flag,
                **call.template_kwargs,
            )
            ids, thinking = rendered.ids, rendered.thinking_open
            boundaries = [p for p, _ in rendered.boundaries]
            media_spans = [
                MediaSpan(a, a + len(segment.ids), segment.key)
                for a, segment in rendered.segments
                if segment.media
            ]
            arrays = rendered.media_arrays()
        else:
            ids, thinking, boundaries, media_spans, arrays = call.prompt_ids, False, [], [], {}
    except UserError as e:
        raise APIError(400, str(e), param="messages") from e
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    context = processor.max_position_embeddings
    if len(ids) >= context:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens but the model's context is {context} tokens; "
            "shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )
    max_tokens = call.max_tokens or config.max_tokens
    max_tokens = min(max_tokens, context - len(ids))
    sampling = _sampling(config, call, thinking)
    processors = _processors(state, call, tools, thinking, len(ids))
    embeddings = positions = None
    if arrays and config.distributed is not None:
        raise APIError(
            400,
            "this server runs with --distributed and serves text only; send images and videos "
            "to a server started without --distributed",
            param="messages",
        )
    if arrays:
        with state.media_lock:  # one vision tower run at a time, beside the engine
            embeddings, positions = state.model.prepare_inputs(mx.array([ids]), **arrays)
            mx.eval(embeddings, positions)
    request = Request(
        prompt=list(ids),
        max_tokens=max_tokens,
        sampling=sampling,
        input_embeddings=embeddings,
        position_ids=positions,
        logits_processors=processors,
        stop_token_ids=set(processor.eos_token_ids),
        boundaries=boundaries,
        media_spans=media_spans,
        cache_final=call.messages is not None,  # an agent's next request extends this one
        draft_model=state.draft_model,
        num_draft_tokens=state.config.num_draft_tokens,
        draft_vocab=state.config.draft_vocab,
        kv_bits=config.kv_bits,
        kv_group_size=config.kv_group_size,
        quantized_kv_start=config.quantized_kv_start,
    )
    try:
        check_request(request, state.model)
    except UserError as e:
        raise APIError(400, str(e)) from e
    return Prepared(
        request=request,
        prompt_tokens=len(ids),
        thinking=thinking,
        tools=tools,
        parse_calls=bool(tools) and call.tool_choice != "none",
        stop=[s for s in call.stop if s],
        top_logprobs=call.top_logprobs,
        raw=call.messages is None,
    )


def _sampling(config: Any, call: Call, thinking: bool) -> SamplingParams:
    values = dict(RECOMMENDED_SAMPLING[thinking])
    values.update({k: v for k, v in config.sampling.items() if v is not None})
    values.update({k: v for k, v in call.sampling.items() if v is not None})
    if values.get("top_k", 0) < 0:  # vLLM's "off"
        values["top_k"] = 0
    values["top_logprobs"] = call.top_logprobs or 0
    return SamplingParams(
        **{k: v for k, v in values.items() if k in SamplingParams.__annotations__}
    )


def _processors(
    state: Any, call: Call, tools: list | None, thinking: bool, prompt_length: int
) -> list[Any]:
    processor = state.processor
    vocab = state.vocab_size
    out: list[Any] = []
    try:
        grammar = response_format_grammar(call.response_format)
        if call.tool_choice in ("required", "function"):
            if grammar is not None:
                raise UserError("response_format cannot be combined with a forced tool call")
            if not tools:
                raise UserError(f"tool_choice {call.tool_choice!r} needs tools")
            grammar = tool_call_grammar(tools, call.tool_name, parallel=call.parallel_tool_calls)
        if grammar is not None:
            out.append(grammar_processor(processor, vocab, grammar, after_think=thinking))
    except UserError as e:
        param = "tool_choice" if call.tool_choice in ("required", "function") else None
        raise APIError(400, str(e), param=param or "response_format") from e
    if call.tool_choice == "none" and tools:
        ids = processor.encode(CALL_START)
        if len(ids) == 1:
            out.append(_ban(ids[0]))
    budget = call.thinking_budget
    if budget is None:
        budget = state.config.thinking_budget
    if thinking and budget is not None:
        from ..engine.text_stream import thinking_budget_processor

        out.append(
            thinking_budget_processor(prompt_length, budget, processor.encode("</think>\n\n"))
        )
    return out


def _ban(token: int) -> Any:
    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == token, -float("inf"), logits)

    return processor


class StopStrings:
    """Holds back text that may begin a stop string; cuts the text at the first one found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text that is certain, the stop string found or None)."""
        if not self.stops:
            return text, None
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, stop = min(hits)
            out, self.pending = self.pending[:at], ""
            return out, stop
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


async def events(state: Any, prepared: Prepared, id_prefix: str = "call") -> AsyncIterator[Any]:
    """Run `prepared` on the engine: parser deltas, TokenInfo (with log-probabilities asked
    for), then one Finished. Closing the iterator (a client that went away) cancels the
    request in the engine."""
    processor = state.processor
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    state.started()
    try:
        handle = state.engine.submit(prepared.request)
    except BaseException as e:
        state.ended()
        if isinstance(e, UserError):
            raise APIError(400, str(e)) from e
        raise

    def deliver(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            handle.cancel()

    def pump() -> None:
        try:
            for event in handle:
                deliver(event)
        except Exception as e:  # the engine failed this request (it keeps serving others)
            deliver(e)
        finally:
            state.ended()  # the engine is done with it: its slot is free
            deliver(done)

    threading.Thread(target=pump, name="request-events", daemon=True).start()
    parser = ReplyParser(
        prepared.tools,
        thinking=prepared.thinking,
        id_prefix=id_prefix,
        parse_calls=prepared.parse_calls,
    )
    detokenizer = processor.tokenizer.detokenizer
    stops = StopStrings(prepared.stop)
    eos = prepared.request.stop_token_ids
    think_end = state.think_end
    generated = reasoning_tokens = 0
    in_thinking = prepared.thinking
    finish, stop_sequence = None, None
    try:
        while (event := await queue.get()) is not done:
            if isinstance(event, Exception):
                raise APIError(500, f"generation failed ({type(event).__name__}: {event})")
            generated += 1
            if in_thinking:
                reasoning_tokens += 1
                in_thinking = event.token != think_end
            text = ""
            if event.token not in eos:
                detokenizer.add_token(event.token)
                text = detokenizer.last_segment
            if event.finish_reason is not None:
                detokenizer.finalize()
                text += detokenizer.last_segment
            if prepared.top_logprobs is not None:
                yield _token_info(processor, event)
            text, stop_sequence = stops.feed(text)
            for delta in _parse(parser, text, prepared.raw):
                yield delta
            if stop_sequence is not None:
                handle.cancel()
                finish = "stop"
                break
            if event.finish_reason is not None:
                finish = event.finish_reason
        if finish is None:
            finish = handle.stats.finish_reason or "cancelled"
        if stop_sequence is None:
            for delta in _parse(parser, stops.flush(), prepared.raw):
                yield delta
        for delta in [] if prepared.raw else parser.finish():
            yield delta
        if finish == "stop" and parser.reply.calls:
            finish = "tool_calls"
        usage = Usage(
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=generated,
            cached_tokens=getattr(handle.stats, "cached_tokens", 0),
            reasoning_tokens=reasoning_tokens,
        )
        yield Finished(finish, usage, stop_sequence)
    finally:
        handle.cancel()  # no-op when finished; frees the slot when the client went away


def _parse(parser: ReplyParser, text: str, raw: bool) -> list[Any]:
    if raw:
        return [Content(text)] if text else []
    return parser.feed(text)


def _token_info(processor: Any, event: Any) -> TokenInfo:
    logprob = float(event.logprobs[event.token].item())
    top = [(processor.decode([t]), float(lp)) for t, lp in event.top_logprobs or []]
    return TokenInfo(event.token, processor.decode([event.token]), logprob, top)
