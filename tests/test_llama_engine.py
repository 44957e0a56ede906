"""The llama.cpp engine without the protocol: detokenizer, stop strings, scheduler.

Real generation on the packaged SmolLM2-135M-Instruct, loaded once for the module.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from inferd.engines.llama import (  # noqa: E402
    IncrementalDetokenizer,
    LlamaModel,
    ModelConfig,
    ModelLoadError,
    PromptTooLong,
    QueueFull,
    SamplerError,
    SamplingParams,
    Scheduler,
    StepOutput,
    StopMatcher,
    default_model_path,
)

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


# ---- pure units ------------------------------------------------------------------------
def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    m = StopMatcher(["STOP", "<|im_end|>"])
    out = []
    for piece in ["Hello S", "T", "O", "P and more"]:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello "
    assert hit


def test_stop_prefix_that_does_not_complete_is_released() -> None:
    m = StopMatcher(["STOP"])
    a, hit1 = m.feed("ST")
    b, hit2 = m.feed("ART")
    assert (a, hit1) == ("", False)
    assert a + b + m.flush() == "START" and not hit2


def test_utf8_split_bytes_are_held_never_replaced() -> None:
    d = IncrementalDetokenizer()
    data = "é日🎉".encode()
    outs = [d.feed(data[i:i + 1]) for i in range(len(data))]
    assert "".join(outs) + d.finish() == "é日🎉"
    assert all("\ufffd" not in o for o in outs)
    # every emitted chunk is made of whole characters only
    assert [o for o in outs if o] == ["é", "日", "🎉"]


def test_invalid_utf8_is_dropped_not_replaced() -> None:
    d = IncrementalDetokenizer()
    out = d.feed(b"a\xffb") + d.feed(b"\xe6\x97") + d.finish()
    assert out == "ab"


# ---- the real model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    # one thread: the suite shares 2 cores with other work, and spinning llama.cpp
    # threads collapse when a core is taken (see docs/llama-cpp.md, "Threads").
    # the default layout (kv_unified=False) is batch-invariant, so "batched == alone" is exact here.
    m = LlamaModel(ModelConfig(path=default_model_path(), n_ctx=1024, slots=4, threads=1))
    yield m
    m.close()


@pytest.fixture(scope="module")
def sched(model):
    s = Scheduler(model, max_waiting=2)
    yield s
    s.close()


def run(sched: Scheduler, prompt: list[int], params: SamplingParams) -> tuple[str, list[StepOutput]]:
    q: queue.Queue[StepOutput] = queue.Queue()
    sched.add(prompt, params, q.put)
    outs = []
    while True:
        out = q.get(timeout=60)
        outs.append(out)
        if out.completion is not None:
            return "".join(o.text for o in outs), outs


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_missing_and_corrupt_files_fail_with_reason(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaModel(ModelConfig(path=str(tmp_path / "nope.gguf")))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        LlamaModel(ModelConfig(path=str(bad)))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 40)
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaModel(ModelConfig(path=str(truncated)))


def test_model_reads_chat_template_metadata(model) -> None:
    assert "<|im_start|>" in model.metadata["tokenizer.chat_template"]
    assert model.n_seq_max == 4 and model.n_ctx == 1024


def test_greedy_is_deterministic_and_max_tokens_holds(sched, model) -> None:
    prompt = model.tokenize(CHAT.format("Name three colors."))
    a, outs = run(sched, prompt, greedy(12, ignore_eos=True))
    b, _ = run(sched, prompt, greedy(12, ignore_eos=True))
    assert a == b and a.strip()
    done = outs[-1].completion
    assert done.finish_reason == "length" and done.generated_tokens == 12
    assert done.prompt_tokens == len(prompt)


def test_same_seed_same_output(sched, model) -> None:
    prompt = model.tokenize(CHAT.format("Write a word."))
    p = dict(max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    a, _ = run(sched, prompt, SamplingParams(seed=1234, **p))
    b, _ = run(sched, prompt, SamplingParams(seed=1234, **p))
    others = {run(sched, prompt, SamplingParams(seed=s, **p))[0] for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1  # the seed really drives the draw


def test_stop_string_cuts_and_is_not_emitted(sched, model) -> None:
    prompt = model.tokenize(CHAT.format("Count from 1 to 10 separated by commas."))
    full, _ = run(sched, prompt, greedy(30, ignore_eos=True))
    assert "5" in full
    stop = full[full.index("5"):full.index("5") + 2]  # "5," or "5 ": spans a token boundary or not
    text, outs = run(sched, prompt, greedy(30, ignore_eos=True, stop=[stop]))
    assert stop not in text
    assert text == full[: full.index(stop)]
    assert outs[-1].completion.finish_reason == "stop"


def test_grammar_constrains_output_to_json(sched, model) -> None:
    grammar = r'''
root ::= "{" ws "\"name\"" ws ":" ws str ws "," ws "\"age\"" ws ":" ws num ws "}"
str ::= "\"" [a-zA-Z ]{1,12} "\""
num ::= [0-9]{1,3}
ws ::= [ ]?
'''
    prompt = model.tokenize(CHAT.format("Give me a person as JSON."))
    text, _ = run(sched, prompt, SamplingParams(max_tokens=40, temperature=0.8, seed=7, grammar=grammar))
    obj = json.loads(text)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)


def test_bad_grammar_is_refused_before_taking_a_slot(sched, model) -> None:
    with pytest.raises(SamplerError) as info:
        sched.add(model.tokenize("hi"), SamplingParams(grammar="root ::= ( unclosed"), lambda o: None)
    assert info.value.field == "grammar"
    assert sched.active_count() == 0 and sched.waiting_count() == 0


def test_prompt_longer_than_context_names_both_numbers(sched, model) -> None:
    prompt = model.tokenize("hello " * 1100)
    with pytest.raises(PromptTooLong) as info:
        sched.add(prompt, greedy(4), lambda o: None)
    assert str(len(prompt)) in str(info.value) and "1024" in str(info.value)


def test_four_concurrent_streams_match_single_runs(sched, model) -> None:
    questions = ["What is 2+2?", "Name a fruit.", "Say hello.", "What color is the sky?"]
    prompts = [model.tokenize(CHAT.format(q)) for q in questions]
    alone = [run(sched, p, greedy(16, ignore_eos=True))[0] for p in prompts]
    queues = []
    for p in prompts:
        q: queue.Queue[StepOutput] = queue.Queue()
        sched.add(p, greedy(16, ignore_eos=True), q.put)
        queues.append(q)
    together = []
    for q in queues:
        parts = []
        while True:
            out = q.get(timeout=60)
            parts.append(out.text)
            if out.completion is not None:
                break
        together.append("".join(parts))
    assert together == alone


def test_abort_stops_within_a_token_and_frees_the_slot(sched, model) -> None:
    prompt = model.tokenize(CHAT.format("Tell me a long story."))
    q: queue.Queue[StepOutput] = queue.Queue()
    req = sched.add(prompt, greedy(500, ignore_eos=True), q.put)
    first = q.get(timeout=60)
    assert first.completion is None
    slot = req.slot
    sched.abort(req)
    outs = []
    while True:
        out = q.get(timeout=10)
        outs.append(out)
        if out.completion is not None:
            break
    assert out.completion.finish_reason == "cancelled"
    # abort may land while a step is running: at most that one more token, then the drop
    assert len(outs) <= 2 and out.completion.generated_tokens <= len(first.token_ids) + 2
    # the slot is free again; its cells stay as a reusable prefix, mirrored exactly
    assert sched.active_count() == 0 and slot in sched._free_slots
    assert llama_cpp.llama_memory_seq_pos_max(model.memory, slot) + 1 == len(sched.cache.tokens[slot])


def test_cancel_callback_is_polled_each_step(sched, model) -> None:
    flag = threading.Event()
    q: queue.Queue[StepOutput] = queue.Queue()
    sched.add(model.tokenize("Once upon a time"), greedy(500, ignore_eos=True), q.put, flag.is_set)
    q.get(timeout=60)
    flag.set()
    t0 = time.monotonic()
    while True:
        out = q.get(timeout=10)
        if out.completion is not None:
            break
    assert out.completion.finish_reason == "cancelled"
    assert time.monotonic() - t0 < 5


def test_wait_queue_bound(model) -> None:
    s = Scheduler(model, max_waiting=1)
    try:
        # the model has 4 slots and this scheduler admits 4 + 1 waiting
        long = greedy(2000, ignore_eos=True)
        reqs = [s.add(model.tokenize("Once upon a time"), long, lambda o: None) for _ in range(5)]
        with pytest.raises(QueueFull):
            s.add(model.tokenize("Once upon a time"), long, lambda o: None)
        for r in reqs:
            s.abort(r)
    finally:
        s.close()


def test_utf8_never_split_in_real_generation(sched, model) -> None:
    prompt = model.tokenize(CHAT.format("Écris une phrase en japonais avec des emojis: 日本語 🎉"))
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3, top_k=0, top_p=1.0, min_p=0.0,
                            ignore_eos=True)
    text, outs = run(sched, prompt, params)
    ids = [t for o in outs for t in o.token_ids]
    assert all("\ufffd" not in o.text for o in outs)
    assert text == b"".join(model.piece(t) for t in ids).decode("utf-8", "ignore")


def test_logprobs_are_openai_shaped(sched, model) -> None:
    prompt = model.tokenize(CHAT.format("Hi"))
    _, outs = run(sched, prompt, greedy(4, ignore_eos=True, logprobs=3, want_logprobs=True))
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert len(entries) == 4
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert e["top_logprobs"][0]["token"] == e["token"]


def test_embeddings_are_normalised(model) -> None:
    a = model.embed(model.tokenize("The cat sat on the mat."))
    b = model.embed(model.tokenize("The cat sat on the mat."))
    assert len(a) == model.n_embd and a == b
    assert abs(sum(x * x for x in a) - 1.0) < 1e-3


def test_metadata_overrides_reach_llama_cpp() -> None:
    path = default_model_path()
    plain = LlamaModel(ModelConfig(path=path, n_ctx=256, slots=1, threads=1))
    overridden = LlamaModel(ModelConfig(path=path, n_ctx=256, slots=1, threads=1,
                                        kv_overrides=["tokenizer.ggml.add_bos_token=bool:true"]))
    try:
        assert plain.add_bos is False and overridden.add_bos is True
        assert overridden.tokenize("hi")[0] == overridden.bos_token
    finally:
        plain.close()
        overridden.close()
    with pytest.raises(ModelLoadError, match="Overrides"):
        LlamaModel(ModelConfig(path=path, kv_overrides=["no-equals-sign"]))


def test_context_shift_with_n_keep_generates_past_the_context() -> None:
    m = LlamaModel(ModelConfig(path=default_model_path(), n_ctx=64, slots=1, threads=1))
    s = Scheduler(m)
    try:
        prompt = m.tokenize(CHAT.format("Count from one to one hundred."))
        # NKeep = 0 (default): a full context ends the sequence
        _, outs = run(s, prompt, greedy(100, ignore_eos=True))
        done = outs[-1].completion
        assert done.finish_reason == "length" and done.generated_tokens < 100
        assert s.context_shifts == 0
        # NKeep = -1: keep the prompt, drop half of the rest, continue to the token limit
        text, outs = run(s, prompt, greedy(100, ignore_eos=True, n_keep=-1))
        done = outs[-1].completion
        assert done.finish_reason == "length" and done.generated_tokens == 100
        assert s.context_shifts >= 1 and text.strip()
    finally:
        s.close()
        m.close()


def test_greedy_argmax_path_picks_exactly_what_the_sampler_chain_picks(sched, model) -> None:
    from inferd.engines.llama.sampling import argmax_bans

    eog = model.eog_tokens
    assert argmax_bans(greedy(4), eog) == frozenset()
    assert argmax_bans(greedy(4, ignore_eos=True), eog) == eog
    assert argmax_bans(greedy(4, logit_bias={7: float("-inf")}), eog) == {7}
    assert argmax_bans(greedy(4, mirostat=2), eog) == frozenset()  # the chain is plain greedy at T=0 too
    for chain_only in (greedy(4, logit_bias={7: 2.0}), greedy(4, repeat_penalty=1.3), greedy(4, grammar='root ::= "a"'),
                       SamplingParams(max_tokens=4, temperature=0.7)):
        assert argmax_bans(chain_only, eog) is None
    prompt = model.tokenize(CHAT.format("Write three words about the sea."))
    first, _ = run(sched, prompt, greedy(1))
    banned = model.tokenize(first, add_special=False, parse_special=False)[0]
    cases = [greedy(24), greedy(24, ignore_eos=True), greedy(24, logit_bias={banned: float("-inf")})]
    try:
        fast = [run(sched, prompt, p)[0] for p in cases]
        sched.fast_greedy = False
        chain = [run(sched, prompt, p)[0] for p in cases]
    finally:
        sched.fast_greedy = True
    assert fast == chain
    assert not fast[2].startswith(first)  # the ban took effect on the argmax path too
