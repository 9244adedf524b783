"""Expert parallel over a torch.distributed process group (architecture.md §7).

Entry point: `make_expert_parallel(model, group=None)` turns a single-process ChronosMoEModel, built with the
same seed (or the same checkpoint) on every rank, into its expert-parallel form, in place, and returns it.
Every rank of `group` must call it, and afterwards must run every forward/backward/forecast together.

Placement. Over n ranks, rank r holds experts [r·c, min(E, (r+1)·c)), c = ceil(E/n) (planner.params.
experts_per_device); with n > E the last ranks hold none. The experts a rank does not hold are dropped, so
its parameters are the shared ones plus its own experts' (`held_parameter_count`). Held experts keep their
global ids and so their single-process names (`experts.2.fc1.weight`, `…DenseReluDense.experts.2.wi.weight`):
checkpoints and gradients compare name by name. The shared parts (embedding, shared encoder/decoder,
routers) stay replicated; `sync=True` (default) broadcasts every parameter and buffer from the group's rank 0
before dropping experts, so the replicas start equal.

Exchange. Each rank has its own batch (data parallel) and routes it with its replicated routers. Its routed
rows — series for shared_then_expert and expert_only (their decoder outputs for the expert heads, and for
expert_only also their token embeddings and attention masks for the expert encoders), tokens for token_ffn —
are sorted by expert (so by destination rank) and sent with one `all_to_all_single`; each rank runs its
experts on the rows it received (from every rank, grouped by expert) and sends the outputs back with a
second `all_to_all_single`; the sender weights them and sums them per row, as single-process sparse dispatch
does. Both exchanges are an autograd Function whose backward runs the reverse all_to_all, so gradients take
the same way back. One small all_gather per MoE layer first shares the per-expert row counts (the split
sizes). Rows must have the same trailing shape on every rank (equal S and T across ranks' batches); a
mismatch is a ValueError on every rank. Expert outputs travel back in the input's dtype.

Gradients. The objective is the mean over ranks of each rank's loss. After `loss.backward()` on every rank,
call `average_gradients(model)`: it all-reduces the replicated parameters' gradients (one flat buffer per
dtype, summed, divided by n; a parameter no rank gave a gradient keeps None) and divides the held experts'
gradients by n (they already hold the sum over ranks' rows, brought back by the backward all_to_all). In a
training step every held expert runs, on zero rows when no rank routed to it, so each has a gradient (zero
for those), as in single-process sparse dispatch. The
result equals the single-process model's gradients of mean_r loss(batch_r).

Supported: the three architectures with sparse dispatch and no expert_capacity. Refused with a one-line
SettingError naming the field: a dense model (num_experts), dense dispatch (dispatch), an expert_capacity
(expert_capacity: Switch capacity counts a batch's tokens, and which batch — the rank's or the group's — is
a choice not made here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .checks import SettingError
from .chronos_moe import ChronosMoEModel
from .dispatch import _scale_rows, records_expert_gradients
from .routing import RoutingDecision, route_top_k
from .token_ffn import TokenExpertFFN

__all__ = [
    "ExpertPlacement",
    "HeldExperts",
    "average_gradients",
    "expert_parallel_dispatch",
    "experts_of_rank",
    "held_parameter_count",
    "make_expert_parallel",
]


def experts_of_rank(num_experts: int, world_size: int, rank: int) -> range:
    """The experts rank `rank` of `world_size` holds: [r·c, min(E, (r+1)·c)), c = ceil(E/n)."""
    per_rank = -(-num_experts // world_size)
    return range(min(num_experts, rank * per_rank), min(num_experts, (rank + 1) * per_rank))


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the E experts live over the ranks of `group` (None: the default group)."""

    num_experts: int
    world_size: int
    rank: int
    group: Optional[dist.ProcessGroup] = None
    # (slots this rank's experts received, slots this rank sent) per exchange, appended by each dispatch: how
    # far the routing is from balanced (a benchmark clears it before the step it reads).
    routed_slots: list = field(default_factory=list, compare=False, repr=False)

    def experts_of(self, rank: int) -> range:
        return experts_of_rank(self.num_experts, self.world_size, rank)

    @property
    def held(self) -> range:
        return self.experts_of(self.rank)


