"""Autoguides over the model's flat unconstrained latent vector; floor 3."""
