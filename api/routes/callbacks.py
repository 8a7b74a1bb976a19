"""The secret that signs a tenant's callbacks, for its receivers to check them with. A key learns
its own tenant's and no other's (services/callbacks.py, tenant_secret)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import BaseModel

from api.deps import Caller, needs
from core.settings import settings
from services.callbacks import SIGNATURE_HEADER, previous_tenant_secret, tenant_secret

router = APIRouter(prefix="/v1/callbacks", tags=["callbacks"])


class CallbackSecret(BaseModel):
    object: str = "callback_secret"
    tenant: str
    secret: str
    # While MLCHAT_CALLBACK_SECRET_PREVIOUS is set: the tenant's secret being retired, which also
    # signs each callback until the operator unsets it.
    previous_secret: str | None = None
    signature_header: str = SIGNATURE_HEADER


@router.get("/secret", response_model=CallbackSecret)
def get_callback_secret(
    who: Annotated[Caller, Depends(needs("ingest"))], response: Response
) -> CallbackSecret:
    """The secret this key's tenant's callbacks are signed with (HMAC-SHA256 over "<t>.<raw body>")."""
    response.headers["Cache-Control"] = "no-store"  # a secret: never kept by a proxy or a browser
    if settings.callback_secret is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "callbacks are off: the server has no MLCHAT_CALLBACK_SECRET"
        )
    return CallbackSecret(
        tenant=who.tenant,
        secret=tenant_secret(who.tenant),
        previous_secret=previous_tenant_secret(who.tenant),
    )
