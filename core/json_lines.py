"""JSON on one line for every line reader: text as it is, but the line ends JSON leaves unescaped
escaped. A JSONL reader that splits on LF alone reads U+2028, U+2029 and NEL as text, but a client
that splits with str.splitlines (httpx's iter_lines behind the openai client's file content, requests'
iter_lines, most editors) cuts a line holding one (a reply with text pasted from the web) in two,
neither of them JSON."""

from __future__ import annotations

import json
from typing import Any

_LINE_ENDS_JSON_KEEPS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def one_line_json(data: Any) -> str:
    """`data` as JSON on one line (no line end added)."""
    return json.dumps(data, ensure_ascii=False).translate(_LINE_ENDS_JSON_KEEPS)


def json_line(record: Any) -> str:
    """`record` as a line of a JSONL file, its line end included; escaped to ASCII whole when it holds
    what UTF-8 cannot encode (a custom_id read from an escaped lone surrogate, `"\\ud800"`: kept as the
    client wrote it)."""
    text = one_line_json(record)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record)
    return text + "\n"
