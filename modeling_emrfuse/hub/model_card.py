"""The model card (README.md with Hub metadata) that ``train.py`` writes next to a saved model.

The card says what the model is, how to load and run it, how it was trained, what it measured
(also as ``model-index`` metadata), where the training data came from, and its limits (research
use only, not a medical device; demo-data models say so in the title, metadata and limitations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..brats_labels import REGIONS
from ..evaluation.report import METRIC_NAMES

PIPELINE_TAGS = {"segmentation": "image-segmentation", "classification": "image-classification"}
BASE_TAGS = [
    "emrfuse",
    "medical-imaging",
    "brain-tumor",
    "glioma",
    "brats",
    "mri",
    "radiology-report",
    "multimodal",
    "custom_code",
]
MODEL_CLASSES = {"segmentation": "EmrFuseForSegmentation", "classification": "EmrFuseForImageClassification"}
AUTO_CLASSES = {"segmentation": "AutoModelForSemanticSegmentation", "classification": "AutoModelForImageClassification"}


def _eval_results(summary: Mapping[str, Any], task: str, dataset_name: str, dataset_type: str):
    from huggingface_hub import EvalResult

    results = []
    task_type = PIPELINE_TAGS[task]
    split = str(summary.get("split", "test"))
    seg = summary.get("segmentation") or {}
    for region in REGIONS:
        for metric, title in METRIC_NAMES.items():
            s = seg.get(region, {}).get(metric)
            if s and s.get("n", 0):
                results.append(
                    EvalResult(
                        task_type=task_type,
                        dataset_type=dataset_type,
                        dataset_name=dataset_name,
                        dataset_split=split,
                        metric_type="hd95" if metric == "hd95" else metric,
                        metric_value=round(float(s["mean"]), 4),
                        metric_name=f"{title} {region} (mean over cases)",
                    )
                )
    grading = summary.get("grading") or {}
    for metric in ("accuracy", "balanced_accuracy", "roc_auc", "f1"):
        value = grading.get(metric)
        if value is not None and value == value:  # not NaN
            results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=metric,
                    metric_value=round(float(value), 4),
                    metric_name=f"Grading {metric.replace('_', ' ')}",
                )
            )
    return results


def _towers_sentence(text_model: Optional[str], vision_model: str, cls: str) -> str:
    if not text_model:
        return (
            f"This is the image-only variant (no text tower; any report is ignored): a timm image tower (`{vision_model}`)\n"
            "with the segmentation decoder of EmrFuse, implemented as a Hugging Face `transformers` model with\n"
            f"custom code (`{cls}`)."
        )
    return (
        f"It fuses a BERT-family text tower (`{text_model}`) and a timm image tower (`{vision_model}`) with\n"
        'the fusion head of "Multimodal Electronic Medical Record Disease Classification Combining Image\n'
        'and Text Data" (modality alignment, self-attention, residual connections, dynamic feature\n'
        "weighting and an orthogonality loss), implemented as a Hugging Face `transformers` model with\n"
        f"custom code (`{cls}`)."
    )


def build_model_card(
    *,
    task: str,
    model_name: str,
    summary: Mapping[str, Any],
    results_markdown: str,
    training_config: Mapping[str, Any],
    data: Mapping[str, Any],
    text_model: Optional[str],
    vision_model: str,
    repo_id: Optional[str] = None,
    train_command: Optional[str] = None,
):
    """Build the :class:`huggingface_hub.ModelCard` of a trained model.

    ``data``: ``{"name", "synthetic" (bool), "release", "num_train_cases", "num_eval_cases",
    "description"}``; ``training_config``: the run's arguments (shown as a table);
    ``results_markdown``: the run's evaluation table
    (:func:`modeling_emrfuse.evaluation.report.format_results_markdown`).
    """
    from huggingface_hub import ModelCard

    if task not in PIPELINE_TAGS:
        raise ValueError(f"task must be one of {sorted(PIPELINE_TAGS)}, got {task!r}.")
    card_data = _card_data(task, model_name, summary, data, text_model)
    synthetic = bool(data.get("synthetic"))
    cls = MODEL_CLASSES[task]
    title = f"{model_name}" + (" (trained on synthetic demo data)" if synthetic else "")
    body = f"""
# {title}

