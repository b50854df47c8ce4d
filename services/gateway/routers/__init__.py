"""One router per resource: analyses, reports (and images), health/metrics."""
