"""What the routing decision is told about a message: facts gathered from the routing view.

Pure reads of the in-memory view (no I/O): the router calls these to build the inputs of
`rules.decide`, to list the devices of an 8.2 Read Inventory answer, and to find who receives a
device's alert.

Relations come from the inventory (docs/rules.md, "Whose data, and who may see it"): a device's comms
hub (`comms_hub_id`) makes its premises; its registered parties are the suppliers, electricity
distributor (`network_operator`) and gas transporter (`gas_transporter`) its row names, by fuel
(`rules.domain.device_parties`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.responses import InventoryEntry
from rules.decide import RequestFacts
from rules.domain import ROLES_WITHOUT_DEVICE_RELATIONSHIP

if TYPE_CHECKING:
    from gateway.view import RoutingView
    from rules.decide import DeviceFacts, MessageDecision
    from rules.domain import DeviceMessage, DeviceParties, Eui, Role, ServiceRequest


def request_facts(request: ServiceRequest, view: RoutingView, dcc_eui: Eui) -> RequestFacts:
    """The requester's roles and the facts of every device the request concerns (absent: unknown)."""
    devices: dict[Eui, DeviceFacts] = {}
    for eui in request.concerned_devices:
        facts = view.device_facts(eui)
        if facts is not None:
            devices[eui] = facts
    return RequestFacts(
        requester_roles=view.roles(request.request_id.originator), devices=devices, dcc_eui=dcc_eui
    )


def may_see_flag(user: Eui, roles: frozenset[Role], parties: DeviceParties) -> bool:
    """Whether an 8.2 answer shows `user` a device's MP169 flag: only to a user registered for the
    device (its import, export or gas supplier, distributor or transporter), never to an Other User,
    a Registered Supplier Agent or an unrelated user (the consumer's choice is personal data)."""
    return any(
        role not in ROLES_WITHOUT_DEVICE_RELATIONSHIP and parties.registered(user, role) for role in roles
    )


def inventory_entries(request: ServiceRequest, view: RoutingView) -> list[InventoryEntry]:
    """The devices an 8.2 Read Inventory answer lists: for each device the request names, its whole
    premises (comms hub, then every device joined to it), with the MP169 flag and the time it was set
    where the requester may see them (`may_see_flag`), else without the flag."""
    user = request.request_id.originator
    roles = view.roles(user)
    listed: dict[Eui, None] = {}
    for eui in request.concerned_devices:
        listed.update(dict.fromkeys(view.premises(eui)))
    entries = []
    for eui in listed:
        record = view.device(eui)
        facts = view.device_facts(eui)
        if record is None or facts is None:
            continue
        shown = may_see_flag(user, roles, facts.parties)
        set_at = view.flag_set_at(eui) if shown else None
        entries.append(
            InventoryEntry(
                device_id=eui,
                device_type=record.device_type.value,
                status=record.status.value,
                smets=record.smets,
                reduced_communications=view.is_flagged(eui) if shown else None,
                flag_set_at=None if set_at is None else set_at.isoformat(),
            )
        )
    return entries


def alert_recipients(
    device: Eui, alert: DeviceMessage, verdict: MessageDecision, view: RoutingView
) -> tuple[Eui, ...]:
    """The users a delivered alert from `device` goes to.

    An alert carrying a RequestID (a future-dated command's outcome, 8F66 / 8F67, or any other alert
    about a request) goes to that request's originator only, provided the RequestID targets `device`
    and names a registered user; otherwise nobody (the caller dead-letters it). An unsolicited alert
    goes to the device's registered suppliers by device type, as DUIS routes them: an ESME's import
    supplier, a GSME's or GPF's gas supplier, a comms hub's or in-home device's import and gas
    suppliers; and, where the alert concerns the network (`notify_network_operator`), to the
    electricity distributor of an electricity device or comms hub.
    """
    request_id = alert.request_id
    if request_id is not None:
        user = request_id.originator
        return (user,) if request_id.target == device and view.roles(user) else ()
    facts = view.device_facts(device)
    if facts is None:
        return ()
    parties = facts.parties
    recipients = [parties.import_supplier, parties.gas_supplier]
    if verdict.notify_network_operator:
        recipients.append(parties.electricity_distributor)
    return tuple(dict.fromkeys(user for user in recipients if user is not None))
