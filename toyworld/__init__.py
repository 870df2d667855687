"""A synthetic toy world of single coloured shapes, for training and measuring small models."""
