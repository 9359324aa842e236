"""Routing by task, end to end: `[[model]] tasks`, "task:NAME" wherever a request names a model,
the X-LLMD-Task header, the X-LLMD-Model header on answers, and POST /infer, the task router's
API, driven by a client written as that router's users wrote theirs (httpx)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import ollama
import openai
import pytest
from llmdproc import Llmd, scrape, series, wait_for

CODE, WRITER = "tiny:1m", "tiny:2m"
MODELS = [
    {"name": CODE, "tasks": ["code"]},
    {"name": WRITER, "tasks": ["summarize", "chat"]},
]
UNKNOWN = "unknown task 'poetry': the configured tasks are chat, code, summarize"

Factory = Callable[..., Llmd]


@pytest.fixture
def llmd(daemon: Factory) -> Llmd:
    return daemon(models=MODELS).start()


def test_a_task_names_its_model_on_native_routes_streamed_or_not(llmd: Llmd) -> None:
    with ollama.Client(host=llmd.url) as client:
        answer = client.generate(model="task:code", prompt="def add(a, b):")
        chats = client.chat(
            model="task:chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(chats)
    assert answer.model == CODE and answer.response
    assert {c.model for c in chunks} == {WRITER} and chunks[-1].done
    # The header names the model that served it, for a task, an alias-free name, and a stream.
    for body in (
        {"model": "task:summarize", "prompt": "x", "stream": False},
        {"model": "task:code", "prompt": "x", "stream": True},
        {"model": CODE, "prompt": "x", "stream": False},
    ):
        r = httpx.post(llmd.url + "/api/generate", json=body, timeout=30)
        assert r.status_code == 200, r.text
        want = WRITER if body["model"] == "task:summarize" else CODE
        assert r.headers["X-LLMD-Model"] == want


def test_the_task_header_serves_clients_that_cannot_change_the_model_field(llmd: Llmd) -> None:
    """X-LLMD-Task wins over the model field (an app hard-wired to one model name), and works
    without one."""
    with ollama.Client(host=llmd.url, headers={"X-LLMD-Task": "summarize"}) as client:
        answer = client.generate(model="some-hardwired-model", prompt="long text")
    assert answer.model == WRITER
    r = httpx.post(
        llmd.url + "/api/chat",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": False},
        headers={"X-LLMD-Task": "code"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == CODE and r.headers["X-LLMD-Model"] == CODE


def test_openai_clients_name_tasks_too(llmd: Llmd) -> None:
    with openai.OpenAI(base_url=llmd.url + "/v1", api_key="unused") as client:
        raw = client.chat.completions.with_raw_response.create(
            model="task:code", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["X-LLMD-Model"] == CODE
        assert raw.parse().choices[0].message.content
        stream = client.chat.completions.create(
            model="task:summarize", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(parts)
        done = client.completions.create(model="task:chat", prompt="once upon", max_tokens=3)
        assert done.choices[0].text
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(
                model="task:poetry", messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.body["message"] == UNKNOWN  # type: ignore[index]


def test_an_unknown_task_is_404_in_each_apis_shape_listing_the_tasks(llmd: Llmd) -> None:
    native = httpx.post(
        llmd.url + "/api/generate", json={"model": "task:poetry", "prompt": "x"}, timeout=30
    )
    assert (native.status_code, native.json()) == (404, {"error": UNKNOWN})
    header = httpx.post(
        llmd.url + "/api/generate",
        json={"model": CODE, "prompt": "x"},
        headers={"X-LLMD-Task": "poetry"},
        timeout=30,
    )
    assert (header.status_code, header.json()) == (404, {"error": UNKNOWN})
    infer = httpx.post(llmd.url + "/infer", json={"prompt": "x", "task": "poetry"}, timeout=30)
    assert (infer.status_code, infer.json()) == (404, {"detail": UNKNOWN})
    assert "X-LLMD-Model" not in infer.headers


def test_llmctl_models_shows_tasks(llmd: Llmd) -> None:
    out = llmd.llmctl("models").stdout
    assert out.splitlines()[0].split()[-1] == "TASKS"
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert rows[CODE] == "code" and rows[WRITER] == "summarize,chat"
    doc = json.loads(llmd.llmctl("models", "--json").stdout)
    tasks = {m["name"]: m["tasks"] for m in doc["models"]}
    assert tasks[CODE] == ["code"] and tasks[WRITER] == ["summarize", "chat"]
    assert tasks["tiny-embed:1m"] == []  # pulled, not configured: no tasks
    assert rows["tiny-embed:1m"] == "-"


# -- POST /infer, with a client written as the router's users wrote theirs --------------------


def ask(base: str, prompt: str, task: str) -> str:
    """The seed's client: POST the prompt and the task, read `response`."""
    r = httpx.post(f"{base}/infer", json={"prompt": prompt, "task": task}, timeout=120)
    r.raise_for_status()
    return str(r.json()["response"])


