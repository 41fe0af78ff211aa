"""What the demo shows: a tracker that follows the pipeline through Redis, the live view and the summary.

The tracker reads the streams a factory's own tools would read (nothing private to the demo): each
camera's frame stream (to count frames and the defects the synthetic camera injected, from the
frames' ``defect`` key), each camera's score stream (frames scored, latency, last score) and the
alarm stream (alarms as they fire). The live view (``rich``) and the line-per-second printout are
drawn from it, and so is the summary printed at the end.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dfm_stream import keys, replies
from dfm_stream.connect import RedisClient
from dfm_stream.errors import WireError
from dfm_stream.wire import FIELD, EventMsg, EventType, FrameMsg, ScoreMsg, ScoreStatus, split_frame_id

WINDOW_S = 5.0
"""Rates and live latency percentiles are taken over the last few seconds."""
FEED_LENGTH = 8
READ_COUNT = 500
_FIELD = FIELD.encode()


def percentile(values: "list[float] | np.ndarray", q: float) -> float | None:
    """Return the ``q``-th percentile of ``values`` (None when there are none)."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class CameraStats:
    """What the tracker knows about one camera."""

    name: str
    defect_rate: float
    frames: int = 0
    defect_frames: int = 0
    scored: int = 0
    skipped: int = 0
    anomalous: int = 0
    false_positives: int = 0
    alarms_raised: int = 0
    alarms_cleared: int = 0
    alarm_active: bool = False
    down: bool = False
    last_score: float | None = None
    threshold: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    defect_parts: set[str] = field(default_factory=set)
    detected_parts: set[str] = field(default_factory=set)
    pending: dict[str, str | None] = field(default_factory=dict, repr=False)
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=2000), repr=False)
    _run: int = 0
    _in_run: bool = False

    def add_frame(self, entry_id: str, frame: FrameMsg) -> None:
        """Count a published frame and remember whether it shows an injected defect."""
        self.frames += 1
        defect = bool(frame.extra.get("defect", False))
        part = self._part_key(frame, defect)
        if defect and part is not None:
            self.defect_frames += 1
            self.defect_parts.add(part)
        self.pending[entry_id] = part if defect else None

    def _part_key(self, frame: FrameMsg, defect: bool) -> str | None:
        """Return an id for the part in the frame: the source's ``part`` key, else a run of defect frames."""
        if "part" in frame.extra:
            return f"{frame.session}:{frame.extra['part']}"
        if defect and not self._in_run:
            self._run += 1
        self._in_run = defect
        return f"run:{self._run}" if defect else None

    def add_score(self, entry_id: str, score: ScoreMsg, now: float) -> None:
        """Count a published score; match it with its frame to tell hits from false alarms."""
        part = self.pending.pop(entry_id, None)
        if score.status != ScoreStatus.SCORED:
            self.skipped += 1
            return
        self.scored += 1
        self.last_score, self.threshold = score.score, score.threshold
        self.latencies_ms.append(score.latency_ms)
        self.recent.append((now, score.latency_ms))
        if score.anomalous:
            self.anomalous += 1
            if part is not None:
                self.detected_parts.add(part)
            else:
                self.false_positives += 1

    def window(self, now: float) -> tuple[float, float | None, float | None]:
        """Return ``(frames scored per second, latency p50, latency p99)`` over the last few seconds."""
        recent = [lat for t, lat in self.recent if now - t <= WINDOW_S]
        span = min(WINDOW_S, max(now - self.recent[0][0], 1e-9)) if self.recent else WINDOW_S
        return len(recent) / max(span, 1.0), percentile(recent, 50), percentile(recent, 99)

    def summary(self) -> dict[str, Any]:
        """Return the camera's totals as a JSON-friendly dict."""
        lat = self.latencies_ms
        return {
            "defect_rate": self.defect_rate,
            "frames_published": self.frames,
            "frames_scored": self.scored,
            "frames_skipped": self.skipped,
            "frames_unscored": len(self.pending),
            "anomalous_frames": self.anomalous,
            "defect_frames": self.defect_frames,
            "defects_injected": len(self.defect_parts),
            "defects_detected": len(self.detected_parts),
            "false_positive_frames": self.false_positives,
            "alarms_raised": self.alarms_raised,
            "alarms_cleared": self.alarms_cleared,
            "latency_ms": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)}
            | {"max": max(lat) if lat else None},
            "threshold": self.threshold,
        }


