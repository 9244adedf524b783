"""On-demand list prices per device-hour (USD), one entry per GPU preset of planner.steptime.gpu_presets.

Each figure is a cloud's published on-demand (pay-as-you-go, Linux, no commitment, not Spot) price for an
instance, divided by the GPUs in it, so a device-hour includes its share of the host's CPUs, memory, local
disk and network. Multi-GPU instances are preferred because that is where training runs; single-GPU sizes
are used where the card is mostly rented alone. Regions are US East where the provider prices by region.

These are editable defaults, dated in each source string as listed at that date (the prices page date, or
the date a public copy of the price was recorded). Providers change them without notice: AWS cut P4d, P4de,
P5 and P5en on-demand prices by up to 45% in June 2025, and older tables still quote the pre-cut figures.
Pass your own prices (committed-use, Spot, negotiated) where they differ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePrice:
    usd_per_device_hour: float
    instance: str  # e.g. "AWS p4d.24xlarge (8 GPUs), us-east-1"
    source: str  # where the figure is published, with its date


AWS_ON_DEMAND = "AWS EC2 On-Demand pricing, Linux (aws.amazon.com/ec2/pricing/on-demand/)"
# The June 2025 cut (P4d, P4de, P5, P5en; Savings Plans too). Quoted beside the AWS P-family figures so a
# reader who finds an older, higher price knows which one is current.
AWS_JUNE_2025_CUT = ("AWS News Blog, 'Announcing up to 45% price reduction for Amazon EC2 NVIDIA "
                     "GPU-accelerated instances', 5 Jun 2025")

PRICES: dict[str, DevicePrice] = {
    "h100-sxm": DevicePrice(
        55.04 / 8,  # $6.88
        "AWS p5.48xlarge (8 x H100 SXM 80GB), us-east-1",
        f"{AWS_ON_DEMAND}: $55.04/h per instance, as listed Mar 2026; down from $98.32/h before the "
        f"cut ({AWS_JUNE_2025_CUT})"),
    "h100-pcie": DevicePrice(
        6.98,
        "Azure Standard_NC40ads_H100_v5 (1 x H100 NVL 94GB, PCIe card), East US",
        "Azure Linux Virtual Machines pricing, pay-as-you-go (azure.microsoft.com/pricing/details/"
        "virtual-machines/linux/): $6.98/h, as listed Apr 2026 (cloudprice.net/vm/Standard_NC40ads_H100_v5); "
        "the NVL is the PCIe H100 the big clouds rent, so it stands in for H100 PCIe"),
    "h200": DevicePrice(
        63.296 / 8,  # $7.912
        "AWS p5en.48xlarge (8 x H200 141GB), us-east-1",
        f"{AWS_ON_DEMAND}: $63.296/h per instance in us-east-1, us-east-2 and us-west-2, as listed Aug 2026 "
        f"(dstack offer listing in github.com/dstackai/dstack pull #4110, 6 Aug 2026); P5en was in the "
        f"June 2025 cut ({AWS_JUNE_2025_CUT}); p5e.48xlarge has no on-demand price (Capacity Blocks only)"),
    "a100-40gb": DevicePrice(
        21.957642 / 8,  # $2.7447
        "AWS p4d.24xlarge (8 x A100 SXM 40GB), us-east-1",
        f"{AWS_ON_DEMAND}: $21.957642/h per instance, as listed Mar 2026; down from $32.77/h before the "
        f"cut ({AWS_JUNE_2025_CUT})"),
    "a100-80gb": DevicePrice(
        27.44705 / 8,  # $3.4309
        "AWS p4de.24xlarge (8 x A100 SXM 80GB), us-east-1",
        f"{AWS_ON_DEMAND}: $27.44705/h per instance, as listed 2026; down from $40.97/h before the "
        f"cut ({AWS_JUNE_2025_CUT})"),
    "a10g": DevicePrice(
        1.006,
        "AWS g5.xlarge (1 x A10G 24GB), us-east-1",
        f"{AWS_ON_DEMAND}: $1.006/h, as listed Jun 2026 (G5 was not part of the June 2025 cut)"),
    "l4": DevicePrice(
        0.7068,
        "GCP g2-standard-4 (1 x L4 24GB, 4 vCPU, 16 GB), us-central1",
        "Google Cloud VM instance pricing, accelerator-optimized G2 (cloud.google.com/compute/"
        "vm-instance-pricing): $0.7068/h on-demand, as listed 2025-2026 (public rate tables quote "
        "$0.70-0.72/h by region)"),
    "t4": DevicePrice(
        0.526,
        "AWS g4dn.xlarge (1 x T4 16GB), us-east-1",
        f"{AWS_ON_DEMAND}: $0.526/h, as listed Mar 2026 (not part of the June 2025 cut)"),
    "rtx-4090": DevicePrice(
        0.69,
        "RunPod Secure Cloud, 1 x RTX 4090 24GB pod (GPU-cloud marketplace, not a big cloud)",
        "RunPod GPU pricing (runpod.io/pricing), Secure Cloud on-demand: $0.69/h, as listed Jun-Aug 2026; "
        "its Community Cloud hosts list about $0.34/h and Vast.ai offers vary ($0.24-0.60/h)"),
}
