"""Reports (``POST /v1/reports``): a party of a call policy authorized reports another.

Filing a report, in this order: a repeat of a report already filed (same reporter, same
call) is the first report again, whatever has changed since; a new one counts to the
reporter's hourly limit (:class:`TooManyReports`), then must come from a party of the
call, about another (:func:`~services.policy.domain.check_report`,
:class:`ReportRefused`). It is recorded once (a concurrent twin finds the first), the
reported user is blocked from calling the reporter, and ``call_reported`` is published
unless it already was; a broker that does not answer raises ``BusUnavailable`` after the
report is recorded and the block made, and filing the same report again publishes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.policy.domain import ReportCheck, check_report
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore
from shared.bus import Bus
from shared.contracts import CallReported, ReportReason


class TooManyReports(Exception):
    """The reporter filed ``POLICY_REPORTS_PER_HOUR`` new reports in the last hour."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ReportRefused(Exception):
    """Not a report a party may file about this call: ``check`` says why."""

    def __init__(self, check: ReportCheck) -> None:
        super().__init__(check.value)
        self.check = check


@dataclass(frozen=True, slots=True)
class Filed:
    report: CallReported
    """The report as first filed."""
    new: bool
    """This request filed it; False for a repeat (or a concurrent twin that came first)."""


class Reports:
    def __init__(self, store: PolicyStore, bus: Bus, settings: PolicySettings) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings

    async def file(
        self, reporter: str, call_id: str, reported_user: str, reason: ReportReason
    ) -> Filed:
        store = self.store
        stored = await store.get_report(reporter, call_id)
        new = stored is None
        if stored is None:
            await self._check_reportable(reporter, call_id, reported_user)
            event = CallReported(
                call_id=call_id, reporter=reporter, reported_user=reported_user, reason=reason
            )
            stored = await store.record_report(event, reporter, call_id)
            new = stored.event_id == event.event_id  # else the same report, concurrently, won
        assert isinstance(stored, CallReported)
        await store.block_calls(reporter, stored.reported_user)
        if not await store.report_published(reporter, call_id):
            await self.bus.publish(stored)  # BusUnavailable: recorded and blocked; retry
            await store.mark_report_published(stored, reporter, call_id)
        return Filed(stored, new)

    async def _check_reportable(self, reporter: str, call_id: str, reported_user: str) -> None:
        """Every new report counts to the limit, refused or not."""
        slot = await self.store.take_report_slot(reporter, self.settings.reports_per_hour)
        if not slot.allowed:
            raise TooManyReports(max(1, -(-slot.retry_after_ms // 1000)))
        check = check_report(await self.store.call_parties(call_id), reporter, reported_user)
        if check is not ReportCheck.ALLOWED:
            raise ReportRefused(check)
