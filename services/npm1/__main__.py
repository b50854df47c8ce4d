"""`python -m services.npm1`: serve the npm1 model (whole-image P(NPM1 mutated)) over OIP gRPC.

Settings come from `MS_NPM1_*` environment variables; `--help` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.npm1.config import Npm1Settings
from services.runtime.cli import service_main


def build(settings: Npm1Settings, resolved):
    """An unloaded handler for the registry's model (imported here: `--help` stays cheap)."""
    from services.npm1.model import Npm1Handler as handler

    return handler(resolved.local_dir, settings)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        Npm1Settings,
        build,
        argv,
        "Serve the npm1 model (whole-image P(NPM1 mutated)) over the Open Inference Protocol (gRPC).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
