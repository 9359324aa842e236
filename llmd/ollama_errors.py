"""Ollama's own wording for the errors llmd answers itself, so clients show and parse them alike.

Each message is the one Ollama v0.33 writes (server/routes.go, api/types.go, Go's encoding/json
and time packages); llmd answers them where it decides before a child is asked.
"""

from __future__ import annotations

import json
import math
from typing import Any

# The Go type gin's ShouldBindJSON decodes each body into: named in "cannot unmarshal" errors.
GO_TYPES = {
    "/api/generate": "api.GenerateRequest",
    "/api/chat": "api.ChatRequest",
    "/api/embed": "api.EmbedRequest",
    "/api/embeddings": "api.EmbeddingRequest",
    "/api/show": "api.ShowRequest",
    "/api/pull": "api.PullRequest",
    "/api/push": "api.PushRequest",
    "/api/create": "api.CreateRequest",
    "/api/copy": "api.CopyRequest",
    "/api/delete": "api.DeleteRequest",
    "/v1/chat/completions": "openai.ChatCompletionRequest",
    "/v1/completions": "openai.CompletionRequest",
    "/v1/embeddings": "openai.EmbedRequest",
    "/v1/responses": "openai.ResponsesRequest",
    "/v1/messages": "anthropic.MessagesRequest",
}
# The embed handlers report an unknown model through handleScheduleError; the others directly.
_SCHEDULE_ERROR_PATHS = ("/api/embed", "/api/embeddings", "/v1/embeddings")


def model_not_found(path: str, name: str) -> str:
    """What Ollama answers (404) for a model it does not have, named as the client sent it."""
    if path in _SCHEDULE_ERROR_PATHS:
        return f"model {go_quote(name)} not found, try pulling it first"
    return f"model '{name}' not found"


def missing_body(path: str) -> str:
    """An empty body: the native handlers say so, the OpenAI middleware passes io.EOF on."""
    return "EOF" if path.startswith("/v1/") else "missing request body"


def not_an_object(path: str, doc: Any) -> str:
    """A JSON body that is not an object, as Go's json package words it."""
    go_type = GO_TYPES.get(path, "map[string]interface {}")
    return f"json: cannot unmarshal {_go_kind(doc)} into Go value of type {go_type}"


def _go_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


