"""Locust load tests: the gateway's REST flow and direct OIP gRPC calls (`make loadtest`)."""
