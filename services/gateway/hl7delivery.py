"""Delivers the HL7 outbox (`hl7outbox`) over MLLP (`mllp`) to each tenant's destination.

Per row: render the ORU^R01 once from the stored result (`hl7.build_oru`; the PDF as a
reference to `?format=pdf` or embedded, per destination), send it, wait for the ACK:

- AA (or CA): delivered.
- AE (or CE), an application error: retried with backoff; parked after the destination's
  `max_error_attempts` such answers.
- AR (or CR), rejected: parked at once (the message or the destination's settings are
  wrong; sending it again unchanged cannot help).
- No connection, no ACK in time, an ACK for another control id: retried with backoff and
  without limit, so a LIS that is down gets every message, in order, once it is back.
- The message cannot be rendered: parked (a bug to look at; the result is untouched).

Parked rows stay in the table with their message, ACK and error; `requeue` (`python -m
services.gateway.hl7delivery requeue ID`) sends one again. Outcomes are counted in
`marrowscope_gateway_hl7_messages_total{outcome}` and every attempt is in the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from services.gateway import hl7outbox, store
from services.gateway.db import Analysis, Hl7Outbox, now
from services.gateway.hl7 import Hl7Options, build_no_result_oru, build_oru
from services.gateway.mllp import Hl7Destination, MllpError, send
from services.gateway.pdfsign import ReportSigner, finish
from services.gateway.reading import case_header
from services.gateway.result import AnalysisResult
from services.gateway.review.cases import sign_out_record
from services.gateway.webhooks import backoff_s

log = logging.getLogger(__name__)
ACCEPT, ERROR, REJECT = {"AA", "CA"}, {"AE", "CE"}, {"AR", "CR"}
NO_DESTINATION_RETRY_S = 60.0


def _options(d: Hl7Destination) -> Hl7Options:
    return Hl7Options(
        sending_facility=d.sending_facility,
        receiving_application=d.receiving_application,
        receiving_facility=d.receiving_facility,
        processing_id=d.processing_id,
        pdf=d.pdf,
        site_codes=d.site_codes,
    )


def render(
    session: Any,
    blobs: Any,
    row: Hl7Outbox,
    d: Hl7Destination,
    base_url: str,
    pdf_signer: ReportSigner | None = None,
) -> str:
    """The row's ORU^R01 from the stored analysis and result (MSH-10: the row's id)."""
    a = session.get(Analysis, row.analysis_id)
    if a is not None and row.event in NO_RESULT_EVENTS:
        return build_no_result_oru(
            case=case_header(a),
            outcome=row.event,
            reason=a.reason,
            control_id=row.id[:20],
            options=_options(d),
        )
    stored = store.result_of(session, analysis_id=row.analysis_id)
    if a is None or stored is None:
        raise LookupError(f"analysis {row.analysis_id} has no stored result")
    result = AnalysisResult.model_validate(stored)
    case = case_header(a)
    # the first message of a case is preliminary; a sign-out's carries it (F, or C amended)
    sign_out = sign_out_record(session, a.id) if row.event in SIGN_OUT_EVENTS else None
    pdf = None
    if d.pdf == "embed":
        from services.gateway.pdf import build_pdf, figure_from_blobs

        pdf = finish(
            build_pdf(
                case=case, result=result, figure=figure_from_blobs(blobs, result), sign_out=sign_out
            ),
            sign_out,
            pdf_signer,
        )
    url = f"{base_url}/v1/analyses/{a.id}/report?format=pdf"
    return build_oru(
        case=case,
        result=result,
        control_id=row.id[:20],
        options=_options(d),
        sign_out=sign_out,
        pdf=pdf,
        pdf_url=url if base_url else None,
    )


SIGN_OUT_EVENTS = frozenset({"signed_out", "amended"})
NO_RESULT_EVENTS = frozenset({"failed", "cancelled"})
"""Outbox events of an analysis that ended without a result (`store.finish`)."""


class Hl7Dispatcher:
    """The outbox loop of one worker process (several may run: rows are leased)."""

    def __init__(
        self,
        *,
        sessions: Any,
        blobs: Any,
        destinations: Mapping[str, Hl7Destination],
        base_url: str,
        metrics: Any,
        poll_s: float,
        backoff: tuple[float, float] = (2.0, 300.0),
        pdf_signer: ReportSigner | None = None,
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.destinations = destinations
        self.base_url = base_url
        self.pdf_signer = pdf_signer
        self.metrics = metrics
        self.poll_s = poll_s
        self.backoff = backoff

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await self.deliver_due()
            except Exception:
                log.exception("HL7 outbox round failed")
                sent = 0
            if not sent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)

    def _lease_s(self) -> float:
        longest = max((d.ack_timeout_s for d in self.destinations.values()), default=30.0)
        return 3 * longest

    async def deliver_due(self) -> int:
        def claim() -> list[tuple[str, str, str | None]]:
            with self.sessions.begin() as session:
                rows = hl7outbox.claim(session, lease_s=self._lease_s())
                return [(r.id, r.tenant, r.message) for r in rows]

        rows = await asyncio.to_thread(claim)
        for outbox_id, tenant, message in rows:
            await self._one(outbox_id, tenant, message)
        return len(rows)

    def _retry_at(self, attempts: int) -> float:
        return now() + backoff_s(attempts, base=self.backoff[0], cap=self.backoff[1])

    async def _one(self, outbox_id: str, tenant: str, message: str | None) -> None:
        d = self.destinations.get(tenant)
        if d is None:  # the destination was removed from the settings: keep the message
            error = f"no HL7 destination for tenant {tenant!r}"
            await self._record(
                outbox_id, "retry", error=error, next_attempt_at=now() + NO_DESTINATION_RETRY_S
            )
            return
        if message is None:
            try:
                message = await asyncio.to_thread(self._render, outbox_id, d)
            except Exception as exc:
                log.exception("HL7 message for outbox row %s cannot be rendered", outbox_id)
                await self._record(
                    outbox_id, "parked", error=f"render failed: {type(exc).__name__}: {exc}"
                )
                return
        control_id = outbox_id[:20]
        counts = await asyncio.to_thread(self._counts, outbox_id)
        try:
            ack = await send(d, message)
            if ack.control_id != control_id:
                raise MllpError(f"ACK for control id {ack.control_id!r}, not {control_id!r}")
        except MllpError as exc:
            log.warning("HL7 %s to %s:%d failed: %s", outbox_id, d.host, d.port, exc)
            await self._record(
                outbox_id,
                "retry",
                message=message,
                error=str(exc),
                next_attempt_at=self._retry_at(counts[0] + 1),
            )
            return
        text = f"{ack.code} {ack.text}".strip()
        if ack.code in ACCEPT:
            await self._record(outbox_id, "delivered", message=message, ack=ack.raw)
            return
        errors = counts[1] + 1
        park = ack.code in REJECT or ack.code not in ERROR or errors >= d.max_error_attempts
        log.warning("HL7 %s answered %s; %s", outbox_id, text, "parked" if park else "retrying")
        await self._record(
            outbox_id,
            "parked" if park else "retry",
            message=message,
            ack=ack.raw,
            error=text,
            next_attempt_at=None if park else self._retry_at(errors),
            error_answer=ack.code not in REJECT,
        )

    def _render(self, outbox_id: str, d: Hl7Destination) -> str:
        with self.sessions() as session:
            row = session.get(Hl7Outbox, outbox_id)
            return render(session, self.blobs, row, d, self.base_url, self.pdf_signer)

    def _counts(self, outbox_id: str) -> tuple[int, int]:
        """(attempts, error answers) so far."""
        with self.sessions() as session:
            row = session.get(Hl7Outbox, outbox_id)
            return (0, 0) if row is None else (int(row.attempts), int(row.error_answers))

    async def _record(self, outbox_id: str, outcome: hl7outbox.Outcome, **kw: Any) -> None:
        self.metrics.hl7_messages.labels(outcome).inc()

        def write() -> None:
            with self.sessions.begin() as session:
                hl7outbox.record(
                    session,
                    outbox_id=outbox_id,
                    outcome=outcome,
                    control_id=outbox_id[:20],
                    message=kw.get("message"),
                    ack=kw.get("ack"),
                    error=kw.get("error"),
                    next_attempt_at=kw.get("next_attempt_at"),
                    error_answer=kw.get("error_answer", False),
                )

        await asyncio.to_thread(write)


def main(argv: list[str] | None = None) -> int:
    """`requeue ID`: send a parked message again (after its cause is fixed)."""
    from services.gateway.config import GatewaySettings
    from services.gateway.db import make_engine, make_sessionmaker

    parser = argparse.ArgumentParser(description="HL7 outbox administration")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("requeue", help="a parked message back to pending").add_argument("id")
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions.begin() as session:
        ok = hl7outbox.requeue(session, outbox_id=args.id)
    print("requeued" if ok else f"no parked HL7 message {args.id}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
