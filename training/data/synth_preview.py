"""Contact sheet of a synthetic data set (`preview.png`) for a person to look at.

A few images per case group (control, AML NPM1 wild type, AML NPM1 mutated), downscaled,
with every annotation's box coloured by type and its code written, and a caption naming
the case, its group and its blast percentage.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from marrowscope.taxonomy import CODE_BY_CATEGORY_ID

from .synth_cohort import CaseSpec

TYPE_COLOURS = {
    "BLA": (220, 20, 60),
    "PMO": (255, 140, 0),
    "MYB": (218, 165, 32),
    "MMZ": (154, 205, 50),
    "NGB": (34, 139, 34),
    "NGS": (0, 128, 128),
    "EOS": (255, 99, 71),
    "BAS": (75, 0, 130),
    "MON": (30, 144, 255),
    "LYT": (0, 0, 205),
    "PLM": (139, 69, 19),
    "EBO": (199, 21, 133),
    "RBC": (160, 160, 160),
}
GROUPS = ("control", "aml_npm1_wt", "aml_npm1_mut")


def write_preview(
    out_dir: Path, coco: dict, specs: list[CaseSpec], per_group: int = 3, thumb_width: int = 400
) -> Path:
    """Write `out_dir/preview.png`: rows = case groups, columns = first image of up to
    `per_group` cases of that group. Returns the path."""
    from PIL import Image, ImageDraw

    first_image = {}
    for im in coco["images"]:
        first_image.setdefault(im["case_id"], im)
    anns = defaultdict(list)
    for a in coco["annotations"]:
        anns[a["image_id"]].append(a)
    by_group = defaultdict(list)
    for s in specs:
        if len(by_group[s.group]) < per_group:
            by_group[s.group].append(s)
    rows = [g for g in GROUPS if by_group[g]]
    im0 = coco["images"][0]
    scale = thumb_width / im0["width"]
    tw, th = thumb_width, round(im0["height"] * scale)
    cap = 16
    sheet = Image.new("RGB", (per_group * (tw + 6) + 6, len(rows) * (th + cap + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    for r, g in enumerate(rows):
        for c, spec in enumerate(by_group[g]):
            im = first_image[spec.case_id]
            thumb = Image.open(out_dir / im["file_name"]).convert("RGB").resize((tw, th))
            x0, y0 = 6 + c * (tw + 6), 6 + r * (th + cap + 6)
            sheet.paste(thumb, (x0, y0 + cap))
            blasts = sum(CODE_BY_CATEGORY_ID[a["category_id"]] == "BLA" for a in anns[im["id"]])
            draw.text(
                (x0, y0 + 2),
                f"{spec.case_id} {g} blast target "
                f"{100 * spec.blast_fraction:.0f}% ({blasts} BLA here)",
                fill=(0, 0, 0),
            )
            for a in anns[im["id"]]:
                code = CODE_BY_CATEGORY_ID[a["category_id"]]
                if code == "RBC":
                    continue
                bx, by, bw, bh = (v * scale for v in a["bbox"])
                col = TYPE_COLOURS[code]
                draw.rectangle(
                    [x0 + bx, y0 + cap + by, x0 + bx + bw, y0 + cap + by + bh], outline=col
                )
                flags = "".join(k[0] for k, v in a["attributes"].items() if v and code == "BLA")
                draw.text(
                    (x0 + bx + 2, y0 + cap + by + 1),
                    code + (f":{flags}" if flags else ""),
                    fill=col,
                )
    path = out_dir / "preview.png"
    sheet.save(path)
    return path
