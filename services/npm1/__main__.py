"""`python -m services.npm1`: serve the npm1 model over OIP gRPC (settings: MS_NPM1_*)."""

from __future__ import annotations

from services.npm1.config import Npm1Settings
from services.npm1.model import Npm1Handler
from services.runtime.server import run_service


def main() -> int:
    settings = Npm1Settings()
    return run_service(lambda resolved: Npm1Handler(resolved.local_dir, settings), settings)


if __name__ == "__main__":
    raise SystemExit(main())