class HeldExperts(nn.Module):
    """The experts one rank holds, registered under their global ids (so their parameter names are the
    single-process model's). Iterates over the held experts in id order; `[expert_id]` takes a global id."""

    def __init__(self, experts: dict[int, nn.Module]) -> None:
        super().__init__()
        for expert_id in sorted(experts):
            self.add_module(str(expert_id), experts[expert_id])

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, expert_id: int) -> nn.Module:
        return self._modules[str(expert_id)]


# --- the exchange -----------------------------------------------------------------------------------------


def _all_to_all(rows: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> torch.Tensor:
    """Rows (Σ send, ...) split by destination rank -> rows (Σ recv, ...) concatenated by source rank."""
    received = rows.new_empty((sum(recv_sizes), *rows.shape[1:]))
    dist.all_to_all_single(received, rows.contiguous(), recv_sizes, send_sizes, group=group)
    return received


class _ExchangeRows(torch.autograd.Function):
    """all_to_all_single in forward; the reverse all_to_all_single (sizes swapped) of the gradient in backward."""

    @staticmethod
    def forward(ctx, rows, send_sizes, recv_sizes, group):
        ctx.send_sizes, ctx.recv_sizes, ctx.group = send_sizes, recv_sizes, group
        return _all_to_all(rows, send_sizes, recv_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _ExchangeRows.apply(grad, ctx.recv_sizes, ctx.send_sizes, ctx.group), None, None, None


def expert_parallel_dispatch(
    inputs: torch.Tensor,
    routing: RoutingDecision,
    held_experts: Sequence[Callable[..., torch.Tensor]],
    placement: ExpertPlacement,
    out_features: int,
    *,
    row_arguments: Sequence[torch.Tensor] = (),
    experts_need_grad: bool = False,
) -> torch.Tensor:
    """Σ over each row's chosen experts of weight × expert(row), the experts spread over the ranks:
    (rows, ..., D) -> (rows, ..., out_features), the same as model.dispatch's sparse mode.

    `held_experts` are this rank's experts (placement.held, in order); `row_arguments` further per-row tensors
    they take (an attention mask), sent along. `experts_need_grad`: this rank's experts have parameters that
    require grad. Collective: every rank of the group calls it for the same layer at the same time.
    """
    num_experts, world_size, me = placement.num_experts, placement.world_size, placement.rank
    top_k = routing.expert_indices.shape[1]
    flat_experts = routing.expert_indices.reshape(-1)  # (rows·K,)
    order = torch.argsort(flat_experts, stable=True)  # slots grouped by expert, so by destination rank
    counts = torch.bincount(flat_experts, minlength=num_experts)
    wants_grad = torch.is_grad_enabled() and (inputs.requires_grad or experts_need_grad)

    # One all_gather: every rank's per-expert counts, trailing shape and whether it needs gradients.
    meta = torch.tensor([*counts.tolist(), *inputs.shape[1:], int(wants_grad)], dtype=torch.long,
                        device=inputs.device)
    gathered_meta = [torch.empty_like(meta) for _ in range(world_size)]
    dist.all_gather(gathered_meta, meta, group=placement.group)
    table = torch.stack(gathered_meta)  # (n, E + trailing dims + 1)
    shapes = table[:, num_experts:-1]
    if not bool((shapes == shapes[0]).all()):
        raise ValueError(f"expert parallel needs the same row shape on every rank, got {shapes.tolist()} "
                         "(give every rank batches of equal encoder and decoder lengths)")
    # If any rank needs gradients, every rank builds both exchanges into its graph, so every rank's
    # backward runs the reverse all_to_alls (a rank that skipped one would leave the others waiting).
    needs_grad = bool(table[:, -1].any())
    all_counts = table[:, :num_experts].tolist()  # (n, E)
    held = placement.held
    send_sizes = [sum(all_counts[me][j] for j in placement.experts_of(r)) for r in range(world_size)]
    recv_sizes = [sum(all_counts[s][j] for j in held) for s in range(world_size)]
    placement.routed_slots.append((sum(recv_sizes), sum(send_sizes)))

    rows = order // top_k  # (slots,)
    outgoing = inputs[rows]
    if needs_grad and not outgoing.requires_grad:
        outgoing = outgoing.detach().requires_grad_()
    received = _ExchangeRows.apply(outgoing, send_sizes, recv_sizes, placement.group)
    arguments = [_all_to_all(argument[rows], send_sizes, recv_sizes, placement.group) for argument in row_arguments]

    # Received: by source rank, each source's rows by expert. Regroup by expert to run each expert once.
    pieces, position = {j: [] for j in held}, 0
    for source in range(world_size):
        for j in held:
            size = all_counts[source][j]
            pieces[j].append(torch.arange(position, position + size, device=inputs.device))
            position += size
    no_rows = torch.zeros(0, dtype=torch.long, device=inputs.device)
    perm = torch.cat([no_rows, *(piece for j in held for piece in pieces[j])])  # received -> grouped by expert
    grouped = received[perm]
    grouped_arguments = [argument[perm] for argument in arguments]
    # While a training step records gradients, a held expert no rank routed to runs on zero rows, so it gets
    # a zero gradient like the others (model.dispatch.records_expert_gradients): every held expert has one.
    every_expert = records_expert_gradients(held_experts)
    outputs, start = [], 0
    for expert, j in zip(held_experts, held):
        size = sum(all_counts[source][j] for source in range(world_size))
        if size or every_expert:
            outputs.append(expert(grouped[start:start + size], *(a[start:start + size] for a in grouped_arguments)))
        start += size
    out_shape = (*inputs.shape[1:-1], out_features)
    if outputs:
        stacked = (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).to(inputs.dtype)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        returning = stacked[inverse]  # back in the order received
    else:
        returning = received.new_zeros((0, *out_shape))
        if needs_grad:  # keep the return exchange in the graph, tied to the incoming one
            returning = returning + received.sum() * 0
    back = _ExchangeRows.apply(returning, recv_sizes, send_sizes, placement.group)  # (slots, ...out), in `order`
    scaled = _scale_rows(back, routing.expert_weights.reshape(-1)[order])
    total = inputs.new_zeros((inputs.shape[0], *out_shape), dtype=back.dtype)
    return total.index_add(0, rows, scaled)


def _need_grad(experts: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in experts.parameters())


# --- the expert-parallel modules ----------------------------------------------------------------------------


class ExpertParallelChronosMoE(ChronosMoEModel):
    """A ChronosMoEModel whose sample-level experts (shared_then_expert heads, expert_only encoders and heads)
    run on their ranks. Made by `make_expert_parallel`, never constructed directly."""

    placement: ExpertPlacement

    def _exchange(self, inputs, routing, experts, out_features, row_arguments=()):
        return expert_parallel_dispatch(inputs, routing, experts, self.placement, out_features,
                                        row_arguments=row_arguments, experts_need_grad=_need_grad(self.experts))

    def _encode(self, input_ids, attention_mask):
        if self.config.architecture != "expert_only":
            return super()._encode(input_ids, attention_mask)
        embeddings = self.backbone.shared(input_ids)  # (B, S, D)
        routing = self.router(embeddings, attention_mask)
        encoders = [expert.encode for expert in self.experts]
        mixed = self._exchange(embeddings, routing, encoders, self.config.dims.d_model, (attention_mask,))
        return mixed, routing

    def _logits(self, decoder_hidden, routing):
        if routing is None:
            return super()._logits(decoder_hidden, routing)
        if self.config.architecture == "shared_then_expert":
            heads = list(self.experts)
        else:
            heads = [expert.logits for expert in self.experts]
        return self._exchange(decoder_hidden, routing, heads, self.config.dims.vocab_size)


class ExpertParallelTokenFFN(TokenExpertFFN):
    """token_ffn's MoE FFN with its experts on their ranks; tokens go to them and back by all_to_all."""

    placement: ExpertPlacement

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])  # (B·L, D)
        routing = route_top_k(self.router(tokens), self.top_k)
        mixed = expert_parallel_dispatch(tokens, routing, list(self.experts), self.placement, tokens.shape[-1],
                                         experts_need_grad=_need_grad(self.experts))
        self.last_routing = routing
        return mixed.view_as(hidden)


