import pytest

from offline_rlhf.errors import InputError
from offline_rlhf.filters import SampleFilter, select

ROWS = [  # prompt a: rewards 1..5 with a duplicate; prompt b: 0, 10, 10
    {"prompt_id": "a", "sample_index": 0, "response": "a0", "reward": 1.0},
    {"prompt_id": "a", "sample_index": 1, "response": "a1", "reward": 5.0},
    {"prompt_id": "a", "sample_index": 2, "response": "a2", "reward": 3.0},
    {"prompt_id": "a", "sample_index": 3, "response": "a1", "reward": 5.0},
    {"prompt_id": "a", "sample_index": 4, "response": "a4", "reward": 4.0},
    {"prompt_id": "b", "sample_index": 0, "response": "b0", "reward": 0.0},
    {"prompt_id": "b", "sample_index": 1, "response": "b1", "reward": 10.0},
    {"prompt_id": "b", "sample_index": 2, "response": "b2", "reward": 10.0},
]


@pytest.mark.parametrize("f, kept", [
    (SampleFilter(), [0, 1, 2, 4, 5, 6, 7]),                    # only the duplicate goes
    (SampleFilter(dedupe=False), list(range(8))),
    (SampleFilter(top_k=1), [1, 6]),                           # ties: lower sample index wins
    (SampleFilter(threshold=4.0), [1, 4, 6, 7]),
    (SampleFilter(percentile=50), [1, 4, 6, 7]),               # a: median of 1,5,3,5,4 is 4; b: 10
    (SampleFilter(threshold=3.0, max_per_prompt=2), [1, 4, 6, 7]),
    (SampleFilter(percentile=0, max_per_prompt=1), [1, 6]),
])
def test_select_exact_rows(f, kept):
    got, stats = select(ROWS, f)
    assert got == kept
    assert stats["kept"] == len(kept) and stats["rows"] == 8


def test_percentile_is_per_prompt():
    import numpy as np
    rewards = [r["reward"] for r in ROWS]
    assert np.percentile(rewards, 50) == 4.5       # a global cut would drop a4 (reward 4)...
    got, stats = select(ROWS, SampleFilter(percentile=50))
    kept = {ROWS[i]["response"] for i in got}
    assert "a4" in kept and "a2" not in kept        # ...the per-prompt cut (4 for a) keeps it
    assert stats["below_percentile"] == 3           # a0, a2 and b0


def test_unscored_rows_refused():
    with pytest.raises(InputError, match="no reward"):
        select([{"prompt_id": "a", "response": "x", "reward": None}], SampleFilter())
