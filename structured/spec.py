"""A turn's response format, checked before it is stored, and the guided-decoding parameters vLLM
gets for it.

Every schema is checked twice up front: it must be a valid JSON Schema (Draft 2020-12), and the
grammar backend must enforce all of it. xgrammar (vLLM's default backend) refuses some features with
an error and silently ignores others (`not`, `if`/`then`, `uniqueItems`, ...), which would make a
reply "valid" against a grammar but not against the schema. Both kinds are refused here, naming
the keyword's place in the schema, so a turn never fails at generation for its schema.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache, lru_cache, partial
from typing import Annotated, Any, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.json_shape import nesting
from core.regex_size import largest_count, looks_ahead, size_refusal
from core.settings import settings
from core.text import unstorable_in
from structured.pattern_reading import FLAGS, as_grammar_reads

# Keywords whose constraint the grammar would not enforce (the reply could break the schema), or
# that reach outside the schema. `format` is checked on its own (a few formats are enforced).
_UNENFORCED = {
    "not": "negation",
    "if": "conditional schemas",
    "then": "conditional schemas",
    "else": "conditional schemas",
    "dependentRequired": "dependent properties",
    "dependentSchemas": "dependent schemas",
    "dependencies": "dependent properties",
    "unevaluatedProperties": "unevaluated properties",
    "unevaluatedItems": "unevaluated items",
    "uniqueItems": "unique items",
    "contains": "contains",
    "minContains": "contains",
    "maxContains": "contains",
    "multipleOf": "multipleOf",
    "propertyNames": "property name schemas",
    "$dynamicRef": "dynamic references",
    "$recursiveRef": "dynamic references",
    "oneOf": "oneOf (exactly one branch)",  # the grammar takes it as anyOf: overlapping branches pass
}
# Beside $ref / anyOf / allOf, xgrammar follows the reference or branches and drops the node's own
# constraints; only these (annotations and definitions) may stand there.
_BESIDE_COMBINATOR = {"description", "title", "$comment", "default", "examples", "$defs", "definitions",
                      "$id", "$schema", "$anchor", "deprecated", "readOnly", "writeOnly"}  # fmt: skip
# Keys that vLLM's own request check (has_xgrammar_unsupported_json_features) flags wherever a dict
# holds them, values included: such a schema would fail at generation.
_VLLM_FLAGGED = {"multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "format",
                 "pattern", "propertyNames"}  # fmt: skip
_VALUE_KEYS = ("enum", "const", "default", "examples")
_FORMATS = {
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
}  # fmt: skip
# Keywords whose value is a map of names to schemas (the names are not keywords).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# Keywords whose value is a schema or a list of them (an unknown keyword's value is not one).
_SCHEMA_VALUED = frozenset(
    {"items", "prefixItems", "additionalItems", "additionalProperties", "anyOf", "allOf", "oneOf"}
    | {"not", "if", "then", "else", "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties"}
)
# Reply shapes that are not a spoken line: the quality gate's text checks do not hold them.
MAX_DEPTH = 32
# A count past this in a JSON schema's `pattern` (`[A-Za-z ]{1,200}`): the grammar builds without
# a tokenizer (the check here), but vLLM's compiler of xgrammar 0.2.8, with its cache on, fails on
# it every time, and the turn ended as an unnamed engine error after its retries. A regex
# response_format compiles through another path, which takes such counts.
MAX_SCHEMA_PATTERN_COUNT = 128
MAX_CHOICES = 256
MAX_PATTERN_CHARS = 2000


class SchemaRefused(ValueError):
    """A schema (or regex) that cannot be enforced; the message names the place at fault."""


class GrammarBusy(RuntimeError):
    """No grammar builder free for the schema in time: it may be enforceable; send it again. Not a
    ValueError, so validation passes it on instead of refusing the request for good: the API answers
    it 503 with Retry-After, a batch's submission is tried again later, the serverless handler says
    `retry`."""


MAX_BUILDS = 4  # grammar builds at once in a process, those that ran out and go on included
_BUILDS = threading.BoundedSemaphore(MAX_BUILDS)


def check_schema(schema: Any, where: str) -> dict[str, Any]:
    """The schema if it is a valid Draft 2020-12 JSON Schema that the grammar enforces in full and
    within the size limit; SchemaRefused naming `where` and the place inside it otherwise."""
    if not isinstance(schema, dict):
        raise SchemaRefused(f"{where}: a JSON Schema object is expected")
    if nesting(schema, stop_past=MAX_DEPTH) > MAX_DEPTH:
        raise SchemaRefused(f"{where}: objects and arrays nested deeper than {MAX_DEPTH} levels")
    check_storable(schema, where)
    # A run file repeats one schema on every line: the check runs once per distinct schema.
    canonical = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    size = len(canonical.encode())
    if size > settings.structured_max_schema_bytes:
        raise SchemaRefused(
            f"{where}: {size} bytes; the limit is {settings.structured_max_schema_bytes} "
            "(MLCHAT_STRUCTURED_MAX_SCHEMA_BYTES)"
        )
    _refuse(where, partial(_refusal, canonical))
    return schema


# Set while a run file's lines are parsed again once its validation passed them (passed_already):
# their grammars were built and found fine then. Built again (a verdict fallen out of the cache, a
# file of more distinct schemas than it holds), a build near the time limit or finding the builders
# busy would answer otherwise, and the submission stop half-stored.
_PASSED = ContextVar("grammars_passed", default=False)


@contextmanager
def passed_already() -> Iterator[None]:
    """Within the block, the grammar builds are taken as passed (a line validated already)."""
    token = _PASSED.set(True)
    try:
        yield
    finally:
        _PASSED.reset(token)


def _refuse(where: str, cached_refusal: Callable[[], str | None]) -> None:
    """SchemaRefused naming `where` for the (cached) refusal, if any; GrammarBusy passed on, named."""
    if _PASSED.get():
        return
    try:
        refusal = cached_refusal()
    except GrammarBusy as exc:
        raise GrammarBusy(f"{where}{exc}") from None
    if refusal is not None:
        raise SchemaRefused(f"{where}{refusal}")


# Verdicts kept per process: more than one request's formats (MAX_TURNS_PER_REQUEST, 1,000), so a
# request sent back with its build budget spent finds those it built when it comes again (at 512, a
# thousand new formats evicted each verdict just before it was needed, and every try was a 503).
# At most 2,048 schemas of MLCHAT_STRUCTURED_MAX_SCHEMA_BYTES each (64 MiB at the default 32 KiB).
VERDICTS_KEPT = 2048


@lru_cache(maxsize=VERDICTS_KEPT)
def _refusal(schema_json: str) -> str | None:
    """Why a schema (canonical JSON) cannot be enforced, its place relative to the schema; None if
    it can."""
    try:
        _check_schema(json.loads(schema_json), "")
    except GrammarBusy:
        raise  # not the schema's answer: not cached
    except SchemaRefused as exc:
        return str(exc)
    except (TypeError, ValueError, LookupError, RecursionError) as exc:  # a keyword's value of an odd type
        return f": cannot be checked ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _check_schema(schema: dict[str, Any], where: str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        place = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise SchemaRefused(f"{where}{place}: not a valid JSON Schema: {exc.message}") from None
    _check_enforced(schema, where, depth=0, nodes=False)
    token = _LISTED_BUDGET.set(ListedValuesBudget())
    try:
        _check_enforced(schema, where, depth=0)
    finally:
        _LISTED_BUDGET.reset(token)
    _built_in_time(partial(_compile_json_schema, json.dumps(schema, sort_keys=True)), where)


# A request's budget for building new grammars, all of its formats together (the deadline, on
# time.monotonic()): a batch of a thousand items, each a new pattern taking seconds, held an API
# thread and a builder for an hour. Past it the request is told to send itself again (GrammarBusy,
# a 503): what it built is cached, so the next try goes further.
_BUILD_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("grammar_build_deadline", default=None)
REQUEST_BUILD_LIMITS = 3  # a request's budget, in MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S


@contextmanager
def build_budget(seconds: float | None = None) -> Iterator[None]:
    """Within the block, new grammars are built for `seconds` at most, together (by default
    REQUEST_BUILD_LIMITS build limits)."""
    seconds = REQUEST_BUILD_LIMITS * settings.structured_compile_timeout_s if seconds is None else seconds
    token = _BUILD_DEADLINE.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _BUILD_DEADLINE.reset(token)


def _built_in_time(compile_grammar: Callable[[], Any], where: str) -> None:
    """Compile a schema's or a regex's grammar within MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S of the
    build's own CPU time. xgrammar has expanded a pattern's bounded repetition (`(ab|cd){0,9999}`
    took 43 s on this CPU when this was written; under 1 ms with the xgrammar installed now: a
    build's cost is the backend's, so the limit stays), and the worker's engine would pay the same
    before the turn's first token. A build that spends the limit goes on in its thread until
    xgrammar returns (it cannot be stopped, as in vLLM's own regex timeout), and the refusal is
    cached with the schema or pattern. The limit is CPU time, not the wall clock's: on a loaded
    machine a quick build waits for a core, and a wall-clock verdict cached a refusal of a schema
    that builds in milliseconds for the replica's life. A build the machine cannot give its CPU
    time within REQUEST_BUILD_LIMITS limits (or the request's budget) is busy, not refused, and not
    cached. At most MAX_BUILDS builds run at once in a process, so slow ones hold a few cores at
    most, and one that finds them all taken is refused as busy (not cached)."""
    _xgrammar()  # the first import (torch with it) takes seconds: never counted against a schema
    timeout = settings.structured_compile_timeout_s
    budget = _BUILD_DEADLINE.get()
    left = None if budget is None else budget[0] - time.monotonic()
    spent = (
        f"{where}: this request's new formats took their {budget[1] if budget else 0:g} s to build; "
        "send it again (those built are kept, and the next try goes further)"
    )
    if left is not None and left <= 0:
        raise GrammarBusy(spent)
    wait = timeout if left is None else min(timeout, left)  # a wait cut by the budget is no verdict
    builds = _BUILDS  # the semaphore this build holds is the one it gives back, whatever happens meanwhile
    if not builds.acquire(timeout=wait):
        raise GrammarBusy(f"{where}: the grammar builders are busy with slow schemas; send it again later")
    done: Future[None] = Future()
    read = threading.Event()  # the build's thread lives until its CPU clock is read for the last time

    def build() -> None:
        try:
            compile_grammar()
            done.set_result(None)
        except Exception as exc:
            done.set_exception(exc)
        finally:
            builds.release()
            read.wait()

    thread = threading.Thread(target=build, name="schema-grammar", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: as busy
        builds.release()
        raise GrammarBusy(f"{where}: the grammar builders are busy; send it again later") from None
    try:
        assert thread.ident is not None  # set once start() returns
        _await_build(done, time.pthread_getcpuclockid(thread.ident), where, timeout, left, spent)
    finally:
        read.set()


def _await_build(
    done: Future[None], cpu_clock: int, where: str, timeout: float, left: float | None, spent: str
) -> None:
    """Wait for a build until it ends, spends `timeout` of CPU time (refused), or runs past its wall
    time (busy: REQUEST_BUILD_LIMITS limits, or what is left of the request's budget)."""
    started = time.monotonic()
    wall = REQUEST_BUILD_LIMITS * timeout
    cut_by_budget = left is not None and left < wall
    give_up = started + (min(left, wall) if left is not None else wall)
    step = timeout
    while True:
        try:
            done.result(timeout=max(0.0, min(step, give_up - time.monotonic())))
            return
        except Exception:
            if done.done():  # the build's own error (a TimeoutError of the backend's too), or none
                if (exc := done.exception()) is None:
                    return
                raise SchemaRefused(
                    f"{where}: the grammar backend refuses it: {_backend_message(exc)}"
                ) from None
        cpu_s = time.clock_gettime(cpu_clock)
        if cpu_s >= timeout:
            raise SchemaRefused(
                f"{where}: the grammar took longer than {timeout:g} s to build "
                "(MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S); long bounded repetitions in a pattern, such as "
                "{0,9999}, cost the most"
            )
        if time.monotonic() >= give_up:
            if cut_by_budget:
                raise GrammarBusy(spent)
            raise GrammarBusy(
                f"{where}: the machine is too busy to build the grammar in time ({cpu_s:.2g} s of CPU "
                f"in {time.monotonic() - started:.2g} s); send it again later"
            )
        step = timeout / 4  # past the first limit, the build's CPU time is read four times a limit


def check_storable(value: Any, where: str) -> None:
    """SchemaRefused naming the place of the first key or string PostgreSQL cannot store (a NUL) or
    UTF-8 cannot encode (a lone surrogate) in a JSON value."""
    found = unstorable_in(value, where)
    if found is not None:
        raise SchemaRefused(f"{found[0]}: {found[1]}")


def _check_enforced(node: Any, where: str, *, depth: int, schema: bool = True, nodes: bool = True) -> None:
    """Refuse what the grammar would not enforce; `nodes` False: each keyword alone (references,
    pattern sizes), a pass made before any node's listed values are checked against the node's
    constraints, which compiles its patterns and follows its references."""
    if depth > MAX_DEPTH:
        raise SchemaRefused(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_enforced(item, f"{where}[{i}]", depth=depth + 1, schema=schema, nodes=nodes)
        return
    if not isinstance(node, dict):
        return
    if schema and nodes:
        _check_node(node, where)
    for key, value in node.items():
        place = f"{where}.{key}"
        if key in _UNENFORCED:
            raise SchemaRefused(f"{place}: {_UNENFORCED[key]} is not supported in a structured reply")
        if key == "format" and value not in _FORMATS:
            raise SchemaRefused(
                f"{place}: format {value!r} is not supported; one of {', '.join(sorted(_FORMATS))}"
            )
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise SchemaRefused(f"{place}: allOf with more than one schema is not supported")
        if key in ("$id", "$anchor", "$dynamicAnchor") and depth > 0:  # the reply's checker would
            # resolve a `$ref` beside it against it, the grammar against the root: every reply fails
            raise SchemaRefused(f"{place}: {key} is supported at the schema's root only")
        if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            raise SchemaRefused(f"{place}: only references inside the schema ('#...') are supported")
        if (
            key == "patternProperties"
            and isinstance(value, dict)
            and (len(value) > 1 or "properties" in node)
        ):
            raise SchemaRefused(f"{place}: only one pattern, and not beside properties, is supported")
        patterns = [value] if key == "pattern" else []
        if key == "patternProperties" and isinstance(value, dict):
            patterns = list(value)
        for pattern in patterns:
            too_large = size_refusal(pattern) if isinstance(pattern, str) else None
            if too_large is not None:
                raise SchemaRefused(f"{place}: {too_large}")
            if isinstance(pattern, str) and (count := largest_count(pattern)) > MAX_SCHEMA_PATTERN_COUNT:
                raise SchemaRefused(
                    f"{place}: a counted repeat of {count} is not supported in a schema's pattern (at most"
                    f" {MAX_SCHEMA_PATTERN_COUNT}: the engine cannot build a grammar past it); use + or *"
                    " and let the reply's length bound it"
                )
            if isinstance(pattern, str) and looks_ahead(pattern):  # the grammar would match without it
                raise SchemaRefused(f"{place}: {NO_LOOKAHEAD} in a schema's pattern")
        if key in ("pattern", "format") and ({"minLength", "maxLength"} & node.keys()):
            raise SchemaRefused(f"{place}: a pattern or format with minLength/maxLength is not supported")
        if key in _VALUE_KEYS:
            _check_value(value, place)
            continue  # values, not schemas
        if key in ("description", "title", "$comment"):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                _check_enforced(sub, f"{place}.{name}", depth=depth + 1, schema=schema, nodes=nodes)
        else:
            _check_enforced(
                value, place, depth=depth + 1, schema=schema and key in _SCHEMA_VALUED, nodes=nodes
            )


# Bounds of one type's values: on a node with no type the grammar writes any value and drops them.
_TYPED_BOUNDS = frozenset(
    {
        "pattern",
        "minLength",
        "maxLength",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
    }
)


def _check_node(node: dict[str, Any], where: str) -> None:
    """Constraints of one schema node that the grammar would silently drop."""
    combinator = next((k for k in ("$ref", "anyOf", "allOf") if k in node), None)
    if combinator is not None:
        beside = sorted(k for k in node.keys() - _BESIDE_COMBINATOR if k != combinator)
        if beside:
            raise SchemaRefused(
                f"{where}.{beside[0]}: a constraint beside {combinator} is not enforced; "
                f"move it into the {'referenced schema' if combinator == '$ref' else 'branches'}"
            )
    required, properties = node.get("required"), node.get("properties")
    if isinstance(required, list) and required:
        known = properties if isinstance(properties, dict) else {}
        missing = [name for name in required if name not in known]
        if missing:
            raise SchemaRefused(f"{where}.required: {missing[0]!r} is not one of the properties")
    if "enum" in node or "const" in node:
        # The grammar writes one of the listed values and drops the node's other constraints: each
        # value must meet them, or a reply the grammar wrote would fail its check.
        from jsonschema import Draft202012Validator
        from referencing.exceptions import Unresolvable

        rest = {k: v for k, v in node.items() if k not in ("enum", "const")}
        checker = _listed_value_checker()(rest)
        values = node.get("enum", []) if "enum" in node else [node["const"]]
        budget = _LISTED_BUDGET.get() or ListedValuesBudget()
        for i, value in enumerate(values if isinstance(values, list) else []):
            key = f"enum[{i}]" if "enum" in node else "const"
            budget.where = f"{where}.{key}"
            while True:  # a search the `regex` module stopped is made again while this thread has time
                try:
                    error = next(iter(checker.iter_errors(value)), None)
                    break
                except Unresolvable:  # a reference to elsewhere in the schema: the value's type alone
                    of_type = Draft202012Validator({"type": node["type"]} if "type" in node else {})
                    error = next(iter(of_type.iter_errors(value)), None)
                    break
                except SearchStopped as stopped:
                    budget.search_stopped(f"{where}.{key}", stopped)
            budget.refuse_or_busy(where, "its listed values could not be checked in time")
            if error is not None:
                raise SchemaRefused(
                    f"{where}.{key}: {json.dumps(value)[:80]} does not meet the node's own constraints "
                    f"({error.message[:120]}); the grammar writes only the listed values"
                )
        return
    typeless = sorted(_TYPED_BOUNDS & node.keys()) if "type" not in node else []
    if {"items", "prefixItems"} & node.keys():  # the grammar takes such a node for an array
        typeless = [k for k in typeless if k not in ("minItems", "maxItems")]
    if typeless:
        raise SchemaRefused(
            f'{where}.{typeless[0]}: not enforced on a node without "type" (the grammar writes any JSON '
            "value there); give the node its type"
        )


LISTED_VALUES_CHECK_S = 1.0  # a schema's listed values against their nodes' constraints, patterns included


class ListedValuesBudget:
    """The CPU time of this thread a schema's listed-values checks may spend, every node's together:
    spent, the schema is refused (a pattern that backtracks on a value costs it wherever it runs);
    past REQUEST_BUILD_LIMITS times as long on the wall clock first, the host is too busy, and the
    request is sent back (not cached). The `regex` module's timeout counts every thread of the
    process: a search it stops before this thread spent the limit in it was stopped by the others'
    work; it is no verdict, its time is not counted, and it is made again with a timeout scaled by
    the process's share of it, so that this thread gets the limit of its own (a pattern that
    backtracks is refused on a busy host too, in a try or two)."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = LISTED_VALUES_CHECK_S if seconds is None else seconds
        self.cpu_started = time.thread_time()
        self.stopped = 0.0  # this thread's CPU time in searches the module stopped early
        self.wall_until = time.monotonic() + REQUEST_BUILD_LIMITS * self.seconds
        self.scale = 1.0  # process CPU a second of this thread's: the last stopped search's
        self.where = ""  # the listed value being checked

    def next_search_s(self) -> float:
        """The next search's timeout (the module's, process CPU); SchemaRefused or GrammarBusy
        first when the schema's time is spent."""
        self.refuse_or_busy(self.where, "its listed values could not be checked in time")
        return LISTED_VALUES_CHECK_S * min(self.scale, MAX_SEARCH_SCALE)

    def search_stopped(self, where: str, stopped: SearchStopped) -> None:
        """A search the module stopped: SchemaRefused when this thread spent the limit's worth in it
        (the pattern's verdict), GrammarBusy past the wall time, else nothing (made again, scaled)."""
        if stopped.thread_s >= STOPPED_ALONE * LISTED_VALUES_CHECK_S:
            raise SchemaRefused(
                f"{where}: its pattern could not be checked in time ({LISTED_VALUES_CHECK_S:g} s)"
            )
        self.stopped += stopped.thread_s
        self.scale = max(1.0, stopped.process_s / max(stopped.thread_s, 1e-3))
        self._busy_past_wall(where)

    def refuse_or_busy(self, where: str, refusal: str) -> None:
        """SchemaRefused naming `where` once the CPU time is spent; GrammarBusy past the wall time;
        else nothing."""
        if time.thread_time() - self.cpu_started - self.stopped >= self.seconds:
            raise SchemaRefused(f"{where}: {refusal} ({self.seconds:g} s of CPU time)")
        self._busy_past_wall(where)

    def _busy_past_wall(self, where: str) -> None:
        if time.monotonic() >= self.wall_until:
            raise GrammarBusy(
                f"{where}: the host is too busy to check its listed values in time; send it again later"
            )


# A search stopped after this share of the limit in its own thread's CPU time ran alone, or nearly.
STOPPED_ALONE = 0.8
# A search made again gets at most this many limits of the process's CPU: a thread that holds the
# interpreter (pure Python work) starves the search of it, and a scale by that share would wait
# for seconds; past it the host is busy, said at the wall limit.
MAX_SEARCH_SCALE = 4.0


# xgrammar builds a pattern's grammar without its lookahead (a warning alone), and the reply's check
# would hold what the grammar let through: refused in a schema's pattern and in a regex reply alike.
NO_LOOKAHEAD = "a lookahead ((?= or (?!) is not supported"

_LISTED_BUDGET: ContextVar[ListedValuesBudget | None] = ContextVar("listed_values_budget", default=None)


def pattern_validator(found: Callable[[str, str], bool]) -> Any:
    """Draft 2020-12 whose `pattern` and `patternProperties` search with `found` (the `regex`
    module, without the GIL and within a time limit, in each caller): in Python's `re`, jsonschema's
    own, a pattern that backtracks (`(.|..)*!|[^!]*`) holds the interpreter for hours."""
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import ValidationError
    from referencing import Registry

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "string") and not found(patrn, instance):
            yield ValidationError(f"{instance[:80]!r} does not match {patrn[:80]!r}")

    def pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "object"):
            for patrn, subschema in patterns.items():
                for name, item in instance.items():
                    if found(patrn, name):
                        yield from validator.descend(item, subschema, path=name, schema_path=patrn)

    keywords = {"pattern": pattern, "patternProperties": pattern_properties}
    # An empty registry: a `$ref` outside the schema is unresolvable, never fetched. jsonschema's
    # default retrieves it (urlopen, no timeout, file:// too) before the reference is refused.
    return partial(
        validators.extend(Draft202012Validator, keywords), registry=Registry(), format_checker=_calendar()
    )


@cache
def _calendar() -> Any:
    """The formats the grammar writes by their shape alone, checked as dates: its `date` and
    `date-time` take 2023-02-29 and 2024-04-31 (review), which a client's date parser refuses. The
    other formats' grammars are taken as written."""
    from datetime import date, datetime

    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())

    @checker.checks("date", raises=ValueError)
    def _date(value: object) -> bool:
        return not isinstance(value, str) or date.fromisoformat(value) is not None

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        seconds_60 = re.sub(r"(?<=[Tt ]\d\d:\d\d:)60", "59", value)  # RFC 3339's leap second
        return datetime.fromisoformat(seconds_60.replace("Z", "+00:00").replace("z", "+00:00")) is not None

    return checker


