"""Domain exceptions shared by the library, the services and the gateway.

The gRPC runtime maps them to status codes in one interceptor and the gateway maps them to
HTTP errors; nothing else should need to know about transport codes.
"""


class MarrowScopeError(Exception):
    """Base class of every MarrowScope domain error."""


class InvalidInput(MarrowScopeError, ValueError):
    """The caller sent something we cannot process (bad image, shape, dtype, names)."""


class ModelNotFound(MarrowScopeError, LookupError):
    """The requested model or model version does not exist or is not loaded."""


class ModelNotReady(MarrowScopeError):
    """The model exists but is not loaded or warmed up yet, or is draining."""


class IncompatiblePipeline(MarrowScopeError):
    """Model versions whose recorded lineage or configuration do not fit together."""
