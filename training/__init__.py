"""DDPG training: replay, noise, updates, the online trainer, evaluation, checkpoints, metrics.

Importing this package imports nothing heavy; the torch-using modules are imported by name.
"""
