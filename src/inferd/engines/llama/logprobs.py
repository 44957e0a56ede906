"""OpenAI-shaped logprobs of a sampled token, from llama.cpp's raw logits.

Called by the scheduler thread right after sampling, only for requests that asked for
logprobs: the logits row of the sequence's batch index is still valid then, and is the
raw (pre-sampling) distribution, so the numbers do not depend on temperature, top-k or
grammar. A plain function of what it reads (model, context, batch index), kept out of the
scheduler loop it is called from.
"""

from __future__ import annotations

from typing import Any

import llama_cpp

from inferd.engines.llama.model import LlamaModel


def token_logprobs(model: LlamaModel, ctx: Any, batch_idx: int, token: int, top_k: int) -> dict[str, Any]:
    """OpenAI-format logprob entry of ``token`` from the raw (pre-sampling) logits.

    ``ctx`` is the context that decoded the batch, ``batch_idx`` the position whose logits
    came out, ``top_k`` how many alternatives to list (``top_logprobs``).
    """
    import numpy as np

    n_vocab = model.n_vocab
    ptr = llama_cpp.llama_get_logits_ith(ctx, batch_idx)
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
    m = float(logits.max())
    lse = m + float(np.log(np.exp(logits - m).sum()))
    piece = model.piece(token)
    entry: dict[str, Any] = {
        "token": piece.decode("utf-8", "replace"),
        "logprob": float(logits[token] - lse),
        "bytes": list(piece),
        "top_logprobs": [],
    }
    k = min(top_k, n_vocab)
    if k > 0:
        top = np.argpartition(-logits, k - 1)[:k]
        top = top[np.argsort(-logits[top])]
        for t in top:
            p = model.piece(int(t))
            entry["top_logprobs"].append(
                {"token": p.decode("utf-8", "replace"), "logprob": float(logits[t] - lse), "bytes": list(p)}
            )
    return entry
