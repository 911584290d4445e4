"""Chat templates (sandboxed Jinja2) and generation_config.json defaults."""

from __future__ import annotations

import json

import pytest

from moeflow.models.tiny import CHAT_TEMPLATE
from moeflow.serve.chat import ChatTemplate, ChatTemplateError, GenerationDefaults

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_the_checkpoint_template_renders_with_the_generation_prompt(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}))
    template = ChatTemplate.load(tmp_path)
    assert template is not None and template.eos_token == "<|endoftext|>"
    text = template.render(MESSAGES)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not template.render(MESSAGES, add_generation_prompt=False).endswith("assistant\n")


def test_a_jinja_file_beside_the_weights_wins_and_an_override_wins_over_both(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "config", "bos_token": {"content": "<s>"}}))
    (tmp_path / "chat_template.jinja").write_text("file {{ bos_token }}")
    assert ChatTemplate.load(tmp_path).render(MESSAGES) == "file <s>"
    override = tmp_path / "mine.jinja"
    override.write_text("{{ messages | length }} {{ messages[-1]['content'] | tojson }}")
    assert ChatTemplate.load(tmp_path, override).render(MESSAGES) == '2 "Hi"'
    with pytest.raises(ChatTemplateError, match="no such file"):
        ChatTemplate.load(tmp_path, tmp_path / "missing.jinja")


def test_no_template_is_none_and_a_broken_one_fails_at_load(tmp_path):
    assert ChatTemplate.load(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate.load(tmp_path)


def test_the_sandbox_keeps_a_template_from_python_internals(tmp_path):
    template = tmp_path / "evil.jinja"
    template.write_text("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate.load(tmp_path, template).render(MESSAGES)
    template.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate.load(tmp_path, template).render(MESSAGES)
    template.write_text("{{ raise_exception('no system messages') }}")
    with pytest.raises(ChatTemplateError, match="no system messages"):
        ChatTemplate.load(tmp_path, template).render(MESSAGES)


def test_generation_defaults_come_from_generation_config(tmp_path):
    assert GenerationDefaults.load(tmp_path).values == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True,
         "eos_token_id": [1, 2], "max_new_tokens": True}))
    defaults = GenerationDefaults.load(tmp_path)
    assert defaults.values == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert defaults.get("max_new_tokens", 16) == 16
    assert defaults.ignored == ()


def test_sampling_fields_not_applied_are_listed(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "repetition_penalty": 1.05, "min_p": 0.0, "typical_p": 0.9}))
    assert GenerationDefaults.load(tmp_path).ignored == ("repetition_penalty=1.05",
                                                         "typical_p=0.9")


TEMPLATES = [
    # loop controls, transformers' tojson arguments, the special tokens beyond bos/eos
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
    "{% endif %}{{ m | tojson(ensure_ascii=False, sort_keys=True) }}{{ pad_token }}"
    "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}{{ unk_token }}",
    # a {% generation %} block (marks an assistant's text for training)
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
    "{{ additional_special_tokens | join(',') }}",
]


@pytest.mark.parametrize("text", TEMPLATES)
def test_templates_render_as_transformers_renders_them(text, tmp_path, tiny_factory):
    transformers = pytest.importorskip("transformers")
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_factory("qwen3_moe"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(chat_template=text, bos_token="<s>", pad_token="<|pad|>",
                  unk_token="<unk>", additional_special_tokens=["<a>", "<b>"])
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [*MESSAGES, {"role": "assistant", "content": "é ok"},
                {"role": "user", "content": "more"}]
    theirs = transformers.AutoTokenizer.from_pretrained(str(model))
    ours = ChatTemplate.load(model)
    for add in (True, False):
        assert ours.render(messages, add) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add)
