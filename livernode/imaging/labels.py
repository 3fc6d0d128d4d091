"""The label map shared by training targets, model outputs, the manifest and DICOM SEG segments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodedConcept:
    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class LabelInfo:
    value: int
    name: str
    category: CodedConcept
    property_type: CodedConcept
    anatomic_region: CodedConcept | None = None
    rgb: tuple[int, int, int] = (128, 128, 128)  # how viewers and the preview draw it


SCT_LIVER = CodedConcept("10200004", "SCT", "Liver")
LABELS: tuple[LabelInfo, ...] = (
    LabelInfo(1, "Liver", CodedConcept("91723000", "SCT", "Anatomical Structure"), SCT_LIVER, rgb=(40, 200, 60)),
    LabelInfo(
        2,
        "Liver tumour",
        CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure"),
        CodedConcept("108369006", "SCT", "Neoplasm"),
        SCT_LIVER,
        rgb=(230, 40, 40),
    ),
)
LABEL_NAMES = {0: "Background", **{li.value: li.name for li in LABELS}}
LABEL_BY_VALUE = {li.value: li for li in LABELS}
