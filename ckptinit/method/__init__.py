"""The method: units and tracing, within-layer step, weight draws, between-layer step."""
