"""NPM1 model service: P(NPM1 mutated) from whole images over OIP gRPC."""
