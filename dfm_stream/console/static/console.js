// dfm-stream console: live updates over Server-Sent Events. Our own code, no library, no build.
"use strict";
(function () {
  const body = document.body;
  const page = body.dataset.page;
  const SVG = "http://www.w3.org/2000/svg";
  const FRAME_PERIOD_MS = 500; // each request costs the console ~1 ms of CPU: 2 frames/s per tile

  function g4(v) {
    return v === null || v === undefined ? "-" : String(parseFloat(Number(v).toPrecision(4)));
  }
  function field(root, name) {
    return root.querySelector('[data-field="' + name + '"]');
  }
  function setText(root, name, text) {
    const el = field(root, name);
    if (el && el.textContent !== text) el.textContent = text;
  }
  function alarmWord(cam) {
    return cam.alarm ? "ALARM" : cam.up ? "OK" : "DOWN";
  }
  function stateClass(cam) {
    return cam.alarm ? "alarm" : cam.up ? "ok" : "down";
  }

  // -- live frames: reload each [data-live-frame] image twice a second, one request at a time;
  // a page in a background tab fetches none until it is shown again
  function liveFrame(img) {
    if (img.dataset.liveStarted) return;
    img.dataset.liveStarted = "1";
    const base = img.getAttribute("src").split("?")[0];
    let n = 0;
    const next = function () {
      setTimeout(function () {
        if (document.hidden) {
          document.addEventListener("visibilitychange", next, { once: true });
          return;
        }
        n += 1;
        img.src = base + "?n=" + n;
      }, FRAME_PERIOD_MS);
    };
    img.addEventListener("load", next);
    img.addEventListener("error", function () {
      setTimeout(next, 1000);
    });
    next();
  }
  document.querySelectorAll("img[data-live-frame]").forEach(liveFrame);

  // -- a camera's state (tile on the overview, facts on the camera page)
  function applyState(root, cam, classTarget) {
    const target = classTarget || root;
    target.classList.remove("alarm", "ok", "down");
    target.classList.add(stateClass(cam));
    setText(root, "alarm_text", alarmWord(cam));
    setText(root, "up", (cam.up ? "up" : "down") + " (" + cam.state + ")");
    setText(root, "fps", String(cam.fps));
    setText(root, "p99", cam.p99_ms === null ? "-" : Math.round(cam.p99_ms) + " ms");
    setText(root, "score", g4(cam.score) + " / " + g4(cam.threshold));
    setText(root, "model", cam.model || cam.assigned || "-");
    const fill = field(root, "bar_fill");
    if (fill) {
      const frac = cam.score !== null && cam.threshold ? Math.min(1, cam.score / (2 * cam.threshold)) : 0;
      fill.setAttribute("width", (frac * 100).toFixed(1));
    }
  }

  function newTile(name) {
    const tpl = document.getElementById("tile-template");
    const tile = tpl.content.firstElementChild.cloneNode(true);
    tile.dataset.camera = name;
    const link = field(tile, "link");
    link.textContent = name;
    link.setAttribute("href", "/camera/" + encodeURIComponent(name));
    const img = field(tile, "frame");
    img.setAttribute("src", "/frame/" + encodeURIComponent(name) + ".jpg");
    img.setAttribute("alt", "latest frame of " + name);
    return tile;
  }

  function onOverview(snapshot) {
    const tiles = document.getElementById("tiles");
    const seen = new Set();
    snapshot.cameras.forEach(function (cam, i) {
      seen.add(cam.camera);
      let tile = tiles.querySelector('[data-camera="' + CSS.escape(cam.camera) + '"]');
      if (!tile) {
        tile = newTile(cam.camera);
        tiles.insertBefore(tile, tiles.children[i] || null);
        liveFrame(field(tile, "frame"));
      }
      applyState(tile, cam);
    });
    Array.from(tiles.children).forEach(function (tile) {
      if (!seen.has(tile.dataset.camera)) tile.remove();
    });
    document.getElementById("no-cameras").hidden = snapshot.cameras.length > 0;
  }

  // -- the camera page: facts, score chart, history, overlay
  let chartPoints = [];
  function chartInit() {
    const data = document.getElementById("chart-data");
    chartPoints = data ? JSON.parse(data.textContent) : [];
    drawChart();
  }
  function svgEl(name, attrs) {
    const el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) {
      el.setAttribute(k, attrs[k]);
    });
    return el;
  }
  function drawChart() {
    const svg = document.getElementById("chart");
    if (!svg) return;
    const seconds = Number(svg.dataset.seconds);
    const now = Date.now();
    chartPoints = chartPoints.filter(function (p) {
      return p.t >= now - seconds * 1000;
    });
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const threshold = chartPoints.length ? chartPoints[chartPoints.length - 1].threshold : null;
    let top = threshold ? threshold * 1.5 : 0;
    chartPoints.forEach(function (p) {
      top = Math.max(top, p.score);
    });
    top = top > 0 ? top * 1.05 : 1;
    const x = function (t) {
      return (((t - (now - seconds * 1000)) / (seconds * 1000)) * 600).toFixed(1);
    };
    const y = function (v) {
      return (200 - (v / top) * 200).toFixed(1);
    };
    svg.appendChild(svgEl("rect", { x: 0, y: 0, width: 600, height: 200, class: "chart-bg" }));
    if (threshold) {
      const ty = y(threshold);
      svg.appendChild(svgEl("line", { x1: 0, x2: 600, y1: ty, y2: ty, class: "chart-threshold" }));
    }
    const pts = chartPoints.map(function (p) {
      return x(p.t) + "," + y(p.score);
    });
    svg.appendChild(svgEl("polyline", { points: pts.join(" "), class: "chart-line" }));
    chartPoints.forEach(function (p) {
      if (p.anomalous) svg.appendChild(svgEl("circle", { cx: x(p.t), cy: y(p.score), r: 3, class: "chart-anomalous" }));
    });
  }
  let fetching = false;
  function onCamera(snapshot) {
    const root = document.getElementById("camera-state");
    const name = root.dataset.camera;
    const cam = snapshot.cameras.find(function (c) {
      return c.camera === name;
    });
    if (!cam) return;
    applyState(root, cam, field(root, "alarm_text"));
    const last = chartPoints.length ? chartPoints[chartPoints.length - 1].id : null;
    if (cam.last_id && cam.last_id !== last && !fetching) {
      fetching = true;
      const after = last ? "?after=" + encodeURIComponent(last) : "";
      fetch("/camera/" + encodeURIComponent(name) + "/scores" + after, { credentials: "same-origin" })
        .then(function (r) {
          return r.ok ? r.json() : [];
        })
        .then(function (points) {
          chartPoints = chartPoints.concat(points);
          drawChart();
        })
        .finally(function () {
          fetching = false;
        });
    } else {
      drawChart();
    }
  }
  function reviewText(e) {
    const who = e.user ? " by " + e.user : "";
    const what = e.type === "acknowledged" ? "Acknowledged" : "False alarm";
    return what + who + (e.comment ? ": “" + e.comment + "”" : "");
  }
  function onCameraEvent(e) {
    const root = document.getElementById("camera-state");
    if (e.camera !== root.dataset.camera) return;
    const list = document.getElementById("history");
    const none = document.getElementById("no-history");
    if (none) none.remove();
    const li = document.createElement("li");
    const when = new Date(e.ts / 1e6).toISOString().replace("T", " ").slice(0, 19);
    let text = when + " UTC · " + e.type.replace("_", " ");
    if (e.user) text += " by " + e.user;
    if (e.comment) text += ": “" + e.comment + "”";
    if (e.score !== undefined) text += " · score " + g4(e.score);
    if (e.reason) text += " · " + e.reason;
    li.textContent = text;
    list.insertBefore(li, list.firstChild);
    if (e.type === "raised" && e.has_image) {
      document.getElementById("overlay-img").setAttribute("src", "/alarm-image/" + e.id + ".jpg");
      document.getElementById("overlay").hidden = false;
    }
  }

  // -- the alarms page: new raised alarms on top, reviews shown on every open console
  function newAlarmRow(e) {
    const tpl = document.getElementById("alarm-template");
    const row = tpl.content.firstElementChild.cloneNode(true);
    row.dataset.frameId = e.frame_id;
    row.dataset.alarmId = e.id;
    row.dataset.camera = e.camera;
    const img = field(row, "image");
    if (e.has_image) {
      img.setAttribute("src", "/alarm-image/" + e.id + ".jpg");
      img.hidden = false;
    } else {
      img.hidden = true;
    }
    img.setAttribute("alt", "alarm picture of " + e.camera + ", frame " + e.frame_id);
    const link = field(row, "camera");
    link.textContent = e.camera;
    link.setAttribute("href", "/camera/" + encodeURIComponent(e.camera));
    setText(row, "time", new Date(e.ts / 1e6).toISOString().replace("T", " ").slice(0, 19));
    setText(row, "score", g4(e.score));
    setText(row, "threshold", g4(e.threshold));
    setText(row, "model", e.model || "-");
    const form = field(row, "form");
    if (form) {
      form.setAttribute("action", "/alarms/" + e.id + "/review");
      const input = field(row, "comment");
      input.id = "comment-" + e.id;
      form.querySelector("label").setAttribute("for", input.id);
    }
    return row;
  }
  function onAlarmsEvent(e) {
    const list = document.getElementById("alarm-list");
    if (e.type === "raised") {
      const filter = list.dataset.filterCamera;
      if (list.dataset.live !== "yes" || (filter && filter !== e.camera)) return;
      if (list.querySelector('[data-alarm-id="' + CSS.escape(e.id) + '"]')) return;
      list.insertBefore(newAlarmRow(e), list.firstChild);
      document.getElementById("no-alarms").hidden = true;
    } else if (e.type === "acknowledged" || e.type === "false_alarm") {
      list.querySelectorAll('[data-frame-id="' + CSS.escape(e.frame_id) + '"]').forEach(function (row) {
        setText(row, "review", reviewText(e));
        row.classList.remove("open");
        row.classList.add("reviewed");
      });
    }
  }

  // -- the event stream
  const status = document.getElementById("live-status");
  if (page === "login" || page === "confirm" || !window.EventSource) {
    if (status) status.textContent = "";
    return;
  }
  if (page === "camera") chartInit();
  const source = new EventSource("/events");
  source.addEventListener("open", function () {
    status.textContent = "live";
    status.className = "live-status live";
  });
  source.addEventListener("error", function () {
    status.textContent = "reconnecting…";
    status.className = "live-status stale";
  });
  source.addEventListener("snapshot", function (m) {
    const snapshot = JSON.parse(m.data);
    if (page === "overview") onOverview(snapshot);
    if (page === "camera") onCamera(snapshot);
    body.dataset.snapshots = String(Number(body.dataset.snapshots || 0) + 1);
  });
  source.addEventListener("alarm", function (m) {
    const e = JSON.parse(m.data);
    if (page === "alarms") onAlarmsEvent(e);
    if (page === "camera") onCameraEvent(e);
  });
})();
