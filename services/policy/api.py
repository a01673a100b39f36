"""HTTP routes of the policy service: settings, permissions (1:1 and group), the token
user's groups, blocks, reports, platform facts (users, relations, DMs, groups).

Users act only as themselves (the token's ``sub``); the ``/v1/platform`` routes take only
the platform's service identity (``scope: platform``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool

from services.policy.domain import (
    CallSettings,
    FactFromTheFuture,
    GroupFacts,
    GroupVerdict,
    NotRung,
    ReportCheck,
    Verdict,
    check_not_future,
    decide,
    decide_group,
)
from services.policy.reports import ReportRefused, Reports, TooManyReports
from services.policy.settings import PolicySettings
from services.policy.store import PolicyStore, Relation
from shared.auth import CurrentUser, PlatformPrincipal
from shared.bus import BusUnavailable
from shared.contracts import DenialDetail, MediaKind, RejectReason, ReportReason
from shared.ids import ID_PATTERN, CallId, UserId
from shared.service import app_state

log = logging.getLogger(__name__)

router = APIRouter()

T = TypeVar("T")


# --------------------------------------------------------------------------- dependencies


def _state(name: str, kind: type[T]) -> Any:
    """A dependency on an object the lifespan put on ``app.state`` (``async def``: a plain
    ``def`` one would cost every request a thread-pool hop)."""

    async def dependency(request: Request) -> T:
        return app_state(request, name, kind)

    return Depends(dependency)


Store = Annotated[PolicyStore, _state("policy_store", PolicyStore)]
Settings = Annotated[PolicySettings, _state("settings", PolicySettings)]
ReportDesk = Annotated[Reports, _state("policy_reports", Reports)]


# --------------------------------------------------------------------------- parameters


UserPath = Annotated[str, Path(pattern=ID_PATTERN, description="A user id")]
GroupPath = Annotated[str, Path(pattern=ID_PATTERN, description="A group DM conversation's id")]
OccurredAt = Annotated[
    AwareDatetime | None,
    Query(
        description="When the fact happened (UTC ISO-8601); default now. An older fact "
        "never overwrites a newer one."
    ),
]


async def _recorded(request: Request) -> bool:
    """A platform fact's route: PUT records the fact, DELETE its end (one handler for both)."""
    return request.method == "PUT"


Recorded = Annotated[bool, Depends(_recorded)]


# --------------------------------------------------------------------------- models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowFrom(_Strict):
    address_book: StrictBool = True
    following: StrictBool = True
    verified: StrictBool = False
    groups: StrictBool = Field(
        True,
        description="Members of my group conversations may ring me in a group call (once I "
        "posted there), even if no other allowance lets them. Answers list it only when "
        "false: absent means true, so the object of a user who never turned it off is the "
        "one clients knew before group calls.",
    )


class CallSettingsBody(_Strict):
    """Who may call me (CONTRACT.md ``CallSettings``)."""

    enabled: StrictBool = True
    allow_from: AllowFrom = Field(default_factory=AllowFrom)

    @classmethod
    def of(cls, settings: CallSettings) -> CallSettingsBody:
        return cls(
            enabled=settings.enabled,
            allow_from=AllowFrom(
                address_book=settings.allow_address_book,
                following=settings.allow_following,
                verified=settings.allow_verified,
                groups=settings.allow_groups,
            ),
        )

    def to_domain(self) -> CallSettings:
        return CallSettings(
            enabled=self.enabled,
            allow_address_book=self.allow_from.address_book,
            allow_following=self.allow_from.following,
            allow_verified=self.allow_from.verified,
            allow_groups=self.allow_from.groups,
        )

    def answer(self) -> JSONResponse:
        """The settings as answered: ``allow_from.groups`` only when it is off."""
        body = self.model_dump()
        if body["allow_from"]["groups"]:
            del body["allow_from"]["groups"]
        return JSONResponse(body)


class Permission(BaseModel):
    callee: str
    allowed: bool
    media: list[MediaKind]
    reason: RejectReason | None


