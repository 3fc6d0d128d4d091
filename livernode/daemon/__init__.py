"""Online half: the DICOM node. Imports `imaging` and `inference`, never `training`, `export` or TensorFlow."""
