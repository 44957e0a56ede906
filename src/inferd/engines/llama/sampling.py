"""Sampling parameters and the llama.cpp C sampler chain built from them.

``SamplingParams`` is the engine's own type (vLLM's idea): the backend builds it from
PredictOptions, benchmarks build it directly. ``build_sampler`` turns it into one
native ``llama_sampler`` chain per sequence, so every sampling step (penalties, logit
bias, grammar, top-k/p, min-p, typical, temperature, mirostat, the seeded draw) runs
in C: the scheduler only calls ``llama_sampler_sample`` once per token.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from inferd.errors import InvalidArgument

DEFAULT_SEED = llama_cpp.LLAMA_DEFAULT_SEED
MAX_TOP_LOGPROBS = 20
_INT32_MAX = 2**31 - 1


class SamplerError(ValueError):
    """A sampling parameter llama.cpp refused (e.g. a grammar that does not parse)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """One request's generation settings; defaults are llama-server's. A plain dataclass.

    ``temperature <= 0`` means greedy. ``seed < 0`` means a random seed. ``logit_bias`` keys
    are token ids, or texts whose every token gets the bias (tokenized off the event loop).
    Output constraints, at most one: ``grammar`` (GBNF), ``json_schema`` (a parsed JSON
    schema), ``response_format`` (OpenAI's: json_object / json_schema); a forced
    ``Chat.tool_choice`` adds its own grammar when none of these is set.
    ``validate()`` checks every range (the engine calls it; fronts need not).
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
    logit_bias: dict[int | str, float] = field(default_factory=dict)
    grammar: str = ""  # GBNF
    json_schema: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: int = 0  # >0: return the chosen token's logprob and this many alternatives
    want_logprobs: bool = False

    def validate(self) -> None:
        """Raise ``InvalidArgument`` naming the (snake_case) field for any out-of-range value."""
        ints = (("max_tokens", self.max_tokens, 0, _INT32_MAX), ("top_k", self.top_k, 0, _INT32_MAX),
                ("repeat_last_n", self.repeat_last_n, -1, _INT32_MAX), ("mirostat", self.mirostat, 0, 2),
                ("n_keep", self.n_keep, -1, _INT32_MAX), ("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS))
        for name, value, lo, hi in ints:
            if not lo <= value <= hi:
                raise InvalidArgument(f"must be between {lo} and {hi}, got {value}", name)
        floats = (("temperature", self.temperature, 0.0, None), ("top_p", self.top_p, 0.0, 1.0),
                  ("min_p", self.min_p, 0.0, 1.0), ("typical_p", self.typical_p, 0.0, 1.0),
                  ("repeat_penalty", self.repeat_penalty, 0.0, None),
                  ("frequency_penalty", self.frequency_penalty, None, None),
                  ("presence_penalty", self.presence_penalty, None, None),
                  ("mirostat_tau", self.mirostat_tau, 0.0, None), ("mirostat_eta", self.mirostat_eta, 0.0, None))
        for name, value, lo, hi in floats:
            if not math.isfinite(value):
                raise InvalidArgument(f"must be a finite number, got {value}", name)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise InvalidArgument(f"must be {bound}, got {value}", name)
        for key, bias in self.logit_bias.items():
            if math.isnan(bias) or bias == math.inf:
                raise InvalidArgument(f"bias for {key!r} must be a number or -inf (ban), got {bias}", "logit_bias")
        if sum(bool(x) for x in (self.grammar, self.json_schema, self.response_format)) > 1:
            raise InvalidArgument("give at most one of grammar, json_schema and response_format", "grammar")

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
                    raise SamplerError(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})", "logit_bias")
            arr = (llama_cpp.llama_logit_bias * len(bias))()
            for i, (t, b) in enumerate(bias.items()):
                arr[i].token = t
                arr[i].bias = b
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        if (params.repeat_penalty not in (0.0, 1.0) or params.frequency_penalty
                or params.presence_penalty):
            last_n = n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
            # llama.h of the vendored llama.cpp: (n_vocab, penalty_last_n, repeat, freq, present);
            # tests/test_llama_abi.py checks every binding we call against that header.
            add(chain, llama_cpp.llama_sampler_init_penalties(
                n_vocab, last_n, params.repeat_penalty or 1.0, params.frequency_penalty, params.presence_penalty))
        if params.grammar:
            g = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not g:
                raise SamplerError("llama.cpp could not parse the GBNF grammar (it needs a 'root' rule)",
                                   "grammar")
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


def argmax_bans(params: SamplingParams, eog_tokens: frozenset[int] = frozenset()) -> frozenset[int] | None:
    """The banned tokens when ``params`` is plain greedy decoding, else None (use the chain).

    Why: llama.cpp's ``llama_sampler_sample`` copies all n_vocab logits into a candidate array
    before its greedy sampler scans it (~65 us for SmolLM2's 49k vocabulary); numpy's argmax
    over the same logits takes ~10 us. At 8 streams that is ~2 % of a decode step. Only
    stateless greedy chains qualify: no grammar, no penalties, and a logit bias made only of
    bans (-inf, e.g. IgnoreEOS); both pick the first of equal maxima, so the token is the same.
    """
    if params.temperature > 0 or params.grammar:  # (mirostat applies only above temperature 0)
        return None
    if params.repeat_penalty not in (0.0, 1.0) or params.frequency_penalty or params.presence_penalty:
        return None
    bans = {t for t, b in params.logit_bias.items() if b == float("-inf")}
    if len(bans) != len(params.logit_bias):
        return None  # a finite bias moves the maximum: the chain applies it
    if params.ignore_eos:
        bans |= eog_tokens
    return frozenset(bans)


def argmax_token(logits_ptr: Any, n_vocab: int, bans: frozenset[int]) -> int:
    """Greedy pick from llama.cpp's logits row (``llama_get_logits_ith``), skipping ``bans``."""
    logits = np.ctypeslib.as_array(logits_ptr, shape=(n_vocab,))
    token = int(logits.argmax())
    if token in bans:
        masked = logits.copy()
        masked[list(bans)] = -np.inf
        token = int(masked.argmax())
    return token


def free_sampler(chain: Any) -> None:
    if chain:
        llama_cpp.llama_sampler_free(chain)

