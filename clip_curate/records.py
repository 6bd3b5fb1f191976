"""Row records shared by every stage: the fixed rejection vocabulary and helpers.

A row flowing through the pipeline is a plain ``dict``. Reader fields: ``uid``, ``url``, ``caption``
plus any carried-through input columns. Stages add fields (``image_bytes`` transiently, then
``image``, ``width``, ``sha256``, ``clip_score`` ...). A stage that drops a row emits
``reject(row, stage, reason, detail)`` on the ``REJECTED_TAG`` output instead.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

REJECTED_TAG = "rejected"
METRICS_NAMESPACE = "clip_curate"
MAX_DETAIL_CHARS = 500

# Fixed vocabulary: stage -> allowed reasons. Labels are bounded; free text goes into ``detail``.
REASONS: dict[str, tuple[str, ...]] = {
    "read": ("missing_url", "invalid_url", "source_failed", "unreadable_source", "corrupt_shard", "missing_image",
             "bad_encoding"),
    "caption": ("missing_caption", "short_caption", "long_caption", "language", "unsafe_caption", "invalid_text"),
    "download": (
        "http_404", "http_4xx", "http_5xx", "timeout", "too_large", "redirect_loop",
        "too_many_redirects", "blocked_address", "blocked_scheme", "not_image", "connection_error",
        "dns_error", "opted_out", "robots_disallowed", "host_unavailable", "invalid_url",
        "http_429", "robots_unavailable",
    ),
    "image": ("decode_error", "too_small", "too_large_pixels", "bad_aspect_ratio", "empty_body"),
    "embed": ("embed_error",),
    "clip": ("low_clip_score", "below_top_fraction", "off_target"),
    "dedup": ("duplicate_exact", "duplicate_near", "duplicate_semantic", "eval_leak"),
    "safety": ("nsfw_image", "nsfw_concept", "unsafe_caption"),
    "balance": ("no_entry", "over_represented"),
}

# Transient reasons: rows rejected for these are re-tried by ``--retry-from``.
TRANSIENT_REASONS = ("timeout", "http_5xx", "connection_error", "dns_error", "host_unavailable",
                     "http_429", "robots_unavailable")

# Fields that never go into the rejected table (large, transient).
_DROP_ON_REJECT = ("image_bytes", "image")


#: Characters no text value may hold: NUL and lone UTF-16 surrogates (a JSON ``"\\ud800"`` escape decodes to
#: one; they cannot be encoded as UTF-8, so Beam's coders and Parquet refuse them).
_INVALID_TEXT = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def text_problem(text: str) -> str | None:
    """What makes ``text`` invalid (NUL or a lone surrogate, with its position), or None when it is valid."""
    m = _INVALID_TEXT.search(text)
    if m is None:
        return None
    what = "NUL" if m.group() == "\x00" else f"lone surrogate U+{ord(m.group()):04X}"
    count = len(_INVALID_TEXT.findall(text))
    return f"{what} at character {m.start()}" + (f" (and {count - 1} more invalid character(s))" if count > 1 else "")


def repair_text(text: str) -> str:
    """``text`` with every NUL and lone surrogate replaced by U+FFFD (valid text is returned unchanged)."""
    return _INVALID_TEXT.sub(REPLACEMENT, text) if _INVALID_TEXT.search(text) else text


def make_uid(url: str | None, caption: str | None) -> str:
    """Stable row id: first 16 bytes of sha256(url + '\\x00' + caption), hex."""
    h = hashlib.sha256()
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def uid_hash(uid: str) -> int:
    """Stable 63-bit hash of a uid (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(uid.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big") >> 1


def check_reason(stage: str, reason: str) -> None:
    if stage not in REASONS or reason not in REASONS[stage]:
        raise ValueError(f"unknown rejection {stage}/{reason}; add it to clip_curate.records.REASONS")


def reject(row: dict[str, Any], stage: str, reason: str, detail: Any = "") -> dict[str, Any]:
    """Return the rejected-table record for ``row`` dropped by ``stage`` for ``reason``.

    Keeps identity, carried-through columns and scores known so far; drops image bytes.
    """
    check_reason(stage, reason)
    out = {k: v for k, v in row.items() if k not in _DROP_ON_REJECT}
    out["stage"] = stage
    out["reason"] = reason
    text = detail if isinstance(detail, str) else repr(detail)
    out["detail"] = repair_text(text[:MAX_DETAIL_CHARS])
    return out
