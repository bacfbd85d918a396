"""relay.microsoft.transport.Dispatcher: the one place that chooses an attempt's transport."""

from __future__ import annotations

from relay.delivery.classify import Action
from relay.envelope import Envelope, Route
from relay.microsoft.transport import Dispatcher
from relay.microsoft.upstream import SessionPool, Submitter


async def test_a_route_whose_app_is_gone_fails_with_an_actionable_reason_and_sends_nothing() -> None:
    pool = SessionPool(local_hostname="relay.test", timeout=5, idle_close=60)
    asked: list[str] = []

    def connections(mailbox: str) -> int:
        asked.append(mailbox)
        return 3

    dispatcher = Dispatcher(Submitter(pool, {}, {}), connections)
    route = Route(app="removed", mailbox="relay@contoso.com", sender="relay@contoso.com")
    outcome = await dispatcher.submit(route, Envelope("relay@contoso.com", ("a@fabrikam.com",)), b"x")
    verdict = outcome.verdict
    assert (verdict.action, verdict.reason, verdict.code, verdict.enhanced) == (
        Action.FAILED, "route_unconfigured", 451, "4.3.5")
    assert "'removed'" in verdict.reply and "queue requeue" in verdict.hint
    assert asked == [] and pool.connections_made == 0
    assert dispatcher.graph_for("relay@contoso.com") is None
