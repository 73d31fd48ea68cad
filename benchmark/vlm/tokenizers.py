"""Small offline tokenizers for the tiny test VLMs and the mini world's VLM (``tokenizers`` library, no download).

Each is a ``PreTrainedTokenizerFast`` with Llama's specials first (:data:`LLAMA_SPECIALS`: ``<unk>`` 0, ``<s>`` 1,
``</s>`` 2, ``<pad>`` 3, ``<image>`` 4), that prepends ``<s>`` and has ``<image>`` as its image token.
"""
from __future__ import annotations

import re
import string
from collections.abc import Iterable

IMAGE_TOKEN = "<image>"
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)  # ids 0-4 of the tokenizers below


def llama_like(tokens: list[str], pre_tokenizer, decoder=None, normalizer=None):
    """A ``PreTrainedTokenizerFast`` with one id per string of ``tokens`` after :data:`LLAMA_SPECIALS`, split
    by ``pre_tokenizer`` (anything else is ``<unk>``) after ``normalizer`` (when given), decoded by ``decoder`` (when
    given); prepends ``<s>``; ``<image>`` is its image token."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*LLAMA_SPECIALS, *tokens]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tok.decoder = decoder
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def char_tokenizer():
    """One token per printable character or space + character (" A" is one token, like Llama's "▁A")."""
    from tokenizers import Regex, decoders, pre_tokenizers

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    return llama_like(chars + [" " + c for c in chars if c != " "],
                      pre_tokenizers.Split(Regex(r" ?[\s\S]"), behavior="isolated"), decoders.Fuse())


def word_tokenizer(texts: Iterable[str], whole: Iterable[str] = (), phrases: Iterable[str] = ()):
    """One token per word (a run of letters and digits) or punctuation mark of ``texts``, whitespace dropped,
    except that a whitespace-delimited string of ``whole`` (such as the option markers "A." to "E.") is one
    token, and so is every multi-word string of ``phrases`` wherever it occurs (its spaces read as ``_``, written
    back as spaces when decoding): short sequences for a closed vocabulary (a prompt's unknown words become
    ``<unk>``)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    kept = "".join(f"^{re.escape(w)}$|" for w in whole)
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                     pre_tokenizers.Split(Regex(kept + r"\w+|[^\w\s]"), behavior="isolated")])
    joined = sorted({p for p in phrases if " " in p}, key=len, reverse=True)  # the longest first
    normalizer = normalizers.Sequence([normalizers.Replace(p, p.replace(" ", "_")) for p in joined])
    words = [word for text in texts for word, _ in split.pre_tokenize_str(normalizer.normalize_str(text))]
    return llama_like(sorted(set(words)), split,
                      decoders.Sequence([decoders.Replace("_", " "), decoders.WordPiece(cleanup=False)]),
                      normalizer if joined else None)