def _found_in_time(pattern: str, text: str) -> bool:
    """A listed value's pattern search, within what the schema's budget leaves (its whole-schema
    limit holds inside one value too: an array of a thousand strings is a thousand searches);
    SearchStopped when the `regex` module stops it."""
    budget = _LISTED_BUDGET.get()
    timeout = LISTED_VALUES_CHECK_S if budget is None else budget.next_search_s()
    thread_from, process_from = time.thread_time(), time.process_time()
    try:
        found = regex.search(as_grammar_reads(pattern), text, FLAGS, concurrent=True, timeout=timeout)
        return found is not None
    except (regex.error, RecursionError):  # read otherwise than xgrammar reads it: not checked here
        return True
    except TimeoutError:
        raise SearchStopped(time.thread_time() - thread_from, time.process_time() - process_from) from None


class SearchStopped(TimeoutError):
    """A search the `regex` module stopped: the CPU time this thread and the whole process spent in it."""

    def __init__(self, thread_s: float, process_s: float) -> None:
        super().__init__("a pattern search ran out of time")
        self.thread_s, self.process_s = thread_s, process_s


@cache
def _listed_value_checker() -> Any:
    return pattern_validator(_found_in_time)


def _check_value(value: Any, where: str) -> None:
    """A value (enum, const, default, examples) holding none of the keys vLLM's check flags."""
    level = [(value, where)]
    while level:
        nxt = []
        for item, place in level:
            if isinstance(item, dict):
                flagged = sorted(_VLLM_FLAGGED & item.keys())
                if isinstance(item.get("allOf"), list) and len(item["allOf"]) > 1:
                    flagged.insert(0, "allOf")
                if isinstance(item.get("patternProperties"), dict) and (
                    "properties" in item or len(item["patternProperties"]) > 1
                ):
                    flagged.insert(0, "patternProperties")
                if flagged:
                    raise SchemaRefused(f"{place}.{flagged[0]}: a value with a schema keyword as a key")
                nxt += [(v, f"{place}.{k}") for k, v in item.items()]
            elif isinstance(item, list):
                nxt += [(v, f"{place}[{i}]") for i, v in enumerate(item)]
        level = nxt


