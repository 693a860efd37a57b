"""The MQTT topic layout: where users send Service Requests and get answers, and where devices are.

- `dsp/in/<user EUI>`: a user's Service Requests (the broker ACL lets only that user publish there);
- `dsp/out/<user EUI>`: DUIS responses and alerts for that user;
- `dsp/device/<device EUI>/cmd` and `/up`: commands to a device, and its responses and alerts;
- `dsp/deadletter`: what could not be handled, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import TopicSettings
    from rules.domain import Eui


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic prefixes (from settings.topics) and the topics built from them."""

    inbound: str = "dsp/in"
    outbound: str = "dsp/out"
    devices: str = "dsp/device"
    deadletter: str = "dsp/deadletter"

    def out(self, user: Eui) -> str:
        return f"{self.outbound}/{user}"

    @classmethod
    def from_settings(cls, section: TopicSettings) -> Topics:
        return cls(section.inbound, section.outbound, section.devices, section.deadletter)

    def command(self, device: Eui) -> str:
        return f"{self.devices}/{device}/cmd"

    def subscriptions(self, shared_group: str = "") -> list[str]:
        return self.request_subscriptions(shared_group) + self.device_subscriptions(shared_group)

    def request_subscriptions(self, shared_group: str = "") -> list[str]:
        return _shared([f"{self.inbound}/+"], shared_group)

    def device_subscriptions(self, shared_group: str = "") -> list[str]:
        return _shared([f"{self.devices}/+/up"], shared_group)


def _shared(filters: list[str], group: str) -> list[str]:
    return [f"$share/{group}/{topic_filter}" for topic_filter in filters] if group else filters
