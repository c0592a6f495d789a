"""A synthetic multi-round chat workload shaped like LMBenchmark's multi-round QA.

`num_users` users share one system prompt; each round a user asks a question of `question_tokens` tokens, the
prompt being the system prompt, the user's whole history and the question; the answer (`answer_tokens`) joins the
history. Users take turns, `active_users` at a time, so a user's next round comes after the others' rounds: the
working set (every user's history) outgrows a small GPU cache, which is what an offloading cache is for.
Token ids are drawn from a seeded generator per (user, round), so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class ChatWorkload:
    """Shape of the workload; `requests()` yields the prompts in arrival order."""

    num_users: int = 12
    num_rounds: int = 6
    system_prompt_tokens: int = 1000
    question_tokens: int = 200
    answer_tokens: int = 100
    active_users: int = 4
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_rounds", "active_users", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ChatWorkload.{name} must be positive, got {getattr(self, name)}")
        for name in ("system_prompt_tokens", "question_tokens", "answer_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"ChatWorkload.{name} must not be negative, got {getattr(self, name)}")

    @property
    def num_requests(self) -> int:
        """Requests the workload yields (users x rounds)."""
        return self.num_users * self.num_rounds

    def _tokens(self, user: int, round_: int, what: int, n: int) -> list[int]:
        rng = np.random.default_rng((self.seed, user + 1, round_, what))  # user -1: the system prompt
        return rng.integers(0, self.vocab_size, n).tolist()

    def requests(self) -> Iterator["ChatRequest"]:
        """Prompts in arrival order: groups of `active_users` users take their rounds in turn."""
        system = self._tokens(-1, 0, 0, self.system_prompt_tokens)
        history: dict[int, list[int]] = {u: [] for u in range(self.num_users)}
        for first in range(0, self.num_users, self.active_users):
            group = range(first, min(first + self.active_users, self.num_users))
            for round_ in range(self.num_rounds):
                for user in group:
                    question = self._tokens(user, round_, 1, self.question_tokens)
                    answer = self._tokens(user, round_, 2, self.answer_tokens)
                    prompt = system + history[user] + question
                    yield ChatRequest(user, round_, prompt, answer)
                    history[user] = history[user] + question + answer


@dataclass
class ChatRequest:
    """One prompt of the workload and the answer the model will give."""

    user: int
    round: int
    prompt: list[int]
    answer: list[int] = field(repr=False)
