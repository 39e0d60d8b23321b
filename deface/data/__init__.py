"""Training data: label definitions, the labeller, synthesis and the Lightning DataModule."""
