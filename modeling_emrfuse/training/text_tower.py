"""The text side of a run without a downloadable tower: the demo's small BERT + WordPiece tokenizer learned from
the training reports (rare words left out), the placeholder tokenizer of image-only models, tokenizer loading."""

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
from tokenizers import BertWordPieceTokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertConfig, BertModel, BertTokenizer

from ..runtime import strict_json

logger = logging.getLogger("emrfuse.train")


MIN_REPORTS_PER_WORD = 5
"""k: a WordPiece vocabulary learned from reports (the demo text tower) never keeps a word found in fewer than k
distinct reports (a patient's rare words would otherwise be saved, and pushed, in ``vocab.txt``); k >= 5."""


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


def build_demo_text_tower(
    texts: Sequence[str],
    folder: Path,
    accelerator,
    spec: Optional[Dict[str, int]] = None,
    min_reports_per_word: int = MIN_REPORTS_PER_WORD,
) -> str:
    """A small BERT (random weights) + a WordPiece tokenizer trained on the training reports.

    Nothing can be downloaded here, so the demo's text tower is built from scratch and saved as
    a local folder; it then goes through the same ``from_text_vision_pretrained`` path as any
    Hub checkpoint. Built once (main process), reused when the reports and sizes are unchanged.

    Privacy: the vocabulary never keeps a word found in fewer than ``min_reports_per_word`` (k, default
    :data:`MIN_REPORTS_PER_WORD` = 5, at least 5) distinct reports. Such words are removed from the reports
    before the WordPiece vocabulary is learned (:func:`report_vocabulary_corpus`), and a token that still
    equals one of them is dropped, so that a patient's rare words (names, places, rare findings) never end
    up in ``vocab.txt`` / ``tokenizer.json``, which are saved with the model and pushed with
    ``--push_to_hub``. With fewer than k reports nothing is learned (every word becomes ``[UNK]``).
    """
    if int(min_reports_per_word) < MIN_REPORTS_PER_WORD:
        raise ValueError(f"min_reports_per_word must be >= {MIN_REPORTS_PER_WORD}, got {min_reports_per_word}.")
    spec = dict(spec or DEMO_TEXT_TOWER)
    key = hashlib.sha256(
        json.dumps([spec, int(min_reports_per_word), "rare-words-removed", list(texts)]).encode()
    ).hexdigest()[:16]
    marker = folder / "emrfuse_tower.json"
    if accelerator.is_main_process and not (marker.exists() and json.loads(marker.read_text()).get("key") == key):
        if not texts:
            raise ValueError("No training reports to train the demo tokenizer on.")
        corpus, reports_per_word = report_vocabulary_corpus(texts, int(min_reports_per_word))
        n_rare = sum(1 for n in reports_per_word.values() if n < min_reports_per_word)
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        wp = BertWordPieceTokenizer(lowercase=True)
        # min_frequency counts occurrences, not reports: the rare words are already out of the corpus
        wp.train_from_iterator(
            corpus, vocab_size=spec["vocab_size"], min_frequency=1, show_progress=False, special_tokens=special
        )
        # a token may still spell a rare word as a piece of frequent ones (e.g. "ring" of "rings"): drop it
        learned = sorted(wp.get_vocab().items(), key=lambda item: item[1])
        tokens = special + [
            t
            for t, _ in learned
            if t not in special and not (len(t) > 1 and 0 < reports_per_word.get(t, 0) < min_reports_per_word)
        ]
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
            f"demo text tower: BERT {spec['num_hidden_layers']} layers x {spec['hidden_size']}, WordPiece vocabulary {len(tokenizer)} trained on {len(texts)} reports "
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
