"""A seeded DUIS request stream over a simulated estate, built from the real request shapes.

Every request is one of the real sample requests (rules/duis/requests, rules/mp169-requests) with
its RequestID rewritten (originator = the chosen user, target = the device, or the DCC for
CommandVariant 8, counter strictly increasing per originator) and, in CommandVariant 8 bodies, its
DeviceID / DeviceIDList rewritten to the chosen devices; the rest of the body is kept byte for byte.

`generate_traffic(estate, seed, requests)` is a pure function: the same inputs give the same items.
It plans scenario events on a timeline (the overnight daily-read burst, on-demand traffic, flag
requests valid and invalid, Change of Supplier and Change of Tenancy with their follow-ups, spoofed
and malformed input), then walks the timeline in order, keeping the state a real stream would have
(who is each device's responsible supplier now, which devices the consumer has asked to flag), and
renders each event with the user that would send it. docs/simulator.md describes the mix.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.inventory import inventory_row
from rules.domain import (
    DCC_EUI,
    FLAG_CLEAR_SRV,
    FLAG_SET_SRV,
    FLAG_SRVS,
    READ_INVENTORY_SRV,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    RequestId,
    Role,
    Tariff,
    device_parties,
    responsible_supplier,
)
from rules.table import default_table
from simulator.estate import DEVICE_SUFFIX, Estate
from simulator.recording import InventoryChange, PublishItem, StreamItem

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

INBOUND_PREFIX = "dsp/in"

_RULES_DIR = Path(__file__).resolve().parent.parent / "rules"
SAMPLE_DIRS = (_RULES_DIR / "duis" / "requests", _RULES_DIR / "mp169-requests")
SRV_MATRIX = _RULES_DIR / "duis" / "srv-matrix.json"
RESTRICT_ACCESS_SRV = "3.2"  # Restrict Access for Change of Tenancy
DAILY_READ_SRVS = {"4.6.1": 45, "4.8.1": 35, "4.17": 20}
_NAMESPACE = b"http://www.dccinterface.co.uk/ServiceUserGateway"

_SUFFIX_TYPE = {suffix: device_type for device_type, suffix in DEVICE_SUFFIX.items()}
_GAS_SIDE = frozenset({DeviceType.GSME, DeviceType.GPF})
_ELECTRICITY_SIDE = frozenset({DeviceType.ESME, DeviceType.CHF, DeviceType.PPMID, DeviceType.HCALCS})
_METERS = frozenset({DeviceType.ESME, DeviceType.GSME})

# Invalid flag requests: each names what is wrong (docs/simulator.md lists the expected codes).
FLAG_INVALID_KINDS = (
    "other-supplier",
    "other-user",
    "distributor",
    "smets1",
    "not-commissioned",
    "hub-not-commissioned",
    "economy7",
    "multi-rate",
    "rts",
    "no-wan",
    "no-declaration",
    "device-type",
)
MALFORMED_KINDS = (
    "truncated",
    "wrong-namespace",
    "entity-bomb",
    "external-entity",
    "random-bytes",
    "unknown-srv",
)
INVALID_KINDS = ("ineligible-role", "unknown-device", "unregistered-supplier", "wrong-device-type")
GAS_PROXY_SHARE = 0.4
"""Share of reads of gas-capable SRVs (4.1.1, 4.8.1, 4.18...) addressed to a GPF, as DCC users read a
gas meter's registers, profiles and prepayment values (the GPF holds them)."""
_SUPPLIER_ROLES = frozenset({Role.IMPORT_SUPPLIER, Role.EXPORT_SUPPLIER, Role.GAS_SUPPLIER})


# -- request shapes -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A sample request and what is rewritten in it."""

    srv: str
    command_variant: int
    device_type: DeviceType | None
    """The device the request concerns: the RequestID target (CV 1-7) or the body's DeviceID /
    DeviceIDList (CV 8); None for a CV 8 request naming no device (5.2, 8.13, 12.1...)."""
    device_tag: str | None
    """`DeviceID` or `DeviceIDList` when a CV 8 body names the device."""
    raw: bytes
    source: str


def _element_text(raw: bytes, tag: str) -> str | None:
    match = re.search(rb"<(?:\w+:)?" + tag.encode() + rb">([^<]*)</", raw)
    return match.group(1).decode().strip() if match else None


def _device_type_of(eui: str | None) -> DeviceType | None:
    if eui is None or not eui.upper().startswith("00-DB-12"):
        return None
    return _SUFFIX_TYPE.get(int(eui.split(",")[0][-2:], 16))


