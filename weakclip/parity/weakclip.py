"""Checker for fixtures recorded from the released WeakCLIP code (``weakclip-tiny``, ``weakclip-tiny-odd``)."""
