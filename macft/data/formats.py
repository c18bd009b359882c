"""Data formats: detect them from the rows and normalise every row to a Sample.

Supported (detected from the keys of the first row, or forced with ``--format``):

- ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
- ``instruction`` (alpaca / dolly): ``instruction`` + optional ``input`` / ``context``
  + ``output`` / ``response`` (+ optional ``system``)
- ``completion``: ``prompt`` + ``completion``
- ``text``: ``text`` (plain text; the loss covers every token)

Everything but ``text`` becomes a conversation rendered through the model's chat
template, so the fine-tune answers in the same format it will be chatted with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .readers import Record, shown
from .textio import lone_surrogate

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}

FORMAT_KEYS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass
class Sample:
    """One normalised example: either a conversation or a plain text."""

    messages: list[dict[str, str]] | None
    text: str | None
    where: Any  # Location

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def detect_format(rec: Record) -> str:
    keys = set(rec.data)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and ({"output", "response"} & keys):
        return "instruction"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise DataError(
        rec.where,
        f"the row has none of the keys of a known format (found: {_keys(rec)})",
        hint="Use one of: messages (chat), conversations (ShareGPT), instruction + output (alpaca), "
             "prompt + completion, or text. See README 'Data formats'.")


def normalize(rec: Record, fmt: str) -> Sample:
    fn = {
        "chat": _chat,
        "sharegpt": _sharegpt,
        "instruction": _instruction,
        "completion": _completion,
        "text": _text,
    }[fmt]
    return fn(rec)


def _string(rec: Record, field: str, value: Any, *, allow_empty: bool = False) -> str:
    if isinstance(value, list):  # OpenAI-style content parts
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(t, str) for t in parts):
            value = "".join(parts)
    if not isinstance(value, str):
        raise DataError(rec.where, f"expected a string, found {_typename(value)}", field=field,
                        hint="Every message content must be a non-empty string.")
    if not allow_empty and (not value or value.isspace()):  # no copy of a huge string
        raise DataError(rec.where, "the content is empty", field=field,
                        hint="Remove the row or give the turn its text.")
    if (at := lone_surrogate(value)) is not None:
        raise DataError(rec.where, f"the text holds an unpaired surrogate ({shown(value[at])} at character "
                        f"{at + 1}), which is not a character and cannot be tokenized", field=field,
                        hint="Fix that \\u escape in the JSON: a surrogate \\ud800-\\udbff must be followed by "
                             "its low half \\udc00-\\udfff (e.g. \\ud83d\\ude00), or be removed.")
    return value


def _typename(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _keys(rec: Record, limit: int = 12) -> str:
    """The row's keys for a message (escaped; the first ``limit``)."""
    keys = sorted(str(k) for k in rec.data)
    if not keys:
        return "no keys"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(k if k.isprintable() and len(k) <= 40 else shown(k, 40) for k in keys[:limit]) + more


def _require(rec: Record, fmt: str, *keys: str) -> None:
    missing = [k for k in keys if k not in rec.data]
    if missing:
        raise DataError(rec.where, f"missing key '{missing[0]}' for the {fmt} format "
                        f"(found: {_keys(rec)})", field=missing[0],
                        hint=f"Every row of one file must use the same format; {fmt} rows need "
                             f"{' + '.join(FORMAT_KEYS[fmt])}.")


def _turns(rec: Record, key: str, role_key: str, content_key: str, fmt: str) -> list[dict[str, str]]:
    _require(rec, fmt, key)
    turns = rec.data[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(rec.where, f"expected a non-empty list of turns, found {_typename(turns)}", field=key)
    out: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        f = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise DataError(rec.where, f"expected an object with '{role_key}' and '{content_key}', "
                            f"found {_typename(t)}", field=f)
        if role_key not in t:
            raise DataError(rec.where, f"the turn has no '{role_key}'", field=f)
        raw_role = t[role_key]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError(rec.where, f"unknown role {shown(raw_role)}", field=f"{f}.{role_key}",
                            hint="Roles must be system, user or assistant "
                                 "(ShareGPT: system, human, gpt).")
        if content_key not in t:
            raise DataError(rec.where, f"the turn has no '{content_key}'", field=f)
        content = _string(rec, f"{f}.{content_key}", t[content_key])
        out.append({"role": role, "content": content})
    _check_conversation(rec, key, out)
    return out


def _check_conversation(rec: Record, key: str, msgs: list[dict[str, str]]) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(rec.where, "the conversation has no assistant turn, so there is nothing to learn",
                        field=key, hint="Add the assistant's reply, or remove the row.")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise DataError(rec.where, "a system message may only come first", field=f"{key}[{i}].role")


def _chat(rec: Record) -> Sample:
    return Sample(_turns(rec, "messages", "role", "content", "chat"), None, rec.where)


def _sharegpt(rec: Record) -> Sample:
    return Sample(_turns(rec, "conversations", "from", "value", "sharegpt"), None, rec.where)


def _instruction(rec: Record) -> Sample:
    d = rec.data
    _require(rec, "instruction", "instruction")
    out_key = "output" if "output" in d else "response" if "response" in d else None
    if out_key is None:
        raise DataError(rec.where, "missing key 'output' (or 'response') for the instruction format",
                        field="output")
    instr = _string(rec, "instruction", d["instruction"])
    in_key = "input" if "input" in d else "context" if "context" in d else None
    extra = _string(rec, in_key, d[in_key], allow_empty=True) if in_key and d[in_key] is not None else ""
    user = f"{instr}\n\n{extra}" if extra.strip() else instr
    msgs = []
    if d.get("system"):
        msgs.append({"role": "system", "content": _string(rec, "system", d["system"])})
    msgs += [{"role": "user", "content": user},
             {"role": "assistant", "content": _string(rec, out_key, d[out_key])}]
    return Sample(msgs, None, rec.where)


def _completion(rec: Record) -> Sample:
    _require(rec, "completion", "prompt", "completion")
    msgs = [{"role": "user", "content": _string(rec, "prompt", rec.data["prompt"])},
            {"role": "assistant", "content": _string(rec, "completion", rec.data["completion"])}]
    return Sample(msgs, None, rec.where)


def _text(rec: Record) -> Sample:
    _require(rec, "text", "text")
    return Sample(None, _string(rec, "text", rec.data["text"]), rec.where)
