"""The nights' guard against collapse: is a night's policy promoted?

A night is *not promoted* when one ``[nights.guard]`` threshold trips:

- ``reward_margin``: its held-out policy reward (the guard's eval stage) is below the best
  promoted night's (before any: the starting policy's, night 0's baseline) by more than
  the margin;
- ``entropy_fraction``: the token entropy of its sampled held-out responses is below this
  fraction of the starting policy's;
- ``kl_max``: its KL to the starting policy (k3, per response) is above the bound.

The next night then starts from the best promoted policy (the starting policy while there
is none), the run says so in one line; ``patience`` such nights in a row stop the run.
The best promoted night is the one with the highest held-out reward (the latest promoted
one when there is no eval stage). Decisions read only a night's record, so a rerun makes
the same ones.
"""

from __future__ import annotations

import sys


def _trips(g, rec: dict, state) -> tuple[list[str], float | None, str]:
    ev = (rec.get("evals") or {}).get(rec.get("guard_stage")) or {}
    reward = ev.get("policy_reward")
    if state.best_night is not None:
        ref, ref_name = state.best_reward, f"night {state.best_night}"
    else:
        ref, ref_name = state.start_reward, "the starting policy"
    trips = []
    if g.reward_margin is not None and reward is not None and ref is not None \
            and reward < ref - g.reward_margin:
        trips.append(f"held-out reward {reward:.4f} is below {ref_name}'s {ref:.4f} by more than "
                     f"reward_margin {g.reward_margin:g}")
    d = rec.get("drift") or {}
    if g.entropy_fraction is not None and d.get("entropy") is not None and state.start_entropy \
            and d["entropy"] < g.entropy_fraction * state.start_entropy:
        trips.append(f"token entropy {d['entropy']:.4f} is below entropy_fraction {g.entropy_fraction:g} "
                     f"of the starting policy's {state.start_entropy:.4f}")
    if g.kl_max is not None and d.get("kl") is not None and d["kl"] > g.kl_max:
        trips.append(f"KL to the starting policy {d['kl']:.4f} is above kl_max {g.kl_max:g}")
    return trips, reward, ref_name


def decide(g, n: int, rec: dict, state) -> None:
    """Fill ``rec["guard"]`` (promoted, reasons, the policy that starts the next night) and
    ``rec["stopped"]`` when patience runs out; update ``state`` (best night, failures)."""
    trips, reward, ref_name = _trips(g, rec, state)
    promoted = not trips
    if promoted:
        state.failures = 0
        if state.best_night is None or reward is None or state.best_reward is None \
                or reward > state.best_reward:
            state.best_night, state.best_policy, state.best_reward = n, rec["policy_out"], reward
        nxt = rec["policy_out"]
    else:
        state.failures += 1
        nxt = state.best_policy or state.start_policy
    best = f"night {state.best_night}" if state.best_night is not None else "the starting policy"
    rec["guard"] = {"promoted": promoted, "reasons": trips, "held_out_reward": reward,
                    "compared_with": ref_name, "best_night": state.best_night,
                    "next_policy": nxt, "failures_in_a_row": state.failures}
    if not promoted:
        msg = f"night {n}: not promoted ({'; '.join(trips)}); night {n + 1} starts from {best}'s policy"
        rec["guard"]["message"] = msg
        print(msg, file=sys.stderr)
    if g.patience and state.failures >= g.patience:
        rec["stopped"] = (f"stopped after night {n}: {state.failures} nights in a row not promoted "
                          f"(nights.guard.patience = {g.patience}); best: {best}")
        print(rec["stopped"], file=sys.stderr)
