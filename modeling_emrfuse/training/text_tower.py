"""The text side of a run without a downloadable tower: the demo's small BERT + a WordPiece tokenizer whose vocabulary
is counted from the training reports (rare words left out; the same reports give the same vocabulary in every
process), the placeholder tokenizer of image-only models, tokenizer loading."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import transformers
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertConfig, BertModel, BertTokenizer

from ..runtime import strict_json

logger = logging.getLogger("emrfuse.train")


MIN_REPORTS_PER_WORD = 5
"""k: a WordPiece vocabulary learned from reports (the demo text tower) never keeps a word found in fewer than k
distinct reports (a patient's rare words would otherwise be saved, and pushed, in ``vocab.txt``); k >= 5."""


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens, the first entries of every vocabulary built here (ids 0-4)."""


DEMO_TEXT_TOWER = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}


def report_vocabulary_corpus(
    texts: Sequence[str], min_reports: int = MIN_REPORTS_PER_WORD
) -> Tuple[List[str], Dict[str, int]]:
    """The reports as a vocabulary learner may see them: only words found in at least ``min_reports`` distinct reports.

    Words are what the BERT tokenizer sees (``BertNormalizer`` lower-casing, ``BertPreTokenizer`` splitting on
    spaces and punctuation); every other word is removed from every report. Returns ``(texts, reports per word)``
    (the counts are for the caller's checks; words are never logged).
    """
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = [[w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    reports_per_word = Counter(w for ws in words for w in set(ws))
    kept = [" ".join(w for w in ws if reports_per_word[w] >= min_reports) for ws in words]
    return [t for t in kept if t], dict(reports_per_word)


VOCABULARY_RULE = "counted: specials, alphabet, words, pieces; by count, ties by string"
"""Names the vocabulary rule in the tower's cache key (a tower built by another rule is rebuilt, not reused)."""


def wordpiece_vocabulary(
    corpus: Sequence[str], reports_per_word: Dict[str, int], vocab_size: int, min_reports: int = MIN_REPORTS_PER_WORD
) -> List[str]:
    """A WordPiece vocabulary counted from ``corpus`` (the output of :func:`report_vocabulary_corpus`), in a fixed order.

    The entries, each group most frequent first (occurrences in ``corpus``), ties broken by the string:

    1. BERT's special tokens (:data:`SPECIAL_TOKENS`);
    2. the alphabet: every character of the words as a word-initial piece, then as a ``##`` continuation piece
       (so that any word made of these characters tokenises without ``[UNK]``);
    3. the whole words;
    4. sub-word pieces: each word's prefixes (at least 2 characters) and ``##`` suffixes (at least 2 characters),
       counted over the words' occurrences;

    cut at ``vocab_size`` entries. Nothing depends on hash or iteration order, so the same corpus gives the same
    list in every process. Privacy: a piece of two or more characters that spells a word found in fewer than
    ``min_reports`` distinct reports (``reports_per_word``; e.g. "ring" inside "rings" or "boring") is left out.
    """
    words = Counter(w for text in corpus for w in text.split(" ") if w)

    def by_count(counts: Counter) -> List[str]:
        return [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]

    def spells_a_rare_word(piece: str) -> bool:
        text = piece[2:] if piece.startswith("##") else piece
        return len(text) > 1 and 0 < reports_per_word.get(text, 0) < min_reports

    chars: Counter = Counter()
    pieces: Counter = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
        for i in range(2, len(word)):
            pieces[word[:i]] += n
        for i in range(1, len(word) - 1):
            pieces["##" + word[i:]] += n
    alphabet = by_count(chars)
    candidates = [*SPECIAL_TOKENS, *alphabet, *("##" + c for c in alphabet), *by_count(words), *by_count(pieces)]
    vocab = [t for t in dict.fromkeys(candidates) if not spells_a_rare_word(t)]
    return vocab[: int(vocab_size)]


def build_demo_text_tower(
    texts: Sequence[str],
    folder: Path,
    accelerator,
    spec: Optional[Dict[str, int]] = None,
    min_reports_per_word: int = MIN_REPORTS_PER_WORD,
) -> str:
    """A small BERT (random weights) + a WordPiece tokenizer whose vocabulary is counted from the training reports.

    Nothing can be downloaded here, so the demo's text tower is built from scratch and saved as
    a local folder; it then goes through the same ``from_text_vision_pretrained`` path as any
    Hub checkpoint. Built once (main process), reused when the reports and sizes are unchanged.

    Privacy: the vocabulary never keeps a word found in fewer than ``min_reports_per_word`` (k, default
    :data:`MIN_REPORTS_PER_WORD` = 5, at least 5) distinct reports. Such words are removed from the reports
    before the WordPiece vocabulary is counted (:func:`report_vocabulary_corpus`), and a token that still
    spells one of them (as a piece of frequent words) is dropped (:func:`wordpiece_vocabulary`), so that a patient's rare words (names, places, rare findings) never end
    up in ``vocab.txt`` / ``tokenizer.json``, which are saved with the model and pushed with
    ``--push_to_hub``. With fewer than k reports nothing is learned (every word becomes ``[UNK]``).

    Repeatability: the vocabulary is a function of the reports alone (counts, ties broken by the string), so
    the same reports give byte-identical ``tokenizer.json`` in every process (``tokenizers``' WordPiece trainer,
    used before, broke ties in a hash order seeded per process).
    """
    if int(min_reports_per_word) < MIN_REPORTS_PER_WORD:
        raise ValueError(f"min_reports_per_word must be >= {MIN_REPORTS_PER_WORD}, got {min_reports_per_word}.")
    spec = dict(spec or DEMO_TEXT_TOWER)
    key = hashlib.sha256(
        json.dumps([spec, int(min_reports_per_word), "rare-words-removed", VOCABULARY_RULE, list(texts)]).encode()
    ).hexdigest()[:16]
    marker = folder / "emrfuse_tower.json"
    if accelerator.is_main_process and not (marker.exists() and json.loads(marker.read_text()).get("key") == key):
        if not texts:
            raise ValueError("No training reports to train the demo tokenizer on.")
        corpus, reports_per_word = report_vocabulary_corpus(texts, int(min_reports_per_word))
        n_rare = sum(1 for n in reports_per_word.values() if n < min_reports_per_word)
        tokens = wordpiece_vocabulary(corpus, reports_per_word, spec["vocab_size"], int(min_reports_per_word))
        tokenizer = BertTokenizer(
            vocab={t: i for i, t in enumerate(tokens)},
            do_lower_case=True,
            model_max_length=spec["max_position_embeddings"],
        )
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            intermediate_size=spec["intermediate_size"],
            max_position_embeddings=spec["max_position_embeddings"],
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = BertModel(config, add_pooling_layer=False)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        strict_json.write_json(
            tmp / "emrfuse_tower.json",
            {"key": key, **spec, "num_reports": len(texts), "min_reports_per_word": int(min_reports_per_word)},
            indent=None,
        )
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
        logger.info(
            f"demo text tower: BERT {spec['num_hidden_layers']} layers x {spec['hidden_size']}, WordPiece vocabulary {len(tokenizer)} counted from {len(texts)} reports "
            f"({n_rare} distinct words found in fewer than {min_reports_per_word} reports left out) -> {folder}"
        )
    accelerator.wait_for_everyone()
    return str(folder)


def placeholder_tokenizer():
    """The tokenizer of an image-only model: BERT's five special tokens and nothing else.

    An image-only model (``use_text=False``) reads no report, but the processor, the cache and the
    pipeline keep one shape for every model; this tokenizer is built in code (nothing is downloaded),
    saved with the model, and learns nothing from any report.
    """
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n", encoding="utf-8")
        return BertTokenizer(vocab_file=str(vocab), do_lower_case=True, model_max_length=16)


def load_tokenizer(name_or_path: str):
    """The text tower's tokenizer. In a saved EmrFuse folder, the class named in its
    ``tokenizer_config.json`` is used directly (``AutoTokenizer`` would ask to run the folder's
    model code just to read the config)."""
    cfg = Path(name_or_path) / "tokenizer_config.json"
    if (Path(name_or_path) / "processor_config.json").is_file() and cfg.is_file():
        cls = getattr(transformers, json.loads(cfg.read_text()).get("tokenizer_class") or "", None)
        if cls is not None:
            return cls.from_pretrained(name_or_path)
    return transformers.AutoTokenizer.from_pretrained(name_or_path)