def check_regex(pattern: str, where: str) -> str:
    """The pattern if the grammar backend compiles it; SchemaRefused naming `where` otherwise."""
    if "\x00" in pattern:
        raise SchemaRefused(f"{where}: contains a NUL character")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaRefused(f"{where}: {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    too_large = size_refusal(pattern)  # before any build: compiling it alone could exhaust memory
    if too_large is not None:
        raise SchemaRefused(f"{where}: {too_large}")
    if looks_ahead(pattern):  # as a schema's pattern: the reply's check would hold what the grammar drops
        raise SchemaRefused(f"{where}: {NO_LOOKAHEAD}")
    _refuse(where, partial(_regex_refusal, pattern))
    return pattern


@lru_cache(maxsize=VERDICTS_KEPT)
def _regex_refusal(pattern: str) -> str | None:
    """Why a pattern cannot be enforced (its grammar built in time, as a schema's), or None; once per
    pattern, as a run file repeats it on every line."""
    try:
        _built_in_time(partial(_compile_regex, pattern), "")
    except GrammarBusy:
        raise  # not the pattern's answer: not cached
    except SchemaRefused as exc:
        return str(exc)
    try:  # the reply is checked in the `regex` module too, whose parser recurses per group
        compiled = regex.compile(as_grammar_reads(pattern), FLAGS)
    except RecursionError:
        return ": groups nested too deeply"
    except regex.error:
        return None  # a syntax only xgrammar reads: the grammar alone checks such replies
    try:
        empty = compiled.fullmatch("", timeout=LISTED_VALUES_CHECK_S) is not None
    except TimeoutError:
        empty = False
    if empty:  # the grammar lets the engine end at once, and an empty reply fails its turn
        return (
            ": it matches an empty reply, which fails its turn (empty_reply); make it match at least "
            "one character"
        )
    return None


def _backend_message(exc: BaseException) -> str:
    # xgrammar's errors start with "[time] /project/cpp/file.cc:line: "; the rest is the reason.
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc).strip())[:300]


