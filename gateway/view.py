"""RoutingView: the inventory, users and flags in memory, for routing decisions without I/O.

Built from the store at start (`await RoutingView.load(store)`), then kept current in place: the
router sets and clears flags write-through as flag Service Requests commit, and `refresh(store)`
applies inventory and user upserts made since (by `mp169 inventory import` in another process).

Memory, for a million devices: no object per device. Devices live in an open-addressing hash table
of four flat arrays indexed by slot: the EUI as a 64-bit integer, the number of the device's
profile, its comms hub's EUI as an integer, and a premises link (for a comms hub, the first device
joined to it; for any other device, the next device joined to the same hub; 0 ends the chain), so the
devices of a premises are found without an index object per premises. A profile is everything else
routing needs (device type, SMETS generation, status, suppliers, distributor, transporter, tariff,
WAN); devices share it (a simulated estate of a million devices has about 22,000). Flags are a dict
from integer to the time the flag was set. The MPxN is not held: read it from the store
(`FlagStore.get_device`).
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import TYPE_CHECKING, NamedTuple, Self, TypeAlias

from rules.decide import DeviceFacts
from rules.domain import (
    DeviceParties,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    Role,
    Tariff,
    device_parties,
    eui_to_int,
    int_to_eui,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from datetime import datetime

    from gateway.store import FlagStore
    from rules.domain import UserRecord

_U64 = 2**64 - 1
_FIBONACCI = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads EUIs that differ in a few bits only
_MIN_BITS = 10
_GPF = DeviceType.GPF


class _Profile(NamedTuple):
    """What routing needs about a device, apart from its identity: shared by every device alike.

    A tuple, so that it is also its own key in the profile dict (a plain tuple of the same fields
    finds it): one object per profile."""

    device_type: DeviceType
    smets: int
    status: DeviceStatus
    import_supplier: Eui | None
    export_supplier: Eui | None
    gas_supplier: Eui | None
    tariff: Tariff
    wan: bool
    network_operator: Eui | None
    gas_transporter: Eui | None


_ProfileKey = tuple[
    DeviceType, int, DeviceStatus, Eui | None, Eui | None, Eui | None, Tariff, bool, Eui | None, Eui | None
]
"""_Profile's fields as a plain tuple: what finds a device's shared profile (hashed in C, fast)."""


_FactsParts = tuple[DeviceType, int, DeviceStatus, DeviceParties]


_FactsConstructor: TypeAlias = (
    "Callable[[Eui, DeviceType, int, DeviceStatus, DeviceParties, Eui | None], DeviceFacts]"
)


def _facts_constructor() -> _FactsConstructor:
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
    set_id, set_type, set_smets, set_status, set_parties, set_flagged = (
        vars(DeviceFacts)[name].__set__ for name in names
    )

    def construct(  # noqa: PLR0913, PLR0917 - DeviceFacts' fields, positional as its constructor's
        eui: Eui,
        device_type: DeviceType,
        smets: int,
        status: DeviceStatus,
        parties: DeviceParties,
        flagged_meter: Eui | None,
    ) -> DeviceFacts:
        facts = new(DeviceFacts)
        set_id(facts, eui)
        set_type(facts, device_type)
        set_smets(facts, smets)
        set_status(facts, status)
        set_parties(facts, parties)
        set_flagged(facts, flagged_meter)
        return facts

    return construct


_FACTS_FIELDS = ("device_id", "device_type", "smets", "status", "parties", "flagged_meter")
_new_facts = _facts_constructor()


class _EuiTable:
    """Open addressing with linear probing over flat arrays; key 0 marks a free slot.

    The all-zero EUI is not a device (the inventory refuses it). Devices are never removed.
    """

    __slots__ = ("_count", "_keys", "_mask", "_shift", "hubs", "links", "profiles")

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
        # Premises chains by slot + 1 (0 ends a chain): slots are 32-bit, so 4 bytes a slot.
        self.links = array("I", bytes(4 * size))

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

    def key_at(self, slot: int) -> int:
        return self._keys[slot]

    def put(self, key: int, profile: int, hub: int) -> int:
        """Insert or update `key` (its premises link is kept); returns its slot. Only an insert can
        grow the table (and move slots)."""
        if key == 0:
            raise ValueError("the all-zero EUI is not a device")
        if 2 * (self._count + 1) > len(self._keys) and self.find(key) < 0:
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
        return slot

    def link(self, slot: int, hub_slot: int) -> None:
        """Put the device in `slot` at the head of the chain of the hub in `hub_slot`."""
        links = self.links
        links[slot] = links[hub_slot]
        links[hub_slot] = slot + 1

    def _grow(self) -> None:
        keys, profiles, hubs = self._keys, self.profiles, self.hubs
        self._allocate(64 - self._shift + 1)
        for key, profile, hub in zip(keys, profiles, hubs, strict=True):
            if key:
                self.put(key, profile, hub)
        # Slots moved: chain every device again to its hub, where the hub is held (the others wait).
        for slot, hub in enumerate(self.hubs):
            hub_slot = self.find(hub) if hub else -1
            if hub_slot >= 0:
                self.link(slot, hub_slot)


class RoutingView:
    """Device facts, roles and flags for the routing hot path: plain memory reads, no I/O."""

    def __init__(self, capacity: int = 0) -> None:
        self._devices = _EuiTable(capacity)
        self._profiles: list[_Profile] = []
        # Per profile number, what DeviceFacts takes from the profile: one index on the hot path.
        self._facts_parts: list[_FactsParts] = []
        self._profile_numbers: dict[_ProfileKey, int] = {}
        self._parties: dict[DeviceParties, DeviceParties] = {}
        self._user_ids: dict[Eui, Eui] = {}
        # Flagged devices and when the flag was set (None: not known, as for a flag set before this
        # process by a store that kept no time).
        self._flags: dict[int, datetime | None] = {}
        # Devices joined to a comms hub the view does not hold yet: linked when it arrives.
        self._waiting: dict[int, list[int]] = {}
        # Comms hub -> its flagged GSME: a GPF's data is that GSME's (one lookup on the hot path).
        self._flagged_gas_hubs: dict[int, int] = {}
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
        for device, state in (await store.load_flags()).items():
            view.set_flag(device, state.set_at)
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
                record.gas_transporter,
            )
            number = numbers.get(key)
            if number is None:
                number = self._add_profile(key, device_parties(record))
            device = eui_to_int(record.device_id)
            flagged = device in self._flags
            if flagged:
                self._unindex_gas_meter(device)
            self._place(device, number, 0 if record.comms_hub_id is None else eui_to_int(record.comms_hub_id))
            if flagged:
                self._index_gas_meter(device)

    def _place(self, device: int, number: int, hub: int) -> None:
        """Store the device's profile and hub, moving it to its hub's premises chain if that changed."""
        table = self._devices
        known = table.find(device)
        old_hub = table.hubs[known] if known >= 0 else 0
        if known >= 0 and old_hub == hub:
            table.put(device, number, hub)
            return
        if old_hub:
            self._unlink(device, old_hub)
        table.put(device, number, hub)
        if hub:
            self._link(device, hub)
        if known < 0:
            for member in self._waiting.pop(device, ()):
                self._link(member, device)

    def _index_gas_meter(self, device: int) -> None:
        slot = self._devices.find(device)
        hub = self._devices.hubs[slot] if slot >= 0 else 0
        if hub and self._type_of(device) is DeviceType.GSME:
            self._flagged_gas_hubs[hub] = device

    def _unindex_gas_meter(self, device: int) -> None:
        slot = self._devices.find(device)
        hub = self._devices.hubs[slot] if slot >= 0 else 0
        if hub and self._flagged_gas_hubs.get(hub) == device:
            del self._flagged_gas_hubs[hub]

    def _link(self, device: int, hub: int) -> None:
        """Put `device` at the head of `hub`'s premises chain (or wait for the hub to arrive)."""
        table = self._devices
        hub_slot = table.find(hub)
        if hub_slot < 0:
            self._waiting.setdefault(hub, []).append(device)
            return
        table.link(table.find(device), hub_slot)

    def _unlink(self, device: int, hub: int) -> None:
        table = self._devices
        waiting = self._waiting.get(hub)
        if waiting is not None:
            waiting.remove(device)
            return
        links = table.links
        previous = table.find(hub)
        target = table.find(device) + 1
        while previous >= 0 and target:
            following = links[previous]
            if following == target:
                links[previous] = links[target - 1]
                links[target - 1] = 0
                return
            previous = following - 1

    def _add_profile(self, key: _ProfileKey, parties: DeviceParties) -> int:
        device_type, smets, status, importer, exporter, gas, tariff, wan, operator, transporter = key
        # One string object per User ID, however many profiles name it.
        share = self._user_ids.setdefault
        importer, exporter, gas, operator, transporter = (
            None if user is None else share(user, user)
            for user in (importer, exporter, gas, operator, transporter)
        )
        profile = _Profile(
            device_type, smets, status, importer, exporter, gas, tariff, wan, operator, transporter
        )
        number = self._profile_numbers[profile] = len(self._profiles)
        self._profiles.append(profile)
        # Profiles that differ only in status, tariff or SMETS share one parties object.
        self._facts_parts.append((device_type, smets, status, self._parties.setdefault(parties, parties)))
        return number

    def apply_users(self, records: Iterable[UserRecord]) -> None:
        for record in records:
            self._roles[record.user_id] = record.roles

    def set_flag(self, eui: Eui, at: datetime | None = None) -> None:
        """Flag `eui`, set at `at` (kept from an earlier set of the same flag when None)."""
        key = eui_to_int(eui)
        if at is not None or key not in self._flags:
            self._flags[key] = at
        self._index_gas_meter(key)

    def clear_flag(self, eui: Eui) -> None:
        key = eui_to_int(eui)
        if key in self._flags:
            del self._flags[key]
            self._unindex_gas_meter(key)

    # -- reads (the hot path) ---------------------------------------------------------------------

    def _profile(self, key: int) -> tuple[int, _Profile] | None:
        slot = self._devices.find(key)
        if slot < 0:
            return None
        return slot, self._profiles[self._devices.profiles[slot]]

    def device_facts(self, eui: Eui) -> DeviceFacts | None:
        """What the routing decision needs about a device, or None if it is not in the inventory."""
        key = eui_to_int(eui)
        table = self._devices
        slot = table.find(key)
        if slot < 0:
            return None
        device_type, smets, status, parties = self._facts_parts[table.profiles[slot]]
        flagged: Eui | None = None
        if key in self._flags:
            flagged = eui
        elif device_type is _GPF:
            meter = self._flagged_gas_hubs.get(table.hubs[slot])
            flagged = None if meter is None else int_to_eui(meter)
        return _new_facts(eui, device_type, smets, status, parties, flagged)

    def _type_of(self, key: int) -> DeviceType | None:
        slot = self._devices.find(key)
        return None if slot < 0 else self._profiles[self._devices.profiles[slot]].device_type

    def _members(self, hub: int) -> Iterator[int]:
        table = self._devices
        slot = table.find(hub) if hub else -1
        while slot >= 0:
            slot = table.links[slot] - 1
            if slot >= 0:
                yield table.key_at(slot)

    def premises(self, eui: Eui) -> tuple[Eui, ...]:
        """The devices of `eui`'s premises: its comms hub first, then every device joined to that hub
        (newest first); only `eui` for a device joined to no hub the view holds; empty if unknown."""
        key = eui_to_int(eui)
        table = self._devices
        slot = table.find(key)
        if slot < 0:
            return ()
        hub = key if self._type_of(key) is DeviceType.CHF else table.hubs[slot]
        if not hub or table.find(hub) < 0:
            return (eui,)
        return (int_to_eui(hub), *(int_to_eui(member) for member in self._members(hub)))

    def flag_set_at(self, eui: Eui) -> datetime | None:
        """When the device's flag was set (None: not flagged, or the time is not known)."""
        return self._flags.get(eui_to_int(eui))

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
            gas_transporter=profile.gas_transporter,
        )

    @property
    def users(self) -> frozenset[Eui]:
        """The registered Users."""
        return frozenset(self._roles)

    def roles(self, user: Eui) -> frozenset[Role]:
        """The user's roles; empty for a user not in the registry."""
        return self._roles.get(user, frozenset())

    def is_flagged(self, eui: Eui) -> bool:
        return eui_to_int(eui) in self._flags

    # -- for tests, the benchmark and `mp169 flags show` -----------------------------------------

    def __len__(self) -> int:
        return len(self._devices)

    @property
    def flagged(self) -> frozenset[Eui]:
        return frozenset(int_to_eui(key) for key in self._flags)

    @property
    def profile_count(self) -> int:
        return len(self._profiles)
