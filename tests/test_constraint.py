"""Constrained output on tiny random models (no download): every output follows its spec."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from lmforge.api import LM
from lmforge.config import ModelConfig
from lmforge.engine import SamplingParams
from lmforge.engine.constraint import Spec
from lmforge.engine.engine import generate_naive
from lmforge.errors import LMForgeError, TruncatedOutput
from lmforge.models import build_model
from lmforge.tokenizer import LMTokenizer

from conftest import MIXED, pydoc_text

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "owl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                 "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "kind", "home"],
    "additionalProperties": False,
}


def random_lm(tok: LMTokenizer, arch: str = "gpt", eos_bias: float = 0.0) -> LM:
    V = tok.vocab_size
    if arch == "gpt":
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=V, block_size=512, pos="rope",
                          norm="rmsnorm", mlp="swiglu", bias=False)
    else:
        cfg = ModelConfig(family=arch, n_layer=1, n_embd=32, vocab_size=V, block_size=512)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    lm = LM(model, tok)
    if eos_bias:  # a model that would end its output at once, given the chance
        stop = tok.stop_ids[0]
        lm.request = _biased(lm.request, stop, eos_bias)
    return lm


def _biased(request, token, bias):
    def wrapped(*a, **kw):
        req = request(*a, **kw)

        def push(_ids, logits):
            logits = logits.clone()
            logits[..., token] += bias
            return logits

        req.processors = [push, *req.processors]
        return req
    return wrapped


@pytest.fixture(scope="module")
def bpe() -> LMTokenizer:
    return LMTokenizer.train_bpe([pydoc_text(20_000), MIXED, json.dumps(SCHEMA)], vocab_size=400)


@pytest.fixture(scope="module")
def lm(bpe) -> LM:
    return random_lm(bpe)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 0), (1.0, 1), (1.2, 2)])
def test_a_random_model_writes_json_that_fits_a_nested_schema(lm, temperature, seed):
    text = lm.generate("Record: ", 400, schema=SCHEMA, temperature=temperature, seed=seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choices(lm):
    for seed in range(3):
        out = lm.generate("Phone: ", 60, regex=r"\(\d{3}\) [a-z]{2,4}-\d{2}", temperature=1.0, seed=seed)
        assert re.fullmatch(r"\(\d{3}\) [a-z]{2,4}-\d{2}", out), out
        pick = lm.generate("Pick: ", 30, choices=["alpha", "beta gamma", "δ"], temperature=1.0, seed=seed)
        assert pick in ("alpha", "beta gamma", "δ")


def test_a_lark_and_a_gbnf_grammar(lm):
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'
    out = lm.generate("Sum: ", 80, grammar=lark, temperature=1.0, seed=3)
    assert re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", out), out
    gbnf = 'root ::= "yes" | "no" | "maybe"'
    assert lm.generate("Answer: ", 20, grammar=gbnf, temperature=1.0, seed=0) in ("yes", "no", "maybe")


def test_the_stop_token_is_impossible_before_the_output_is_complete(bpe):
    """A model that puts +30 on its stop token would stop at once; constrained, it can stop
    only where the JSON is whole, and then it does."""
    eager = random_lm(bpe, eos_bias=30.0)
    assert "".join(eager.stream("x", 20, temperature=0)) == ""  # unconstrained: stops at once
    for seed in range(3):
        evs = list(eager.events("Record: ", 400, spec=Spec.json_schema(SCHEMA), temperature=1.0, seed=seed))
        assert evs[-1].finish_reason == "stop" and evs[-1].complete
        jsonschema.validate(json.loads("".join(e.text for e in evs)), SCHEMA)


def test_rows_of_a_batch_follow_their_own_constraints(lm):
    specs = [Spec.json_schema(SCHEMA), Spec.regex(r"[a-f]{3}-\d{2}"), Spec.choice(["left", "right"]),
             Spec.json_schema(SCHEMA)]
    prompts = [lm.encode_prompt(p) for p in ("A: ", "B: ", "C: ", "D: ")]
    rows = [[lm.constraint(s)] for s in specs]
    outs = lm.engine.generate_batch(prompts, 300, SamplingParams(temperature=1.0, seed=5),
                                    stop_ids=lm.tokenizer.stop_ids, row_processors=rows)
    texts = [lm.tokenizer.decode([t for t in o if t not in lm.tokenizer.stop_ids]) for o in outs]
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert re.fullmatch(r"[a-f]{3}-\d{2}", texts[1]), texts[1]
    assert texts[2] in ("left", "right")
    jsonschema.validate(json.loads(texts[3]), SCHEMA)
    assert all(r[0].complete for r in rows)


def test_streaming_equals_non_streaming_and_the_greedy_check_equals_the_full_mask(lm):
    """Greedy decoding skips the mask when the argmax is allowed; the reference path always
    masks. Both give the same tokens."""
    spec = Spec.json_schema(SCHEMA)
    streamed = "".join(lm.stream("Record: ", 400, spec=spec, temperature=0))
    assert streamed == lm.generate("Record: ", 400, schema=SCHEMA, temperature=0)
    ids = lm.encode_prompt("Record: ")
    fast = lm.constraint(spec)
    got = list(lm.engine.generate(ids, 400, SamplingParams(temperature=0), stop_ids=lm.tokenizer.stop_ids,
                                  processors=[fast]))
    ref = generate_naive(lm.model, ids, 400, SamplingParams(temperature=0), stop_ids=lm.tokenizer.stop_ids,
                         processors=[lm.constraint(spec)])
    assert got == ref
    assert lm.tokenizer.decode([t for t in got if t not in lm.tokenizer.stop_ids]) == streamed
    assert fast.masked_steps < len(got)  # the check answered some steps without the mask


def test_truncation_is_reported_never_returned(lm):
    with pytest.raises(TruncatedOutput) as e:
        lm.generate("Record: ", 3, schema=SCHEMA, temperature=0)
    assert e.value.text and not e.value.text.endswith("}")
    evs = list(lm.events("Record: ", 3, spec=Spec.json_schema(SCHEMA), temperature=0))
    assert evs[-1].finish_reason == "length" and evs[-1].complete is False


def test_a_compiled_spec_is_reused(lm):
    vocab = lm.vocabulary
    before = vocab.compiles
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}
    for seed in range(3):
        json.loads(lm.generate("N: ", 50, schema=schema, temperature=1.0, seed=seed))
    assert vocab.compiles == before + 1
    json.loads(lm.generate("N: ", 50, schema=json.dumps(schema), temperature=0))  # same spec as text
    assert vocab.compiles == before + 1


def test_a_pydantic_class_gives_a_validated_instance(lm):
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=5)
        legs: int = pydantic.Field(ge=0, le=8)

    pet = lm.generate("Pet: ", 200, schema=Pet, temperature=1.0, seed=0)
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8 and len(pet.name) <= 5


@pytest.mark.parametrize("arch", ["gpt", "gru"])
def test_a_character_model_without_a_stop_token(arch):
    """A char tokenizer has no stop token: output ends where the spec allows nothing more."""
    tok = LMTokenizer.train_char([pydoc_text(5000) + "{}[]\":,0123456789"])
    assert tok.stop_ids == []
    lm = random_lm(tok, arch)
    for seed in range(2):
        out = lm.generate("x", 200, choices=["on", "off", "onward"], temperature=1.0, seed=seed)
        assert out in ("on", "off", "onward")
        rec = lm.generate("x", 300, schema={"type": "object", "properties": {"a": {"enum": [1, 2]}},
                                             "required": ["a"], "additionalProperties": False},
                          temperature=1.0, seed=seed)
        assert json.loads(rec)["a"] in (1, 2)


@pytest.mark.parametrize("kw,message", [
    (dict(schema={"type": "object", "requried": ["a"]}), "keyword 'requried' at # (did you mean 'required'?)"),
    (dict(schema={"type": "object", "properties": {"n": {"type": "integer", "Minimum": 3}}}),
     "keyword 'Minimum' at #/properties/n (did you mean 'minimum'?)"),
    (dict(schema={"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}),
     "unsupported JSON Schema keyword 'uniqueItems' at #/properties/t"),
    (dict(schema={"type": "strin"}), "strin"),
    (dict(schema={"properties": {"a": {"pattern": "(["}}}), "#/properties/a/pattern"),
    (dict(schema={"properties": []}), "#/properties"),
    (dict(schema="{not json"), "not valid JSON"),
    (dict(schema="/no/such/schema.json"), "schema file not found"),
    (dict(regex="a(b"), "regex does not compile"),
    (dict(choices=[]), "choice list is empty"),
    (dict(grammar='start: "a" )'), "line 1, column"),
    (dict(schema={"type": "object"}, regex="a"), "give one specification, not schema and regex"),
])
def test_bad_specifications_are_clear_errors(lm, kw, message):
    with pytest.raises(LMForgeError) as e:
        lm.generate("x", 5, **kw)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_choice_the_tokenizer_cannot_spell():
    tok = LMTokenizer.train_char(["abc def"])
    lm = random_lm(tok)
    with pytest.raises(LMForgeError, match="cannot spell the choice 'xyz'"):
        lm.generate("a", 5, choices=["abc", "xyz"])


def test_a_schema_file_that_is_not_json(lm, tmp_path):
    f = tmp_path / "s.json"
    f.write_text("type: object")
    with pytest.raises(LMForgeError, match="is not JSON"):
        lm.generate("x", 5, schema=str(f))


# ---------------------------------------------------------------- uses (lmforge.tasks.structured)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def test_extract_writes_a_valid_line_per_input_and_resumes(lm, tmp_path):
    from lmforge.tasks.structured import extract

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in ["Ann is 3.", {"text": "Bo is 40."}, "Cy, 7.", "Di (9)."]) + "\n")
    out = tmp_path / "out.jsonl"
    seen = []
    rep = extract(lm, PERSON, src, out, max_new_tokens=200, batch=3, progress=lambda d, t: seen.append((d, t)),
                  temperature=1.0, seed=0)
    assert (rep.done, rep.skipped, rep.failed, rep.total) == (4, 0, 0, 4) and seen[-1] == (4, 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4]
    assert {r["input"] for r in rows} == {"Ann is 3.", "Bo is 40.", "Cy, 7.", "Di (9)."}
    for r in rows:
        jsonschema.validate(r["output"], PERSON)
    # a crash that left half a line, then a rerun: the half line goes, only line 4 is redone
    kept = [line for line in out.read_text().splitlines() if json.loads(line)["line"] != 4]
    out.write_text("\n".join(kept) + '\n{"line": 4, "inp')
    rep = extract(lm, PERSON, src, out, max_new_tokens=200)
    assert (rep.done, rep.skipped) == (1, 3)
    assert sorted(json.loads(line)["line"] for line in out.read_text().splitlines()) == [1, 2, 3, 4]
    # too few tokens: the line records the error, the report counts it
    out2 = tmp_path / "short.jsonl"
    rep = extract(lm, PERSON, src, out2, max_new_tokens=2)
    assert rep.failed == 4 and all("error" in json.loads(x) for x in out2.read_text().splitlines())


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 8},
                                               "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
             "a": {"type": "integer", "maximum": 999}, "b": {"type": "integer", "maximum": 999}},
             "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def chat_lm(bpe):
    """The random model with a chat template (the tool and think paths render conversations)."""
    lm = random_lm(bpe)
    lm.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}assistant: {% endif %}")
    return lm


def _check_call(msg, names):
    (call,) = msg["tool_calls"]
    assert msg["content"] is None and call["type"] == "function" and call["id"].startswith("call_")
    fn = call["function"]
    assert fn["name"] in names
    params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == fn["name"])
    jsonschema.validate(json.loads(fn["arguments"]), {**params, "additionalProperties": False})
    return fn["name"]


def test_tool_calls_pick_a_listed_function_with_valid_arguments(chat_lm):
    from lmforge.tasks.structured import chat_with_tools

    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    for seed in range(3):
        msg = chat_with_tools(chat_lm, msgs, TOOLS, "required", max_new_tokens=200, temperature=1.0, seed=seed)
        _check_call(msg, {"get_weather", "add"})
        msg = chat_with_tools(chat_lm, msgs, TOOLS, {"type": "function", "function": {"name": "add"}},
                              max_new_tokens=200, temperature=1.0, seed=seed)
        assert _check_call(msg, {"add"}) == "add"
        msg = chat_with_tools(chat_lm, msgs, TOOLS, "auto", max_new_tokens=60, temperature=1.0, seed=seed)
        if msg.get("tool_calls"):
            _check_call(msg, {"get_weather", "add"})
        else:
            assert isinstance(msg["content"], str) and not msg["content"].startswith("{")
    assert "tool_calls" not in chat_with_tools(chat_lm, msgs, TOOLS, "none", max_new_tokens=5)
    with pytest.raises(LMForgeError, match="not among the tools"):
        chat_with_tools(chat_lm, msgs, TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(LMForgeError, match="unsupported JSON Schema keyword 'uniqueItems'"):
        bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}]
        chat_with_tools(chat_lm, msgs, bad, "required")


def test_llm_classifier_gives_a_distribution_over_the_labels(chat_lm, tmp_path):
    from lmforge.tasks.structured import LLMClassifier

    clf = LLMClassifier(chat_lm, ["good", "bad", "so so"])
    preds = clf.predict(["I liked it", "awful"])
    for p in preds:
        assert set(p["probs"]) == {"good", "bad", "so so"}
        assert abs(sum(p["probs"].values()) - 1) < 1e-6 and p["label"] == max(p["probs"], key=p["probs"].get)
    # the probabilities are the model's: a plain full forward over prompt + label, its
    # log-probabilities summed over the label's tokens, normalised over the three labels
    tok = chat_lm.tokenizer
    ids = clf._prompt("I liked it")
    logps = []
    with torch.no_grad():
        for lab in clf.labels:
            cont = tok.encode(lab, check=False)
            full = chat_lm.model(torch.tensor([ids + cont]))[0][0].log_softmax(-1)  # (T, V)
            logps.append(sum(float(full[len(ids) - 1 + i, t]) for i, t in enumerate(cont)))
    ref = torch.tensor(logps).softmax(0)
    for lab, p in zip(clf.labels, ref):
        assert abs(preds[0]["probs"][lab] - float(p)) < 1e-4
    scores = clf.evaluate(["I liked it", "awful"], [preds[0]["label"], preds[1]["label"]])
    assert scores.accuracy == 1.0
    with pytest.raises(LMForgeError, match="at least two"):
        LLMClassifier(chat_lm, ["only"])


def test_think_then_answer_constrains_only_the_answer(chat_lm):
    from lmforge.tasks.structured import think_then_answer

    msgs = [{"role": "user", "content": "how old is Ann?"}]
    ans = think_then_answer(chat_lm, msgs, Spec.json_schema(PERSON), delimiter="ANSWER:", max_think_tokens=30,
                            max_new_tokens=200, temperature=1.0, seed=0)
    jsonschema.validate(ans.value, PERSON)
    assert ans.text == json.dumps(ans.value) and ans.thoughts and "ANSWER:" not in ans.thoughts
    # a model that never writes the delimiter is stopped at max_think_tokens and still answers in shape
    ans = think_then_answer(chat_lm, msgs, Spec.choice(["yes", "no"]), delimiter="\u2603never", max_think_tokens=5,
                            max_new_tokens=10)
    assert ans.text in ("yes", "no") and ans.thoughts


def test_explain_names_only_candidates_the_spec_rules_out(lm):
    from lmforge.tasks.structured import explain

    text, steps = explain(lm, "Pick: ", Spec.choice(["alpha", "beta"]), top=8)
    assert text in ("alpha", "beta")
    assert "".join(s.text for s in steps if s.token not in lm.tokenizer.stop_ids) == text
    done = ""
    for s in steps:
        for cand, p in s.rejected:
            assert 0 < p <= 1
            assert not any(c.startswith(done + cand) for c in ("alpha", "beta")), (done, cand)
        done += s.text if s.token not in lm.tokenizer.stop_ids else ""
    assert any(s.rejected for s in steps)  # a random model's favourites are rarely "alpha" or "beta"


def test_objects_get_only_their_listed_keys_and_still_fit_the_schema_as_given(lm):
    """An open object is closed for generation (a random model would otherwise invent keys),
    except where allOf merges property sets; every output still validates as given."""
    open_schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}, "b": {"type": "boolean"}}, "required": ["a"]}
    merged = {"allOf": [{"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"enum": [True]}}, "required": ["b"]}]}
    for seed in range(4):
        out = json.loads(lm.generate("x", 120, schema=open_schema, temperature=1.0, seed=seed))
        jsonschema.validate(out, open_schema)
        assert set(out) <= {"a", "b"}
    assert json.loads(Spec.json_schema(open_schema).text)["additionalProperties"] is False
    # closing a branch of allOf would refuse the keys the other branch brings: left open
    assert all("additionalProperties" not in b for b in json.loads(Spec.json_schema(merged).text)["allOf"])
    jsonschema.validate({"a": 1, "b": True}, merged)


def test_a_oneof_that_can_only_match_once_is_accepted_and_kept(lm):
    """oneOf over distinct types, or over a required property's distinct consts, is generated
    as anyOf (the same set of instances); an overlapping oneOf is refused, naming its place."""
    by_type = {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer", "maximum": 9},
                                                                {"type": "string", "maxLength": 3},
                                                                {"type": "null"}]}},
               "required": ["v"]}
    by_const = {"type": "object", "required": ["kind"], "properties": {"kind": {"type": "string"}},
                "oneOf": [{"properties": {"kind": {"const": "cat"}, "lives": {"enum": [9]}}},
                          {"properties": {"kind": {"const": "dog"}, "good": {"enum": [True]}}}]}
    for seed in range(4):
        for schema in (by_type, by_const):
            out = json.loads(lm.generate("x", 150, schema=schema, temperature=1.0, seed=seed))
            jsonschema.validate(out, schema)
    overlapping = {"type": "object", "properties": {"n": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}
    with pytest.raises(LMForgeError, match="at #/properties/n: a oneOf whose branches may overlap"):
        lm.generate("x", 5, schema=overlapping)


IF_ELSE = {"type": "object", "properties": {"member": {"type": "boolean"}, "code": {"type": "string"}},
           "required": ["member", "code"], "if": {"properties": {"member": {"const": True}}},
           "then": {"properties": {"code": {"type": "string", "minLength": 2, "maxLength": 2}}},
           "else": {"properties": {"code": {"type": "string", "minLength": 4, "maxLength": 5}}}}
DEPENDENT = {"type": "object", "properties": {"foo": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}},
             "dependentSchemas": {"foo": {"required": ["n"], "properties": {"n": {"minimum": 7}}}}}


@pytest.mark.parametrize("schema", [IF_ELSE, DEPENDENT], ids=["if-then-else", "dependentSchemas"])
def test_conditionals_are_enforced_exactly(lm, schema):
    """if/then/else on a boolean (or enum) and dependentSchemas are rewritten as anyOf: what is
    generated validates, and what would break them is refused token by token."""
    for seed in range(6):
        jsonschema.validate(json.loads(lm.generate("x", 150, schema=schema, temperature=1.0, seed=seed)), schema)
    bad = '{"member": true, "code": "abcd"}' if schema is IF_ELSE else '{"foo": true, "n": 3}'
    good = '{"member": false, "code": "abcd"}' if schema is IF_ELSE else '{"foo": true, "n": 8}'
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bad), schema)
    for text, ok in ((good, True), (bad, False)):
        cons = lm.constraint(Spec.json_schema(schema))
        try:
            for tok in lm.tokenizer.encode(text, check=False):
                cons.accept(tok)
            accepted = cons.complete
        except LMForgeError:
            accepted = False
        assert accepted is ok, text


def test_property_names_that_are_keywords_are_left_alone(lm):
    """The rewrites walk only the places that hold schemas: properties named "if", "oneOf" or
    "properties" are data, not keywords."""
    schema = {"type": "object", "required": ["if", "oneOf"],
              "properties": {"if": {"enum": [1, 2]},
                             "oneOf": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
                             "properties": {"type": "integer", "maximum": 9}}}
    spec = json.loads(Spec.json_schema(schema).text)
    assert spec["properties"]["if"] == {"enum": [1, 2]} and "additionalProperties" not in spec["properties"]
    assert spec["properties"]["oneOf"]["additionalProperties"] is False
    for seed in range(3):
        jsonschema.validate(json.loads(lm.generate("x", 120, schema=schema, temperature=1.0, seed=seed)), schema)