# -- keep_alive: api.Duration.UnmarshalJSON ---------------------------------------------------

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def keep_alive_seconds(value: Any) -> float | None:
    """A request's keep_alive in seconds (inf: forever; None: absent), as Ollama reads it;
    ValueError carries Ollama's message."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return math.inf if value < 0 else float(value)
    if isinstance(value, str):
        seconds = go_duration(value)
        return math.inf if seconds < 0 else seconds
    kind = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise ValueError(f"Unsupported type: '{kind}'")


def go_duration(text: str) -> float:
    """Seconds in a Go duration string, with time.ParseDuration's errors."""
    s = text
    neg = False
    if s[:1] in ("-", "+"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    invalid = ValueError(f"time: invalid duration {_time_quote(text)}")
    if not s:
        raise invalid
    total = 0.0
    while s:
        if not (s[0] == "." or (s[0].isascii() and s[0].isdigit())):
            raise invalid
        i = 0
        while i < len(s) and s[i].isascii() and s[i].isdigit():
            i += 1
        whole, s = s[:i], s[i:]
        frac = ""
        if s[:1] == ".":
            j = 1
            while j < len(s) and s[j].isascii() and s[j].isdigit():
                j += 1
            frac, s = s[1:j], s[j:]
        if not whole and not frac:
            raise invalid
        i = 0
        while i < len(s) and not (s[i] == "." or (s[i].isascii() and s[i].isdigit())):
            i += 1
        if i == 0:
            raise ValueError(f"time: missing unit in duration {_time_quote(text)}")
        unit, s = s[:i], s[i:]
        if unit not in _UNITS:
            raise ValueError(
                f"time: unknown unit {_time_quote(unit)} in duration {_time_quote(text)}"
            )
        total += float(f"{whole or '0'}.{frac or '0'}") * _UNITS[unit]
    if total > (2**63 - 1) / 1e9:
        raise invalid
    return -total if neg else total


def _time_quote(s: str) -> str:
    """The time package's quote(): ASCII as is (with \\ and " escaped), the rest as \\x bytes."""
    out = ['"']
    for ch in s:
        if ch >= "\x80" or ch < " ":
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append("\\" + ch if ch in '"\\' else ch)
    out.append('"')
    return "".join(out)


def go_quote(s: str) -> str:
    """strconv.Quote (fmt's %q) for the names llmd echoes: JSON's escaping, non-ASCII kept."""
    return json.dumps(s, ensure_ascii=False)


# -- JSON syntax: encoding/json's scanner -----------------------------------------------------

_MAX_DEPTH = 10000


def json_syntax_error(text: str) -> str | None:
    """The syntax error Go's encoding/json finds in a request body, or None if it finds none.

    gin's json.Decoder would ignore anything after the first value; json.Unmarshal's wording
    ("after top-level value") is used for it instead, since llmd reads the whole body."""
    data = text.encode("utf-8", "surrogatepass")
    err, end = _scan_document(data)
    if err is not None:
        return err
    while end < len(data) and data[end] in b" \t\r\n":
        end += 1
    if end < len(data):
        return f"invalid character {_quote_char(data[end])} after top-level value"
    return None


def _scan_document(data: bytes) -> tuple[str | None, int]:
    """Scan the first JSON value in data: (error, index after the value)."""
    n = len(data)
    i = 0
    stack: list[str] = []  # "{k" object key, "{v" object value, "[" array

    def skip_ws(k: int) -> int:
        while k < n and data[k] in b" \t\r\n":
            k += 1
        return k

    def bad(k: int, context: str) -> str:
        return f"invalid character {_quote_char(data[k])} {context}"

    expect_value = True
    while True:
        i = skip_ws(i)
        if expect_value:
            if i >= n:
                return ("unexpected EOF" if stack or i > 0 else "EOF"), i
            c = data[i]
            if c == ord("{") or c == ord("["):
                if len(stack) >= _MAX_DEPTH:
                    return bad(i, "exceeded max depth"), i
                i = skip_ws(i + 1)
                if i >= n:
                    return "unexpected EOF", i
                if c == ord("["):
                    stack.append("[")
                    if data[i] == ord("]"):
                        i += 1
                        stack.pop()
                        expect_value = False
                        if not stack:
                            return None, i
                    continue
                stack.append("{k")
                if data[i] == ord("}"):
                    i += 1
                    stack.pop()
                    expect_value = False
                    if not stack:
                        return None, i
                    continue
                if data[i] != ord('"'):
                    return bad(i, "looking for beginning of object key string"), i
                err, i = _scan_string(data, i)
                if err is not None:
                    return err, i
                expect_value = False
                continue
            err, i = _scan_scalar(data, i)
            if err is not None:
                return err, i
            expect_value = False
            if not stack:
                return None, i
            continue
        # After a value (or an object key).
        if i >= n:
            return "unexpected EOF", i
        c = data[i]
        top = stack[-1]
        if top == "{k":
            if c != ord(":"):
                return bad(i, "after object key"), i
            stack[-1] = "{v"
            i += 1
            expect_value = True
            continue
        if c == ord(","):
            i = skip_ws(i + 1)
            if top == "{v":
                if i >= n:
                    return "unexpected EOF", i
                if data[i] != ord('"'):
                    return bad(i, "looking for beginning of object key string"), i
                stack[-1] = "{k"
                err, i = _scan_string(data, i)
                if err is not None:
                    return err, i
                continue
            expect_value = True
            continue
        if (top == "{v" and c == ord("}")) or (top == "[" and c == ord("]")):
            stack.pop()
            i += 1
            if not stack:
                return None, i
            continue
        context = "after object key:value pair" if top == "{v" else "after array element"
        return bad(i, context), i


def _scan_string(data: bytes, i: int) -> tuple[str | None, int]:
    """Scan the string starting at data[i] == '"'; return (error, index after it)."""
    n = len(data)
    i += 1
    while i < n:
        c = data[i]
        if c == ord('"'):
            return None, i + 1
        if c < 0x20:
            return f"invalid character {_quote_char(c)} in string literal", i
        if c == ord("\\"):
            i += 1
            if i >= n:
                break
            e = data[i]
            if e == ord("u"):
                for k in range(i + 1, i + 5):
                    if k >= n:
                        return "unexpected EOF", k
                    if chr(data[k]) not in "0123456789abcdefABCDEF":
                        return (
                            f"invalid character {_quote_char(data[k])} in \\u hexadecimal "
                            "character escape",
                            k,
                        )
                i += 4
            elif chr(e) not in '"\\/bfnrt':
                return f"invalid character {_quote_char(e)} in string escape code", i
        i += 1
    return "unexpected EOF", i


_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}


