"""livernode: liver and liver-tumour segmentation for abdominal CT, as a DICOM node."""

__version__ = "0.1.0"
