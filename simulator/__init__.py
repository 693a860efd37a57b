"""Simulator: a generated estate and DUIS traffic, SMETS2 device endpoints, record and replay."""
