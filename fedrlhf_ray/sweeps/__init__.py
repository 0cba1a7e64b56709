"""Ray Tune sweeps: the sweep file schema, one trial, and the runner."""
