"""API-key authentication: keys come from MLCHAT_API_KEYS; a request without a valid one gets 401."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from core.settings import settings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


def require_api_key(
    api_key: str | None = Security(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> str:
    """Accept `X-API-Key: <key>` or `Authorization: Bearer <key>`; compare in constant time."""
    presented = api_key or (bearer.credentials if bearer else None)
    if presented and any(hmac.compare_digest(presented, key) for key in settings.api_keys):
        return presented
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key",
        headers={"WWW-Authenticate": "Bearer"},
    )
