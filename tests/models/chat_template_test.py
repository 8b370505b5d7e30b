"""Tests for interp.models.chat_template: the text transformers renders, helpers included."""

import json

import jinja2
import pytest
import tokenizers
import transformers

from interp.models import chat_template

TEMPLATE = (
    "{% for message in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "[{{ message['role'] }}] {{ message['content'] | tojson }}"
    "{% if message.name is defined %} ({{ message.name }}){% endif %}\n"
    "{% endfor %}{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "naïve <b>café</b> 🚀", "name": None},
    {"role": "assistant", "content": "Oh dear!", "name": "Rabbit"},
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "cut by the loop's break"},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_matches_transformers(reference, add_generation_prompt):
    tools = [{"name": "clock", "description": "Tells the time — précisément."}]
    for extra in ({}, {"tools": tools}):
        want = reference.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
        got = chat_template.render(
            TEMPLATE, MESSAGES, add_generation_prompt=add_generation_prompt, **extra
        )
        assert got == want
    assert "naïve <b>café</b> 🚀" in got  # tojson keeps non-ASCII and HTML as they are.


def test_templates_are_sandboxed_and_can_raise():
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        chat_template.render("{{ raise_exception('no system role') }}", MESSAGES)
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat_template.render("{{ messages.__class__.__mro__ }}", MESSAGES)
    assert len(chat_template.render("{{ strftime_now('%Y') }}", MESSAGES)) == 4
