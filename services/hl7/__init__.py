"""The HL7 v2 order listener: OML^O33 and ORM^O01 over MLLP create analyses (docs/HL7.md).

`python -m services.hl7` runs it as its own process beside the gateway and its workers; it
shares their job store, image store and limits (`MS_GATEWAY_*`) and has its own settings
(`MS_HL7_*`, `config`). Modules: `orders` reads and checks a message (hl7apy), `ack` builds
the answer, `inputs` finds an order's images or slide by accession, `handler` turns one
message into one ACK (creating the analysis through `services.gateway.intake`), `server` is
the asyncio MLLP server with its limits, `metrics` its Prometheus metrics.
"""
