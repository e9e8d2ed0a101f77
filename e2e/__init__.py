"""End-to-end tests and the local cluster they run on (test infrastructure, not part of the product)."""