def _template(path: Path) -> Template:
    raw = path.read_bytes()
    srv = _element_text(raw, "ServiceReferenceVariant")
    variant = _element_text(raw, "CommandVariant")
    request_id = _element_text(raw, "RequestID")
    if srv is None or variant is None or request_id is None:
        raise ValueError(f"{path}: not a DUIS request (no RequestID, CommandVariant or SRV)")
    command_variant = int(variant)
    device_tag = None
    if command_variant == 8:
        device_tag = next((tag for tag in ("DeviceIDList", "DeviceID") if _element_text(raw, tag)), None)
        device = _element_text(raw, device_tag) if device_tag else None
    else:
        device = request_id.split(":")[1]
    return Template(srv, command_variant, _device_type_of(device), device_tag, raw, path.name)


@cache
def load_templates(directories: tuple[Path, ...] = SAMPLE_DIRS) -> Mapping[str, Template]:
    """The sample requests by SRV (the MP169 directory holds only 8.15.1 / 8.15.2 shapes)."""
    templates: dict[str, Template] = {}
    for directory in directories:
        pattern = "8.15.[12]_*.XML" if directory.name == "mp169-requests" else "*.XML"
        for path in sorted(directory.glob(pattern)):
            template = _template(path)
            templates.setdefault(template.srv, template)
    return templates


@cache
def srv_eligibility(path: Path = SRV_MATRIX) -> Mapping[str, frozenset[Role]]:
    """Eligible User Roles per SRV, from the DUIS SRV matrix."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return {
        row["Service Reference Variant"]: frozenset(Role(role) for role in row["Eligible User Roles"])
        for row in rows
    }


def render(template: Template, request_id: RequestId, fields: Mapping[str, str] | None = None) -> bytes:
    """The template with its RequestID and the given body elements' text (first occurrence) replaced."""
    raw = _replace_text(template.raw, "RequestID", str(request_id))
    for tag, text in (fields or {}).items():
        raw = _replace_text(raw, tag, text)
    return raw


def _replace_text(raw: bytes, tag: str, text: str) -> bytes:
    pattern = re.compile(rb"(<(?:\w+:)?" + tag.encode() + rb">)[^<]*(</)")
    result, count = pattern.subn(lambda match: match.group(1) + text.encode() + match.group(2), raw, count=1)
    if count != 1:
        raise ValueError(f"no <{tag}> element to rewrite")
    return result


