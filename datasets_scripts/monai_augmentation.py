"""Training-slice augmentation from MONAI (``SliceDataset(augmentation="monai")``, ``train.py --augmentation monai``).

MONAI dictionary transforms in two stages, applied to an image slice and its region bit mask together:

- spatial, one resampling of every image channel and the label with the same draw (label: nearest neighbour, so
  the region bits stay exact): mirror flips (``flip_axes``), a rotation + scaling + translation (``RandAffined``) and a small elastic
  deformation (``Rand2DElasticd``); zero padding, as the background is 0 after normalisation;
- intensity, drawn independently for each MRI sequence and applied alike to its 2.5D context slices: Gaussian noise,
  gamma (``RandAdjustContrastd``, statistics retained as nnU-Net does), a smooth multiplicative bias field, and
  intensity scaling and shifting.

Probabilities follow nnU-Net's defaults (rotation / scaling 0.2 each, noise 0.1, gamma 0.3, brightness 0.15,
mirroring 0.5). The sequence-presence channels are appended after augmentation (exactly 0 / 1), and the channels of a
missing or dropped sequence are set back to exactly 0 after the intensity transforms.

Every draw comes from the seed the caller gives (:meth:`MonaiSliceAugmentation.__call__`), so one seed always gives
the same sample: every transform of the two stages is given one shared ``numpy.random.RandomState``
(``set_random_state(state=...)``) that is reseeded per slice. (``Compose.set_random_state(seed)`` would build a new
generator for each of the pipeline's ~50 random transforms and sub-transforms: 27 ms per slice here, more than the
transforms themselves.) MONAI is imported only when this pipeline is built.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

from modeling_emrfuse.brats_labels import SEQUENCES

__all__ = ["MONAI_MISSING", "AUGMENTATIONS", "MonaiSliceAugmentation", "require_monai"]

AUGMENTATIONS = ("paper", "monai", "none")
"""``paper``: the hand-written affine of :class:`~datasets_scripts.slice_cache.SliceDataset` (the default);
``monai``: this module's pipeline; ``none``: random crop / pad only."""

MONAI_MISSING = (
    "augmentation 'monai' (train.py --augmentation monai) needs MONAI, which is not installed: "
    "pip install monai (or pip install 'emrfuse[augment]')."
)


def require_monai():
    """The ``monai`` module, or ``ImportError`` naming ``pip install monai``."""
    try:
        import monai
    except ImportError as exc:
        raise ImportError(MONAI_MISSING) from exc
    return monai


class _NoMetadata:
    """Run MONAI transforms on plain tensors (no ``MetaTensor`` bookkeeping: it is not needed here and costs time);
    MONAI's previous setting is restored afterwards."""

    def __enter__(self):
        from monai.data import get_track_meta, set_track_meta

        self.previous = get_track_meta()
        set_track_meta(False)
        return self

    def __exit__(self, *exc):
        from monai.data import set_track_meta

        set_track_meta(self.previous)
        return False


def _share_random_state(transforms, state: np.random.RandomState) -> None:
    """Let every random transform (and every random part of one, and ``OneOf``'s choice) draw from ``state``."""
    from monai.transforms import Compose, Randomizable

    for t in transforms:
        if isinstance(t, Compose):  # OneOf included: its choice and its members
            Randomizable.set_random_state(t, state=state)
            _share_random_state(t.transforms, state)
        elif isinstance(t, Randomizable):
            t.set_random_state(state=state)


