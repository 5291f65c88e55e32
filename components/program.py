"""The Pulumi program: stack config -> validated settings -> OrgMail -> stack outputs."""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws
from pulumi.runtime import config as runtime_config

from components.boundary import permissions_boundary
from components.orgmail import OrgMail
from components.settings import (
    ConfigError,
    Settings,
    load_settings,
    raw_from_pulumi_config,
    refuse_provider_credentials,
    settings_warnings,
)


def current_config() -> dict[str, Any]:
    """Every config value the engine (or the mocks) handed to this program."""
    return {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}


def settings_from_config() -> Settings:
    config = current_config()
    refuse_provider_credentials(config)
    return load_settings(raw_from_pulumi_config(config), pulumi.get_stack(), pulumi.get_project())


def build(settings: Settings) -> dict[str, Any]:
    # An explicit provider: the region is a validated orgmail setting, not ambient state.
    provider = aws.Provider("aws", region=settings.region)
    # Before anything else is registered: a missing boundary stops the run here (RunError).
    boundary = permissions_boundary(provider, cluster=settings.cluster is not None)
    stack = OrgMail("orgmail", settings, pulumi.ResourceOptions(providers=[provider]), permissions_boundary=boundary)
    return stack.outputs


def main() -> None:
    try:
        settings = settings_from_config()
    except ConfigError as e:
        # Nothing has been registered yet: fail with the message alone, no traceback.
        raise pulumi.RunError(str(e)) from None
    for warning in settings_warnings(settings):
        pulumi.log.warn(warning)
    for key, value in build(settings).items():
        pulumi.export(key, value)
