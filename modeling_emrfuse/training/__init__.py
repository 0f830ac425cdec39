"""Training: the loop, the grading-head fit and calibration, ablations and run plans."""
