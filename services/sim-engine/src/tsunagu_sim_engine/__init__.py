"""sim-engine: Authoritative fixed-timestep simulation rooms, state to clients as keyframes and deltas."""
