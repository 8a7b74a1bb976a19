"""The writers' desk: server-rendered pages (Jinja2 + htmx, vendored) to read a run's lines and its
scenes' transcripts, pick another candidate, edit a reply, approve or reject it (a scene's step is a
turn, changed the same way); and GET /v1/turns/{id}/review for the record.

The key is entered once in a login form, which sets a session cookie (the key's id and an expiry,
signed; never the key) that is HttpOnly, SameSite=Strict (Secure over HTTPS). The login form is
refused when the browser says it was posted from another site (its Origin), so no site can sign a
writer in under the attacker's key. Every form that changes something carries a token derived from
the session's signing key, checked on each POST, so another site cannot post on a writer's behalf.
The pages need a `review` or `admin` key; the prompt view an admin key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, caller_of, configured_key, needs
from core.settings import ApiKey, settings
from services import desk
from services.desk import DeskError, Reviewer

HERE = Path(__file__).resolve().parent.parent
COOKIE = "mlchat_desk"
# Over HTTPS the cookie is a `__Host-` one: a browser takes it only from this host, Secure and for
# the path /, so no sibling subdomain can plant one (a Domain cookie of the plain name would be read
# as the writer's session, another tenant's key's: desk security review).
HOST_COOKIE = "__Host-mlchat_desk"


def _cookie_of(request: Request) -> tuple[str, str]:
    """The session cookie's name and path for this request's scheme."""
    return (HOST_COOKIE, "/") if request.url.scheme == "https" else (COOKIE, "/desk")


KEY_MAX_CHARS = 1024
# Autoescaped everywhere: a reply, a character's name or a card field is text, never markup.
templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates" / "desk"),
        autoescape=True,
        undefined=jinja2.Undefined,
    )
)


def _utc(moment: datetime, seconds: bool = False) -> str:
    """A time as the desk shows it: in UTC, saying so (it was the database session's time zone,
    unsaid: a writer in Seoul read a UTC server's times as their own; review)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


templates.env.filters["utc"] = _utc

router = APIRouter(prefix="/desk", include_in_schema=False)
api_router = APIRouter(prefix="/v1/turns", tags=["desk"])


def static_files() -> StaticFiles:
    """The desk's vendored assets (htmx), mounted at /desk/static."""
    return StaticFiles(directory=HERE / "static" / "desk")


# A desk session: the cookie names the key and an expiry, signed with the key's digest (known to
# the server for every key, plain or hashed), never the key itself: a cookie that leaks (sent over
# plain http by a proxy's misconfiguration, say) opens the desk until it expires, not the whole API
# until the key is rotated; rotating the key ends its sessions.
SESSION_S = 12 * 3600


def signs_sessions(key: ApiKey, hashed: set[str] | None = None) -> bool:
    """Whether the desk may sign this key's sessions: with MLCHAT_DESK_SECRET, always; without it,
    only a key given whole (its digest is no more than the key, which MLCHAT_API_KEYS holds anyway).
    A key given by its sha256 has that digest in MLCHAT_API_KEYS, which others than the server may
    read (a deploy's config, a secret manager's viewers): its sessions would be theirs to forge
    (desk review: an admin key's, every tenant's desk). `hashed`: the digests of the keys given by
    their sha256 (`hashed_digests()`), when the caller looks at every key."""
    if settings.desk_secret is not None:
        return True
    # given whole, and not also by its sha256 (a move to hashed keys): that entry's digest is this one's
    return key.key is not None and key.digest not in (hashed_digests() if hashed is None else hashed)


def hashed_digests() -> set[str]:
    """The digests MLCHAT_API_KEYS holds as such (keys given by their sha256)."""
    return {key.sha256 for key in settings.api_keys if key.sha256 is not None}


def _signing_key(digest: str) -> bytes:
    """What signs a key's sessions and form tokens: its digest, under MLCHAT_DESK_SECRET when set (a
    hashed key's digest is in MLCHAT_API_KEYS, which others than the server may read)."""
    secret = settings.desk_secret
    if secret is None:
        return bytes.fromhex(digest)
    return hmac.new(secret.get_secret_value().encode("utf-8"), bytes.fromhex(digest), hashlib.sha256).digest()


def _csrf(key: ApiKey, session_mac: str) -> str:
    """The form token of one session: a page rendered for another session (a signed-out one's, kept
    in a browser's cache or history on a shared machine) carries a token no later session takes."""
    message = b"mlchat-desk-form\x00" + session_mac.encode("ascii")
    return hmac.new(_signing_key(key.digest), message, hashlib.sha256).hexdigest()


def _session_mac(digest: str, key_id: str, expires: int, nonce: str) -> str:
    message = f"mlchat-desk-session\x00{key_id}\x00{expires}\x00{nonce}".encode("utf-8", "surrogatepass")
    return hmac.new(_signing_key(digest), message, hashlib.sha256).hexdigest()


class NotSignedIn(Exception):
    """No usable desk cookie: a page load goes to the login form; a request of a page already open
    is told so in its message bar, which keeps what the writer typed."""


SESSION_ENDED = (
    "session: you are signed out (the session ended, or was signed out elsewhere); nothing was "
    "saved. Keep this page open, sign in at /desk/login in another tab, then send it again."
)
REFRESH_ENDED = (
    "session: you are signed out (the session ended, or was signed out elsewhere); this page stopped"
    " refreshing. Sign in at /desk/login to see it again."
)
# What a change's answer may say was saved (`?saved=`): any other text is not shown as the desk's.
SAVED = frozenset({"picked", "edited", "approved", "rejected"})


@dataclass(frozen=True)
class _Session:
    """A desk cookie that is its key's own and has not expired: the key, its signature and expiry."""

    key: ApiKey
    mac: str
    expires: int


class Desk:
    """The signed-in writer of a request: who (for the services) and the form token."""

    def __init__(self, caller: Caller, session: _Session) -> None:
        self.caller = caller
        self.who = Reviewer(caller.key_id, caller.tenant, caller.admin)
        self.csrf = _csrf(session.key, session.mac)
        self.session = session
        # Which key the page was drawn for (a tag signed from its digest: a key id may be beyond
        # latin-1, no header value): a stale page is handed this session's token only when it is that key's.
        self.key_tag = hmac.new(
            _signing_key(session.key.digest), b"mlchat-desk-key-tag", hashlib.sha256
        ).hexdigest()[:16]  # signed, so a page shows nothing of the key's digest (review)


def _session_cookie(key: ApiKey, now: float | None = None) -> str:
    """The cookie of a session of this key: `<key id, base64>.<expiry>.<nonce>.<signature>`, ASCII;
    the nonce tells two sessions of one key and second apart, so signing out of one ends only it."""
    expires = int(now if now is not None else time.time()) + SESSION_S
    named = base64.urlsafe_b64encode(key.id.encode("utf-8", "surrogatepass")).decode("ascii")
    nonce = secrets.token_hex(16)
    return f"{named}.{expires}.{nonce}.{_session_mac(key.digest, key.id, expires, nonce)}"


def _session_of(value: str | None) -> _Session | None:
    """The session of a desk cookie that is its key's own and has not expired, else None (signed out
    or not: that is `signed_in`'s read)."""
    if not value or len(value) > 1024:
        return None
    named, _, rest = value.partition(".")
    expires_text, _, rest = rest.partition(".")
    nonce, _, mac = rest.partition(".")
    try:
        key_id = base64.urlsafe_b64decode(named.encode("ascii")).decode("utf-8")
        expires = int(expires_text)
    except (UnicodeError, binascii.Error, ValueError):
        return None
    if expires < time.time():
        return None
    match = None
    hashed = hashed_digests()  # once, not once a key (desk review: a forged cookie cost n² hashes)
    for key in settings.api_keys:  # every key looked at: the time does not say which one matched
        if not signs_sessions(key, hashed):
            continue
        expected = _session_mac(key.digest, key.id, expires, nonce)
        # Two keys may share a name (a rotation): the signature tells whose session it is.
        if key.id == key_id and hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode()):
            match = _Session(key, expected, expires)
    return match


