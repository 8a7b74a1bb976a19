"""Who is calling: the API key (`X-API-Key` or `Authorization: Bearer`) and its scopes.

Keys are compared by their sha256 digests in constant time, so they may be configured hashed and a
key of any length or alphabet is just a wrong key (401), never an error.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import cache

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from core.settings import ApiKey, Scope, settings
from services.schemas import utf8_header_value

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Caller:
    key_id: str
    scopes: frozenset[str]
    tenant: str  # namespaces the conversations and idempotency keys the caller names

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key",
        headers={"WWW-Authenticate": "Bearer"},
    )


# The dependencies of every route are `async`: they hash a key and read headers, on the event loop. As
# plain functions they ran on the thread pool the sync routes hold, so while a database stall kept
# its 40 threads waiting, the stream, long-poll and chat routes could not even authenticate.


async def caller(
    api_key: str | None = Security(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> Caller:
    """The calling key; 401 without a valid one."""
    found = _presented_caller(api_key or (bearer.credentials if bearer else None))
    if found is None:
        raise unauthorized()
    return found


def _presented_caller(presented: str | None) -> Caller | None:
    # Header bytes arrive decoded as Latin-1: a key beyond it, sent as UTF-8, is read as its sender
    # wrote it (as the desk's login form reads it), not as mojibake no key's digest matches.
    return key_caller(str(utf8_header_value(presented))) if presented else None


async def has_a_key(request: Request) -> bool:
    """Whether the request's headers name a valid key, read by `caller`'s own readers: for an answer
    made before the route's dependencies ran (a body FastAPI could not parse)."""
    bearer = await _bearer(request)
    return (
        _presented_caller(await _api_key_header(request) or (bearer.credentials if bearer else None))
        is not None
    )


def configured_key(presented: str) -> ApiKey | None:
    """The configured key a presented key is, or None for a wrong key (the desk's login uses it too)."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest()
    match = None
    for key in settings.api_keys:  # every key compared, so the time does not say which one matched
        if hmac.compare_digest(digest, key.digest):
            match = key
    return match


def caller_of(key: ApiKey) -> Caller:
    return Caller(key.id, frozenset(key.scopes), key.tenant_id)


def key_caller(presented: str) -> Caller | None:
    """The caller a presented key names, or None for a wrong key."""
    match = configured_key(presented)
    return None if match is None else caller_of(match)


@cache  # one dependency per scope: FastAPI computes it once a request, however many ask for it
def needs(scope: Scope):  # type: ignore[no-untyped-def]
    """A dependency: the caller, who must hold `scope` (admin holds every scope); 403 otherwise."""

    async def check(who: Caller = Depends(caller)) -> Caller:
        if scope not in who.scopes and not who.admin:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this API key lacks the {scope!r} scope")
        return who

    return check


async def metrics_reader(
    api_key: str | None = Security(_api_key_header),
    bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> None:
    """A dependency for /metrics: anyone when MLCHAT_API_METRICS_PUBLIC is set, else an admin key."""
    if settings.api_metrics_public:
        return
    if not (await caller(api_key, bearer)).admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "/metrics needs an admin key (or MLCHAT_API_METRICS_PUBLIC=true)"
        )


JSON_TYPES = ("application/json",)


@cache
def json_body(scope: Scope):  # type: ignore[no-untyped-def]
    """A dependency of routes that read JSON, whose callers must hold `scope`: 415 for a body of
    another declared content type. After the key and scope checks (computed once a request): a
    keyless request is told it has no key (401), a key without the scope that it lacks it (403), not
    how to send a body."""

    scoped = Depends(needs(scope))

    async def check(request: Request, _: Caller = scoped) -> None:
        _json_declared(request)

    return check


def _json_declared(request: Request) -> None:
    """HTTPException 415 unless the request's body is declared JSON (or there is none)."""
    declared = request.headers.get("content-type")
    if declared is None:
        has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
        if not has_body:
            return
        # FastAPI hands an undeclared body on as bytes, not JSON: a valid object was refused as "not
        # a valid dictionary", which blamed the body for what its header left out.
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "content-type: missing; send JSON with content-type: application/json",
        )
    media = declared.split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"content-type {media!r} is not supported here: send JSON with content-type: application/json",
        )
