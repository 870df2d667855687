"""Diffusion Composer's engine: recipes in, images out, independent of any UI."""
