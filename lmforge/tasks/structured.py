"""Uses of constrained output, each one function over a loaded LM (the CLI and the server call
these): extraction over a file, tool calls in OpenAI's shape, zero-shot classification by an
LLM, think-then-answer, and the explanation of what a constraint changed."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.api import LM, describe_spec
from lmforge.engine import Request
from lmforge.engine.constraint import COMPACT_JSON, Spec, close_objects
from lmforge.errors import LMForgeError, TruncatedOutput



# ------------------------------------------------------------------------------- extraction
@dataclass
class ExtractReport:
    done: int
    skipped: int
    """Lines already in the output file from an earlier run."""
    failed: int
    """Lines whose output ran out of tokens (written with an "error")."""
    total: int


def read_inputs(path: Path) -> list[str]:
    """The texts of a .txt file (one per non-blank line) or a .jsonl file (a string per line,
    or an object with a "text" field)."""
    from lmforge.common import read_lines

    if not path.is_file():
        raise LMForgeError(f"input file not found: {path}")
    lines = read_lines(path)
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LMForgeError(f"{path}:{n}: not JSON ({e.msg})") from None
            text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise LMForgeError(f'{path}:{n}: expected a string or an object with a "text" string')
            texts.append(text)
        return texts
    return [line for line in lines if line.strip()]


def _done_lines(out: Path) -> set[int]:
    """Line numbers already written; a last line cut short by a crash is removed first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(out, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    done = set()
    for line in data.decode("utf-8").splitlines():
        try:
            done.add(int(json.loads(line)["line"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LMForgeError(f"{out} holds a line that extract did not write; use another --out") from None
    return done


def extract(lm: LM, schema: Any, input: Path, out: Path, *, instruction: str | None = None,
            max_new_tokens: int = 256, batch: int = 8, progress: Callable[[int, int], None] | None = None,
            **sampling: Any) -> ExtractReport:
    """One JSON object that follows `schema` per input text, appended to `out` as
    {"line": n, "input": text, "output": {...}} (or "error" when the output ran out of
    tokens). Rerunning skips the lines already in `out`; each line is written whole with one
    write, so a crash never leaves half a line that counts. Requests run `batch` at a time."""
    spec = Spec.json_schema(schema)
    lm.vocabulary.compile(spec)  # a bad schema fails before any work
    texts = read_inputs(Path(input))
    if not texts:
        raise LMForgeError(f"{input} has no texts")
    done = _done_lines(Path(out))
    todo = [(n, t) for n, t in enumerate(texts, 1) if n not in done]
    sampling.setdefault("temperature", 0)
    ask = instruction or "Extract the information from this text."
    failed = 0
    with open(out, "ab") as f:
        for at in range(0, len(todo), batch):
            group = todo[at:at + batch]
            reqs = {}
            for n, text in group:
                if lm.tokenizer.chat_template:
                    ids = lm.chat_ids(describe_spec([{"role": "user", "content": f"{ask}\n\n{text}"}], spec))
                else:
                    ids = lm.encode_prompt(f"{ask}\n\n{text}\n\nJSON: ")
                req = lm.request(ids, max_new_tokens, spec=spec, **sampling)
                reqs[lm.engine.submit(req)] = (n, text, req)
            texts_out: dict[int, list[str]] = {rid: [] for rid in reqs}
            while reqs:
                for ev in lm.engine.step():
                    if ev.request_id not in reqs:
                        continue
                    texts_out[ev.request_id].append(ev.text)
                    if ev.finish_reason is None:
                        continue
                    n, text, req = reqs.pop(ev.request_id)
                    cons = req.processors[-1]
                    row: dict[str, Any] = {"line": n, "input": text}
                    if ev.finish_reason in ("stop", "length") and cons.complete:
                        row["output"] = json.loads("".join(texts_out[ev.request_id]))
                    else:
                        row["error"] = f"the output ran out of tokens ({max_new_tokens}) before it was complete"
                        failed += 1
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                    f.flush()
                    if progress is not None:
                        progress(len(done) + at + len(group) - len(reqs), len(texts))
            os.fsync(f.fileno())
    return ExtractReport(len(todo) - failed, len(done), failed, len(texts))


# ------------------------------------------------------------------------------- tool calls
def _tool_schema(tool: dict) -> tuple[str, dict]:
    fn = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise LMForgeError('each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    Spec.json_schema(params)  # (checked: the error names the keyword and its path)
    # closed to keys the function does not take, as OpenAI's strict mode does (a small model
    # otherwise copies the schema's own words, "type" and "required", into the arguments)
    return fn["name"], close_objects(params)


def _call_schema(tools: list[tuple[str, dict]]) -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False} for name, params in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"x-guidance": COMPACT_JSON, **schema}


def tool_messages(messages: list[dict], tools: list[tuple[str, dict, str]]) -> list[dict]:
    """The conversation with the tools described in its system message."""
    lines = ["You can call these functions:"]
    for name, params, desc in tools:
        lines.append(f"- {name}: {desc or 'no description'}; arguments: {json.dumps(params)}")
    lines.append('To call one, reply with only {"name": <function name>, "arguments": {...}}. '
                 "Otherwise answer in plain text.")
    text = "\n".join(lines)
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{text}"
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs


@dataclass
class ToolTurn:
    """The request for an assistant turn that may call tools, and how to read its output."""
    request: Request
    tools: list[str]
    """The names the turn may call."""

    def message(self, text: str, finish_reason: str, complete: bool | None) -> dict:
        """The assistant message in OpenAI's shape from the turn's generated text."""
        if text.startswith("{"):
            if not complete:
                raise TruncatedOutput("the tool call ran out of tokens before it was complete: raise the token limit",
                                      text)
            value = json.loads(text)
            return {"role": "assistant", "content": None, "finish_reason": "tool_calls", "tool_calls": [{
                "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(value["arguments"], ensure_ascii=False)}}]}
        # a text answer may end at the token limit, like any chat reply (finish_reason says so)
        return {"role": "assistant", "content": text, "finish_reason": finish_reason}


def tool_turn(lm: LM, messages: list[dict], tools: Sequence[dict], tool_choice: Any = "auto",
              max_new_tokens: int = 256, stop: Sequence[str] = (), logprobs: bool = False, top_logprobs: int = 0,
              **sampling: Any) -> ToolTurn:
    """The engine request for an assistant turn with tools (see chat_with_tools); the server
    runs it beside others and reads the result with `ToolTurn.message`."""
    if not tools:
        raise LMForgeError("no tools given")
    parsed = [(*_tool_schema(t), (t.get("function") or {}).get("description", "")) for t in tools]
    for name, params, _ in parsed:  # each tool's schema on its own: errors name the keyword and its path
        try:
            lm.vocabulary.compile(Spec.json_schema(params))
        except LMForgeError as e:
            raise LMForgeError(f"tool {name!r}: {e}") from None
    names = [n for n, _, _ in parsed]
    if len(set(names)) != len(names):
        raise LMForgeError("two tools have the same name")
    sampling.setdefault("temperature", 0)
    opts = dict(stop=stop, logprobs=logprobs, top_logprobs=top_logprobs, **sampling)
    if tool_choice == "none":
        return ToolTurn(lm.request(prompt_ids(lm, messages), max_new_tokens, **opts), [])
    if isinstance(tool_choice, dict):
        want = (tool_choice.get("function") or {}).get("name")
        if want not in names:
            raise LMForgeError(f"tool_choice names {want!r}, which is not among the tools ({', '.join(names)})")
        callable_tools = [(n, p) for n, p, _ in parsed if n == want]
    elif tool_choice in ("auto", "required"):
        callable_tools = [(n, p) for n, p, _ in parsed]
    else:
        raise LMForgeError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
    call = json.dumps(_call_schema(callable_tools))
    if tool_choice == "auto":  # a call, or text that does not start like one
        spec = Spec.grammar(f"start: call | answer\ncall: %json {call}\nanswer: /[^{{ \\t\\n][\\s\\S]*/")
    else:
        spec = Spec.grammar(f"start: %json {call}")
    msgs = tool_messages(messages, [p for p in parsed if (p[0], p[1]) in callable_tools])
    return ToolTurn(lm.request(prompt_ids(lm, msgs), max_new_tokens, spec=spec, **opts), [n for n, _ in callable_tools])


def chat_with_tools(lm: LM, messages: list[dict], tools: Sequence[dict], tool_choice: Any = "auto",
                    max_new_tokens: int = 256, **sampling: Any) -> dict:
    """The assistant's next message in OpenAI's shape: {"role": "assistant", "content": text}
    or, when it calls a tool, {"role": "assistant", "content": None, "tool_calls": [{"id",
    "type": "function", "function": {"name", "arguments": JSON text}}]}. tool_choice: "auto"
    (the model decides), "none" (text only), "required" (a call to one of the tools) or
    {"type": "function", "function": {"name": ...}} (a call to that tool). A call's name is
    always one of the tools and its arguments always satisfy that tool's schema."""
    from lmforge.api import _run_checked

    turn = tool_turn(lm, messages, tools, tool_choice, max_new_tokens, **sampling)
    pieces, last = [], None
    for last in _run_checked(lm.engine, turn.request):
        pieces.append(last.text)
    return turn.message("".join(pieces), last.finish_reason, last.complete)


def prompt_ids(lm: LM, messages: list[dict]) -> list[int]:
    """A conversation as prompt ids: through the chat template, or for a base model (no
    template) as plain "Role: text" lines ending with "Assistant:"."""
    if lm.tokenizer.chat_template:
        return lm.chat_ids(messages)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return lm.encode_prompt(text + "Assistant:")


def _texts_checked(lm: LM, ids: list[int], spec: Spec, max_new_tokens: int, sampling: dict):
    from lmforge.api import _run_checked, _texts

    return _texts(_run_checked(lm.engine, lm.request(ids, max_new_tokens, spec=spec, **sampling)))


# ------------------------------------------------------------------- zero-shot classification
class LLMClassifier:
    """Zero-shot classification by a decoder: the label set is a choice constraint, and each
    label's probability is the model's probability of writing it (its tokens' log-probabilities
    summed), normalised over the labels. The trained classifier's interface: labels, predict,
    evaluate."""

    def __init__(self, lm: LM, labels: Sequence[str], instruction: str | None = None, calibrate: bool = False):
        labels = [x.strip() for x in labels if x.strip()]
        if len(set(labels)) < 2:
            raise LMForgeError("zero-shot classification needs at least two different labels")
        self.lm, self.labels = lm, list(dict.fromkeys(labels))
        lm.vocabulary.compile(Spec.choice(self.labels))  # every label must be spellable
        self.instruction = instruction or "Classify the text. Answer with one of: " + ", ".join(self.labels) + "."
        # Contextual calibration (Zhao et al., 2021): a small model favours some labels whatever
        # the text; its log-probabilities for a content-free text are subtracted
        self.prior = self._logps("N/A") if calibrate else [0.0] * len(self.labels)

    def _prompt(self, text: str) -> list[int]:
        if self.lm.tokenizer.chat_template:
            return self.lm.chat_ids([{"role": "user", "content": f"{self.instruction}\n\nText: {text}"}])
        return self.lm.encode_prompt(f"{self.instruction}\n\nText: {text}\nAnswer: ")

    def _logps(self, text: str) -> list[float]:
        spelt = [self.lm.tokenizer.encode(lab, check=False) for lab in self.labels]
        ids = self._prompt(text)
        return self.lm.engine.continuation_logprobs([(ids, s) for s in spelt])

    def predict(self, texts: Sequence[str]) -> list[dict]:
        out = []
        for text in texts:
            logps = [x - p for x, p in zip(self._logps(text), self.prior)]
            top = max(logps)
            weights = [math.exp(x - top) for x in logps]
            total = sum(weights)
            probs = {lab: w / total for lab, w in zip(self.labels, weights)}
            out.append({"label": max(probs, key=probs.get), "probs": probs})
        return out

    def evaluate(self, texts: list[str], labels: list[str]):
        from lmforge.train.classify import evaluate_labels  # (the scores: accuracy, macro-F1, table)

        return evaluate_labels(self, texts, labels)


# ------------------------------------------------------------------------ think, then answer
@dataclass
class Answer:
    text: str
    """The constrained part (a whole instance of the spec)."""
    thoughts: str = ""
    """The free text written before the delimiter."""
    value: Any = None
    """The parsed JSON (for JSON specs), or a Pydantic instance."""


def think_then_answer(lm: LM, messages: list[dict] | str, spec: Spec, *, delimiter: str = "\nANSWER:",
                      max_think_tokens: int = 256, max_new_tokens: int = 256, schema_class: Any = None,
                      **sampling: Any) -> Answer:
    """Let the model write freely up to `delimiter` (reasoning), then constrain only what
    follows. The free part comes back apart from the answer. A model that never writes the
    delimiter within max_think_tokens is stopped there and the delimiter added for it. The
    second request starts with the first one's tokens, so the engine reuses their cache."""
    if not delimiter:
        raise LMForgeError("the delimiter must not be empty")
    sampling.setdefault("temperature", 0)
    if isinstance(messages, str):
        head = lm.encode_prompt(messages)
    else:
        told = describe_spec(messages, spec)
        told[0]["content"] += (f"\nFirst think step by step in plain text; then write {delimiter.strip()!r} "
                               "and the answer.")
        head = lm.chat_ids(told)
    free = lm.request(head, max_think_tokens, stop=[delimiter], **sampling)
    thoughts = "".join(ev.text for ev in lm.engine.run([free]))
    ids = head + lm.tokenizer.encode(thoughts + delimiter + " ", check=False)
    text = "".join(_texts_checked(lm, ids, spec, max_new_tokens, sampling))
    value = None
    if spec.kind in ("json_schema", "json"):
        value = schema_class.model_validate_json(text) if schema_class is not None else json.loads(text)
    return Answer(text, thoughts.strip(), value)


# ------------------------------------------------------------------------------ explanation
@dataclass
class Step:
    token: int
    text: str
    rejected: list[tuple[str, float]] = field(default_factory=list)
    """The model's likelier candidates (text, probability) that the specification ruled out."""


class _Explainer:
    """A processor (not a mask) that, before the constraint acts, records the model's top
    candidates the constraint would refuse."""

    def __init__(self, cons, k: int):
        self.cons, self.k = cons, k
        self.steps: list[list[tuple[int, float]]] = []

    def __call__(self, ids, logits):
        import torch

        probs = logits[0].float().softmax(-1)
        top = torch.topk(probs, self.k)
        self.steps.append([(int(t), float(p)) for t, p in zip(top.indices, top.values) if not self.cons.allows(int(t))])
        return logits


def explain(lm: LM, prompt: str, spec: Spec, max_new_tokens: int = 128, top: int = 5,
            **sampling: Any) -> tuple[str, list[Step]]:
    """Generate under the spec and say, per token, which of the model's `top` unconstrained
    candidates the spec rejected: what the constraint changed."""
    sampling.setdefault("temperature", 0)
    req = lm.request(lm.encode_prompt(prompt), max_new_tokens, spec=spec, **sampling)
    cons = req.processors[-1]
    ex = _Explainer(cons, top)
    req.processors = [*req.processors[:-1], ex, cons]
    steps, text = [], []
    for ev in lm.engine.run([req]):
        text.append(ev.text)
        if ev.token is not None:
            got = [(lm.tokenizer.decode([t]), p) for t, p in ex.steps[len(steps)]]
            steps.append(Step(ev.token, lm.tokenizer.decode([ev.token]), got))
        if ev.finish_reason is not None and not (ev.finish_reason in ("stop", "length") and cons.complete):
            raise TruncatedOutput("the output ended before the specification was complete: raise the token limit",
                                  "".join(text))
    return "".join(text), steps
