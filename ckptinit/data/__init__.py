"""--data -> calibration images."""