class MonaiSliceAugmentation:
    """A MONAI 2D dictionary pipeline for one training slice ``(C, H, W)`` and its label ``(1, H, W)``.

    Args:
        image_size: ``(H, W)`` of the slices (the translation range is a fraction of it).
        context_slices: ``k`` of the 2.5D input: the image has ``4 * (2k + 1)`` channels, for each offset ``-k..k``
            (outer) the four sequences (inner), as :meth:`EmrFuseImageProcessor.slices` stacks them.
        flip_axes: array axes mirrored (0 = H, left-right for BraTS; 1 = W), each with probability ``flip_prob``.
        rotation: maximum rotation in degrees; scale: ``(min, max)`` scale factor (drawn per axis);
            translation: maximum shift as a fraction of the slice size; all applied with probability
            ``affine_prob`` in one resampling.
        elastic_prob: probability of the small elastic deformation (control points every
            ``elastic_spacing`` pixels, displacements of ``elastic_magnitude`` pixels).
        noise_prob, noise_std: Gaussian noise (std drawn in ``[0, noise_std]``; intensities are z-scores).
        gamma_prob, gamma: gamma in ``gamma`` (min, max).
        bias_field_prob, bias_field_coeff: multiplicative bias field (degree-3 polynomial, coefficients in the range).
        scale_intensity_prob, scale_intensity: ``v * (1 + f)``, ``f`` in ``[-scale_intensity, scale_intensity]``.
        shift_intensity_prob, shift_intensity: ``v + o``, ``o`` in ``[-shift_intensity, shift_intensity]``.
    """

    def __init__(
        self,
        image_size: Tuple[int, int],
        context_slices: int = 0,
        flip_axes: Sequence[int] = (),
        flip_prob: float = 0.5,
        rotation: float = 15.0,
        scale: Tuple[float, float] = (0.85, 1.15),
        translation: float = 0.1,
        affine_prob: float = 0.35,
        elastic_prob: float = 0.1,
        elastic_spacing: int = 24,
        elastic_magnitude: Tuple[float, float] = (1.0, 2.0),
        noise_prob: float = 0.1,
        noise_std: float = 0.1,
        gamma_prob: float = 0.3,
        gamma: Tuple[float, float] = (0.7, 1.5),
        bias_field_prob: float = 0.15,
        bias_field_coeff: Tuple[float, float] = (0.0, 0.1),
        scale_intensity_prob: float = 0.15,
        scale_intensity: float = 0.25,
        shift_intensity_prob: float = 0.15,
        shift_intensity: float = 0.1,
    ):
        require_monai()
        from monai import transforms as mt

        self.context_slices = int(context_slices)
        self.offsets = 2 * self.context_slices + 1
        seqs = [f"image_{s}" for s in SEQUENCES]
        self._keys = seqs
        spatial_keys = ["image", "label"]  # every channel in one resampling; the label by nearest neighbour
        modes = ["bilinear", "nearest"]
        spatial = [mt.RandFlipd(spatial_keys, prob=float(flip_prob), spatial_axis=int(a)) for a in flip_axes]
        lo, hi = (float(s) for s in scale)
        spatial += [
            mt.RandAffined(
                spatial_keys,
                prob=float(affine_prob),
                rotate_range=(math.radians(float(rotation)),),
                scale_range=((lo - 1.0, hi - 1.0), (lo - 1.0, hi - 1.0)),
                translate_range=tuple((-float(translation) * n, float(translation) * n) for n in image_size),
                mode=modes,
                padding_mode="zeros",
            ),
        ]
        if elastic_prob > 0:  # through OneOf: Rand2DElasticd resamples every key even when it draws no deformation
            elastic = mt.Rand2DElasticd(
                spatial_keys,
                spacing=(int(elastic_spacing),) * 2,
                magnitude_range=tuple(float(m) for m in elastic_magnitude),
                prob=1.0,
                mode=modes,
                padding_mode="zeros",
            )
            p = float(elastic_prob)
            spatial.append(mt.OneOf([elastic, mt.Identityd(spatial_keys)], weights=[p, 1.0 - p]))
        self.image_size = tuple(int(n) for n in image_size)
        intensity = []
        for key in seqs:  # one instance per sequence: independent draws, shared by the sequence's context slices
            intensity += [
                mt.RandGaussianNoised(key, prob=float(noise_prob), mean=0.0, std=float(noise_std)),
                mt.RandAdjustContrastd(key, prob=float(gamma_prob), gamma=tuple(gamma), retain_stats=True),
                mt.RandBiasFieldd(key, prob=float(bias_field_prob), coeff_range=tuple(bias_field_coeff), degree=3),
                mt.RandScaleIntensityd(key, prob=float(scale_intensity_prob), factors=float(scale_intensity)),
                mt.RandShiftIntensityd(key, prob=float(shift_intensity_prob), offsets=float(shift_intensity)),
            ]
        self.spatial = mt.Compose(spatial)
        self.intensity = mt.Compose(intensity)  # on one key per sequence, its context slices as channels
        self._state = np.random.RandomState(0)
        _share_random_state(self.spatial.transforms + self.intensity.transforms, self._state)

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, seed: int, present: Sequence[bool] = (True,) * len(SEQUENCES)
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment ``image (4 * (2k + 1), H, W)`` and ``label (1, H, W)`` with the draws of ``seed``; the channels
        of sequences not ``present`` come back exactly 0. Returns float32 tensors of the same shapes."""
        n_seq = len(SEQUENCES)
        if image.dim() != 3 or image.shape[0] != n_seq * self.offsets:
            raise ValueError(
                f"MonaiSliceAugmentation(context_slices={self.context_slices}) expects an image of "
                f"{n_seq * self.offsets} channels (C, H, W), got shape {tuple(image.shape)}."
            )
        h, w = image.shape[-2:]
        if (h, w) != self.image_size:
            raise ValueError(f"MonaiSliceAugmentation was built for {self.image_size} slices, got {(h, w)}.")
        self._state.seed(int(seed) % (2**32))
        with _NoMetadata():
            moved = self.spatial({"image": image, "label": label})
            blocks = torch.as_tensor(moved["image"], dtype=torch.float32).reshape(self.offsets, n_seq, h, w)
            out = self.intensity({key: blocks[:, i] for i, key in enumerate(self._keys)})
        x = torch.stack([torch.as_tensor(out[key], dtype=torch.float32) for key in self._keys], dim=1)
        keep = torch.as_tensor(np.asarray(present, dtype=bool))
        x[:, ~keep] = 0.0  # a missing or dropped sequence stays exactly zero
        return x.reshape(n_seq * self.offsets, h, w).contiguous(), torch.as_tensor(moved["label"], dtype=torch.float32)
