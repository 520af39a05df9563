"""Paths, names and targets shared by the checks, and the problem collector."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "ci" / "schemas"
SECCOMP_FILE = K8S / "seccomp" / "ztna-relay.json"
SECCOMP_LOCALHOST = "profiles/ztna-relay.json"

RELAY = "ztna-relay"
RELAY_LB = "ztna-relay"
RELAY_HEADLESS = "ztna-relay-headless"
CONNECTOR = "ztna-connector"
NAMESPACE = "ztna"
QUIC_PORT = 4433
PLACEHOLDER_IMAGE = "ztna"
# Commands the image provides besides its own binaries (Debian slim).
IMAGE_TOOLS = {"/bin/sh", "sh", "sleep", "test"}

BINARIES = ("ztna-relay", "ztna-connector")


@dataclass
class Target:
    name: str
    arch: str
    seccomp: str  # "Localhost" or "RuntimeDefault"
    overlay: str  # directory under deploy/k8s
    components: list[str] = field(default_factory=list)  # extra components (variants)
    expect_kinds: set[str] = field(default_factory=set)


TARGETS = [
    Target("overlays/pi", "arm64", "Localhost", "overlays/pi",
           expect_kinds={"CiliumLoadBalancerIPPool", "CiliumL2AnnouncementPolicy", "DaemonSet"}),
    Target("overlays/cloud", "amd64", "Localhost", "overlays/cloud", expect_kinds={"DaemonSet"}),
    Target("overlays/cloud+portable+podmonitor+aws-nlb", "amd64", "RuntimeDefault", "overlays/cloud",
           ["components/portable", "components/podmonitor", "components/aws-nlb"],
           expect_kinds={"PodMonitor"}),
    Target("overlays/pi+portable+podmonitor", "arm64", "RuntimeDefault", "overlays/pi",
           ["components/portable", "components/podmonitor"], expect_kinds={"PodMonitor"}),
]


class Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.notes: list[str] = []

    def err(self, msg: str) -> None:
        self.errors.append(msg)

    def check(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.err(msg)
        return cond