EmrFuse reads a brain MRI study (T1, T1ce, T2, FLAIR) together with its radiology report and
{"segments the tumour sub-regions (whole tumour WT, tumour core TC, enhancing tumour ET)" if task == "segmentation" else "grades the glioma (HGG vs LGG, one prediction per case)"}.
{_towers_sentence(text_model, vision_model, cls)}

> **Research use only. This is not a medical device** and must not be used for diagnosis,
> treatment planning or any clinical decision.{" It was trained on SYNTHETIC demo data and says nothing about real patients." if synthetic else ""}
"""
    body += _usage_section(task, repo_id or "path/to/this/folder")
    body += _evaluation_and_training_sections(task, summary, results_markdown, training_config, data, train_command)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n" + body)


def _card_data(
    task: str, model_name: str, summary: Mapping[str, Any], data: Mapping[str, Any], text_model: Optional[str]
):
    """The card's Hub metadata: pipeline tag, tags, datasets, metrics, ``model-index`` results, base model."""
    from huggingface_hub import ModelCardData

    synthetic = bool(data.get("synthetic"))
    dataset_name = str(data.get("name", "BraTS"))
    dataset_type = "synthetic-brats-demo" if synthetic else str(data.get("type", "brats"))
    tags = (
        BASE_TAGS
        + ([task] if task == "segmentation" else ["tumor-grading"])
        + (["synthetic-data", "demo"] if synthetic else [])
    )
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[task],
        license="apache-2.0",
        language="en",
        tags=tags,
        datasets=None if synthetic else [dataset_type],
        metrics=["dice", "precision", "recall", "hd95", "accuracy"],
        model_name=model_name,
        eval_results=_eval_results(summary, task, dataset_name, dataset_type) or None,
        base_model=text_model if (text_model and "/" in text_model and not Path(text_model).exists()) else None,
    )


def _metrics_note(task: str, summary: Mapping[str, Any]) -> str:
    """The paragraph under the evaluation table: how the metrics were computed (and, for grading, calibration)."""
    if task == "segmentation":
        return (
            "Segmentation metrics are computed per case in 3D on the original image grid at the header's voxel\n"
            "spacing (Dice, PPV, sensitivity; HD95 as MedPy defines it, 373.13 mm when exactly one of prediction\n"
            "and reference is empty), then aggregated over the held-out cases (mean ± std (median))."
        )
    metrics_note = (
        "Grading metrics are per case: the slices of the grading bag policy (`grading_slices` in config.json,\n"
        "evenly spaced brain slices; every slice when it is null) are pooled into one prediction, as `emrfuse\n"
        'predict` and the pipeline pool them. With `grading_pooling: "tumour"` the bag is the slices where the\n'
        "segmentation model predicts tumour (at most `grading_slices`, evenly spaced), each read over the predicted\n"
        "tumour only; a case without predicted tumour is graded from the evenly spaced slices."
    )
    calibration = summary.get("calibration") or {}
    if calibration.get("temperature"):
        metrics_note += (
            f"\nThe grade probabilities are temperature-scaled (T = {float(calibration['temperature']):.3g}, fitted on the\n"
            f"out-of-fold predictions of {calibration.get('folds')} heads, each trained without one fold of the training\n"
            "cases); this changes no predicted grade. Log loss and Brier score say how well calibrated they are."
        )
    else:
        metrics_note += "\nThe grade probabilities are not calibrated: read them as scores, not as frequencies."
    return metrics_note


def _usage_section(task: str, load_id: str) -> str:
    """The card's "How to use" section: loading with the Auto classes and one forward pass."""
    auto_cls = AUTO_CLASSES[task]
    body = f"""
## How to use

```python
import torch
from transformers import {auto_cls}, AutoProcessor

model = {auto_cls}.from_pretrained("{load_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{load_id}", trust_remote_code=True)

# volumes: {{"t1": path_or_array, "t1ce": ..., "t2": ..., "flair": ...}} (240 x 240 x 155 BraTS grid)
inputs = processor(volumes=[volumes], text=[report_text], return_tensors="pt")
crop_info = inputs.pop("crop_info")
with torch.no_grad():
    out = model(**{{k: v for k, v in inputs.items() if k in ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "slice_to_case", "has_report")}})
"""
    if task == "segmentation":
        body += """label_map = processor.image_processor.post_process_segmentation(
    out.logits, crop_info[0], label_convention="brats2017")  # uint8 (X, Y, Z), labels 1/2/4
```

From the shell: `emrfuse predict <BraTS case folder> --model <this folder or repo id> -o <dir>`, or in Python
`transformers.pipeline(model=<this folder or repo id>, trust_remote_code=True)(<case folder>)`.
"""
    else:
        body += """probabilities = out.logits.softmax(-1)  # one row per case, columns model.config.id2label
```
"""
    return body


