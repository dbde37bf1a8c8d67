"""`python -m mlx_qwen35.server`: an HTTP server for agents and apps.

    app.py          the FastAPI app: auth, limits, error shapes, /health, /v1/models
    routes_openai   POST /v1/chat/completions and /v1/completions
    routes_anthropic  POST /v1/messages and /v1/messages/count_tokens
    routes_responses  POST /v1/responses (the subset Codex uses)
    protocol_*.py   the request schemas of each API (pydantic), checked before anything runs
    generation.py   an API-neutral call -> an engine Request -> text, reasoning and tool-call deltas
    media.py        image/video parts (data:, http(s), local paths when allowed) with limits
    errors.py       APIError and each API's error body; auth.py the API key check

Every front door only translates: a request becomes chat messages and sampling settings, the
engine generates, and the deltas go back in the API's own shapes.
"""
