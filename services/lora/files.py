"""The files a user hands the LoRA commands (an adapter's config, a training set), read so that a
bad one is a BadLoraFile naming the file, the line and the field, never a traceback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from services.schemas import storable_text


class BadLoraFile(ValueError):
    """A file of an adapter or a training set that cannot be used as it is."""


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM taken, as every reader here does
    except UnicodeDecodeError as exc:
        raise BadLoraFile(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadLoraFile(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # a number past 4,300 digits; nested too deeply
        raise BadLoraFile(f"{path}: not JSON that can be read ({_reason(exc)})") from None
    if not isinstance(value, dict):
        raise BadLoraFile(f"{path}: must hold a JSON object")
    return value


def read_examples(path: Path, data: bytes | None = None) -> list[dict[str, str]]:
    """A training set's examples, one JSON object a line with `prompt` and `completion` strings; none
    when the file is missing. `data`: the file's bytes, read already."""
    if data is None:
        if not path.exists():
            return []
        data = path.read_bytes()
    examples = []
    try:
        # Lines end at "\n" alone: a line may hold U+2028 and the like (JSON written unescaped).
        lines = data.decode("utf-8-sig").split("\n")  # a BOM taken, as every reader here does
    except UnicodeDecodeError as exc:
        raise BadLoraFile(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.removesuffix("\r"))
        except json.JSONDecodeError as exc:
            raise BadLoraFile(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:
            raise BadLoraFile(f"{path}: line {number}: not JSON that can be read ({_reason(exc)})") from None
        if not isinstance(row, dict):
            raise BadLoraFile(f"{path}: line {number}: must be a JSON object")
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                raise BadLoraFile(f"{path}: line {number}: {field}: must be a string")
            try:  # an escaped NUL or lone surrogate fails in the tokenizer, after the model loaded
                storable_text(row[field])
            except ValueError as exc:
                raise BadLoraFile(f"{path}: line {number}: {field}: {exc}") from None
        examples.append(row)
    return examples


def _reason(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]


def read_whole(path: Path) -> bytes:
    """A file's bytes; none when it is missing (as read_examples and files_digest take it)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def bytes_digest(*parts: bytes) -> str:
    """sha256 of the parts one after another: files_digest of bytes read already."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def files_digest(*paths: Path) -> str:
    """sha256 of the files' bytes one after another (a missing one adds none): a training set's
    `dataset_sha256`, of its train file then its validation file."""
    digest = hashlib.sha256()
    for path in paths:
        if not path.exists():
            continue
        with path.open("rb") as part:
            while block := part.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
