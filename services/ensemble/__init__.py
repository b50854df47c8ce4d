"""Ensemble model service: P(AML), and P(NPM1 mutated | AML) when the model has that head,
from the case feature vector over OIP gRPC."""
