"""Parsing LIDC-IDRI annotation XML files (``LidcReadMessage``).

One file per CT series holds one ``readingSession`` per radiologist. Each session lists
``unblindedReadNodule`` marks (a ``noduleID`` and ``roi`` elements: ``imageZposition``,
``imageSOP_UID``, ``inclusion`` TRUE/FALSE and ``edgeMap`` points with ``xCoord`` = column and
``yCoord`` = row) and ``nonNodule`` points, which are ignored.

The files come in several dialects: with or without the ``http://www.nih.gov`` namespace, and
with varying tag case (``SeriesInstanceUid`` / ``SeriesInstanceUID``). Tags are therefore matched
by their local name, case-insensitively. Chest X-ray files (root ``IdriReadMessage``) are
recognised and skipped by the caller. Nodules < 3 mm are marked by a single point: such a mark
has no contour and is reported as ``point_only``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from .common import InputError

__all__ = [
    "LidcXmlError",
    "Roi",
    "NoduleMark",
    "ReadingSession",
    "LidcAnnotation",
    "XmlHeader",
    "read_xml_header",
    "parse_lidc_xml",
    "CT_ROOT",
    "XRAY_ROOT",
]

CT_ROOT = "lidcreadmessage"
XRAY_ROOT = "idrireadmessage"


class LidcXmlError(InputError):
    """An LIDC XML file is unreadable, truncated or malformed (the message names the file)."""


@dataclass(frozen=True)
class Roi:
    """One contour of a mark on one slice.

    Attributes:
        z: ``imageZposition`` (mm).
        sop_instance_uid: ``imageSOP_UID`` of the slice.
        inclusion: True for the nodule's outline, False for a hole to cut out.
        points: P x 2 float array of (row, column) pixel coordinates (``yCoord``, ``xCoord``).
    """

    z: float
    sop_instance_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass
class NoduleMark:
    """One radiologist's mark of one nodule (``unblindedReadNodule``)."""

    nodule_id: str
    rois: list[Roi]
    reader_index: int

    @property
    def point_only(self) -> bool:
        """A nodule < 3 mm: every roi is a single point (no contour to fill)."""
        return all(len(np.unique(roi.points, axis=0)) < 2 for roi in self.rois)


@dataclass
class ReadingSession:
    """One radiologist's reading: their id and their nodule marks."""

    reader_index: int
    radiologist_id: str | None
    marks: list[NoduleMark] = field(default_factory=list)


@dataclass
class LidcAnnotation:
    """A parsed ``LidcReadMessage``: the series it annotates and the reading sessions, in file order."""

    path: str
    series_instance_uid: str
    study_instance_uid: str | None
    sessions: list[ReadingSession]


@dataclass(frozen=True)
class XmlHeader:
    """What the file is about, read from its first elements only."""

    path: str
    kind: str  # "ct", "xray" or "other"
    series_instance_uid: str | None


def _local(tag: str) -> str:
    """Local tag name, lower case (drops ``{namespace}``)."""
    return tag.rsplit("}", 1)[-1].lower()


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def read_xml_header(path: str | os.PathLike) -> XmlHeader:
    """Classify an XML file and read its series UID from the ``ResponseHeader`` (streaming).

    Reading stops at the first ``readingSession``, so this is cheap even for large files, and
    works on a file truncated later on (the full parse then reports the truncation). A syntax
    error before the header is complete is an error: the file would otherwise be dropped
    unnoticed.

    Raises:
        LidcXmlError: not XML, or an LIDC / IDRI file whose header is malformed or truncated.
    """
    path = os.fspath(path)
    root_name: str | None = None
    series_uid: str | None = None
    try:
        for event, element in ET.iterparse(path, events=("start", "end")):
            name = _local(element.tag)
            if root_name is None:
                root_name = name
                if name not in (CT_ROOT, XRAY_ROOT):
                    break
            if event == "end" and name == "seriesinstanceuid":
                series_uid = (element.text or "").strip() or None
            if name in ("readingsession", "cxrreadingsession") or (event == "end" and name == "responseheader"):
                break
    except ET.ParseError as error:
        if root_name is None:
            raise LidcXmlError(f"{path}: not a readable XML file ({error})") from error
        # the loop stops at the header's end, so an error here lies inside the header
        raise LidcXmlError(
            f"{path}: malformed XML in the header ({error}); fix or re-download the annotation file"
        ) from error
    except OSError as error:
        raise LidcXmlError(f"{path}: cannot read XML file ({error})") from error
    kind = {CT_ROOT: "ct", XRAY_ROOT: "xray"}.get(root_name or "", "other")
    return XmlHeader(path=path, kind=kind, series_instance_uid=series_uid)


