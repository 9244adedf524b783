"""Interconnect presets for collective-communication time (the α-β ring model of planner.communication).

Each preset gives, per GPU and per direction, the link's datasheet rate, the share of it NCCL reaches on
large collectives (bus bandwidth / link rate), and the cost of one ring step (α). Bus bandwidth is then
`bytes_per_s * efficiency`.

Inter-node presets are per GPU: the instance's (or node's) network divided by its 8 GPUs, since NCCL gives
each GPU a NIC (or a share of the NICs) and runs one ring channel per NIC. A collective whose group holds one
GPU per node runs at this rate; a ring over every GPU of several nodes can reach the sum over the node's GPUs.
Their efficiencies were measured that way (all-reduce bus bandwidth over the node's whole network).

The per-step latency is NCCL's own cost model (Ring algorithm, Simple protocol, the one large messages use),
not the wire latency, which is far smaller; NCCL also charges a fixed 8.4 µs per Ring/Simple call (baseLat
in the same file), which is not included here.

These are editable defaults: measure your own cluster (nccl-tests all_reduce_perf) and override them.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9  # datasheets and nccl-tests report decimal GB/s


@dataclass(frozen=True)
class Interconnect:
    name: str  # human name, e.g. "NVLink 4 (H100 SXM)"
    scope: str  # "intra" or "inter"
    bytes_per_s: float  # per GPU, one direction, datasheet/link rate
    efficiency: float  # achievable share for large collectives (NCCL busbw / link rate)
    latency_s: float  # per ring step
    sources: dict[str, str]  # field -> source


NCCL_HW_LATENCY = "NVIDIA/nccl src/graph/tuning.cc, hwLat table, Ring/Simple column (commit b6475625)"
# NCCL's topology model turns a PCIe link's GT/s into 12/24/48 GB/s for Gen3/4/5 x16 (kvDictPciGen,
# "x100 Mbps per lane"), i.e. 0.75 of the nominal 16/32/64 GB/s. It is what NCCL assumes, not a measurement:
# GeForce cards without peer-to-peer go through host memory and do worse (NVIDIA/nccl#1639: 8 x RTX 5090,
# PCIe 5, 28 GB/s busbw, "determined by the bandwidth your CPU and memory can deliver").
NCCL_PCI_MODEL = "NVIDIA/nccl src/graph/topo.cc, kvDictPciGen: Gen3/4/5 x16 modelled at 12/24/48 GB/s = 0.75"

INTERCONNECTS: dict[str, Interconnect] = {
    "nvlink3": Interconnect(
        "NVLink 3 (A100 SXM)", "intra", 300 * GB, 0.77, 3.4e-6,
        {"bytes_per_s": "NVIDIA A100 Tensor Core GPU datasheet: NVLink 600 GB/s (12 links, both directions "
                        "summed) = 300 GB/s each way",
         "efficiency": "230.8 GB/s all-reduce busbw on one 8 x A100 EC2 instance (1 GiB; NVIDIA/nccl#527, "
                       "Jul 2022) / 300; NCCL models an NVLink 3 link at 20 of 25 GB/s, 'app-level bandwidth "
                       "is 80% of the peak' (sjeaugey, NVIDIA/nccl#1054, Nov 2023)",
         "latency_s": f"{NCCL_HW_LATENCY}: NVLink 3.4 µs"}),
    "nvlink4": Interconnect(
        "NVLink 4 (H100/H200 SXM)", "intra", 450 * GB, 0.82, 3.4e-6,
        {"bytes_per_s": "NVIDIA H100 Tensor Core GPU datasheet (SXM5): NVLink 900 GB/s (18 links, both "
                        "directions summed) = 450 GB/s each way; H200 SXM the same",
         "efficiency": "'450GB/s is the line rate. With the protocol overhead (~20%) NCCL can get an effective "
                       "NVLink bandwidth of 370GB/s' (sjeaugey, NVIDIA/nccl-tests#212, May 2024): 370 / 450. "
                       "NVLink SHARP all-reduce reports ~480 GB/s busbw on 8 GPUs, which is not wire bandwidth",
         "latency_s": f"{NCCL_HW_LATENCY}: NVLink 3.4 µs"}),
    "nvlink5": Interconnect(
        "NVLink 5 (B200)", "intra", 900 * GB, 0.80, 3.4e-6,
        {"bytes_per_s": "NVIDIA HGX B200 specifications: fifth-generation NVLink 1.8 TB/s per GPU (both "
                        "directions summed) = 900 GB/s each way",
         "efficiency": "NCCL models a Blackwell NVLink at 40.1 of 50 GB/s (SM100_NVLINK_BW, maxBw 721.8 for "
                       "18 links; NVIDIA/nccl#1807, Aug 2025): 0.80",
         "latency_s": f"{NCCL_HW_LATENCY}: NVLink 3.4 µs (NCCL uses one NVLink figure for all generations)"}),
    "pcie3": Interconnect(
        "PCIe 3.0 x16", "intra", 16 * GB, 0.75, 5.7e-6,
        {"bytes_per_s": "NVIDIA T4 datasheet: PCIe Gen3 x16, 32 GB/s both directions summed = 16 GB/s each way",
         "efficiency": NCCL_PCI_MODEL,
         "latency_s": f"{NCCL_HW_LATENCY}: PCI 5.7 µs"}),
    "pcie4": Interconnect(
        "PCIe 4.0 x16", "intra", 32 * GB, 0.75, 5.7e-6,
        {"bytes_per_s": "NVIDIA A100 datasheet: PCIe Gen4 64 GB/s both directions summed = 32 GB/s each way "
                        "(L4, A10G and RTX 4090 are PCIe 4.0 x16 too)",
         "efficiency": NCCL_PCI_MODEL,
         "latency_s": f"{NCCL_HW_LATENCY}: PCI 5.7 µs"}),
    "pcie5": Interconnect(
        "PCIe 5.0 x16", "intra", 64 * GB, 0.75, 5.7e-6,
        {"bytes_per_s": "NVIDIA H100 datasheet (PCIe/NVL): PCIe Gen5 128 GB/s both directions summed = "
                        "64 GB/s each way",
         "efficiency": NCCL_PCI_MODEL,
         "latency_s": f"{NCCL_HW_LATENCY}: PCI 5.7 µs"}),
    "infiniband-ndr": Interconnect(
        "InfiniBand NDR 400 Gb/s, one NIC per GPU", "inter", 50 * GB, 0.94, 14.0e-6,
        {"bytes_per_s": "InfiniBand NDR: 400 Gb/s per ConnectX-7 port = 50 GB/s; one port per GPU as in "
                        "8-GPU H100 nodes with '8*400Gb cx7 nics' (NVIDIA/nccl-tests#267)",
         "efficiency": "'For NDR @ 400Gbps you should see 46-48GB/s per NIC' (AddyLaddy, NVIDIA, "
                       "NVIDIA/nccl-tests#290, Mar 2025): 47 / 50",
         "latency_s": f"{NCCL_HW_LATENCY}: NET 14.0 µs"}),
    "infiniband-hdr": Interconnect(
        "InfiniBand HDR 200 Gb/s, one NIC per GPU", "inter", 25 * GB, 0.96, 14.0e-6,
        {"bytes_per_s": "InfiniBand HDR: 200 Gb/s per ConnectX-6 port = 25 GB/s; DGX A100 has '8x200Gbit/s "
                        "IB cards', one per GPU (NVIDIA/nccl#812)",
         "efficiency": "'On an Nvidia DGX-A100 system we have 8x200Gbit/s IB cards and we measure 192GB/s "
                       "AllReduce BusBW' (AddyLaddy, NVIDIA/nccl#812, quoted in NVIDIA/nccl#1576): 192 / 200",
         "latency_s": f"{NCCL_HW_LATENCY}: NET 14.0 µs"}),
    "efa-p4d": Interconnect(
        "AWS EFA, p4d/p4de (400 Gb/s per 8-GPU instance)", "inter", 400e9 / 8 / 8, 0.60, 14.0e-6,
        {"bytes_per_s": "AWS EC2 P4 instance page and Capacity Blocks pricing table: p4d.24xlarge 400 Gigabit "
                        "EFA networking; / 8 GPUs = 50 Gb/s = 6.25 GB/s per GPU (p4de the same)",
         "efficiency": "8 x A100 EC2 instances ('p4dn.24xlarge' in the report, 400 Gb/s EFA) all-reduce busbw "
                       "31.8 and 29.6 GB/s at 1 GiB on 3 and 4 instances, of 50 GB/s per instance "
                       "(NVIDIA/nccl#527, Jul 2022, NCCL 2.9.9): ~0.60; newer NCCL and aws-ofi-nccl may do better",
         "latency_s": f"assumed: {NCCL_HW_LATENCY}: NET 14.0 µs, NCCL's one network figure; no EFA-specific "
                      "per-step cost is published"}),
    "efa-p5": Interconnect(
        "AWS EFA, p5/p5en (3200 Gb/s per 8-GPU instance)", "inter", 3200e9 / 8 / 8, 0.85, 14.0e-6,
        {"bytes_per_s": "AWS EC2 P5 instance page and Capacity Blocks pricing table: p5.48xlarge and the 8 x "
                        "H200 instances 3200 Gigabit EFA networking; / 8 GPUs = 400 Gb/s = 50 GB/s per GPU",
         "efficiency": "p5.48xlarge all-reduce busbw at 8 GiB: 357 GB/s on 4 instances, 356 on 8 and 16, "
                       "321 on 32, of 400 GB/s per instance (github.com/crazyguitar/"
                       "aws-gpu-communication-benchmark, data/nccl_all_reduce.csv): 0.80-0.89, midpoint 0.85",
         "latency_s": f"assumed: {NCCL_HW_LATENCY}: NET 14.0 µs, NCCL's one network figure; no EFA-specific "
                      "per-step cost is published"}),
}

# The usual intra-node link of each GPU preset (keys as in prices.py): the link inside the instance its
# price comes from. RTX 4090 has no NVLink and no GPU peer-to-peer, so real rings do worse than pcie4's share.
DEFAULT_INTRA: dict[str, str] = {
    "h100-sxm": "nvlink4",
    "h200": "nvlink4",
    "h100-pcie": "pcie5",
    "a100-40gb": "nvlink3",
    "a100-80gb": "nvlink3",
    "a10g": "pcie4",
    "l4": "pcie4",
    "t4": "pcie3",
    "rtx-4090": "pcie4",
}

# The usual inter-node network, for the GPUs whose priced instance is built for multi-node training. The
# PCIe parts are absent on purpose: they are priced as single-GPU instances without an RDMA fabric, so a plan
# that spans nodes with them needs a network the caller names.
DEFAULT_INTER: dict[str, str] = {
    "h100-sxm": "efa-p5",
    "h200": "efa-p5",
    "a100-40gb": "efa-p4d",
    "a100-80gb": "efa-p4d",
}
