"""The link a run's collectives ride on: the GPU's interconnect inside a node, the network between nodes.

Inside one node a ring runs at the interconnect's bus bandwidth (rate × achievable share). A ring over
several nodes is as fast as its slowest hop: the lesser of the interconnect's bus bandwidth and the node's
network, which NCCL spreads over every GPU's NIC (the inter-node preset's per-GPU rate × the GPUs of a node ×
its achievable share); each ring step then pays the network's latency.
"""

from __future__ import annotations

from typing import Optional

from model.checks import SettingError
from planner.communication import Link
from planner.cost.interconnects import DEFAULT_INTER, DEFAULT_INTRA, INTERCONNECTS, Interconnect


def interconnect(key: str, scope: str, field: str) -> Interconnect:
    """A preset by key, checked for its scope; ValueError naming `field` and the valid keys."""
    valid = [k for k, link in INTERCONNECTS.items() if link.scope == scope]
    if key not in valid:
        raise SettingError(field, f"{field} must be one of {', '.join(valid)}, got {key!r}")
    return INTERCONNECTS[key]


def run_link(gpu: str, num_devices: int, node_size: int, intra: Optional[str] = None,
             inter: Optional[str] = None) -> Link:
    """The link of a run of `num_devices` GPUs of preset `gpu`, `node_size` per node (see the docstring)."""
    intra_link = interconnect(intra or DEFAULT_INTRA[gpu], "intra", "intra_link")
    bandwidth, latency, name = intra_link.bytes_per_s * intra_link.efficiency, intra_link.latency_s, intra_link.name
    if num_devices > node_size:
        inter_key = inter or DEFAULT_INTER.get(gpu)
        if inter_key is None:
            raise SettingError("inter_link", f"inter_link: {gpu} has no usual inter-node network; name one of "
                             f"{', '.join(k for k, v in INTERCONNECTS.items() if v.scope == 'inter')} to span "
                             f"{num_devices} devices over nodes of {node_size}")
        network = interconnect(inter_key, "inter", "inter_link")
        node_bandwidth = network.bytes_per_s * network.efficiency * node_size
        bandwidth = min(bandwidth, node_bandwidth)
        latency, name = max(latency, network.latency_s), f"{name} + {network.name}"
    return Link(bandwidth, latency, name)
