"""Standalone densities over R^D (ClassifierWeightedMixture, FlowMixture); floor 2."""
