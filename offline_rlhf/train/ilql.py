"""``train ilql``: Implicit Language Q-Learning on scored generations.

Rewards: the sequence reward, standardised over the dataset, on the last response
token; or the shard's per-token ``token_rewards`` when present. Every response token
is a transition: state = prompt + earlier response tokens, action = the token; the
last one is terminal. The policy, its V/Q heads and (by Polyak averaging) the target
Q heads are trained together; the heads are saved as ``OUTPUT/final/heads.*``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..batching import pad
from ..config import opt
from ..errors import InputError
from ..ilql import ILQLHeads
from ..losses.ilql import (
    advantage,
    awac_loss,
    cql_loss,
    expectile_loss,
    masked_mean,
    next_values,
    td_loss,
    td_targets,
)
from ..shards import open_dataset_of
from .loop import TrainConfig, fit
from .values import check_finite

ILQL_MADE_BY = "`offline-rlhf generate` then `offline-rlhf score`"


@dataclasses.dataclass
class ILQLTrainConfig(TrainConfig):
    data: str = opt(help="scored generations dataset (rewards per sequence, or per token)")
    tau: float = opt(0.7, "expectile of the value loss")
    gamma: float = opt(0.99, "discount")
    cql_scale: float = opt(0.1, "weight of the CQL term")
    awac_scale: float = opt(1.0, "weight of the AWAC (weighted likelihood) term")
    awac_beta: float = opt(1.0, "AWAC inverse temperature (0: behaviour cloning)")
    alpha: float = opt(0.001, "Polyak coefficient of the target Q heads")
    target_sync_steps: int = opt(1, "update the target heads every N optimizer steps")
    two_qs: bool = opt(True, "two Q heads (the minimum of their targets is used)")
    max_tokens: int = opt(2048, "prompt + response tokens kept (prompt cut from the left)")
    detach_heads: bool = opt(True, "train the V/Q heads on detached hidden states: the language "
                             "model then learns only from the AWAC term (the TD/CQL gradients "
                             "through a shared trunk degraded the policy on the toy task)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.tau < 1:
            raise InputError(f"tau: must be in (0, 1), got {self.tau}")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"alpha: must be in [0, 1], got {self.alpha}")


class ILQLTask:
    name = "ilql"

    def __init__(self, cfg: ILQLTrainConfig, tokenizer):
        self.cfg, self.tokenizer, self.heads = cfg, tokenizer, None
        ds = open_dataset_of(cfg.data, "generations", "train ilql", ILQL_MADE_BY)
        t = ds.read(columns=["prompt", "prompt_token_ids", "response_token_ids", "reward", "token_rewards"])
        rewards = t.column("reward").to_pylist()
        if any(r is None for r in rewards):
            raise InputError(f"{cfg.data}: has unscored rows; run `offline-rlhf score` first")
        r = np.array(rewards, dtype=np.float64)
        standard = (r - r.mean()) / (r.std() if r.std() > 1e-8 else 1.0)
        self.stats = {"rows": t.num_rows, "reward_mean": float(r.mean()), "reward_std": float(r.std())}
        self.prompts, self.responses, self.rewards = [], [], []
        for i, (p, resp, tok_r) in enumerate(zip(t.column("prompt_token_ids").to_pylist(),
                                                 t.column("response_token_ids").to_pylist(),
                                                 t.column("token_rewards").to_pylist())):
            p = p or tokenizer(t.column("prompt")[i].as_py())["input_ids"]
            if not resp:
                continue
            resp = resp[:cfg.max_tokens - 1]
            room = cfg.max_tokens - len(resp)
            self.prompts.append(p[-room:])
            self.responses.append(resp)
            if tok_r is not None:
                self.rewards.append(list(tok_r)[:len(resp)])
            else:
                self.rewards.append([0.0] * (len(resp) - 1) + [float(standard[i])])

    def attach(self, heads) -> None:
        self.heads = heads

    def lengths(self) -> np.ndarray:
        return np.array([len(p) + len(r) for p, r in zip(self.prompts, self.responses)])

    def collate(self, indices: list[int], device) -> dict:
        seqs = [self.prompts[i] + self.responses[i] for i in indices]
        ids, attn = pad(seqs, self.tokenizer.pad_token_id, "right", device)
        n_resp = max(len(self.responses[i]) for i in indices)
        # per response token t of row b: predicting position, action, reward, next position
        pred = torch.zeros((len(indices), n_resp), dtype=torch.long)
        act = torch.zeros_like(pred)
        rew = torch.zeros((len(indices), n_resp))
        mask = torch.zeros((len(indices), n_resp))
        done = torch.zeros((len(indices), n_resp))
        for b, i in enumerate(indices):
            n_p, n_r = len(self.prompts[i]), len(self.responses[i])
            pred[b, :n_r] = torch.arange(n_p - 1, n_p - 1 + n_r)
            act[b, :n_r] = torch.tensor(self.responses[i])
            rew[b, :n_r] = torch.tensor(self.rewards[i])
            mask[b, :n_r] = 1.0
            done[b, n_r - 1] = 1.0
        return {"input_ids": ids, "attention_mask": attn, "pred": pred.to(device),
                "actions": act.to(device), "rewards": rew.to(device), "mask": mask.to(device),
                "done": done.to(device)}

    def loss(self, model, batch):
        cfg = self.cfg
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True)
        rows = torch.arange(len(batch["pred"]), device=batch["pred"].device)[:, None]
        hidden = out.hidden_states[-1][rows, batch["pred"]]          # [B, T, H]
        if cfg.detach_heads:
            hidden = hidden.detach()
        logits = out.logits[rows, batch["pred"]].float()             # [B, T, V]
        h = self.heads(hidden)
        a = batch["actions"][..., None]
        v = h["v"]
        targets = td_targets(batch["rewards"], next_values(v), batch["done"], cfg.gamma)
        q1 = h["q1"].gather(-1, a)[..., 0]
        tq = h["target_q1"].gather(-1, a)[..., 0]
        loss_q = td_loss(q1, targets)
        loss_cql = cql_loss(h["q1"].flatten(0, 1), batch["actions"].flatten()).view_as(q1)
        if cfg.two_qs:
            q2 = h["q2"].gather(-1, a)[..., 0]
            loss_q = loss_q + td_loss(q2, targets)
            loss_cql = loss_cql + cql_loss(h["q2"].flatten(0, 1), batch["actions"].flatten()).view_as(q1)
            tq = torch.minimum(tq, h["target_q2"].gather(-1, a)[..., 0])
        loss_v = expectile_loss(v, tq, cfg.tau)
        logp = logits.gather(-1, a)[..., 0] - torch.logsumexp(logits, -1)
        adv = advantage(tq, v)
        loss_awac = awac_loss(logp, adv, cfg.awac_beta)
        m = batch["mask"]
        terms = {"loss/q": masked_mean(loss_q, m), "loss/v": masked_mean(loss_v, m),
                 "loss/cql": masked_mean(loss_cql, m), "loss/awac": masked_mean(loss_awac, m)}
        total = terms["loss/q"] + terms["loss/v"] + cfg.cql_scale * terms["loss/cql"] + \
            cfg.awac_scale * terms["loss/awac"]
        metrics = {k: x.detach() for k, x in terms.items()}
        metrics.update({"q/mean": masked_mean(q1, m).detach(), "v/mean": masked_mean(v, m).detach(),
                        "advantage/mean": masked_mean(adv, m).detach(),
                        "advantage/max": (adv.masked_fill(m == 0, -1e9)).amax(-1).detach()})
        return total, metrics

    def after_step(self, step: int) -> None:
        if step % self.cfg.target_sync_steps == 0:
            heads = getattr(self.heads, "module", self.heads)
            heads.sync_targets(self.cfg.alpha)


def train_ilql(cfg: ILQLTrainConfig) -> dict:
    open_dataset_of(cfg.data, "generations", "train ilql", ILQL_MADE_BY)  # before any model loads
    check_finite(cfg.data, "generations", ["reward", "token_rewards"], "train ilql")
    holder = {}

    def factory(model, tokenizer, acc):
        holder["task"] = ILQLTask(cfg, tokenizer)
        return holder["task"]

    def make_heads(model):
        torch.manual_seed(cfg.seed)
        return ILQLHeads(model.config.hidden_size, model.config.vocab_size, cfg.two_qs).to(
            next(model.parameters()).device)

    return fit(cfg, factory, extra_modules=make_heads)   # its "data": the task's stats
