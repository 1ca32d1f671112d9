"""Feedback controllers and open-loop schedules for the DP-SGD noise multiplier.

Scalar in (a leakage reading in nats, or None / NaN), σ out. Pure Python + numpy: no torch, no opacus.
"""
