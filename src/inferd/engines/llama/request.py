"""One generation request as the scheduler holds it, what a step emits for it, and the errors.

``Request`` is the scheduler's per-sequence state (one slot = one llama.cpp sequence id
with its own native sampler chain); ``StepOutput`` is what one step produced for one
request (a text delta and, at the end, its ``Completion``); the exceptions are what
``Scheduler.add`` raises or what a request finishes with. They live apart from the loop
(``scheduler``) so the async engine and callers can name them without the loop's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inferd.engines.llama.detokenizer import IncrementalDetokenizer
from inferd.engines.llama.sampling import SamplingParams


class PromptTooLong(ValueError):
    """The prompt does not fit in the context (leaving room for one generated token)."""

    def __init__(self, n_prompt: int, n_ctx: int) -> None:
        super().__init__(
            f"the prompt has {n_prompt} tokens but the context holds {n_ctx} "
            f"(at most {n_ctx - 1} prompt tokens, leaving room to generate)"
        )
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


class QueueFull(RuntimeError):
    """Every slot is busy and the wait queue is at its bound."""


class EngineClosed(RuntimeError):
    """The scheduler was stopped (model unloaded) while the request was pending."""


class KVCacheFull(RuntimeError):
    """The shared KV cache had no room left for this sequence."""


@dataclass
class Completion:
    """Final accounting of one request (attached to its last ``StepOutput``)."""

    finish_reason: str  # "stop", "length", "cancelled", "error"
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float
    generation_seconds: float
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache


@dataclass
class StepOutput:
    """What one step produced for one request: a text delta and, at the end, a Completion."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    completion: Completion | None = None


Emit = Callable[[StepOutput], None]


class Request:
    """One generation in the scheduler; fields after ``sampler`` are scheduler-private."""

    __slots__ = (
        "id", "prompt", "params", "emit", "is_cancelled", "sampler", "aborted", "slot",
        "n_past", "n_prefilled", "n_gen", "last_token", "batch_idx", "detok", "t_admit",
        "t_first", "pending_ids", "pending_logprobs", "done", "cached", "wait_for", "shifted",
        "argmax_bans",
    )

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, emit: Emit,
                 is_cancelled: Callable[[], bool] | None, sampler: Any) -> None:
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.emit = emit
        self.is_cancelled = is_cancelled
        self.sampler = sampler
        self.aborted = False
        self.slot = -1
        self.n_past = 0
        self.n_prefilled = 0
        self.n_gen = 0
        self.last_token = -1
        self.batch_idx = -1
        self.detok = IncrementalDetokenizer(params.stop)
        self.t_admit = 0.0
        self.t_first = 0.0
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[dict[str, Any]] | None = [] if params.want_logprobs else None
        self.done = False
        self.cached = 0  # prompt tokens reused from the prefix cache
        self.wait_for: tuple[Request, int] | None = None  # (active request, tokens) to copy once prefilled
        self.shifted = False  # a context shift moved its cells: not a valid prefix source any more
        self.argmax_bans: frozenset[int] | None = None  # plain greedy: numpy argmax, not the chain
