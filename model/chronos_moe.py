"""ChronosMoEModel: one assembly for the dense Chronos-T5 and its three MoE architectures (architecture.md §3–4).

Letters: B series, S encoder tokens, T decoder tokens, P prediction steps, N sample paths, D d_model,
V vocabulary, E experts, K active experts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from chronos import ChronosConfig, ChronosModel, MeanScaleUniformBins
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .balance_loss import LoadBalancingLoss
from .checks import SettingError
from .config import ChronosMoEConfig
from .dispatch import dispatch
from .experts import ExpertEncoder, MoEExpertHead
from .outputs import MoEOutput, RoutingRecord
from .routing import ContextRouter, RoutingDecision
from .sampling import check_sampling_settings, sample_next_tokens
from .token_ffn import TokenExpertFFN

# Chronos' tokenizer (architecture.md §1): MeanScaleUniformBins over [-15, 15], tokens 0 (pad) and 1 (eos).
TOKENIZER_LIMITS = (-15.0, 15.0)
PAD_TOKEN_ID, EOS_TOKEN_ID, NUM_SPECIAL_TOKENS = 0, 1, 2
DECODER_START_TOKEN_ID = 0


class ChronosMoEModel(nn.Module):
    """`backbone` is a T5ForConditionalGeneration. What the experts replace depends on the architecture:

    - dense (E = 0): nothing; the tied LM head reads the decoder output scaled by D^-0.5, as in T5.
    - shared_then_expert: `router` pools the encoder output; `experts` (MoEExpertHead) replace the LM head.
    - expert_only: `backbone.encoder` is removed; `router` pools the token embeddings; `experts`
      (ExpertEncoder) encode the series and give the LM heads.
    - token_ffn: the FFN of the chosen blocks is a TokenExpertFFN; the tied LM head stays.
    """

    def __init__(self, config: ChronosMoEConfig, backbone: T5ForConditionalGeneration) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        dims = config.dims
        self.router: Optional[ContextRouter] = None
        self.experts: Optional[nn.ModuleList] = None
        self.balance_loss = LoadBalancingLoss(config.num_experts) if config.is_moe else None
        self._token_layers: list[tuple[str, TokenExpertFFN]] = []  # found once: decoding clears them every step
        if not config.is_moe:
            return
        if config.architecture == "token_ffn":
            self._install_token_experts()
            self._token_layers = [(n, m) for n, m in self.named_modules() if isinstance(m, TokenExpertFFN)]
            return
        self.router = ContextRouter(
            dims.d_model, config.router_hidden_dim, config.num_experts, config.top_k, backbone.config.dropout_rate
        )
        if config.architecture == "shared_then_expert":
            self.experts = nn.ModuleList(
                MoEExpertHead(dims.d_model, dims.vocab_size, config.expert_head_hidden_dim,
                              backbone.config.dropout_rate)
                for _ in range(config.num_experts)
            )
        else:  # expert_only: the experts are the encoders
            encoder_config = backbone.encoder.config
            self.backbone.encoder = None
            self.experts = nn.ModuleList(ExpertEncoder(encoder_config) for _ in range(config.num_experts))

    def _install_token_experts(self) -> None:
        config, dims = self.config, self.config.dims
        stacks = (
            (self.backbone.encoder, config.token_moe_encoder_blocks),
            (self.backbone.decoder, config.token_moe_decoder_blocks),
        )
        for stack, block_ids in stacks:
            for block_id in block_ids:
                feed_forward = stack.block[block_id].layer[-1]  # T5LayerFF
                feed_forward.DenseReluDense = TokenExpertFFN(
                    dims.d_model,
                    dims.d_ff,
                    config.num_experts,
                    config.top_k,
                    capacity_factor=config.expert_capacity,
                    dispatch_mode=config.dispatch,
                    dropout=self.backbone.config.dropout_rate,
                )

    # --- forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> MoEOutput:
        """Teacher-forced forward. input_ids/attention_mask (B, S); labels (B, T) with -100 for ignored
        positions; decoder_input_ids default to the labels shifted right, as in T5."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self.backbone._shift_right(labels)
        encoder_hidden, routing = self._encode(input_ids, attention_mask)  # (B, S, D)
        decoder_hidden = self.backbone.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state  # (B, T, D)
        logits = self._logits(decoder_hidden, routing)  # (B, T, V)

        records = self._collect_routing(routing)
        output = MoEOutput(logits=logits, routing=records)
        if records:
            output.aux_loss = torch.stack([record.balance_loss for record in records]).sum()
        if labels is not None:
            output.lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            output.loss = output.lm_loss
            if output.aux_loss is not None:
                output.loss = output.lm_loss + self.config.load_balancing_weight * output.aux_loss
        return output

    def _encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[RoutingDecision]]:
        """(B, S) tokens -> (B, S, D) encoder output and the sample-level routing (None if not sample level)."""
        architecture = self.config.architecture if self.config.is_moe else "dense"
        if architecture == "expert_only":
            embeddings = self.backbone.shared(input_ids)  # (B, S, D)
            routing = self.router(embeddings, attention_mask)
            encoders = [expert.encode for expert in self.experts]
            mixed = dispatch(
                embeddings, routing, encoders, row_arguments=(attention_mask,), mode=self.config.dispatch
            )
            return mixed, routing
        encoder_hidden = self.backbone.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if architecture == "shared_then_expert":
            return encoder_hidden, self.router(encoder_hidden, attention_mask)
        return encoder_hidden, None

    def _logits(self, decoder_hidden: torch.Tensor, routing: Optional[RoutingDecision]) -> torch.Tensor:
        """(rows, L, D) decoder output -> (rows, L, V) logits, through the experts' heads when they replace it."""
        if routing is None:
            # T5's tied head: rescale before projecting on the vocabulary (as T5ForConditionalGeneration does).
            return self.backbone.lm_head(decoder_hidden * (self.config.dims.d_model**-0.5))
        if self.config.architecture == "shared_then_expert":
            heads = list(self.experts)
        else:
            heads = [expert.logits for expert in self.experts]
        return dispatch(decoder_hidden, routing, heads, mode=self.config.dispatch)

    def token_moe_layers(self) -> list[tuple[str, TokenExpertFFN]]:
        return list(self._token_layers)

    def _collect_routing(self, routing: Optional[RoutingDecision]) -> list[RoutingRecord]:
        records = []
        if routing is not None:
            records.append(RoutingRecord("router", routing, self.balance_loss(routing)))
        for name, layer in self.token_moe_layers():
            if layer.last_routing is not None:
                records.append(RoutingRecord(name, layer.last_routing, self.balance_loss(layer.last_routing)))
                layer.last_routing = None
        return records

    def _clear_token_routing(self) -> None:
        for _, layer in self.token_moe_layers():
            layer.last_routing = None

    # --- forecasting ---------------------------------------------------------------------------------------

    def tokenizer(self, context_length: int = 512, prediction_length: int = 64) -> MeanScaleUniformBins:
        return MeanScaleUniformBins(*TOKENIZER_LIMITS, config=self.chronos_config(context_length, prediction_length))

    def chronos_config(self, context_length: int = 512, prediction_length: int = 64, **sampling) -> ChronosConfig:
        settings = {"num_samples": 20, "temperature": 1.0, "top_k": 50, "top_p": 1.0, **sampling}
        return ChronosConfig(
            tokenizer_class="MeanScaleUniformBins",
            tokenizer_kwargs={"low_limit": TOKENIZER_LIMITS[0], "high_limit": TOKENIZER_LIMITS[1]},
            context_length=context_length,
            prediction_length=prediction_length,
            n_tokens=self.config.dims.vocab_size,
            n_special_tokens=NUM_SPECIAL_TOKENS,
            pad_token_id=PAD_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            use_eos_token=True,
            model_type="seq2seq",
            **settings,
        )

    def as_chronos_model(self, context_length: int = 512, prediction_length: int = 64, **sampling) -> ChronosModel:
        """The dense backbone as chronos-forecasting's own ChronosModel (sharing weights), to use its pipeline."""
        if self.config.is_moe:
            raise ValueError("as_chronos_model is for the dense model (num_experts = 0); MoE variants use forecast()")
        return ChronosModel(self.chronos_config(context_length, prediction_length, **sampling), self.backbone)

    @torch.no_grad()
    def forecast(
        self,
        context: Union[torch.Tensor, Sequence[torch.Tensor]],
        prediction_length: int = 64,
        num_samples: int = 20,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        context_length: int = 512,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample N forecast paths per series, in the series' own units: (B, N, P).

        `context` is (B, L) values, or a list of 1-D series of different lengths (left-padded with NaN, as
        Chronos does); only the last `context_length` values are used.
        """
        for name, value in (("prediction_length", prediction_length), ("num_samples", num_samples),
                            ("context_length", context_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(name, f"{name} must be an integer ≥ 1, got {value!r}")
        check_sampling_settings(temperature, top_k, top_p)
        context = left_pad_series(context)
        tokenizer = self.tokenizer(context_length, prediction_length)
        token_ids, attention_mask, scale = tokenizer.context_input_transform(context)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            tokens = self.sample_tokens(
                token_ids.to(device), attention_mask.to(device), prediction_length, num_samples,
                temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
            )
        finally:
            self.train(was_training)
        return tokenizer.output_transform(tokens.cpu(), scale)

    def sample_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prediction_length: int,
        num_samples: int,
        *,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Autoregressive decoding with a KV cache: (B, S) tokens -> (B, N, P) sampled tokens.

        The encoder (and the routing) runs once per series; its output is then repeated per sample path,
        as transformers' generate does, and the decoder takes one new token per step.
        """
        batch = input_ids.shape[0]
        encoder_hidden, routing = self._encode(input_ids, attention_mask)  # (B, S, D)
        self._clear_token_routing()  # forecasting reports no usage; drop the encoder's token decisions
        encoder_hidden = encoder_hidden.repeat_interleave(num_samples, dim=0)  # (B·N, S, D)
        encoder_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        if routing is not None:
            routing = routing.repeat_rows(num_samples)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        next_tokens = torch.full((batch * num_samples, 1), DECODER_START_TOKEN_ID, device=input_ids.device)
        sampled = []
        for step in range(prediction_length):
            decoder_hidden = self.backbone.decoder(
                input_ids=next_tokens,
                encoder_hidden_states=encoder_hidden,
                encoder_attention_mask=encoder_mask,
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.tensor([step], device=input_ids.device),
            ).last_hidden_state  # (B·N, 1, D)
            logits = self._logits(decoder_hidden, routing)[:, -1, :]  # (B·N, V)
            self._clear_token_routing()
            # Chronos asks generate for exactly P tokens (min_new_tokens = P), so EOS is never drawn.
            logits[:, EOS_TOKEN_ID] = float("-inf")
            next_tokens = sample_next_tokens(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            sampled.append(next_tokens)
        return torch.cat(sampled, dim=1).view(batch, num_samples, prediction_length)


def left_pad_series(context: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """A (B, L) tensor as is; a list of 1-D series left-padded with NaN to the longest (Chronos' layout)."""
    if isinstance(context, torch.Tensor):
        if context.dim() == 1:
            context = context.unsqueeze(0)
        if context.dim() != 2 or context.shape[-1] == 0:
            raise ValueError(f"context must be (batch, length) with length ≥ 1, got shape {tuple(context.shape)}")
        return context.float()
    series = [torch.as_tensor(s, dtype=torch.float32) for s in context]
    if not series or any(s.dim() != 1 or s.numel() == 0 for s in series):
        raise ValueError("context must be a non-empty list of non-empty 1-D series")
    length = max(s.numel() for s in series)
    padded = torch.full((len(series), length), float("nan"))
    for row, s in enumerate(series):
        padded[row, length - s.numel():] = s
    return padded
