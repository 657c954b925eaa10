"""Output that follows a specification: a JSON Schema, any JSON, a regex, a choice list or a
Lark grammar.

A `Spec` names what the output must be. `Vocabulary` holds what the grammar library needs to
know about a tokenizer (the bytes of every token, the control and stop tokens) and compiles a
spec once: a repeated spec costs a dictionary look-up. `Constraint` is the per-request matcher:
a logits processor that gives probability only to tokens that keep the output valid, allows a
stop token only where the output is complete, and advances on every token the request takes.

The grammar engine is llguidance (see pyproject.toml for why). This module sees token ids and
byte strings only, never a tokenizer object.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LMForgeError

KINDS = ("json_schema", "json", "regex", "choice", "grammar")

# Keywords of JSON Schema (draft 4 to 2020-12). A key outside this set is an annotation by the
# standard (schemas in the wild carry many: "javaType", "example", "markdownDescription"), but
# one that is spelt like a constraining keyword ("requried", "minimun", "Pattern") is a typo that
# would silently drop a constraint: we refuse those. Whether the grammar engine implements a
# keyword is its own check (Vocabulary.compile names the ones it does not).
_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
                "$comment", "discriminator"}
_KEYWORDS = {
    "$schema", "$id", "id", "$ref", "$defs", "definitions", "$comment", "$anchor", "$dynamicRef",
    "$dynamicAnchor", "$vocabulary", "$recursiveRef", "$recursiveAnchor",
    "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedProperties", "items", "prefixItems", "additionalItems",
    "unevaluatedItems", "contains", "minContains", "maxContains", "minItems", "maxItems",
    "uniqueItems", "minLength", "maxLength", "pattern", "format", "contentEncoding",
    "contentMediaType", "contentSchema", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "anyOf", "oneOf", "allOf", "not", "if", "then", "else",
    # annotations: they describe, they do not constrain
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    # what Pydantic adds to the schemas it writes (an OpenAPI annotation)
    "discriminator",
}
# How generated JSON is laid out: one space after , and : and no newlines, so a small model
# cannot spend its tokens on runs of whitespace (it would, given the choice).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "propertyNames", "unevaluatedProperties", "additionalItems",
               "unevaluatedItems", "contains", "not", "if", "then", "else", "contentSchema")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")


@dataclass(frozen=True)
class Spec:
    """What the output must be. Build one with the class methods; `text` is canonical, so two
    equal specifications are one cache entry."""

    kind: str
    text: str

    @classmethod
    def json_schema(cls, schema: dict | str | Path, closed: bool = True) -> "Spec":
        """A JSON Schema as a dict, JSON text, or the path of a JSON file.

        closed: an object that lists its properties gets only those, unless it says otherwise.
        JSON Schema lets extra keys through, and a small model, allowed, invents them until it
        runs out of tokens; what comes out still validates against the schema as given.
        closed=False keeps the schema's own meaning exactly."""
        schema = _load_schema(schema)
        check_schema(schema)
        schema = disjoint_one_of(conditionals(schema))
        if closed:
            schema = close_objects(schema)
        # (key order is kept: properties are generated in the order the schema gives them)
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def any_json(cls) -> "Spec":
        return cls("json", "")

    @classmethod
    def regex(cls, pattern: str) -> "Spec":
        if not pattern:
            raise LMForgeError("the regex is empty")
        try:
            re.compile(pattern)
        except re.error as e:
            raise LMForgeError(f"the regex does not compile: {e}") from None
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "Spec":
        choices = list(dict.fromkeys(choices))  # (repeats dropped, order kept)
        if not choices:
            raise LMForgeError("the choice list is empty")
        if any(not isinstance(c, str) or c == "" for c in choices):
            raise LMForgeError("every choice must be a non-empty string")
        return cls("choice", json.dumps(choices))

    @classmethod
    def grammar(cls, source: str | Path) -> "Spec":
        """A Lark grammar (start rule `start`), as text or a file's Path; a GBNF grammar (rules
        written `a ::= ...`, start rule `root`) is converted to Lark first."""
        if isinstance(source, Path):
            if not source.is_file():
                raise LMForgeError(f"grammar file not found: {source}")
            try:
                source = source.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise LMForgeError(f"{source} is not a text file") from None
        if not source.strip():
            raise LMForgeError("the grammar is empty")
        if "::=" in source:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                source = gbnf_to_lark(source)
            except Exception as e:  # the converter raises plain exceptions with the position
                raise LMForgeError(f"the GBNF grammar has a syntax error: {_first_line(e)}") from None
        return cls("grammar", source)

    @property
    def choices(self) -> list[str]:
        return json.loads(self.text) if self.kind == "choice" else []

    def describe(self) -> str:
        """A line for a chat prompt: what the model is asked to produce."""
        if self.kind == "json_schema":
            schema = json.loads(self.text)
            props = schema.get("properties") if isinstance(schema, dict) else None
            if isinstance(props, dict) and props and schema.get("type", "object") == "object":
                # a small model follows a list of fields better than a schema (it copies the
                # schema's own keys, such as "title" and "type", into its answer)
                fields = ", ".join(f"{k} ({_type_name(v)})" for k, v in props.items())
                return f"Reply with only a JSON object with these fields: {fields}."
            return f"Reply with only JSON that follows this JSON Schema: {self.text}"
        if self.kind == "json":
            return "Reply with only a JSON object."
        if self.kind == "choice":
            return "Reply with exactly one of: " + ", ".join(self.choices) + "."
        if self.kind == "regex":
            return f"Reply with text that matches the regular expression {self.text}"
        return "Reply in the format given by this grammar:\n" + self.text

    def grammar_text(self) -> str:
        """The llguidance grammar for this spec."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.text, defaults=COMPACT_JSON)
        if self.kind == "json":
            # an object or an array, as "JSON mode" means elsewhere (a bare number can run on)
            return LLMatcher.grammar_from_json_schema('{"type": ["object", "array"]}', defaults=COMPACT_JSON)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.text)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choices))
        return LLMatcher.grammar_from_lark(self.text)


def _type_name(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return "one of " + " | ".join(json.dumps(v) for v in schema["enum"])
    t = schema.get("type")
    if isinstance(t, list):
        return " or ".join(map(str, t))
    if t == "array" and isinstance(schema.get("items"), dict):
        return f"list of {_type_name(schema['items'])}"
    return str(t) if t else "object" if "properties" in schema else "any"


def _map_subschemas(schema: dict, fn: Callable[[Any, str], Any]) -> dict:
    """A copy of a schema object with fn(subschema, keyword) applied to every place that holds
    a schema (and nowhere else: not to property names, enum values or defaults)."""
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: fn(sub, key) for name, sub in out[key].items()}
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = fn(out[key], key)
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [fn(sub, key) for sub in out[key]]
    if isinstance(out.get("items"), (dict, list)):
        items = out["items"]
        out["items"] = [fn(x, "items") for x in items] if isinstance(items, list) else fn(items, "items")
    return out


def disjoint_one_of(schema: Any) -> Any:
    """The schema with each oneOf whose branches can never match together written as anyOf
    (then "exactly one" and "at least one" are the same): branches of pairwise different
    single types (never both integer and number), or branches that give one required property
    pairwise different const values. The grammar engine refuses other oneOfs (it cannot
    enforce "exactly one"), so these two common shapes would otherwise be refused too."""
    if not isinstance(schema, dict):
        return schema
    req = list(schema.get("required") or []) if isinstance(schema.get("required"), list) else []
    out = _map_subschemas(schema, lambda sub, _key: disjoint_one_of(sub))
    branches = out.get("oneOf")
    if isinstance(branches, list) and len(branches) > 1 and all(isinstance(b, dict) for b in branches):
        types = [b.get("type") for b in branches]
        by_type = (all(isinstance(t, str) for t in types) and len(set(types)) == len(types)
                   and not {"integer", "number"} <= set(types))
        by_const = False
        for key in {k for b in branches for k in (b.get("properties") or {})}:
            values = [((b.get("properties") or {}).get(key) or {}).get("const", _MISSING) for b in branches]
            # (required binds objects only: the instance must be an object for this to decide)
            objects = schema.get("type") == "object" or all(b.get("type") == "object" for b in branches)
            needed = objects and (key in req or all(key in (b.get("required") or []) for b in branches))
            if needed and _MISSING not in values and len({json.dumps(v) for v in values}) == len(values):
                by_const = True
                break
        if by_type or by_const:
            out["anyOf"] = out.pop("oneOf") if "anyOf" not in out else out["anyOf"]
    return out


_MISSING = object()


def _merge(a: dict, b: dict) -> dict:
    """Two object schemas that must both hold, as one (properties side by side; a property in
    both gets allOf of the two; required lists joined)."""
    out = {**a, **{k: v for k, v in b.items() if k not in ("properties", "required")}}
    props = dict(a.get("properties") or {})
    for k, v in (b.get("properties") or {}).items():
        props[k] = {"allOf": [props[k], v]} if k in props else v
    if props:
        out["properties"] = props
    req = list(dict.fromkeys([*(a.get("required") or []), *(b.get("required") or [])]))
    if req:
        out["required"] = req
    return out


def conditionals(schema: Any) -> Any:
    """if/then/else and dependentSchemas, which the grammar engine does not implement, written
    as anyOf where that is exact:
    - dependentSchemas {K: S}: K absent (properties {K: false}), or K present and S holds;
    - if {properties: {K: {const: v}}} on a required K whose values are a known finite set
      (boolean, or an enum): branch one has K = v and `then`, branch two K in the other values
      and `else`.
    Other shapes are left for the engine to refuse."""
    if not isinstance(schema, dict):
        return schema
    out = _map_subschemas(schema, lambda sub, _key: conditionals(sub))
    deps = out.get("dependentSchemas")
    if isinstance(deps, dict) and "anyOf" not in out and "allOf" not in out and \
            all(isinstance(v, dict) and set(v) <= {"properties", "required", "type"} for v in deps.values()):
        out.pop("dependentSchemas")
        out["allOf"] = [{"anyOf": [{"properties": {k: False}}, _merge({"required": [k]}, v)]} for k, v in deps.items()]
        if len(out["allOf"]) == 1:
            out["anyOf"] = out.pop("allOf")[0]["anyOf"]
    cond = out.get("if")
    props = out.get("properties") if isinstance(out.get("properties"), dict) else {}
    if isinstance(cond, dict) and set(cond) <= {"properties", "required"} and "anyOf" not in out \
            and isinstance(cond.get("properties"), dict) and len(cond["properties"]) == 1:
        (key, test), = cond["properties"].items()
        base = props.get(key) if isinstance(props.get(key), dict) else {}
        values = [True, False] if base.get("type") == "boolean" else base.get("enum")
        then, other = out.get("then", {}), out.get("else", {})
        if isinstance(test, dict) and set(test) == {"const"} and key in (out.get("required") or []) \
                and isinstance(values, list) and test["const"] in values and isinstance(then, dict) \
                and isinstance(other, dict) and set(then) | set(other) <= {"properties", "required"}:
            rest = [v for v in values if v != test["const"]]
            for k in ("if", "then", "else"):
                out.pop(k, None)
            out["anyOf"] = [_merge({"properties": {key: {"const": test["const"]}}}, then)]
            if rest:
                out["anyOf"].append(_merge({"properties": {key: {"enum": rest}}}, other))
    return out


def close_objects(schema: Any, merged: bool = False) -> Any:
    """The schema with every object that lists its properties closed to other keys, unless it
    says what other keys may be. Objects whose properties are merged with others' (a branch of
    allOf, or one with allOf beside it) stay as they are: closing one would refuse the keys the
    others bring."""
    if not isinstance(schema, dict):
        return schema
    has_props = isinstance(schema.get("properties"), dict)
    # (a branch of allOf, or of anyOf/oneOf beside the parent's properties, adds to others' keys)
    out = _map_subschemas(schema, lambda sub, key: close_objects(
        sub, merged=key == "allOf" or (has_props and key in ("anyOf", "oneOf"))))
    # properties beside anyOf/oneOf branches: each branch is closed to its own keys and the
    # parent's (the instance must fit the parent and a branch, so no other key can come)
    opening = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")
    opened = (*opening, "anyOf", "oneOf")
    if has_props and not merged and not any(k in out for k in opening):
        for key in ("anyOf", "oneOf"):
            branches = out.get(key)
            if isinstance(branches, list) and branches and all(
                    isinstance(b, dict) and not any(k in b for k in (*opening, "anyOf", "oneOf"))
                    and all(r in {*(b.get("properties") or {}), *out["properties"]} for r in (b.get("required") or []))
                    for b in branches):
                out[key] = [{**b, "properties": {**{k: True for k in out["properties"]}, **(b.get("properties") or {})},
                             "additionalProperties": False} for b in branches]
    req = out.get("required") if isinstance(out.get("required"), list) else []
    listed = isinstance(out.get("properties"), dict) and all(r in out["properties"] for r in req)
    if listed and not merged and not any(k in out for k in opened):  # (a required key it does not list stays possible)
        out["additionalProperties"] = False
    return out


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _load_schema(schema: Any) -> Any:
    if hasattr(schema, "model_json_schema"):  # a Pydantic model class
        return schema.model_json_schema()
    if isinstance(schema, Path) or (isinstance(schema, str) and not schema.lstrip().startswith(("{", "["))
                                    and schema.strip() not in ("true", "false")):
        path = Path(schema)
        if not path.is_file():
            raise LMForgeError(f"schema file not found: {path}")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LMForgeError(f"{path} is not JSON: {e}") from None
    if isinstance(schema, str):
        try:
            return json.loads(schema)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"the schema is not valid JSON: {e}") from None
    return schema


def check_schema(schema: Any, path: str = "#") -> None:
    """Refuse what is not a JSON Schema, naming the place: a schema that is not an object (or
    true/false), an unknown keyword, a keyword whose value has the wrong shape."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise LMForgeError(f"invalid JSON Schema at {path}: a schema is an object or true/false, "
                           f"got {type(schema).__name__}")
    for key, value in schema.items():
        here = f"{path}/{key}"
        if key not in _KEYWORDS:
            meant = _misspelt(key)
            if meant:
                raise LMForgeError(f"unknown JSON Schema keyword {key!r} at {path} (did you mean {meant!r}?)")
            continue  # an annotation: it constrains nothing
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise LMForgeError(f"invalid JSON Schema at {here}: expected an object of schemas")
            for name, sub in value.items():
                check_schema(sub, f"{here}/{name}")
        elif key in _SCHEMA_ONE:
            check_schema(value, here)
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise LMForgeError(f"invalid JSON Schema at {here}: expected a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{here}/{i}")
        elif key == "items":
            for i, sub in enumerate(value if isinstance(value, list) else [value]):
                check_schema(sub, f"{here}/{i}" if isinstance(value, list) else here)
        elif key == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise LMForgeError(f"invalid JSON Schema at {here}: expected a list of property names")
        elif key == "enum" and not (isinstance(value, list) and value):
            raise LMForgeError(f"invalid JSON Schema at {here}: expected a non-empty list")
        elif key == "pattern":
            try:
                re.compile(value)
            except (re.error, TypeError) as e:
                raise LMForgeError(f"invalid JSON Schema at {here}: the pattern does not compile ({e})") from None


