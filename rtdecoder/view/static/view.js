// rtdecoder live view: follows the server's event stream and draws the session, read-only.
// Plain script, no build step, nothing loaded from elsewhere. Every list kept here is bounded by
// the same limits as the server's (sent in the snapshot's config), so a long session does not
// grow the page. Text from the session is only ever set with textContent, never parsed as HTML.
"use strict";
(() => {
  const token = new URLSearchParams(location.search).get("token");
  const RUN_STATE = { waiting: "waiting", run_start: "running", running: "running", resumed: "running",
    run_end: "run_end", stopped: "stopped", error: "error" };
  const STATE_TEXT = { run_end: "run end", connecting: "connecting" };
  const COLORS = { x: "#ff7b72", y: "#7ee787", z: "#79c0ff", fd: "#e6e9ee", limit: "#f85149", missing: "#f85149",
    problem: "#e3b341", volume: "#58a6ff", trial: "#ffa657", backlog: "#d2a8ff", grid: "#2e353f", dim: "#9aa4b1" };

  const S = {
    config: { fd_threshold_mm: 0.9, history_runs: 16, run_volumes: 4000, run_trials: 200, run_events: 200,
      thumbnails: false, decoding: true },
    session: null, now: { state: "connecting" }, runs: new Map(), sessionEvents: [], selected: null, follow: true,
    snapshots: 0, received: 0, lastSeq: -1, dirty: { charts: true, trials: true, events: true, header: true, runs: true },
  };

  function query(extra) {
    const params = new URLSearchParams(extra || {});
    if (token) params.set("token", token);
    const text = params.toString();
    return text ? "?" + text : "";
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function keep(list, item, max) {
    list.push(item);
    if (list.length > max) list.splice(0, list.length - max);
  }

  function fmt(value, digits, unit) {
    if (value === null || value === undefined || Number.isNaN(value)) return "-";
    return Number(value).toFixed(digits) + (unit ? " " + unit : "");
  }

  function clock(t) {
    if (!t) return "";
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  // ------------------------------------------------------------------ the model

  function newRun(label, summary) {
    return {
      label, volumes: [], trials: [], events: [],
      summary: Object.assign({ run: label, state: "waiting", volumes: 0, missing: 0, fd_over: 0, betas: 0, decoded: 0,
        reconstructed: 0, skipped: 0, problems: 0, backlog: 0, last_tr: -1 }, summary || {}),
    };
  }

  function getRun(label) {
    let run = S.runs.get(label);
    if (!run) {
      run = newRun(label);
      S.runs.set(label, run);
      while (S.runs.size > S.config.history_runs) {
        const oldest = S.runs.keys().next().value;
        S.runs.delete(oldest);
        if (S.selected === oldest) S.selected = null;
      }
      S.dirty.runs = true;
    }
    return run;
  }

  function latestRun() {
    let last = null;
    for (const label of S.runs.keys()) last = label;
    return last;
  }

  function select(label) {
    if (S.selected === label) return;
    S.selected = label;
    Object.keys(S.dirty).forEach((k) => { S.dirty[k] = true; });
  }

  function onSnapshot(body) {
    S.snapshots += 1;
    S.lastSeq = body.seq;
    S.config = Object.assign(S.config, body.config || {});
    S.session = body.session;
    S.now = body.now || { state: "waiting" };
    S.runs = new Map();
    for (const r of body.runs || []) {
      const run = newRun(r.summary.run, r.summary);
      run.volumes = (r.volumes || []).slice(-S.config.run_volumes);
      run.trials = (r.trials || []).slice(-S.config.run_trials);
      run.events = (r.events || []).slice(-S.config.run_events);
      S.runs.set(run.label, run);
    }
    S.sessionEvents = (body.session_events || []).slice(-S.config.run_events);
    if (S.follow || !S.runs.has(S.selected)) S.selected = latestRun();
    Object.keys(S.dirty).forEach((k) => { S.dirty[k] = true; });
    schedule();
  }

  function follow(label) {
    if (S.follow && label && S.selected !== label) select(label);
  }

  function onVolume(e) {
    const run = getRun(e.run);
    const v = e.v;
    keep(run.volumes, v, S.config.run_volumes);
    const s = run.summary;
    if (v[1]) s.missing += 1; else s.volumes += 1;
    if (v[2] !== null && v[2] > S.config.fd_threshold_mm) s.fd_over += 1;
    s.last_tr = Math.max(s.last_tr, v[0]);
    s.backlog = v[7];
    if (s.state === "waiting") { s.state = "running"; S.dirty.runs = true; }
    S.now = Object.assign(S.now, { state: "running", run: e.run, tr_index: v[0] });
    follow(e.run);
    if (S.selected === e.run) S.dirty.charts = true;
    S.dirty.header = true;
  }

  function onTrial(e) {
    const run = getRun(e.run);
    keep(run.trials, e, S.config.run_trials);
    const s = run.summary;
    s.decoded += 1;
    if (e.reconstruction === "done") s.reconstructed += 1;
    if (e.reconstruction === "skipped_backlog") s.skipped += 1;
    s.backlog = e.waiting;
    follow(e.run);
    if (S.selected === e.run) {
      S.pendingCards.push(e);
      S.dirty.charts = true;
    }
    S.dirty.header = true;
  }

  function onState(e) {
    if (e.run) {
      const run = getRun(e.run);
      const s = run.summary;
      if (RUN_STATE[e.state]) s.state = RUN_STATE[e.state];
      if (e.state === "run_end") { s.reason = e.reason; s.backlog = 0; }
      if (e.state === "run_start") { s.tr_s = e.tr_s; s.n_volumes = e.n_volumes; }
      if (e.state === "file_problem" || e.state === "decode_error") s.problems += 1;
      keep(run.events, e, S.config.run_events);
      if (e.state === "run_start") follow(e.run);
      S.dirty.runs = true;
      if (S.selected === e.run) { S.dirty.charts = true; S.dirty.events = true; }
    } else {
      keep(S.sessionEvents, e, S.config.run_events);
      S.dirty.events = true;
    }
    if (RUN_STATE[e.state]) S.now.state = RUN_STATE[e.state];
    if (e.run) S.now.run = e.run;
    S.dirty.header = true;
  }

  function onBeat(e) {
    if (RUN_STATE[e.state]) S.now.state = RUN_STATE[e.state];
    if (e.run) {
      const run = getRun(e.run);
      run.summary.backlog = e.backlog;
      if (e.beta) run.summary.betas += 1;
    }
    S.dirty.header = true;
  }

  function onNote(e) {
    keep(S.sessionEvents, e, S.config.run_events);
    S.dirty.events = true;
  }

  S.pendingCards = [];
  const HANDLERS = { vol: onVolume, trial: onTrial, state: onState, beat: onBeat, note: onNote };

  // ------------------------------------------------------------------ drawing

  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; render(); });
  }

  function render() {
    if (S.dirty.header || S.dirty.runs) { renderHeader(); renderRuns(); renderSummary(); }
    S.dirty.header = false;
    S.dirty.runs = false;
    if (S.dirty.trials) { renderTrials(); S.dirty.trials = false; S.pendingCards = []; }
    else if (S.pendingCards.length) { addCards(S.pendingCards); S.pendingCards = []; }
    if (S.dirty.events) { renderEvents(); S.dirty.events = false; }
    if (S.dirty.charts) { renderCharts(); S.dirty.charts = false; }
  }

  function renderHeader() {
    const state = S.now.state || "connecting";
    const badge = document.getElementById("state");
    badge.dataset.state = state;
    badge.textContent = STATE_TEXT[state] || state;
    document.getElementById("run-label").textContent = S.now.run || "-";
    document.getElementById("tr-index").textContent = S.now.tr_index === null || S.now.tr_index === undefined
      ? "-" : String(S.now.tr_index);
    const current = S.now.run && S.runs.get(S.now.run);
    document.getElementById("backlog").textContent = !S.config.decoding ? "no decoder"
      : current ? String(current.summary.backlog) : "-";
    document.getElementById("session").textContent = S.session || "-";
  }

  function runText(run) {
    const s = run.summary;
    return `${run.label} · ${s.volumes + s.missing} vol · ${s.decoded} decoded · ${STATE_TEXT[s.state] || s.state}`;
  }

  // Buttons are updated in place, not rebuilt at every volume, so a click is never lost under them.
  function renderRuns() {
    const nav = document.getElementById("runs");
    let followButton = nav.querySelector("button.follow");
    if (!followButton) {
      followButton = el("button", "follow");
      followButton.type = "button";
      followButton.addEventListener("click", () => { S.follow = true; select(latestRun()); schedule(); });
      nav.append(followButton);
    }
    const buttons = new Map([...nav.querySelectorAll("button.run-item")].map((b) => [b.dataset.run, b]));
    for (const [label, button] of buttons) if (!S.runs.has(label)) { button.remove(); buttons.delete(label); }
    for (const run of S.runs.values()) {
      let button = buttons.get(run.label);
      if (!button) {
        button = el("button", "run-item");
        button.type = "button";
        button.dataset.run = run.label;
        button.append(el("span", "dot"), el("span", "text"));
        button.addEventListener("click", () => { S.follow = false; select(run.label); schedule(); });
        nav.insertBefore(button, followButton);
      }
      button.dataset.state = run.summary.state;
      button.setAttribute("aria-pressed", String(run.label === S.selected));
      const text = runText(run);
      if (button.lastChild.textContent !== text) button.lastChild.textContent = text;
    }
    followButton.textContent = S.follow ? "following the latest run" : "follow the latest run";
    followButton.setAttribute("aria-pressed", String(S.follow));
  }

  function renderSummary() {
    const box = document.getElementById("summary");
    box.replaceChildren();
    const run = S.runs.get(S.selected);
    if (!run) { box.append(el("span", null, "no run yet")); return; }
    const s = run.summary;
    const facts = [["volumes", s.volumes], ["missing", s.missing, s.missing > 0],
      [`FD > ${S.config.fd_threshold_mm} mm`, s.fd_over, s.fd_over > 0], ["beta releases", s.betas], ["decoded", s.decoded],
      ["reconstructed", s.reconstructed], ["skipped (backlog)", s.skipped, s.skipped > 0],
      ["file problems", s.problems, s.problems > 0]];
    if (s.tr_s) facts.push(["TR s", s.tr_s]);
    if (s.reason) facts.push(["ended by", s.reason]);
    for (const [label, value, bad] of facts) {
      const span = el("span", bad ? "bad" : null, label + " ");
      span.append(el("b", null, value));
      box.append(span);
    }
  }

  function renderEvents() {
    const list = document.getElementById("events");
    const run = S.runs.get(S.selected);
    const events = (run ? run.events : []).concat(S.sessionEvents).sort((a, b) => b.seq - a.seq)
      .slice(0, S.config.run_events);
    list.replaceChildren();
    for (const e of events) {
      const item = el("li");
      item.dataset.state = e.state || "";
      item.dataset.kind = e.k;
      item.append(el("span", "when", clock(e.t)));
      const where = e.tr_index !== null && e.tr_index !== undefined ? `vol ${e.tr_index} · ` : "";
      const what = e.k === "note" ? "view" : e.state;
      const detail = e.message || (e.reason ? `ended by ${e.reason}` : "");
      item.append(document.createTextNode(`${e.run ? e.run + " " : ""}${where}${what}${detail ? ": " + detail : ""}`));
      list.append(item);
    }
    if (!events.length) list.append(el("li", null, "nothing to report"));
  }

  function thumb(id, cls) {
    if (!S.config.thumbnails || !id) return el("div", "noimg", id || "?");
    const img = el("img", cls);
    img.alt = id;
    img.title = id;
    img.loading = "lazy";
    img.src = `thumb/${encodeURIComponent(id)}${query()}`;
    img.addEventListener("error", () => img.replaceWith(el("div", "noimg", id)), { once: true });
    return img;
  }

  function card(t) {
    const box = el("div", "trial-card");
    box.dataset.trial = t.trial_id;
    box.dataset.seq = t.seq;
    const head = el("div", "head");
    head.append(el("b", null, t.trial_id));
    if (t.kind && t.kind !== "first") head.append(el("span", "kind", t.kind));
    if (t.stim_id) head.append(el("span", null, `shown ${t.stim_id}`));
    head.append(el("span", "hint", `vol ${t.tr_index} · ${clock(t.t)}`));
    box.append(head);
    if (t.image) {
      const img = el("img", "recon");
      img.alt = `reconstruction of ${t.trial_id}`;
      img.src = `recon/${t.seq}${query({ s: S.session || "" })}`;
      img.addEventListener("error", () => img.replaceWith(el("div", "no-recon", "reconstruction no longer kept")),
        { once: true });
      box.append(img);
    } else {
      const why = t.reconstruction === "skipped_backlog" ? `reconstruction skipped: ${t.backlog} betas waiting`
        : t.reconstruction === "disabled" ? "reconstruction off" : `reconstruction: ${t.reconstruction}`;
      box.append(el("div", "no-recon", why));
    }
    const facts = el("div", "facts");
    if (t.stim_id) {
      const shown = el("div", "shown");
      shown.append(thumb(t.stim_id));
      const rank = el("span", null, "shown image: rank ");
      rank.append(el("b", t.shown_rank === 1 ? "conf-high" : null, t.shown_rank ?? "?"));
      rank.append(document.createTextNode(` of ${t.n_candidates ?? "?"}`));
      shown.append(rank);
      facts.append(shown);
    }
    if (t.caption) {
      const caption = el("span", "caption", "caption: ");
      caption.append(el("b", null, `“${t.caption}”`));
      if (t.caption_ms !== null && t.caption_ms !== undefined) {
        caption.append(document.createTextNode(` (${fmt(t.caption_ms, 0, "ms")})`));
      }
      facts.append(caption);
    }
    const confidence = el("span", null, "confidence (score 1 − score 2): ");
    confidence.append(el("b", null, fmt(t.margin, 3)));
    facts.append(confidence);
    const timing = el("span", null, "decode ");
    timing.append(el("b", null, fmt(t.decode_ms, 1, "ms")), document.createTextNode(" · latency "),
      el("b", null, fmt(t.latency_ms, 0, "ms")), document.createTextNode(" · backlog "),
      el("b", null, t.waiting ?? "-"));
    facts.append(timing);
    box.append(facts);
    const candidates = el("div", "candidates");
    t.ids.forEach((id, k) => {
      const cand = el("div", "cand" + (id === t.stim_id ? " hit" : ""));
      cand.append(thumb(id), el("span", "id", `${k + 1}. ${id}`), el("span", null, fmt(t.scores[k], 3)));
      candidates.append(cand);
    });
    box.append(candidates);
    return box;
  }

  function renderTrials() {
    const box = document.getElementById("trials");
    box.replaceChildren();
    const run = S.runs.get(S.selected);
    const trials = run ? run.trials : [];
    for (let k = trials.length - 1; k >= 0; k -= 1) box.append(card(trials[k]));
    document.getElementById("trials-hint").textContent = run ? `${run.label}, newest first (${trials.length} kept)` : "";
  }

  function addCards(trials) {
    const box = document.getElementById("trials");
    for (const t of trials) box.prepend(card(t));
    while (box.children.length > S.config.run_trials) box.lastElementChild.remove();
    const run = S.runs.get(S.selected);
    document.getElementById("trials-hint").textContent = run ? `${run.label}, newest first (${box.children.length} kept)`
      : "";
  }

  function legend(id, items) {
    const box = document.getElementById(id);
    if (box.childElementCount) return;
    for (const [label, color] of items) {
      const span = el("span");
      const swatch = el("i");
      swatch.style.background = color;
      span.append(swatch, document.createTextNode(label));
      box.append(span);
    }
  }

  function renderCharts() {
    const run = S.runs.get(S.selected);
    const volumes = run ? run.volumes : [];
    const trials = run ? run.trials : [];
    const events = run ? run.events : [];
    const declared = run && run.summary.n_volumes ? run.summary.n_volumes : 0;
    const x0 = volumes.length ? volumes[0][0] : 0;
    const x1 = Math.max(x0 + 10, declared, (run ? run.summary.last_tr : 0) + 1);
    const missing = volumes.filter((v) => v[1]).map((v) => v[0]);
    const problems = events.filter((e) => e.state === "file_problem" || e.state === "decode_error"
      || e.state === "error").map((e) => e.tr_index);
    const present = volumes.filter((v) => !v[1] && v[3]);
    const marks = { missing, problems };
    const trace = (k, scale) => present.map((v) => [v[0], v[3][k] * scale]);
    const degrees = 180 / Math.PI;
    chart("translation", { x0, x1, marks, points: volumes.length, series: [
      { points: trace(0, 1), color: COLORS.x }, { points: trace(1, 1), color: COLORS.y },
      { points: trace(2, 1), color: COLORS.z }], minSpan: 0.5, unit: "mm" });
    legend("legend-translation", [["x", COLORS.x], ["y", COLORS.y], ["z", COLORS.z], ["missing volume", COLORS.missing],
      ["file problem", COLORS.problem]]);
    chart("rotation", { x0, x1, marks, points: volumes.length, series: [
      { points: trace(3, degrees), color: COLORS.x }, { points: trace(4, degrees), color: COLORS.y },
      { points: trace(5, degrees), color: COLORS.z }], minSpan: 0.5, unit: "°" });
    legend("legend-rotation", [["about x (pitch)", COLORS.x], ["about y (roll)", COLORS.y], ["about z (yaw)", COLORS.z]]);
    const threshold = S.config.fd_threshold_mm;
    const fd = volumes.filter((v) => v[2] !== null).map((v) => [v[0], v[2]]);
    chart("fd", { x0, x1, marks, points: volumes.length, series: [{ points: fd, color: COLORS.fd, over: threshold }],
      limit: threshold, minSpan: threshold * 1.25, zero: true, unit: "mm" });
    document.getElementById("fd-hint").textContent = `limit ${threshold} mm (view.fd_threshold_mm); `
      + `${run ? run.summary.fd_over : 0} volumes above`;
    const latency = volumes.filter((v) => v[5] !== null).map((v) => [v[0], v[5]]);
    const perTrial = trials.filter((t) => t.latency_ms !== null).map((t) => [t.tr_index, t.latency_ms]);
    const backlog = volumes.map((v) => [v[0], v[7]]);
    chart("latency", { x0, x1, marks, points: volumes.length, zero: true, minSpan: 10, unit: "ms", series: [
      { points: latency, color: COLORS.volume, dots: true }, { points: perTrial, color: COLORS.trial, dots: true, size: 4 }],
    right: S.config.decoding ? { points: backlog, color: COLORS.backlog, label: "backlog" } : null });
    legend("legend-latency", [["per volume", COLORS.volume], ["per trial", COLORS.trial], ["decode backlog", COLORS.backlog]]);
  }

  function range(series, opts) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const s of series) for (const p of s.points) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); }
    if (opts.limit) hi = Math.max(hi, opts.limit);
    if (!Number.isFinite(lo)) { lo = 0; hi = opts.minSpan; }
    if (opts.zero) lo = Math.min(0, lo);
    if (hi - lo < opts.minSpan) { const mid = opts.zero ? lo + opts.minSpan / 2 : (hi + lo) / 2; lo = opts.zero ? lo : mid - opts.minSpan / 2; hi = mid + opts.minSpan / 2; }
    const pad = (hi - lo) * 0.06;
    return [opts.zero ? lo : lo - pad, hi + pad];
  }

  function chart(id, opts) {
    const canvas = document.getElementById(id);
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, canvas.clientWidth);
    const height = Math.max(80, canvas.clientHeight);
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const left = 52;
    const right = opts.right ? 40 : 10;
    const top = 6;
    const bottom = 18;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const [lo, hi] = range(opts.series, opts);
    const X = (x) => left + ((x - opts.x0) / Math.max(1, opts.x1 - opts.x0)) * plotW;
    const Y = (y) => top + (1 - (y - lo) / (hi - lo)) * plotH;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = COLORS.dim;
    g.strokeStyle = COLORS.grid;
    g.lineWidth = 1;
    for (let k = 0; k <= 4; k += 1) {
      const y = lo + ((hi - lo) * k) / 4;
      g.beginPath(); g.moveTo(left, Y(y)); g.lineTo(left + plotW, Y(y)); g.stroke();
      g.textAlign = "right";
      const digits = Math.abs(hi - lo) < 2 ? 2 : Math.abs(hi - lo) < 20 ? 1 : 0;
      const label = y.toFixed(digits);
      g.fillText(Number(label) === 0 ? (0).toFixed(digits) : label, left - 4, Y(y) + 4);  // never "-0.00"
    }
    g.textAlign = "center";
    const step = Math.max(1, Math.ceil((opts.x1 - opts.x0) / 10 / 10) * 10);
    for (let x = Math.ceil(opts.x0 / step) * step; x <= opts.x1; x += step) g.fillText(String(x), X(x), height - 4);
    // everything below stays inside the plot: marks and points older than the kept volumes are cut
    g.save();
    g.beginPath();
    g.rect(left, 0, plotW, top + plotH);
    g.clip();
    // missing volumes and file problems, where they happened
    g.globalAlpha = 0.55;
    g.fillStyle = COLORS.missing;
    for (const x of opts.marks.missing) g.fillRect(X(x) - 1.5, top, 3, plotH);
    g.fillStyle = COLORS.problem;
    for (const x of opts.marks.problems) {
      g.beginPath(); g.moveTo(X(x), top); g.lineTo(X(x) - 5, top + 8); g.lineTo(X(x) + 5, top + 8); g.fill();
      g.fillRect(X(x) - 0.5, top, 1, plotH);
    }
    g.globalAlpha = 1;
    if (opts.limit) {
      g.strokeStyle = COLORS.limit;
      g.setLineDash([6, 4]);
      g.beginPath(); g.moveTo(left, Y(opts.limit)); g.lineTo(left + plotW, Y(opts.limit)); g.stroke();
      g.setLineDash([]);
    }
    let rightLabels = null;
    if (opts.right) {
      const points = opts.right.points;
      const top2 = Math.max(4, ...points.map((p) => p[1]));
      const Y2 = (y) => top + (1 - y / top2) * plotH;
      g.strokeStyle = opts.right.color;
      g.lineWidth = 1.5;
      g.beginPath();
      points.forEach((p, k) => {
        if (k === 0) g.moveTo(X(p[0]), Y2(p[1]));
        else { g.lineTo(X(p[0]), Y2(points[k - 1][1])); g.lineTo(X(p[0]), Y2(p[1])); }
      });
      g.stroke();
      rightLabels = () => {
        g.fillStyle = opts.right.color;
        g.textAlign = "left";
        g.fillText(String(top2), left + plotW + 4, Y2(top2) + 8);
        g.fillText("0", left + plotW + 4, Y2(0));
      };
    }
    for (const s of opts.series) {
      g.strokeStyle = s.color;
      g.fillStyle = s.color;
      g.lineWidth = 1.4;
      if (s.dots) {
        const r = s.size || 2;
        for (const p of s.points) { g.beginPath(); g.arc(X(p[0]), Y(p[1]), r, 0, 2 * Math.PI); g.fill(); }
        continue;
      }
      g.beginPath();
      let last = null;
      for (const p of s.points) {
        // a missing volume breaks the line rather than bridging it
        if (last === null || p[0] - last > 1) g.moveTo(X(p[0]), Y(p[1])); else g.lineTo(X(p[0]), Y(p[1]));
        last = p[0];
      }
      g.stroke();
      if (s.over !== undefined) {
        g.fillStyle = COLORS.limit;
        for (const p of s.points) if (p[1] > s.over) { g.beginPath(); g.arc(X(p[0]), Y(p[1]), 3, 0, 2 * Math.PI); g.fill(); }
      }
    }
    g.restore();
    if (rightLabels) rightLabels();
    canvas.dataset.points = String(opts.points);
    canvas.dataset.lastTr = String(opts.x1 - 1);
  }

  // ------------------------------------------------------------------ the stream

  function setLink(state, text) {
    const link = document.getElementById("link");
    link.dataset.link = state;
    link.textContent = text || state;
  }

  let source = null;
  function connect() {
    source = new EventSource("events" + query());
    source.addEventListener("snapshot", (ev) => {
      onSnapshot(JSON.parse(ev.data));
      setLink("live", "live");
    });
    for (const kind of Object.keys(HANDLERS)) {
      source.addEventListener(kind, (ev) => {
        const event = JSON.parse(ev.data);
        S.received += 1;
        S.lastSeq = Math.max(S.lastSeq, event.seq);
        HANDLERS[kind](event);
        schedule();
      });
    }
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // refused (token, too many pages) or the server has gone: try again, one attempt at a time
        setLink("lost", "connection lost: retrying");
        source.close();
        setTimeout(connect, 3000);
      } else {
        setLink("reconnecting", "reconnecting");
      }
    });
  }

  window.addEventListener("resize", () => { S.dirty.charts = true; schedule(); });
  // what a test or a curious operator can ask: how much the page holds (every count is bounded)
  window.rtview = {
    stats() {
      let volumes = 0;
      let trials = 0;
      let events = 0;
      let maxRunVolumes = 0;
      for (const run of S.runs.values()) {
        volumes += run.volumes.length;
        trials += run.trials.length;
        events += run.events.length;
        maxRunVolumes = Math.max(maxRunVolumes, run.volumes.length);
      }
      return { runs: S.runs.size, volumes, maxRunVolumes, trials, events: events + S.sessionEvents.length,
        cards: document.querySelectorAll(".trial-card").length,
        eventItems: document.querySelectorAll("#events li").length, snapshots: S.snapshots, received: S.received,
        lastSeq: S.lastSeq,
        selected: S.selected, session: S.session, config: S.config };
    },
  };
  renderHeader();
  connect();
})();