# --- the entry point ------------------------------------------------------------------------------------------


def check_expert_parallel(model: ChronosMoEModel) -> None:
    """SettingError naming the field when `model` cannot run expert parallel."""
    config = model.config
    if not config.is_moe:
        raise SettingError("num_experts", "expert parallel needs an MoE model (num_experts ≥ 1); this one is dense")
    if config.dispatch != "sparse":
        raise SettingError("dispatch", f"expert parallel supports dispatch 'sparse' only, got {config.dispatch!r}")
    if config.expert_capacity is not None:
        raise SettingError("expert_capacity",
                           "expert parallel does not support expert_capacity; leave it unset (no token dropped)")


def make_expert_parallel(
    model: ChronosMoEModel, group: Optional[dist.ProcessGroup] = None, *, sync: bool = True
) -> ChronosMoEModel:
    """`model` (in place, and returned) in its expert-parallel form over `group` (None: the default group):
    this rank keeps its experts only, and the MoE layers exchange rows with the other ranks. Collective."""
    if isinstance(model, ExpertParallelChronosMoE):
        raise ValueError("this model is already expert parallel")
    check_expert_parallel(model)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallel needs torch.distributed initialised (init_process_group) first")
    placement = ExpertPlacement(model.config.num_experts, dist.get_world_size(group), dist.get_rank(group), group)
    if sync:
        source = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=source, group=group)
    held = placement.held
    if model.experts is not None:
        model.experts = HeldExperts({j: model.experts[j] for j in held})
    for _, layer in model.token_moe_layers():
        layer.experts = HeldExperts({j: layer.experts[j] for j in held})
        layer.__class__ = ExpertParallelTokenFFN  # in place: the model's list of MoE layers stays valid
        layer.placement = placement
    model.__class__ = ExpertParallelChronosMoE
    model.placement = placement
    return model


