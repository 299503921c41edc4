"""Swappable pipeline parts: targets (what is predicted), validation (split + score),
output formatters (what a prediction file looks like). A new task is a new small part here."""
