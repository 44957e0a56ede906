"""Records -> token ids and labels (``-100`` where no loss is taken), plus the batch collator.

Chat records are rendered with the model's own chat template, turn by turn, so the tokens of
each assistant reply are known exactly and only they carry loss (the prompt is context, not
something to learn). This relies on the template rendering a prefix of a conversation as a
prefix of the full rendering, which holds for ChatML-style templates; when it does not, the
record is trained on every token and the job log says so.
"""

from __future__ import annotations

import logging
from typing import Any

from inferd.engines.finetune.dataset import record_kind
from inferd.engines.jobs.child import JobFailed

log = logging.getLogger("inferd.finetune")
IGNORE = -100


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise JobFailed("the dataset has chat (messages) records but the model has no chat template; "
                        "use prompt/completion or text records")

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0 and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False,
                                             add_generation_prompt=generation_prompt)

    full = render(len(messages))
    segments: list[tuple[str, bool]] = []  # (text, carries loss)
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, rendered = render(i, True), render(i + 1)
        if not (full.startswith(rendered) and rendered.startswith(prompt) and len(prompt) >= pos
                and prompt.startswith(full[:pos])):
            log.warning("chat template is not prefix-stable; training on every token of this record")
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            return ids, list(ids)
        segments += [(prompt[pos:], False), (rendered[len(prompt):], True)]
        pos = len(rendered)
    segments.append((full[pos:], False))
    ids, labels = [], []
    for text, learn in segments:
        if text:
            part = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += part
            labels += part if learn else [IGNORE] * len(part)
    return ids, labels


def encode(tokenizer: Any, record: dict[str, Any], index: int, max_len: int) -> dict[str, list[int]]:
    kind = record_kind(record, index)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "messages":
        ids, labels = _chat_ids(tokenizer, record["messages"])
    elif kind == "prompt_completion":
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
    else:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos
        labels = list(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels):
        raise JobFailed(f"record {index}: nothing left to learn after truncation to {max_len} tokens "
                        "(raise extra_options.max_seq_length)")
    return {"input_ids": ids, "labels": labels}


class Collator:
    """Pads a batch to its longest example and counts the tokens it trained on."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [self.pad_id] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        self.tokens += sum(len(b["input_ids"]) for b in batch)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(mask)}
