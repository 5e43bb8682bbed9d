"""Data: datasets, label-map I/O, transforms and synthetic demo data."""
