"""Each tenant's callbacks are signed with a secret of its own (services/callbacks.py, tenant_secret).

Found in review: every callback was signed with MLCHAT_CALLBACK_SECRET itself, so a tenant holding it
(to check its own callbacks) could sign a callback as from mlchat to any other tenant's receiver.
Keys from tests/conftest.py: `game-a` (INGEST_KEY) and `game-b` (HASHED_INGEST_KEY) are ingest keys of
two tenants; REVIEW_KEY is a writer's key.
"""

import json

import httpx
import pytest
from pydantic import SecretStr

from core.settings import settings
from db.session import session_scope
from db.turns import cancel_turns
from scripts.cli import main as cli
from services import producer
from services.callbacks import SIGNATURE_HEADER, verify_signature
from services.turn_callbacks import deliver_turn
from tests.callback_receiver import receiving
from tests.conftest import HASHED_INGEST_KEY, INGEST_KEY, REVIEW_KEY, new_conversation

MASTER = "the-operators-callback-secret"
A = {"X-API-Key": INGEST_KEY}
B = {"X-API-Key": HASHED_INGEST_KEY}


@pytest.fixture
def signing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(settings, "callback_secret", SecretStr(MASTER))
    monkeypatch.setattr(settings, "callback_allow_private", True)  # the receiver is on loopback


def _secret(base_url: str, headers: dict[str, str]) -> dict:
    r = httpx.get(f"{base_url}/v1/callbacks/secret", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_each_tenants_callbacks_are_signed_with_a_secret_only_its_own_keys_learn(base_url, signing) -> None:
    a, b = _secret(base_url, A), _secret(base_url, B)
    assert (a["tenant"], b["tenant"]) == ("game-a", "game-b")
    r = httpx.get(f"{base_url}/v1/callbacks/secret", headers=A)
    assert r.headers["cache-control"] == "no-store"
    assert len({a["secret"], b["secret"], MASTER}) == 3
    assert a["signature_header"] == SIGNATURE_HEADER
    signed = {}
    with receiving() as (url, received):
        for tenant in ("game-a", "game-b"):
            line = new_conversation() | {"message": "Bring the cart round.", "callback_url": url}
            request = producer.TurnRequest(**line)
            (stored,) = producer.submit_turns([request], send=False, api_key=tenant, tenant=tenant)
            with session_scope() as session:
                cancel_turns(session=session, turn_ids=[stored.id])
            assert deliver_turn(stored.id) is True
            body, signature = received[-1]
            assert json.loads(body)["id"] == str(stored.id)
            signed[tenant] = (body, signature)
    body, signature = signed["game-a"]
    assert verify_signature(signature, body, a["secret"])
    # Before: signed with MASTER, which game-b held too (to check its own) and could sign with.
    assert not verify_signature(signature, body, b["secret"])
    assert not verify_signature(signature, body, MASTER)
    body, signature = signed["game-b"]
    assert verify_signature(signature, body, b["secret"])
    assert not verify_signature(signature, body, a["secret"])


def test_the_secret_is_for_keys_that_set_callbacks_and_only_while_callbacks_are_on(
    base_url, signing, monkeypatch
) -> None:
    r = httpx.get(f"{base_url}/v1/callbacks/secret", headers={"X-API-Key": REVIEW_KEY})
    assert r.status_code == 403 and "ingest" in r.text  # a writer's key sets no callback
    assert httpx.get(f"{base_url}/v1/callbacks/secret").status_code == 401
    monkeypatch.setattr(settings, "callback_secret", None)
    r = httpx.get(f"{base_url}/v1/callbacks/secret", headers=A)
    assert r.status_code == 409 and "MLCHAT_CALLBACK_SECRET" in r.text


def test_the_cli_prints_a_tenants_secret_and_notes_a_tenant_no_key_has(
    base_url, signing, capsys, monkeypatch
) -> None:
    assert cli(["callbacks", "secret", "--tenant", "game-a"]) == 0
    assert capsys.readouterr().out.strip() == _secret(base_url, A)["secret"]
    assert cli(["callbacks", "secret"]) == 0  # the CLI's own tenant's: the operator's signs nothing
    default = capsys.readouterr().out.strip()
    assert len({default, MASTER, _secret(base_url, A)["secret"]}) == 3
    assert cli(["callbacks", "secret", "--tenant", "game-z"]) == 0  # a tenant no key has (any more)
    out = capsys.readouterr()
    assert "game-z" in out.err and "MLCHAT_API_KEYS" in out.err and out.out.strip() not in (default, MASTER)
    monkeypatch.setattr(settings, "callback_secret", None)
    assert cli(["callbacks", "secret", "--tenant", "game-a"]) == 2
    assert "MLCHAT_CALLBACK_SECRET" in capsys.readouterr().err


def test_a_signature_header_with_characters_beyond_ascii_is_refused_not_an_error() -> None:
    """Review: compare_digest raised TypeError on a str beyond ASCII, a forged header's."""
    import time

    from services.callbacks import sign

    header = sign(b"{}", "s", int(time.time()))
    assert verify_signature(header, b"{}", "s")
    assert not verify_signature(header.split("v1=")[0] + "v1=é" + "0" * 63, b"{}", "s")
    assert not verify_signature("t=" + "9" * 400 + ",v1=00", b"{}", "s")  # no float overflow either


def test_a_rotated_secret_signs_with_both_until_the_previous_is_unset(base_url, signing, monkeypatch) -> None:
    """Callbacks review: a leaked secret could only be replaced for every receiver at the same
    moment (each failing until its operator caught up). With MLCHAT_CALLBACK_SECRET_PREVIOUS, each
    callback is signed with both, and each receiver moves to its new secret in its own time."""
    old = _secret(base_url, A)
    assert old["previous_secret"] is None
    monkeypatch.setattr(settings, "callback_secret", SecretStr("the-operators-new-callback-secret"))
    monkeypatch.setattr(settings, "callback_secret_previous", SecretStr(MASTER))
    new = _secret(base_url, A)
    assert new["previous_secret"] == old["secret"] and new["secret"] != old["secret"]
    with receiving() as (url, received):
        line = new_conversation() | {"message": "Rotate.", "callback_url": url}
        (stored,) = producer.submit_turns(
            [producer.TurnRequest(**line)], send=False, api_key="game-a", tenant="game-a"
        )
        with session_scope() as session:
            cancel_turns(session=session, turn_ids=[stored.id])
        assert deliver_turn(stored.id) is True
        body, signature = received[-1]
    assert signature.count("v1=") == 2
    assert verify_signature(signature, body, new["secret"]) and verify_signature(
        signature, body, old["secret"]
    )
    assert verify_signature(signature, body, new["secret"], delivery=str(stored.id))
    assert verify_signature(signature, body, old["secret"], delivery=str(stored.id))
    assert not verify_signature(signature, body, _secret(base_url, B)["secret"])
