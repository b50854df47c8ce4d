"""Command line of a model service: ``python -m services.<name> [-h]``.

A service takes no options: every setting comes from the environment (12-factor; the Helm
chart sets them). ``--help`` prints each setting with its environment variable, default and
meaning, generated from the service's pydantic settings class so it cannot drift, and exits
0 before anything is loaded or bound; any other argument is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from services.runtime.handler import ModelHandler
from services.runtime.settings import ServiceSettings


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if name and "[" not in str(annotation) else str(annotation).replace("typing.", "")


def _description(settings_cls: type[BaseSettings], name: str) -> str | None:
    """A subclass that only changes a default (``grpc_port: int = 50055``) drops the base
    field's description; take the nearest one up the class hierarchy."""
    for cls in settings_cls.__mro__:
        fields: dict[str, FieldInfo] = getattr(cls, "model_fields", None) or {}
        if name in fields and fields[name].description:
            return fields[name].description
    return None


def settings_help(settings_cls: type[BaseSettings]) -> str:
    """One entry per field: ``ENV_NAME  type  (default: x)`` and its description."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    lines = []
    for name, field in settings_cls.model_fields.items():
        default = field.default if field.default is not PydanticUndefined else "(required)"
        lines.append(
            f"  {(prefix + name).upper()}  {_type_name(field.annotation)}  (default: {default})"
        )
        description = _description(settings_cls, name)
        if description:
            lines += textwrap.wrap(
                description, width=88, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines)


def parse_cli(
    settings_cls: type[ServiceSettings], argv: Sequence[str] | None, description: str
) -> ServiceSettings:
    """Handle the command line (``-h`` exits 0, anything else exits 2), then read the
    settings from the environment."""
    service = settings_cls.model_fields["model_name"].default
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service}",
        description=description,
        epilog="settings (environment variables only):\n" + settings_help(settings_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    return settings_cls()


def service_main(
    settings_cls: type[ServiceSettings],
    build: Callable[[Any, Any], ModelHandler],
    argv: Sequence[str] | None = None,
    description: str = "",
    extra: Callable[[Any], dict[str, Any]] | None = None,
) -> int:
    """The ``main()`` of a model service: parse the command line, read the settings, serve
    ``build(settings, resolved_model)`` (see ``server.run_service``); ``extra(settings)``
    names further models of the process (name -> resolver)."""
    from services.runtime.server import run_service

    settings = parse_cli(settings_cls, argv, description)
    more = extra(settings) if extra is not None else None
    return run_service(lambda resolved: build(settings, resolved), settings, extra=more)
