"""Shared by the offline and online halves: DICOM volumes, preprocessing, phantoms and metrics."""
