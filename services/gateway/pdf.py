"""The PDF report of one finished analysis (reportlab): the page a hematologist reads and signs.

One to two A4 pages from the one `AnalysisResult` (nothing is computed here): the case
block, the calls with what they mean and where they stop (`services.gateway.reading`), the
differential with its 95 % intervals, the most informative image with its cell boxes and a
legend of the type colours, the occlusion heatmap with its scale, the model versions, and
the status: "AI-generated, preliminary" until a hematologist signs out, then the reviewer,
time and comment. Served at `GET /v1/analyses/{id}/report?format=pdf`, embedded in the FHIR
bundle (`presentedForm`). PDF/A-2b parts: `services.gateway.pdfa`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape

from marrowscope.taxonomy import CELL_TYPES
from services.gateway.pdfa import make_pdfa
from services.gateway.reading import (
    AML_MEANING,
    DOMAIN_MEANING,
    WHOLE_IMAGE_NPM1_MEANING,
    CaseHeader,
    SignOut,
    aml_text,
    call_word,
    domain_text,
    genetic_calls,
    genetic_text,
    most_informative_image,
    non_counted,
    result_status,
    synthetic_text,
    target_meaning,
)
from services.gateway.render import TYPE_COLOURS, colour_scale_png, heatmap_png, overlay_png
from services.gateway.result import AnalysisResult, ImageResult

FONT, BOLD = "MarrowScopeSans", "MarrowScopeSans-Bold"
TYPE_NAMES = {c.code: c.name for c in CELL_TYPES}
_MAX_FIGURE_PX = 900  # enough for 85 mm at ~270 dpi; a 2560 px field would bloat the file


@dataclass(frozen=True)
class Figure:
    """The image shown: its result entry and its PNGs (`render.overlay_png`, and
    `render.heatmap_png` when the analysis was explained)."""

    image: ImageResult
    overlay_png: bytes
    heatmap_png: bytes | None = None


class Blobs(Protocol):
    def get(self, sha256: str) -> bytes: ...


def figure_from_blobs(blobs: Blobs, result: AnalysisResult) -> Figure | None:
    """The most informative image with its overlay and (explained cases) heatmap, read from
    the blob store the analysis stored them in; None for a case without images."""
    import numpy as np

    from marrowscope.imaging import decode_image

    image = most_informative_image(result)
    if image is None:
        return None
    rgb = decode_image(blobs.get(image.sha256))
    heat = None
    if image.heatmap_sha256:
        hm = np.load(io.BytesIO(blobs.get(image.heatmap_sha256)), allow_pickle=False)
        heat = heatmap_png(rgb, hm)
    return Figure(image, overlay_png(rgb, image.cells), heat)


@cache
def _fonts() -> None:
    """Bitstream Vera (shipped with reportlab) as the only fonts, embedded: PDF/A allows
    no reliance on a reader's built-in Helvetica."""
    import reportlab
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    fonts = Path(reportlab.__file__).parent / "fonts"
    pdfmetrics.registerFont(TTFont(FONT, str(fonts / "Vera.ttf")))
    pdfmetrics.registerFont(TTFont(BOLD, str(fonts / "VeraBd.ttf")))
    pdfmetrics.registerFontFamily(FONT, normal=FONT, bold=BOLD, italic=FONT, boldItalic=BOLD)


def _styles() -> dict[str, Any]:
    from reportlab.lib.styles import ParagraphStyle

    base = ParagraphStyle("base", fontName=FONT, fontSize=8.5, leading=10.5)
    return {
        "base": base,
        "small": ParagraphStyle("small", parent=base, fontSize=7, leading=8.5),
        "title": ParagraphStyle("title", parent=base, fontName=BOLD, fontSize=13, leading=16),
        "h": ParagraphStyle(
            "h", parent=base, fontName=BOLD, fontSize=10, leading=12, spaceBefore=7, spaceAfter=2
        ),
        "banner": ParagraphStyle("banner", parent=base, fontName=BOLD, fontSize=9.5, leading=12),
    }


def _p(text: str, style: Any) -> Any:
    from reportlab.platypus import Paragraph

    return Paragraph(text, style)


def _layout(rows: list[list[Any]], widths: list[float], style: list[Any], **kw: Any) -> Any:
    """A left-aligned table in the embedded font (reportlab's cell default is Helvetica,
    which a PDF/A file may not use unembedded)."""
    from reportlab.platypus import Table, TableStyle

    table = Table(rows, colWidths=widths, hAlign="LEFT", **kw)
    table.setStyle(
        TableStyle(
            [("FONTNAME", (0, 0), (-1, -1), FONT), ("VALIGN", (0, 0), (-1, -1), "TOP")] + style
        )
    )
    return table


