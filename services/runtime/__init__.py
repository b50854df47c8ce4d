"""Thin Open Inference Protocol v2 gRPC runtime shared by every MarrowScope model service.

A service implements ``handler.ModelHandler`` and calls ``server.run_service``; see
``handler.py`` for the handler contract and ``server.py`` for a complete ``__main__``.
Stubs are generated from ``protos/`` by ``python -m services.runtime.codegen``.
"""
