"""API keys: `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic
clients), compared in constant time."""

from __future__ import annotations

import hmac

from .errors import APIError


def check_api_key(expected: str | None, authorization: str | None, x_api_key: str | None) -> None:
    """Raise a 401 APIError unless the request carries `expected` (no key set: all pass)."""
    if not expected:
        return
    given = x_api_key
    if authorization and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    # compare_digest on bytes: constant time whatever the input, and no error on non-ASCII.
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(
            401,
            "invalid or missing API key; send Authorization: Bearer KEY (or x-api-key: KEY)",
            code="invalid_api_key",
        )
