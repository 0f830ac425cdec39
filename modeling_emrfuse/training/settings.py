"""The settings of a training run, one small frozen dataclass per concern.

``train.py`` parses the options; :meth:`TrainingSettings.from_args` picks each concern's values by option name,
and every function of this package takes the part it uses (never the whole argument namespace).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

T = TypeVar("T")


def check_option_values(options: Any, presets: Any, min_reports_per_word: int) -> None:
    """Range checks of train.py's options, each a ``SystemExit`` naming the option (combinations of options are
    checked where train.py fills its defaults)."""
    o = options
    problems = [
        (o.vocab_min_reports < min_reports_per_word, f"--vocab_min_reports must be >= {min_reports_per_word}"),
        (o.eval_fraction is not None and not 0.0 <= o.eval_fraction < 1.0, "--eval_fraction must be in [0, 1)"),
        (not 0.0 <= o.sequence_dropout < 1.0, "--sequence_dropout must be in [0, 1)"),
        (o.grading_slices < 0, "--grading_slices must be >= 0 (0: every slice)"),
        (
            o.grading_calibration_folds < 0 or o.grading_calibration_folds == 1,
            "--grading_calibration_folds must be 0 (no calibration) or >= 2",
        ),
        (
            o.grading_pooling == "tumour" and o.grading_fit == "finetune",
            "--grading_pooling tumour is fitted with --grading_fit head (the masks of the segmentation model), not with",
        ),
        (
            o.image_size is not None and (o.image_size < 32 or o.image_size % 32),
            "--image_size must be a multiple of 32 (>= 32)",
        ),
    ]
    values = {
        "--vocab_min_reports": o.vocab_min_reports,
        "--eval_fraction": o.eval_fraction,
        "--sequence_dropout": o.sequence_dropout,
        "--grading_slices": o.grading_slices,
        "--grading_calibration_folds": o.grading_calibration_folds,
        "--image_size": o.image_size,
        "--grading_pooling": "--grading_fit finetune",
    }
    for failed, message in problems:
        if failed:
            raise SystemExit(f"train.py: {message}, got {values[message.split()[0]]}.")
    for name in ("eval_min_component_mm3", "eval_et_min_mm3"):
        value = getattr(o, name)
        if value is not None and not 0.0 <= value < float("inf"):
            raise SystemExit(f"train.py: --{name} must be a number of mm^3 >= 0, got {value}.")
    if o.batch_size % o.slices_per_case:
        raise SystemExit(
            f"train.py: --batch_size {o.batch_size} must be a multiple of --slices_per_case {o.slices_per_case}."
        )
    chosen = [f"--{n}" for n in ("no_text", "no_reports", "shuffle_reports") if getattr(o, n, False)]
    if len(chosen) > 1:
        raise SystemExit(f"train.py: {' and '.join(chosen)} exclude each other (each says what the reports are).")
    if o.preset is not None and o.preset not in presets:
        raise SystemExit(f"train.py: unknown --preset {o.preset!r}; use one of {sorted(presets)}.")


def from_options(cls: Type[T], options: Any, **overrides: Any) -> T:
    """``cls`` with every field read from the attribute of ``options`` of the same name (``overrides`` win)."""
    values = {
        f.name: getattr(options, f.name) for f in fields(cls) if f.name not in overrides and hasattr(options, f.name)
    }
    return cls(**values, **overrides)


@dataclass(frozen=True)
class ModelSettings:
    """What builds the model and its processor (towers, sizes, input channels, report length)."""

    vision_model: str
    vision_pretrained: bool = False
    context_slices: int = 0
    sequence_presence: bool = False
    grading_slices: int = 32  # 0: every slice (stored as None in the config)
    grading_pooling: str = "slices"  # the grading model's config.grading_pooling (slices | tumour)
    fusion_dim: Optional[int] = None
    decoder_channels: Optional[List[int]] = None
    cross_attention_heads: Optional[int] = None
    align_loss_weight: Optional[float] = None
    ortho_loss_weight: Optional[float] = None
    init_vision_from: Optional[str] = None
    max_report_tokens: Optional[int] = None
    clip_percentiles: Optional[Tuple[float, float]] = None  # the image processor's, saved with it


@dataclass(frozen=True)
class LoaderSettings:
    """The slice cache and the training slices drawn from it (augmentation, sampling, workers)."""

    cache_dir: str
    max_report_tokens: Optional[int] = None
    sequence_presence: bool = False
    sequence_dropout: float = 0.0
    image_size: Optional[int] = None
    context_slices: int = 0
    samples_per_epoch: Optional[int] = None
    tumour_prob: float = 0.7
    slices_per_case: int = 4
    no_augmentation: bool = False
    augmentation: str = "paper"  # paper | monai | none (--no_augmentation: none)
    flip_axes: Tuple[int, ...] = ()
    grading_slices: int = 32
    num_workers: int = 0


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its learning-rate schedule."""

    weight_decay: float = 1e-4
    text_learning_rate: Optional[float] = None
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class ScheduleSettings:
    """How long each stage trains: ``main`` (max_steps or num_epochs) and the demo's ``grading`` stage."""

    max_steps: Optional[int] = None
    learning_rate: float = 1e-4
    num_epochs: Optional[int] = None
    grading_max_steps: Optional[int] = None
    grading_learning_rate: float = 1e-4

    def stage(self, name: str) -> Tuple[Optional[int], float]:
        """``(max_steps, learning_rate)`` of a stage (``max_steps`` None: ``num_epochs`` decides)."""
        if name == "main":
            return self.max_steps, self.learning_rate
        if name == "grading":
            return self.grading_max_steps, self.grading_learning_rate
        raise ValueError(f"unknown training stage {name!r}")


