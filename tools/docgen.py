"""Write the parts of ``docs/`` that describe code from the code itself.

Tensor contracts, settings and cell codes used to be written by hand in several places and
drifted (npm1 ``IMAGE`` was documented as ``[1, H, W, 3]`` while the service served
``[-1, H, W, 3]``). Each generated block sits between marker comments in a Markdown file::

    <!-- BEGIN GENERATED: tensors -->
    ...replaced on every run...
    <!-- END GENERATED -->

and everything outside the markers is prose that this tool never touches. Blocks:

- ``cell-codes``, ``attributes``: from `marrowscope.taxonomy` (every field of ``CellType``
  and ``Attribute``, plus the COCO category id).
- ``tensors``: every ``ModelHandler`` subclass defined in ``services/<name>/model.py`` (found
  by scanning, so a new service or a second model in one service needs no edit here), built
  against a symbolic model config so that model-dependent dimensions print as letters
  (``H``, ``W``, ``S``, ``K``) instead of one model's numbers.
- ``settings``: each service's pydantic settings class (``services/<name>/config.py``).
- ``gateway-limits``: `services.gateway.errors.LIMITS`, each gateway limit and its error.

``python -m tools.docgen`` rewrites the blocks; ``--check`` only reports stale files (exit
status 1), which is what ``tests/tools/test_docgen.py`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import pkgutil
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

if TYPE_CHECKING:
    from services.runtime.handler import ModelHandler
    from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"
COMMAND = "python -m tools.docgen"

_BLOCK = re.compile(
    r"^(?P<begin><!-- BEGIN GENERATED: (?P<name>[a-z0-9-]+) -->\n)"
    r"(?P<body>.*?)"
    r"^(?P<end><!-- END GENERATED -->)$",
    re.DOTALL | re.MULTILINE,
)
_BEGIN = re.compile(r"^<!-- BEGIN GENERATED: (.*?) -->$", re.MULTILINE)
"""Markers count only on a line of their own, so prose may quote them."""

# Sentinel sizes in the symbolic model configs: a dimension equal to one of them came from
# that config field, so it is printed as the letter instead of a number.
_H, _W, _S, _D = 1_000_003, 1_000_033, 1_000_037, 1_000_039
_SYMBOLIC_FIELDS: dict[str, dict[str, Any]] = {
    "npm1": {"input_size": [_H, _W]},
    "celltype": {"crop_size": _S},
    "ensemble": {
        "feature_names": ["feature"],
        "feature_units": {"length": "px", "um_per_px": None},
    },
    "mil": {"embedding_dim": _D, "celltype": {"name": "marrowscope-celltype", "version": "1"}},
}
_SYMBOLS: dict[int, str] = {_H: "H", _W: "W", _S: "S", _D: "D"}
_LENGTH_SYMBOLS: dict[str, tuple[str, str]] = {"celltype": ("outputs", "K")}
"""kind -> (list-valued config field, letter for its length)."""
_SYMBOL_MEANING: dict[str, str] = {
    "H": "`H`, `W`: the loaded npm1 model's `input_size` (config.json)",
    "S": "`S`: the loaded celltype model's `crop_size`",
    "K": "`K`: the celltype model's `outputs` (cell codes, then attribute codes)",
    "D": "`D`: the MIL model's `embedding_dim`: the celltype backbone's embedding size, which "
    "the celltype ModelMetadata shows for `EMBEDDINGS` once a version is loaded",
}


class DocgenError(RuntimeError):
    """A marker block is malformed or unknown, or a handler cannot be documented."""


# -- taxonomy ---------------------------------------------------------------------------
def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cell_code_table() -> str:
    """Every ``taxonomy.CELL_TYPES`` entry, all dataclass fields, plus its COCO id."""
    from marrowscope import taxonomy

    fields = [f.name for f in dataclasses.fields(taxonomy.CellType)]
    rows = [
        [f"`{getattr(c, fields[0])}`", *(getattr(c, f) for f in fields[1:])]
        + [taxonomy.CATEGORY_IDS[c.code]]
        for c in taxonomy.CELL_TYPES
    ]
    return _table([*fields, "COCO id"], rows)


def attribute_table() -> str:
    """Every ``taxonomy.ATTRIBUTES`` entry with all its dataclass fields."""
    from marrowscope import taxonomy

    fields = [f.name for f in dataclasses.fields(taxonomy.Attribute)]
    rows = [
        [f"`{getattr(a, fields[0])}`", *(getattr(a, f) for f in fields[1:])]
        for a in taxonomy.ATTRIBUTES
    ]
    return _table(fields, rows)


# -- services ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorDoc:
    """One input or output: name, OIP datatype, shape with letters, notes."""

    name: str
    datatype: str
    shape: str
    note: str


@dataclass(frozen=True)
class HandlerDoc:
    """The tensor contract of one handler class as ModelMetadata reports it."""

    service: str
    handler: str
    batchable: bool
    inputs: list[TensorDoc]
    outputs: list[TensorDoc]


def service_names() -> list[str]:
    """Sub-packages of ``services`` that hold a ``model.py`` (one per model service)."""
    import services

    return sorted(
        m.name
        for m in pkgutil.iter_modules(services.__path__)
        if m.ispkg and (Path(services.__path__[0]) / m.name / "model.py").is_file()
    )


def handler_classes(service: str) -> list[type[ModelHandler]]:
    """``ModelHandler`` subclasses defined (not imported) in ``services/<service>/model.py``."""
    from services.runtime.handler import ModelHandler

    module = importlib.import_module(f"services.{service}.model")
    return [
        obj
        for _, obj in sorted(vars(module).items())
        if inspect.isclass(obj)
        and issubclass(obj, ModelHandler)
        and obj.__module__ == module.__name__
    ]


def settings_class(service: str) -> type[ServiceSettings]:
    """The ``ServiceSettings`` subclass defined in ``services/<service>/config.py``."""
    from services.runtime.settings import ServiceSettings

    module = importlib.import_module(f"services.{service}.config")
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, ServiceSettings)
        and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise DocgenError(f"services/{service}/config.py must define one settings class")
    return found[0]


def _symbolic_configs(kind: str) -> list[dict[str, Any]]:
    """Valid configs of ``kind`` with sentinel sizes; one per ensemble target set, so that
    outputs that only some versions have show up as such."""
    from marrowscope.models.config import ARCHS, make_config
    from marrowscope.targets import ENSEMBLE_TARGETS

    base = make_config(kind, ARCHS.get(kind, ("",))[0], **_SYMBOLIC_FIELDS.get(kind, {}))
    if kind != "ensemble":
        return [base]
    return [
        {**base, "targets": list(ENSEMBLE_TARGETS[: i + 1])} for i in range(len(ENSEMBLE_TARGETS))
    ]


def _symbolic_shape(shape: Sequence[int], symbols: dict[int, str]) -> str:
    return "[" + ", ".join(symbols.get(d, str(d)) for d in shape) + "]"


def document_handler(service: str, cls: type[ModelHandler]) -> HandlerDoc:
    """Build ``cls`` against each symbolic config of its model kind and collect its specs.

    Specs that depend on the model (celltype crop size, the ensemble's optional ``P_NPM1``)
    are set in ``__init__``, so the class attributes alone would not tell the truth.
    """
    kind = getattr(getattr(cls, "predictor_cls", None), "kind", "")
    configs: list[dict[str, Any] | None] = [None]
    if kind:
        try:
            configs = list(_symbolic_configs(kind))
        except ValueError as exc:  # ModelConfigError: a kind whose required fields lack defaults
            raise DocgenError(
                f"cannot document {cls.__module__}.{cls.__name__}: no valid {kind} model "
                f"config ({exc}); give its required fields in _SYMBOLIC_FIELDS ({__name__})"
            ) from exc
    settings = settings_class(service).model_construct()  # defaults, no environment
    variants = []
    symbols = dict(_SYMBOLS)
    for config in configs:
        if config is not None and kind in _LENGTH_SYMBOLS:
            field, letter = _LENGTH_SYMBOLS[kind]
            symbols[len(config[field])] = letter
        with tempfile.TemporaryDirectory() as tmp:
            if config is not None:
                (Path(tmp) / "config.json").write_text(json.dumps(config))
            # handlers take (model_dir, settings); the base class declares no __init__
            build: Callable[..., ModelHandler] = cls
            try:
                handler = build(tmp, settings)
            except Exception as exc:
                raise DocgenError(
                    f"cannot document {cls.__module__}.{cls.__name__}: building it as "
                    f"{cls.__name__}(model_dir, settings) with a {kind or 'no'} model config "
                    f"failed: {exc}"
                ) from exc
        variants.append((tuple(handler.inputs), tuple(handler.outputs)))

    def merged(which: int) -> list[TensorDoc]:
        out: dict[str, Any] = {}
        for variant in variants:
            for spec in variant[which]:
                out.setdefault(spec.name, spec)
        rows = []
        for name, spec in out.items():
            notes = []
            if getattr(spec, "optional", False):
                notes.append("optional")
            if not all(any(s.name == name for s in v[which]) for v in variants):
                notes.append("only models whose config has it")
            if cls.batchable and which == 1 and not spec.batch_axis:
                notes.append("same for every request of a batch")
            shape = _symbolic_shape(spec.shape, symbols)
            rows.append(TensorDoc(name, spec.datatype, shape, "; ".join(notes)))
        return rows

    return HandlerDoc(service, cls.__name__, bool(cls.batchable), merged(0), merged(1))


def handler_docs() -> list[HandlerDoc]:
    """One `HandlerDoc` per handler class of every service."""
    return [document_handler(s, cls) for s in service_names() for cls in handler_classes(s)]


def tensor_table() -> str:
    """The tensor contract of every service as one table, plus the symbols it uses."""
    rows = []
    used: set[str] = set()
    for doc in handler_docs():
        label = f"{doc.service} (`{doc.handler}`)"
        batch = "yes" if doc.batchable else "no"
        for direction, specs in (("in", doc.inputs), ("out", doc.outputs)):
            for t in specs:
                used.update(re.findall(r"[A-Z]", t.shape))
                rows.append([label, batch, direction, f"`{t.name}`", t.datatype, t.shape, t.note])
    table = _table(
        ["service (handler)", "batchable", "in/out", "tensor", "datatype", "shape", "note"], rows
    )
    legend = ["`-1`: any size (ModelMetadata's variable dimension; the batch axis when batchable)"]
    legend += [_SYMBOL_MEANING[s] for s in sorted(_SYMBOL_MEANING) if s in used]
    return table + "\n" + "".join(f"- {line}\n" for line in legend)


def settings_table() -> str:
    """Fields common to every model service, then each service's own or changed fields."""
    from services.runtime.settings import ServiceSettings

    def default(field: Any) -> str:
        value = field.default
        return "unset" if value is None else f"`{value}`"

    def meaning(field: Any, fallback: Any = None) -> str:
        text = field.description or (fallback.description if fallback is not None else None)
        if text:
            return str(text)
        if get_origin(field.annotation) is Literal:
            return "one of " + ", ".join(f"`{v}`" for v in get_args(field.annotation))
        return ""

    base = ServiceSettings.model_fields
    out = ["Common to all model services (`MS_<SERVICE>_<FIELD>`):\n\n"]
    out.append(
        _table(
            ["field", "default", "meaning"],
            [[f"`{n.upper()}`", default(f), meaning(f)] for n, f in base.items()],
        )
    )
    rows = []
    for service in service_names():
        cls = settings_class(service)
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            if name in base and field.default == base[name].default:
                continue
            description = meaning(field, base.get(name))
            rows.append([service, f"`{prefix}{name.upper()}`", default(field), description])
    out.append("\nPer service (new fields, and common fields whose default differs):\n\n")
    out.append(_table(["service", "variable", "default", "meaning"], rows))
    return "".join(out)


def hl7_code_table() -> str:
    """Every local HL7 observation code (``services.gateway.hl7codes.code_table``)."""
    from services.gateway.hl7codes import code_table

    rows = [[f"`{c.code}`", c.text, c.value_type, c.unit] for c in code_table().values()]
    return _table(["code", "text", "OBX-2", "unit (UCUM)"], rows)


def gateway_limit_table() -> str:
    """Every configured limit of the gateway and the one error it answers with."""
    from services.gateway.errors import LIMITS

    rows = [[f"`{lim.setting}`", lim.status, f"`{lim.code}`", lim.what] for lim in LIMITS]
    return _table(["setting", "status", "error", "limits"], rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "cell-codes": cell_code_table,
    "hl7-codes": hl7_code_table,
    "attributes": attribute_table,
    "tensors": tensor_table,
    "settings": settings_table,
    "gateway-limits": gateway_limit_table,
}


# -- files ------------------------------------------------------------------------------
def render(text: str, blocks: dict[str, Callable[[], str]] | None = None) -> str:
    """``text`` with every generated block replaced by fresh content."""
    blocks = BLOCKS if blocks is None else blocks
    begins = _BEGIN.findall(text)
    matches = list(_BLOCK.finditer(text))
    if len(begins) != len(matches):
        raise DocgenError(
            f"{len(begins)} BEGIN GENERATED marker(s) but {len(matches)} complete block(s): "
            "every '<!-- BEGIN GENERATED: name -->' line needs a later '<!-- END GENERATED -->'"
        )
    cache: dict[str, str] = {}

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            raise DocgenError(f"unknown generated block {name!r}; known: {sorted(blocks)}")
        if name not in cache:
            cache[name] = blocks[name]()
        note = f"<!-- generated by `{COMMAND}`: edit the code, not this block -->\n"
        return match["begin"] + note + cache[name] + match["end"]

    return _BLOCK.sub(replace, text)


def markdown_files(docs_dir: Path) -> list[Path]:
    """Markdown files under ``docs_dir`` that hold at least one generated block."""
    return sorted(p for p in docs_dir.rglob("*.md") if _BEGIN.search(p.read_text()))


def _rendered(path: Path) -> tuple[str, str]:
    text = path.read_text()
    try:
        return text, render(text)
    except DocgenError as exc:
        raise DocgenError(f"{path}: {exc}") from exc


def stale_files(docs_dir: Path = DOCS_DIR) -> list[Path]:
    """Files whose generated blocks differ from what the code says now."""
    return [p for p in markdown_files(docs_dir) if len(set(_rendered(p))) == 2]


def update(docs_dir: Path = DOCS_DIR) -> list[Path]:
    """Rewrite stale files; returns them."""
    stale = []
    for path in markdown_files(docs_dir):
        old, new = _rendered(path)
        if new != old:
            path.write_text(new)
            stale.append(path)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=Path, default=DOCS_DIR, help="folder of Markdown files")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 when a file is stale"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.check:
            stale = stale_files(args.docs)
            for path in stale:
                log.error("%s is stale: run `%s` to update it", path, COMMAND)
            return 1 if stale else 0
        for path in update(args.docs):
            log.info("updated %s", path)
    except DocgenError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
