"""Sampling parameters and the llama.cpp C sampler chain built from them.

``SamplingParams`` is the engine's own type (vLLM's idea): the backend builds it from
PredictOptions, benchmarks build it directly. ``build_sampler`` turns it into one
native ``llama_sampler`` chain per sequence, so every sampling step (penalties, logit
bias, grammar, top-k/p, min-p, typical, temperature, mirostat, the seeded draw) runs
in C: the scheduler only calls ``llama_sampler_sample`` once per token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

DEFAULT_SEED = llama_cpp.LLAMA_DEFAULT_SEED


class SamplerError(ValueError):
    """A sampling parameter llama.cpp refused (e.g. a grammar that does not parse)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """One request's generation settings; defaults are llama-server's.

    ``temperature <= 0`` means greedy. ``seed < 0`` means a random seed.
    """

    max_tokens: int = 0  # 0: until EOS or the context is full
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # -1: the whole context
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat: int = 0  # 0 off, 1 mirostat, 2 mirostat v2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n_keep: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str = ""  # GBNF
    logprobs: int = 0  # >0: return the chosen token's logprob and this many alternatives
    want_logprobs: bool = False

    def resolved_seed(self) -> int:
        if self.seed is None or self.seed < 0:
            return random.getrandbits(32) & 0xFFFFFFFE  # never LLAMA_DEFAULT_SEED (= random)
        return self.seed & 0xFFFFFFFF


def build_sampler(params: SamplingParams, vocab: Any, n_vocab: int, n_ctx: int,
                  eog_tokens: frozenset[int] = frozenset()) -> Any:
    """Build the native sampler chain for ``params``; the caller frees it.

    Order follows llama.cpp's common sampler: logit bias, penalties, grammar, then the
    truncation samplers and temperature, then the draw (greedy, mirostat or seeded).
    Raises ``SamplerError`` naming the field when llama.cpp refuses a value.
    """
    chain_params = llama_cpp.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(chain_params)
    add = llama_cpp.llama_sampler_chain_add
    try:
        bias = dict(params.logit_bias)
        if params.ignore_eos and not params.grammar:
            # (with a grammar, end-of-generation is how a completed grammar stops: a
            # banned EOG would leave no allowed token at all)
            for t in eog_tokens:
                bias[t] = float("-inf")
        if bias:
            for t in bias:
                if not 0 <= t < n_vocab:
                    raise SamplerError(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})", "LogitBias")
            arr = (llama_cpp.llama_logit_bias * len(bias))()
            for i, (t, b) in enumerate(bias.items()):
                arr[i].token = t
                arr[i].bias = b
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        if (params.repeat_penalty not in (0.0, 1.0) or params.frequency_penalty
                or params.presence_penalty):
            last_n = n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
            add(chain, llama_cpp.llama_sampler_init_penalties(
                last_n, params.repeat_penalty or 1.0, params.frequency_penalty, params.presence_penalty))
        if params.grammar:
            g = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not g:
                raise SamplerError("llama.cpp could not parse the GBNF grammar (it needs a 'root' rule)",
                                   "Grammar")
            add(chain, g)
        seed = params.resolved_seed()
        if params.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        elif params.mirostat == 1:
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_mirostat(
                n_vocab, seed, params.mirostat_tau, params.mirostat_eta, 100))
        elif params.mirostat == 2:
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_mirostat_v2(seed, params.mirostat_tau, params.mirostat_eta))
        else:
            if params.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            if 0 < params.typical_p < 1:
                add(chain, llama_cpp.llama_sampler_init_typical(params.typical_p, 1))
            if 0 < params.top_p < 1:
                add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
    return chain


def free_sampler(chain: Any) -> None:
    if chain:
        llama_cpp.llama_sampler_free(chain)

