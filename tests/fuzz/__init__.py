"""Fuzzing of every decoder (issue 12, "Bad input, at scale"): targets, seeds and the atheris runner."""
