"""Gymnasium/MuJoCo environments as a robot: environment checks, pacing, pixels, the bridge."""
