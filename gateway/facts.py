"""What the routing decision is told about a message: facts gathered from the routing view.

Pure reads of the in-memory view (no I/O): the router calls these to build the inputs of
`rules.decide`, to list the devices of an 8.2 Read Inventory answer, and to find who receives a
device's alert. DCC access control and MP169 coverage grow here as the inventory relations do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.responses import InventoryEntry
from rules.decide import RequestFacts

if TYPE_CHECKING:
    from gateway.view import RoutingView
    from rules.decide import DeviceFacts, MessageDecision
    from rules.domain import Eui, ServiceRequest


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


def inventory_entries(request: ServiceRequest, view: RoutingView) -> list[InventoryEntry]:
    """The devices an 8.2 Read Inventory answer lists, with their MP169 flag."""
    entries = []
    for eui in request.concerned_devices:
        record = view.device(eui)
        if record is None:
            continue
        entries.append(
            InventoryEntry(
                device_id=eui,
                device_type=record.device_type.value,
                status=record.status.value,
                smets=record.smets,
                reduced_communications=view.is_flagged(eui),
                flag_set_at=None,
            )
        )
    return entries


def alert_recipients(device: Eui, verdict: MessageDecision, view: RoutingView) -> tuple[Eui, ...]:
    """The users a delivered alert from `device` goes to: its responsible suppliers, and its network
    operator where the alert concerns the network (power outage)."""
    recipients = list(view.responsible_suppliers(device))
    operator = view.network_operator(device)
    if verdict.notify_network_operator and operator is not None:
        recipients.append(operator)
    return tuple(dict.fromkeys(recipients))
