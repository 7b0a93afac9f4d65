import math

import pyarrow as pa
import pytest
from conftest import generation_rows, generation_table

from offline_rlhf.errors import InputError
from offline_rlhf.schemas import load_schema
from offline_rlhf.shards import ShardWriter, open_dataset, read_table_file

SCHEMA = load_schema("generations").arrow


def writer(path, **kw):
    return ShardWriter(str(path), "generations", config_hash="cfg", **kw)


BAD = {
    "nan reward": ({"reward": math.nan}, "reward", "non-finite value"),
    "inf reward": ({"reward": math.inf}, "reward", "non-finite value"),
    "nan component": ({"reward_components": [{"name": "rm", "value": math.nan}]},
                      "reward_components", "non-finite value"),
    "nan normalised": ({"reward_normalized": -math.inf}, "reward_normalized", "non-finite value"),
    "positive logp": ({"behaviour_logps": [-0.1, 0.3, -0.1, -0.1, -0.1, -0.1]},
                      "behaviour_logps", "positive log-probability"),
    "positive ref logp sum": ({"ref_logps_sum": 2.0}, "ref_logps_sum", "positive log-probability"),
    "nan logp": ({"behaviour_logps": [-0.1, math.nan, -0.1, -0.1, -0.1, -0.1]},
                 "behaviour_logps", "non-finite value"),
    "logps shorter than tokens": ({"behaviour_logps": [-0.1, -0.2]}, "behaviour_logps",
                                  "length differs from 'response_token_ids'"),
    "ref logps longer": ({"ref_logps": [-0.1] * 9}, "ref_logps",
                         "length differs from 'response_token_ids'"),
    "duplicate key": ({"prompt_id": "p00000", "sample_index": 0}, "sample_index",
                      "duplicate key (prompt_id, sample_index)"),
    "empty prompt id": ({"prompt_id": ""}, "prompt_id", "empty string"),
    "unknown finish reason": ({"finish_reason": "tired"}, "finish_reason", "value not in"),
    "null response": ({"response": None}, "response", "null in a required column"),
}


@pytest.mark.parametrize("change, column, message", BAD.values(), ids=BAD.keys())
def test_bad_rows_refused_with_file_row_column(tmp_path, change, column, message):
    rows = generation_rows(8)
    rows[5].update(change)
    w = writer(tmp_path / "ds")
    with pytest.raises(InputError) as e:
        w.write(3, pa.Table.from_pylist(rows, schema=SCHEMA))
    text = str(e.value)
    assert text.startswith(f"{tmp_path / 'ds'}/part-000003.parquet, row 5, column '{column}': ")
    assert message in text and "\n" not in text
    # nothing written: no shard, no entry, no temporary file
    assert not [p for p in (tmp_path / "ds").rglob("*") if "part-000003" in p.name]


def test_invalid_utf8_refused(tmp_path):
    table = generation_table(4)
    bad = pa.array([b"ok", b"ok", b"\xff\xfebad", b"ok"], pa.binary())
    table = table.set_column(table.schema.get_field_index("response"), "response", bad)
    with pytest.raises(InputError, match=r"part-000000.parquet, row 2, column 'response': invalid UTF-8"):
        writer(tmp_path / "ds").write(0, table)


def test_error_locates_rows_in_callers_input(tmp_path):
    rows = generation_rows(8)
    rows[1]["reward"] = math.nan
    with pytest.raises(InputError, match=r"^in.jsonl, row 101, column 'reward'"):
        writer(tmp_path / "ds").write(0, pa.Table.from_pylist(rows, schema=SCHEMA),
                                      source="in.jsonl", row_offset=100)


def test_quarantine_keeps_good_rows_and_explains_bad(tmp_path):
    rows = generation_rows(8)
    rows[2]["reward"] = math.nan
    rows[6]["behaviour_logps"] = [0.5] * 6
    with writer(tmp_path / "ds", on_invalid="quarantine") as w:
        entry = w.write(0, pa.Table.from_pylist(rows, schema=SCHEMA))
    assert entry["rows"] == 6 and entry["stats"]["quarantined_rows"] == 2
    good = open_dataset(str(tmp_path / "ds")).read()
    assert [r for r in range(8) if r not in (2, 6)] == \
        [int(p[1:]) * 4 + s for p, s in zip(good.column("prompt_id").to_pylist(),
                                            good.column("sample_index").to_pylist())]
    q = read_table_file(str(tmp_path / "ds.quarantine" / "part-000000.parquet"))
    assert q.column("quarantine_reason").to_pylist() == [
        "column 'reward': non-finite value (NaN or inf)",
        "column 'behaviour_logps': positive log-probability (log-probs must be <= 0)"]


def test_rerun_skips_committed_and_refuses_other_config(tmp_path):
    w = writer(tmp_path / "ds")
    w.write(0, generation_table(8))
    w.flush()
    assert w.committed(0) and not w.committed(1)
    again = writer(tmp_path / "ds")
    assert again.committed(0)
    with pytest.raises(InputError, match="config_hash 'cfg', this run has 'other'"):
        ShardWriter(str(tmp_path / "ds"), "generations", config_hash="other")
    with pytest.raises(InputError, match="schema 'generations', this run has 'pairs'"):
        ShardWriter(str(tmp_path / "ds"), "pairs", config_hash="cfg")


