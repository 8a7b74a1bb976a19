"""What a fence around one input's work catches: its errors, a native library's panic among them."""

from __future__ import annotations

from asyncio import CancelledError


def fenced(exc: BaseException) -> bool:
    """Whether `exc` is the fault of the input it met, fenced to that input: any Exception, and a
    native library's panic (a Rust tokenizer's: pyo3's PanicException derives from BaseException;
    poison review: it passed every fence, and the batch's turns came back together with it, charged,
    until each was out of attempts); never the process's own exit or a cancel."""
    return isinstance(exc, Exception) or not isinstance(
        exc, (KeyboardInterrupt, SystemExit, GeneratorExit, CancelledError)
    )
