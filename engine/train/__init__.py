"""Training runs: resumable state, checkpoint rotation, logging, and one run per output name."""