class Block(BaseModel):
    user: str
    blocked: bool


class BlockList(BaseModel):
    blocked: list[str]


class ReportBody(_Strict):
    call_id: CallId
    reported_user: UserId
    reason: ReportReason


class Report(BaseModel):
    call_id: str
    reporter: str
    reported_user: str
    reason: ReportReason
    reported_at: datetime
    blocked: bool = True
    """The reported user can no longer call the reporter."""


class UserFactsBody(_Strict):
    premium: StrictBool
    verified: StrictBool
    occurred_at: AwareDatetime | None = None


class UserFactsOut(BaseModel):
    user_id: str
    premium: bool
    verified: bool
    updated_at: datetime | None
    applied: bool
    """False when a newer update was already recorded (this one was older)."""


class RelationOut(BaseModel):
    user_id: str
    other_id: str
    relation: Relation
    present: bool
    """Whether the relation holds after this request."""
    applied: bool
    """False when a newer change to this relation was already recorded."""


class DmBody(_Strict):
    sender: UserId
    recipient: UserId
    occurred_at: AwareDatetime | None = None


class DmOut(BaseModel):
    sender: str
    recipient: str
    first: bool
    """The first DM from sender to recipient policy knows of."""


class Decision(BaseModel):
    """The full decision for support: the caller-safe reason and the real one."""

    caller: str
    callee: str
    allowed: bool
    reason: RejectReason | None
    detail: DenialDetail | None


class GroupPermission(BaseModel):
    """May I start a call in this group, and whom would it ring (the group's phone icon)."""

    group: str
    allowed: bool
    media: list[MediaKind]
    reason: RejectReason | None = Field(
        description="null when allowed; otherwise about the token user only "
        "(caller_not_premium), never about a member"
    )
    would_ring: list[str] = Field(
        description="The members a call now would ring, sorted; never why the others not"
    )


class MyGroup(BaseModel):
    group: str
    members: list[str] = Field(description="Every current member (me included), sorted")


class GroupMemberOut(BaseModel):
    group_id: str
    user_id: str
    member: bool
    """Whether the user is a member after this request."""
    applied: bool
    """False when a newer fact about this membership was already recorded."""


class GroupMessageBody(_Strict):
    sender: UserId
    occurred_at: AwareDatetime | None = None


class GroupMessageOut(BaseModel):
    group_id: str
    sender: str
    first: bool
    """The first post of sender in the group policy knows of."""


class GroupOut(BaseModel):
    group_id: str
    members: list[str]
    posted: list[str] = Field(description="Who ever posted in the group (members or not)")


class NotRungOut(BaseModel):
    user: str
    why: NotRung


class GroupDecision(BaseModel):
    """For support: a group call's verdict now, with why each member is not rung."""

    group: str
    starter: str
    allowed: bool
    reason: RejectReason | None
    detail: DenialDetail | None
    ring: list[str]
    not_rung: list[NotRungOut]


# --------------------------------------------------------------------------- settings


@router.get("/v1/settings", response_model=CallSettingsBody, tags=["settings"])
async def get_settings(user: CurrentUser, store: Store) -> Response:
    """The token user's call settings (the defaults if never set)."""
    return CallSettingsBody.of(await store.get_settings(user)).answer()


@router.put("/v1/settings", response_model=CallSettingsBody, tags=["settings"])
async def put_settings(body: CallSettingsBody, user: CurrentUser, store: Store) -> Response:
    """Replace the token user's call settings; omitted fields take their defaults."""
    await store.put_settings(user, body.to_domain())
    return body.answer()


# --------------------------------------------------------------------------- permissions


def _note(verdict: Verdict, caller: str, callee: str) -> None:
    if verdict.detail is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("dmcall.policy.detail", verdict.detail.value)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("permission %s -> %s denied: %s", caller, callee, verdict.detail.value)


