"""The MarrowScope gateway: the REST API the laboratory information system (LIS) talks to.

It validates uploads, keeps every accepted analysis in a durable job store, orchestrates the
model services over the Open Inference Protocol, aggregates per case, and builds JSON and
FHIR R4B reports. Nothing is created at import time: `app.create_app(settings)` builds the
app, `python -m services.gateway` serves it, `python -m services.gateway.worker` runs
workers alone.
"""
