import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import generation_table

from offline_rlhf.errors import InputError
from offline_rlhf.schemas import SCHEMA_NAMES, conform, load_schema, parse_type, validate
from offline_rlhf.shards import ShardWriter, open_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("string", pa.string()),
    ("list<float32>", pa.list_(pa.float32())),
    ("list<struct<name: string, value: float64>>",
     pa.list_(pa.struct([("name", pa.string()), ("value", pa.float64())]))),
    ("struct<a: int32, b: list<int64>>",
     pa.struct([("a", pa.int32()), ("b", pa.list_(pa.int64()))])),
    ("map<string, float64>", pa.map_(pa.string(), pa.float64())),
    ("timestamp[us, tz=UTC]", pa.timestamp("us", tz="UTC")),
])
def test_parse_type(text, expected):
    assert parse_type(text) == expected


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_files_load_and_are_documented(name):
    schema = load_schema(name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", schema.version)
    assert schema.arrow.metadata[b"offline_rlhf.schema"] == name.encode()
    readme = (ROOT / "data_schemas" / "README.md").read_text()
    for col in schema.columns:
        assert col.description.strip(), f"{name}.{col.name} has no description"
        assert f"`{col.name}`" in readme, f"data_schemas/README.md does not document {col.name}"
    for key in schema.key:
        assert not schema.column(key).nullable


def test_generations_schema_covers_design_columns():
    names = set(load_schema("generations").names)
    assert {"prompt_id", "prompt", "messages", "sample_index", "response", "response_token_ids",
            "behaviour_logps", "reward", "reward_components", "reward_normalized",
            "ref_logps_sum", "ref_logps", "policy_fingerprint", "reward_fingerprint",
            "reference_fingerprint", "decoding", "config_hash", "code_version",
            "created_at"} <= names
    assert {"prompt", "chosen", "rejected"} <= set(load_schema("pairs").names)


def test_round_trip_every_reader(tmp_path):
    table = generation_table(40)
    w = ShardWriter(str(tmp_path / "ds"), "generations", lineage={"policy_fingerprint": "x"},
                    config_hash="h")
    w.write(0, table.slice(0, 25))
    w.write(1, table.slice(25))
    w.finish(total_chunks=2)
    ds = open_dataset(str(tmp_path / "ds"), require_complete=True)
    expected = table.to_pylist()
    assert ds.read().to_pylist() == expected
    assert ds.to_arrow_dataset().to_table().to_pylist() == expected
    assert pa.Table.from_batches(list(ds.iter_batches(batch_size=7))).to_pylist() == expected
    assert ds.to_polars().collect().to_arrow().cast(table.schema).to_pylist() == expected
    hf = ds.to_hf()
    assert hf.num_rows == 40 and hf[3]["response"] == expected[3]["response"]
    assert hf[3]["reward_components"] == expected[3]["reward_components"]
    # the schema version and lineage travel in each file's metadata
    import pyarrow.parquet as pq
    meta = pq.read_schema(ds.files()[0]).metadata
    assert meta[b"offline_rlhf.schema_version"] == load_schema("generations").version.encode()
    assert b"policy_fingerprint" in meta[b"offline_rlhf.lineage"]


def test_conform_adds_nullable_and_casts():
    t = pa.table({"prompt_id": ["a"], "prompt": ["x"], "sample_index": pa.array([0], pa.int64()),
                  "response": ["y"], "response_token_ids": pa.array([[1, 2]], pa.list_(pa.int64())),
                  "finish_reason": ["eos"]})
    out = conform(t, load_schema("generations"))
    assert out.schema.field("response_token_ids").type == pa.list_(pa.int32())
    assert out.column("reward").null_count == 1
    assert out.column_names == load_schema("generations").names


@pytest.mark.parametrize("table, message", [
    (pa.table({"prompt": ["x"]}), "f.parquet, column 'prompt_id': missing required column"),
    (pa.table({"prompt_id": ["a"], "prompt": ["x"], "extra": [1]}),
     "f.parquet, column 'extra': unknown column"),
    (pa.table({"prompt_id": ["a", "b"], "prompt": ["x", None]}),
     "f.parquet, row 1, column 'prompt': one of ['prompt', 'messages'] must be set"),
    (pa.table({"prompt_id": ["a", "a"], "prompt": ["x", "y"]}),
     "f.parquet, row 1, column 'prompt_id': duplicate key (prompt_id)"),
])
def test_validate_names_file_row_column(table, message):
    with pytest.raises(InputError) as e:
        validate(table, "prompts", "f.parquet")
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("value", ["zero", "3", "1e3"])
def test_numbers_given_as_text_are_refused_never_parsed(value):
    # Arrow casts 3.5 to "3.5": a number in a text column is accepted as text ...
    out = validate(pa.table({"prompt_id": ["a"], "prompt": [3.5]}), "prompts", "f")
    assert out.column("prompt").to_pylist() == ["3.5"]
    # ... but it would also parse "3" as 3: text in a number column is refused, digits or not
    rows = {"prompt_id": ["a", "a"], "prompt": ["x", "x"], "sample_index": [None, value],
            "response": ["r", "r"], "response_token_ids": [[1], [1]], "finish_reason": ["eos", "eos"]}
    with pytest.raises(InputError, match=rf"^f, row 1, column 'sample_index': expected int32, got text: '{value}'$"):
        validate(pa.table(rows), "generations", "f")
    rows = {**rows, "sample_index": [0, 1], "response_token_ids": [[], [value]]}
    with pytest.raises(InputError, match=r"^f, row 1, column 'response_token_ids': expected list"):
        validate(pa.table(rows), "generations", "f")


def test_timestamps_are_utc():
    t = generation_table(1)
    assert t.column("created_at")[0].as_py() == dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)


def test_schema_readme_is_generated_from_the_json_files():
    from offline_rlhf.schemas import README_MARKER, schema_markdown
    readme = (ROOT / "data_schemas" / "README.md").read_text()
    assert readme.split(README_MARKER)[1].strip() == schema_markdown().strip(), \
        "data_schemas/README.md is stale: run python -m offline_rlhf.schemas"
