"""Prometheus metrics of the media node, read from the rooms when scraped.

The forwarding path only bumps plain integers; this collector turns them into metrics
at scrape time, so nothing on the per-packet path takes a metrics lock.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from services.media.delays import BUCKETS_S, SAMPLE_EVERY
from services.media.rooms import Rooms
from shared.contracts import PeerConnection


class MediaCollector(Collector):
    def __init__(self, rooms: Rooms) -> None:
        self._rooms = rooms

    def collect(self) -> Iterator[Metric]:
        rooms = self._rooms
        node = rooms.settings.node_id
        participants = [p for r in rooms.rooms.values() for p in r.participants.values()]
        yield _gauge(
            "dmcall_media_rooms", "Open rooms (calls) on this node", node, len(rooms.rooms)
        )
        yield _gauge(
            "dmcall_media_sessions", "Connected parties on this node", node, len(participants)
        )
        yield _gauge(
            "dmcall_media_capacity", "Rooms this node takes", node, rooms.settings.capacity
        )
        yield _gauge(
            "dmcall_media_draining",
            "1 once the node got SIGTERM (no new sessions; its calls are moving)",
            node,
            int(rooms.draining),
        )
        yield _gauge(
            "dmcall_media_parties_reconnecting",
            "Parties whose packets stopped (within the rejoin grace)",
            node,
            sum(
                1
                for r in rooms.rooms.values()
                for link in r.links.values()
                if link.connection is PeerConnection.RECONNECTING
            ),
        )
        yield _gauge(
            "dmcall_media_bitrate_in_bps",
            "Bits per second received from all parties (last second)",
            node,
            sum(p.bitrate_in_bps for p in participants),
        )
        yield _gauge(
            "dmcall_media_bitrate_out_bps",
            "Bits per second forwarded to all parties (last second)",
            node,
            sum(p.bitrate_out_bps for p in participants),
        )
        remembered = GaugeMetricFamily(
            "dmcall_media_remembered_calls",
            "Calls this node remembers: granted (a media token was presented) and ended "
            "(refused new sessions); each is forgotten after MEDIA_ENDED_CALL_MEMORY_S",
            labels=["node_id", "kind"],
        )
        remembered.add_metric([node, "granted"], len(rooms.granted))
        remembered.add_metric([node, "ended"], len(rooms.ended))
        remembered.add_metric([node, "unseen_ended"], len(rooms.unseen_ended))
        yield remembered
        dropped = CounterMetricFamily(
            "dmcall_media_ice_candidates_dropped",
            "ICE candidates dropped from offers: outside the allowed networks, mDNS names, "
            "or past MEDIA_ICE_MAX_CANDIDATES",
            labels=["node_id"],
        )
        dropped.add_metric([node], rooms.candidates_dropped)
        yield dropped
        forwarded = CounterMetricFamily(
            "dmcall_media_forwarded_packets",
            "RTP packets forwarded since start",
            labels=["node_id"],
        )
        forwarded.add_metric([node], rooms.delays.forwarded)
        yield forwarded
        refused = CounterMetricFamily(
            "dmcall_media_sessions_refused", "Sessions refused, by reason", labels=["reason"]
        )
        for reason, count in rooms.refused.items():
            refused.add_metric([reason.value], count)
        yield refused
        failures = CounterMetricFamily(
            "dmcall_media_failures",
            "Calls whose media failed on this node (call_media_failed), by reason",
            labels=["reason"],
        )
        for failure, count in rooms.failures.items():
            failures.add_metric([failure.value], count)
        yield failures
        events = CounterMetricFamily(
            "dmcall_media_events_published", "Media events published", labels=["event_type"]
        )
        for event_type, count in rooms.events_published.items():
            events.add_metric([event_type], count)
        yield events
        delays = rooms.delays
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(BUCKETS_S, delays.bucket_counts, strict=False):
            running += count
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", delays.count))
        histogram = HistogramMetricFamily(
            "dmcall_media_forward_delay_seconds",
            "From a packet's arrival to the send of its forwarded copy, inside the SFU "
            f"(one copy in {SAMPLE_EVERY} is timed)",
            labels=["node_id"],
        )
        histogram.add_metric([node], buckets, delays.total_s)
        yield histogram


def _gauge(name: str, documentation: str, node: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["node_id"])
    gauge.add_metric([node], value)
    return gauge


def install(rooms: Rooms) -> MediaCollector:
    collector = MediaCollector(rooms)
    REGISTRY.register(collector)
    return collector


def uninstall(collector: MediaCollector) -> None:
    REGISTRY.unregister(collector)
