"""Prompt sets: importing user files into the prompts schema.

A prompt file (JSONL, JSON or Parquet) has a text column (``prompt`` by default) or a
chat column (``messages``: a list of ``{"role", "content"}``), optionally an id and a
reference answer; any other columns go, as JSON, into ``metadata``. Missing ids are
derived from the content, so importing the same prompts twice gives the same ids.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from .errors import InputError, located
from .lineage import canonical_json
from .schemas import load_schema, validate
from .shards import ShardWriter, read_rows


def prompt_id_for(text: str) -> str:
    """Content-derived prompt id: sha256 of the canonical prompt, first 16 hex digits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _canonical_prompt(text, messages) -> str:
    return text if text is not None else canonical_json(messages)


def normalize_prompts(data: pa.Table | list[dict], source: str, *, prompt_column: str = "prompt",
                      messages_column: str = "messages", id_column: str = "prompt_id",
                      answer_column: str = "reference_answer") -> pa.Table:
    """Map a user's table (or rows) onto the prompts schema (ids derived where absent)."""
    if isinstance(data, pa.Table):
        rows, names = data.to_pylist(), data.column_names
    else:
        rows, names = data, list(dict.fromkeys(k for r in data for k in r))
    if prompt_column not in names and messages_column not in names:
        raise InputError(located(f"no prompt column (looked for '{prompt_column}' and "
                                 f"'{messages_column}'; choose with --prompt-column)",
                                 source, None, prompt_column))
    used = {prompt_column, messages_column, id_column, answer_column}
    out = []
    for i, r in enumerate(rows):
        text, messages = r.get(prompt_column), r.get(messages_column)
        if text is None and messages is None:
            raise InputError(located("prompt is missing (null)", source, i, prompt_column))
        if text is not None and not isinstance(text, str):
            raise InputError(located(f"prompt must be text, got {type(text).__name__}",
                                     source, i, prompt_column))
        if text is not None and not text.strip():
            raise InputError(located("empty prompt", source, i, prompt_column))
        if messages is not None and (not isinstance(messages, list) or not all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
            raise InputError(located("messages must be a list of {role, content} objects",
                                     source, i, messages_column))
        for j, m in enumerate(messages or []):
            bad = [k for k in ("role", "content") if not isinstance(m[k], str)]
            if bad:
                raise InputError(located(f"messages[{j}].{bad[0]} must be text, got "
                                         f"{type(m[bad[0]]).__name__} {m[bad[0]]!r}",
                                         source, i, messages_column))
        pid = r.get(id_column)
        answer = r.get(answer_column)
        extra = {k: v for k, v in r.items() if k not in used and v is not None}
        out.append({"prompt_id": str(pid) if pid is not None else
                    prompt_id_for(_canonical_prompt(text, messages)),
                    "prompt": text,
                    "messages": [{"role": m["role"], "content": m["content"]} for m in messages]
                    if messages is not None else None,
                    "reference_answer": None if answer is None else str(answer),
                    "metadata": json.dumps(extra, default=str) if extra else None})
    return validate(pa.Table.from_pylist(out, schema=load_schema("prompts").arrow), "prompts",
                    source)


def import_prompts(src: str, out: str, chunk_rows: int = 10_000, **columns) -> dict:
    """Import a prompt file into a prompts dataset at ``out``; return the manifest."""
    table = normalize_prompts(read_rows(src)[0], src, **columns)
    writer = ShardWriter(out, "prompts", lineage={"source": src})
    chunks = max(1, -(-table.num_rows // chunk_rows))
    for c in range(chunks):
        if not writer.committed(c):
            writer.write(c, table.slice(c * chunk_rows, chunk_rows), source=src,
                         row_offset=c * chunk_rows)
    return writer.finish(total_chunks=chunks)
