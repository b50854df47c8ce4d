"""Cell-type model service: per-crop cell-type and attribute probabilities over OIP gRPC."""
