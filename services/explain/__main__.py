"""`python -m services.explain`: serve occlusion explanations of exact npm1 versions over OIP gRPC.

Settings come from `MS_EXPLAIN_*` environment variables; `--help` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.explain.config import ExplainSettings
from services.runtime.cli import service_main


def build(settings: ExplainSettings, resolved):
    """An unloaded handler for the registry's model (imported here: `--help` stays cheap)."""
    from services.explain.model import ExplainHandler as handler

    return handler(resolved.local_dir, settings)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        ExplainSettings,
        build,
        argv,
        "Serve occlusion explanations of exact npm1 versions over the Open Inference Protocol (gRPC).",
    )


if __name__ == "__main__":
    raise SystemExit(main())
