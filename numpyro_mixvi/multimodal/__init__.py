"""Multimodal VAEs with joint normalizing flows (JNF, JNFShared); floor 2."""
