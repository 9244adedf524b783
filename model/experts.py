"""The expert modules of the three architectures (architecture.md §3).

Each takes zero rows (what model.dispatch gives an expert nobody chose in a training step) without computing:
an empty output tied to its parameters, so they get zero gradients (`empty_rows`).

Letters: n rows routed to one expert, L positions, D d_model, F d_ff, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Block, T5Stack


def empty_rows(rows: torch.Tensor, shape: tuple[int, ...], module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """What an expert returns for zero rows: an empty tensor of `shape`, tied with weight 0 to its input and to
    every parameter of `module`, so that in a training step each parameter gets a zero gradient (model.dispatch
    runs the experts nobody chose on zero rows: DDP, FSDP and expert parallel need the same gradients on
    every rank). No matmul runs and nothing is saved for backward (sum and × 0 keep no tensor): the step's
    FLOPs and saved activations are those of the routed rows alone, and under autocast no half copy of a
    weight is kept for rows that do not exist."""
    tie = rows.sum() * 0
    for parameter in module.parameters():
        tie = tie + parameter.sum() * 0
    return rows.new_zeros(shape, dtype=dtype) + tie.to(dtype)


def linear_output_dtype(rows: torch.Tensor, linear: nn.Linear) -> torch.dtype:
    """The dtype `linear` would return for `rows`: autocast's where it is on, else the weight's."""
    device = rows.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else linear.weight.dtype


class ExpertT5Block(T5Block):
    """A T5 encoder block of an expert encoder that also takes zero rows (T5Attention reshapes with
    view(batch, -1, ...), which an empty batch cannot take): then it returns the empty input tied to its
    parameters (`empty_rows`). Its forward still runs, so an engine's hooks on the block (FSDP2's all-gather
    and reduce-scatter of the unit) run on every rank alike."""

    def forward(self, hidden_states, *args, **kwargs):
        if hidden_states.shape[0] == 0:  # (hidden states, the self-attention position bias) as T5Stack reads them
            return empty_rows(hidden_states, tuple(hidden_states.shape), self, hidden_states.dtype), None
        return super().forward(hidden_states, *args, **kwargs)


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
        if decoder_hidden.shape[0] == 0:
            shape = (0, *decoder_hidden.shape[1:-1], self.lm_head.out_features)
            return empty_rows(decoder_hidden, shape, self, linear_output_dtype(decoder_hidden, self.lm_head))
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
        for block in self.encoder.block:  # in place: the same modules and parameters, zero rows allowed
            block.__class__ = ExpertT5Block
        self.lm_head = nn.Linear(encoder_config.d_model, encoder_config.vocab_size, bias=False)

    def encode(self, token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, S, D) embeddings, (n, S) mask -> (n, S, D) encoder output."""
        return self.encoder(inputs_embeds=token_embeddings, attention_mask=attention_mask).last_hidden_state

    def logits(self, decoder_hidden: torch.Tensor) -> torch.Tensor:
        """(n, T, D) -> (n, T, V)."""
        if decoder_hidden.shape[0] == 0:
            shape = (0, *decoder_hidden.shape[1:-1], self.lm_head.out_features)
            return empty_rows(decoder_hidden, shape, self.lm_head, linear_output_dtype(decoder_hidden, self.lm_head))
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
        if tokens.shape[0] == 0:
            shape = (0, *tokens.shape[1:-1], self.wo.out_features)
            return empty_rows(tokens, shape, self, linear_output_dtype(tokens, self.wo))
        return self.wo(self.dropout(self.activation(self.wi(tokens))))
