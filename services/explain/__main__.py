"""`python -m services.explain`: serve the explain model over OIP gRPC (settings: MS_EXPLAIN_*)."""

from __future__ import annotations

from services.explain.config import ExplainSettings
from services.explain.model import ExplainHandler
from services.runtime.server import run_service


def main() -> int:
    settings = ExplainSettings()
    return run_service(lambda resolved: ExplainHandler(resolved.local_dir, settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
