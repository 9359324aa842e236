"""POST /infer: the task router of the setup llmd replaces, served on the proxy port.

That router was a FastAPI app: a request `{"prompt": ..., "task": "code", "stream": false}`
went to the model its MODEL_MAP named for the task, as an Ollama `/api/generate`; an Ollama
error came back as 502 with the upstream status in the detail, an unreachable Ollama as 503,
and a malformed request as FastAPI's 422. Here the task names a `[[model]] tasks` entry and
the request takes the same path as any other (auth, body limits, queue, admission, metrics).
Answers are Ollama's `/api/generate` answers (NDJSON when streamed); errors have FastAPI's
`{"detail": ...}` shape (llmd.answers.error_response).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmd.answers import ProxyError

PATH = "/infer"
PROMPT_MAX = 32_768


@dataclass(frozen=True)
class InferRequest:
    prompt: str
    task: str
    stream: bool = False


class Invalid(Exception):
    """A request FastAPI would refuse with 422: `errors` in its `detail` list shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"] if errors else "invalid request")
        self.errors = errors


def _error(kind: str, field: str | None, msg: str, given: Any, **ctx: Any) -> dict[str, Any]:
    """One entry of FastAPI's (pydantic's) validation detail."""
    err: dict[str, Any] = {
        "type": kind,
        "loc": ["body", field] if field else ["body"],
        "msg": msg,
        "input": given,
    }
    if ctx:
        err["ctx"] = ctx
    return err


def parse(body: Any) -> InferRequest:
    """The request, or Invalid naming every field that is wrong (as FastAPI reports them)."""
    if not isinstance(body, dict):
        raise Invalid(
            [_error("model_attributes_type", None, "Input should be a valid dictionary", body)]
        )
    errors = []
    values: dict[str, Any] = {}
    for field in ("prompt", "task"):
        v = body.get(field)
        if field not in body:
            errors.append(_error("missing", field, "Field required", body))
        elif not isinstance(v, str):
            errors.append(_error("string_type", field, "Input should be a valid string", v))
        elif field == "prompt" and len(v) > PROMPT_MAX:
            errors.append(
                _error(
                    "string_too_long",
                    field,
                    f"String should have at most {PROMPT_MAX} characters",
                    v,
                    max_length=PROMPT_MAX,
                )
            )
        else:
            values[field] = v
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        errors.append(_error("bool_type", "stream", "Input should be a valid boolean", stream))
    if errors:
        raise Invalid(errors)
    return InferRequest(values["prompt"], values["task"], stream)


def generate_body(req: InferRequest, model: str) -> dict[str, Any]:
    """The Ollama request the router sent for it."""
    return {"model": model, "prompt": req.prompt, "stream": req.stream}


def upstream_error(status: int, text: bytes) -> ProxyError:
    """502 for an error a child answered: its status and, from its body, its message."""
    message = None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            message = doc["error"]
    except ValueError:
        pass
    return answered(status, message)


def answered(status: int, message: str | None) -> ProxyError:
    """502 for an error Ollama answered, with its status (and its message) in the detail."""
    why = f": {message}" if message else ""
    return ProxyError(502, f"upstream error: Ollama answered {status}{why}")
