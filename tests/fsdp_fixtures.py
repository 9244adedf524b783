"""FSDP2's shard sizes derived apart from the planner, for the tests that compare them."""

import torch


def fsdp2_shards(model, n, rank):
    """FSDP2's shard of every parameter on `rank`, by torch.chunk on dim 0 as fully_shard splits it:
    (padded elements: the first chunk's, every rank allocates that much; elements rank `rank` holds)."""
    padded = held = 0
    for parameter in model.parameters():
        chunks = torch.chunk(torch.empty(parameter.shape[0]), n)
        rest = parameter.numel() // parameter.shape[0]
        padded += chunks[0].numel() * rest
        held += (chunks[rank].numel() if rank < len(chunks) else 0) * rest
    return padded, held