def _same_site(request: Request) -> bool:
    # Browsers send Origin with every cross-site POST, so only a browser-less client (curl, a
    # script, which no other site can drive) posts without one. "null" (a sandboxed or privacy
    # redirected form) is refused. Hosts are compared, not schemes: behind a TLS proxy the app may
    # see http while the browser says https.
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return bool(host) and _netloc(origin) == host.lower()


def _netloc(url: str) -> str | None:
    """The URL's host and port, lower-cased; None for one that cannot be read (`http://[`)."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return None


def _path(url: str) -> str:
    """The URL's path; '' for one that cannot be read."""
    try:
        return urlsplit(url).path
    except ValueError:
        return ""


def _cookies_named(request: Request, name: str) -> int:
    """How many cookies of this name the request carries (its parsed cookies keep one)."""
    pairs = (
        pair.partition("=")[0].strip()
        for value in request.headers.getlist("cookie")
        for pair in value.split(";")
    )
    return sum(1 for each in pairs if each == name)


def signed_in(request: Request) -> Desk:
    """A dependency: the writer whose session the cookie holds (review or admin scope)."""
    name, _ = _cookie_of(request)
    if _cookies_named(request, name) > 1:
        # A site beside this one (a sibling subdomain) can set a cookie of this name for the parent
        # domain, and the parser keeps the last: its session (another tenant's key) would be the
        # writer's, its approvals landing there (desk security review).
        raise DeskError(
            400,
            f"cookie: two {name} cookies came with this page; another site under this domain set "
            "one. Clear this site's cookies and sign in again",
        )
    session = _session_of(request.cookies.get(name))
    if session is None or not ({"review", "admin"} & set(session.key.scopes)):
        raise NotSignedIn
    if desk.signed_out(session.mac):
        raise NotSignedIn
    return Desk(caller_of(session.key), session)


