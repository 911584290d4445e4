"""Chat templates and generation defaults: what a checkpoint says about how to prompt it.

A chat template is the Jinja2 text a Hugging Face checkpoint ships (the `chat_template` of
`tokenizer_config.json`, or `chat_template.jinja` beside it) that turns a list of messages
into one prompt string. It comes from whoever published the checkpoint, so it is rendered
in Jinja2's immutable sandbox: it can loop, branch and format, but not reach Python objects'
internals or change the values it is given. The variables are the ones transformers'
`apply_chat_template` passes (messages, add_generation_prompt, the special tokens of
tokenizer_config.json: bos_token, eos_token, pad_token, ...; tools as None), with
`raise_exception` and `strftime_now` as helpers, `tojson` as a filter (transformers'
arguments), `{% break %}`/`{% continue %}`, and `{% generation %}` rendered as its body.

`generation_config.json` supplies defaults for the sampling fields a request leaves out
(temperature, top_p, top_k, max_new_tokens): GenerationDefaults reads them. The eos ids
come from the same file, through ModelSpec.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


class ChatTemplateError(ValueError):
    """A template that cannot be loaded, or messages it refuses to render."""


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


# the special tokens transformers hands a template (its special_tokens_map), from
# tokenizer_config.json
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                  "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # where the template came from, for messages
    text: str
    bos_token: str = ""
    eos_token: str = ""
    # the other special tokens by name (additional_special_tokens are not among them in
    # transformers 5)
    special: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def load(model_dir: str | Path, override: str | Path | None = None) -> ChatTemplate | None:
        """`override` (a file) if given, else the checkpoint's template, else None."""
        model = Path(model_dir)
        special: dict[str, Any] = {}
        config_path = model / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                special = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise ChatTemplateError(f"{config_path}: not valid JSON ({exc})") from None
            if not isinstance(special, dict):
                raise ChatTemplateError(f"{config_path}: expected a JSON object")
        bos, eos = _token_text(special.get("bos_token")), _token_text(special.get("eos_token"))
        tokens = {name: _token_text(special.get(name)) for name in SPECIAL_TOKENS[2:]
                  if _token_text(special.get(name))}
        others = tuple(tokens.items())
        if override is not None:
            path = Path(override)
            if not path.is_file():
                raise ChatTemplateError(f"--chat-template {path}: no such file")
            return ChatTemplate(str(path), path.read_text(), bos, eos, others).checked()
        if (model / TEMPLATE_FILE).is_file():
            path = model / TEMPLATE_FILE
            return ChatTemplate(str(path), path.read_text(), bos, eos, others).checked()
        text = special.get("chat_template")
        if isinstance(text, list):  # several named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
            text = named.get("default")
        if isinstance(text, str) and text.strip():
            return ChatTemplate(str(config_path), text, bos, eos, others).checked()
        return None

    def checked(self) -> ChatTemplate:
        """Compile once now, so that a template with a syntax error fails at start-up."""
        _compile(self.text, self.source)
        return self

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
               ) -> str:
        from jinja2 import TemplateError

        template = _compile(self.text, self.source)
        try:
            return str(template.render(**dict(self.special), messages=list(messages),
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=self.bos_token, eos_token=self.eos_token,
                                       tools=None, documents=None))
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None
        except Exception as exc:  # the template is the checkpoint's code: anything it raises
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: "
                                    f"{exc}") from None


_COMPILED: dict[str, Any] = {}


def _generation_block() -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}`, rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return GenerationBlock


def _compile(text: str, source: str) -> Any:
    template = _COMPILED.get(text)
    if template is not None:
        return template
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    # transformers' environment: {% break %}/{% continue %}, the {% generation %} block
    # (which marks an assistant's tokens for training: here it renders its body), its tojson
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_block()])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = tojson
    try:
        template = env.from_string(text)
    except TemplateError as exc:
        raise ChatTemplateError(f"{source}: the chat template does not compile: {exc}"
                                ) from None
    if len(_COMPILED) < 16:  # one per server, in practice
        _COMPILED[text] = template
    return template


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling values generation_config.json gives, for fields a request leaves out."""

    values: dict[str, Any]
    ignored: tuple[str, ...] = ()  # "name=value" of sampling fields moeflow does not apply

    FIELDS = {"temperature": float, "top_p": float, "top_k": int,
              "max_new_tokens": int}
    # fields other servers apply from the file, and their values that change nothing
    UNAPPLIED = {"repetition_penalty": 1.0, "min_p": 0.0, "presence_penalty": 0.0,
                 "frequency_penalty": 0.0, "typical_p": 1.0}

    @staticmethod
    def load(model_dir: str | Path) -> GenerationDefaults:
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        if not path.is_file():
            return GenerationDefaults({})
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return GenerationDefaults({})  # the loader reports a broken file for the eos ids
        if not isinstance(config, dict):
            return GenerationDefaults({})
        values = {}
        for name, kind in GenerationDefaults.FIELDS.items():
            value = config.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[name] = kind(value)
        if values.get("top_k", 0) < 0:
            values["top_k"] = 0
        ignored = tuple(f"{name}={config[name]}" for name, neutral in
                        GenerationDefaults.UNAPPLIED.items()
                        if config.get(name) is not None and config[name] != neutral)
        return GenerationDefaults(values, ignored)

    def get(self, name: str, default: Any) -> Any:
        return self.values.get(name, default)

