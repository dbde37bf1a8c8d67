"""The generation engine: continuous batching of Qwen3.5's hybrid caches, and the front doors on it.

Where things live:
- request.py: SamplingParams, Request (prompt ids or embeddings + 3-D positions, sampling, logits
  processors, stop ids, prefix-cache hints), TokenEvent, RequestStats, RequestHandle.
- scheduler.py: Engine (submit / step / start / stop, the loop of batched decode steps and chunked
  prefill), engine_for(model, processor): the per-model engine everyone shares.
- rows.py: one request inside the engine (its checks, its chunked prefill, its first token).
- batch_cache.py: the per-layer caches of several requests as one batch (left-padded KV, stacked
  DeltaNet states; the row operations themselves are methods of model/cache.py's classes).
- prefix_cache.py: PrefixCache / PrefixEntry, model states at message boundaries and after replies,
  reused by later requests (LRU, bounded in bytes).
- sampling.py: the one sampler (per-row settings, penalties, seeded streams, top logprobs).
- generate.py: generate, stream_generate, batch_generate (mlx-lm's names and shapes).
- session.py (+ session_render.py, session_file.py, text_stream.py): ChatSession, a conversation
  whose reuse between turns is the prefix cache's.

    from mlx_qwen35.engine.scheduler import engine_for
    from mlx_qwen35.engine.request import Request, SamplingParams
    engine = engine_for(model, processor)
    handle = engine.submit(Request(prompt=ids, max_tokens=64, sampling=SamplingParams(temp=0.7)))
    for event in handle:  # TokenEvent: token, logprobs, top_logprobs, from_draft, finish_reason
        ...
    handle.stats                # prompt_tokens, cached_tokens, prefilled_tokens, speeds, ...
    engine.start()              # a background loop (the server); without it, consumers drive
"""
