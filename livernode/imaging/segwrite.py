"""DICOM SEG (BINARY, highdicom) from a label volume, with the project's coded segment descriptions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from livernode import __version__
from livernode.imaging.labels import LABELS, CodedConcept


@dataclass(frozen=True)
class Algorithm:
    """What produced an automatic segmentation (from the model manifest)."""

    name: str
    version: str


def _code(c: CodedConcept) -> Code:
    return Code(c.value, c.scheme, c.meaning)


def segment_descriptions(algorithm: Algorithm | None) -> list[hd.seg.SegmentDescription]:
    algo_id = None
    if algorithm is not None:
        algo_id = hd.AlgorithmIdentificationSequence(
            name=algorithm.name, version=algorithm.version,
            family=Code("123109", "DCM", "Artificial Intelligence"),
        )
    return [
        hd.seg.SegmentDescription(
            segment_number=li.value,
            segment_label=li.name,
            segmented_property_category=_code(li.category),
            segmented_property_type=_code(li.property_type),
            algorithm_type="AUTOMATIC" if algorithm else "MANUAL",
            algorithm_identification=algo_id,
            anatomic_regions=[_code(li.anatomic_region)] if li.anatomic_region else None,
            # RecommendedDisplayCIELabValue: without it dcmqi and Slicer fall back to a default colour, and some
            # OHIF versions hang
            display_color=hd.color.CIELabColor.from_rgb(*li.rgb),
        )
        for li in LABELS
    ]


def build_seg(source: Sequence[Dataset], labels: np.ndarray, *, series_uid: str, sop_uid: str, series_number: int,
              algorithm: Algorithm | None, series_description: str) -> hd.seg.Segmentation:
    """A BINARY SEG over `source` (one dataset per slice, same order as `labels`, shape (n, rows, cols)).

    Every segment is declared even when empty, so a reader can tell "tumour absent" from "tumour not labelled".
    """
    if labels.shape[0] != len(source):
        raise ValueError(f"{labels.shape[0]} label slices for {len(source)} source images")
    # The label volume itself: its values are the segment numbers (1..n in LABELS' order), which highdicom takes
    # as segments that cannot overlap, without a stacked mask per segment or a check of each voxel for overlap.
    assert [li.value for li in LABELS] == list(range(1, len(LABELS) + 1))
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=np.ascontiguousarray(labels, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="livernode",
        manufacturer_model_name="livernode",
        software_versions=__version__,
        device_serial_number="0",
        omit_empty_frames=True,
        content_label="LIVER",
        content_description=series_description[:64],
    )
    seg.SeriesDescription = series_description[:64]
    return seg