def ask_streamed(base: str, prompt: str, task: str) -> str:
    """The seed's streaming client: NDJSON lines, each a piece of `response`."""
    out = []
    body = {"prompt": prompt, "task": task, "stream": True}
    with httpx.stream("POST", f"{base}/infer", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                chunk = json.loads(line)
                out.append(chunk.get("response", ""))
                if chunk.get("done"):
                    break
    return "".join(out)


def test_infer_serves_the_routers_clients_unchanged(llmd: Llmd) -> None:
    assert ask(llmd.url, "Write a function that reverses a string", "code")
    assert ask_streamed(llmd.url, "Summarize: llmd routes by task.", "summarize")
    r = httpx.post(llmd.url + "/infer", json={"prompt": "hi", "task": "chat"}, timeout=30)
    assert r.headers["X-LLMD-Model"] == WRITER
    doc = r.json()
    assert doc["model"] == WRITER and doc["done"] is True  # Ollama's /api/generate answer
    with httpx.stream(
        "POST", llmd.url + "/infer", json={"prompt": "hi", "task": "code", "stream": True}
    ) as s:
        assert s.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(x) for x in s.iter_lines() if x]
    assert len(lines) > 1 and lines[-1]["done"] and {x["model"] for x in lines} == {CODE}
    # Counted as any request, under its own endpoint (recorded as each answer ends).
    counted = {
        series("llmd_requests_total", model=m, endpoint="/infer", status="200"): 2.0
        for m in (CODE, WRITER)
    }
    wait_for(lambda: {k: scrape(llmd).get(k) for k in counted} == counted, what="the counts")


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"task": "code"}, ["body", "prompt"], "missing"),
        ({"prompt": "x"}, ["body", "task"], "missing"),
        ({"prompt": 7, "task": "code"}, ["body", "prompt"], "string_type"),
        ({"prompt": "x" * 32_769, "task": "code"}, ["body", "prompt"], "string_too_long"),
        ({"prompt": "x", "task": "code", "stream": "yes"}, ["body", "stream"], "bool_type"),
    ],
)
def test_infer_refuses_what_the_router_refused_with_422(
    llmd: Llmd, body: dict[str, object], loc: list[str], kind: str
) -> None:
    r = httpx.post(llmd.url + "/infer", json=body, timeout=30)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert (err["loc"], err["type"]) == (loc, kind)


def test_infer_takes_a_prompt_of_exactly_the_limit_and_refuses_bad_json(llmd: Llmd) -> None:
    assert ask(llmd.url, "x" * 32_768, "code")
    r = httpx.post(
        llmd.url + "/infer",
        content=b'{"prompt": "x", ',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_infer_answers_an_upstream_error_with_502_naming_its_status(daemon: Factory) -> None:
    """Whatever Ollama answers with an error, the router answered 502 naming its status: a
    failed generate, a failed load, a model the backend lacks."""
    faulty = {"OLLAMA_SIM_FAULTS": "fail_request=3,fail_load=2"}
    d = daemon(models=MODELS, backend_extra=[{"env": faulty}]).start()
    assert ask(d.url, "x", "code")  # model requests 1 (its load) and 2
    r = httpx.post(d.url + "/infer", json={"prompt": "x", "task": "code"}, timeout=30)
    assert r.status_code == 502  # request 3
    assert r.json()["detail"].startswith("upstream error: Ollama answered 500: llama runner")
    code = series("llmd_requests_total", model=CODE, endpoint="/infer", status="502")
    wait_for(lambda: scrape(d).get(code) == 1, what="the 502 counted")
    r = httpx.post(d.url + "/infer", json={"prompt": "x", "task": "chat"}, timeout=30)
    assert r.status_code == 502  # the second load fails
    assert r.json()["detail"].startswith("upstream error: Ollama answered 500: ")
    assert ask(d.url, "x", "chat")
    missing = [{"name": "absent:7b", "tasks": ["legal"]}]
    d2 = daemon(models=missing).start()
    r = httpx.post(d2.url + "/infer", json={"prompt": "x", "task": "legal"}, timeout=30)
    assert r.status_code == 502 and "Ollama answered 404" in r.json()["detail"]


def test_infer_answers_503_while_the_backend_is_unreachable(daemon: Factory) -> None:
    dead = {"env": {"OLLAMA_SIM_FAULTS": "never_ready=1"}, "start_timeout": "1s"}
    d = daemon(models=MODELS, backend_extra=[dead]).start()
    r = httpx.post(d.url + "/infer", json={"prompt": "x", "task": "code"}, timeout=60)
    assert r.status_code == 503, r.text
    assert "Retry-After" in r.headers and r.json()["detail"]


def test_infer_needs_an_inference_key_like_any_inference(daemon: Factory) -> None:
    key = "app-key-0123456789"
    d = daemon(models=MODELS, sections={"proxy": {"inference_keys": [key]}}).start()
    r = httpx.post(d.url + "/infer", json={"prompt": "x", "task": "code"}, timeout=30)
    assert r.status_code == 401 and r.json()["detail"].startswith("unauthorized")
    r = httpx.post(
        d.url + "/infer",
        json={"prompt": "x", "task": "code"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
