"""Stubs generated from deepsurgery/v1/inference.proto: python -m protos.generate."""