def _misspelt(key: str) -> str | None:
    """The constraining keyword an unknown key looks like a misspelling of, if any. Keys that
    start with "_", "$", "@" or "x-" are deliberate (a disabled keyword, a vendor's own)."""
    import difflib

    if key.startswith(("_", "$", "x-", "@")):
        return None
    constraining = sorted(_KEYWORDS - _ANNOTATIONS)
    same_case = [k for k in constraining if k.lower() == key.lower()]
    # (short words are left alone: "note" and "form" are annotations, not "not" and "format")
    close = difflib.get_close_matches(key, constraining, n=1, cutoff=0.8) if len(key) >= 5 else []
    return (same_case or close or [None])[0]


def _find_key(schema: Any, key: str, path: str = "#") -> str | None:
    """Where a keyword first occurs in a schema (for the grammar engine's messages)."""
    if isinstance(schema, dict):
        if key in schema:
            return path
        for k, v in schema.items():
            if k in ("enum", "const", "default", "examples"):
                continue
            found = _find_key(v, key, f"{path}/{k}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            found = _find_key(v, key, f"{path}/{i}")
            if found:
                return found
    return None


class Vocabulary:
    """A tokenizer as the grammar engine sees it, with the cache of compiled specs.

    tokens: the bytes of each id (b"" for control tokens and unused ids); special: control
    token ids; stop: the ids that end a reply (allowed only where the output is complete);
    encode: text -> ids, the tokenizer's own (used by the engine to check a choice's spelling)."""

    CACHE = 256

    def __init__(self, tokens: Sequence[bytes], special: Sequence[int], stop: Sequence[int],
                 encode: Callable[[str], list[int]], vocab_size: int | None = None):
        import llguidance as llg

        self.size = vocab_size or len(tokens)  # the model's logits: what masks cover
        # A tokenizer without a stop token (a character model) gets a virtual one past the
        # model's ids: the model can never pick it, so such output ends where the spec
        # allows nothing more (see Constraint.finished), or at the token limit.
        self.virtual_stop = not stop
        self.stop = [self.size] if self.virtual_stop else sorted(set(stop))
        n_ids = self.size + 1 if self.virtual_stop else self.size
        self._encode = encode
        specials = set(special) | set(self.stop)

        class _Wrapper:  # the shape llguidance asks for
            eos_token_id = self.stop[-1]
            bos_token_id = None
            special_token_ids = sorted(specials)

            def __init__(w):
                # control tokens are named to the engine with a 0xFF lead byte, never as text
                w.tokens = [b"\xff" + f"<special_{i}>".encode() if i in specials else (t or b"\xff<unused>")
                            for i, t in enumerate(tokens)]
                w.tokens += [b"\xff<unused>"] * (n_ids - len(w.tokens))

            def __call__(w, data: bytes) -> list[int]:
                return encode(data.decode("utf-8", errors="replace"))

        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper()), n_vocab=n_ids, eos_token=self.stop)
        self._compiled: OrderedDict[Spec, str] = OrderedDict()
        self.compiles = 0  # specs compiled (not found in the cache): tests and benchmarks read it

    def compile(self, spec: Spec) -> str:
        """The checked grammar for a spec, compiled once per spec (least recently used evicted)."""
        if spec in self._compiled:
            self._compiled.move_to_end(spec)
            return self._compiled[spec]
        from llguidance import LLMatcher

        if spec.kind == "choice":
            for c in spec.choices:
                try:
                    spelt = self._encode(c)
                except LMForgeError:  # (a character the tokenizer never saw)
                    spelt = []
                if not spelt:
                    raise LMForgeError(f"the tokenizer cannot spell the choice {c!r}")
        try:
            grammar = spec.grammar_text()
        except (ValueError, RuntimeError) as e:
            raise LMForgeError(self._explain(spec, _first_line(e))) from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise LMForgeError(self._explain(spec, messages[0] if messages else "rejected by the grammar engine"))
        self.compiles += 1
        self._compiled[spec] = grammar
        if len(self._compiled) > self.CACHE:
            self._compiled.popitem(last=False)
        return grammar

    @staticmethod
    def _explain(spec: Spec, message: str) -> str:
        message = message.strip().splitlines()[0] if message.strip() else message
        # the grammar engine writes a position as "LINE(COLUMN):"
        message = re.sub(r"^(?:at )?(\d+)\((\d+)\):\s*", r"line \1, column \2: ", message)
        if spec.kind == "json_schema":
            m = re.search(r'Unimplemented keys: \["([^"]+)"', message)
            if m:
                where = _find_key(json.loads(spec.text), m.group(1)) or "#"
                return f"unsupported JSON Schema keyword {m.group(1)!r} at {where}"
            if message.startswith("oneOf constraints are not supported"):
                where = _find_key(json.loads(spec.text), "oneOf") or "#"
                return (f"unsupported JSON Schema at {where}: a oneOf whose branches may overlap (exactly one "
                        "must match, which the matcher cannot enforce); write anyOf if any match will do")
            return f"invalid or unsupported JSON Schema: {message}"
        if spec.kind == "regex":
            return f"the regex is not supported: {message}"
        if spec.kind == "grammar":
            return f"the grammar has an error: {message}"
        return f"the specification was rejected: {message}"

    def constraint(self, spec: Spec) -> "Constraint":
        """A fresh matcher for one request."""
        return Constraint(self, spec, self.compile(spec))