def _table(rows: list[list[Any]], widths: list[float], *, header: bool = True) -> Any:
    from reportlab.lib import colors

    style = [
        ("FONTSIZE", (0, 0), (-1, -1), 8),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
    ]
    if header:
        style += [
            ("FONTNAME", (0, 0), (-1, 0), BOLD),
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
        ]
    return _layout(rows, widths, style, repeatRows=1 if header else 0)


def _name(code: str, name: str | None = None) -> str:
    """The cell type's name as a table reads it: capitalised, the code when unknown."""
    text = name or TYPE_NAMES.get(code, code)
    return text[:1].upper() + text[1:]


def _when(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "-"


def _banner(sign_out: SignOut | None, note: str | None, st: dict[str, Any]) -> Any:
    from reportlab.lib import colors
    from reportlab.lib.units import mm

    status = result_status(sign_out)
    if sign_out is None:
        text = (
            "AI-GENERATED, PRELIMINARY - not reviewed by a hematologist. Not a diagnosis; "
            "do not act on it before sign-out."
        )
        colour = "#fde2e1"
    else:
        verb = "Amended" if status == "C" else "Signed out"
        text = f"{verb} by {escape(sign_out.reviewer)} on {_when(sign_out.signed_at)}"
        if sign_out.comment:
            text += f"<br/>Comment: {escape(sign_out.comment)}"
        colour = "#e2f0d9"
    rows = [[_p(text, st["banner"])]]
    if note:
        rows.append([_p(escape(note), st["banner"])])
    return _layout(
        rows,
        [180 * mm],
        [
            ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor(colour)),
            ("BOX", (0, 0), (-1, -1), 0.8, colors.HexColor("#a00000")),
        ],
    )


def _case_block(case: CaseHeader, result: AnalysisResult, st: dict[str, Any]) -> Any:
    from reportlab.lib.units import mm

    patient = (
        f"{escape(case.patient_name or '')} ({escape(case.patient_id)})"
        if case.patient_id
        else "held by the LIS under the accession (no patient data sent)"
    )
    rows = [
        ["Accession", case.accession, "Analysis", case.analysis_id],
        ["Patient", _p(patient, st["base"]), "Specimen", case.specimen_type.replace("_", " ")],
        ["Submitted", _when(case.submitted_at), "Stain", _p(escape(case.stain), st["base"])],
        ["Finished", _when(case.finished_at), "Input", _p(_input_text(result), st["base"])],
    ]
    return _table(rows, [24 * mm, 66 * mm, 22 * mm, 68 * mm], header=False)


def _input_text(result: AnalysisResult) -> str:
    kind = {"fields": "fields of view", "cells": "single-cell images", "slide": "whole slide"}
    text = f"{kind[result.input]}, {result.n_images} image(s)"
    if result.duplicate_images_ignored:
        text += f", {result.duplicate_images_ignored} repeat(s) ignored"
    return text


def _findings(result: AnalysisResult, st: dict[str, Any]) -> Any:
    from reportlab.lib.units import mm

    rows: list[list[Any]] = [["Finding", "Result", "What it means"]]
    rows.append(["P(AML)", _p(escape(aml_text(result)), st["base"]), _p(AML_MEANING, st["small"])])
    for target, morph in genetic_calls(result):
        rows.append(
            [
                _p(f"P({escape(target.name)} | AML)<br/>by morphology", st["base"]),
                _p(escape(genetic_text(morph)), st["base"]),
                _p(escape(target_meaning(target)), st["small"]),
            ]
        )
    if result.p_npm1 is not None:
        rows.append(
            [
                _p("P(NPM1 mutated)<br/>whole image", st["base"]),
                f"{result.p_npm1:.3f} ({call_word(result.npm1_positive)} at threshold "
                f"{result.npm1_threshold:g})",
                _p(WHOLE_IMAGE_NPM1_MEANING, st["small"]),
            ]
        )
    if result.blast_percent is not None:
        rows.append(
            [
                "Blasts",
                f"{result.blast_percent:.1f} % of {result.n_cells_counted} counted cells",
                _p(
                    f"AI count of {result.n_cells_counted} cells over the submitted images; "
                    "read it with its 95 % interval (table below). The WHO/ICC blast "
                    "thresholds refer to a hematologist's count of at least 500 cells.",
                    st["small"],
                ),
            ]
        )
    domain = domain_text(result)
    if domain is not None:
        rows.append(
            ["Domain check", _p(escape(domain), st["base"]), _p(DOMAIN_MEANING, st["small"])]
        )
    if result.p_npm1_withheld:
        rows.append(
            [
                _p("P(NPM1 mutated)<br/>whole image", st["base"]),
                _p(escape(f"not available: {result.p_npm1_withheld}"), st["base"]),
                _p(WHOLE_IMAGE_NPM1_MEANING, st["small"]),
            ]
        )
    synthetic = synthetic_text(result)
    if synthetic is not None:
        rows.append(
            [
                "Synthetic models",
                _p(escape(", ".join(result.synthetic_stages)), st["base"]),
                _p(escape(synthetic), st["small"]),
            ]
        )
    return _table(rows, [30 * mm, 52 * mm, 98 * mm])


