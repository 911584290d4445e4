"""A token's own bytes: the pieces of a character that byte-level BPE and SentencePiece's
byte fallback split across tokens join back into the text."""

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from moeflow.models.tokenizer import Tokenizer, train_tokenizer

TEXT = "héllo 中文 🎉 done"


def test_byte_level_tokens_give_their_bytes():
    tok = Tokenizer(train_tokenizer(["hello world, plain ascii text"] * 4, 300), "trained")
    ids = tok.encode(TEXT)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # a character was split


def test_byte_fallback_tokens_give_their_bytes():
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "h": 258}
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                   byte_fallback=True))
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse()])
    tok = Tokenizer(inner, "byte fallback")
    ids = tok.encode("h中")
    assert [tok.token_bytes(i) for i in ids] == [b"h", b"\xe4", b"\xb8", b"\xad"]
