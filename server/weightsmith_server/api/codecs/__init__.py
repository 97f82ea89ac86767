"""Protos to domain objects and back, one module per resource; the only translation servicers need."""
