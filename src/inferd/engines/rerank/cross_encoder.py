"""A cross-encoder on onnxruntime: (query, document) pairs in, one relevance logit per pair out.

Unlike a bi-encoder, which embeds query and document apart and compares the vectors, a
cross-encoder reads the pair together ("[CLS] query [SEP] document [SEP]"), so every
query word attends to every document word: it tells a passage that answers the question
from one that only shares its words (tests/test_rerank.py measures both).

Inputs: the pair is tokenized by the model's own ``tokenizer.json`` with ``tokenizers``
(no torch, no transformers). Pairs longer than ``max_length`` tokens are truncated
longest-first (the document loses tokens before the query does), as sentence-transformers'
``CrossEncoder`` does. The packaged tokenizer.json pads every input to 512 tokens; that
is switched off and each batch is padded only to its longest pair, which is most of the
speed on short passages.

``score`` is thread-safe (onnxruntime sessions and ``tokenizers`` encoders are), so one
model can serve several batcher workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inferd.engines.rerank.model_files import CrossEncoderFiles

log = logging.getLogger("inferd.engines.rerank")

#: Characters of one text kept before tokenizing: far past any model's token limit (a
#: WordPiece token spans at most ~100 characters), so it only bounds the tokenizer's work on
#: a megabyte-long document, never what the model sees of an ordinary one.
MAX_CHARS_PER_TEXT = 65536


@dataclass(frozen=True)
class Scored:
    """The logits for a list of pairs and how many tokens each pair became (after truncation)."""

    logits: np.ndarray  # float32 [n]
    token_counts: list[int]

    @staticmethod
    def concat(parts: list[Scored]) -> Scored:
        return Scored(np.concatenate([p.logits for p in parts]), [c for p in parts for c in p.token_counts])

    def take(self, rows: Sequence[int]) -> Scored:
        return Scored(self.logits[list(rows)], [self.token_counts[r] for r in rows])


class CrossEncoder:
    """An ONNX cross-encoder and its tokenizer; ``score`` runs one padded batch."""

    def __init__(self, files: CrossEncoderFiles, *, threads: int | None = None,
                 max_length: int | None = None, spinning: bool = True) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.files = files
        self.max_length = min(max_length or files.max_length, files.max_length)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spinning:  # idle intra-op threads sleep instead of spinning: better on a shared, busy CPU
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(files.onnx_path), opts, providers=["CPUExecutionProvider"])
        self.threads = opts.intra_op_num_threads
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise ValueError(f"{files.onnx_path} takes {sorted(inputs)}, not input_ids: not a BERT-style cross-encoder")
        unknown = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ValueError(f"{files.onnx_path} needs inputs this engine does not provide: {sorted(unknown)}")
        self._inputs = inputs
        self._dtype = {name: (np.int32 if kind == "tensor(int32)" else np.int64) for name, kind in inputs.items()}
        self.tokenizer = Tokenizer.from_file(str(files.tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def score(self, pairs: Sequence[tuple[str, str]]) -> Scored:
        """Logits for ``pairs`` (higher = more relevant), one forward over the whole list."""
        if not pairs:
            return Scored(np.zeros(0, dtype=np.float32), [])
        encodings = self.tokenizer.encode_batch(
            [(q[:MAX_CHARS_PER_TEXT], d[:MAX_CHARS_PER_TEXT]) for q, d in pairs])
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {name: feed[name].astype(self._dtype[name], copy=False) for name in self._inputs}
        out = np.asarray(self.session.run(None, feed)[0], dtype=np.float32)
        return Scored(_relevance_logit(out), [len(e.ids) for e in encodings])

    def count_tokens(self, query: str, document: str) -> int:
        """Tokens the model sees for one pair (after truncation, with [CLS]/[SEP])."""
        return len(self.tokenizer.encode(query[:MAX_CHARS_PER_TEXT], document[:MAX_CHARS_PER_TEXT]).ids)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _relevance_logit(out: np.ndarray) -> np.ndarray:
    """One logit per pair from the model's output: [n], [n, 1], or two classes [n, 2].

    With two classes (not relevant, relevant) the logit difference is the relevance
    logit: its sigmoid equals the softmax probability of "relevant".
    """
    if out.ndim == 1:
        return out
    if out.ndim == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.ndim == 2 and out.shape[1] == 2:
        return out[:, 1] - out[:, 0]
    raise ValueError(f"cross-encoder output has shape {out.shape}; expected [n], [n, 1] or [n, 2]")
