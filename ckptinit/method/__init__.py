"""The method (DESIGN 1): units and tracing, the within-layer step, weight draws, the
between-layer step.

units.py finds the units in call order (and the calibration mode they are measured in);
trace.py records what follows each unit; stats.py holds mergeable per-channel moments;
within.py is Algorithm 1, drawing weights with draws.py (from the patches and whitening of
patches.py); between.py is Algorithm 2, moving the groups planned in moves.py until the
change rates of rates.py are equal.
"""
