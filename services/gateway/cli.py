"""Command line of the gateway's processes: `python -m services.gateway[.worker] [-h]`.

Like the model services (`services.runtime.cli`), they take no options: every setting comes
from the environment. `--help` prints the settings, generated from `GatewaySettings`, and
exits 0 before anything is migrated, created or bound; any argument exits 2. (`--help` had
started the whole gateway: migrations, `gateway.db`, the port.)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parse_cli(prog: str, description: str, argv: Sequence[str] | None = None) -> None:
    from services.gateway.config import GatewaySettings
    from services.runtime.cli import settings_help

    argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="settings (environment variables only):\n" + settings_help(GatewaySettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
