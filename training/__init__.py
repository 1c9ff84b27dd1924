"""Standalone training, data and reference-model package of the Morse node pack."""
