"""Deterministic demo data: projects, regions, and images made lazily from (index, seed).

Image ``i`` of ``n`` is a pure function of ``(i, seed)``: nothing is stored until an image is
changed, so a million images start as fast as sixty. Each project x region pair holds one
contiguous block of indices, in creation order, so listing a region is index arithmetic.
An image id is a UUID-shaped string whose last group encodes the index (masked with the
seed), so ``index_of(image_id)`` is O(1) and checked against the id it would generate.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Any, NamedTuple

_M64 = (1 << 64) - 1
_M48 = (1 << 48) - 1


def mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_ISO_LAST: list[Any] = [None, ""]  # the last whole second formatted, and its text


def iso(ts: float) -> str:
    """``ts`` (epoch seconds) as the API writes datetimes: ``2024-05-05T14:51:26.570866Z``."""
    whole = int(ts)
    if whole == _ISO_LAST[0]:
        head = _ISO_LAST[1]
    else:
        head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _ISO_LAST[0], _ISO_LAST[1] = whole, head
    return f"{head}.{int((ts - whole) * 1e6):06d}Z"


PROJECTS: tuple[tuple[int, str, str], ...] = (
    (1337, "demo", "Default project"),
    (1338, "staging", "Pre-production workloads"),
    (2001, "ml", "Training and inference"),
)
# id, display_name, country, slug, keystone_id, lat, lon
REGIONS: tuple[tuple[int, str, str, str, int, str, str], ...] = (
    (7, "Luxembourg 1", "LU", "luxembourg-1", 7, "49.6116", "6.1319"),
    (76, "Frankfurt", "DE", "frankfurt-2", 76, "50.1109", "8.6821"),
    (38, "Amsterdam", "NL", "amsterdam-1", 38, "52.3676", "4.9041"),
)
REGION_NAMES: dict[int, str] = {r[0]: r[1] for r in REGIONS}
PROJECT_IDS: frozenset[int] = frozenset(p[0] for p in PROJECTS)

# (project, region) blocks in this order, with their share of the images.
COMBOS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1337, 7), 0.30),
    ((1337, 76), 0.15),
    ((1337, 38), 0.10),
    ((1338, 7), 0.10),
    ((1338, 76), 0.10),
    ((1338, 38), 0.05),
    ((2001, 7), 0.10),
    ((2001, 76), 0.05),
    ((2001, 38), 0.05),
)

_T0 = 1672617600.0  # 2023-01-02T00:00:00Z: the first demo image
_SPAN = 700 * 86400.0  # demo images were created over 700 days


class Os(NamedTuple):
    slug: str
    os_distro: str
    os_version: str
    os_type: str
    architecture: str
    disk_format: str
    min_disk: int
    min_ram: int
    size: int
    hw_firmware_type: str | None
    hw_machine_type: str | None
    ssh_key: str
    weight: int


# slug, os_distro, os_version, os_type, architecture, disk_format, min_disk, min_ram, size,
# hw_firmware_type, hw_machine_type ("-": none), ssh_key, weight (share of the images)
_OS_TEXT = """
ubuntu-22.04-x64     ubuntu    22.04 linux   x86_64  qcow2  5    0  2361393152 bios q35 allow 22
ubuntu-24.04-x64     ubuntu    24.04 linux   x86_64  qcow2  5    0  2684354560 uefi q35 allow 16
ubuntu-22.04-arm64   ubuntu    22.04 linux   aarch64 raw    5    0  2202009600 uefi -   allow  6
debian-12-x64        debian    12    linux   x86_64  qcow2  3    0  1610612736 bios q35 allow 16
debian-11-x64        debian    11    linux   x86_64  qcow2  3    0  1503238553 bios -   allow  6
debian-12-arm64      debian    12    linux   aarch64 raw    3    0  1476395008 uefi -   allow  4
rocky-9-x64          rocky     9.3   linux   x86_64  qcow2  10   0  2147483648 uefi q35 allow  7
almalinux-9-x64      almalinux 9.4   linux   x86_64  qcow2  10   0  2040109465 bios q35 allow  4
centos-stream-9-x64  centos    9     linux   x86_64  qcow2  10   0  1932735283 bios -   allow  3
fedora-40-x64        fedora    40    linux   x86_64  qcow2  5    0  1825361100 uefi q35 allow  3
windows-server-2022  windows   2022  windows x86_64  raw    40 2048 10737418240 uefi q35 deny  9
windows-server-2019  windows   2019  windows x86_64  raw    40 2048 9663676416 bios q35 deny   4
"""


def _os(line: str) -> Os:
    w = line.split()
    return Os(
        w[0], w[1], w[2], w[3], w[4], w[5], int(w[6]), int(w[7]), int(w[8]),
        None if w[9] == "-" else w[9], None if w[10] == "-" else w[10], w[11], int(w[12]),
    )  # fmt: skip


OSES: tuple[Os, ...] = tuple(_os(line) for line in _OS_TEXT.strip().splitlines())


def _table(weights: list[int]) -> tuple[int, ...]:
    """A 256-entry lookup table: byte -> choice, in proportion to ``weights``."""
    total = sum(weights)
    out: list[int] = []
    for idx, w in enumerate(weights):
        out.extend([idx] * round(256 * w / total))
    while len(out) < 256:
        out.append(0)
    return tuple(out[:256])


_OS_TABLE = _table([o.weight for o in OSES])
VISIBILITIES: tuple[str, ...] = ("private", "shared", "public")
_VIS_TABLE = _table([88, 6, 6])

TEAMS = ("platform", "data", "web", "ml", "sre", "payments")
OWNERS = ("alice", "bob", "carol", "dmitri", "eve", "farah", "gaston", "hana")
ENVS = ("prod", "staging", "dev", "test")
LEGACY = ("true", "yes", "2019", "deprecated")
COST_CENTRES = ("cc-1001", "cc-2040", "cc-3300", "cc-4105")
SOURCES = ("snapshot", "import", "marketplace")
BILLING = ("standard", "premium")
APPS = ("web", "api", "worker", "gitlab-runner", "postgres-16", "k8s-node-1.29", "nginx", "redis")
DESCRIPTIONS = (None, "Built with packer", "Golden image, CIS hardened", None)
#: Read-only tag keys the demo data uses.
READ_ONLY_KEYS = ("gcore-source", "billing-class")


class Base(NamedTuple):
    """What the filters on fixed fields need, cheaply: the hash, OS and visibility."""

    h: int
    os: Os
    visibility: str


class Demo:
    """The ``n`` demo images of ``seed``, as pure functions of their index."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self._key = mix64(seed ^ 0x5EED5EED)
        self._idmask = mix64(self._key) & _M48
        self._step = _SPAN / max(n, 1)
        self.blocks: dict[tuple[int, int], range] = {}
        self._starts: list[int] = []
        self._combos: list[tuple[int, int]] = []
        start = 0
        acc = 0.0
        for idx, (combo, share) in enumerate(COMBOS):
            acc += share
            end = n if idx == len(COMBOS) - 1 else round(n * acc)
            self.blocks[combo] = range(start, end)
            self._starts.append(start)
            self._combos.append(combo)
            start = end

    def combo_of(self, i: int) -> tuple[int, int]:
        return self._combos[bisect_right(self._starts, i) - 1]

    def image_id(self, i: int) -> str:
        g = mix64(self._key ^ (i * 0xD1B54A32D192ED03 & _M64))
        return (
            f"{g >> 32:08x}-{(g >> 16) & 0xFFFF:04x}-4{(g >> 4) & 0xFFF:03x}-"
            f"{8 | (g & 3):x}{(g >> 52) & 0xFFF:03x}-{(i ^ self._idmask) & _M48:012x}"
        )

    def index_of(self, image_id: str) -> int | None:
        """The index of a demo image id, or None if ``image_id`` is not one."""
        if len(image_id) != 36:
            return None
        try:
            i = int(image_id[24:], 16) ^ self._idmask
        except ValueError:
            return None
        if i >= self.n or self.image_id(i) != image_id:
            return None
        return i

    def base(self, i: int) -> Base:
        h = mix64(self._key + i)
        return Base(h, OSES[_OS_TABLE[h & 0xFF]], VISIBILITIES[_VIS_TABLE[(h >> 8) & 0xFF]])

    def select(
        self, block: range, os_ok: Callable[[Os], bool], vis_ok: Callable[[str], bool]
    ) -> list[int]:
        """The indices of ``block`` whose OS and visibility pass (fast: no record made)."""
        os_pass = tuple(os_ok(OSES[_OS_TABLE[b]]) for b in range(256))
        vis_pass = tuple(vis_ok(VISIBILITIES[_VIS_TABLE[b]]) for b in range(256))
        if not any(os_pass) or not any(vis_pass):
            return []
        key = self._key
        out: list[int] = []
        append = out.append
        for i in block:
            x = (key + i + 0x9E3779B97F4A7C15) & _M64
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
            h = x ^ (x >> 31)
            if os_pass[h & 0xFF] and vis_pass[(h >> 8) & 0xFF]:
                append(i)
        return out

    def created_ts(self, i: int, h: int) -> float:
        return _T0 + i * self._step + (h >> 40) / (1 << 24) * self._step * 0.9

    def name(self, i: int, b: Base) -> str:
        os = b.os
        if b.visibility == "public":
            return os.slug
        t = mix64(b.h)
        if b.visibility == "shared":
            return f"corp-base-{os.slug}-{i}"
        kind = (t >> 52) & 3
        app = APPS[(t >> 54) % len(APPS)]
        if kind == 0:
            day = time.strftime("%Y-%m-%d", time.gmtime(self.created_ts(i, b.h)))
            return f"my-app-{day}"
        if kind == 1:
            return f"{app}-{os.slug}-{i}"
        if kind == 2:
            return f"{os.slug}-golden-{i}"
        day = time.strftime("%Y%m%d", time.gmtime(self.created_ts(i, b.h)))
        return f"{app}-{day}-{i}"

    def tags(self, b: Base) -> tuple[dict[str, str], frozenset[str]]:
        """User tags then read-only tags, and the read-only keys."""
        if b.visibility == "public":
            return {"gcore-source": "official"}, frozenset({"gcore-source"})
        t = mix64(b.h)
        tags: dict[str, str] = {}
        if (t & 0xF) < 8:
            tags["team"] = TEAMS[(t >> 4) % len(TEAMS)]
        if ((t >> 8) & 0xF) < 5:
            tags["owner"] = OWNERS[(t >> 12) % len(OWNERS)]
        if ((t >> 16) & 0xF) < 11:
            tags["env"] = ENVS[(t >> 20) % len(ENVS)]
        if ((t >> 32) & 0xF) < 6:
            tags["cost-centre"] = COST_CENTRES[(t >> 36) % len(COST_CENTRES)]
        if ((t >> 24) & 0xF) < 4:
            tags["legacy"] = LEGACY[(t >> 28) % len(LEGACY)]
        ro: list[str] = []
        if ((t >> 40) & 0xF) < 3:
            tags["gcore-source"] = SOURCES[(t >> 44) % len(SOURCES)]
            ro.append("gcore-source")
        if b.os.os_type == "windows":
            tags["billing-class"] = "windows-license"
            ro.append("billing-class")
        elif ((t >> 48) & 0xF) < 2:
            tags["billing-class"] = BILLING[(t >> 50) & 1]
            ro.append("billing-class")
        return tags, frozenset(ro)

    def fields(self, i: int, b: Base) -> dict[str, Any]:
        """Every API field of image ``i`` but the tags, in the reference page's order."""
        h, os = b.h, b.os
        project_id, region_id = self.combo_of(i)
        created = self.created_ts(i, h)
        updated = created + ((h >> 16) & 0xFFFF) / 0xFFFF * 30 * 86400
        public = b.visibility == "public"
        ssh_key = "required" if ((h >> 44) & 0xF) == 0 and os.os_type == "linux" else os.ssh_key
        baremetal = (
            ((h >> 48) & 0x1F) == 0 and os.os_type == "linux" and os.architecture == "x86_64"
        )
        g = mix64(h ^ 0x7A5C)
        return {
            "created_at": iso(created),
            "disk_format": os.disk_format,
            "id": self.image_id(i),
            "min_disk": os.min_disk,
            "min_ram": os.min_ram,
            "name": self.name(i, b),
            "os_distro": os.os_distro,
            "os_type": os.os_type,
            "os_version": os.os_version,
            "project_id": project_id,
            "region": REGION_NAMES[region_id],
            "region_id": region_id,
            "size": os.size + ((h >> 20) & 0xFFFFF) * 512,
            "status": "active",
            "updated_at": iso(min(updated, _T0 + _SPAN + 31 * 86400)),
            "visibility": b.visibility,
            "architecture": os.architecture,
            "creator_task_id": (
                f"{g >> 32:08x}-{(g >> 16) & 0xFFFF:04x}-4{(g >> 4) & 0xFFF:03x}-"
                f"a{(g >> 56) & 0xFF:02x}{(g >> 12) & 0xF:x}-{(g ^ (g >> 17)) & _M48:012x}"
            ),
            "description": (
                f"Official {os.os_distro} {os.os_version} image"
                if public
                else DESCRIPTIONS[(h >> 36) & 3]
            ),
            "display_order": 100 + 10 * OSES.index(os) if public else None,
            "gpu_driver": None,
            "gpu_driver_type": None,
            "gpu_driver_version": None,
            "hw_firmware_type": os.hw_firmware_type,
            "hw_machine_type": os.hw_machine_type,
            "is_baremetal": baremetal,
            "ssh_key": ssh_key,
            "task_id": None,
        }


