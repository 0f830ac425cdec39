"""Tiny EmrFuse model folders for the inference tests (pipeline, ``emrfuse predict``, Space).

Builds, in a temporary folder and in a second or two on CPU, a segmentation model (1-layer BERT with
hidden size 32 and a tiny WordPiece vocabulary, timm resnet18 tower, small fusion head) at the folder's
root and a grading model in ``grading/``, each saved with ``save_pretrained`` together with the
processor, so that they load back through the Auto classes with ``trust_remote_code=True`` exactly as
a trained model folder does. Weights are random (seeded): the tests check plumbing, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPORT_WORDS = (
    "the a of in and with is there mass lesion tumour tumor left right frontal parietal temporal occipital lobe "
    "enhancing enhancement ring necrosis necrotic core edema oedema surrounding flair t1 t2 hyperintense "
    "hypointense signal mild moderate marked mass effect midline shift ventricle compression irregular "
    "heterogeneous no evidence of contrast white matter cortex . , ; : - ( )"
).split()

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
"""Real cases, when present (``../shared/realdata`` from the repository root)."""


def make_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer with a tiny vocabulary (saved in ``folder``)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(REPORT_WORDS))
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    seen, unique = set(), []
    for token in vocab:
        if token not in seen:
            seen.add(token)
            unique.append(token)
    (folder / "vocab.txt").write_text("\n".join(unique) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(unique)}, model_max_length=64)


def tiny_config(**overrides):
    """EmrFuseConfig of a tiny model (1-layer BERT hidden 32, resnet18, fusion_dim 16)."""
    from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig

    kwargs = dict(
        text_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        vision_config={"architecture": "resnet18"},
        fusion_dim=16,
        cross_attention_heads=2,
        decoder_channels=[32, 16, 16, 8, 8],
        case_pooling_dim=8,
        slice_chunk_size=16,
    )
    kwargs.update(overrides)
    return EmrFuseConfig(**kwargs)


def build_tiny_model_folder(folder: Path, with_grading: bool = True, with_pipeline: bool = True, seed: int = 0) -> Path:
    """Save a tiny segmentation model (+ grading model in ``grading/``) and its processor in ``folder``."""
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation
    from modeling_emrfuse.model_packaging import add_pipeline_to_folder
    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor

    folder = Path(folder)
    tokenizer = make_tokenizer(folder.parent / f"{folder.name}-vocab")
    config = tiny_config(text_config={**tiny_config().text_config.to_dict(), "vocab_size": len(tokenizer)})
    processor = EmrFuseProcessor(EmrFuseImageProcessor(context_slices=0), tokenizer)
    torch.manual_seed(seed)
    seg = EmrFuseForSegmentation(config).eval()
    with torch.no_grad():  # a bias so that the random model predicts some tumour voxels
        seg.decoder.head.bias.copy_(torch.tensor([0.3, 0.0, -0.3]))
    seg.save_pretrained(folder)
    processor.save_pretrained(folder)
    grading = None
    if with_grading:
        torch.manual_seed(seed + 1)
        cls = EmrFuseForImageClassification(config).eval()
        cls.save_pretrained(folder / "grading")
        processor.save_pretrained(folder / "grading")
        grading = folder / "grading"
    if with_pipeline:
        add_pipeline_to_folder(folder, grading_model=grading)
    return folder


def write_small_case(folder: Path, shape=(48, 48, 24), seed: int = 0, names=("t1", "t1ce", "t2", "flair"), case_id="Case_001"):
    """Write a tiny four-sequence NIfTI case (a noisy ellipsoid brain) in the BraTS 2020 file naming."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    folder = Path(folder) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (x**2 + y**2 + z**2) < 0.8
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    for i, name in enumerate(names):
        data = np.where(brain, 100 + 20 * i + rng.normal(0, 10, shape), 0).astype(np.int16)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, folder / f"{case_id}_{name}.nii.gz")
    return folder
