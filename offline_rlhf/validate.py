"""``offline-rlhf validate``: a file or a dataset against a table schema, or against the
layouts that an importer or ``train sft`` reads (through their own code, with the same
column options), so that what validates is what the command accepts."""

from __future__ import annotations

from .layouts import column_names

TABLE_SCHEMAS = ("prompts", "generations", "pairs")
FILE_SCHEMAS = ("sft", "preferences", "prompts-file")


def validate_file(file: str, schema: str, tokenizer_path: str | None = None,
                  names: dict | None = None) -> tuple[int, str]:
    """Rows of ``file`` valid against ``schema`` (a table schema, or the layouts that an
    importer or ``train sft`` reads, through the same code, with the same column
    ``names``); and a note."""
    names = names or column_names()
    from .shards import is_dataset, read_rows, read_table_file
    if schema in TABLE_SCHEMAS:
        from .schemas import validate
        return validate(read_table_file(file), schema, file).num_rows, ""
    if schema == "prompts-file":
        from .prompts import normalize_prompts
        return normalize_prompts(read_rows(file)[0], file, prompt_column=names["prompt"],
                                 messages_column=names["messages"]).num_rows, ""
    tok = None
    if tokenizer_path:
        from .models import load_tokenizer
        tok = load_tokenizer(tokenizer_path)
    note = " (chat messages were not rendered: --tokenizer renders them too)"
    if schema == "sft":
        from .layouts import sft_examples, sft_tokens
        if is_dataset(file):
            from .shards import open_dataset_of
            return open_dataset_of(file, "generations", "train sft").read(columns=["prompt_id"]).num_rows, ""
        rows, columns = read_rows(file)
        examples = sft_examples(rows, columns, file, names)
        for i, ex in enumerate(examples if tok is not None else []):
            sft_tokens(tok, ex, file, i)
        chat = any(isinstance(v, list) for ex in examples for v in ex.values())
        return len(examples), note if chat and tok is None else ""
    from .layouts import preference_texts
    from .pairs import preference_rows
    data, parts = preference_rows(file, names)
    if tok is not None:
        for i, (part, _) in enumerate(parts):
            preference_texts(tok, *part, file, i)
    chat = any(isinstance(v, list) for part, _ in parts for v in part)
    return len(data), note if chat and tok is None else ""
