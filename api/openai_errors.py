"""Refusals on the routes of OpenAI's API in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`: its client builds its exception's text from `error.message` and fills `code`, `param` and
`type` from it, and raises BadRequestError for a 400 (a validation 422 would be another class)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response

OPENAI_PATHS = ("/v1/files", "/v1/batches", "/v1/chat/completions", "/v1/models")

# A field a refusal names: `body.model: ...`, `body.messages[1].content: ...`, `purpose: ...`.
_PARAM = re.compile(r"^((?:body|[a-z_]+)(?:\.[A-Za-z_]\w*|\.\d+|\[-?\d+\])*):")


def route_path(scope: Mapping[str, Any]) -> str:
    """The path routes match: under a proxy's prefix (uvicorn's --root-path), `path` holds it too."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(f"{root}/") else path


def openai_path(path: str) -> bool:
    """Whether a route path is one of OpenAI's routes (its clients read its error shape)."""
    return any(path == p or path.startswith(f"{p}/") for p in OPENAI_PATHS)


def error_body(
    status_code: int, message: str, kind: str | None = None, *, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object for a refusal; `param` only when a refusal's message opens by naming a
    field, named as OpenAI names it (`max_tokens`, `messages[1].content`: the message's `body.` is
    not; review: a wrapper matching `e.param` never matched); `code` OpenAI's own for it
    (`model_not_found`), else `invalid_api_key` for a 401."""
    match = _PARAM.match(message) if status_code < 500 else None
    if kind is None:
        kind = "server_error" if status_code >= 500 else "invalid_request_error"
    code = code or ("invalid_api_key" if status_code == 401 else None)
    param = match[1].removeprefix("body.") if match and match[1] != "body" else match and match[1]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_shaped(response: Response) -> Response:
    """A refusal in this API's own shape (`{"detail": …}`) as OpenAI's: a text detail is the message;
    a validation problem's list is summed up in one message naming its first field, and its 422 is a
    400. Its headers (Retry-After, WWW-Authenticate) are kept; any other answer is returned as it is."""
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        return response
    if not isinstance(body, dict) or "detail" not in body:
        return response
    detail = body["detail"]
    status_code = 400 if response.status_code == 422 else response.status_code
    if isinstance(detail, list):
        fields = [e for e in detail if isinstance(e, dict)]
        message = body.get("message") or "; ".join(f"{e.get('field')}: {e.get('msg')}" for e in fields)
        content = error_body(status_code, str(message))
        # OpenAI names a query or path field as itself (`purpose`), not as `purpose (query)`.
        param = str(fields[0].get("field")) if fields else None
        content["error"]["param"] = param and re.sub(r" \((query|path|header)\)$", "", param)
    else:
        content = error_body(status_code, str(detail))
    headers = {
        k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")
    }
    return JSONResponse(status_code=status_code, content=content, headers=headers)