@cache
def _xgrammar() -> Any:
    import xgrammar

    return xgrammar


def _compile_json_schema(schema_json: str) -> Any:
    # vLLM asks xgrammar for the same grammar (strict, no free whitespace: see structured_outputs).
    return _xgrammar().Grammar.from_json_schema(schema_json, any_whitespace=False, strict_mode=True)


def _compile_regex(pattern: str) -> Any:
    return _xgrammar().Grammar.from_regex(pattern)


# --- The request shapes: OpenAI's response_format, plus mlchat's regex, choice and npc. ---


class _JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(default="reply", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=2000)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    """`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: a reply valid against it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: _JsonSchemaSpec


class JsonObjectFormat(BaseModel):
    """`{"type": "json_object"}`: any JSON object."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class TextFormat(BaseModel):
    """`{"type": "text"}`: free text (the default; also turns off a character's declared actions)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class RegexFormat(BaseModel):
    """`{"type": "regex", "regex": "..."}`: a reply the whole of which matches the pattern."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["regex"]
    regex: str = Field(min_length=1)


class ChoiceFormat(BaseModel):
    """`{"type": "choice", "choice": [...]}`: the reply is exactly one of the strings."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["choice"]
    choice: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        min_length=1, max_length=MAX_CHOICES
    )


class NpcFormat(BaseModel):
    """`{"type": "npc"}`: the NPC reply shape (say, emotion, action) under the turn's or the
    character's declared actions, or none (action always null); how an OpenAI request asks for it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["npc"]


