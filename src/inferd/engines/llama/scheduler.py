"""Continuous batching: one llama_decode per step over every active sequence.

The scheduler owns the generation context and one thread that runs ``step()`` while
there is work. Its surface is small (vLLM's shape): ``add`` a request, ``abort`` it,
``step``. Each active request holds one slot = one llama.cpp sequence id with its own
native sampler chain. A step puts the next token of every generating sequence, plus
as many prompt tokens of newly admitted sequences as fit in ``n_batch``, into ONE
batch, decodes it, and samples every sequence whose logits came out. New requests
join between steps; a cancelled or aborted one is dropped at the next step (within
one token) and its KV cells are freed at once.

Outputs leave through the request's ``emit`` callback, called on the scheduler thread
with a ``StepOutput``: the async backend forwards it with ``call_soon_threadsafe``, a
synchronous caller can push it into a ``queue.Queue``. Per-token Python work is kept
to a few attribute writes and one C sampling call per sequence; text assembly is
incremental (``detokenizer``) and logprobs are computed only when asked for (``logprobs``).
The request and output types and the errors ``add`` raises are in ``request``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable

import llama_cpp

from inferd.engines.llama.logprobs import token_logprobs
from inferd.engines.llama.model import LlamaModel
from inferd.engines.llama.prefix_cache import PrefixCache
from inferd.engines.llama.request import (
    Completion,
    Emit,
    EngineClosed,
    KVCacheFull,
    PromptTooLong,
    QueueFull,
    Request,
    StepOutput,
)
from inferd.engines.llama.sampling import (
    SamplingParams,
    argmax_bans,
    argmax_token,
    build_sampler,
    free_sampler,
)

log = logging.getLogger("inferd.engines.llama.scheduler")


def _by_slot(entry: tuple[Request, int]) -> int:
    """Sort key of a batch plan entry: the batch is written in slot order (see ``_step``)."""
    return entry[0].slot


class Scheduler:
    """Runs all generations of one ``LlamaModel`` on one thread (see module docstring)."""

    def __init__(self, model: LlamaModel, max_waiting: int = 64, cache_tokens: int | None = None) -> None:
        self.model = model
        self.ctx = model.ctx
        self.slots = model.n_seq_max
        self.n_ctx = model.n_ctx
        self.n_batch = model.n_batch
        self.max_waiting = max_waiting
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._free_slots = list(range(self.slots - 1, -1, -1))
        # default bound: half the KV cells, the other half stays for running requests
        self.cache = PrefixCache(model.memory, self.slots, unified=model.config.kv_unified,
                                 max_tokens=model.n_ctx_total // 2 if cache_tokens is None else cache_tokens)
        self._stop = False
        self.context_shifts = 0
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.slots)
        self._b_token = self._batch.token
        self._b_pos = self._batch.pos
        self._b_nseq = self._batch.n_seq_id
        self._b_seq = self._batch.seq_id
        self._b_logits = self._batch.logits
        self._eog = model.eog_tokens
        self.n_vocab = model.n_vocab
        #: plain greedy requests pick with numpy's argmax instead of the sampler chain (same token,
        #: ~6x cheaper: ``sampling.argmax_bans``); False runs every request through its chain
        self.fast_greedy = True
        # metrics (read by GetMetrics from other threads; plain ints are fine)
        self.total_generated = 0
        self.total_prompt = 0
        self.last_tokens_per_second = 0.0
        self.last_slot = -1
        self.last_prompt_text = ""
        # time accounting (scheduler thread): what the bench prints as per-step overhead
        self.steps = 0
        self.step_seconds = 0.0
        self.decode_seconds = 0.0
        self.sample_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="inferd-llama-scheduler", daemon=True)
        self._thread.start()

    # ---- public surface -----------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, emit: Emit,
            is_cancelled: Callable[[], bool] | None = None) -> Request:
        """Queue a generation; raises PromptTooLong, QueueFull, SamplerError, EngineClosed.

        The sampler chain is built here, on the caller's thread, so a bad grammar or
        logit bias fails the call before it takes a slot.
        """
        if not prompt:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt) >= self.n_ctx:
            raise PromptTooLong(len(prompt), self.n_ctx)
        sampler = build_sampler(params, self.model.vocab, self.model.n_vocab, self.n_ctx, self._eog)
        req = Request(next(self._ids), prompt, params, emit, is_cancelled, sampler)
        req.argmax_bans = argmax_bans(params, self._eog) if self.fast_greedy else None
        with self._cv:
            if self._stop:
                free_sampler(sampler)
                raise EngineClosed("the model is being unloaded")
            free = self.slots - len(self._active)
            if len(self._waiting) >= self.max_waiting + max(0, free):
                free_sampler(sampler)
                raise QueueFull(
                    f"all {self.slots} slots are busy and {len(self._waiting)} requests are waiting "
                    f"(bound {self.max_waiting}); retry later"
                )
            self._waiting.append(req)
            self._cv.notify()
        return req

    def abort(self, req: Request) -> None:
        """Drop ``req`` at the next step (within one token); safe from any thread."""
        req.aborted = True
        with self._cv:
            self._cv.notify()

    def active_count(self) -> int:
        return len(self._active)

    def waiting_count(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop the thread; pending and active requests finish with ``EngineClosed``."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()
        err = EngineClosed("the model was unloaded")
        for req in list(self._active):
            self._finish(req, "error", err)
        while self._waiting:
            self._finish(self._waiting.popleft(), "error", err)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # ---- the loop -----------------------------------------------------------------------
    def _run(self) -> None:
        cv = self._cv
        while True:
            with cv:
                while not self._stop and not self._waiting and not self._active:
                    cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - fail the requests, keep the engine alive
                log.exception("scheduler step failed")
                for req in list(self._active):
                    self._finish(req, "error", exc)

    def step(self) -> None:
        """Admit, build one batch, decode it, sample every sequence that has logits."""
        t0 = time.perf_counter()
        try:
            self._step()
        finally:
            self.steps += 1
            self.step_seconds += time.perf_counter() - t0

    def _admit(self, req: Request) -> None:
        """Give ``req`` a free slot, reusing cached prefix cells (``prefix_cache``)."""
        placement = self.cache.place(req.prompt, self._free_slots, [r for r in self._active if not r.shifted],
                                     {r.slot for r in self._active})
        self._free_slots.remove(placement.slot)
        req.slot = placement.slot
        keep = self.cache.claim(placement)
        req.n_past = req.n_prefilled = req.cached = keep
        req.t_admit = time.perf_counter()
        if placement.source_slot >= 0:
            src = placement.source_request
            if src is None or src.n_prefilled >= placement.source_tokens:
                self.cache.copy(placement.source_slot, req.slot, placement.source_tokens)
                req.n_past = req.n_prefilled = req.cached = placement.source_tokens
            else:
                req.wait_for = (src, placement.source_tokens)
        self._active.append(req)

    def _copy_when_ready(self, req: Request) -> bool:
        """For a request waiting on another's prefill: copy once done; False while still waiting."""
        assert req.wait_for is not None
        src, n = req.wait_for
        if src.done or src.slot < 0 or src.shifted:
            req.wait_for = None  # the source went away: compute the prefix ourselves
            return True
        if src.n_prefilled < n:
            return False
        req.wait_for = None
        self.cache.copy(src.slot, req.slot, n)
        req.n_past = req.n_prefilled = req.cached = n
        return True

    def _step(self) -> None:
        active = self._active
        # 1. drop cancelled / aborted sequences (frees their slots for admission below)
        for req in list(active):
            if req.aborted or (req.is_cancelled is not None and req.is_cancelled()):
                self._finish(req, "cancelled")
        # 2. admit waiting requests into free slots
        if self._waiting and self._free_slots:
            with self._cv:
                while self._waiting and self._free_slots:
                    req = self._waiting.popleft()
                    if req.aborted or (req.is_cancelled is not None and req.is_cancelled()):
                        self._finish(req, "cancelled")
                        continue
                    self._admit(req)
        if not active:
            return
        # 3. one batch: a token per generating sequence, then prompt chunks within n_batch.
        # Planned first, then written in slot order: with one KV stream per slot llama.cpp puts
        # only consecutive, increasing sequence ids in one ubatch (split_equal), so a batch in
        # admission order (slots 5, 2, 7, ...) was decoded as several graphs per step.
        plan: list[tuple[Request, int]] = []
        budget = self.n_batch
        for req in active:
            if req.n_prefilled == len(req.prompt):
                plan.append((req, 0))
                budget -= 1
        for req in active:
            remaining = len(req.prompt) - req.n_prefilled
            if remaining == 0:
                continue
            req.batch_idx = -1
            if budget <= 0:
                continue
            if req.wait_for is not None and not self._copy_when_ready(req):
                continue  # its prefix is being computed by another request
            take = min(len(req.prompt) - req.n_prefilled, budget)
            plan.append((req, take))
            budget -= take
        if len(plan) > 1:
            plan.sort(key=_by_slot)
        tok, pos, nseq, seq, logits = self._b_token, self._b_pos, self._b_nseq, self._b_seq, self._b_logits
        n = 0
        for req, take in plan:
            slot = req.slot
            if take == 0:
                tok[n] = req.last_token
                pos[n] = req.n_past
                nseq[n] = 1
                seq[n][0] = slot
                logits[n] = 1
                req.batch_idx = n
                n += 1
                continue
            start = req.n_prefilled
            p0 = req.n_past
            prompt = req.prompt
            for j in range(take):
                tok[n] = prompt[start + j]
                pos[n] = p0 + j
                nseq[n] = 1
                seq[n][0] = slot
                logits[n] = 0
                n += 1
            if start + take == len(prompt):
                logits[n - 1] = 1
                req.batch_idx = n - 1
        if n == 0:
            return
        self._batch.n_tokens = n
        t_decode = time.perf_counter()
        ret = llama_cpp.llama_decode(self.ctx, self._batch)
        t_decoded = time.perf_counter()
        self.decode_seconds += t_decoded - t_decode
        if ret != 0:
            self._decode_failed(ret, plan)
            return
        # 4. advance (mirror the cells in the prefix cache) and sample
        kv = self.cache.tokens
        for req, count in plan:
            if count == 0:  # one generated token
                req.n_past += 1
                kv[req.slot].append(req.last_token)
            else:
                start = req.n_prefilled
                kv[req.slot].extend(req.prompt[start:start + count])
                req.n_past += count
                req.n_prefilled += count
                self.total_prompt += count
        sample, logits_ith, n_vocab = llama_cpp.llama_sampler_sample, llama_cpp.llama_get_logits_ith, self.n_vocab
        for req, _count in plan:
            if req.batch_idx < 0:
                continue
            if req.argmax_bans is not None:
                token = argmax_token(logits_ith(self.ctx, req.batch_idx), n_vocab, req.argmax_bans)
            else:
                token = sample(req.sampler, self.ctx, req.batch_idx)
            self._on_token(req, token)
        self.sample_seconds += time.perf_counter() - t_decoded

    def _shift_context(self, req: Request) -> bool:
        """Make room when a sequence fills its context (llama.cpp's context shift).

        Only with ``n_keep != 0`` (PredictOptions.NKeep; -1 keeps the whole prompt):
        the first ``n_keep`` tokens stay, half of the rest is dropped from the KV cache and
        the tail is moved back, so generation continues past the context size. With the
        default ``n_keep == 0`` a full context ends the sequence with "length".
        Returns False when no shift is possible (model cannot shift, nothing to drop).
        """
        n_keep = req.params.n_keep
        if n_keep == 0:
            return False
        if n_keep < 0 or n_keep > len(req.prompt):
            n_keep = len(req.prompt)
        n_discard = (req.n_past - n_keep) // 2
        mem = self.model.memory
        if n_discard < 1 or not llama_cpp.llama_memory_can_shift(mem):
            return False
        seq = req.slot
        req.shifted = True
        self.cache.tokens[seq] = []  # cells moved: never a prefix to reuse
        llama_cpp.llama_memory_seq_rm(mem, seq, n_keep, n_keep + n_discard)
        llama_cpp.llama_memory_seq_add(mem, seq, n_keep + n_discard, req.n_past, -n_discard)
        req.n_past -= n_discard
        self.context_shifts += 1
        return True

    def _decode_failed(self, ret: int, plan: list[tuple[Request, int]]) -> None:
        if ret == 1 and self.cache.evict_one():
            return  # cached prefixes took the room: dropped one, everyone retries next step
        if ret == 1 and len(plan) > 1:
            # No room in the shared KV cache for everyone: evict the newest sequence
            # (llama.cpp rolled the failed batch back), the others retry next step.
            newest = max((r for r, _ in plan), key=lambda r: r.id)
            self._finish(newest, "error", KVCacheFull(
                f"the KV cache ({self.model.n_ctx_total} cells shared by {self.slots} slots) is full; "
                "retry, or load with a larger ContextSize"))
            return
        err: BaseException = KVCacheFull(f"the KV cache ({self.n_ctx} cells) is full") if ret == 1 else \
            RuntimeError(f"llama_decode failed with status {ret}")
        for req, _ in plan:
            self._finish(req, "error", err)

    def _on_token(self, req: Request, token: int) -> None:
        req.n_gen += 1
        if req.n_gen == 1:
            req.t_first = time.perf_counter()
        params = req.params
        if token in self._eog and not params.ignore_eos:
            self._finish(req, "stop")
            return
        text = req.detok.feed(self.model.piece(token))
        req.pending_ids.append(token)
        if req.pending_logprobs is not None:
            req.pending_logprobs.append(token_logprobs(self.model, self.ctx, req.batch_idx, token,
                                                          req.params.logprobs))
        if req.detok.stopped:
            self._finish(req, "stop", text=text)
            return
        if (params.max_tokens and req.n_gen >= params.max_tokens) or (
            req.n_past + 1 >= self.n_ctx and not self._shift_context(req)
        ):
            self._finish(req, "length", text=text)
            return
        req.last_token = token
        if text:
            out = StepOutput(text, req.pending_ids, req.pending_logprobs)
            req.pending_ids = []
            if req.pending_logprobs is not None:
                req.pending_logprobs = []
            self._emit(req, out)

    def _emit(self, req: Request, out: StepOutput) -> None:
        try:
            req.emit(out)
        except Exception:  # noqa: BLE001 - a gone consumer must not stop the others
            log.debug("emit failed for request %d; dropping it", req.id, exc_info=True)
            req.aborted = True

    def _finish(self, req: Request, reason: str, error: BaseException | None = None, text: str = "") -> None:
        if req.done:
            return
        req.done = True
        if reason in ("stop", "length"):
            text += req.detok.finish()
        if req.slot >= 0:
            self.cache.release(req.slot, keep_cache=error is None and not req.shifted)
            self._free_slots.append(req.slot)
            self.last_slot = req.slot
            req.slot = -1
        if req in self._active:
            self._active.remove(req)
        free_sampler(req.sampler)
        req.sampler = None
        now = time.perf_counter()
        t_first = req.t_first or now
        prompt_s = (t_first - req.t_admit) if req.t_admit else 0.0
        gen_s = (now - t_first) if req.t_first else 0.0
        n_gen = req.n_gen
        self.total_generated += req.n_gen
        if gen_s > 0 and req.n_gen > 1:
            self.last_tokens_per_second = (req.n_gen - 1) / gen_s
        completion = Completion(reason, len(req.prompt), n_gen, prompt_s, gen_s, error, req.cached)
        self._emit(req, StepOutput(text, req.pending_ids, req.pending_logprobs, completion))
