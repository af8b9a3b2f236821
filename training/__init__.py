"""DDPG training: replay, noise, updates, the online trainer, run directories, retrain from logs,
evaluation, continual retraining, metrics.

Importing this package imports nothing heavy; the torch-using modules are imported by name.
"""