def _differential(result: AnalysisResult, st: dict[str, Any]) -> list[Any]:
    from reportlab.lib.units import mm

    rows: list[list[Any]] = [["Cell type", "Code", "Count", "%", "95 % interval"]]
    for d in result.differential:
        rows.append(
            [
                _name(d.code, d.name),
                d.code,
                str(d.count),
                f"{100 * d.fraction:.1f}",
                f"{100 * d.ci_low:.1f} - {100 * d.ci_high:.1f}",
            ]
        )
    rows.append(["Counted nucleated cells", "", str(result.n_cells_counted), "100.0", ""])
    others = non_counted(result)
    words = ", ".join(f"{_name(k)} {v}" for k, v in others.items()) or "none"
    note = (
        f"Detected but not counted: {escape(words)} ({result.n_cells_detected} detections in "
        "all). Intervals: Wilson 95 % for the fraction of counted cells."
    )
    return [
        _table(rows, [62 * mm, 14 * mm, 16 * mm, 16 * mm, 28 * mm]),
        _p(note, st["small"]),
    ]


def _fit(png: bytes, width_pt: float) -> Any:
    """A platypus Image of `png` `width_pt` wide on the page: downscaled to at most
    `_MAX_FIGURE_PX` wide and embedded as JPEG (a photograph; Flate makes it ~5x larger)."""
    from PIL import Image as PILImage
    from reportlab.platypus import Image

    im = PILImage.open(io.BytesIO(png)).convert("RGB")
    if im.width > _MAX_FIGURE_PX:
        im = im.resize((_MAX_FIGURE_PX, round(im.height * _MAX_FIGURE_PX / im.width)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    buf.seek(0)
    return Image(buf, width=width_pt, height=width_pt * im.height / im.width)


def _legend(image: ImageResult, st: dict[str, Any]) -> Any:
    """A swatch per cell type shown in the figure, in taxonomy order."""
    from reportlab.lib import colors
    from reportlab.lib.units import mm

    present = {c.cell_type or c.detector_label for c in image.cells}
    codes = [c for c in TYPE_COLOURS if c in present] + sorted(present - set(TYPE_COLOURS))
    if not codes:
        return _p("No cells detected in this image.", st["small"])
    per_row = 4
    style: list[Any] = [("FONTSIZE", (0, 0), (-1, -1), 7)]
    rows: list[list[Any]] = []
    for start in range(0, len(codes), per_row):
        row: list[Any] = []
        for col, code in enumerate(codes[start : start + per_row]):
            r = start // per_row
            rgb = TYPE_COLOURS.get(code, (255, 255, 255))
            style.append(
                ("BACKGROUND", (2 * col, r), (2 * col, r), colors.Color(*(v / 255 for v in rgb)))
            )
            style.append(("BOX", (2 * col, r), (2 * col, r), 0.25, colors.black))
            row += ["", _p(f"{code} {escape(_name(code))}", st["small"])]
        rows.append(row + [""] * (2 * per_row - len(row)))
    return _layout(rows, [4 * mm, 41 * mm] * per_row, style, rowHeights=4.5 * mm)


def _figure(figure: Figure, result: AnalysisResult, st: dict[str, Any]) -> Any:
    """Heading, the overlay and the heatmap side by side, their scales; kept on one page."""
    from reportlab.lib.units import mm
    from reportlab.platypus import KeepTogether

    im = figure.image
    size = f"{im.width} x {im.height} px"
    if im.um_per_px:
        size += f", {im.um_per_px:g} um/px"
    where = f"image {im.index + 1} of {result.n_images} ({size}; {im.n_counted} counted cells)"
    if result.slide is not None:
        where += f", slide region {im.index + 1} of {len(result.slide.regions)}"
    boxes = "Cell boxes coloured by type (legend below)"
    if result.importance_source:
        boxes += "; thicker, brighter boxes: cells that weighed more in the call"
    left: list[Any] = [_fit(figure.overlay_png, 86 * mm), _p(boxes, st["small"])]
    right: list[Any] = []
    if figure.heatmap_png is not None:
        scale = _layout(
            [["low", _fit(colour_scale_png(), 50 * mm), "high"]],
            [8 * mm, 52 * mm, 10 * mm],
            [("FONTSIZE", (0, 0), (-1, -1), 7), ("VALIGN", (0, 0), (-1, -1), "MIDDLE")],
        )
        right = [
            _fit(figure.heatmap_png, 86 * mm),
            scale,
            _p(
                "Occlusion heatmap of the NPM1 model, importance relative within this image: "
                "where the model looked, not a finding in itself.",
                st["small"],
            ),
        ]
    grid = _layout([[left, right]], [90 * mm, 90 * mm], [("LEFTPADDING", (0, 0), (-1, -1), 0)])
    return KeepTogether(
        [
            _p("Most informative image", st["h"]),
            _p(escape(where[:1].upper() + where[1:]), st["base"]),
            grid,
            _legend(im, st),
        ]
    )


def _versions(result: AnalysisResult, st: dict[str, Any]) -> list[Any]:
    from reportlab.lib.units import mm

    rows: list[list[Any]] = [["Model", "Version"]]
    rows += [[stage, v.version] for stage, v in sorted(result.model_versions.items())]
    note = f"Result schema {result.schema_version}; generated {escape(result.generated_at)}."
    return [_p("Model versions", st["h"]), _table(rows, [40 * mm, 60 * mm]), _p(note, st["small"])]


def _signature(sign_out: SignOut | None, st: dict[str, Any]) -> list[Any]:
    """Lines for a handwritten sign-out on a printed preliminary report."""
    from reportlab.lib.units import mm
    from reportlab.platypus import Spacer

    if sign_out is not None:
        return []
    rows = [["Reviewed by (hematologist)", "", "Date / time", ""], ["Comment", "", "", ""]]
    style = [
        ("FONTSIZE", (0, 0), (-1, -1), 8),
        ("LINEBELOW", (1, 0), (1, 0), 0.5, "black"),
        ("LINEBELOW", (3, 0), (3, 0), 0.5, "black"),
        ("LINEBELOW", (1, 1), (3, 1), 0.5, "black"),
        ("SPAN", (1, 1), (3, 1)),
        ("TOPPADDING", (0, 0), (-1, -1), 8),
    ]
    return [Spacer(1, 4 * mm), _layout(rows, [42 * mm, 62 * mm, 22 * mm, 54 * mm], style)]


STATUS_LABEL = {"P": "AI-generated, preliminary", "F": "final", "C": "corrected"}


def build_pdf(
    *,
    case: CaseHeader,
    result: AnalysisResult,
    figure: Figure | None = None,
    sign_out: SignOut | None = None,
    note: str | None = None,
) -> bytes:
    """The report as PDF bytes (PDF/A-2b parts included). `figure`: the image to show
    (`reading.most_informative_image` and its PNGs), None when the case has none; `note`: a
    line under the status banner (e.g. that the case is synthetic)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate, Spacer

    _fonts()
    st = _styles()
    status = result_status(sign_out)
    story: list[Any] = [
        _p("MarrowScope - AI analysis of bone-marrow smear images", st["title"]),
        _banner(sign_out, note, st),
        Spacer(1, 3 * mm),
        _case_block(case, result, st),
        _p("Findings", st["h"]),
        _findings(result, st),
        _p("Differential count", st["h"]),
        *_differential(result, st),
    ]
    if figure is not None:
        story.append(_figure(figure, result, st))
    story += [*_versions(result, st), *_signature(sign_out, st)]

    def on_page(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont(FONT, 7)
        canvas.drawString(15 * mm, 9.5 * mm, f"{case.accession} - {STATUS_LABEL[status]}")
        canvas.drawRightString(195 * mm, 9.5 * mm, f"page {doc.page}")
        canvas.drawString(15 * mm, 6.5 * mm, result.disclaimer)
        canvas.restoreState()

    def first_page(canvas: Any, doc: Any) -> None:
        make_pdfa(canvas)
        on_page(canvas, doc)

    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=12 * mm,
        bottomMargin=16 * mm,
        title=f"MarrowScope report {case.accession}",
        author="MarrowScope",
        subject=f"AI analysis {case.analysis_id} ({STATUS_LABEL[status]})",
        creator="MarrowScope gateway",
        keywords="bone marrow; AML; AI decision support",
        initialFontName=FONT,
        lang="en",
    )
    doc.build(story, onFirstPage=first_page, onLaterPages=on_page)
    return buf.getvalue()
