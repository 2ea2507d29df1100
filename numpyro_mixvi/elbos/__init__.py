"""ELBO estimators that talk to guides through the protocol in ``guides/base.py``; floor 4."""
