"""Stage 1: the RetroMAE loss (masking -> encoder -> decoder -> losses) and the trainer glue around it."""
