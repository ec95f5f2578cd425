"""Converters: each outside weight naming -> the canonical names of flux1's modules."""
