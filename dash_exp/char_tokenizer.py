"""The embedded character tokenizer: one id per printable ASCII character, saved like any hub tokenizer."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# printable ASCII plus newline and tab; anything else maps to <unk>
CHARSET = [c for c in string.printable if c not in "\r\x0b\x0c"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one id per character, specials <pad>=0, <eos>=1, <unk>=2."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARSET])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
        model_max_length=4096,
    )
