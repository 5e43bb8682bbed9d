"""WeakCLIP: frozen CLIP refines CAM seeds into pseudo masks for weakly-supervised segmentation."""

__version__ = "0.1.0"
