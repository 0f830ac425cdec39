"""Shared test helpers: the one home of the tiny EmrFuse configs, model inputs and model folders.

- :func:`tiny_config`: an ``EmrFuseConfig`` of a tiny model (1-layer BERT of width 32, timm resnet18
  tower, fusion_dim 16), for the model, Hub and data tests; :func:`tokens` / :func:`batch`: fake
  tokenised reports and slices for it;
- :func:`make_tokenizer`: a BERT WordPiece tokenizer with a tiny vocabulary of report words;
- :func:`build_tiny_model_folder`: a saved segmentation model (+ grading model in ``grading/``) and its
  processor, loadable through the Auto classes with ``trust_remote_code=True`` exactly as a trained model
  folder is, built in a second or two on CPU (random, seeded weights: the tests check plumbing, not
  accuracy), for the pipeline, ``emrfuse predict`` and Space tests;
- :func:`write_small_case`: a tiny four-sequence NIfTI case in the BraTS 2020 file naming;
- ``REALDATA``: the real cases of ``../shared/realdata`` when present (tests skip without them).

Test modules import them (``from conftest import tiny_config``); the data-layout writers of every
BraTS release are in ``brats_fixtures.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
"""Real cases, when present (``../shared/realdata`` from the repository root)."""

# ------------------------------------------------------------------------------------------ tiny configs and inputs
VOCAB = 120
TINY_TEXT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
CLS, SEP, PAD = 101 % VOCAB, 102 % VOCAB, 0


def tiny_config(**overrides):
    """A tiny config (1-layer BERT of width 32, resnet18, fusion_dim 16, decoder channels 16/16/8/8/8,
    2 cross-attention heads, no dropout); ``overrides`` replace any argument."""
    from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig

    kwargs = dict(
        text_config=dict(TINY_TEXT),
        vision_config={"architecture": "resnet18"},
        fusion_dim=16,
        fusion_dropout=0.0,
        cross_attention_heads=2,
        decoder_channels=[16, 16, 8, 8, 8],
        case_pooling_dim=8,
    )
    kwargs.update(overrides)
    return EmrFuseConfig(**kwargs)


def tokens(lengths, max_len: int | None = None, seed: int = 0):
    """Fake tokenised reports: ``[CLS] w ... w [SEP] [PAD]...`` with ``lengths`` words each (0 = missing report)."""
    gen = torch.Generator().manual_seed(seed)
    max_len = max_len or (max(lengths) + 2)
    ids = torch.full((len(lengths), max_len), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), max_len), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0] = CLS
        ids[b, 1 : 1 + n] = torch.randint(3, 100, (n,), generator=gen)
        ids[b, 1 + n] = SEP
        mask[b, : n + 2] = 1
    return ids, mask, torch.zeros_like(ids)


def batch(n_slices=(3, 3), lengths=(5, 8), size=32, channels=4, seed=0):
    """Slices of ``len(n_slices)`` cases (``n_slices[b]`` slices of case b) and one report per case."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(n_slices)
    pixel_values = torch.randn(n, channels, size, size, generator=gen)
    slice_to_case = torch.repeat_interleave(torch.arange(len(n_slices)), torch.tensor(n_slices))
    ids, mask, tt = tokens(lengths, seed=seed)
    return dict(
        pixel_values=pixel_values, input_ids=ids, attention_mask=mask, token_type_ids=tt, slice_to_case=slice_to_case
    )


# ------------------------------------------------------------------------------------------ tokenizer, model folders, cases
REPORT_WORDS = (
    "the a of in and with is there mass lesion tumour tumor left right frontal parietal temporal occipital lobe "
    "enhancing enhancement ring necrosis necrotic core edema oedema surrounding flair t1 t2 hyperintense "
    "hypointense signal mild moderate marked mass effect midline shift ventricle compression irregular "
    "heterogeneous no evidence of contrast white matter cortex . , ; : - ( )"
).split()


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


def build_tiny_model_folder(
    folder: Path,
    with_grading: bool = True,
    with_pipeline: bool = True,
    seed: int = 0,
    sequence_presence: bool = False,
    grading_pooling: str = "slices",
) -> Path:
    """Save a tiny segmentation model (+ grading model in ``grading/``) and its processor in ``folder``
    (``sequence_presence``: with the four sequence-presence channels, in the config and the processor;
    ``grading_pooling``: the config's, ``"tumour"`` for a grading model that pools the predicted tumour)."""
    from modeling_emrfuse.hub.packaging import add_pipeline_to_folder
    from modeling_emrfuse.modeling_emrfuse import EmrFuseForImageClassification, EmrFuseForSegmentation
    from modeling_emrfuse.processing_emrfuse import EmrFuseImageProcessor, EmrFuseProcessor

    folder = Path(folder)
    tokenizer = make_tokenizer(folder.parent / f"{folder.name}-vocab")
    # a slightly wider decoder and text MLP than tiny_config's: with these shapes and seeds the random model's
    # label map holds every label on its largest-tumour slice (the Space's browser test checks each colour)
    config = tiny_config(
        text_config={**TINY_TEXT, "intermediate_size": 64, "vocab_size": len(tokenizer)},
        slice_chunk_size=16,
        decoder_channels=[32, 16, 16, 8, 8],
        sequence_presence=sequence_presence,
        grading_pooling=grading_pooling,
    )
    processor = EmrFuseProcessor(
        EmrFuseImageProcessor(context_slices=0, sequence_presence=sequence_presence), tokenizer
    )
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


def write_small_case(
    folder: Path, shape=(48, 48, 24), seed: int = 0, names=("t1", "t1ce", "t2", "flair"), case_id="Case_001"
):
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
