"""Go's encoding/json syntax errors, word for word (scanner.go), for request bodies.

A copy of llmd/ollama_errors.py's scanner: the simulator imports nothing from llmd.
"""

from __future__ import annotations

_MAX_DEPTH = 10000


def json_syntax_error(text: str) -> str | None:
    """The syntax error json.Unmarshal finds in text, or None if it finds none (gin's
    json.Decoder stops after the first value: see first_value_error)."""
    data = text.encode("utf-8", "surrogatepass")
    err, end = _scan_document(data)
    if err is not None:
        return err
    while end < len(data) and data[end] in b" \t\r\n":
        end += 1
    if end < len(data):
        return f"invalid character {_quote_char(data[end])} after top-level value"
    return None


def first_value_error(text: str) -> str | None:
    """The syntax error gin's ShouldBindJSON (a json.Decoder) reports: only the first value
    counts, whatever follows it is never read."""
    return _scan_document(text.encode("utf-8", "surrogatepass"))[0]


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
