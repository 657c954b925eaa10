"""Constrained output on the pulled decoders (skipped when none is pulled)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmforge import store
from lmforge.api import LM
from lmforge.engine.constraint import Spec

pytestmark = pytest.mark.pretrained
NAMES = [n for n in ("smollm2-135m-instruct", "gemma3-270m") if store.find(n) is not None]
if not NAMES:
    pytest.skip("no pretrained decoder pulled (run: lmforge pull smollm2-135m-instruct)", allow_module_level=True)

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"], "additionalProperties": False}
TEXTS = ["Alice is 31 years old and lives in Paris.",
         "My neighbour Tomás, who is 58, moved to Lisbon last year.",
         "Kenji (age 24) works in Osaka."]


@pytest.fixture(scope="module", params=NAMES)
def lm(request):
    return LM.load(request.param)


def test_valid_instances_are_accepted_token_by_token(lm):
    """The real tokenizer's own tokens for valid JSON (non-ASCII, spaces, digits) walk the
    matcher to completion: the vocabulary's bytes are read right for this tokenizer kind."""
    for value in ({"name": "Zoë Ångström", "age": 7, "city": "Åre"}, {"name": "李雷", "age": 130, "city": "  x"}):
        text = json.dumps(value, ensure_ascii=False)
        cons = lm.constraint(Spec.json_schema(PERSON))
        for tok in lm.tokenizer.encode(text, check=False):
            assert cons.allows(tok), (text, tok)
            cons.accept(tok)
        assert cons.complete
    # mid-record, where an age must come: no token that starts with "-" (minimum 0), no "}",
    # no stop token
    cons = lm.constraint(Spec.json_schema(PERSON))
    for tok in lm.tokenizer.encode('{"name": "A", "age": ', check=False):
        cons.accept(tok)
    allowed = cons.allowed()
    spelt = lm.tokenizer.token_byte_strings()
    assert allowed.sum() > 5
    assert not any(allowed[i] for i, b in enumerate(spelt) if b.lstrip(b" ").startswith((b"-", b"}")))
    assert not any(allowed[i] for i in lm.tokenizer.stop_ids)
    assert not cons.complete


def test_extraction_gives_records_that_validate(lm):
    for text in TEXTS:
        if lm.tokenizer.chat_template:
            msgs = [{"role": "user", "content": f"Extract the person's name, age and city.\n\n{text}"}]
            out = "".join(lm.chat(msgs, 80, spec=Spec.json_schema(PERSON), temperature=0))
        else:
            out = lm.generate(f"{text}\nThe person as JSON: ", 80, schema=PERSON, temperature=0)
        record = json.loads(out)
        jsonschema.validate(record, PERSON)
    if lm.tokenizer.chat_template:  # the instruct model reads the easy one right
        msgs = [{"role": "user", "content": f"Extract the person's name, age and city.\n\n{TEXTS[0]}"}]
        first = json.loads("".join(lm.chat(msgs, 80, spec=Spec.json_schema(PERSON), temperature=0)))
        assert first == {"name": "Alice", "age": 31, "city": "Paris"}


def test_tool_calls_pick_a_listed_function_with_valid_arguments(lm):
    from lmforge.tasks.structured import chat_with_tools

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                              "unit": {"enum": ["celsius", "fahrenheit"]}},
                             "required": ["city"]}}},
             {"type": "function", "function": {"name": "add", "description": "Add two numbers",
              "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                             "required": ["a", "b"]}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for question in ("What's the weather in Oslo?", "What is 17 plus 25?"):
        msg = chat_with_tools(lm, [{"role": "user", "content": question}], tools, "required", max_new_tokens=80)
        fn = msg["tool_calls"][0]["function"]
        assert fn["name"] in schemas
        jsonschema.validate(json.loads(fn["arguments"]), {**schemas[fn["name"]], "additionalProperties": False})
