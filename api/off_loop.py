"""Request bodies validated in the request's worker thread, never on the event loop.

FastAPI validates a body typed as a model on the event loop, before the route runs. A body that may
carry a structured reply format (a JSON schema or a regex) has its grammar built while it is
validated, which may take up to MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S and wait as long for a builder
(structured/spec.py): on the loop that stalled every other request of the process, every tenant's.
Such routes take the body as JSON and validate it here, in a thread, with the same 422 naming each
field; their OpenAPI entries still name the model (`documented`, `publish_bodies`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: Any) -> M:
    """The body as `model`; RequestValidationError (the API's 422) naming each field, as FastAPI's own."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


# The models such routes take, published in the OpenAPI document's components (publish_bodies).
_BODIES: list[type[BaseModel]] = []


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON body is `model`."""
    if model not in _BODIES:
        _BODIES.append(model)
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def publish_bodies(app: FastAPI) -> None:
    """Add the `documented` models (and the models they use) to the app's OpenAPI components."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODIES:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