def _parse_float(text: str | None, what: str, path: str) -> float:
    if text is None:
        raise LidcXmlError(f"{path}: {what} is missing")
    try:
        return float(text)
    except ValueError:
        raise LidcXmlError(f"{path}: {what} is not a number ({text!r})") from None


def _parse_roi(element: ET.Element, path: str, where: str) -> Roi:
    z = _parse_float(_child_text(element, "imagezposition"), f"{where}: imageZposition", path)
    sop = _child_text(element, "imagesop_uid") or ""
    inclusion_text = (_child_text(element, "inclusion") or "TRUE").upper()
    if inclusion_text not in ("TRUE", "FALSE"):
        raise LidcXmlError(f"{path}: {where}: inclusion must be TRUE or FALSE, got {inclusion_text!r}")
    points = []
    for edge in _children(element, "edgemap"):
        column = _parse_float(_child_text(edge, "xcoord"), f"{where}: xCoord", path)
        row = _parse_float(_child_text(edge, "ycoord"), f"{where}: yCoord", path)
        points.append((row, column))
    if not points:
        raise LidcXmlError(f"{path}: {where}: roi without edgeMap points")
    return Roi(z=z, sop_instance_uid=sop, inclusion=inclusion_text == "TRUE", points=np.asarray(points, dtype=float))


def parse_lidc_xml(path: str | os.PathLike) -> LidcAnnotation:
    """Parse a CT annotation file.

    Raises:
        LidcXmlError: a truncated or malformed file, an X-ray file, or a file without series UID.
    """
    path = os.fspath(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise LidcXmlError(f"{path}: truncated or malformed XML ({error})") from error
    except OSError as error:
        raise LidcXmlError(f"{path}: cannot read XML file ({error})") from error
    if _local(root.tag) != CT_ROOT:
        raise LidcXmlError(f"{path}: root element is <{_local(root.tag)}>, not an LIDC CT annotation (LidcReadMessage)")

    header = next(iter(_children(root, "responseheader")), None)
    series_uid = _child_text(header, "seriesinstanceuid") if header is not None else None
    if not series_uid:
        raise LidcXmlError(f"{path}: no SeriesInstanceUid in the ResponseHeader")
    study_uid = _child_text(header, "studyinstanceuid") if header is not None else None

    sessions = []
    for reader_index, session_element in enumerate(_children(root, "readingsession")):
        session = ReadingSession(reader_index, _child_text(session_element, "servicingradiologistid") or None)
        for nodule_element in _children(session_element, "unblindedreadnodule"):
            nodule_id = _child_text(nodule_element, "noduleid") or f"reader{reader_index}-{len(session.marks)}"
            where = f"reading session {reader_index + 1}, nodule '{nodule_id}'"
            rois = [_parse_roi(roi, path, where) for roi in _children(nodule_element, "roi")]
            if rois:
                session.marks.append(NoduleMark(nodule_id=nodule_id, rois=rois, reader_index=reader_index))
        sessions.append(session)
    return LidcAnnotation(path=path, series_instance_uid=series_uid, study_instance_uid=study_uid, sessions=sessions)