async def posted(request: Request, desk_: Annotated[Desk, Depends(signed_in)]) -> Desk:
    """A dependency of every change: the form token must be this writer's."""
    if not _same_site(request):  # a sibling site SameSite lets through, holding a token it read
        raise DeskError(403, "origin: changes are made from the desk's own pages; reload the page")
    form = await request.form()
    token = request.headers.get("x-csrf-token") or str(form.get("csrf") or "")
    # surrogatepass: a form decoded with the charset the request names can hold a lone surrogate
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), desk_.csrf.encode()):
        if hmac.compare_digest(request.headers.get("x-desk-key", "").encode(), desk_.key_tag.encode()):
            raise StaleForm(desk_.csrf)  # this key's page, of an earlier session of this browser
        # Another key's page (a writer signed out and another signed in on a shared machine), or a
        # form from elsewhere: nothing handed over (review: the page of one writer took the next's
        # token and saved its edit as theirs).
        raise DeskError(403, "csrf: this form is stale or came from another site; reload the page")
    return desk_


class StaleForm(DeskError):
    """A change from a page drawn for another session of this browser (signed in again in another
    tab after the session ended): refused, and an open page is handed this session's form token so
    its writer sends the change again without reloading, what they typed kept. Only a request that
    passed the same-site check and carries this session's cookie gets it, and only the page's own
    script, same-origin, can read it."""

    def __init__(self, token: str) -> None:
        super().__init__(
            403, "csrf: this form was drawn for an earlier session; send it again (or reload the page)"
        )
        self.token = token


Signed = Annotated[Desk, Depends(signed_in)]
Posted = Annotated[Desk, Depends(posted)]


def _page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    # Players' lines and the form token: kept by no cache, nor shown again from history after signing out.
    response.headers["Cache-Control"] = "no-store"
    # Never inside another page's frame (desk review: a same-site page, a sibling subdomain's, could
    # frame it under SameSite=Strict and have a writer click "Approve").
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
    return response


def install(app: Any) -> None:
    """Mount the desk: its routes, its assets, and its two refusals (login form, message page)."""
    app.include_router(router)
    app.include_router(api_router)
    app.mount("/desk/static", static_files(), name="desk-static")

    @app.exception_handler(NotSignedIn)
    async def _to_login(request: Request, exc: NotSignedIn) -> Response:
        if request.headers.get("hx-request"):
            # Told in the page's message bar, the page kept: sent to the login form, a writer lost
            # the edit being typed, even to a background refresh (review, stop 75). A refresh is
            # answered with htmx's "stop polling" (286): told once, not every 2 s.
            change = request.method != "GET"
            message = SESSION_ENDED if change else REFRESH_ENDED
            response = _page(request, "_message.html", 401 if change else 286, message=message)
            response.headers.update({"HX-Retarget": "#message", "HX-Reswap": "innerHTML"})
            return response
        return RedirectResponse("/desk/login", status_code=303)

    @app.exception_handler(DeskError)
    async def _refused(request: Request, exc: DeskError) -> Response:
        if request.headers.get("hx-request"):  # shown in the page's message bar, the page kept
            response = _page(request, "_message.html", exc.status, message=exc.message)
            response.headers.update({"HX-Retarget": "#message", "HX-Reswap": "innerHTML"})
            if isinstance(exc, StaleForm):  # desk.js puts it in the page's forms
                response.headers["X-Desk-Token"] = exc.token
            return response
        return _page(request, "error.html", exc.status, message=exc.message, desk=None)


