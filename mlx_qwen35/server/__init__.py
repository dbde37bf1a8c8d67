"""`python -m mlx_qwen35.server`: an HTTP server for agents and apps.

    app.py                the FastAPI app: auth, body limit, error shapes, /health, /v1/models
    routes_openai.py      /v1/chat/completions and /v1/completions, whole and as SSE chunks
    routes_anthropic.py   /v1/messages (+ its event stream) and /v1/messages/count_tokens
    routes_responses.py   /v1/responses (the subset Codex uses), its events, stored responses
    protocol_*.py         each API's request schema (pydantic) and its translation to a Call
    generation.py         Call -> engine Request -> reasoning / text / tool-call deltas + usage
    media.py              image/video parts (data:, http(s), local paths when allowed), limits
    state.py              settings, model, engine, in-flight count; errors.py, auth.py

Every front door only translates: a request becomes chat messages and sampling settings, the
engine generates, and the deltas go back in the API's own shapes.
"""
