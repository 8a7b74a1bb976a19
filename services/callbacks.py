"""Completion callbacks: the batch object POSTed to the batch's callback URL (or a turn to its own,
POST /v1/turns `callback_url`), signed with HMAC-SHA256.

The `X-Mlchat-Signature` header is `t=<unix time>,v1=<hex digest>,v2=<hex digest>`, v1 being
HMAC-SHA256(<the tenant's secret>, "<t>.<raw body>") and v2 the same over "<t>.<delivery>.<raw
body>", the delivery being the `X-Mlchat-Delivery` header a receiver drops repeats by (v1 alone left
it unsigned: a captured request replayed with another delivery id passed as new, or made the
receiver drop a real one as a repeat). A receiver recomputes it over the raw body
(`verify_signature` does exactly that, v2 when given the delivery) and refuses an old `t`, so a
captured request cannot be replayed later. Each tenant's callbacks are signed with a secret of its
own (`tenant_secret`), so a tenant that checks its callbacks cannot sign another's. Retries with
backoff are the Celery task's (tasks/callbacks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, cast
from urllib.parse import quote, urlparse

import anyio
import httpx

from core.settings import DEFAULT_TENANT, settings
from db.callbacks import Owner, record_attempt
from db.models import RUN_FINISHED, Run
from db.session import session_scope

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Mlchat-Signature"


Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 ranges that carry an IPv4 address in their last 32 bits (NAT64's well-known prefix, the
# deprecated IPv4-compatible form): the packet ends up at that IPv4 address, so it is what counts.
_LAST_32_BITS_IPV4 = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
)
# Not public whatever the interpreter says: Pythons without the fix of CVE-2024-4032 take most of
# 192.0.0.0/24 (IETF protocol assignments, a cloud's metadata address among them) for global, and
# multicast and the reserved 240/4 are no receiver's.
_NEVER_PUBLIC_IPV4 = tuple(
    ipaddress.ip_network(net) for net in ("192.0.0.0/24", "224.0.0.0/4", "240.0.0.0/4")
)
# RFC 8215's local-use NAT64 prefix translates into the site's own network, whatever it embeds.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
# IPv6 the interpreter takes for global that no receiver is at: the deprecated site-local block
# (still routed inside some sites) and multicast.
_NEVER_PUBLIC_IPV6 = tuple(ipaddress.ip_network(net) for net in ("fec0::/10", "ff00::/8"))


class CallbackFailed(RuntimeError):
    """The receiver did not answer 2xx (or could not be reached); the delivery is retried."""


class RefusedDestination(ValueError):
    """A callback URL whose host has no address, or one the workers may not call."""


class ResolverUnavailable(RefusedDestination):
    """The resolver could not answer for now (EAI_AGAIN, or this process's OSError): at acceptance a
    503 when no host of the request answered, else accepted without a verdict; retried at delivery."""


class Unresolved(RefusedDestination):
    """The host has no address (NXDOMAIN and the like): refused at acceptance; at delivery, of a host
    that resolved to a public address when the turn was accepted, most likely passing: retried."""


class ResolvesInside(RefusedDestination):
    """The host resolves to an address the workers may not call: refused at acceptance; at delivery,
    of a host that resolved to a public one when the turn was accepted, retried (never posted to):
    a resolver answering 0.0.0.0 or loopback for a name it blocks or cannot look up, or a move of the
    host's DNS, ended the callback for good (streaming review)."""


def resolve(host: str) -> list[Address]:
    """The addresses `host` resolves to, in the resolver's order: the one DNS lookup of a delivery."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def url_host(url: str) -> str:
    """The host of `url`, parsed as the delivery parses it (no lookup). Raises RefusedDestination."""
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 (a port that is not a number raises here, not at the POST)
        target = httpx.URL(url)  # what the delivery parses: a URL only it refuses would fail every retry
    except (ValueError, httpx.InvalidURL) as exc:
        raise RefusedDestination(f"is not a valid URL ({exc})") from None
    if not parsed.hostname:
        raise RefusedDestination("has no host")
    # The name the POST's Host header and TLS name carry (IDNA 2008, httpx's): the resolver, given
    # the Unicode name, encodes it by IDNA 2003, another domain for some (`faß.de` is `fass.de`
    # there, `xn--fa-hia.de` here), whose owner then got the callback (review).
    return target.raw_host.decode("ascii")


def vetted_address(url: str) -> Address:
    """The first of vetted_addresses(url)."""
    return vetted_addresses(url)[0]


def vetted_addresses(url: str) -> list[Address]:
    """The addresses to connect to for `url`, in the resolver's order: every address its host
    resolves to must be public (not loopback, private, link-local or reserved) unless
    MLCHAT_CALLBACK_ALLOW_PRIVATE is set, so an API key cannot make the workers call into the
    network they run in. Raises RefusedDestination."""
    host = url_host(url)
    try:
        addresses = resolve(host)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise ResolverUnavailable(f"host {host!r} could not be resolved for now ({exc})") from None
        raise Unresolved(_NOT_PUBLIC.format(host=host)) from None
    except OSError as exc:  # this process's trouble (out of file descriptors, say), not the host's
        raise ResolverUnavailable(f"host {host!r} could not be resolved for now ({exc})") from None
    except ValueError:
        raise RefusedDestination(_NOT_PUBLIC.format(host=host)) from None
    if not addresses:
        raise Unresolved(_NOT_PUBLIC.format(host=host))
    if not settings.callback_allow_private:
        for address in addresses:
            if not is_public(address):
                logger.info("callback host %r refused: it resolves to %s", host, address)
                if _literal(host):  # an address, not a name: no lookup will move it (review)
                    raise RefusedDestination(_NOT_PUBLIC.format(host=host))
                raise ResolvesInside(_NOT_PUBLIC.format(host=host))
    return addresses


def _literal(host: str) -> bool:
    """Whether `host` is an address, in any form the resolver reads as one (`127.1`, `2130706433`)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.inet_aton(host)
        except OSError:
            return False
    return True


# One answer whether a host resolves to nothing or to an address inside: the address, or telling
# the two apart, would map the network the workers run in for any tenant that asks (names, then
# addresses), refused at no cost. The operator's log has the address.
_NOT_PUBLIC = "host {host!r} does not resolve to a public address"


def is_public(address: Address) -> bool:
    """Whether `address` is public, and so is every IPv4 address an IPv6 one carries (IPv4-mapped,
    IPv4-compatible, NAT64, 6to4, Teredo's server and client): each reaches that IPv4 host."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return _public_ipv4(address)
    if address in _LOCAL_NAT64 or any(address in net for net in _NEVER_PUBLIC_IPV6):
        return False
    carried = [a for a in (address.ipv4_mapped, address.sixtofour, *(address.teredo or ())) if a]
    if any(address in net for net in _LAST_32_BITS_IPV4):
        carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(_public_ipv4(ipv4) for ipv4 in carried)


def _public_ipv4(address: ipaddress.IPv4Address) -> bool:
    return address.is_global and not any(address in net for net in _NEVER_PUBLIC_IPV4)


def refused_destination(url: str) -> str | None:
    """Why a callback may not go to `url` (see vetted_address), or None."""
    try:
        vetted_address(url)
    except RefusedDestination as exc:
        return str(exc)
    return None


def post_pinned(
    url: str,
    address: Address,
    *,
    content: bytes,
    headers: dict[str, str],
    timeout: float,
    connect_s: float | None = None,
) -> int:
    """POST to `url` over a connection to `address`, never to a second lookup of its host (which
    DNS rebinding could point at loopback); the answer's status code. The URL's host stays the Host
    header and, over https, the TLS server name: SNI and the certificate check are the host's, not
    the address's.

    The whole exchange has `timeout` s (TimeoutError past it), and the answer's body is never read:
    the receiver is the tenant's to choose, and one that trickles its headers a byte at a time or
    sends a body without end held a worker thread (httpx's timeout is per read) for as long as it
    liked. `connect_s`: at most this long to connect (the rest of `timeout` for the answer)."""
    return anyio.run(partial(_post_pinned, url, address, content, headers, timeout, connect_s))


async def _post_pinned(
    url: str,
    address: Address,
    content: bytes,
    headers: dict[str, str],
    timeout: float,
    connect_s: float | None,
) -> int:
    target = httpx.URL(url)
    extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else {}
    status: int | None = None
    try:
        with anyio.fail_after(timeout):
            async with (
                httpx.AsyncClient(
                    timeout=httpx.Timeout(timeout, connect=min(connect_s or timeout, timeout)),
                    follow_redirects=False,
                ) as client,
                client.stream(
                    "POST",
                    target.copy_with(host=str(address)),
                    content=content,
                    headers={**headers, "host": target.netloc.decode("ascii")},
                    extensions=extensions,
                ) as response,
            ):
                status = response.status_code
    except TimeoutError:
        if status is None:  # past the deadline while closing, the answer is still the answer
            raise
    assert status is not None
    return status


def tenant_secret(tenant: str) -> str:
    """The secret that signs `tenant`'s callbacks: HMAC-SHA256(MLCHAT_CALLBACK_SECRET, "mlchat callbacks
    of <tenant>") in hex (the default tenant, the CLI's and the Python API's, is the empty name, which
    no key's tenant can be). The operator keeps one secret, which signs nothing itself; a tenant learns
    its own (GET /v1/callbacks/secret, `mlchat callbacks secret`), which checks its callbacks and no
    other's."""
    assert settings.callback_secret is not None, "callbacks are accepted only with a secret"
    return _derived(settings.callback_secret.get_secret_value(), tenant)


def previous_tenant_secret(tenant: str) -> str | None:
    """`tenant`'s secret under MLCHAT_CALLBACK_SECRET_PREVIOUS, the one being retired (None: unset)."""
    previous = settings.callback_secret_previous
    return None if previous is None else _derived(previous.get_secret_value(), tenant)


def _derived(master: str, tenant: str) -> str:
    return hmac.new(master.encode(), f"mlchat callbacks of {tenant}".encode(), hashlib.sha256).hexdigest()


def signing_secrets(tenant: str) -> list[str]:
    """The secrets `tenant`'s callbacks are signed with: its own, and while a rotation lasts the one
    being retired (review: a leaked secret could only be replaced for every receiver at once)."""
    return [tenant_secret(tenant), *filter(None, [previous_tenant_secret(tenant)])]


def sign(body: bytes, secrets: str | list[str], timestamp: int, delivery: str | None = None) -> str:
    """`t=<timestamp>,v1=…[,v2=…]`, a v1 (and v2) for each secret, the current one first."""
    header = f"t={timestamp}"
    for secret in [secrets] if isinstance(secrets, str) else secrets:
        header += f",v1={_digest(secret, f'{timestamp}.', body)}"
        if delivery is not None:
            assert "." not in delivery, "a delivery id holds no '.': it ends at the first one"
            header += f",v2={_digest(secret, f'{timestamp}.{delivery}.', body)}"
    return header


def _digest(secret: str, prefix: str, body: bytes) -> str:
    return hmac.new(secret.encode(), prefix.encode() + body, hashlib.sha256).hexdigest()


def verify_signature(
    header: str, body: bytes, secret: str, *, delivery: str | None = None, tolerance_s: int = 300
) -> bool:
    """Whether `header` signs `body` with `secret`, made within `tolerance_s` of now; with `delivery`
    (the request's `X-Mlchat-Delivery`), whether its v2 signs that delivery id too. Any of the
    header's v1 (v2) values may match: during a rotation it carries one for each secret."""
    try:
        parts = [item.split("=", 1) for item in header.split(",")]
        found: dict[str, list[str]] = {}
        for name, value in parts:
            found.setdefault(name, []).append(value)
        (stamp,) = found["t"]
        timestamp = int(stamp)
    except (KeyError, ValueError):
        return False
    if abs(int(time.time()) - timestamp) > tolerance_s:  # as ints: a forged 400-digit t overflows a float
        return False
    if delivery is None:
        expected, given = _digest(secret, f"{timestamp}.", body), found.get("v1", [])
    elif "." in delivery:  # none is sent: one would move the body's head into the signed delivery id
        return False
    else:
        expected, given = _digest(secret, f"{timestamp}.{delivery}.", body), found.get("v2", [])
    # As bytes: compare_digest refuses a str with a character beyond ASCII (TypeError), a forged header's.
    # Every value compared, so the time taken says nothing of which one matched.
    matched = [hmac.compare_digest(expected.encode(), g.encode("utf-8", "surrogatepass")) for g in given]
    return any(matched)


def deliver(run_id: uuid.UUID) -> bool:
    """POST the batch object once; True when delivered (or nothing to deliver), False when its
    destination is refused (not retried), CallbackFailed when the receiver failed (retried)."""
    from services.batches import batch_object

    with session_scope() as session:
        run = session.get(Run, run_id)
        if run is None or not run.callback_url or run.callback_delivered_at is not None:
            return True
        if run.status not in RUN_FINISHED:  # a call that raced the end: the end sends its own
            return True
        url, body = run.callback_url, json.dumps(batch_object(session, run)).encode()
        tenant, name = run.tenant, run.name
    # The delivery id is the body's `id` (a batch's `batch_<hex>`), the name a receiver knows it by;
    # percent-encoded, as a header carries ASCII only (a CLI run's name may be Korean).
    delivery = quote(name, safe="").replace(".", "%2E")  # no '.': v2 signs "t.delivery.body"
    return send_once(url, body, tenant=tenant, delivery=delivery, record=recorder(Run, run_id))


def recorder(of: Owner, row_id: uuid.UUID) -> Callable[[str | None, bool], None]:
    """What send_once records each try of a run's (`of` Run) or a turn's callback with."""

    def record(error: str | None, again: bool) -> None:
        with session_scope() as session:
            record_attempt(
                session=session,
                of=of,
                row_id=row_id,
                error=error,
                again=again,
                burst=settings.callback_max_attempts,
            )

    return record


def send_once(
    url: str, body: bytes, *, tenant: str, delivery: str, record: Callable[[str | None, bool], None]
) -> bool:
    """Check `url` again (the name may resolve elsewhere by now), POST `body` signed to the address
    checked, and `record` the outcome (None: delivered; and whether it may be tried again); True when
    delivered, False when the destination is refused now (not retried), CallbackFailed when the
    receiver failed (retried)."""
    if settings.callback_secret is None:  # the API that took the URL has one: a deployment's slip
        unsigned = "not sent: this process has no MLCHAT_CALLBACK_SECRET to sign it with"
        record(unsigned, True)
        raise CallbackFailed(unsigned)
    deadline = time.monotonic() + settings.callback_timeout_s  # the lookup and the POST, together
    try:
        addresses = _vetted_in_time(url, settings.callback_timeout_s, tenant)
    except (ResolverUnavailable, Unresolved, ResolvesInside) as unavailable:  # vetted before: passing
        record(f"not sent: {unavailable}", True)
        raise CallbackFailed(str(unavailable)) from None
    except RefusedDestination as refused:
        record(f"not sent: {refused}", False)
        return False
    left = max(deadline - time.monotonic(), _POST_AT_LEAST_S)
    secrets = signing_secrets(tenant)
    error = post_signed(url, addresses, body, secret=secrets, delivery=delivery, timeout=left)
    if error == GONE:  # the receiver's word that the URL is gone for good: about 30 tries spared it
        record(f"{error}: the receiver says this URL is gone; not tried again", False)
        return False
    record(error, True)
    if error is not None:
        raise CallbackFailed(error)
    return True


# A lookup at delivery that outlives its time is an outage of the resolver, not the host's verdict:
# the thread it holds is left to finish (getaddrinfo cannot be stopped), the delivery slot is not.
_POST_AT_LEAST_S = 1.0  # a lookup that took nearly the whole timeout still leaves the POST this


def _vetted_in_time(url: str, timeout: float, tenant: str) -> list[Address]:
    """vetted_addresses(url), or ResolverUnavailable once `timeout` s have passed (MLCHAT_CALLBACK_TIMEOUT_S
    bounds one delivery in all: a resolver that stopped answering held a delivery slot for its own
    timeouts, up to half a minute a try), or at once while `tenant`'s lookups left blocked hold its
    share of the pool (retried, as any lookup that did not answer)."""
    deadline = time.monotonic() + timeout
    if _DELIVERY_SHARES.hold(tenant, 1, wait_s=timeout, left_at_least_s=min(timeout / 2, 1.0)) == 0:
        raise ResolverUnavailable(f"host {url_host(url)!r}: this tenant's earlier lookups still hang")
    future = _DELIVERY_SHARES.submit(tenant, vetted_addresses, url)
    try:
        return cast(list[Address], future.result(timeout=max(deadline - time.monotonic(), 0.0)))
    except TimeoutError:  # concurrent.futures' own, the builtin since Python 3.11
        _DELIVERY_SHARES.cancel(future, tenant)
        raise ResolverUnavailable(
            f"host {url_host(url)!r} could not be resolved within MLCHAT_CALLBACK_TIMEOUT_S ({timeout:g} s)"
        ) from None


GONE = "HTTP 410"  # a receiver's way to say "stop": the callback is not tried again


def post_signed(
    url: str,
    address: Address | list[Address],
    body: bytes,
    *,
    secret: str | list[str],
    delivery: str,
    timeout: float | None = None,
) -> str | None:
    """POST `body` signed with `secret` to `url` once, over a connection to its vetted `address`
    (of several, the next tried when one cannot be connected to, as curl and browsers do: an IPv6
    path blocked, one host of several down; review), within `timeout` s in all
    (MLCHAT_CALLBACK_TIMEOUT_S when not given); None when the receiver answered 2xx, else why not."""
    timeout = settings.callback_timeout_s if timeout is None else timeout
    deadline = time.monotonic() + timeout
    headers = {
        "content-type": "application/json",
        SIGNATURE_HEADER: sign(body, secret, int(time.time()), delivery),
        "X-Mlchat-Delivery": delivery,
    }
    addresses = address if isinstance(address, list) else [address]
    error, tried = "no address", 0
    for i, each in enumerate(addresses):
        left = deadline - time.monotonic() if i else timeout
        if left <= 0:
            break
        # Of several, each but the last connects within its share of what is left (at least a second):
        # a blackholed one (an IPv6 path filtered, a host down) leaves the others their time (review).
        share = max(left / (len(addresses) - i), 1.0) if i < len(addresses) - 1 else None
        tried += 1
        try:
            status = post_pinned(url, each, content=body, headers=headers, timeout=left, connect_s=share)
            return None if 200 <= status < 300 else f"HTTP {status}"
        except TimeoutError:
            return f"no answer within MLCHAT_CALLBACK_TIMEOUT_S ({settings.callback_timeout_s:g} s in all)"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing sent: the next may take it
            error = f"{type(exc).__name__}: {exc}"[:300]
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
    if len(addresses) == 1:
        return error
    return f"{error} ({tried} of {len(addresses)} addresses tried within MLCHAT_CALLBACK_TIMEOUT_S)"


def callback_refusal(url: str, *, resolve: bool = True) -> str | None:
    """Why a callback URL given with a request is not accepted, or None (the batches' rules); without
    `resolve`, only what can be told without a DNS lookup (see callback_destinations)."""
    try:
        parsed = urlparse(url)
    except ValueError:  # an unclosed IPv6 bracket
        return f"{url[:80]!r} is not a valid URL"
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return f"{url[:80]!r} is not an http(s) URL"
    if settings.callback_secret is None:
        return "set MLCHAT_CALLBACK_SECRET so callbacks can be signed"
    if not resolve:
        try:
            url_host(url)
        except RefusedDestination as exc:
            return str(exc)
        return None
    return refused_destination(url)


# All the lookups of one request together: a resolver that does not answer in this time is an
# outage (503, nothing stored), not a refusal of the client's URL.
RESOLVE_BUDGET_S = 10.0
# Lookups at once, for all the process's requests together: a pool per request left a thread behind
# for every lookup a slow resolver held (each up to its own timeout), one more per request; and at
# most RESOLVE_PER_REQUEST of them for one tenant.
RESOLVE_THREADS = 16
RESOLVE_PER_REQUEST = 4


class ResolverTooSlow(RuntimeError):
    """The lookups of a request's callback hosts did not all answer within RESOLVE_BUDGET_S, or the
    resolver said to try again (EAI_AGAIN) for every one of them: try the request again later."""


class TenantShares:
    """A pool of `threads` lookup threads all tenants share, and the threads each tenant holds,
    counted until each lookup ends (one its caller gave up on stays blocked in the resolver, counted
    still): a tenant's hosts that never answer hold its own share of the pool alone, and other
    tenants' lookups go on."""

    def __init__(self, threads: int, per_tenant: int, name: str) -> None:
        self.per_tenant = per_tenant
        self._held: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._freed = threading.Condition()
        self._make_pool = partial(ThreadPoolExecutor, max_workers=threads, thread_name_prefix=name)
        self._pool: ThreadPoolExecutor | None = None  # made at the first lookup
        # A forked child (a game server's multiprocessing, gunicorn's preload) has the parent's pool
        # without its threads: a lookup it queued was never run, and the call waited out its 10 s
        # and failed (review). The child starts afresh.
        os.register_at_fork(after_in_child=self._start_afresh)

    def _start_afresh(self) -> None:
        self._held = Counter()
        self._waiting = Counter()
        self._freed = threading.Condition()
        self._pool = None

    def hold(self, tenant: str, wanted: int, wait_s: float = 0.0, *, left_at_least_s: float = 0.0) -> int:
        """Up to `wanted` threads for `tenant` within its share, waiting up to `wait_s` for one to
        come free with at least `left_at_least_s` of it left for the work; how many (0: none came
        free in time). As many callers of a tenant wait as its share holds, the others get 0 at
        once: a caller waits on a thread of the API's or a worker's that every tenant needs."""
        deadline = time.monotonic() + wait_s
        with self._freed:
            if self._held[tenant] >= self.per_tenant and self._waiting[tenant] >= self.per_tenant:
                return 0
            self._waiting[tenant] += 1
            try:
                while (granted := min(wanted, self.per_tenant - self._held[tenant])) <= 0:
                    if (left := deadline - time.monotonic()) <= 0:
                        return 0
                    self._freed.wait(left)
            finally:
                self._waiting[tenant] -= 1
                if self._waiting[tenant] <= 0:
                    del self._waiting[tenant]
            if wait_s and deadline - time.monotonic() < left_at_least_s:
                self._freed.notify_all()  # not taken: another waiter may have time for it
                return 0
            self._held[tenant] += granted
            return granted

    def submit(self, tenant: str, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """fn(*args) on the pool, in a thread `tenant` holds, given back when it ends (here, when it
        cannot be submitted)."""

        def run() -> Any:
            try:
                return fn(*args)
            finally:
                self.let_go(tenant)

        with self._freed:
            if self._pool is None:
                self._pool = self._make_pool()
            pool = self._pool
        try:
            return pool.submit(run)
        except BaseException:
            self.let_go(tenant)
            raise

    def cancel(self, future: Future[Any], tenant: str) -> None:
        """Cancel `future` if it has not started, giving its thread back (one that started gives it
        back as it ends)."""
        if future.cancel():
            self.let_go(tenant)

    def let_go(self, tenant: str) -> None:
        with self._freed:
            self._held[tenant] -= 1
            if self._held[tenant] <= 0:
                del self._held[tenant]
            self._freed.notify_all()

    def held(self, tenant: str) -> int:
        with self._freed:
            return self._held[tenant]


_ACCEPTANCE_SHARES = TenantShares(RESOLVE_THREADS, RESOLVE_PER_REQUEST, "callback-resolve")
_DELIVERY_SHARES = TenantShares(8, 2, "callback-deliver-resolve")  # a worker's delivery lookups


def callback_destinations(urls: dict[int, str], tenant: str = DEFAULT_TENANT) -> dict[int, str]:
    """Why each of these callback URLs ({index: url}) is refused, by index (absent: accepted); each
    distinct host looked up once, a few at a time, off the API's event loop (the caller's thread).
    Raises ResolverTooSlow when the resolver cannot answer for now: out of time, or no host answered,
    or `tenant`'s earlier lookups still hold its share of the resolver's threads; a host it gave no
    verdict on while others answered is accepted (its delivery vets it)."""
    if not urls:
        return {}
    refused: dict[int, str] = {}
    by_host: dict[str, list[int]] = {}
    for i, url in urls.items():
        try:
            by_host.setdefault(url_host(url), []).append(i)
        except RefusedDestination as bad_url:
            refused[i] = str(bad_url)
    if not by_host:
        return refused
    hosts = list(by_host)
    outcome: dict[str, BaseException | None] = {}  # each host's verdict: None, or why not
    over = threading.Event()

    def resolve(group: list[str]) -> None:
        for host in group:
            if over.is_set():  # the request gave up: the pool's thread goes back to the others
                return
            try:  # the host decides: each is looked up once, through the first URL that names it
                vetted_address(urls[by_host[host][0]])
                outcome[host] = None
            except Exception as exc:
                outcome[host] = exc

    # At most RESOLVE_PER_REQUEST of the shared pool's threads for one tenant, each looking its
    # hosts up in turn: a request of a thousand slow hosts cannot queue the others' lookups behind it.
    # The tenant's own lookups under way (another request's, or ones left blocked) leave this one
    # what is free of its share; it waits for one within its budget.
    deadline = time.monotonic() + RESOLVE_BUDGET_S
    wanted = min(RESOLVE_PER_REQUEST, len(hosts))
    threads = _ACCEPTANCE_SHARES.hold(
        tenant, wanted, wait_s=RESOLVE_BUDGET_S, left_at_least_s=RESOLVE_BUDGET_S / 5
    )
    if threads == 0:
        raise ResolverTooSlow("this tenant's earlier callback hosts still hold the resolver; try again later")
    groups = [hosts[i::threads] for i in range(threads)]
    futures: list[Future[Any]] = []
    tried = 0  # submits tried: one that raised gave its thread back itself
    try:
        for group in groups:
            tried += 1
            futures.append(_ACCEPTANCE_SHARES.submit(tenant, resolve, group))
        _, pending = wait(futures, timeout=max(deadline - time.monotonic(), 0.0))
        if pending:  # out of time (lookups queued behind others, or slow): the resolver's, not a host's
            late = [host for host in hosts if host not in outcome]
            raise ResolverTooSlow(
                f"{len(late)} callback host(s) could not be resolved in {RESOLVE_BUDGET_S:.0f} s "
                f"({', '.join(repr(h) for h in late[:5])})"
            )
        unanswered: list[str] = []  # hosts the resolver gave no verdict on (EAI_AGAIN, an OSError here)
        for host in hosts:
            exc = outcome[host]
            if isinstance(exc, ResolverUnavailable):
                unanswered.append(host)
            elif isinstance(exc, RefusedDestination):
                refused.update(dict.fromkeys(by_host[host], str(exc)))
            elif exc is not None:
                raise exc
        if unanswered and len(unanswered) == len(hosts):  # the resolver is out: try again later
            raise ResolverTooSlow(
                f"the resolver could not answer for {len(unanswered)} callback host(s) for now "
                f"({', '.join(repr(h) for h in unanswered[:5])})"
            )
        # The others answered: those hosts are accepted without a verdict (a lame domain fails with
        # EAI_AGAIN every time, and would make every retry of the whole request a 503). Each delivery
        # vets its host again and connects only to an address it vetted, and retries within its window.
        return refused
    finally:
        over.set()
        for future in futures:  # still queued behind other requests' lookups: not run for nothing
            _ACCEPTANCE_SHARES.cancel(future, tenant)
        for _ in range(threads - tried):  # never submitted (a submit raised)
            _ACCEPTANCE_SHARES.let_go(tenant)
