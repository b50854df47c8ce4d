"""Generated docs (`tools.docgen`): current with the code, and built from the code itself."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import services.runtime.server as server_module
from marrowscope import taxonomy
from marrowscope.models.config import make_config
from marrowscope.registry import ResolvedModel
from services.npm1.config import Npm1Settings
from services.npm1.model import Npm1Handler
from services.runtime.handler import TensorSpec
from tools import docgen

ROOT = Path(__file__).resolve().parents[2]


def test_docs_are_current():
    stale = docgen.stale_files()
    assert not stale, (
        f"generated blocks in {[str(p.relative_to(ROOT)) for p in stale]} are stale: "
        f"run `{docgen.COMMAND}` to update them"
    )


def test_every_docs_block_is_known_and_every_block_is_used():
    used = set()
    for path in docgen.markdown_files(docgen.DOCS_DIR):
        used |= set(re.findall(r"^<!-- BEGIN GENERATED: (.*?) -->$", path.read_text(), re.M))
    assert used == set(docgen.BLOCKS)


def _row(table: str, first_cells: tuple[str, ...]) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if tuple(cells[: len(first_cells)]) == first_cells:
            return cells
    raise AssertionError(f"no row starting {first_cells} in\n{table}")


def test_npm1_image_is_documented_as_served():
    """The drift that started this: npm1 IMAGE is batchable, [-1, H, W, 3], not [1, ...]."""
    row = _row(docgen.tensor_table(), ("npm1 (`Npm1Handler`)", "yes", "in", "`IMAGE`"))
    assert row[4:6] == ["UINT8", "[-1, H, W, 3]"]


def test_symbolic_shapes_are_the_served_shapes(tmp_path):
    """Putting a real config's numbers in for the letters gives the real handler's specs."""
    config = make_config("npm1", "resnet18", input_size=[192, 256])
    (tmp_path / "config.json").write_text(json.dumps(config))
    handler = Npm1Handler(tmp_path, Npm1Settings.model_construct())
    table = docgen.tensor_table()
    for direction, specs in (("in", handler.inputs), ("out", handler.outputs)):
        for spec in specs:
            row = _row(table, ("npm1 (`Npm1Handler`)", "yes", direction, f"`{spec.name}`"))
            shape = row[5].replace("H", "192").replace("W", "256")
            assert (row[4], shape) == (spec.datatype, str(list(spec.shape)))


def test_ensemble_optional_output_is_marked():
    table = docgen.tensor_table()
    assert (
        "only models whose config has it"
        in _row(table, ("ensemble (`EnsembleHandler`)", "no", "out", "`P_NPM1`"))[6]
    )
    assert _row(table, ("ensemble (`EnsembleHandler`)", "no", "out", "`P_AML`"))[6] == ""


def test_new_cell_code_is_picked_up(monkeypatch):
    extra = taxonomy.CellType("SMU", "smudge cell", "artefact", False)
    monkeypatch.setattr(taxonomy, "CELL_TYPES", (*taxonomy.CELL_TYPES, extra))
    monkeypatch.setitem(taxonomy.CATEGORY_IDS, "SMU", len(taxonomy.CELL_TYPES))
    row = _row(docgen.cell_code_table(), ("`SMU`",))
    assert row[1:] == ["smudge cell", "artefact", "no", str(len(taxonomy.CELL_TYPES))]


def test_new_handler_in_a_service_is_picked_up(monkeypatch):
    """A second model in the segmentation service needs no edit of the generator."""
    import services.segmentation.model as seg_model
    from services.runtime.handler import ModelHandler

    class NucleusHandler(ModelHandler):
        inputs = (TensorSpec("IMAGE", "BYTES", (1,)),)
        outputs = (TensorSpec("MASKS", "UINT8", (-1, -1, -1)),)

        def __init__(self, local_dir, settings):
            self.settings = settings

    NucleusHandler.__module__ = seg_model.__name__
    monkeypatch.setattr(seg_model, "NucleusHandler", NucleusHandler, raising=False)
    row = _row(docgen.tensor_table(), ("segmentation (`NucleusHandler`)", "no", "out", "`MASKS`"))
    assert row[4:6] == ["UINT8", "[-1, -1, -1]"]


def test_a_handler_that_cannot_be_built_is_an_error_not_a_gap(monkeypatch):
    import services.segmentation.model as seg_model
    from services.runtime.handler import ModelHandler

    class Broken(ModelHandler):
        def __init__(self, local_dir, settings, required):
            pass

    Broken.__module__ = seg_model.__name__
    monkeypatch.setattr(seg_model, "Broken", Broken, raising=False)
    with pytest.raises(docgen.DocgenError, match="cannot document .*Broken"):
        docgen.tensor_table()


def test_render_keeps_prose_and_refuses_broken_markers():
    blocks = {"x": lambda: "fresh\n"}
    text = (
        "intro\n<!-- BEGIN GENERATED: x -->\nold\n<!-- END GENERATED -->\n"
        "outro `<!-- BEGIN GENERATED: y -->` quoted\n"
    )
    out = docgen.render(text, blocks)
    assert out.startswith("intro\n<!-- BEGIN GENERATED: x -->\n")
    assert "fresh\n<!-- END GENERATED -->\noutro" in out and "old" not in out
    assert docgen.render(out, blocks) == out
    with pytest.raises(docgen.DocgenError, match="needs a later"):
        docgen.render("<!-- BEGIN GENERATED: x -->\nno end\n", blocks)
    with pytest.raises(docgen.DocgenError, match="unknown generated block 'z'"):
        docgen.render("<!-- BEGIN GENERATED: z -->\n<!-- END GENERATED -->\n", blocks)


def test_check_command_names_the_stale_file_and_the_fix(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(docgen.DOCS_DIR, docs)
    glossary = docs / "GLOSSARY.md"
    glossary.write_text(glossary.read_text().replace("| `BLA` |", "| `XXX` |"))
    env_cmd = [sys.executable, "-m", "tools.docgen", "--docs", str(docs)]
    check = subprocess.run(
        [*env_cmd, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 1
    assert "GLOSSARY.md is stale: run `python -m tools.docgen` to update it" in check.stderr
    assert "CONTRACTS.md" not in check.stderr
    fix = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fix.returncode == 0, fix.stderr
    assert glossary.read_text() == (docgen.DOCS_DIR / "GLOSSARY.md").read_text()


def test_server_docstring_example_runs(monkeypatch, tmp_path):
    """The ``__main__`` example in services/runtime/server.py calls the real signatures."""
    doc = ast.get_docstring(ast.parse(Path(server_module.__file__).read_text()))
    assert doc is not None
    example = doc.split("::\n", 1)[1]
    code = "\n".join(line[4:] for line in example.splitlines())
    captured = {}

    def fake_run_service(factory, settings):
        captured["handler"] = factory(ResolvedModel("npm1", "1", tmp_path))
        captured["settings"] = settings
        return 0

    config = make_config("npm1", "resnet18", input_size=[64, 96])
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(server_module, "run_service", fake_run_service)
    with pytest.raises(SystemExit) as exit_info:
        exec(compile(code, "server.py docstring", "exec"), {})
    assert exit_info.value.code == 0
    handler = captured["handler"]
    assert isinstance(handler, Npm1Handler) and handler.settings is captured["settings"]
    assert handler.inputs[0].shape == (-1, 64, 96, 3)


def test_a_handler_of_an_unknown_model_kind_says_what_to_add(monkeypatch):
    import services.segmentation.model as seg_model
    from services.common import PredictorHandler

    class NucleusPredictor:
        kind = "nucleus"

    class NucleusHandler(PredictorHandler):
        predictor_cls = NucleusPredictor

    NucleusHandler.__module__ = seg_model.__name__
    monkeypatch.setattr(seg_model, "NucleusHandler", NucleusHandler, raising=False)
    with pytest.raises(docgen.DocgenError, match="no valid nucleus model config.*_SYMBOLIC_FIELDS"):
        docgen.tensor_table()
