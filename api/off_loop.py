"""Request bodies validated in the request's worker thread, never on the event loop.

FastAPI validates a body typed as a model on the event loop, before the route runs. A body that may
carry a structured reply format (a JSON schema or a regex) has its grammar built while it is
validated, which may take up to MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S and wait as long for a builder
(structured/spec.py): on the loop that stalled every other request of the process, every tenant's.
Such routes take the body as JSON and validate it here, in a thread, with the same 422 naming each
field. (The OpenAPI document then shows no schema for their bodies; the README gives the fields.)
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: Any) -> M:
    """The body as `model`; RequestValidationError (the API's 422) naming each field, as FastAPI's own."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
