"""Prompt sets: importing user files into the prompts schema.

A prompt file (JSONL, JSON or Parquet) has a text column (``prompt`` by default) or a
chat column (``messages``: a list of ``{"role", "content"}``), optionally an id and a
reference answer (``reference_answer``, else ``answer``: text or a number); any other
columns go, as JSON, into ``metadata``. Missing ids are
derived from the content, so importing the same prompts twice gives the same ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa

from .config import opt
from .errors import InputError, located
from .layouts import column_opt, messages
from .lineage import canonical_json
from .schemas import load_schema, validate
from .shards import ShardWriter, claim_output, read_rows


def prompt_id_for(text: str) -> str:
    """Content-derived prompt id: sha256 of the canonical prompt, first 16 hex digits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _canonical_prompt(text, messages) -> str:
    return text if text is not None else canonical_json(messages)


@dataclasses.dataclass
class ImportPromptsConfig:
    file: str = opt(help="prompt file: JSONL, JSON or Parquet with a text or a chat-messages column")
    out: str = opt(help="output prompts dataset (directory or URL)")
    prompt_column: str = column_opt("prompt")
    messages_column: str = column_opt("messages")
    id_column: str = opt("prompt_id", "column holding prompt ids (derived from the content when "
                         "absent)")
    answer_column: str | None = opt(None, "column holding the reference answer (default: "
                                    "reference_answer, else answer, when present)")
    chunk_rows: int = opt(10_000, "prompts per shard")
    overwrite: bool = opt(False, "replace an existing dataset at OUT")


ANSWER_COLUMNS = ("reference_answer", "answer")


def answer_column_of(names, answer_column: str | None, source: str) -> str | None:
    """The column read as the reference answer: the one named, else the first of
    ``ANSWER_COLUMNS`` present (None when there is none)."""
    if answer_column is not None:
        if answer_column not in names:
            raise InputError(located("answer column not found", source, None, answer_column))
        return answer_column
    return next((c for c in ANSWER_COLUMNS if c in names), None)


def _answer(value, source, row, column) -> str | None:
    """A reference answer: text, or a number written as text; anything else is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise InputError(located(f"reference answer must be text or a number, got "
                             f"{type(value).__name__}", source, row, column))


def normalize_prompts(data: pa.Table | list[dict], source: str, *, prompt_column: str = "prompt",
                      messages_column: str = "messages", id_column: str = "prompt_id",
                      answer_column: str | None = None) -> pa.Table:
    """Map a user's table (or rows) onto the prompts schema (ids derived where absent)."""
    if isinstance(data, pa.Table):
        rows, names = data.to_pylist(), data.column_names
    else:
        rows, names = data, list(dict.fromkeys(k for r in data for k in r))
    if prompt_column not in names and messages_column not in names:
        raise InputError(located(f"no prompt column (looked for '{prompt_column}' and "
                                 f"'{messages_column}'; choose with --prompt-column)",
                                 source, None, prompt_column))
    answer_column = answer_column_of(names, answer_column, source)
    used = {prompt_column, messages_column, id_column, answer_column}
    out = []
    for i, r in enumerate(rows):
        text, msgs = r.get(prompt_column), r.get(messages_column)
        if text is None and msgs is None:
            raise InputError(located("prompt is missing (null)", source, i, prompt_column))
        if text is not None and not isinstance(text, str):
            raise InputError(located(f"prompt must be text, got {type(text).__name__}",
                                     source, i, prompt_column))
        if text is not None and not text.strip():
            raise InputError(located("empty prompt", source, i, prompt_column))
        if msgs is not None:
            msgs = messages(msgs, source, i, messages_column)
        pid = r.get(id_column)
        extra = {k: v for k, v in r.items() if k not in used and v is not None}
        out.append({"prompt_id": str(pid) if pid is not None else
                    prompt_id_for(_canonical_prompt(text, msgs)),
                    "prompt": text, "messages": msgs,
                    "reference_answer": _answer(r.get(answer_column), source, i, answer_column)
                    if answer_column else None,
                    "metadata": json.dumps(extra, default=str) if extra else None})
    return validate(pa.Table.from_pylist(out, schema=load_schema("prompts").arrow), "prompts",
                    source)


def import_prompts(src: str, out: str, chunk_rows: int = 10_000, overwrite: bool = False,
                   **columns) -> dict:
    """Import a prompt file into a prompts dataset at ``out``; return the manifest (its
    ``info.reference_answer_column`` says which column gave the reference answers)."""
    rows, names = read_rows(src)
    answer = answer_column_of(names, columns.pop("answer_column", None), src)
    table = normalize_prompts(rows, src, answer_column=answer, **columns)
    claim_output(out, overwrite)
    writer = ShardWriter(out, "prompts", lineage={"source": src})
    chunks = max(1, -(-table.num_rows // chunk_rows))
    for c in range(chunks):
        writer.write(c, table.slice(c * chunk_rows, chunk_rows), source=src,
                     row_offset=c * chunk_rows)
    return writer.finish(total_chunks=chunks, info={"reference_answer_column": answer})