def test_completeness(tmp_path):
    w = writer(tmp_path / "ds")
    w.write(0, generation_table(4))
    w.write(2, generation_table(4, start=8))
    assert not w.finish(total_chunks=3)["complete"]
    with pytest.raises(InputError, match="incomplete"):
        open_dataset(str(tmp_path / "ds"), require_complete=True)
    w.write(1, generation_table(4, start=4))
    m = w.finish(total_chunks=3)
    assert m["complete"] and m["num_rows"] == 12 and m["num_shards"] == 3
    ds = open_dataset(str(tmp_path / "ds"), require_complete=True)
    assert ds.read(columns=["sample_index"]).num_rows == 12


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [("flip", "sha256 mismatch"),
                                          ("truncate", "truncated or altered")])
@pytest.mark.parametrize("reader", ["read", "iter_batches", "to_polars", "to_hf",
                                    "to_arrow_dataset"])
def test_corrupt_shard_named(tmp_path, how, message, reader):
    w = writer(tmp_path / "ds")
    for c in range(3):
        w.write(c, generation_table(8, start=8 * c))
    w.finish(total_chunks=3)
    victim = tmp_path / "ds" / "part-000001.parquet"
    _corrupt(victim, how)
    with pytest.raises(InputError) as e:   # a truncated shard is refused at open already
        out = getattr(open_dataset(str(tmp_path / "ds")), reader)()
        if reader == "iter_batches":
            list(out)
    assert str(e.value).startswith(f"{victim}: ") and message in str(e.value)


def test_undetected_by_hash_still_named_on_decode(tmp_path):
    w = writer(tmp_path / "ds")
    w.write(0, generation_table(8))
    w.finish()
    victim = tmp_path / "ds" / "part-000000.parquet"
    data = bytearray(victim.read_bytes())
    data[-6] ^= 0xFF  # the footer length: the file no longer parses
    victim.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"^{victim}: cannot read shard"):
        list(open_dataset(str(tmp_path / "ds")).iter_batches(verify=False))


def test_missing_shard_named(tmp_path):
    w = writer(tmp_path / "ds")
    w.write(0, generation_table(8))
    w.finish()
    (tmp_path / "ds" / "part-000000.parquet").unlink()
    with pytest.raises(InputError, match="part-000000.parquet: shard listed in the manifest is missing"):
        open_dataset(str(tmp_path / "ds")).read()


def test_fsspec_memory_round_trip():
    import fsspec
    url = "memory://roundtrip/gen"
    table = generation_table(12)
    w = ShardWriter(url, "generations", config_hash="m")
    w.write(0, table.slice(0, 5))
    w.write(1, table.slice(5))
    w.finish(total_chunks=2)
    assert fsspec.filesystem("memory").exists("/roundtrip/gen/.offline-rlhf/manifest.json")
    ds = open_dataset(url, require_complete=True)
    assert ds.read().to_pylist() == table.to_pylist()
    assert sum(b.num_rows for b in ds.iter_batches(batch_size=4)) == 12
    assert ds.to_polars().collect().height == 12
    assert ds.to_hf().num_rows == 12
    assert writer_committed(url)


def writer_committed(url):
    return ShardWriter(url, "generations", config_hash="m").committed(1)


def test_read_table_file_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(InputError, match=r"x.jsonl: line 2: invalid JSON"):
        read_table_file(str(p))
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"x.jsonl, row 1: each row must be a JSON object"):
        read_table_file(str(p))
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=r"x.jsonl: line 2: invalid UTF-8"):
        read_table_file(str(p))
    with pytest.raises(InputError, match="no such file"):
        read_table_file(str(tmp_path / "nope.parquet"))
    (tmp_path / "y.csv").write_text("a\n")
    with pytest.raises(InputError, match="unknown file type"):
        read_table_file(str(tmp_path / "y.csv"))


def test_columns_added_later_read_as_null(tmp_path):
    """A file written before a nullable column existed reads it as nulls (minor version)."""
    import pyarrow.parquet as pq
    w = writer(tmp_path / "ds")
    w.write(0, generation_table(4))
    w.finish(total_chunks=1)
    shard = tmp_path / "ds" / "part-000000.parquet"
    old = pq.read_table(shard).drop_columns(["token_rewards"])
    pq.write_table(old, shard)          # as an older writer would have left it
    import hashlib
    import json
    entry = tmp_path / "ds" / ".offline-rlhf" / "shards" / "part-000000.json"
    e = json.loads(entry.read_text())
    e.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    entry.write_text(json.dumps(e))
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.read(columns=["reward", "token_rewards"]).column("token_rewards").null_count == 4
    assert "token_rewards" in ds.read().column_names
    batch = next(ds.iter_batches(columns=["token_rewards", "reward"]))
    assert batch.column(0).null_count == 4 and batch.schema.names == ["token_rewards", "reward"]
    assert ds.to_polars().select("token_rewards").collect()["token_rewards"].null_count() == 4
