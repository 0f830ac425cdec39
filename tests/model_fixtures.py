"""Tiny EmrFuse configs and inputs for the model and Hub tests (1-layer BERT of width 32, resnet18 tower)."""

from __future__ import annotations

import torch

from modeling_emrfuse.configuration_emrfuse import EmrFuseConfig

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


def tiny_config(**overrides) -> EmrFuseConfig:
    """A tiny config (fusion_dim 16, resnet18, decoder channels 16/16/8/8/8, 2 cross-attention heads)."""
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
    return dict(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, token_type_ids=tt,
                slice_to_case=slice_to_case)
