"""Tokens: the real MSAL against the simulated Entra ID; single-flight, proactive refresh, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.config import settings_from_dict
from relay.errors import TokenError
from relay.microsoft.tokens import TokenProvider
from relay.testing.harness import relay_config
from relay.testing.m365 import SimulatedM365
from tests.fakeclock import FakeClock

START = 1_800_000_000.0


def provider(m365: SimulatedM365, tmp_path: Path, clock: FakeClock | None = None, **app: object) -> TokenProvider:
    config = relay_config(m365, tmp_path)
    config["apps"][0].update(app)
    settings = settings_from_dict(config)
    return TokenProvider(settings.apps[0], clock=clock or FakeClock(START), environ={})


async def test_fifty_concurrent_first_requests_make_one_token_request(m365: SimulatedM365, tmp_path: Path) -> None:
    p = provider(m365, tmp_path)
    tokens = await asyncio.gather(*(p.get() for _ in range(50)))
    assert len({t.value for t in tokens}) == 1
    assert m365.entra.token_requests == 1
    assert tokens[0].claims()["roles"] == ["SMTP.SendAsApp"]
    p.close()


async def test_refresh_ahead_of_expiry_without_making_anyone_wait(m365: SimulatedM365, tmp_path: Path) -> None:
    clock = FakeClock(START)
    p = provider(m365, tmp_path, clock)
    first = await p.get()
    assert first.refresh_at < first.expires_at - 60
    clock.set(first.refresh_at + 1)  # due for refresh, still valid
    again = await p.get()
    assert again.value == first.value, "the current token is handed out while the refresh runs"
    task = p._refresh_task
    assert task is not None
    await asyncio.wait_for(task, 30)
    fresh = await p.get()
    assert fresh.value != first.value
    assert m365.entra.token_requests == 2
    for _ in range(20):
        assert (await p.get()).value == fresh.value
    assert m365.entra.token_requests == 2, "one token request per token lifetime"
    p.close()


async def test_expired_token_is_never_used(m365: SimulatedM365, tmp_path: Path) -> None:
    clock = FakeClock(START)
    p = provider(m365, tmp_path, clock)
    first = await p.get()
    clock.set(first.expires_at - 1)
    second = await p.get()
    assert second.value != first.value
    p.close()


async def test_evict_fetches_a_new_token(m365: SimulatedM365, tmp_path: Path) -> None:
    p = provider(m365, tmp_path)
    first = await p.get()
    await p.evict(first)
    second = await p.get()
    assert second.value != first.value
    assert m365.entra.token_requests == 2
    p.close()


async def test_bad_secret_is_a_config_error_with_its_aadsts_code(m365: SimulatedM365, tmp_path: Path) -> None:
    p = provider(m365, tmp_path, client_secret="wrong-secret-value")
    with pytest.raises(TokenError) as err:
        await p.get()
    assert err.value.aadsts == 7000215
    assert not err.value.transient
    assert "wrong-secret-value" not in str(err.value)
    p.close()


async def test_unknown_tenant_is_a_config_error(m365: SimulatedM365, tmp_path: Path) -> None:
    p = provider(m365, tmp_path, tenant_id="99999999-9999-9999-9999-999999999999")
    with pytest.raises(TokenError) as err:
        await p.get()
    assert err.value.aadsts == 90002
    assert not err.value.transient
    p.close()


async def test_token_endpoint_down_is_transient(m365: SimulatedM365, tmp_path: Path) -> None:
    m365.entra.set_down(True)
    p = provider(m365, tmp_path)
    with pytest.raises(TokenError) as err:
        await p.get()
    assert err.value.transient
    m365.entra.set_down(False)
    token = await p.get()
    assert token.value
    p.close()


async def test_server_error_is_transient(m365: SimulatedM365, tmp_path: Path) -> None:
    p = provider(m365, tmp_path)
    m365.entra.fail_with(503, "temporarily_unavailable", None, times=1)
    with pytest.raises(TokenError) as err:
        await p.get()
    assert err.value.transient
    p.close()