class Constraint:
    """One request's matcher, used as a logits processor (see engine.LogitsProcessor).

    The engine applies it after every other processor, and under greedy decoding first asks
    `allows(argmax)`: when the model's own choice is valid (most steps, in practice) the mask
    is never applied to the logits."""

    masks = True  # the engine applies processors with this flag last

    def __init__(self, vocab: Vocabulary, spec: Spec, grammar: str):
        import llguidance as llg

        self.spec, self.vocab = spec, vocab
        self.matcher = llg.LLMatcher(vocab.tokenizer, grammar)
        if self.matcher.is_error():
            raise LMForgeError(f"the specification was rejected: {self.matcher.get_error()}")
        # one bit per token id, 32 to a word (llguidance's layout). Filled through its plain
        # pointer call: llguidance.torch would import torch.compile's machinery (2-3 s, once)
        n = vocab.size + vocab.virtual_stop
        self._words = np.zeros((n + 31) // 32, dtype=np.uint32)
        self._filled = False
        self.masked_steps = 0  # steps whose logits were masked (not answered by the greedy check)

    def _mask_words(self) -> np.ndarray:
        if not self._filled:
            self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            if self.matcher.is_error():
                raise LMForgeError(f"the grammar engine failed: {self.matcher.get_error()}")
            self._filled = True
        return self._words

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens that may come next."""
        return np.unpackbits(self._mask_words().view(np.uint8), bitorder="little")[:self.vocab.size].astype(bool)

    def allows(self, token: int) -> bool:
        if token >= self.vocab.size:
            return False
        return bool((self._mask_words()[token >> 5] >> np.uint32(token & 31)) & np.uint32(1))

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) -> (1, V) with every token the spec forbids at -inf."""
        self.masked_steps += 1
        ok = torch.from_numpy(self.allowed())
        V = logits.size(-1)
        if ok.numel() < V:  # ids past the tokenizer (a padded embedding table) are never valid
            ok = torch.cat([ok, torch.zeros(V - ok.numel(), dtype=torch.bool)])
        return logits.masked_fill(~ok[:V].to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        self._filled = False
        if not self.matcher.consume_token(token):
            raise LMForgeError(f"token {token} breaks the specification ({self.matcher.get_error()})")

    @property
    def finished(self) -> bool:
        """Nothing can follow (the stop token was taken, or the output can only end)."""
        if self.matcher.is_stopped():
            return True
        if self.vocab.virtual_stop and self.matcher.is_accepting():
            # no stop token the model could pick: end where no real token may come next
            return not self.allowed().any()
        return False

    @property
    def complete(self) -> bool:
        """The output so far is a whole instance of the spec."""
        return self.matcher.is_accepting() or self.matcher.is_stopped()


__all__ = ["Constraint", "KINDS", "Spec", "Vocabulary", "check_schema"]
