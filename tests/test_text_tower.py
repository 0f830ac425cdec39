"""The demo text tower's WordPiece vocabulary: a deterministic function of the training reports.

The vocabulary used to be learned by the ``tokenizers`` library's trainer, whose tie-breaking follows a hash
order seeded per process, so two fresh runs of ``python train.py --demo`` built different towers. These tests
build it in two fresh Python processes and compare the saved files byte for byte, pin the order on a tiny
corpus, and check that held-out demo reports tokenise with few ``[UNK]``. No report text is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_emrfuse.training.text_tower import (
    MIN_REPORTS_PER_WORD,
    SPECIAL_TOKENS,
    build_demo_text_tower,
    wordpiece_vocabulary,
)

ROOT = Path(__file__).resolve().parents[1]

_BUILD_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from modeling_emrfuse.training.text_tower import build_demo_text_tower

class MainProcess:
    is_main_process = True
    def wait_for_everyone(self):
        pass

data = Path(sys.argv[1])
texts = [p.read_text(encoding="utf-8") for p in sorted(data.glob("*/*_text.txt"))]
build_demo_text_tower(texts, Path(sys.argv[2]), MainProcess())
"""


class _MainProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


@pytest.fixture(scope="module")
def demo_reports(tmp_path_factory):
    """``(folder, training reports, held-out reports)`` of 40 tiny demo cases (32 / 8)."""
    from datasets_scripts.demo_data import write_demo_dataset

    folder = tmp_path_factory.mktemp("demo-reports")
    write_demo_dataset(folder, n_cases=40, size=(32, 32, 24), seed=0)
    texts = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*/*_text.txt"))]
    assert len(texts) == 40
    return folder, texts[:32], texts[32:]


def test_demo_vocabulary_is_byte_identical_in_two_fresh_processes(tmp_path, demo_reports):
    folder = demo_reports[0]
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for case in sorted(folder.iterdir())[:32]:  # the training reports only, as train.py gives them
        if case.is_dir():
            (train_dir / case.name).symlink_to(case)
    outs = []
    for i, hash_seed in enumerate(("1", "2")):  # fresh processes whose str hashing differs
        out = tmp_path / f"tower{i}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(
            [sys.executable, "-c", _BUILD_IN_A_FRESH_PROCESS, str(train_dir), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    names = [n for n in ("vocab.txt", "tokenizer.json", "tokenizer_config.json") if (outs[0] / n).exists()]
    assert "tokenizer.json" in names or "vocab.txt" in names
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_wordpiece_vocabulary_order_on_a_tiny_corpus():
    """Specials, the alphabet (word-initial, then ``##`` pieces; most frequent first, ties by the string), whole
    words by frequency (ties by the string), then sub-word pieces by frequency, up to ``vocab_size``."""
    corpus = ["ab ab ba", "ab ba", "ca"]
    reports_per_word = {"ab": 2, "ba": 2, "ca": 1}
    vocab = wordpiece_vocabulary(corpus, reports_per_word, vocab_size=100, min_reports=1)
    # character counts: a 6, b 5, c 1; words: ab 3, ba 2, ca 1; no piece of length >= 2 is not a word
    assert vocab == list(SPECIAL_TOKENS) + ["a", "b", "c", "##a", "##b", "##c", "ab", "ba", "ca"]
    assert wordpiece_vocabulary(corpus, reports_per_word, vocab_size=12, min_reports=1) == vocab[:12]
    # sub-word pieces of longer words: prefixes and ## suffixes of >= 2 characters, by occurrences, ties by the string
    vocab = wordpiece_vocabulary(["abcd abcd abce"], {"abcd": 1, "abce": 1}, vocab_size=100, min_reports=1)
    alphabet = ["a", "b", "c", "d", "e", "##a", "##b", "##c", "##d", "##e"]
    pieces = ["ab", "abc", "##bcd", "##cd", "##bce", "##ce"]  # counts 3, 3, 2, 2, 1, 1
    assert vocab == list(SPECIAL_TOKENS) + alphabet + ["abcd", "abce"] + pieces


def test_wordpiece_vocabulary_leaves_out_pieces_that_spell_a_rare_word():
    k = MIN_REPORTS_PER_WORD
    corpus = ["rings boring"] * k  # "ring" itself (1 report) was removed from the corpus
    vocab = wordpiece_vocabulary(corpus, {"rings": k, "boring": k, "ring": 1}, vocab_size=1000, min_reports=k)
    assert "rings" in vocab and "boring" in vocab and "rin" in vocab and "##ing" in vocab
    assert "ring" not in vocab and "##ring" not in vocab


def test_demo_tokenizer_reads_held_out_demo_reports_with_few_unknown_tokens(tmp_path, demo_reports):
    _, train_texts, held_out = demo_reports
    folder = Path(build_demo_text_tower(train_texts, tmp_path / "tower", _MainProcess()))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    assert [t for t, _ in sorted(vocab.items(), key=lambda x: x[1])][:5] == list(SPECIAL_TOKENS)
    ids = [i for text in held_out for i in tok(text, add_special_tokens=False)["input_ids"]]
    unknown = sum(1 for i in ids if i == tok.unk_token_id)
    assert len(ids) > 8 * 40  # the reports are read, not dropped
    assert unknown / len(ids) < 0.01, f"{unknown} of {len(ids)} tokens are [UNK]"
    # the words of the training reports are whole entries: a held-out report is mostly one token per word
    words = sum(len(text.split()) for text in held_out)
    assert len(ids) < 1.6 * words