def _scan_scalar(data: bytes, i: int) -> tuple[str | None, int]:
    """Scan a string, number or literal at data[i]; return (error, index after it)."""
    n = len(data)
    c = data[i]
    if c == ord('"'):
        return _scan_string(data, i)
    if c in _LITERALS:
        word = _LITERALS[c]
        for k in range(1, len(word)):
            if i + k >= n:
                return "unexpected EOF", i + k
            if data[i + k] != word[k]:
                return (
                    f"invalid character {_quote_char(data[i + k])} in literal "
                    f"{word.decode()} (expecting {_quote_char(word[k])})",
                    i + k,
                )
        return None, i + len(word)
    if c == ord("-") or ord("0") <= c <= ord("9"):
        return _scan_number(data, i)
    return f"invalid character {_quote_char(c)} looking for beginning of value", i


def _scan_number(data: bytes, i: int) -> tuple[str | None, int]:
    n = len(data)

    def digit(k: int) -> bool:
        return k < n and ord("0") <= data[k] <= ord("9")

    def need_digit(k: int, context: str) -> str | None:
        if k >= n:
            # A number at the top level may end at EOF; inside a value it is cut short.
            return "unexpected EOF"
        if not digit(k):
            return f"invalid character {_quote_char(data[k])} {context}"
        return None

    if data[i] == ord("-"):
        i += 1
        err = need_digit(i, "in numeric literal")
        if err is not None:
            return err, i
    if data[i] == ord("0"):
        i += 1
    else:
        while digit(i):
            i += 1
    if i < n and data[i] == ord("."):
        i += 1
        err = need_digit(i, "after decimal point in numeric literal")
        if err is not None:
            return err, i
        while digit(i):
            i += 1
    if i < n and data[i] in b"eE":
        i += 1
        if i < n and data[i] in b"+-":
            i += 1
        err = need_digit(i, "in exponent of numeric literal")
        if err is not None:
            return err, i
        while digit(i):
            i += 1
    return None, i


def _quote_char(c: int) -> str:
    """encoding/json's quoteChar: the byte in single quotes, escaped like strconv.Quote."""
    if c == ord("'"):
        return "'\\''"
    if c == ord('"'):
        return "'\"'"
    escapes = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}
    if c in escapes:
        s = escapes[c]
    elif c < 0x20 or c == 0x7F:
        s = f"\\x{c:02x}"
    elif c < 0x7F:
        s = "\\\\" if c == ord("\\") else chr(c)
    elif c <= 0xA0 or c == 0xAD:  # C1 controls, no-break space, soft hyphen: not printable
        s = f"\\u{c:04x}"
    else:
        s = chr(c)  # Go converts the byte itself to a rune (Latin-1)
    return f"'{s}'"