def _evaluation_and_training_sections(
    task: str,
    summary: Mapping[str, Any],
    results_markdown: str,
    training_config: Mapping[str, Any],
    data: Mapping[str, Any],
    train_command: Optional[str],
) -> str:
    """The card from the model's inputs on: evaluation, training data, configuration, limitations, citation."""
    synthetic = bool(data.get("synthetic"))
    metrics_note = _metrics_note(task, summary)
    config_rows = "\n".join(f"| `{k}` | `{_short(v)}` |" for k, v in training_config.items())
    provenance = _provenance(data)
    return f"""
The model reads axial slices (with `context_slices` neighbours as extra channels) of the
brain's bounding box; the report is encoded once per case. A case without a report still gets
a prediction (the output's `has_report` says so). Outputs also carry `alpha_text` /
`alpha_image` (the dynamic modality weights) and `token_attention` over the report.

## Evaluation

{results_markdown}

{metrics_note}

## Training data

{provenance}

## Training configuration

{("Command: `" + train_command + "`" + chr(10) + chr(10)) if train_command else ""}| argument | value |
|---|---|
{config_rows}

## Limitations

- Research use only; **not a medical device**; not validated for any clinical use.
- {"Trained and evaluated on synthetic demo volumes and synthetic reports: the numbers above show that the pipeline learns, not how it would perform on patients." if synthetic else "Trained on the data described above only; performance on other scanners, protocols, populations or report styles is unknown."}
- Expects skull-stripped, co-registered 4-sequence MRI on the BraTS grid (1 mm isotropic); other
  spacings are not resampled.
- The report must describe the same study; a report that contradicts the images can mislead the model.
- Whether the report helps is not established: on the 369 real TextBraTS reports the report alone
  predicts HGG vs LGG at chance level (balanced accuracy about 0.5 for a TF-IDF baseline and for
  EmrFuse's text-only model; `python bench/bench_text_grading.py`), so the paper's claim that the
  report improves grading does not carry over to these reports.
- HGG/LGG grading follows the pre-2021 BraTS labels, not the WHO CNS5 classification.

## Citation

The fusion head implements the paper "Multimodal Electronic Medical Record Disease
Classification Combining Image and Text Data". BraTS data: cite the BraTS benchmark papers of
the release used.
"""


def _provenance(data: Mapping[str, Any]) -> str:
    if data.get("synthetic"):
        text = (
            f"Synthetic demo data generated by `emrfuse demo-data` (`datasets_scripts.demo_data`): "
            f"{data.get('num_train_cases', '?')} training and {data.get('num_eval_cases', '?')} held-out "
            "synthetic cases in the BraTS 2020 layout (simulated anatomy, simulated tumours, "
            "reports written by a noisy reader calibrated to the real TextBraTS reports). No patient data."
        )
    else:
        text = (
            f"{data.get('name', 'BraTS')} (release {data.get('release', 'unknown')}): "
            f"{data.get('num_train_cases', '?')} training and {data.get('num_eval_cases', '?')} held-out cases "
            f"(patient-level split). Reports: {data.get('reports', 'per-case report files')}. "
            "BraTS data terms apply (research use; cite the BraTS papers)."
        )
    if data.get("description"):
        text += f" {data['description']}"
    return text


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_model_card(card, folder: str | Path) -> Path:
    """Save ``card`` as ``README.md`` inside ``folder`` and return the path."""
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def training_config_for_card(args: Mapping[str, Any], keys: Optional[List[str]] = None) -> Dict[str, Any]:
    """The run arguments worth showing in the card (no paths to the user's machine, no secrets)."""
    hidden = {"hub_token", "output_dir", "data_dir", "reports", "logging_dir", "resume_from_checkpoint", "cache_dir"}
    return {k: v for k, v in args.items() if (keys is None or k in keys) and k not in hidden and v is not None}