class Tracker:
    """Follows the demo's cameras through Redis: frames, scores and alarm events since ``start_id``."""

    def __init__(
        self, client: RedisClient, cameras: dict[str, float], prefix: str, start_id: str = "0-0"
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.cameras = {name: CameraStats(name, rate) for name, rate in cameras.items()}
        self.feed: deque[EventMsg] = deque(maxlen=FEED_LENGTH)
        self.new_events: list[EventMsg] = []
        self.bad_messages = 0
        self._last: dict[str, str] = {}
        for name in cameras:
            self._last[keys.frames_key(name, prefix)] = start_id
            self._last[keys.scores_key(name, prefix)] = start_id
        self._last[keys.alarms_key(prefix)] = start_id

    def _read(self, key: str) -> list[tuple[str, bytes]]:
        """Return the new ``(entry id, msg)`` of ``key`` (one stream per call: cluster-safe)."""
        out: list[tuple[str, bytes]] = []
        while True:
            entries = replies.xread_one(self.client, key, self._last[key], READ_COUNT)
            for entry_id, fields in entries:
                out.append((entry_id.decode(), fields.get(_FIELD, b"")))
            if entries:
                self._last[key] = entries[-1][0].decode()
            if len(entries) < READ_COUNT:
                return out

    def poll(self) -> None:
        """Read everything new; frames before scores, so that every score finds its frame."""
        now = time.monotonic()
        self.new_events = []
        for name, stats in self.cameras.items():
            for entry_id, data in self._read(keys.frames_key(name, self.prefix)):
                frame = self._decode(FrameMsg.from_bytes, data)
                if frame is not None:
                    stats.add_frame(entry_id, frame)
        for name, stats in self.cameras.items():
            for _, data in self._read(keys.scores_key(name, self.prefix)):
                score = self._decode(ScoreMsg.from_bytes, data)
                if score is not None:
                    stats.add_score(split_frame_id(score.frame_id)[1], score, now)
        for _, data in self._read(keys.alarms_key(self.prefix)):
            event = self._decode(EventMsg.from_bytes, data)
            if event is not None and event.camera in self.cameras:
                self._add_event(event)

    def _decode(self, parse: Any, data: bytes) -> Any:
        try:
            return parse(data)
        except WireError:
            self.bad_messages += 1
            return None

    def _add_event(self, event: EventMsg) -> None:
        stats = self.cameras[event.camera]
        if event.type == EventType.RAISED:
            stats.alarms_raised += 1
            stats.alarm_active = True
        elif event.type == EventType.CLEARED:
            stats.alarm_active = False
            stats.alarms_cleared += 1
        elif event.type in (EventType.CAMERA_DOWN, EventType.CAMERA_UP):
            stats.down = event.type == EventType.CAMERA_DOWN
        self.feed.append(event)
        self.new_events.append(event)

    def drained(self) -> bool:
        """Return True when every frame seen so far has a score (or a skip)."""
        return all(not s.pending for s in self.cameras.values())

    def summary(self) -> dict[str, Any]:
        """Return per-camera totals and the totals over all cameras."""
        cameras = {name: s.summary() for name, s in self.cameras.items()}
        every = [lat for s in self.cameras.values() for lat in s.latencies_ms]
        totals = {
            k: sum(c[k] for c in cameras.values())
            for k in (
                "frames_published",
                "frames_scored",
                "defects_injected",
                "defects_detected",
                "alarms_raised",
                "false_positive_frames",
            )
        }
        totals["latency_ms"] = {f"p{q}": percentile(every, q) for q in (50, 95, 99)}
        return {"cameras": cameras, "totals": totals, "bad_messages": self.bad_messages}


class DemoMetrics:
    """The demo's own gauges (``dfm_demo_*``), set from the tracker on every refresh."""

    def __init__(self, registry: CollectorRegistry) -> None:
        cam = ["camera"]
        self.gauges = {
            "frames_published": Gauge(
                "dfm_demo_frames_published", "Frames seen in the camera's stream.", cam, registry=registry
            ),
            "frames_scored": Gauge(
                "dfm_demo_frames_scored", "Scores seen in the camera's stream.", cam, registry=registry
            ),
            "defects_injected": Gauge(
                "dfm_demo_defects_injected",
                "Defective parts the synthetic camera showed.",
                cam,
                registry=registry,
            ),
            "defects_detected": Gauge(
                "dfm_demo_defects_detected",
                "Defective parts with an anomalous score.",
                cam,
                registry=registry,
            ),
            "alarms_raised": Gauge("dfm_demo_alarms_raised", "Alarm events raised.", cam, registry=registry),
        }
        self.latency = Gauge(
            "dfm_demo_latency_seconds",
            "End-to-end latency over the last seconds (quantile 0.5 / 0.99).",
            ["camera", "quantile"],
            registry=registry,
        )

    def update(self, tracker: Tracker) -> None:
        """Copy the tracker's totals into the gauges."""
        now = time.monotonic()
        for name, stats in tracker.cameras.items():
            totals = stats.summary()
            for key, gauge in self.gauges.items():
                gauge.labels(name).set(totals[key])
            _, p50, p99 = stats.window(now)
            for q, value in (("0.5", p50), ("0.99", p99)):
                if value is not None:
                    self.latency.labels(name, q).set(value / 1000.0)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _score_text(stats: CameraStats) -> Text:
    if stats.last_score is None:
        return Text("-")
    thr = f"{stats.threshold:.4g}" if stats.threshold is not None else "?"
    over = stats.threshold is not None and stats.last_score > stats.threshold
    return Text(f"{stats.last_score:.4g} / {thr}", style="bold red" if over else "green")


def _alarm_text(stats: CameraStats) -> Text:
    if stats.down:
        return Text("CAMERA DOWN", style="bold yellow")
    return Text("ALARM", style="bold white on red") if stats.alarm_active else Text("ok", style="green")


def event_line(event: EventMsg) -> str:
    """Return one line describing an alarm or health event."""
    when = time.strftime("%H:%M:%S", time.localtime(event.ts / 1e9))
    text = f"{when} {event.camera:<8} {event.type:<12}"
    if event.score is not None:
        thr = f" / {event.threshold:.4g}" if event.threshold is not None else ""
        text += f" score {event.score:.4g}{thr}"
    if event.frame_id:
        text += f"  frame {event.frame_id}"
    if event.reason:
        text += f"  ({event.reason})"
    return text


def render(tracker: Tracker, header: str) -> Group:
    """Return the live view: one row per camera, then the latest alarm events."""
    now = time.monotonic()
    table = Table(title=header, expand=True)
    for col in ("camera", "fps", "latency p50", "p99", "scored", "last score / threshold", "alarm"):
        table.add_column(col, justify="left" if col in ("camera", "alarm") else "right")
    table.add_column("defects shown / detected", justify="right")
    table.add_column("alarms", justify="right")
    for name, s in tracker.cameras.items():
        fps, p50, p99 = s.window(now)
        table.add_row(
            name,
            f"{fps:.1f}",
            _ms(p50),
            _ms(p99),
            str(s.scored),
            _score_text(s),
            _alarm_text(s),
            f"{len(s.defect_parts)} / {len(s.detected_parts)}",
            str(s.alarms_raised),
        )
    lines = [event_line(e) for e in reversed(tracker.feed)] or ["(no alarms yet)"]
    feed = Panel("\n".join(lines), title="alarm events (newest first)", border_style="red")
    return Group(table, feed)


def status_line(tracker: Tracker, elapsed: float) -> str:
    """Return the one-line status printed every second without the live view."""
    now = time.monotonic()
    parts = [f"[{elapsed:5.1f} s]"]
    for name, s in tracker.cameras.items():
        fps, p50, p99 = s.window(now)
        score = "-" if s.last_score is None else f"{s.last_score:.4g}"
        thr = "-" if s.threshold is None else f"{s.threshold:.4g}"
        state = "ALARM" if s.alarm_active else "ok"
        parts.append(
            f"{name}: {fps:.1f} fps p50 {_ms(p50)} p99 {_ms(p99)} scored {s.scored}"
            f" score {score}/{thr} {state} alarms {s.alarms_raised}"
        )
    return " | ".join(parts)


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """Print the end-of-demo summary as a table."""
    table = Table(title="dfm-stream demo: summary", expand=False)
    table.add_column("camera")
    for col in ("frames", "scored", "defects shown", "detected", "alarms raised", "false-alarm frames"):
        table.add_column(col, justify="right")
    for col in ("p50", "p95", "p99"):
        table.add_column(f"latency {col}", justify="right")
    rows = [*summary["cameras"].items(), ("all", summary["totals"])]
    for name, c in rows:
        lat = c["latency_ms"]
        table.add_row(
            name,
            str(c["frames_published"]),
            str(c["frames_scored"]),
            str(c["defects_injected"]),
            str(c["defects_detected"]),
            str(c["alarms_raised"]),
            str(c["false_positive_frames"]),
            _ms(lat["p50"]),
            _ms(lat["p95"]),
            _ms(lat["p99"]),
        )
    console.print(table)
