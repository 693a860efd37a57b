"""RoutingView: the inventory, users and flags in memory, for routing decisions without I/O.

Built from the store at start (`await RoutingView.load(store)`), then kept current in place: the
router sets and clears flags write-through as flag Service Requests commit, and `refresh(store)`
applies inventory and user upserts made since (by `mp169 inventory import` in another process).

Memory, for a million devices: no object per device. Devices live in an open-addressing hash table
of three flat arrays indexed by slot: the EUI as a 64-bit integer, the number of the device's
profile, and its comms hub's EUI as an integer. A profile is everything else routing needs (device
type, SMETS generation, status, suppliers, tariff, WAN, network operator); devices share it (a
simulated estate of a million devices has about 22,000). Flags are a set of integers. The MPxN is
not held: read it from the store (`FlagStore.get_device`).
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import TYPE_CHECKING, Self

from rules.decide import DeviceFacts
from rules.domain import (
    ELECTRICITY_DEVICES,
    GAS_DEVICES,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    Role,
    Tariff,
    eui_to_int,
    int_to_eui,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from gateway.store import FlagStore
    from rules.domain import UserRecord

_U64 = 2**64 - 1
_FIBONACCI = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads EUIs that differ in a few bits only
_MIN_BITS = 10


@dataclasses.dataclass(frozen=True, slots=True)
class _Profile:
    """What routing needs about a device, apart from its identity: shared by every device alike."""

    device_type: DeviceType
    smets: int
    status: DeviceStatus
    import_supplier: Eui | None
    export_supplier: Eui | None
    gas_supplier: Eui | None
    tariff: Tariff
    wan: bool
    network_operator: Eui | None

    @property
    def responsible_suppliers(self) -> tuple[Eui, ...]:
        suppliers: tuple[Eui | None, ...]
        if self.device_type in ELECTRICITY_DEVICES:
            suppliers = (self.import_supplier, self.export_supplier)
        elif self.device_type in GAS_DEVICES:
            suppliers = (self.gas_supplier,)
        else:  # a comms hub or in-home device: the suppliers its inventory entry names
            suppliers = (self.import_supplier, self.gas_supplier)
        return tuple(dict.fromkeys(supplier for supplier in suppliers if supplier is not None))


_ProfileKey = tuple[
    DeviceType, int, DeviceStatus, Eui | None, Eui | None, Eui | None, Tariff, bool, Eui | None
]
"""_Profile's fields as a tuple: the key that finds a device's shared profile (hashed in C, fast)."""


def _facts_constructor() -> Callable[[Eui, DeviceType, int, DeviceStatus, bool], DeviceFacts]:
    """DeviceFacts(...) at about half the cost, for the hot path.

    A frozen dataclass's __init__ sets each field through object.__setattr__, which is most of a
    lookup's time; writing the slots directly makes the same object. Only for the plain frozen slots
    dataclass of the contract (these fields, no __post_init__); anything else gets the real constructor.
    """
    names = tuple(field.name for field in dataclasses.fields(DeviceFacts))
    slots = set(getattr(DeviceFacts, "__slots__", ()))
    if names != _FACTS_FIELDS or slots != set(names) or hasattr(DeviceFacts, "__post_init__"):
        return DeviceFacts
    new = DeviceFacts.__new__
    set_id, set_type, set_smets, set_status, set_flagged = (vars(DeviceFacts)[name].__set__ for name in names)

    def construct(
        eui: Eui, device_type: DeviceType, smets: int, status: DeviceStatus, flagged: bool
    ) -> DeviceFacts:
        facts = new(DeviceFacts)
        set_id(facts, eui)
        set_type(facts, device_type)
        set_smets(facts, smets)
        set_status(facts, status)
        set_flagged(facts, flagged)
        return facts

    return construct


_FACTS_FIELDS = ("device_id", "device_type", "smets", "status", "flagged")
_new_facts = _facts_constructor()


class _EuiTable:
    """Open addressing with linear probing over flat arrays; key 0 marks a free slot.

    The all-zero EUI is not a device (the inventory refuses it). Devices are never removed.
    """

    __slots__ = ("_count", "_keys", "_mask", "_shift", "hubs", "profiles")

    def __init__(self, capacity: int = 0) -> None:
        # At most half full: probes stay short.
        self._allocate(max(_MIN_BITS, (2 * capacity - 1).bit_length()))

    def _allocate(self, bits: int) -> None:
        size = 1 << bits
        self._mask = size - 1
        self._shift = 64 - bits
        self._count = 0
        self._keys = array("Q", bytes(8 * size))
        self.profiles = array("I", bytes(4 * size))
        self.hubs = array("Q", bytes(8 * size))

    def __len__(self) -> int:
        return self._count

    def find(self, key: int) -> int:
        """The slot holding `key`, or -1."""
        keys = self._keys
        mask = self._mask
        slot = ((key * _FIBONACCI) & _U64) >> self._shift
        while True:
            found = keys[slot]
            if found == 0:
                return -1
            if found == key:
                return slot
            slot = (slot + 1) & mask

    def put(self, key: int, profile: int, hub: int) -> None:
        if key == 0:
            raise ValueError("the all-zero EUI is not a device")
        if 2 * (self._count + 1) > len(self._keys):
            self._grow()
        keys = self._keys
        mask = self._mask
        slot = ((key * _FIBONACCI) & _U64) >> self._shift
        while True:
            found = keys[slot]
            if found == key:
                break
            if found == 0:
                keys[slot] = key
                self._count += 1
                break
            slot = (slot + 1) & mask
        self.profiles[slot] = profile
        self.hubs[slot] = hub

    def _grow(self) -> None:
        keys, profiles, hubs = self._keys, self.profiles, self.hubs
        self._allocate(64 - self._shift + 1)
        for key, profile, hub in zip(keys, profiles, hubs, strict=True):
            if key:
                self.put(key, profile, hub)


class RoutingView:
    """Device facts, roles and flags for the routing hot path: plain memory reads, no I/O."""

    def __init__(self, capacity: int = 0) -> None:
        self._devices = _EuiTable(capacity)
        self._profiles: list[_Profile] = []
        # Per profile number, what DeviceFacts takes from the profile: one index on the hot path.
        self._facts_parts: list[tuple[DeviceType, int, DeviceStatus]] = []
        self._profile_numbers: dict[_ProfileKey, int] = {}
        self._user_ids: dict[Eui, Eui] = {}
        self._flags: set[int] = set()
        self._roles: dict[Eui, frozenset[Role]] = {}
        self._seq = 0

    @classmethod
    async def load(cls, store: FlagStore) -> Self:
        # The sequence number first: anything upserted while loading is fetched again by refresh.
        seq = await store.change_seq()
        # Sized once: growing a large table while loading would leave freed arrays in the heap.
        view = cls(capacity=await store.device_count())
        async for batch in store.load_devices():
            view.apply_devices(batch)
        view.apply_users(await store.load_users())
        for device in await store.load_flags():
            view.set_flag(device)
        view._seq = seq
        return view

    async def refresh(self, store: FlagStore) -> int:
        """Apply inventory and user upserts committed since the last load or refresh; returns how many."""
        latest = await store.change_seq()
        if latest == self._seq:
            return 0
        # Rows stamped after `latest` may come too; applying them again next time is harmless.
        applied = 0
        async for batch in store.devices_changed_since(self._seq):
            self.apply_devices(batch)
            applied += len(batch)
        users = await store.users_changed_since(self._seq)
        self.apply_users(users)
        self._seq = latest
        return applied + len(users)

    # -- updates ----------------------------------------------------------------------------------

    def apply_devices(self, records: Iterable[DeviceRecord]) -> None:
        """Insert or update devices (an update keeps the device's flag: flags follow the device)."""
        numbers = self._profile_numbers
        put = self._devices.put
        for record in records:
            key = (
                record.device_type,
                record.smets,
                record.status,
                record.import_supplier,
                record.export_supplier,
                record.gas_supplier,
                record.tariff,
                record.wan,
                record.network_operator,
            )
            number = numbers.get(key)
            if number is None:
                number = self._add_profile(key)
            hub = 0 if record.comms_hub_id is None else eui_to_int(record.comms_hub_id)
            put(eui_to_int(record.device_id), number, hub)

    def _add_profile(self, key: _ProfileKey) -> int:
        device_type, smets, status, importer, exporter, gas, tariff, wan, operator = key
        # One string object per User ID, however many profiles name it.
        share = self._user_ids.setdefault
        importer, exporter, gas, operator = (
            None if user is None else share(user, user) for user in (importer, exporter, gas, operator)
        )
        shared = (device_type, smets, status, importer, exporter, gas, tariff, wan, operator)
        number = self._profile_numbers[shared] = len(self._profiles)
        self._profiles.append(_Profile(*shared))
        self._facts_parts.append((device_type, smets, status))
        return number

    def apply_users(self, records: Iterable[UserRecord]) -> None:
        for record in records:
            self._roles[record.user_id] = record.roles

    def set_flag(self, eui: Eui) -> None:
        self._flags.add(eui_to_int(eui))

    def clear_flag(self, eui: Eui) -> None:
        self._flags.discard(eui_to_int(eui))

    # -- reads (the hot path) ---------------------------------------------------------------------

    def _profile(self, key: int) -> tuple[int, _Profile] | None:
        slot = self._devices.find(key)
        if slot < 0:
            return None
        return slot, self._profiles[self._devices.profiles[slot]]

    def device_facts(self, eui: Eui) -> DeviceFacts | None:
        """What the routing decision needs about a device, or None if it is not in the inventory."""
        key = eui_to_int(eui)
        slot = self._devices.find(key)
        if slot < 0:
            return None
        device_type, smets, status = self._facts_parts[self._devices.profiles[slot]]
        return _new_facts(eui, device_type, smets, status, key in self._flags)

    def device(self, eui: Eui) -> DeviceRecord | None:
        """The device's inventory entry as the view holds it: `mpxn` is always None (not held here)."""
        found = self._profile(eui_to_int(eui))
        if found is None:
            return None
        slot, profile = found
        hub = self._devices.hubs[slot]
        return DeviceRecord(
            device_id=eui,
            device_type=profile.device_type,
            smets=profile.smets,
            status=profile.status,
            comms_hub_id=int_to_eui(hub) if hub else None,
            mpxn=None,
            import_supplier=profile.import_supplier,
            export_supplier=profile.export_supplier,
            gas_supplier=profile.gas_supplier,
            tariff=profile.tariff,
            wan=profile.wan,
            network_operator=profile.network_operator,
        )

    def roles(self, user: Eui) -> frozenset[Role]:
        """The user's roles; empty for a user not in the registry."""
        return self._roles.get(user, frozenset())

    def is_flagged(self, eui: Eui) -> bool:
        return eui_to_int(eui) in self._flags

    def responsible_suppliers(self, eui: Eui) -> tuple[Eui, ...]:
        """Who receives the device's alerts: import and export supplier of an ESME, gas supplier of a
        GSME or GPF, the named suppliers of any other device; empty for an unknown device."""
        found = self._profile(eui_to_int(eui))
        return () if found is None else found[1].responsible_suppliers

    def network_operator(self, eui: Eui) -> Eui | None:
        """The electricity distributor that receives the device's power-outage alerts, if any."""
        found = self._profile(eui_to_int(eui))
        return None if found is None else found[1].network_operator

    # -- for tests, the benchmark and `mp169 flags show` -----------------------------------------

    def __len__(self) -> int:
        return len(self._devices)

    @property
    def flagged(self) -> frozenset[Eui]:
        return frozenset(int_to_eui(key) for key in self._flags)

    @property
    def profile_count(self) -> int:
        return len(self._profiles)
