"""OHIF Viewer, a real web DICOM viewer, shows our results as a radiologist would see them.

``pacsworker run`` writes a SEG and an SR for the CT head phantom; the CT, the SEG and the SR go to
a real Orthanc over STOW-RS; OHIF Viewer (the prebuilt ``@ohif/app`` static build) runs in a real
headless Chromium, served together with a proxy to Orthanc's DICOMweb on one origin, and is driven
over the Chrome DevTools Protocol with real mouse double-clicks on the series thumbnails.

What is checked is what a radiologist sees: the segmentation panel lists every segment of our SEG,
no warning or error notification appears, and after loading our SR the measurement panel lists its
"Long axis" lengths as OHIF formats them. Screenshots of every step land in
``$PACSWORKER_TEST_ARTIFACTS/ohif/`` (default ``<repo>/test-artifacts/ohif/``) and in the test's
tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pydicom
import pytest
from conftest import Orthanc, REPO, docs_images, free_port, missing, pacsworker_run

from ohif_browser import RIGHT_PANEL_LINES_JS, Chromium, OhifServer, OhifViewer, chromium_binary

OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(os.environ.get(
    "PACSWORKER_OHIF_DIST", Path.home() / ".cache" / "pacsworker" / f"ohif-{OHIF_VERSION}" / "dist"))
ARTIFACTS = Path(os.environ.get("PACSWORKER_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ohif"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
DOCS_IMAGES = {"03-segmentation-panel": "ohif-segmentation.png", "05-measurement-panel": "ohif-measurements.png"}
LONG_AXIS = ("103339001", "SCT")  # SNOMED CT "Long axis"

# generous: two CPU cores, no GPU, WebGL in software
STUDY_TIMEOUT = 120
STEP_TIMEOUT = 90


# ------------------------------------------------------------------------------------------------
# what we expect, read from our own objects


def _code(item) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


def long_axis_lengths(sr: pydicom.Dataset) -> list[tuple[str, float]]:
    """(tracking identifier, value in mm) of every "Long axis" NUM of the SR, wherever it sits."""
    found = []

    def walk(items, tracking: str) -> None:
        for item in items:
            if "ConceptNameCodeSequence" in item and _code(item) == ("112039", "DCM"):
                tracking = str(item.TextValue)
        for item in items:
            if item.get("ValueType") == "NUM" and "ConceptNameCodeSequence" in item and _code(item) == LONG_AXIS:
                measured = item.MeasuredValueSequence[0]
                unit = str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
                assert unit == "mm", f"long axis of {tracking!r} is in {unit!r}, not mm"
                found.append((tracking, float(measured.NumericValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence, tracking)

    walk(sr.ContentSequence, "")
    return found


def ohif_decimals(value: float) -> int:
    """Decimals OHIF's roundNumber(value, 2) keeps: 0 from 100 up, 1 from 10, 2 from 1, then more."""
    magnitude = abs(value)
    for limit, decimals in ((100, 0), (10, 1), (1, 2), (0.1, 3), (0.01, 4), (0.001, 5)):
        if magnitude >= limit:
            return decimals
    return 6


def ohif_length_text(value: float) -> str:
    """A length as OHIF's measurement panel writes it (JavaScript toFixed rounds half up)."""
    decimals = ohif_decimals(value)
    return f"{Decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)} mm"


def unmatched_lengths(panel_text: str, expected: list[tuple[str, float]]) -> list[str]:
    """The expected lengths that no distinct "<number> mm" of the panel shows (to OHIF's precision;
    one unit of the last shown digit is allowed, as OHIF may recompute a length from its end points)."""
    shown = [float(m) for m in re.findall(r"(-?\d+(?:\.\d+)?)\s*mm\b", panel_text)]
    missing_ones = []
    for tracking, value in expected:
        tolerance = 10.0 ** -ohif_decimals(value) + 1e-9
        match = next((i for i, number in enumerate(shown) if abs(number - value) <= tolerance), None)
        if match is None:
            missing_ones.append(f"{tracking!r}: {value} mm (OHIF would write {ohif_length_text(value)!r})")
        else:
            shown.pop(match)
    return missing_ones


