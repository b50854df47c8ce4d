"""Ensemble model service: P(AML) from the case feature vector over OIP gRPC."""
