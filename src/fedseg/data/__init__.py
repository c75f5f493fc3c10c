"""Data layer: site folders, NIfTI/DICOM I/O, checks, preprocessing, splits, phantoms.

Knows nothing about training or networking.
"""
