"""DICOM SR (Comprehensive 3D SR, TID 1500 measurement report, highdicom.sr) referencing the result SEG."""

from __future__ import annotations

import copy
import dataclasses
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from livernode import __version__
from livernode.fsutil import atomic_write
from livernode.imaging.postprocess import Findings
from livernode.imaging.segwrite import Algorithm, encode_from, write_parts
from livernode.imaging.volume import LIVER as LIVER_LABEL
from livernode.imaging.volume import TUMOUR as TUMOUR_LABEL

VOLUME = Code("118565006", "SCT", "Volume")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
LIVER = Code("10200004", "SCT", "Liver")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
CT_PROCEDURE = Code("77477000", "SCT", "Computerized axial tomography")
YES, NO = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No")
# No standard concept exists for these; a private coding scheme keeps them machine-readable.
TUMOUR_BURDEN = Code("TB", "99LIVERNODE", "Tumour burden (tumour volume / liver volume)")
LESION_COUNT = Code("LC", "99LIVERNODE", "Lesion count")
LIVER_COMPLETE = Code("LIVCOMPLETE", "99LIVERNODE", "Liver completely within the scan")
ML = Code("mL", "UCUM", "milliliter")
MM = Code("mm", "UCUM", "millimeter")
PERCENT = Code("%", "UCUM", "percent")
COUNT = Code("{lesions}", "UCUM", "lesions")
# Lesions measured one by one in the SR: the largest ones. Count and total tumour volume always cover all of them
# (and summary.json lists every lesion). Beyond a couple of dozen, single lesions are not what a reader measures,
# and highdicom's report building grows faster than linearly with the number of groups (144 took 6 s).
MAX_SR_LESIONS = 20
EVIDENCE = Tag(0x0040A375)  # CurrentRequestedProcedureEvidenceSequence: the SR's elements from here on are encoded in one pass


class _Measurement(hd.sr.Measurement):
    """highdicom's Measurement (TID 300), built without coordinates. The ROI groups ask each measurement for its
    coordinates (TID 1410/1411 forbid them), which searches its items twice: a fifth of building the report.
    A measurement made without referenced_coordinates has none to find."""

    @property
    def referenced_coordinates(self) -> list:
        return []


def build_sr(seg: Dataset, source: Sequence[Dataset], findings: Findings, algorithm: Algorithm, *,
             series_uid: str, sop_uid: str, series_number: int = 9002, note: str = "",
             description: str = "") -> hd.sr.Comprehensive3DSR:
    """Liver volume, total tumour volume, tumour burden, lesion count and completeness on the liver segment;
    volume and longest axial diameter per lesion on the tumour segment, for the MAX_SR_LESIONS largest."""
    algo = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    source_series = hd.sr.SourceSeriesForSegmentation(str(source[0].SeriesInstanceUID))

    def segment(number: int) -> hd.sr.ReferencedSegment:
        return hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                       segment_number=number, source_series=source_series)

    def measure(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
        return _Measurement(name=name, value=round(float(value), 3), unit=unit, algorithm_id=algo)

    site = [hd.sr.FindingSite(anatomic_location=LIVER)]
    groups = [hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Liver"),
        referenced_segment=segment(LIVER_LABEL), finding_type=LIVER, algorithm_id=algo,
        measurements=[measure(VOLUME, findings.liver_volume_ml, ML),
                      measure(TUMOUR_BURDEN, findings.tumour_burden_percent, PERCENT),
                      measure(LESION_COUNT, len(findings.lesions), COUNT)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            LIVER_COMPLETE, NO if findings.liver_touches_scan_edge else YES)],
    )]
    groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="All liver tumours"),
        referenced_segment=segment(TUMOUR_LABEL), finding_type=NEOPLASM, finding_sites=site, algorithm_id=algo,
        measurements=[measure(VOLUME, findings.tumour_volume_ml, ML)],
    ))
    largest = sorted(findings.lesions, key=lambda le: (-le.voxels, le.index))[:MAX_SR_LESIONS]
    for lesion in sorted(largest, key=lambda le: le.index):
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Lesion {lesion.index}"),
            referenced_segment=segment(TUMOUR_LABEL), finding_type=NEOPLASM, finding_sites=site, algorithm_id=algo,
            measurements=[measure(VOLUME, lesion.volume_ml, ML),
                          measure(LONG_AXIS, lesion.longest_axial_diameter_mm, MM)],
        ))
        line = _diameter_line(lesion, source)
        if line is not None:  # the same diameter drawn on its slice (TID 1410): viewers show it on the image
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                             identifier=f"Lesion {lesion.index} long axis"),
                referenced_region=line, finding_type=NEOPLASM, finding_sites=site, algorithm_id=algo,
                measurements=[measure(LONG_AXIS, lesion.longest_axial_diameter_mm, MM)],
            ))
    observer = hd.sr.ObserverContext(
        observer_type=Code("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="livernode", manufacturer_name="livernode", model_name=algorithm.name),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_PROCEDURE, imaging_measurements=groups,
    )
    sr = _document(report, [seg, *source], series_instance_uid=series_uid, series_number=series_number,
                   sop_instance_uid=sop_uid, instance_number=1, manufacturer="livernode",
                   is_complete=True, is_final=False, is_verified=False)
    name = description or "livernode liver measurements"  # the research-use statement, when the model has one
    sr.SeriesDescription = name[:64 - len(note)] + note
    sr.SoftwareVersions = __version__
    sr.CodingSchemeIdentificationSequence = _private_scheme()
    return sr


def _diameter_line(lesion, source: Sequence[Dataset]) -> hd.sr.ImageRegion | None:
    """The lesion's longest axial diameter as a two-point POLYLINE on its source slice, in that image's pixel
    coordinates (column, row; a pixel's centre is at +0.5); None for a lesion of one pixel in every slice."""
    k, r0, c0, r1, c1 = lesion.diameter_line
    if (r0, c0) == (r1, c1):
        return None
    points = np.array([[c0 + 0.5, r0 + 0.5], [c1 + 0.5, r1 + 0.5]], np.float32)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
                             source_image=hd.sr.SourceImageForRegion.from_source_image(source[k]))