@router.get("/v1/permissions/{callee}", response_model=Permission, tags=["permissions"])
async def get_permission(
    callee: UserPath, user: CurrentUser, store: Store, settings: Settings
) -> Permission:
    """May the token user call ``callee`` now? Drives the phone icon in a DM conversation."""
    verdict = decide(await store.facts(user, callee), require_premium=settings.require_premium)
    _note(verdict, user, callee)
    return Permission(
        callee=callee, allowed=verdict.allowed, media=list(verdict.media), reason=verdict.reason
    )


def _decide_group(facts: GroupFacts, settings: PolicySettings) -> GroupVerdict:
    return decide_group(
        facts,
        require_premium=settings.require_premium,
        max_participants=settings.group_call_max_participants,
    )


@router.get(
    "/v1/permissions/groups/{group_id}",
    response_model=GroupPermission,
    tags=["permissions"],
    responses={404: {"description": "No such group of mine (I am not a member)"}},
)
async def get_group_permission(
    group_id: GroupPath, user: CurrentUser, store: Store, settings: Settings
) -> GroupPermission:
    """May the token user start a call in the group now, and whom would it ring? Drives
    the phone icon of a group conversation. One Redis round trip for the whole group."""
    facts = await store.group_facts(group_id, user)
    if not facts.starter_member:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such group of yours")
    verdict = _decide_group(facts, settings)
    if verdict.not_rung and log.isEnabledFor(logging.DEBUG):
        log.debug("group %s by %s: not rung %s", group_id, user, verdict.not_rung)
    return GroupPermission(
        group=group_id,
        allowed=verdict.allowed,
        media=list(verdict.media),
        reason=verdict.reason,
        would_ring=sorted(verdict.ring),
    )


# --------------------------------------------------------------------------- groups


@router.get("/v1/groups", response_model=list[MyGroup], tags=["groups"])
async def list_groups(user: CurrentUser, store: Store) -> list[MyGroup]:
    """The group conversations the token user is a member of, with their members."""
    return [
        MyGroup(group=group_id, members=members)
        for group_id, members in await store.groups_with_members(user)
    ]


# --------------------------------------------------------------------------- blocks


@router.get("/v1/blocks", response_model=BlockList, tags=["blocks"])
async def list_blocks(user: CurrentUser, store: Store) -> BlockList:
    """The users the token user blocked from calling them (here, not on the platform)."""
    return BlockList(blocked=await store.call_blocks(user))


@router.put("/v1/blocks/{other}", response_model=Block, tags=["blocks"])
async def block(other: UserPath, user: CurrentUser, store: Store) -> Block:
    """Block calls from ``other`` to the token user. Idempotent."""
    if other == user:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "you cannot block yourself")
    await store.block_calls(user, other)
    return Block(user=other, blocked=True)


@router.delete("/v1/blocks/{other}", response_model=Block, tags=["blocks"])
async def unblock(other: UserPath, user: CurrentUser, store: Store) -> Block:
    """Allow calls from ``other`` again (platform blocks still apply). Idempotent."""
    await store.unblock_calls(user, other)
    return Block(user=other, blocked=False)


# --------------------------------------------------------------------------- reports


REPORT_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "This call was already reported by this user: the first report"},
    403: {"description": "You are a party of the call, but the reported user is not the other"},
    404: {
        "description": "No call of yours with this id: none policy authorized (a made-up "
        "id, a call it rejected, one not judged yet), or you are no party of it"
    },
    422: {"description": "Invalid body, or you reported yourself"},
    429: {
        "description": "More than POLICY_REPORTS_PER_HOUR new reports in the last hour; "
        "see Retry-After and retry_after_s"
    },
    503: {"description": "Recorded and blocked, but the broker is down: retry the same report"},
}


