"""bench/bench_text_grading.py (HGG vs LGG from the report alone): folds, the privacy rule of the fold
tokenizer, the output structure, a --quick run on synthetic reports.

Every report here is synthetic (random neutral words); real reports are only read by the skipped-when-absent
test at the end, which asserts counts and never prints text.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from brats_fixtures import write_case_2020, write_name_mapping

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
SCRIPT = ROOT / "bench" / "bench_text_grading.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_text_grading", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_text_grading", module)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

COMMON = "the lesion shows signal change with oedema in the region and mass effect on the ventricle".split()
HGG_WORDS = "necrosis enhancing ring irregular".split()
LGG_WORDS = "homogeneous nonenhancing diffuse infiltrative".split()


def synthetic_reports(n: int = 40, n_lgg: int = 12, seed: int = 0):
    """``{case_id: text}``, ``{case_id: grade}``: fake reports from a small neutral vocabulary (no real text)."""
    rng = np.random.default_rng(seed)
    texts, grades = {}, {}
    for i in range(n):
        case_id = f"BraTS20_Training_{i + 1:03d}"
        grade = "LGG" if i < n_lgg else "HGG"
        words = list(rng.choice(COMMON, size=25)) + list(rng.choice(LGG_WORDS if grade == "LGG" else HGG_WORDS, size=3))
        if i % 10 == 0:
            words.append(f"uniqueword{i}")  # occurs in a single report
        texts[case_id], grades[case_id] = " ".join(words) + ".", grade
    return texts, grades


def write_real_like(folder: Path, n: int = 40, n_lgg: int = 12) -> Path:
    """A fake ``realdata`` folder: textbrats_reports.jsonl + meta/name_mapping.csv (synthetic reports)."""
    texts, grades = synthetic_reports(n, n_lgg)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "textbrats_reports.jsonl", "w") as fh:
        for case_id, text in texts.items():
            fh.write(json.dumps({"case_id": case_id, "text": text}) + "\n")
    write_name_mapping(folder / "meta", grades)
    return folder


# ------------------------------------------------------------------------------------------- folds
def test_folds_are_stratified_deterministic_and_partition():
    labels = np.array([1] * 76 + [0] * 293)
    folds = bench.make_folds(labels)
    again = bench.make_folds(labels.copy())
    assert len(folds) == 5
    for (tr, te), (tr2, te2) in zip(folds, again):
        assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
        assert not set(tr) & set(te)
        assert abs(int(labels[te].sum()) - 76 / 5) <= 1  # stratified
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(len(labels)))


def test_folds_refuse_too_few_cases_of_a_grade():
    with pytest.raises(ValueError, match="LGG"):
        bench.make_folds(np.array([0] * 20 + [1] * 3))


# ------------------------------------------------------------------------------------------- tokenizer privacy
def test_fold_tokenizer_vocabulary_has_only_words_from_at_least_5_reports():
    rng = np.random.default_rng(1)
    texts = []
    for i in range(30):
        words = list(rng.choice(COMMON, size=20))
        if i < 4:  # seen in 4 reports only, but 50 times in each: frequent as tokens, rare as reports
            words += ["quadrupleword"] * 50
        if i < 5:  # seen in exactly 5 reports: allowed
            words += ["fivefoldword"] * 2
        if i % 7 == 0:
            words.append(f"singleton{i}")
        if i < 3:
            words.append("men")  # a rare word that is also the prefix of a frequent one
        words += ["meningeal"] * (i < 10)
        texts.append(" ".join(words))
    tok = bench.train_fold_tokenizer(texts, vocab_size=500)
    vocab = set(tok.get_vocab())
    df = bench.document_frequency(texts)
    assert set(bench.SPECIAL_TOKENS) <= vocab
    words_in_vocab = [t for t in vocab if t not in bench.SPECIAL_TOKENS and not t.startswith("##")]
    offending = [t for t in words_in_vocab if 0 < df.get(t, 0) < 5]
    assert not offending
    assert "quadrupleword" not in vocab and "men" not in vocab
    assert not any(t.startswith("singleton") for t in vocab)
    assert "fivefoldword" in vocab and "lesion" in vocab
    ids = tok("quadrupleword lesion")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "[CLS]"


# ------------------------------------------------------------------------------------------- output
def _fake_rows():
    def summary(ba, auc, f1):
        return {
            "balanced_accuracy": {"mean": ba, "std": 0.0},
            "roc_auc": {"mean": auc, "std": 0.0},
            "f1": {"mean": f1, "std": 0.0},
        }

    return {
        "tfidf_logreg": {"n_cases": 10, "summary": summary(0.6, 0.7, 0.4), "seconds": 1.0},
        "emrfuse_text_scratch": {"n_cases": 10, "summary": summary(0.5, None, 0.0), "seconds": 2.0},
    }


def test_final_json_is_strict_and_names_the_rows():
    rows = _fake_rows()
    line = bench.final_json(rows)
    obj = json.loads(line)
    assert set(obj) == set(rows)
    assert obj["emrfuse_text_scratch"]["roc_auc"] is None
    assert set(obj["tfidf_logreg"]) == {"balanced_accuracy", "roc_auc", "f1"}
    assert "NaN" not in line
    table = bench.markdown_table(rows)
    assert table.count("\n") == 3 and "n/a" in table


def test_fold_metrics_use_lgg_as_positive_and_null_for_undefined_auc():
    m = bench.fold_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.9, 0.4]))
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)  # LGG: one TP, one FP, one FN
    assert m["roc_auc"] == pytest.approx(0.75)
    assert bench.fold_metrics(np.array([0, 0]), np.array([0.1, 0.7]))["roc_auc"] is None


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="textbrats_reports.jsonl"):
        bench.main(["--data", str(tmp_path / "nowhere"), "--rows", "tfidf_logreg"])


# ------------------------------------------------------------------------------------------- a quick run
def test_quick_run_on_synthetic_reports(tmp_path, capsys):
    data = write_real_like(tmp_path / "realdata")
    rows = bench.main(["--data", str(data), "--quick", "--rows", "tfidf_logreg", "emrfuse_text_scratch"])
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    obj = json.loads(last)
    assert list(obj) == ["tfidf_logreg", "emrfuse_text_scratch"]
    for metrics in obj.values():
        assert set(metrics) == {"balanced_accuracy", "roc_auc", "f1"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    assert "| row |" in out and "emrfuse_text_scratch" in out
    # the same folds for every row
    fold_ids = {name: [f["test_ids"] for f in r["folds"]] for name, r in rows.items()}
    assert fold_ids["tfidf_logreg"] == fold_ids["emrfuse_text_scratch"]
    assert sorted(i for fold in fold_ids["tfidf_logreg"] for i in fold) == sorted(synthetic_reports()[0])
    # the (synthetic) report words never reach stdout
    assert "uniqueword0" not in out and "lesion" not in out
    # a text model can use the grade words of the synthetic set at least as well as chance (TF-IDF)
    assert obj["tfidf_logreg"]["roc_auc"] > 0.5


def test_quick_run_minilm_row(tmp_path, capsys):
    from modeling_emrfuse.training.offline_text_tower import minilm_available

    if not minilm_available():
        rows = bench.main(
            ["--data", str(write_real_like(tmp_path / "realdata")), "--quick", "--rows", "emrfuse_text_minilm"]
        )
        assert rows == {} and "skipped" in capsys.readouterr().out
        return
    data = write_real_like(tmp_path / "realdata", n=25, n_lgg=10)
    rows = bench.main(
        ["--data", str(data), "--quick", "--rows", "emrfuse_text_minilm", "--minilm_cache", str(tmp_path / "cache")]
    )
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(obj) == ["emrfuse_text_minilm"] and len(rows["emrfuse_text_minilm"]["folds"]) == 5


def test_demo_reports_calibration_row(tmp_path, capsys):
    data = write_real_like(tmp_path / "realdata")
    texts, grades = synthetic_reports(20, 8, seed=3)
    demo = tmp_path / "demo"
    for i, case_id in enumerate(sorted(texts)):
        write_case_2020(demo, case_id, seed=i, report=texts[case_id])
    write_name_mapping(demo, grades)
    rows = bench.main(["--data", str(data), "--rows", "tfidf_logreg", "--demo_reports", str(demo)])
    out = capsys.readouterr().out
    obj = json.loads(out.strip().splitlines()[-1])
    assert list(obj) == ["tfidf_logreg", bench.DEMO_ROW]
    assert rows[bench.DEMO_ROW]["n_cases"] == 20
    assert "difference (demo - real)" in out and "phrase rule on demo reports" in out
    assert rows[bench.DEMO_ROW]["calibrated"] == (abs(rows[bench.DEMO_ROW]["delta_balanced_accuracy"]) <= 0.05)
    assert "necrosis" not in out and "homogeneous" not in out  # no report words in the output
    delta = rows[bench.DEMO_ROW]["delta_balanced_accuracy"]
    assert delta == pytest.approx(obj[bench.DEMO_ROW]["balanced_accuracy"] - obj["tfidf_logreg"]["balanced_accuracy"])


# ------------------------------------------------------------------------------------------- real reports
needs_real = pytest.mark.skipif(
    not (REALDATA / "textbrats_reports.jsonl").is_file(), reason=f"real reports {REALDATA} are absent"
)


@needs_real
def test_real_reports_load_with_grades():
    data = bench.load_real_reports(REALDATA)
    assert len(data.ids) == 369
    assert int(data.labels.sum()) == 76  # LGG
    folds = bench.make_folds(data.labels)
    assert all(abs(int(data.labels[te].sum()) - 76 / 5) <= 1 for _, te in folds)


@needs_real
def test_no_phrase_of_the_real_reports_separates_the_grades():
    """The phrase rule the demo reports are held to passes on the real reports (only counts are read)."""
    data = bench.load_real_reports(REALDATA)
    result = bench.phrase_grade_association(data.texts, data.labels)
    assert result["n_phrases"] > 500 and result["n_flagged"] == 0
    assert result["min_p"] > result["threshold"]


# ------------------------------------------------------------------------------------------- phrase rule
def test_phrase_rule_flags_a_grade_phrase_and_returns_no_text():
    texts, grades = synthetic_reports(n=60, n_lgg=30, seed=4)  # LGG/HGG words drawn from disjoint lists
    labels = [int(grades[c] == "LGG") for c in texts]
    result = bench.phrase_grade_association(list(texts.values()), labels)
    assert result["n_flagged"] > 0 and result["min_p"] < result["threshold"]
    assert result["threshold"] == pytest.approx(0.01 / result["n_phrases"])
    assert all(len(f) == 3 and all(isinstance(v, (int, float)) for v in f) for f in result["flagged"])
    # the same reports with shuffled grades: nothing separates them
    shuffled = np.random.default_rng(0).permutation(labels)
    neutral = [" ".join(np.random.default_rng(i).choice(COMMON, size=25)) for i in range(60)]
    assert bench.phrase_grade_association(neutral, shuffled)["n_flagged"] == 0