def _document(report: hd.sr.MeasurementReport, evidence: Sequence[Dataset], **kw) -> hd.sr.Comprehensive3DSR:
    """highdicom's Comprehensive3DSR around `report`, built in one pass. Given the whole tree, highdicom
    deep-copies it, parses the copy back into content items and searches it twice for references to check against
    the evidence: over half of building a 50-lesion report (tests/daemon/test_sr_fast.py). Here it gets the root
    container without children and the tree is attached as built. Every reference in the tree is `seg` or a source
    image, all in `evidence` by construction; the test pins the result to highdicom's own construction."""
    root = report[0]
    bare = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            bare.add(elem)
    bare.ContentSequence = []  # highdicom searches it for references: none
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=bare, **kw)
    sr.ContentSequence = root.ContentSequence  # the element highdicom would have copied from `report`
    sr._content = report  # what `sr.content` returns; highdicom's own from_dataset sets it the same way
    return sr


# What build_sr reads of each source slice (highdicom: the evidence's UIDs, and for a diameter drawn on a slice
# that it is an image of a modality that may be measured), and the SEG's elements it does not read: its frames'
# references and descriptions. tests/daemon/test_sr_process.py pins the SR from these to the SR from the whole.
SOURCE_READ = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
               "Columns", "SamplesPerPixel", "PixelRepresentation", "NumberOfFrames")
SEG_UNREAD = ("ReferencedSeriesSequence", "SourceImageSequence", "DimensionOrganizationSequence",
              "DimensionIndexSequence", "SegmentSequence", "SharedFunctionalGroupsSequence",
              "PerFrameFunctionalGroupsSequence", "PixelData")


@dataclass(frozen=True)
class SrJob:
    """Everything `build_sr` and `write_sr` need, small enough to hand to another process: what the SR reads of
    the SEG and of the source slices, and the findings without their label volume."""

    seg: Dataset
    source: tuple[Dataset, ...]
    findings: Findings
    algorithm: Algorithm
    path: Path
    series_uid: str
    sop_uid: str
    series_number: int = 9002
    note: str = ""
    description: str = ""

    @classmethod
    def of(cls, seg: Dataset, source: Sequence[Dataset], findings: Findings, algorithm: Algorithm, path: Path,
           **kw) -> "SrJob":
        """The job for `seg` (its object model, with or without its frames) and `source`, copied: neither is read
        again after this returns, so the SEG's writer may go on changing its own."""
        head = Dataset()
        for elem in seg:
            if elem.keyword not in SEG_UNREAD:
                head.add(copy.deepcopy(elem))
        slim = []
        for ds in source:
            one = Dataset()
            for keyword in SOURCE_READ:
                if keyword in ds:
                    one.add(copy.deepcopy(ds[keyword]))
            slim.append(one)
        no_labels = dataclasses.replace(findings, labels=np.zeros((0, 0, 0), np.uint8))
        return cls(head, tuple(slim), no_labels, algorithm, Path(path), **kw)

    def run(self) -> float:
        """Build and write the SR; the seconds it took."""
        t = time.perf_counter()
        write_sr(build_sr(self.seg, self.source, self.findings, self.algorithm, series_uid=self.series_uid,
                          sop_uid=self.sop_uid, series_number=self.series_number, note=self.note,
                          description=self.description), self.path)
        return round(time.perf_counter() - t, 3)


def _private_scheme():
    item = Dataset()
    item.CodingSchemeDesignator = "99LIVERNODE"
    item.CodingSchemeName = "livernode measurement concepts"
    item.CodingSchemeResponsibleOrganization = "livernode"
    return [item]


def write_sr(sr: hd.sr.Comprehensive3DSR, path: Path) -> None:
    """The SR as a Part 10 file, atomically. The evidence and content trees (from
    CurrentRequestedProcedureEvidenceSequence on: some 2,000 items for 20 lesions) are encoded by
    `segwrite.encode_from`, the elements before them by pydicom: the bytes `save_as` writes. When pydicom must
    write it all (a value not of the plain kinds), it checks for ambiguous VRs over the whole tree from the top and
    then again below every nested item it writes; the items built here are marked as already in the file's
    encoding, so they are checked once, from the top."""
    buf = io.BytesIO()
    rest = encode_from(sr, EVIDENCE)
    if rest is not None:
        write_parts(sr, buf, EVIDENCE, rest)
    else:
        implicit = sr.file_meta.TransferSyntaxUID.is_implicit_VR  # what save_as will write
        for keyword in ("ContentSequence", "CurrentRequestedProcedureEvidenceSequence"):  # not those shared with `seg`
            _mark_encoded(sr.get(keyword) or [], implicit=implicit)
        sr.save_as(buf, enforce_file_format=True)
    atomic_write(path, buf.getbuffer())


def _mark_encoded(items: Sequence[Dataset], *, implicit: bool) -> None:
    """Mark `items` and every item below them as little endian in `implicit` VR and their inherited character set:
    pydicom writes them as it writes items read from such a file. A wrong mark costs only the check the top-level
    pass over the whole tree has done already."""
    for item in items:
        item.set_original_encoding(implicit, True, item._character_set)
        for elem in item:
            if elem.VR == "SQ":
                _mark_encoded(elem.value, implicit=implicit)
