"""Deterministic text, token counts and embeddings, so tests can assert exact outputs."""

from __future__ import annotations

import hashlib
import math
import random
import struct

# fmt: off
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "models", "share", "one", "GPU", "and", "every", "token", "arrives", "on", "time",
    "because", "the", "scheduler", "keeps", "its", "promises", "to", "each", "client",
    "so", "memory", "stays", "free", "for", "whoever", "asks", "next", "and", "nothing",
    "waits", "too", "long", "in", "the", "queue", "of", "pending", "loads", "that", "wander",
    "between", "cards", "like", "clouds", "over", "quiet", "valleys",
]
# fmt: on


def _rng(*parts: str) -> random.Random:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def default_length(model: str, prompt: str) -> int:
    """How many tokens a reply has when num_predict is not set: 8 to 24."""
    return 8 + _rng("len", model, prompt).randrange(17)


def reply_tokens(model: str, prompt: str, num_predict: int | None) -> tuple[list[str], str]:
    """The reply's tokens and done_reason ("stop", or "length" when num_predict set it).

    Without num_predict a reply ends by itself after 8-24 tokens. With num_predict the simulated
    model never stops early: it writes exactly num_predict tokens, so tests and benchmarks can
    ask for a stream of a known length (a real model may stop sooner, at its end-of-sequence).
    """
    natural = default_length(model, prompt)
    if num_predict is not None and num_predict >= 0:
        n, reason = num_predict, "length"
    else:
        n, reason = natural, "stop"
    rng = _rng("text", model, prompt)
    toks = [rng.choice(WORDS) for _ in range(n)]
    toks = [t if i == 0 else " " + t for i, t in enumerate(toks)]
    if toks:
        toks[0] = toks[0].capitalize()
    if reason == "stop" and toks:
        toks[-1] += "."
    return toks, reason


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word (at least 1)."""
    return max(1, len(text.split()))


def chat_prompt(messages: list[dict[str, object]]) -> str:
    """Flatten chat messages into the text the reply is derived from."""
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def chat_prompt_tokens(messages: list[dict[str, object]]) -> int:
    """Prompt tokens of a chat: words plus a small per-message template overhead."""
    return sum(count_tokens(str(m.get("content", ""))) + 4 for m in messages)


def token_ids(text: str) -> list[int]:
    """Stable pseudo token ids for the generate `context` field."""
    return [
        int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big") % 32000
        for w in text.split()
    ]


def embedding(model: str, text: str, dim: int) -> list[float]:
    """A deterministic unit-length vector of `dim` float32 values."""
    rng = _rng("embed", model, text)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [_f32(v / norm) for v in vec]


def _f32(v: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", v))[0])


def f32_base64(vec: list[float]) -> str:
    """Little-endian float32 bytes in base64, as /v1/embeddings encoding_format=base64."""
    import base64

    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
