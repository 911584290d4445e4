"""Chat templates and generation defaults: what a checkpoint says about how to prompt it.

A chat template is the Jinja2 text a Hugging Face checkpoint ships (the `chat_template` of
`tokenizer_config.json`, or `chat_template.jinja` beside it) that turns a list of messages
into one prompt string. It comes from whoever published the checkpoint, so it is rendered
in Jinja2's immutable sandbox: it can loop, branch and format, but not reach Python objects'
internals or change the values it is given. The variables are the ones transformers'
`apply_chat_template` passes (messages, add_generation_prompt, bos_token, eos_token, tools
as None), with `raise_exception` and `strftime_now` as helpers and `tojson` as a filter.

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


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # where the template came from, for messages
    text: str
    bos_token: str = ""
    eos_token: str = ""

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
        if override is not None:
            path = Path(override)
            if not path.is_file():
                raise ChatTemplateError(f"--chat-template {path}: no such file")
            return ChatTemplate(str(path), path.read_text(), bos, eos).checked()
        if (model / TEMPLATE_FILE).is_file():
            path = model / TEMPLATE_FILE
            return ChatTemplate(str(path), path.read_text(), bos, eos).checked()
        text = special.get("chat_template")
        if isinstance(text, list):  # several named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
            text = named.get("default")
        if isinstance(text, str) and text.strip():
            return ChatTemplate(str(config_path), text, bos, eos).checked()
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
            return str(template.render(messages=list(messages),
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=self.bos_token, eos_token=self.eos_token,
                                       tools=None, documents=None))
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None
        except Exception as exc:  # the template is the checkpoint's code: anything it raises
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: "
                                    f"{exc}") from None


_COMPILED: dict[str, Any] = {}


def _compile(text: str, source: str) -> Any:
    template = _COMPILED.get(text)
    if template is not None:
        return template
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                  ensure_ascii=False)
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

    FIELDS = {"temperature": float, "top_p": float, "top_k": int,
              "max_new_tokens": int}

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
        return GenerationDefaults(values)

    def get(self, name: str, default: Any) -> Any:
        return self.values.get(name, default)