# ------------------------------------------------------------------------------------------------
# fixtures: our results, a PACS holding them, OHIF in Chromium


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    if not (OHIF_DIST / "index.html").is_file():
        missing(f"the OHIF Viewer {OHIF_VERSION} static build at {OHIF_DIST} (scripts/test.sh fetches it with "
                f"'npm pack @ohif/app@{OHIF_VERSION}'; PACSWORKER_OHIF_DIST names another dist/ folder)")
    return OHIF_DIST


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import websocket  # noqa: F401 - websocket-client, to speak the DevTools protocol
    except ImportError:
        missing("the websocket-client Python package (pip install -e '.[test]')")
    binary = chromium_binary()
    if not binary:
        missing("Chromium (Debian: chromium)")
    return binary


@pytest.fixture(scope="module")
def results(dicom_dir, tmp_path_factory) -> dict:
    """``pacsworker run`` on the CT head phantom: the SEG and SR, and what OHIF should show of them."""
    out = tmp_path_factory.mktemp("ohif-results")
    run = pacsworker_run(dicom_dir / CT02, out)
    assert run.returncode == 0, f"pacsworker run failed:\n{run.stdout}\n{run.stderr}"
    seg = pydicom.dcmread(out / "seg.dcm")
    measurements = pydicom.dcmread(out / "sr.dcm")  # volumes and intensities, stored beside
    sr = pydicom.dcmread(out / "image_sr.dcm")  # the lengths on the source images: what OHIF shows
    labels = [str(segment.SegmentLabel) for segment in seg.SegmentSequence]
    lengths = long_axis_lengths(sr)
    assert labels, "our SEG has no segments"
    assert lengths, "our image SR has no 'Long axis' (SCT 103339001) measurement"
    sources = [pydicom.dcmread(path) for path in sorted((dicom_dir / CT02).glob("*.dcm"))]
    return {"seg": seg, "sr": sr, "measurements": measurements, "sources": sources, "labels": labels,
            "lengths": lengths, "study": str(seg.StudyInstanceUID)}


