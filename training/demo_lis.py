"""What a LIS gets for one of the demo's cases: the ORU^R01 the HL7 outbox would send and the
PDF report, each from the gateway's own code (nothing here builds a message or a page).

- ORU^R01: `services.gateway.hl7delivery.render`, the outbox's renderer, for a `finished`
  row of the analysis, addressed to `DEMO_LIS` with the PDF as a reference to the gateway's
  `?format=pdf` URL (the demo configures no HL7 destination, so the row is not stored and
  nothing is sent);
- the PDF: `GET /v1/analyses/{id}/report?format=pdf`, as the LIS would fetch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.gateway.mllp import Hl7Destination

DEMO_LIS = Hl7Destination(
    host="lis.invalid",  # never dialled: the message is rendered, not sent
    port=2575,
    receiving_application="LIS",
    receiving_facility="DEMO-LAB",
    sending_facility="MARROWSCOPE-DEMO",
    processing_id="D",
    pdf="reference",
)


def oru_and_pdf(
    client: Any, sessions: Any, blobs: Any, *, analysis_id: str, folder: Path, base_url: str
) -> tuple[str, Path]:
    """(the ORU^R01 with CR between segments, the PDF's path) of a finished analysis,
    written to `folder/oru.hl7` (one segment a line) and `folder/report.pdf`.

    client: an HTTP client of the gateway with a key that may read the analysis (its
    `get(url, params=...)` is called); sessions, blobs: the gateway's job store and blob
    store; base_url: the gateway's public URL, the base of the PDF reference."""
    from services.gateway.db import Hl7Outbox, new_id
    from services.gateway.hl7delivery import render

    response = client.get(f"/v1/analyses/{analysis_id}/report", params={"format": "pdf"})
    response.raise_for_status()
    with sessions() as session:
        row = Hl7Outbox(id=new_id(), analysis_id=analysis_id, event="finished", seq=1)
        oru = render(session, blobs, row, DEMO_LIS, base_url)
    folder.mkdir(parents=True, exist_ok=True)
    pdf = folder / "report.pdf"
    pdf.write_bytes(response.content)
    (folder / "oru.hl7").write_text(oru.replace("\r", "\n") + "\n")
    return oru, pdf