# --- signing in -----------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def home() -> Response:
    """The desk's entry: the runs list (or the login form)."""
    return RedirectResponse("/desk/runs", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    """The login form: an API key with the review (or admin) scope."""
    return _page(request, "login.html", message=None, desk=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, key: Annotated[str, Form()] = "") -> Response:
    """Check the key and keep it in the desk cookie (a form posted from another site is refused)."""
    if not _same_site(request):
        message = "origin: this sign-in form was posted from another site; open the desk's own page"
        return _page(request, "login.html", 403, message=message, desk=None)
    key = key.strip()
    if not key:
        return _page(request, "login.html", 400, message="key: enter your API key", desk=None)
    configured = configured_key(key) if len(key) <= KEY_MAX_CHARS else None
    if configured is None:
        return _page(request, "login.html", 401, message="key: not a valid API key", desk=None)
    if not ({"review", "admin"} & set(configured.scopes)):
        message = "key: this API key lacks the 'review' scope the desk needs"
        return _page(request, "login.html", 403, message=message, desk=None)
    if not signs_sessions(configured):
        message = (
            "key: this key is configured by its sha256, and MLCHAT_DESK_SECRET is unset: the desk "
            "cannot sign its sessions safely (ask the operator to set MLCHAT_DESK_SECRET)"
        )
        return _page(request, "login.html", 403, message=message, desk=None)
    response = RedirectResponse("/desk/runs", status_code=303)
    name, path = _cookie_of(request)
    response.set_cookie(
        name,
        _session_cookie(configured),
        max_age=SESSION_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=path,
    )
    return response


@router.post("/logout")
def logout(request: Request, desk_: Posted) -> Response:
    """End the session: the cookie is deleted, and a copy of it left anywhere is refused."""
    desk.sign_out(desk_.session.mac, desk_.session.expires)
    response = RedirectResponse("/desk/login", status_code=303)
    name, path = _cookie_of(request)
    https = request.url.scheme == "https"
    response.delete_cookie(name, path=path, secure=https, httponly=True, samesite="strict")
    return response


# --- reading --------------------------------------------------------------------------------------


@router.get("/runs", response_class=HTMLResponse)
async def runs(
    request: Request, desk_: Signed, older_than: str | None = None, newer_than: str | None = None
) -> Response:
    """Runs and batches with status, counts, progress and the gate's flags, a page at a time, newest
    first; live rows refresh."""
    older = desk.RunsAt.parse("older_than", older_than) if older_than is not None else None
    newer = desk.RunsAt.parse("newer_than", newer_than) if newer_than is not None else None
    listed = await run_in_threadpool(desk.list_runs, desk_.who, older, newer)
    return _page(
        request,
        "runs.html",
        desk=desk_,
        runs=listed.rows,
        newer_page=f"/desk/runs?newer_than={listed.newer_than.token()}" if listed.newer_than else None,
        older_page=f"/desk/runs?older_than={listed.older_than.token()}" if listed.older_than else None,
    )


@router.get("/runs/{run_id}/row", response_class=HTMLResponse)
async def run_row(request: Request, run_id: str, desk_: Signed) -> Response:
    """One run's row of the list alone: htmx polls it while the run is live, and only then."""
    row = await run_in_threadpool(desk.run_summary, desk_.who, desk.object_id("run", run_id))
    return _page(request, "_run_row.html", desk=desk_, r=row)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run(
    request: Request,
    run_id: str,
    desk_: Signed,
    character: str | None = None,
    check: str | None = None,
    bar: str | None = None,
    text: str | None = None,
    label: str | None = None,
    after: str | None = None,
    scenes_after: str | None = None,
) -> Response:
    """A run's lines, filtered by character, gate check, bar, label and text, and its scenes: a
    page of each (the lines' next page starts after the last line shown)."""
    filters = desk.line_filter(character, check, bar, text, label)
    cursor = desk.whole_number("after", after or "0", low=0, high=2**63 - 1)
    scenes_at = (
        desk.whole_number("scenes_after", scenes_after, low=1, high=2**63 - 1)
        if scenes_after is not None
        else None
    )
    view = await run_in_threadpool(
        desk.run_page, desk_.who, desk.object_id("run", run_id), filters, cursor, scenes_at
    )

    def link(**changed: int) -> str:
        query = {**request.query_params, **{k: str(v) for k, v in changed.items()}}
        return f"/desk/runs/{view.run.id}?{urlencode(query)}"

    next_page = link(after=view.lines[-1].turn.number) if view.more else None
    next_scenes = link(scenes_after=view.scenes[-1].id) if view.more_scenes else None
    return _page(
        request,
        "run.html",
        desk=desk_,
        view=view,
        checks=desk.CHECKS,
        next_page=next_page,
        next_scenes=next_scenes,
    )


@router.get("/runs/{run_id}/summary", response_class=HTMLResponse)
async def run_summary(request: Request, run_id: str, desk_: Signed) -> Response:
    """The run's live header alone (htmx polls it while the run is answered)."""
    row = await run_in_threadpool(desk.run_summary, desk_.who, desk.object_id("run", run_id))
    return _page(request, "_run_summary.html", desk=desk_, run=row)


@router.get("/scenes/{scene_id}", response_class=HTMLResponse)
async def scene(request: Request, scene_id: str, desk_: Signed) -> Response:
    """A run's scene: its transcript in step order, each step's line with the run page's controls."""
    view = await run_in_threadpool(desk.scene_page, desk_.who, desk.scene_id(scene_id))
    return _page(request, "scene.html", desk=desk_, view=view)


@router.get("/lines/{turn_id}", response_class=HTMLResponse)
async def line(request: Request, turn_id: str, desk_: Signed) -> Response:
    """One line: the message, the kept reply, every candidate, the verdict, mood and history."""
    view = await run_in_threadpool(desk.line_page, desk_.who, desk.object_id("line", turn_id))
    saved = request.query_params.get("saved")
    return _page(request, "line.html", desk=desk_, view=view, saved=saved if saved in SAVED else None)


@router.get("/lines/{turn_id}/prompt", response_class=HTMLResponse)
async def prompt(request: Request, turn_id: str, desk_: Signed) -> Response:
    """The turn's prompt and context manifest, readable (admin keys)."""
    turn, manifest = await run_in_threadpool(desk.manifest, desk_.who, desk.object_id("line", turn_id))
    return _page(request, "prompt.html", desk=desk_, turn=turn, manifest=manifest)


# --- changes --------------------------------------------------------------------------------------


async def _changed(request: Request, desk_: Desk, turn_id: uuid.UUID, what: str) -> Response:
    """After a change: htmx swaps the line in place (on a run's page); a plain form, or one sent from
    the line's own page, whose change history and original reply would otherwise stay as they were,
    goes to the line's page."""
    if request.headers.get("hx-request"):
        if _path(request.headers.get("hx-current-url", "")).endswith(f"/desk/lines/{turn_id}"):
            return Response(headers={"HX-Redirect": f"/desk/lines/{turn_id}?saved={what}"})
        view = await run_in_threadpool(desk.line_page, desk_.who, turn_id)
        return _page(request, "_line.html", desk=desk_, line=view.line, saved=what, compact=True)
    return RedirectResponse(f"/desk/lines/{turn_id}?saved={what}", status_code=303)


@router.post("/lines/{turn_id}/pick")
async def pick(
    request: Request,
    turn_id: str,
    desk_: Posted,
    candidate: Annotated[str | None, Form()] = None,
    version: Annotated[str | None, Form()] = None,
) -> Response:
    """Keep another candidate."""
    tid = desk.object_id("line", turn_id)
    await run_in_threadpool(desk.pick, desk_.who, tid, candidate, version)
    return await _changed(request, desk_, tid, "picked")


@router.post("/lines/{turn_id}/edit")
async def edit(
    request: Request,
    turn_id: str,
    desk_: Posted,
    reply: Annotated[str | None, Form()] = None,
    version: Annotated[str | None, Form()] = None,
) -> Response:
    """Replace the kept reply with the writer's text."""
    tid = desk.object_id("line", turn_id)
    await run_in_threadpool(desk.edit, desk_.who, tid, reply, version)
    return await _changed(request, desk_, tid, "edited")


@router.post("/lines/{turn_id}/label")
async def label(
    request: Request,
    turn_id: str,
    desk_: Posted,
    verdict: Annotated[str, Form()] = "",
    reason: Annotated[str | None, Form()] = None,
    version: Annotated[str | None, Form()] = None,
) -> Response:
    """Approve the kept reply, reject it with a reason, or clear the verdict."""
    tid = desk.object_id("line", turn_id)
    await run_in_threadpool(desk.label, desk_.who, tid, verdict, reason, version)
    said = {"approve": "approved", "reject": "rejected"}.get(verdict, "verdict cleared")
    return await _changed(request, desk_, tid, said)


# --- the record, for programs ---------------------------------------------------------------------


@api_router.get("/{turn_id}/review")
def get_review(turn_id: uuid.UUID, who: Annotated[Caller, Depends(needs("review"))]) -> Any:
    """The desk's record of a line: label, reason, the original text and every change."""
    try:
        return desk.review_record(Reviewer(who.key_id, who.tenant, who.admin), turn_id)
    except DeskError as exc:
        raise HTTPException(exc.status, exc.message) from None