def project_json(project_id: int, name: str, description: str) -> dict[str, Any]:
    return {
        "id": project_id,
        "client_id": 4242,
        "name": name,
        "description": description,
        "is_default": project_id == PROJECTS[0][0],
        "state": "ACTIVE",
        "created_at": "2022-11-03T09:12:44.000000Z",
        "deleted_at": None,
        "task_id": None,
    }


def region_json(region: tuple[int, str, str, str, int, str, str]) -> dict[str, Any]:
    rid, name, country, slug, keystone_id, lat, lon = region
    return {
        "id": rid,
        "display_name": name,
        "slug": slug,
        "country": country,
        "zone": "EMEA",
        "state": "ACTIVE",
        "access_level": "core",
        "endpoint_type": "public",
        "keystone_id": keystone_id,
        "keystone_name": f"{slug}-keystone",
        "created_at": "2019-06-14T08:00:00.000000Z",
        "created_on": "2019-06-14T08:00:00.000000Z",
        "coordinates": {"latitude": lat, "longitude": lon},
        "available_volume_types": ["standard", "ssd_hiiops", "cold"],
        "file_share_types": ["standard"],
        "external_network_id": None,
        "metrics_database_id": None,
        "ddos_endpoint_id": None,
        "task_id": None,
        "vlan_physical_network": "physnet1",
        "has_ai": False,
        "has_ai_gpu": rid == 7,
        "has_baremetal": True,
        "has_basic_vm": True,
        "has_dbaas": True,
        "has_ddos": True,
        "has_k8s": True,
        "has_kvm": True,
        "has_sfs": True,
    }