# --- after the exchange: gradients and sizes ------------------------------------------------------------------


def expert_parameters(model: ChronosMoEModel) -> list[nn.Parameter]:
    """This rank's expert parameters (the held experts of every MoE layer)."""
    parameters = list(model.experts.parameters()) if model.experts is not None else []
    for _, layer in model.token_moe_layers():
        parameters.extend(layer.experts.parameters())
    return parameters


def average_gradients(model: ExpertParallelChronosMoE) -> None:
    """Make the gradients those of the mean over ranks of each rank's loss: replicated parameters'
    gradients all-reduced and divided by n, held experts' divided by n. Collective; call after backward."""
    placement = model.placement
    world_size = placement.world_size
    expert_ids = {id(parameter) for parameter in expert_parameters(model)}
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for parameter in shared:
        by_dtype.setdefault(parameter.dtype, []).append(parameter)
    if not shared:  # nothing replicated learns (e.g. trainable="experts"), on every rank alike: nothing to send
        flags = {}
    else:
        has_grad = torch.tensor([p.grad is not None for p in shared], dtype=torch.float32, device=shared[0].device)
        dist.all_reduce(has_grad, group=placement.group)
        flags = dict(zip(map(id, shared), has_grad.tolist()))
    for dtype, parameters in by_dtype.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
        dist.all_reduce(flat, group=placement.group)
        flat /= world_size
        offset = 0
        for parameter in parameters:
            chunk = flat[offset:offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
            if flags[id(parameter)]:
                parameter.grad = chunk.clone()
    with torch.no_grad():
        for parameter in expert_parameters(model):
            if parameter.grad is not None:
                parameter.grad /= world_size


def held_parameter_count(model: ChronosMoEModel) -> int:
    """Parameters this rank holds: the shared ones plus its experts' (tied tensors once). For a
    single-process model, all of them. Equals planner.params.ParamBreakdown.with_experts(len(held))."""
    return sum(parameter.numel() for parameter in model.parameters())
