"""`python -m services.ensemble`: serve the ensemble model (P(AML), P(NPM1 | AML)) over OIP gRPC.

Settings come from `MS_ENSEMBLE_*` environment variables; `--help` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.ensemble.config import EnsembleSettings
from services.runtime.cli import service_main


def build(settings: EnsembleSettings, resolved):
    """An unloaded handler for the registry's model (imported here: `--help` stays cheap)."""
    from services.ensemble.model import EnsembleHandler as handler

    # registry tags carry the lineage (marrowscope.lineage.<upstream>)
    return handler(resolved.local_dir, settings, tags=resolved.tags)


def extra_models(settings: EnsembleSettings) -> dict:
    """``{"mil": resolver}`` when ``mil_model_uri`` is set (the MIL model beside the
    ensemble, `services.ensemble.model`), else nothing."""
    if not settings.mil_model_uri:
        return {}
    from services.ensemble.model import MIL_MODEL_NAME, MilHandler
    from services.runtime.server import registry_resolver

    return {
        MIL_MODEL_NAME: registry_resolver(
            settings.mil_model_uri, lambda resolved: MilHandler(resolved.local_dir, settings)
        )
    }


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(
        EnsembleSettings,
        build,
        argv,
        "Serve the ensemble model (P(AML), P(NPM1 | AML)) over the Open Inference Protocol "
        "(gRPC), and the MIL model (P(APL | AML) from cell embeddings) when configured.",
        extra=extra_models,
    )


if __name__ == "__main__":
    raise SystemExit(main())
