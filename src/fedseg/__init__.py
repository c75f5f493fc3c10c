"""fedseg: federated 3D segmentation of medical images across institutions."""

__version__ = "0.1.0"
