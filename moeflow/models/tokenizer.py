"""Tokenizers: load a checkpoint's `tokenizer.json`, and train a small one locally for tiny
checkpoints (there is no model hub to fetch one from)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, inner: HFTokenizer, source: str) -> None:
        self.inner = inner
        self.source = source

    @staticmethod
    def load(model_dir: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None if it has no tokenizer.json."""
        path = Path(model_dir) / TOKENIZER_FILE
        if not path.exists():
            return None
        try:
            return Tokenizer(HFTokenizer.from_file(str(path)), str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{path}: cannot load tokenizer ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens`: the tokenizer's own (a BOS, say); off for a rendered chat
        template, which writes its own."""
        return list(self.inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.inner.decode(list(ids), skip_special_tokens=True))

    def token_id(self, token: str) -> int | None:
        value = self.inner.token_to_id(token)
        return None if value is None else int(value)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text: its text decoded alone, except for a token
        that holds part of a character (decoded alone, U+FFFD), whose own bytes are read
        from its piece: a byte-level BPE piece (GPT-2's byte-to-character map undone), or
        a SentencePiece byte-fallback piece `<0xNN>`. A special token skipped in the text
        adds none."""
        text = self.decode([token_id])
        if "\ufffd" not in text:
            return text.encode()
        piece = self.inner.id_to_token(token_id)
        if piece is None:
            return text.encode()
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        chars = _byte_level_chars()
        if all(c in chars for c in piece):
            return bytes(chars[c] for c in piece)
        return text.encode()


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@cache
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: the printable bytes stand for
    themselves, the other 68 for code points from 256 up, in byte order (GPT-2's
    bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class IncrementalDecoder:
    """A sequence's text decoded as it grows: each `step(ids)` returns the text its new
    ids add, holding back the bytes of a character that is not complete yet. Each step
    decodes a window of the last few ids, not the whole sequence, so a long output costs
    the same per token as a short one."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.prefix = 0  # ids before this are already text
        self.read = 0  # ids prefix..read are text too, kept as context for the next ones
        # the text held back by the last step: complete characters before the incomplete
        # one, which later ids may still change (a stop string may already end in them)
        self.held = ""

    def step(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        prefix_text = self.tokenizer.decode(ids[self.prefix:self.read])
        new_text = self.tokenizer.decode(ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            self.held = ""
            return new_text[len(prefix_text):]
        self.held = new_text[len(prefix_text):].rstrip("\ufffd")
        return ""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens, trained on `texts`.
    Special tokens come first: <|endoftext|> is id 0."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok
