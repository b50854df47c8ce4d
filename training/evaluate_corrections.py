"""What the hematologists' corrections say about the typers.

    python -m training.evaluate corrections --export DIR [--typer RUN] [--champion URI]

Reads a corrections export (`python -m training.data.corrections export`) and prints one JSON
object (last line of stdout):
- `agreement`: per celltype version that made the calls in production, the share of its
  calls the reviewers kept, overall, per called type and per tenant (the same figure as the
  gateway's `marrowscope_gateway_review_agreement_ratio`, over the exported cases);
- with `--typer` (a training output folder, a model folder or a `models:/` URI): that
  typer's accuracy against the reviewers' labels on the exported cells it has not trained
  on (`corrections.json` beside its weights lists the analyses it learned from), and, when
  a champion resolves (`--champion`, default `models:/marrowscope-celltype@champion`), the
  champion's accuracy on the same cells, re-run on the same crops.

The promotion gate's `--corrections DIR` (training.promote) uses `compare` below: a
candidate typer must do no worse than the champion on the corrected cells neither trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
DEFAULT_CHAMPION = "models:/marrowscope-celltype@champion"


@dataclass(frozen=True)
class Typer:
    """A celltype predictor with the analyses its training saw (from `corrections.json`)."""

    uri: str
    version: str
    predictor: Any
    trained: frozenset[str]


def load_typer(uri: str, *, tracking_uri: str | None = None) -> Typer:
    """`uri`: a training output folder (holding `model/`), a model folder or `models:/...`."""
    from marrowscope import registry
    from marrowscope.inference import load_predictor
    from training.celltype import CORRECTIONS_FILE

    path = Path(uri)
    if path.is_dir() and (path / "model" / "config.json").is_file():
        uri = str(path / "model")
    resolved = registry.resolve(uri, tracking_uri=tracking_uri)
    predictor = load_predictor(str(resolved.local_dir))
    if predictor.kind != "celltype":
        raise ValueError(f"{uri} is a {predictor.kind} model, not a celltype model")
    record = Path(resolved.local_dir) / CORRECTIONS_FILE
    trained: frozenset[str] = frozenset()
    if record.is_file():
        trained = frozenset(json.loads(record.read_text()).get("trained_analyses", []))
    return Typer(uri, resolved.version, predictor, trained)


def accuracy(typer: Typer, export_dir: Path, analyses: set[str]) -> dict[str, Any]:
    """The typer's calls against the reviewers' labels on the cells of `analyses`."""
    from marrowscope.taxonomy import CODES
    from training.data.corrections import read_cells

    cells = read_cells(export_dir, typer.predictor.crop_size)
    keep = np.array([a in analyses for a in cells.analyses.tolist()], dtype=bool)
    if not keep.any():
        return {"cells": 0, "correct": 0, "accuracy": None, "by_class": {}}
    names = list(typer.predictor.names)
    columns = [names.index(c) for c in CODES if c in names]
    probs = typer.predictor.predict(cells.crops[keep])
    called = np.array([names[columns[i]] for i in probs[:, columns].argmax(1)])
    truth = cells.codes[keep].astype(str)
    by_class = {}
    for code in sorted(set(truth.tolist())):
        mine = truth == code
        hits = int((called[mine] == code).sum())
        by_class[code] = {"cells": int(mine.sum()), "correct": hits, "accuracy": hits / mine.sum()}
    correct = int((called == truth).sum())
    return {
        "cells": int(keep.sum()),
        "correct": correct,
        "accuracy": correct / int(keep.sum()),
        "by_class": by_class,
    }


def compare(export_dir: Path, candidate: Typer, champion: Typer | None) -> dict[str, Any]:
    """Both typers on the exported cells of the analyses neither trained on."""
    from training.data.corrections import read_manifest

    analyses = {r["analysis_id"] for r in read_manifest(export_dir) if r.get("crop")}
    held_out = analyses - candidate.trained - (champion.trained if champion else frozenset())
    out: dict[str, Any] = {
        "held_out_analyses": len(held_out),
        "candidate": {
            "model": candidate.uri,
            "version": candidate.version,
            **accuracy(candidate, export_dir, held_out),
        },
    }
    if champion is not None:
        out["champion"] = {
            "model": champion.uri,
            "version": champion.version,
            **accuracy(champion, export_dir, held_out),
        }
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate corrections",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--export", type=Path, required=True, help="a corrections export folder")
    p.add_argument("--typer", default=None, help="candidate: run folder, model folder or URI")
    p.add_argument(
        "--champion",
        default=DEFAULT_CHAMPION,
        help="compared with --typer (default %(default)s; 'none' to skip)",
    )
    p.add_argument("--tracking-uri", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from marrowscope.errors import ModelNotFound
    from training.data.corrections import recorded_agreement

    args = get_args_parser().parse_args(argv)
    try:
        out: dict[str, Any] = {
            "export": str(args.export),
            "agreement": recorded_agreement(args.export),
        }
        if args.typer:
            candidate = load_typer(args.typer, tracking_uri=args.tracking_uri)
            champion = None
            if args.champion != "none":
                try:
                    champion = load_typer(args.champion, tracking_uri=args.tracking_uri)
                except ModelNotFound as exc:
                    log.warning("no champion to compare with: %s", exc)
            out.update(compare(args.export, candidate, champion))
    except (ValueError, ModelNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0
