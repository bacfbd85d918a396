"""Cloud presets and their overrides (docs/exchange.md, "Clouds")."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import settings_from_dict
from relay.errors import ConfigError

TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT = "22222222-2222-2222-2222-222222222222"


def config(cloud: str, **app: Any) -> dict[str, Any]:
    return {"apps": [{"name": "a", "cloud": cloud, "tenant_id": TENANT, "client_id": CLIENT, "client_secret": "s",
                      **app}],
            "mailboxes": [{"address": "m@contoso.com", "app": "a"}]}


@pytest.mark.parametrize(("cloud", "authority", "scope", "smtp"), [
    ("global", "https://login.microsoftonline.com", "https://outlook.office365.com/.default", "smtp.office365.com"),
    ("gcc", "https://login.microsoftonline.com", "https://outlook.office365.com/.default", "smtp.office365.com"),
    ("gcc-high", "https://login.microsoftonline.us", "https://outlook.office365.us/.default", "smtp.office365.us"),
    ("dod", "https://login.microsoftonline.us", "https://outlook-dod.office365.us/.default",
     "outlook-dod.office365.us"),
    ("china", "https://login.partner.microsoftonline.cn", "https://partner.outlook.cn/.default",
     "smtp.partner.outlook.cn"),
    ("hve", "https://login.microsoftonline.com", "https://outlook.office365.com/.default", "smtp.hve.mx.microsoft"),
])
def test_cloud_presets_fill_authority_scope_and_smtp_host(cloud: str, authority: str, scope: str, smtp: str) -> None:
    app = settings_from_dict(config(cloud)).apps[0]
    assert app.authority == f"{authority}/{TENANT}"
    assert app.effective_scope == scope
    assert app.effective_smtp_host == smtp


def test_every_preset_value_is_overridable() -> None:
    app = settings_from_dict(config("hve", authority_host="https://login.example/", scope="api://x/.default",
                                    smtp_host="smtp.example", smtp_port=2587)).apps[0]
    assert (app.authority, app.effective_scope, app.effective_smtp_host, app.smtp_port) == (
        f"https://login.example/{TENANT}", "api://x/.default", "smtp.example", 2587)


def test_hve_has_its_own_pacing_default_and_the_admin_can_override_it() -> None:
    settings = settings_from_dict(config("hve"))
    mbx = settings.mailboxes[0]
    assert settings.mailbox_per_minute(mbx) == 120
    global_cloud = settings_from_dict(config("global"))
    assert global_cloud.mailbox_per_minute(global_cloud.mailboxes[0]) == 30
    explicit = settings_from_dict({**config("hve"), "delivery": {"per_mailbox": {"per_minute": 10}}})
    assert explicit.mailbox_per_minute(explicit.mailboxes[0]) == 10
    per_mailbox = settings_from_dict({**config("hve"), "mailboxes": [{"address": "m@contoso.com", "app": "a",
                                                                        "per_minute": 5}]})
    assert per_mailbox.mailbox_per_minute(per_mailbox.mailboxes[0]) == 5


def test_unknown_cloud_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(config("azure-germany"))
    assert err.value.key == "apps[0].cloud"