@router.post(
    "/v1/reports",
    response_model=Report,
    status_code=status.HTTP_201_CREATED,
    tags=["reports"],
    responses=REPORT_ANSWERS,
)
async def report_call(
    body: ReportBody, user: CurrentUser, reports: ReportDesk, response: Response
) -> Report:
    """Report a call: trust and safety get ``call_reported``, and the reported user can no
    longer call the reporter. Only a party of a call policy authorized may report it, and
    only about the other party, however old the call. One report per reporter and call: a
    repeat returns the first (200). New reports are limited per reporter and hour."""
    if body.reported_user == user:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "you cannot report yourself")
    try:
        filed = await reports.file(user, body.call_id, body.reported_user, body.reason)
    except TooManyReports as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail={
                "message": "too many reports; try again later",
                "retry_after_s": exc.retry_after_s,
            },
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from exc
    except ReportRefused as exc:
        if exc.check is ReportCheck.NOT_THE_OTHER_PARTY:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, "you can report only the other party of this call"
            ) from exc
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no call of yours with this id") from exc
    except BusUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "broker unavailable; retry the report"
        ) from exc
    if not filed.new:
        response.status_code = status.HTTP_200_OK
    report = filed.report
    return Report(
        **report.model_dump(include={"call_id", "reporter", "reported_user", "reason"}),
        reported_at=report.occurred_at,
    )


# --------------------------------------------------------------------------- platform


def _when(at: datetime | None, settings: PolicySettings) -> datetime:
    if at is None:
        return datetime.now(UTC)
    try:
        check_not_future(at, now=datetime.now(UTC), max_skew_s=settings.max_clock_skew_s)
    except FactFromTheFuture as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return at.astimezone(UTC)


@router.put("/v1/platform/users/{user_id}", response_model=UserFactsOut, tags=["platform"])
async def put_user(
    user_id: UserPath,
    body: UserFactsBody,
    platform: PlatformPrincipal,
    store: Store,
    settings: Settings,
) -> UserFactsOut:
    """The user's subscription and verification, as of ``occurred_at`` (default now)."""
    applied = await store.update_user(
        user_id, premium=body.premium, verified=body.verified, at=_when(body.occurred_at, settings)
    )
    return await _user_facts(store, user_id, applied=applied)


@router.get("/v1/platform/users/{user_id}", response_model=UserFactsOut, tags=["platform"])
async def get_user(user_id: UserPath, platform: PlatformPrincipal, store: Store) -> UserFactsOut:
    """What policy knows of the user's subscription and verification."""
    return await _user_facts(store, user_id)


async def _user_facts(store: PolicyStore, user_id: str, *, applied: bool = True) -> UserFactsOut:
    facts = await store.get_user(user_id)
    return UserFactsOut(
        user_id=user_id,
        premium=facts.premium,
        verified=facts.verified,
        updated_at=facts.updated_at,
        applied=applied,
    )


def _relation_routes(relation: Relation, meaning: str) -> None:
    path = f"/v1/platform/users/{{user_id}}/{relation.value}/{{other_id}}"

    async def change_relation(
        present: Recorded,
        user_id: UserPath,
        other_id: UserPath,
        platform: PlatformPrincipal,
        store: Store,
        settings: Settings,
        occurred_at: OccurredAt = None,
    ) -> RelationOut:
        change = await store.set_relation(
            relation, user_id, other_id, present=present, at=_when(occurred_at, settings)
        )
        return RelationOut(
            user_id=user_id,
            other_id=other_id,
            relation=relation,
            present=change.present,
            applied=change.applied,
        )

    async def get_relation(
        user_id: UserPath, other_id: UserPath, platform: PlatformPrincipal, store: Store
    ) -> RelationOut:
        present = await store.has_relation(relation, user_id, other_id)
        return RelationOut(
            user_id=user_id, other_id=other_id, relation=relation, present=present, applied=True
        )

    for endpoint, method, summary in (
        (change_relation, "PUT", f"Record: {meaning}"),
        (change_relation, "DELETE", f"Record: no longer {meaning}"),
        (get_relation, "GET", f"Is {meaning}?"),
    ):
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            summary=summary,
            response_model=RelationOut,
            tags=["platform"],
            name=f"{method.lower()}_{relation.value}",
        )