@dataclass(frozen=True)
class LoopSettings:
    """The training loop: batches, logging, evaluations, checkpoints, interruption."""

    batch_size: int = 16
    slices_per_case: int = 4
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = 2
    stop_after_steps: Optional[int] = None
    report_to: str = "none"


@dataclass(frozen=True)
class GradingSettings:
    """The grading stage: how the head is fitted, calibrated and sampled."""

    grading_fit: str = "head"
    grading_calibration_folds: int = 3
    grading_sampling: str = "balanced"
    grading_after_segmentation: bool = False


@dataclass(frozen=True)
class CardSettings:
    """What the model card and the trackers record about the run."""

    hub_model_id: Optional[str] = None
    vocab_min_reports: int = 5
    tracker_config: Dict[str, Any] = field(default_factory=dict)  # every plain option except the Hub token
    train_command: Optional[str] = None


@dataclass(frozen=True)
class EvaluationSettings:
    """How the held-out (and selection) cases are predicted: the pipeline's inference options, as ``emrfuse predict``
    takes them (``None``: the processor's setting, i.e. off for a freshly trained model)."""

    eval_tta: bool = False
    eval_min_component_mm3: Optional[float] = None
    eval_et_min_mm3: Optional[float] = None

    def pipeline_options(self) -> Dict[str, Any]:
        """The keyword arguments of the pipeline call (only those set)."""
        options: Dict[str, Any] = {"tta": True} if self.eval_tta else {}
        for name in ("min_component_mm3", "et_min_mm3"):
            value = getattr(self, f"eval_{name}")
            if value is not None:
                options[name] = float(value)
        return options


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a training stage needs, by concern."""

    model: ModelSettings
    loader: LoaderSettings
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    loop: LoopSettings
    grading: GradingSettings
    card: CardSettings
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    @classmethod
    def from_args(cls, args: Any, train_command: Optional[str] = None) -> "TrainingSettings":
        """The settings of a parsed ``train.py`` command line."""
        tracker = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        return cls(
            model=from_options(
                ModelSettings,
                args,
                clip_percentiles=None
                if getattr(args, "clip_percentiles", None) is None
                else tuple(args.clip_percentiles),
            ),
            loader=from_options(LoaderSettings, args, flip_axes=tuple(args.flip_axes)),
            optimizer=from_options(OptimizerSettings, args),
            schedule=from_options(ScheduleSettings, args),
            loop=from_options(LoopSettings, args),
            grading=from_options(GradingSettings, args),
            card=from_options(CardSettings, args, tracker_config=tracker, train_command=train_command),
            evaluation=from_options(EvaluationSettings, args),
        )