@pytest.fixture(scope="module")
def pacs(results, tmp_path_factory):
    """A PACS of its own, so that no other test's SEG or SR of the same study shows up in the viewer
    (and ours in no other test's counts)."""
    from dicomweb_client.api import DICOMwebClient

    server = Orthanc(tmp_path_factory.mktemp("ohif-orthanc")).start()
    try:
        DICOMwebClient(url=server.dicomweb_url).store_instances(
            results["sources"] + [results["seg"], results["measurements"], results["sr"]])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def viewer(ohif_dist, chromium, pacs, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    server = OhifServer(ohif_dist, pacs.dicomweb_url, free_port()).start()
    browser = None
    try:
        browser = Chromium(chromium, profile)
        yield OhifViewer(browser, server)
    finally:
        if browser is not None:
            browser.close()
        server.stop()


# ------------------------------------------------------------------------------------------------
# reporting


class Report:
    """Screenshots of each step, and failure messages that say what the viewer showed."""

    def __init__(self, viewer: OhifViewer, tmp_path: Path, name: str):
        self.viewer = viewer
        self.dirs = [ARTIFACTS / name, tmp_path / "ohif"]
        self.shots: list[Path] = []

    def screenshot(self, step: str) -> None:
        for_docs = docs_images(DOCS_IMAGES[step]) if step in DOCS_IMAGES else []
        try:
            paths = self.viewer.screenshot(*(d / f"{step}.png" for d in self.dirs), *for_docs)
        except Exception as exc:  # noqa: BLE001 - a failed screenshot must not hide the real failure
            print(f"screenshot {step} failed: {exc}")
            return
        self.shots.extend(paths)
        print(f"screenshot: {paths[0]}")

    def diagnostics(self, extra: str = "") -> str:
        viewer = self.viewer
        parts = [extra] if extra else []
        for title, read in (
            ("right-hand panel text", viewer.right_panel_text),
            ("notifications", viewer.notifications),
            ("page errors (uncaught, incl. those OHIF's error boundary hides)", viewer.page_errors),
            ("browser console errors", lambda: viewer.browser.console_errors()[-15:]),
            ("failed HTTP requests", lambda: viewer.server.failed_requests()[-15:]),
        ):
            try:
                value = read()
            except Exception as exc:  # noqa: BLE001 - the browser may be the thing that broke
                value = f"<unreadable: {exc}>"
            parts.append(f"--- {title}:\n{value!r}" if not isinstance(value, str) else f"--- {title}:\n{value}")
        parts.append("--- screenshots:\n" + "\n".join(str(p) for p in self.shots))
        return "\n".join(parts)

    def fail(self, message: str, extra: str = ""):
        self.screenshot("FAILED")
        pytest.fail(f"{message}\n{self.diagnostics(extra)}", pytrace=False)

    def expect(self, expression: str, timeout: float, what: str):
        try:
            return self.viewer.wait(expression, timeout, what)
        except TimeoutError as exc:
            timed_out = str(exc)
        self.fail(timed_out)


def bad_notifications(viewer: OhifViewer, since: tuple[int, int] = (0, 0)) -> list[str]:
    return [f"[{n['type']}] {n['title']}: {n['message']} (from {n['source']})"
            for n in viewer.notifications(since) if n["type"] in ("warning", "error")]


def _open_study(viewer: OhifViewer, report: Report, results: dict) -> None:
    """The study in the viewer, with our SEG's and SR's series listed (once per browser session)."""
    seg_uid, sr_uid = str(results["seg"].SOPInstanceUID), str(results["sr"].SOPInstanceUID)
    if viewer.display_set_uid(seg_uid) and viewer.display_set_uid(sr_uid):
        return
    viewer.open_study(results["study"])
    report.expect("!!(window.services && window.services.displaySetService)", STUDY_TIMEOUT, "OHIF to start")
    for uid, what in ((seg_uid, "our SEG"), (sr_uid, "our SR")):
        report.expect(f"""(() => {{
            const ds = window.services.displaySetService.getActiveDisplaySets().find(
              d => d.SOPInstanceUID === '{uid}' || (d.instances || []).some(i => i.SOPInstanceUID === '{uid}'));
            return !!ds && !!document.getElementById('thumbnail-' + ds.displaySetInstanceUID);
        }})()""", STUDY_TIMEOUT, f"{what}'s series in the study browser")
    report.expect("!!document.querySelector('[data-cy=viewport-pane] canvas')", STEP_TIMEOUT, "the CT in the viewport")
    report.screenshot("01-study")


# ------------------------------------------------------------------------------------------------
# the test: SEG, then SR, in one browser session


def test_ohif_shows_our_segments_without_warnings(viewer, results, tmp_path):
    """Double-clicking our SEG loads it, the segmentation panel lists every SegmentLabel, and OHIF
    shows no warning or error (it warns when a segment lacks RecommendedDisplayCIELabValue)."""
    report = Report(viewer, tmp_path, "seg")
    _open_study(viewer, report, results)
    seg_ds = viewer.display_set_uid(str(results["seg"].SOPInstanceUID))
    before = viewer.notification_mark()

    viewer.double_click_thumbnail(seg_ds)
    # OHIF asks "Do you want to open this Segmentation?" in the viewport: the user answers Yes
    # hydrated: the viewport shows the CT again, with our segmentation drawn over it
    seg_hydrated = f"""(() => {{
        const grid = window.services.viewportGridService, vid = grid.getActiveViewportId();
        const shown = grid.getDisplaySetsUIDsForViewport(vid) || [];
        const drawn = window.services.segmentationService.getSegmentationRepresentations(vid) || [];
        return !shown.includes('{seg_ds}') && drawn.some(r => r.segmentationId === '{seg_ds}');
    }})()"""
    answered = report.expect(f"""(() => {{
        if ({seg_hydrated}) return 'hydrated';
        return {viewer.visible_button_js("Yes")} ? 'prompt' : null;
    }})()""", STEP_TIMEOUT, "OHIF to load our SEG or to ask whether to open it")
    if answered == "prompt":
        report.screenshot("02-seg-prompt")
        viewer.click_button("Yes")
    report.expect(f"""{seg_hydrated} && (window.services.segmentationService.getSegmentations() || [])
        .some(s => s.segmentationId === '{seg_ds}')""", STEP_TIMEOUT, "our segmentation loaded in the viewport")

    labels = results["labels"]
    try:
        viewer.open_right_panel("panelSegmentation-btn", f"""(() => {{
            const lines = {RIGHT_PANEL_LINES_JS};
            return {json.dumps(labels)}.every(label => lines.includes(label));
        }})()""", timeout=STEP_TIMEOUT)
    except TimeoutError:
        pass  # the assertion below says what the panel shows
    time.sleep(1.5)  # OHIF raises its SEG notifications while loading; let the last toast render
    report.screenshot("03-segmentation-panel")

    panel_lines = [line.strip() for line in viewer.right_panel_text().splitlines()]
    absent = [label for label in labels if label not in panel_lines]
    if absent:
        report.fail(f"the segmentation panel does not list our segment(s) {absent} (SEG has {labels})")
    bad = bad_notifications(viewer)  # since the study opened
    if bad:
        report.fail("OHIF showed warning/error notification(s) while loading our SEG:\n  " + "\n  ".join(bad))
    print(f"segmentation panel lists {labels}; notifications while loading it: "
          f"{viewer.notifications(before) or 'none'}")


def test_ohif_lists_our_long_axis_lengths(viewer, results, tmp_path):
    """Double-clicking our SR and accepting OHIF's offer to load its measurements puts every
    "Long axis" length of the SR in the measurement panel, as OHIF rounds it."""
    report = Report(viewer, tmp_path, "sr")
    _open_study(viewer, report, results)
    sr_ds = viewer.display_set_uid(str(results["sr"].SOPInstanceUID))
    expected = results["lengths"]
    before = viewer.notification_mark()

    viewer.double_click_thumbnail(sr_ds)
    # OHIF loads the SR; one whose measurements it can take over ("rehydratable") makes it ask
    # "Do you want to continue tracking measurements for this study?" in the viewport
    state = report.expect(f"""(() => {{
        if ({viewer.visible_button_js("Yes")}) return 'prompt';
        const ds = window.services.displaySetService.getDisplaySetByUID('{sr_ds}');
        if (ds && ds.isHydrated) return 'hydrated';
        if (ds && ds.isLoaded && ds.isRehydratable === false) return 'not rehydratable';
        return null;
    }})()""", STEP_TIMEOUT, "OHIF to load our SR")
    if state == "not rehydratable":
        time.sleep(3)  # let the SR viewport finish (or fail) drawing, for the screenshot
        report.screenshot("04-sr-viewport")
        errors = viewer.page_errors()
        report.fail(
            "OHIF loaded our SR but offers no way to put its measurements in the measurement panel "
            "(OHIF calls the SR not rehydratable: 'This structured report is not compatible with this application')"
            + (f"; OHIF failed while loading it: {errors[0].splitlines()[0]}" if errors else ""),
            extra="--- how OHIF read our SR:\n" + str(sr_display_set_summary(viewer, sr_ds)))
    report.screenshot("04-sr-prompt" if state == "prompt" else "04-sr-viewport")
    if state == "prompt":
        viewer.click_button("Yes")

    panel_has_lengths = f"""(() => {{
        const text = {RIGHT_PANEL_LINES_JS}.join('\\n');
        const shown = (text.match(/-?\\d+(?:\\.\\d+)?\\s*mm\\b/g) || []).length;
        return shown >= {len(expected)};
    }})()"""
    try:
        viewer.open_right_panel("trackedMeasurements-btn", panel_has_lengths, timeout=STEP_TIMEOUT)
    except TimeoutError:
        pass  # the assertion below says what the panel shows
    time.sleep(1.5)
    report.screenshot("05-measurement-panel")

    panel = viewer.right_panel_text()
    absent = unmatched_lengths(panel, expected)
    if absent:
        report.fail("the measurement panel does not list our SR's long axis length(s):\n  " + "\n  ".join(absent),
                    extra="--- how OHIF read our SR:\n" + str(sr_display_set_summary(viewer, sr_ds)))
    bad = bad_notifications(viewer, before)
    if bad:
        report.fail("OHIF showed warning/error notification(s) while loading our SR:\n  " + "\n  ".join(bad))
    print("measurement panel lists " + ", ".join(ohif_length_text(v) for _, v in expected))


def sr_display_set_summary(viewer: OhifViewer, display_set_uid: str):
    return viewer.js(f"""(() => {{
        const ds = window.services.displaySetService.getDisplaySetByUID('{display_set_uid}');
        if (!ds) return null;
        return {{
          isLoaded: ds.isLoaded, isRehydratable: ds.isRehydratable, isHydrated: ds.isHydrated,
          measurements: (ds.measurements || []).map(m => ({{
            TrackingIdentifier: m.TrackingIdentifier, loaded: m.loaded, graphicCode: m.graphicCode,
            graphicType: m.graphicType, coords: (m.coords || []).length,
            labels: (m.labels || []).map(l => `${{l.label}}: ${{l.value}}`)}})),
          measurementServiceCount: window.services.measurementService.getMeasurements().length,
        }};
    }})()""")
