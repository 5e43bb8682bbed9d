"""Checker for fixtures recorded from the released CLIP-ES code (``clip-es-tiny``)."""
