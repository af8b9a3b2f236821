"""The control node: fixed-rate serving, wire protocol, safety, logging, and the ddpg command."""
