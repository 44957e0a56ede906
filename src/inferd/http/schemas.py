"""OpenAI request bodies as pydantic models: shape and range checks happen here.

A body that does not fit (wrong type, NaN, out of range, unknown ``n``) is refused
with 400 naming the field before any backend is asked. Fields OpenAI defines but
inferd cannot honour are refused explicitly (``n > 1``, ``echo``, ``suffix``) rather
than silently ignored. A few llama.cpp/LocalAI extensions are accepted (``top_k``,
``min_p``, ``repeat_penalty``, ``ignore_eos``, ``grammar``); unknown keys are ignored,
as OpenAI's own server does for forward compatibility.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS = 1 << 20
MAX_STOPS = 16
MAX_INPUTS = 2048


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class SamplingFields(_Body):
    """What chat and text completions share."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**31), lt=2**31)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama.cpp / LocalAI extensions
    top_k: int | None = Field(default=None, ge=0, le=1 << 16)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    ignore_eos: bool = False
    grammar: str | None = Field(default=None, max_length=1 << 20)


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=1024)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    reasoning_effort: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1, max_length=512)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class RerankRequest(_Body):
    """Jina's shape, which LocalAI serves at ``/v1/rerank``."""

    model: str = Field(min_length=1, max_length=512)
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1, max_length=MAX_INPUTS)
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = True


class SpeechRequest(_Body):
    model: str = Field(min_length=1, max_length=512)
    input: str = Field(min_length=1, max_length=1 << 16)
    voice: str = ""
    response_format: Literal["wav"] = "wav"
    language: str | None = None
