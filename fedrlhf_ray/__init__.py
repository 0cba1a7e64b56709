"""fedrlhf-ray: federated RLHF on Ray for recommendation."""