# -- the mix ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrafficMix:
    """Relative weights of the kinds of traffic, and the timeline they are spread over."""

    daily_reads: float = 50.0
    """The overnight burst of 4.6.1 / 4.8.1 / 4.17 to many meters: the bulk of real DCC traffic."""
    on_demand_reads: float = 10.0
    tariff_updates: float = 5.0
    firmware: float = 3.0
    schedules: float = 3.0
    other: float = 8.0
    """Every other SRV with a sample: configuration, supply, security, inventory, install..."""
    flag_requests: float = 8.0
    change_of_supplier: float = 1.0
    change_of_tenancy: float = 1.0
    spoofed: float = 2.0
    malformed: float = 4.0
    invalid: float = 5.0
    """Well-formed but wrong: a user whose roles are not eligible for the SRV, an unknown device."""
    duration_seconds: float = 120.0
    burst_window: tuple[float, float] = (0.1, 0.4)
    """Where the daily-read burst sits, as shares of the duration."""
    flagged_focus: float = 0.25
    """Share of device requests aimed at a device flagged at that moment (so refusals show)."""
    flag_clear_share: float = 0.2
    """Share of valid flag sets that their supplier clears again near the end."""
    counter_base: int = 1
    """First RequestID counter of every originator (raise it to replay into a store that has seen
    this stream: counters already accepted there would be refused as duplicates)."""

    def __post_init__(self) -> None:
        low, high = self.burst_window
        if not 0 <= low < high <= 1 or self.duration_seconds <= 0:
            raise ValueError("burst_window must be 0 <= start < end <= 1 and duration_seconds positive")
        for name in ("flagged_focus", "flag_clear_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class Traffic:
    items: tuple[StreamItem, ...]
    flag_devices: tuple[Eui, ...]
    """Devices a valid 8.15.1 in the stream flags (for aiming alerts at flagged devices)."""


@dataclass(slots=True)
class _Draft:
    t: float
    kind: str
    device: Eui | None = None
    variant: str = ""


def _counts(mix: TrafficMix, requests: int) -> dict[str, int]:
    weights = {
        "on-demand-read": mix.on_demand_reads,
        "tariff": mix.tariff_updates,
        "firmware": mix.firmware,
        "schedule": mix.schedules,
        "other": mix.other,
        "flag": mix.flag_requests,
        "change-of-supplier": mix.change_of_supplier,
        "change-of-tenancy": mix.change_of_tenancy,
        "spoofed": mix.spoofed,
        "malformed": mix.malformed,
        "invalid": mix.invalid,
    }
    total = sum(weights.values()) + mix.daily_reads
    if total <= 0:
        raise ValueError("the traffic mix has no weight")
    return {kind: math.floor(requests * weight / total) for kind, weight in weights.items()}


# -- the estate, indexed for the walk -----------------------------------------------------------


def flag_faults(device: DeviceRecord, hub: DeviceRecord | None) -> frozenset[str]:
    """Why a flag request for `device` would be refused whoever sent it (empty: it may be flagged).

    The names are FLAG_INVALID_KINDS; `hub` is the device's comms hub row, if known.
    """
    faults = set()
    if device.device_type not in _METERS:
        faults.add("device-type")
    if device.smets != 2:
        faults.add("smets1")
    if device.status is not DeviceStatus.COMMISSIONED:
        faults.add("not-commissioned")
    if device.device_type in _METERS and (hub is None or hub.status is not DeviceStatus.COMMISSIONED):
        faults.add("hub-not-commissioned")
    if device.tariff is not Tariff.SINGLE:
        faults.add(device.tariff.value)
    if not device.wan:
        faults.add("no-wan")
    return frozenset(faults)


class _Index:
    """The estate as the walk needs it; `rows` changes as Change of Supplier events happen."""

    def __init__(self, estate: Estate) -> None:
        self.rows: dict[Eui, DeviceRecord] = {device.device_id: device for device in estate.devices}
        self.commissioned: dict[DeviceType, list[Eui]] = {}
        # Flag pools: "valid" (no fault) and, per fault, the devices with exactly that one fault.
        self.flag_pools: dict[str, list[Eui]] = {}
        for device in estate.devices:
            if device.status is DeviceStatus.COMMISSIONED:
                self.commissioned.setdefault(device.device_type, []).append(device.device_id)
            hub = self.rows.get(device.comms_hub_id) if device.comms_hub_id else None
            faults = flag_faults(device, hub)
            # A flag request needs a supplier to send it: the responsible one, or the CHF's.
            if len(faults) <= 1 and (responsible_supplier(device) or device.import_supplier):
                self.flag_pools.setdefault(next(iter(faults), "valid"), []).append(device.device_id)
        self.users_by_role: dict[Role, list[Eui]] = {}
        for user in estate.users:
            for role in sorted(user.roles):
                self.users_by_role.setdefault(role, []).append(user.user_id)
        self.roles = {user.user_id: user.roles for user in estate.users}
        # A GSME's GPF: the GPF joined to the same comms hub.
        proxies = {
            device.comms_hub_id: device.device_id
            for device in estate.devices
            if device.device_type is DeviceType.GPF and device.comms_hub_id
        }
        self.proxy_of = {
            device.device_id: proxies[device.comms_hub_id]
            for device in estate.devices
            if device.device_type is DeviceType.GSME and device.comms_hub_id in proxies
        }


# -- planning: what happens when ----------------------------------------------------------------


def _plan(
    rng: random.Random, index: _Index, mix: TrafficMix, requests: int
) -> tuple[list[_Draft], list[Eui]]:
    """The timeline of request drafts (one request each, but the inventory change) and the flag devices."""
    duration = mix.duration_seconds
    counts = _counts(mix, requests)
    drafts: list[_Draft] = []

    def at(low: float, high: float) -> float:
        return rng.uniform(low * duration, high * duration)

    valid = index.flag_pools.get("valid", [])
    flag_total = counts["flag"]
    flag_devices = rng.sample(valid, min(len(valid), math.ceil(flag_total * 0.45)))
    clears = min(round(len(flag_devices) * mix.flag_clear_share), flag_total - len(flag_devices))
    drafts.extend(_Draft(at(0.0, 0.1), "flag-set", device) for device in flag_devices)
    drafts.extend(_Draft(at(0.75, 0.95), "flag-clear", device) for device in flag_devices[:clears])
    kinds = [kind for kind in FLAG_INVALID_KINDS if index.flag_pools.get(_pool_of(kind))]
    if kinds:
        start = rng.randrange(len(kinds))
        drafts.extend(
            _Draft(at(0.0, 1.0), "flag-invalid", variant=kinds[(start + n) % len(kinds)])
            for n in range(flag_total - len(flag_devices) - clears)
        )

    electricity_valid = [eui for eui in valid if index.rows[eui].device_type is DeviceType.ESME]
    flagged_electricity = [eui for eui in flag_devices if index.rows[eui].device_type is DeviceType.ESME]
    for _ in range(counts["change-of-supplier"] // 3 if electricity_valid else 0):
        pool = flagged_electricity if flagged_electricity and rng.random() < 0.7 else electricity_valid
        device = rng.choice(pool)
        moment = at(0.3, 0.6)
        drafts.append(_Draft(moment, "change-of-supplier", device))
        for step in ("read-inventory", "old-supplier-clear", "new-supplier"):
            moment += rng.uniform(0.005, 0.02) * duration
            drafts.append(_Draft(moment, "change-of-supplier-step", device, step))
    for _ in range(counts["change-of-tenancy"] // 2 if electricity_valid else 0):
        pool = flagged_electricity if flagged_electricity and rng.random() < 0.5 else electricity_valid
        device = rng.choice(pool)
        moment = at(0.2, 0.8)
        drafts.append(_Draft(moment, "change-of-tenancy", device))
        drafts.append(_Draft(moment + rng.uniform(0.005, 0.03) * duration, "change-of-tenancy-flag", device))

    for kind, variants in (("malformed", MALFORMED_KINDS), ("invalid", INVALID_KINDS), ("spoofed", ("",))):
        drafts.extend(
            _Draft(at(0.0, 1.0), kind, variant=variants[n % len(variants)]) for n in range(counts[kind])
        )
    for kind in ("on-demand-read", "tariff", "firmware", "schedule", "other"):
        drafts.extend(_Draft(at(0.0, 1.0), kind) for _ in range(counts[kind]))
    low, high = mix.burst_window
    requests_planned = sum(1 for draft in drafts if draft.kind != "change-of-supplier")
    drafts.extend(_Draft(at(low, high), "daily-read") for _ in range(requests - requests_planned))
    return drafts, flag_devices


def _pool_of(kind: str) -> str:
    """Kinds that are wrong because of who sends them (or what they declare) use flag-eligible devices."""
    return "valid" if kind in {"other-supplier", "other-user", "distributor", "no-declaration"} else kind


# -- the walk: rendering drafts in time order ---------------------------------------------------


class _Pool:
    """A set with O(1) add, discard and random choice whose order depends only on its history."""

    def __init__(self) -> None:
        self.members: list[Eui] = []
        self._positions: dict[Eui, int] = {}

    def __contains__(self, eui: object) -> bool:
        return eui in self._positions

    def add(self, eui: Eui) -> None:
        if eui not in self._positions:
            self._positions[eui] = len(self.members)
            self.members.append(eui)

    def discard(self, eui: Eui) -> None:
        position = self._positions.pop(eui, None)
        if position is None:
            return
        last = self.members.pop()
        if last != eui:
            self.members[position] = last
            self._positions[last] = position


_CATEGORY_PREFIXES = {
    "on-demand-read": ("4.",),
    "tariff": ("1.", "2."),
    "firmware": ("11.",),
    "schedule": ("5.",),
}


class _Walk:
    def __init__(  # noqa: PLR0913 - the walk's whole context
        self,
        *,
        rng: random.Random,
        index: _Index,
        templates: Mapping[str, Template],
        eligibility: Mapping[str, frozenset[Role]],
        mix: TrafficMix,
        dcc_eui: Eui,
    ) -> None:
        self.rng = rng
        self.index = index
        self.templates = templates
        self.eligibility = eligibility
        self.mix = mix
        self.dcc_eui = dcc_eui
        self.table = default_table()
        self.counters: dict[Eui, int] = {}
        self.flagged: dict[DeviceType, _Pool] = defaultdict(_Pool)
        self.previous_supplier: dict[Eui, Eui] = {}
        self.categories = self._categories()
        # Device templates some user may not send: no role of theirs is eligible for the SRV.
        self.restricted = [
            template
            for name in ("on-demand-read", "tariff", "other")
            for template in self.categories[name]
            if template.device_type is not None
            and any(not roles & eligibility[template.srv] for roles in index.roles.values())
        ]

    def _usable(self, template: Template) -> bool:
        roles = self.eligibility.get(template.srv)
        device_ok = template.device_type is None or bool(self.index.commissioned.get(template.device_type))
        return (
            bool(roles) and device_ok and (template.device_type is not None or template.command_variant == 8)
        )

    def _categories(self) -> dict[str, list[Template]]:
        categories: dict[str, list[Template]] = {name: [] for name in (*_CATEGORY_PREFIXES, "other")}
        for srv, template in sorted(self.templates.items()):
            if srv in FLAG_SRVS or srv in DAILY_READ_SRVS or not self._usable(template):
                continue
            name = next(
                (n for n, prefixes in _CATEGORY_PREFIXES.items() if srv.startswith(prefixes)), "other"
            )
            categories[name].append(template)
        return categories

    # -- building blocks --

    def _request(  # noqa: PLR0913 - one request: when, what, from whom, about what, labelled how
        self,
        t: float,
        template: Template,
        originator: Eui,
        devices: Sequence[Eui],
        *,
        scenario: str,
        fields: Mapping[str, str] | None = None,
        topic_user: Eui | None = None,
    ) -> PublishItem:
        counter = self.counters.get(originator, self.mix.counter_base - 1) + 1
        self.counters[originator] = counter
        body = dict(fields or {})
        if template.command_variant == 8:
            target = self.dcc_eui
            if template.device_tag and devices:
                body[template.device_tag] = ",".join(devices)
        else:
            target = devices[0]
        payload = render(template, RequestId(originator, target, counter), body)
        return PublishItem(round(t, 3), f"{INBOUND_PREFIX}/{topic_user or originator}", payload, scenario)

    def _flag_request(  # noqa: PLR0913 - set or clear, for whom, by whom, declared or not
        self, t: float, device: Eui, originator: Eui, scenario: str, *, set_flag: bool, declared: bool = True
    ) -> PublishItem:
        template = self.templates[FLAG_SET_SRV if set_flag else FLAG_CLEAR_SRV]
        fields: dict[str, str] = {"DeviceID": device}
        if set_flag:
            fields["AllReasonableStepsTaken"] = "true" if declared else "false"
            if _element_text(template.raw, "ConsumerReference") is not None:
                fields["ConsumerReference"] = f"CC-{self.rng.randrange(10**6):06d}"
        return self._request(t, template, originator, [device], scenario=scenario, fields=fields)

    def _pick_device(self, device_type: DeviceType) -> Eui:
        flagged = self.flagged[device_type].members
        if device_type is DeviceType.GPF:  # a GPF is "flagged" through its GSME
            flagged = [
                self.index.proxy_of[gsme]
                for gsme in self.flagged[DeviceType.GSME].members
                if gsme in self.index.proxy_of
            ]
        if flagged and self.rng.random() < self.mix.flagged_focus:
            return self.rng.choice(flagged)
        return self.rng.choice(self.index.commissioned[device_type])

    def _originator(self, srv: str, device: DeviceRecord | None) -> Eui:
        """A user that would send this SRV about this device: mostly its supplier, eligible by role."""
        roles = self.eligibility.get(srv, frozenset())
        candidates: list[tuple[Eui, float]] = []
        if device is not None:
            gas_side = device.device_type in _GAS_SIDE
            suppliers = (
                (Role.IMPORT_SUPPLIER, None if gas_side else device.import_supplier, 8.0),
                (Role.GAS_SUPPLIER, device.gas_supplier, 8.0 if gas_side else 2.0),
                (Role.EXPORT_SUPPLIER, device.export_supplier, 8.0),
                (Role.ELECTRICITY_DISTRIBUTOR, None if gas_side else device.network_operator, 1.0),
            )
            candidates.extend((user, weight) for role, user, weight in suppliers if role in roles and user)
            if Role.GAS_TRANSPORTER in roles and gas_side and device.gas_transporter:
                candidates.append((device.gas_transporter, 1.0))
        candidates.extend(
            (self._user_with(role), 0.5)
            for role in (Role.OTHER_USER, Role.REGISTERED_SUPPLIER_AGENT)
            if role in roles
        )
        if not candidates:
            # No user tied to the device holds an eligible role: any user that does.
            return self._user_with(self.rng.choice(sorted(roles)))
        users, weights = zip(*candidates, strict=True)
        return Eui(self.rng.choices(users, weights=weights)[0])

    def _user_with(self, role: Role) -> Eui:
        return self.rng.choice(self.index.users_by_role[role])

    def _regular(self, t: float, category: str, scenario: str | None = None) -> PublishItem:
        if category == "daily-read":
            srvs = list(DAILY_READ_SRVS)
            template = self.templates[self.rng.choices(srvs, weights=[DAILY_READ_SRVS[s] for s in srvs])[0]]
        else:
            template = self.rng.choice(self.categories[category] or self.categories["on-demand-read"])
        if template.device_type is None:
            return self._request(
                t, template, self._originator(template.srv, None), [], scenario=scenario or category
            )
        device_type = template.device_type
        if (
            category in {"on-demand-read", "daily-read"}
            and DeviceType.GPF in self.table.srvs[template.srv].device_types
            and self.index.commissioned.get(DeviceType.GPF)
            and self.rng.random() < GAS_PROXY_SHARE
        ):
            device_type = DeviceType.GPF
        devices = [self._pick_device(device_type)]
        row = self.index.rows[devices[0]]
        originator = self._originator(template.srv, row)
        if template.device_tag == "DeviceIDList":
            devices.extend(self._same_portfolio(row, originator, self.rng.randrange(5)))
        return self._request(t, template, originator, devices, scenario=scenario or category)

    def _same_portfolio(self, row: DeviceRecord, supplier: Eui, count: int) -> list[Eui]:
        """Up to `count` more devices of the same type served by `supplier` (one firmware campaign)."""
        pool = self.index.commissioned[row.device_type]
        found: list[Eui] = []
        for _ in range(count * 10):
            if len(found) == count:
                break
            other = self.index.rows[self.rng.choice(pool)]
            if (
                other.device_id != row.device_id
                and other.device_id not in found
                and supplier
                in {
                    other.import_supplier,
                    other.gas_supplier,
                }
            ):
                found.append(other.device_id)
        return found

    # -- drafts --

    def render(self, draft: _Draft) -> list[StreamItem]:
        scenarios: dict[str, Callable[[_Draft], list[StreamItem]]] = {
            "flag-set": self._draft_flag_set,
            "flag-clear": self._draft_flag_clear,
            "flag-invalid": self._draft_flag_invalid,
            "change-of-supplier": self._draft_change_of_supplier,
            "change-of-supplier-step": self._draft_change_of_supplier_step,
            "change-of-tenancy": self._draft_change_of_tenancy,
            "change-of-tenancy-flag": self._draft_change_of_tenancy_flag,
            "spoofed": self._draft_spoofed,
            "malformed": self._draft_malformed,
            "invalid": self._draft_invalid,
        }
        scenario = scenarios.get(draft.kind)
        return scenario(draft) if scenario is not None else [self._regular(draft.t, draft.kind)]

    def _draft_flag_set(self, draft: _Draft) -> list[StreamItem]:
        device = self._device(draft)
        self._flag(device, set_flag=True)
        return [self._flag_request(draft.t, device, self._responsible(device), "flag-set", set_flag=True)]

    def _draft_flag_clear(self, draft: _Draft) -> list[StreamItem]:
        device = self._device(draft)
        self._flag(device, set_flag=False)
        return [self._flag_request(draft.t, device, self._responsible(device), "flag-clear", set_flag=False)]

    def _draft_flag_invalid(self, draft: _Draft) -> list[StreamItem]:
        kind = draft.variant
        device = self.rng.choice(self.index.flag_pools[_pool_of(kind)])
        row = self.index.rows[device]
        originator = self._responsible(device)
        if kind == "other-supplier":
            role = Role.GAS_SUPPLIER if row.device_type in _GAS_SIDE else Role.IMPORT_SUPPLIER
            others = [user for user in self.index.users_by_role[role] if user != originator]
            originator = self.rng.choice(others)
        elif kind == "other-user":
            originator = self._user_with(Role.OTHER_USER)
        elif kind == "distributor" and row.network_operator is not None:
            originator = row.network_operator
        scenario = f"flag-invalid/{kind}"
        declared = kind != "no-declaration"
        return [self._flag_request(draft.t, device, originator, scenario, set_flag=True, declared=declared)]

    def _draft_change_of_supplier(self, draft: _Draft) -> list[StreamItem]:
        device = self._device(draft)
        row = self.index.rows[device]
        old = self._responsible(device)
        new = self.rng.choice(
            [user for user in self.index.users_by_role[Role.IMPORT_SUPPLIER] if user != old]
        )
        updated = replace(row, import_supplier=new)
        self.index.rows[device] = updated
        self.previous_supplier[device] = old
        return [InventoryChange(round(draft.t, 3), (inventory_row(updated),), "change-of-supplier")]

    def _draft_change_of_supplier_step(self, draft: _Draft) -> list[StreamItem]:
        device = self._device(draft)
        scenario = f"change-of-supplier/{draft.variant}"
        if draft.variant == "read-inventory":
            template = self.templates[READ_INVENTORY_SRV]
            return [self._request(draft.t, template, self._responsible(device), [device], scenario=scenario)]
        if draft.variant == "old-supplier-clear":
            old = self.previous_supplier[device]
            return [self._flag_request(draft.t, device, old, scenario, set_flag=False)]
        # The new supplier either clears the flag or keeps it and reads (refused while flagged).
        if self.rng.random() < 0.5:
            self._flag(device, set_flag=False)
            new = self._responsible(device)
            return [self._flag_request(draft.t, device, new, f"{scenario}-clear", set_flag=False)]
        template = self.templates["4.6.1"]
        return [
            self._request(draft.t, template, self._responsible(device), [device], scenario=f"{scenario}-read")
        ]

    def _draft_change_of_tenancy(self, draft: _Draft) -> list[StreamItem]:
        device = self._device(draft)
        template = self.templates[RESTRICT_ACCESS_SRV]
        scenario = "change-of-tenancy/restrict-access"
        return [self._request(draft.t, template, self._responsible(device), [device], scenario=scenario)]

    def _draft_change_of_tenancy_flag(self, draft: _Draft) -> list[StreamItem]:
        # The new occupant's choice: clear a flag the previous occupant asked for, or set one.
        device = self._device(draft)
        set_flag = not self._flagged(device)
        self._flag(device, set_flag=set_flag)
        scenario = "change-of-tenancy/flag-" + ("set" if set_flag else "clear")
        return [self._flag_request(draft.t, device, self._responsible(device), scenario, set_flag=set_flag)]

    def _draft_spoofed(self, draft: _Draft) -> list[StreamItem]:
        item = self._regular(draft.t, "on-demand-read", "spoofed")
        claimed = item.topic.rsplit("/", 1)[1]
        publisher = self.rng.choice([user for user in self.index.roles if user != claimed])
        return [replace(item, topic=f"{INBOUND_PREFIX}/{publisher}")]

    def _draft_malformed(self, draft: _Draft) -> list[StreamItem]:
        item = self._regular(draft.t, "on-demand-read", f"malformed/{draft.variant}")
        return [replace(item, payload=mangle(item.payload, draft.variant, self.rng))]

    def _draft_invalid(self, draft: _Draft) -> list[StreamItem]:
        scenario = f"invalid/{draft.variant}"
        if draft.variant == "unknown-device":
            template = self.rng.choice(self.categories["on-demand-read"])
            unknown = self._unknown_device(template.device_type or DeviceType.ESME)
            originator = self._user_with(self.rng.choice(sorted(self.eligibility[template.srv])))
            return [self._request(draft.t, template, originator, [unknown], scenario=scenario)]
        if draft.variant == "unregistered-supplier":
            return [self._unregistered_supplier(draft.t, scenario)]
        if draft.variant == "wrong-device-type":
            return [self._wrong_device_type(draft.t, scenario)]
        template = self.rng.choice(self.restricted)
        assert template.device_type is not None
        device = self._pick_device(template.device_type)
        eligible = self.eligibility[template.srv]
        outsiders = [user for user, roles in self.index.roles.items() if not roles & eligible]
        return [self._request(draft.t, template, self.rng.choice(outsiders), [device], scenario=scenario)]

    def _unregistered_supplier(self, t: float, scenario: str) -> PublishItem:
        """An eligible supplier that is not registered for the device (DUIS E4): a meter it does not serve."""
        templates = [
            template
            for name in ("on-demand-read", "tariff", "other")
            for template in self.categories[name]
            if template.device_type is not None and self.table.srvs[template.srv].device_relationship
        ]
        while True:
            template = self.rng.choice(templates)
            assert template.device_type is not None
            device = self._pick_device(template.device_type)
            parties = device_parties(self.index.rows[device])
            eligible = self.eligibility[template.srv]
            strangers = [
                user
                for user, roles in self.index.roles.items()
                if roles <= _SUPPLIER_ROLES
                and roles & eligible
                and not any(parties.registered(user, role) for role in roles)
            ]
            if strangers:
                return self._request(t, template, self.rng.choice(strangers), [device], scenario=scenario)

    def _wrong_device_type(self, t: float, scenario: str) -> PublishItem:
        """A device SRV addressed to a device type it cannot address (DUIS E11), by a user registered
        for that device: a consumption read of a comms hub, a supply command to a GSME's GPF..."""
        options = [
            (template, device_type)
            for name in ("on-demand-read", "tariff", "other")
            for template in self.categories[name]
            if template.command_variant != 8
            for device_type in sorted(DeviceType)
            if device_type not in self.table.srvs[template.srv].device_types
            and self.index.commissioned.get(device_type)
        ]
        while True:
            template, device_type = self.rng.choice(options)
            device = self.rng.choice(self.index.commissioned[device_type])
            parties = device_parties(self.index.rows[device])
            eligible = self.eligibility[template.srv]
            users = [
                user
                for user, roles in self.index.roles.items()
                if any(parties.registered(user, role) for role in roles & eligible)
            ]
            if users:
                return self._request(t, template, self.rng.choice(users), [device], scenario=scenario)

    def _unknown_device(self, device_type: DeviceType) -> Eui:
        while True:
            raw = f"00DBFF{self.rng.getrandbits(32):08X}{DEVICE_SUFFIX[device_type]:02X}"
            eui = Eui("-".join(raw[i : i + 2] for i in range(0, 16, 2)))
            if eui not in self.index.rows:
                return eui

    def _flagged(self, device: Eui) -> bool:
        return device in self.flagged[self.index.rows[device].device_type]

    def _flag(self, device: Eui, *, set_flag: bool) -> None:
        pool = self.flagged[self.index.rows[device].device_type]
        if set_flag:
            pool.add(device)
        else:
            pool.discard(device)

    def _device(self, draft: _Draft) -> Eui:
        assert draft.device is not None
        return draft.device

    def _responsible(self, device: Eui) -> Eui:
        """The responsible supplier now; for a device that has none (a CHF), its import supplier."""
        row = self.index.rows[device]
        supplier = responsible_supplier(row) or row.import_supplier
        assert supplier is not None
        return supplier


_BOMB = (
    b'<!DOCTYPE sr:Request [<!ENTITY a "aaaaaaaaaa">'
    + b"".join(
        b"<!ENTITY " + bytes([ord("a") + n]) + b' "' + (b"&" + bytes([ord("a") + n - 1]) + b";") * 10 + b'">'
        for n in range(1, 9)
    )
    + b"]>"
)
_EXTERNAL = b'<!DOCTYPE sr:Request [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'


def mangle(payload: bytes, kind: str, rng: random.Random) -> bytes:
    """Turn a valid request into one kind of bad input (MALFORMED_KINDS)."""
    declaration_end = payload.index(b"?>") + 2 if payload.startswith(b"<?xml") else 0
    head, tail = payload[:declaration_end], payload[declaration_end:]
    if kind == "truncated":
        return payload[: rng.randrange(len(payload) // 4, 3 * len(payload) // 4)]
    if kind == "wrong-namespace":
        return payload.replace(_NAMESPACE, b"http://www.example.invalid/NotTheServiceUserGateway")
    if kind == "entity-bomb":
        return head + b"\n" + _BOMB + tail.replace(b"<sr:Body>", b"<sr:Body>&i;", 1)
    if kind == "external-entity":
        return head + b"\n" + _EXTERNAL + tail.replace(b"<sr:Body>", b"<sr:Body>&xxe;", 1)
    if kind == "random-bytes":
        return rng.randbytes(rng.randrange(1, 600))
    if kind == "unknown-srv":
        raw = re.sub(rb"(<sr:ServiceReferenceVariant>)[^<]*", rb"\g<1>99.9.9", payload, count=1)
        return re.sub(rb"(<sr:ServiceReference>)[^<]*", rb"\g<1>99.9", raw, count=1)
    raise ValueError(f"unknown malformed kind {kind!r}")


# -- the generator ------------------------------------------------------------------------------


def generate_traffic(  # noqa: PLR0913 - the estate, the seed and size, and what to vary
    estate: Estate,
    seed: int,
    requests: int,
    mix: TrafficMix | None = None,
    *,
    dcc_eui: Eui = DCC_EUI,
    templates: Mapping[str, Template] | None = None,
) -> Traffic:
    """A deterministic stream of `requests` requests (plus inventory changes) over `estate`."""
    if requests < 0:
        raise ValueError("requests must not be negative")
    mix = mix or TrafficMix()
    rng = random.Random(f"mp169-traffic:{seed}")  # noqa: S311 - a simulation, not security
    index = _Index(estate)
    if not index.commissioned.get(DeviceType.ESME):
        raise ValueError("the estate has no Commissioned ESME to send traffic to")
    drafts, flag_devices = _plan(rng, index, mix, requests)
    walk = _Walk(
        rng=rng,
        index=index,
        templates=templates or load_templates(),
        eligibility=srv_eligibility(),
        mix=mix,
        dcc_eui=dcc_eui,
    )
    # Stable sort: drafts planned at the same instant keep their planning order.
    items = [item for draft in sorted(drafts, key=lambda d: d.t) for item in walk.render(draft)]
    return Traffic(tuple(items), tuple(flag_devices))
