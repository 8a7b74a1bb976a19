"""Bulk NPC dialogue runs: validate a file, submit it (resumably), watch, cancel, retry, export."""

from services.runs.control import RunNotFound, RunState, cancel, require_run, resume, retry_failed, run_state
from services.runs.export import export_run
from services.runs.submit import CHUNK, RunBusy, RunConflict, SubmissionFailed, SubmittedRun, submit_run
from services.runs.validate import EmptyFile, LineError, RunLine, RunValidationError, validate_file

__all__ = [
    "CHUNK",
    "EmptyFile",
    "LineError",
    "RunBusy",
    "RunConflict",
    "RunLine",
    "RunNotFound",
    "RunState",
    "RunValidationError",
    "SubmissionFailed",
    "SubmittedRun",
    "cancel",
    "export_run",
    "require_run",
    "resume",
    "retry_failed",
    "run_state",
    "submit_run",
    "validate_file",
]
