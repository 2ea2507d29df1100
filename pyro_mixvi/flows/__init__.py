"""Invertible transforms and flows (MAF, RealNVP, RBIG, conditional flows); floor 1."""
