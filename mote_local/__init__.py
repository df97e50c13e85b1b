"""mote-local: see and tune the experts inside Mixture-of-Experts language models."""
