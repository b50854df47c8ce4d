"""One order message in, one ACK out: check it (`orders`), find its inputs (`inputs`),
create its analysis through the gateway's own creation path (`services.gateway.intake`:
the REST API's checks, one transaction, idempotent on the placer order number per tenant),
and record the message and the answer in the audit log.

Synchronous (files, image decoding, the job store): the server runs it in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
import uuid
from typing import Any

from pydantic import ValidationError

from marrowscope.slides import SlideError
from services.gateway import intake, store
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.reading import HL7_ORDER_KEY
from services.gateway.schemas import SlideAnalysisCreate
from services.gateway.slidejob import check_slide, scan_checks
from services.hl7 import inputs
from services.hl7.ack import AckCode, build_ack
from services.hl7.config import Hl7ListenerSettings
from services.hl7.metrics import Hl7Metrics
from services.hl7.orders import Header, Order, Refused, check_header, parse_order, read_header

log = logging.getLogger(__name__)
LISTENER = "hl7-listener"
"""The key id and name the listener's analyses, idempotency rows and audit entries carry."""


class OrderHandler:
    """Turns one framed message's bytes into the ACK's ER7, with its side effects."""

    def __init__(
        self,
        *,
        settings: Hl7ListenerSettings,
        gateway: GatewaySettings,
        sessions: Any,
        blobs: Any,
        metrics: Hl7Metrics,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.sessions = sessions
        self.blobs = blobs
        self.metrics = metrics

    def oversized(self, head: bytes, fixed_tenant: str | None, peer: str) -> str:
        """The AR for a message over `max_message_bytes` (`head`: its first bytes, read for
        the MSH-10 the ACK names), audited like any message."""
        header = None
        with contextlib.suppress(Refused, UnicodeDecodeError):
            header = read_header(head.decode("utf-8").split("\r", 1)[0])
        limit = self.settings.max_message_bytes
        refused = Refused(
            "AR", 100, f"message larger than {limit} bytes (MS_HL7_MAX_MESSAGE_BYTES)"
        )
        tenant = (
            self.settings.tenant_of(fixed_tenant, header.facility_id) if header else fixed_tenant
        )
        return self._answer(head, header, tenant, "AR", refused.text, refused, None, peer, None)

    def handle(self, raw: bytes, fixed_tenant: str | None, peer: str) -> str:
        """The ACK for `raw` (the bytes between the MLLP start and end bytes)."""
        started = time.monotonic()
        header: Header | None = None
        tenant: str | None = None
        analysis_id: str | None = None
        code: AckCode = "AA"
        text = ""
        refused: Refused | None = None
        try:
            try:
                message = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused("AR", 102, "the message is not UTF-8 text") from None
            header = read_header(message)
            check_header(header)
            tenant = self.settings.tenant_of(fixed_tenant, header.facility_id)
            if tenant is None:
                raise Refused(
                    "AR",
                    103,
                    f"sending facility {header.facility_id!r} is not configured "
                    "(MS_HL7_FACILITY_TENANTS)",
                    location="MSH^1^4",
                )
            order = parse_order(message, header)
            done = self._create(order, tenant)
            analysis_id = done.analysis_id
            text = f"analysis {done.analysis_id}" + (" (order known)" if done.replayed else "")
        except Refused as exc:
            code, text, refused = exc.ack, exc.text, exc
        except Exception:  # the sender gets an answer it can retry; the details stay here
            error_id = uuid.uuid4().hex[:12]
            log.exception("HL7 order failed (error id %s)", error_id)
            refused = Refused("AE", 207, f"internal error, quote id {error_id}")
            code, text = "AE", refused.text
        return self._answer(raw, header, tenant, code, text, refused, analysis_id, peer, started)

    def _answer(
        self,
        raw: bytes,
        header: Header | None,
        tenant: str | None,
        code: AckCode,
        text: str,
        refused: Refused | None,
        analysis_id: str | None,
        peer: str,
        started: float | None,
    ) -> str:
        """Build the ACK, audit the exchange, count it."""
        ack = build_ack(header, code, text=text, refused=refused)
        kind = header.message_type if header is not None else "other"
        self._audit(raw, header, tenant, code, text, analysis_id, peer)
        self.metrics.messages.labels(kind, code).inc()
        if started is not None:
            self.metrics.seconds.labels(kind).observe(time.monotonic() - started)
        log.info(
            "HL7 %s msh10=%s tenant=%s -> %s %s",
            kind,
            header.control_id if header is not None else "",
            tenant,
            code,
            text,
        )
        return ack

    def _create(self, order: Order, tenant: str) -> intake.Submitted:
        """The order's analysis (or the one this tenant's placer number already created)."""
        metadata = {**order.metadata, HL7_ORDER_KEY: dataclasses.asdict(order.ref)}
        who = intake.Submitter(tenant=tenant, key_id=LISTENER, key_name=LISTENER)
        detail = (
            f"{order.header.message_type} msh10={order.header.control_id} "
            f"placer={order.placer} accession={order.accession} {order.kind}"
        )
        try:
            if order.kind == "slide":
                source, path = inputs.slide_of(
                    self.gateway, self.settings.slide_store, order.accession
                )
                meta = SlideAnalysisCreate.model_validate({**order.metadata, "slide": source})
                check_slide(path, meta.options.um_per_px, scan_checks(self.gateway))
                return intake.submit(
                    sessions=self.sessions,
                    blobs=self.blobs,
                    who=who,
                    metadata={
                        **meta.model_dump(mode="json"),
                        HL7_ORDER_KEY: metadata[HL7_ORDER_KEY],
                    },
                    images=[],
                    idempotency_key=order.idempotency_key,
                    action="hl7_order",
                    detail=detail,
                    slide_source=source,
                )
            paths = inputs.case_images(self.settings.input_root, order.accession)
            with inputs.opened(paths) as files:
                checked = intake.check_images(files, self.gateway, cells=order.kind == "cells")
            return intake.submit(
                sessions=self.sessions,
                blobs=self.blobs,
                who=who,
                metadata=metadata,
                images=checked,
                idempotency_key=order.idempotency_key,
                action="hl7_order",
                detail=detail,
            )
        except ApiError as exc:  # the REST API's own checks of the inputs
            raise Refused(
                "AE", 207, f"{order.accession}: {exc.detail}", app_code=exc.code
            ) from None
        except store.Conflict:
            raise Refused(
                "AE",
                205,
                f"placer order number {order.placer} was already used for a different order",
                location="ORC^1^2",
                app_code="idempotency_conflict",
            ) from None
        except ValidationError as exc:
            raise Refused("AE", 102, str(exc.errors()[0]["msg"])) from None
        except SlideError as exc:
            raise Refused(
                "AE", 207, f"{order.accession}: {exc.message}", app_code=f"slide_{exc.code}"
            ) from None

    def _audit(
        self,
        raw: bytes,
        header: Header | None,
        tenant: str | None,
        code: str,
        text: str,
        analysis_id: str | None,
        peer: str,
    ) -> None:
        """The message in and the ACK out, as two audit entries (the message itself only by
        its SHA-256: the audit log carries no patient data)."""
        kind = header.message_type if header is not None else "unreadable"
        control = header.control_id if header is not None else ""
        digest = hashlib.sha256(raw).hexdigest()
        sender = (
            f"{header.sending_application}/{header.sending_facility}" if header is not None else "?"
        )
        try:
            with self.sessions.begin() as session:
                store.audit(
                    session,
                    key_id=LISTENER,
                    key_name=LISTENER,
                    tenant=tenant,
                    action="hl7_in",
                    resource=analysis_id,
                    detail=(
                        f"{kind} msh10={control} from {sender} peer={peer} "
                        f"{len(raw)} bytes sha256={digest}"
                    )[:1000],
                )
                store.audit(
                    session,
                    key_id=LISTENER,
                    key_name=LISTENER,
                    tenant=tenant,
                    action="hl7_ack",
                    resource=analysis_id,
                    detail=f"{code} msh10={control}: {text}"[:1000],
                )
        except Exception:  # the job store is away: the ACK still goes out (AE if it failed)
            log.exception("audit of HL7 message msh10=%s failed", control)
