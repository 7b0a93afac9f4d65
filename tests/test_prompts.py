import json

import pytest

from offline_rlhf.errors import InputError
from offline_rlhf.prompts import import_prompts
from offline_rlhf.shards import open_dataset
from offline_rlhf.toy import addition_prompts, prompt_id_for


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_import_text_and_chat_with_stable_ids(tmp_path):
    src = tmp_path / "p.jsonl"
    write_jsonl(src, [{"question": "What is 1+1?", "answer": 2, "tag": "easy"},
                      {"messages": [{"role": "user", "content": "hello"}]}])
    kw = dict(prompt_column="question", answer_column="answer")
    m = import_prompts(str(src), str(tmp_path / "a"), **kw)
    assert m["complete"] and m["num_rows"] == 2
    rows = open_dataset(str(tmp_path / "a")).read().to_pylist()
    assert rows[0]["prompt_id"] == prompt_id_for("What is 1+1?")
    assert rows[0]["reference_answer"] == "2" and json.loads(rows[0]["metadata"]) == {"tag": "easy"}
    assert rows[1]["prompt"] is None and rows[1]["messages"][0]["content"] == "hello"
    import_prompts(str(src), str(tmp_path / "b"), **kw)
    again = open_dataset(str(tmp_path / "b")).read().to_pylist()
    assert [r["prompt_id"] for r in again] == [r["prompt_id"] for r in rows]


@pytest.mark.parametrize("rows, message", [
    ([{"text": "x"}], "column 'prompt': no prompt column"),
    ([{"prompt": "x"}, {"prompt": "  "}], "row 1, column 'prompt': empty prompt"),
    ([{"prompt": "x"}, {"prompt": None}], "row 1, column 'prompt': prompt is missing"),
    ([{"prompt": "x"}, {"prompt": "x"}], "row 1, column 'prompt_id': duplicate key"),
    ([{"messages": "hi"}], "row 0, column 'messages': expected a non-empty list of {role, content}"),
])
def test_import_refuses_bad_prompts(tmp_path, rows, message):
    src = tmp_path / "p.jsonl"
    write_jsonl(src, rows)
    with pytest.raises(InputError) as e:
        import_prompts(str(src), str(tmp_path / "out"))
    assert str(e.value) == f"{src}, {message}" or str(e.value).startswith(f"{src}, {message}")
    assert not (tmp_path / "out").exists()


def test_toy_prompts_are_distinct_and_valid():
    from offline_rlhf.schemas import validate
    t = validate(addition_prompts(100, seed=3, chat_fraction=0.3), "prompts")
    assert len(set(t.column("prompt_id").to_pylist())) == 100
    assert 0 < t.column("messages").is_valid().to_pylist().count(True) < 100
