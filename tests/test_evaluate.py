import pytest

from offline_rlhf.errors import InputError
from offline_rlhf.evaluate import win_rate


def keyed(*rewards):
    return {(f"p{i}", 0): r for i, r in enumerate(rewards)}


def test_win_rate_known_answers():
    baseline = keyed(0.0, 1.0, -2.0, 0.5)
    assert win_rate(keyed(1.0, 2.0, -1.0, 0.6), baseline) == 1.0    # always better
    assert win_rate(keyed(-1.0, 0.0, -3.0, 0.4), baseline) == 0.0   # never better
    assert win_rate(dict(baseline), baseline) == 0.5                 # ties count half
    # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4
    assert win_rate(keyed(0.1, 1.0, -2.5, 0.7), baseline) == 0.625


def test_win_rate_pairs_samples_by_prompt_and_index():
    policy = {("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 5.0}
    baseline = {("a", 0): 0.0, ("a", 1): 1.0, ("c", 0): -9.0}
    assert win_rate(policy, baseline) == 0.5   # only ("a", 0) won, ("a", 1) lost
    with pytest.raises(InputError, match="share no evaluated prompt"):
        win_rate({("b", 0): 1.0}, {("c", 0): 0.0})