_FORMAT_TYPES: dict[str, type[BaseModel]] = {
    "text": TextFormat,
    "npc": NpcFormat,
    "json_object": JsonObjectFormat,
    "json_schema": JsonSchemaFormat,
    "regex": RegexFormat,
    "choice": ChoiceFormat,
}


def check_response_format(value: Any, where: str = "response_format") -> dict[str, Any]:
    """A response format as stored on the turn (OpenAI's shape; mlchat adds regex, choice and npc);
    SchemaRefused naming `where` and the place inside it when it cannot be enforced."""
    if not isinstance(value, dict):
        raise SchemaRefused(f"{where}: an object with a type is expected")
    kind = value.get("type")
    model = _FORMAT_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise SchemaRefused(f"{where}.type: {kind!r}; one of {', '.join(sorted(_FORMAT_TYPES))}")
    check_storable(value, where)  # all of it (iterative: a schema too deep is refused below)
    try:
        parsed = model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise SchemaRefused(f"{where}{place}: {first['msg']}") from None
    if isinstance(parsed, JsonSchemaFormat):
        check_schema(parsed.json_schema.schema_, f"{where}.json_schema.schema")
    elif isinstance(parsed, RegexFormat):
        check_regex(parsed.regex, f"{where}.regex")
    elif isinstance(parsed, ChoiceFormat):
        if len(set(parsed.choice)) != len(parsed.choice):
            raise SchemaRefused(f"{where}.choice: the strings must be distinct")
        if any("\x00" in c for c in parsed.choice):
            raise SchemaRefused(f"{where}.choice: a NUL character")
        for i, c in enumerate(parsed.choice):  # a reply is read stripped: such a choice never matches
            if c != c.strip():
                raise SchemaRefused(f"{where}.choice[{i}]: begins or ends with whitespace")
    stored = parsed.model_dump(by_alias=True, exclude_none=True)
    if isinstance(parsed, JsonSchemaFormat):
        # As JSON text: a turn's params are JSONB, which keeps no key order, and the grammar fills
        # an object's properties in the order the schema gives them (a reasoning-first schema).
        stored["json_schema"]["schema"] = json.dumps(
            parsed.json_schema.schema_, ensure_ascii=False, separators=(",", ":")
        )
    return stored


def schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    """A stored json_schema format's schema, its properties in the order the client gave them
    (formats stored before that order was kept hold the schema itself, in JSONB's key order)."""
    schema = response_format["json_schema"]["schema"]
    return json.loads(schema) if isinstance(schema, str) else schema


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """A turn's stored params as they are shown and hashed: a json_schema as an object again."""
    fmt = params.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return params
    spec = fmt["json_schema"]
    return {**params, "response_format": {**fmt, "json_schema": {**spec, "schema": schema_of(fmt)}}}


def outputs_of(response_format: dict[str, Any]) -> Any:
    """vLLM's StructuredOutputsParams for a stored response format; None for text and npc (whose
    schema is built from the actions, worker/structured.py)."""
    kind = response_format["type"]
    if kind == "json_schema":
        return structured_outputs_for(json_schema=schema_of(response_format))
    if kind == "json_object":
        return structured_outputs_for(json_object=True)
    if kind == "regex":
        return structured_outputs_for(regex=response_format["regex"])
    if kind == "choice":
        return structured_outputs_for(choice=response_format["choice"])
    return None


def structured_outputs_for(
    *,
    json_schema: dict[str, Any] | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: list[str] | None = None,
) -> Any:
    """vLLM's StructuredOutputsParams for one of a JSON schema, any JSON object, a regex or a choice
    list (give exactly one): pass it as `GenerationRequest.structured_outputs`. Check a schema from
    outside first with `check_schema`."""
    from vllm.sampling_params import StructuredOutputsParams

    given = [json_schema is not None, json_object, regex is not None, choice is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of json_schema, json_object, regex, choice")
    # No free whitespace between JSON tokens: a small model otherwise can pad a reply with blank
    # lines until max_tokens cuts it (the engine sets the same, worker/engine.py: vLLM's xgrammar
    # backend reads the engine's setting, its guidance backend the request's).
    if json_schema is not None:
        return StructuredOutputsParams(json=json_schema, disable_any_whitespace=True)
    if json_object:
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    if regex is not None:
        return StructuredOutputsParams(regex=regex)
    return StructuredOutputsParams(choice=list(choice or []))