_relation_routes(Relation.FOLLOWING, "user_id follows other_id")
_relation_routes(Relation.CONTACTS, "other_id is in user_id's address book")
_relation_routes(Relation.BLOCKS, "user_id blocks other_id")


@router.post("/v1/platform/dms", response_model=DmOut, tags=["platform"])
async def post_dm(body: DmBody, platform: PlatformPrincipal, store: Store) -> DmOut:
    """A DM was sent from ``sender`` to ``recipient`` (so recipient may now call sender)."""
    first = await store.record_dm(body.sender, body.recipient)
    return DmOut(sender=body.sender, recipient=body.recipient, first=first)


_MEMBER = "/v1/platform/groups/{group_id}/members/{user_id}"


@router.put(_MEMBER, response_model=GroupMemberOut, tags=["platform"], name="put_group_member")
@router.delete(
    _MEMBER, response_model=GroupMemberOut, tags=["platform"], name="delete_group_member"
)
async def change_group_member(
    present: Recorded,
    group_id: GroupPath,
    user_id: UserPath,
    platform: PlatformPrincipal,
    store: Store,
    settings: Settings,
    occurred_at: OccurredAt = None,
) -> GroupMemberOut:
    """Record: user_id is a member of the group conversation (PUT), or no longer (DELETE),
    as of ``occurred_at``."""
    change = await store.set_group_member(
        group_id, user_id, present=present, at=_when(occurred_at, settings)
    )
    return GroupMemberOut(
        group_id=group_id, user_id=user_id, member=change.present, applied=change.applied
    )


@router.post(
    "/v1/platform/groups/{group_id}/messages", response_model=GroupMessageOut, tags=["platform"]
)
async def post_group_message(
    group_id: GroupPath,
    body: GroupMessageBody,
    platform: PlatformPrincipal,
    store: Store,
    settings: Settings,
) -> GroupMessageOut:
    """``sender`` posted in the group (so a group call by another member may ring them)."""
    _when(body.occurred_at, settings)  # refuses one from the future, like every fact
    first = await store.record_group_post(group_id, body.sender)
    return GroupMessageOut(group_id=group_id, sender=body.sender, first=first)


@router.get("/v1/platform/groups/{group_id}", response_model=GroupOut, tags=["platform"])
async def get_group(group_id: GroupPath, platform: PlatformPrincipal, store: Store) -> GroupOut:
    """What policy knows of the group: its members and who ever posted in it."""
    return GroupOut(
        group_id=group_id,
        members=await store.groups.members(group_id),
        posted=await store.group_posters(group_id),
    )


@router.get(
    "/v1/platform/decisions/groups/{group_id}/{starter}",
    response_model=GroupDecision,
    tags=["platform"],
)
async def get_group_decision(
    group_id: GroupPath,
    starter: UserPath,
    platform: PlatformPrincipal,
    store: Store,
    settings: Settings,
) -> GroupDecision:
    """For support: a group call by ``starter`` now — its verdict, whom it would ring, and
    why each other member would not be rung."""
    verdict = _decide_group(await store.group_facts(group_id, starter), settings)
    return GroupDecision(
        group=group_id,
        starter=starter,
        allowed=verdict.allowed,
        reason=verdict.reason,
        detail=verdict.detail,
        ring=list(verdict.ring),
        not_rung=[NotRungOut(user=u, why=why) for u, why in verdict.not_rung],
    )


@router.get("/v1/platform/decisions/{caller}/{callee}", response_model=Decision, tags=["platform"])
async def get_decision(
    caller: UserPath,
    callee: UserPath,
    platform: PlatformPrincipal,
    store: Store,
    settings: Settings,
) -> Decision:
    """For support: whether caller may call callee now, with the real reason of a denial."""
    verdict = decide(await store.facts(caller, callee), require_premium=settings.require_premium)
    return Decision(
        caller=caller,
        callee=callee,
        allowed=verdict.allowed,
        reason=verdict.reason,
        detail=verdict.detail,
    )
