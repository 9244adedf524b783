"""The expert modules of the three architectures (architecture.md §3).

Letters: n rows routed to one expert, L positions, D d_model, F d_ff, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack


class MoEExpertHead(nn.Module):
    """shared_then_expert: one expert replacing the LM head, applied position-wise to the decoder output.

    Linear(D→H) → ReLU → Dropout → Linear(H→D) → Dropout → + input → LayerNorm(D) → Linear(D→V, no bias),
    H the config's `expert_head_hidden_dim` (4·D, as the reference implementation).
    """

    def __init__(self, d_model: int, vocab_size: int, hidden_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, d_model)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        """(n, L, D) -> logits (n, L, V)."""
        hidden = self.fc2(self.dropout(self.activation(self.fc1(decoder_hidden))))
        hidden = self.norm(decoder_hidden + self.dropout(hidden))
        return self.lm_head(hidden)


class ExpertEncoder(nn.Module):
    """expert_only: a full copy of the T5 encoder stack (blocks, relative-position bias, final norm, no
    embedding: the token embedding stays shared) plus the expert's own LM head Linear(D→V, no bias).

    The head is untied, so unlike T5's tied head it reads the decoder output without the D^-0.5 rescale.
    """

    def __init__(self, encoder_config: T5Config) -> None:
        super().__init__()
        self.encoder = T5Stack(encoder_config)
        # No token embedding of its own (it reads the shared one's output); transformers 5 gives every stack one.
        self.encoder.embed_tokens = None
        self.lm_head = nn.Linear(encoder_config.d_model, encoder_config.vocab_size, bias=False)

    def encode(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, S, D) embeddings, (n, S) mask -> (n, S, D) encoder output."""
        return self.encoder(inputs_embeds=token_embeddings, attention_mask=attention_mask).last_hidden_state

    def logits(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        """(n, T, D) -> (n, T, V)."""
        return self.lm_head(decoder_hidden)


class ExpertFFN(nn.Module):
    """token_ffn: one expert FFN, the same shape as T5's: wi Linear(D→F) → ReLU → Dropout → wo Linear(F→D)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, D)."""
        return self.wo(self.dropout(self.activation(self.wi(tokens))))
