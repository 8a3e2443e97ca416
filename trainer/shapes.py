"""What a dataset's rows are, and the one sentence that says how they are read.

Each row is recognised as one shape, in this order:

- `messages`: OpenAI chat rows, a `messages` list of `role`/`content` turns (system, user, assistant);
- `sharegpt`: ShareGPT rows, a `conversations` list of `from`/`value` turns, `human`/`gpt`/`system` mapped to
  user/assistant/system (`user` and `assistant` kept); any other role name is reported with the row;
- `format`: a record whose non-empty text fields are exactly a key of the chosen format file;
- `prompt-completion`: `prompt` and `completion` (the TRL convention), both text (the completion is
  trained) or both lists of messages (a chat whose completion turns are trained);
- `text`: a `text` field, each row a document chunked with the raw-text rules;
- anything else is unmatched, reported with its field names (and their types when they are not text) and
  a hint of what would match.

Chat shapes are rendered with a chat template (trainer/chattemplates.py); build_samples (trainer/data.py)
turns every shape into samples, and `describe` writes the sentence the preview shows before any choice.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
CHAT_SHAPES = ("messages", "sharegpt")
RECOGNISED = "messages (role/content), conversations (from/value), prompt + completion, or text"


@dataclass
class RowShape:
    """A recognised row: its shape and what build_samples needs of it."""

    shape: str  # "messages", "sharegpt", "prompt-completion", "text" or "format"
    messages: list[dict] | None = None  # chat shapes and conversational prompt/completion
    first_trained: int = 0  # the first message whose assistant turns may be trained (a completion's)
    text: str | None = None  # text rows; prompt/completion text (prompt + completion)
    prompt_len: int = 0  # prompt/completion text: where the completion starts
    key: str | None = None  # format: the matched key
    template: str | None = None  # format: its template
    roles: tuple[str, ...] = ()  # sharegpt: the role names as written


@dataclass
class Unmatched:
    """A row that is not used: why, and its field names."""

    reason: str
    fields: list[str]
    chat: bool = False  # a chat row whose turns are broken (counted apart from unmatched rows)
    described: str = ""  # the fields with the types of those that are not text, for the sentence


def recognise(row: dict, fmt=None) -> RowShape | Unmatched:
    """The shape of one row (see the module docstring), or why it has none."""
    if isinstance(row.get("messages"), list):
        return _chat(row["messages"], "messages", row)
    if isinstance(row.get("conversations"), list):
        return _chat(row["conversations"], "sharegpt", row)
    match = fmt.match(row) if fmt is not None else None
    if match is not None:
        return RowShape("format", key=match[0], template=match[1])
    if "prompt" in row and "completion" in row:
        return _prompt_completion(row)
    if isinstance(row.get("text"), str) and row["text"].strip():
        return RowShape("text", text=row["text"])
    return _unmatched(row, fmt)


def dataset_shapes(path: Path) -> frozenset[str]:
    """The shapes of a dataset's rows before any format file is chosen ("messages", "sharegpt",
    "prompt-completion", "text", and "other" for rows only a format file may match): what the Data page draws
    its options for. Read once per file content (size and modification time); empty when the file cannot be
    read (the preview then says why)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return frozenset()
    return _shapes_of(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _shapes_of(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    from .datafiles import load_rows
    from .errors import DashboardError

    try:
        rows = load_rows(Path(path))
    except DashboardError:
        return frozenset()
    return frozenset(found.shape if isinstance(found, RowShape) else "other" for found in map(recognise, rows))


def _chat(turns: list, shape: str, row: dict) -> RowShape | Unmatched:
    try:
        messages, roles = (_messages(turns) if shape == "messages" else _sharegpt(turns))
    except ValueError as exc:
        return Unmatched(f"chat row not used: {exc}", sorted(row), chat=True)
    return RowShape(shape, messages=messages, roles=roles)


def _content(value: Any) -> str | None:
    """A message's content as text: a string, or a list of parts whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                 for p in value):
        return "".join(p["text"] for p in value)
    return None


def _messages(turns: list) -> tuple[list[dict], tuple[str, ...]]:
    if not turns:
        raise ValueError("its messages list is empty")
    messages = []
    for number, message in enumerate(turns):
        content = _content(message.get("content")) if isinstance(message, dict) else None
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and content is not None):
            raise ValueError(f"each message needs a string 'role' and 'content' (message {number} has "
                             f"{_described(message) if isinstance(message, dict) else type(message).__name__})")
        messages.append({**message, "content": content})
    return messages, tuple(m["role"] for m in messages)


def _sharegpt(turns: list) -> tuple[list[dict], tuple[str, ...]]:
    if not turns:
        raise ValueError("its conversations list is empty")
    messages, roles = [], []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {number} is {type(turn).__name__}, not an object with 'from' and 'value'")
        role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not (isinstance(role, str) and isinstance(value, str)):
            raise ValueError(f"turn {number} needs a string 'from' and 'value' (it has {_described(turn)})")
        if role not in SHAREGPT_ROLES:
            raise ValueError(f"turn {number} has the role {role!r}, which is not mapped (human, gpt and system "
                             f"are; user and assistant are kept); rename it or leave the turn out")
        messages.append({"role": SHAREGPT_ROLES[role], "content": value})
        roles.append(role)
    return messages, tuple(roles)


def _prompt_completion(row: dict) -> RowShape | Unmatched:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str) and completion.strip():
        return RowShape("prompt-completion", text=prompt + completion, prompt_len=len(prompt))
    if isinstance(prompt, list) and isinstance(completion, list) and completion:
        try:
            messages, roles = _messages(prompt + completion) if prompt else _messages(completion)
        except ValueError as exc:
            return Unmatched(f"chat row not used: {exc}", sorted(row), chat=True)
        return RowShape("prompt-completion", messages=messages, first_trained=len(prompt), roles=roles)
    return Unmatched("unmatched: prompt and completion must both be text (a non-empty completion) or both lists "
                     f"of messages; it has {_described({k: row[k] for k in ('prompt', 'completion')})}", sorted(row))


def _unmatched(row: dict, fmt) -> Unmatched:
    fields = sorted(k for k, v in row.items() if isinstance(v, str) and v.strip())
    if fields and fmt is None:
        return Unmatched("unmatched: no format file chosen", fields)
    if fields:
        keys = "; ".join(key for _, key, _ in fmt.entries[:6]) + ("; ..." if len(fmt.entries) > 6 else "")
        return Unmatched(f"unmatched: no key of the format file matches its fields {{{', '.join(fields)}}} "
                         f"(its keys: {keys})", fields)
    described = _described(row)
    return Unmatched(f"unmatched: no recognised shape; its fields are {described}. {hint(row)}", sorted(row),
                     described=described)


def hint(row: dict) -> str:
    """What would make a row of these fields match."""
    names = set(row)
    lists = {k for k, v in row.items() if isinstance(v, list)}
    if not names:
        return "The row is empty."
    if lists & {"conversation", "conversations", "dialog", "dialogue", "chat", "turns", "messages"}:
        return ("A chat is read from a 'messages' list of role/content turns or a 'conversations' list of "
                "from/value turns.")
    if "prompt" in names and "completion" not in names:
        return "A prompt row needs a 'completion' (TRL prompt/completion rows)."
    if names & {"question", "query", "input", "instruction"} and names & {"answer", "response", "output"}:
        return "Rename the fields prompt and completion, or choose a format file whose key lists them."
    return f"Rows are recognised by {RECOGNISED}; or choose a format file whose key lists the text fields."


def _described(row: dict) -> str:
    """Field names with the type of each one that is not text: `conversation (a list), id (a number)`."""
    if not row:
        return "no fields"
    return ", ".join(f"{k}{_type_note(v)}" for k, v in sorted(row.items(), key=lambda kv: str(kv[0])))


def _type_note(value: Any) -> str:
    if isinstance(value, str):
        return "" if value.strip() else " (empty)"
    if isinstance(value, bool):
        return " (true/false)"
    if isinstance(value, (int, float)):
        return " (a number)"
    if value is None:
        return " (null)"
    return {list: " (a list)", dict: " (an object)"}.get(type(value), f" ({type(value).__name__})")


# ---- the sentence -----------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the rows of a dataset were recognised as, for the sentence."""

    counts: Counter = field(default_factory=Counter)
    multi_turn: int = 0
    with_system: int = 0
    conversational: int = 0  # prompt/completion rows of messages
    roles_seen: dict = field(default_factory=dict)  # sharegpt role name -> mapped role, in order seen
    keys: Counter = field(default_factory=Counter)
    unmatched: Counter = field(default_factory=Counter)  # field names (as one string) -> rows
    chat_broken: int = 0

    def add(self, shape: RowShape | Unmatched) -> None:
        if isinstance(shape, Unmatched):
            if shape.chat:
                self.chat_broken += 1
            else:
                self.unmatched[shape.described or ", ".join(shape.fields) or "no fields"] += 1
            return
        self.counts[shape.shape] += 1
        if shape.shape == "format":
            self.keys[shape.key] += 1
        if shape.messages is not None:
            self.multi_turn += sum(m["role"] == "assistant" for m in shape.messages) > 1
            self.with_system += any(m["role"] == "system" for m in shape.messages)
            self.conversational += shape.shape == "prompt-completion"
        for role in shape.roles if shape.shape == "sharegpt" else ():
            self.roles_seen.setdefault(role, SHAREGPT_ROLES[role])


def _rows(n: int) -> str:
    return f"{n:,} row{'s' if n != 1 else ''}"


def describe(tally: Tally, context: dict[str, Any]) -> str:
    """The recognised-shape sentence. `context`: `source` (a prefix such as "CSV table (columns a, b)"),
    `template` (the chat template's label), `last_only`, `format` (its name), `train_only_after`, `eos`
    (a note on the end token), and the raw-text options `cutoff_len`, `overlap_len`, `min_chars`."""
    parts = []
    turns = "the last assistant turn" if context.get("last_only") else "assistant turns"
    rendered = f"rendered with {context.get('template') or 'the chat template'}, {turns} trained"
    counts = tally.counts
    if counts["messages"]:
        extra = (f", {tally.multi_turn:,} multi-turn" if tally.multi_turn else "") + \
                (f", {tally.with_system:,} with a system turn" if tally.with_system else "")
        parts.append(f"OpenAI messages (role/content): {_rows(counts['messages'])}{extra}; {rendered}.")
    if counts["sharegpt"]:
        seen = list(tally.roles_seen.items())
        mapped = f"{'/'.join(k for k, _ in seen)} mapped to {'/'.join(v for _, v in seen)}"
        parts.append(f"ShareGPT conversations (from/value): {_rows(counts['sharegpt'])}; {mapped}; {rendered}.")
    if counts["prompt-completion"]:
        how = f"; the conversational ones {rendered.replace(turns, 'completion turns')}" if tally.conversational \
            else ""
        parts.append(f"Prompt/completion rows (TRL convention): {_rows(counts['prompt-completion'])}; the prompt is "
                     f"context, the completion is trained{how}.")
    if counts["format"]:
        keys = ", ".join(f"{k} × {n:,}" for k, n in tally.keys.items())
        trained = (f"the text after {context['train_only_after']!r} trained" if context.get("train_only_after")
                   else "the whole text trained")
        parts.append(f"Format-file records: {_rows(counts['format'])} rendered with the format "
                     f"{context.get('format')} (keys {keys}); {trained}.")
    if counts["text"]:
        parts.append(f"Text rows ({{\"text\": ...}}): {_rows(counts['text'])}, each a document chunked with the "
                     f"raw-text rules (cutoff {context.get('cutoff_len')}, overlap {context.get('overlap_len')}, "
                     f"hard cut string, minimum block size {context.get('min_chars')}).")
    if context.get("eos"):
        parts.append(context["eos"])
    parts += _unused(tally, context)
    source = context.get("source")
    return ((source + ": ") if source else "") + " ".join(parts)


def _unused(tally: Tally, context: dict[str, Any]) -> list[str]:
    parts = []
    if tally.chat_broken:
        parts.append(f"{_rows(tally.chat_broken)} of chat not used (their turns are listed as problems).")
    for fields, n in tally.unmatched.most_common(3):
        names = set(fields.split(", "))
        pair = names & {"question", "query", "input", "instruction"} and names & {"answer", "response", "output"}
        if context.get("format"):
            parts.append(f"{_rows(n)} with fields {fields} match no key of the format {context['format']}.")
        elif {"instruction", "output"} <= names:
            parts.append(f"{_rows(n)} with fields {fields}: choose a format file (alpaca-format fits instruction, "
                         f"input, output).")
        elif pair:
            parts.append(f"{_rows(n)} with fields {fields}: choose a format file whose key lists them, or rename "
                         f"them prompt and completion.")
        else:
            parts.append(f"{_rows(n)} of no recognised shape (fields {fields}): rows are recognised by "
                         f"{RECOGNISED}, or choose a format file whose key lists their fields.")
    if len(tally.unmatched) > 3:
        rest = sum(n for _, n in tally.unmatched.most_common()[3:])
        parts.append(f"{_rows(rest)} more with other fields are unmatched.")
    return parts
