"""SOURCE -> model + what was loaded."""
