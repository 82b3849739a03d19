"""Offline WordPiece tokenizer for the tiny BERT text encoder, built from the dataset's titles.

Nothing is downloaded. The vocabulary is built deterministically (the `tokenizers` trainer
breaks frequency ties differently in every process, which would give ranks, or a later
embedding stage, different vocabularies): BERT's normaliser and pre-tokeniser split the titles
into words (lower-cased, accents stripped, one token per CJK character); the vocabulary is the
special tokens, every character seen (alone and as a `##` continuation, so any seen word can be
spelled), then the most frequent whole words (ties by spelling) up to `vocab_size`. The
alphabet is always kept whole, so a large CJK alphabet may exceed `vocab_size`. The result is a
`BertTokenizerFast` that saves and loads with `save_pretrained` / `from_pretrained`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_vocab(texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> list[str]:
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    if not words:
        raise ValueError("train_wordpiece: no non-empty text to learn a vocabulary from")
    chars = sorted({c for word in words for c in word})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    known = set(vocab)
    frequent = sorted((w for w, n in words.items() if n >= min_frequency and w not in known),
                      key=lambda w: (-words[w], w))
    return vocab + frequent[:max(0, vocab_size - len(vocab))]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 1) -> BertTokenizerFast:
    """Build a BERT-style WordPiece tokenizer from `texts` (e.g. `PreparedDataset.titles()`)."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"train_wordpiece: vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = build_vocab([t for t in texts if t and t.strip()], vocab_size, min_frequency)
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)


def save_tokenizer(tokenizer: BertTokenizerFast, folder: str | Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | Path) -> BertTokenizerFast:
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
