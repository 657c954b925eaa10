"""The request bodies of the OpenAI API (and lmforge's own routes) as Pydantic models: FastAPI
checks a body against them before any handler runs (a wrong type or range is a 422 with the
field's name). Fields OpenAI has and lmforge does not use (user, store, metadata, ...) are
accepted and ignored, so that unchanged clients keep working."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ContentPart(_Body):
    type: str
    text: Optional[str] = None
    image_url: Optional[Any] = None


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class JSONSchemaFormat(_Body):
    name: str = "output"
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What chat and completions share."""
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # lmforge's own sampling settings (vLLM and llama.cpp's server take the same names)
    top_k: Optional[int] = Field(None, ge=1)
    min_p: Optional[float] = Field(None, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    """Generate through the end-of-text token, to max_tokens (for benchmarks; vLLM and llama.cpp's
    server take the same field)."""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    # output constrained to a regex or a list of choices (vLLM's names for the same thing)
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)


class AskRequest(_Body):
    question: str = Field(min_length=1)
    model: Optional[str] = None
    collection: Optional[str] = None
    k: int = Field(3, ge=1, le=20)
    mode: Optional[Literal["hybrid", "bm25", "dense"]] = None
    """Default: hybrid when the server has an embedding model, else bm25."""
    max_tokens: int = Field(200, ge=1)
    stream: bool = False
