// kvscope's notebook explorer, the front end of kvscope.widgets.TraceExplorer (an anywidget ES module).
//
// Three views on one step cursor: the block map (canvas: each cell banded by its mix of states, with a gauge of
// the fill of its reserved units), the sharing tree (SVG icicle: the prefix-cache tree or the fork families, each
// box coloured by its state at the step) and the memory timeline (SVG: the memory stack of the whole run, with the
// cursor). Everything drawn comes from the Python side (kvscope.present.explorer); nothing is computed here but
// pixel positions, and nothing is fetched: this file is the whole front end.
//
// The cursor: the slider, the play button, a click or drag on the timeline, the arrow keys. Moving it sets the
// `step` trait; Python answers with `step_data`, and all three views redraw. At most one step is asked at a time
// (the latest position wins), so a fast drag or play never floods the kernel.

const SVG = "http://www.w3.org/2000/svg";
const NO_FILL = 255;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c);
  return el;
}

function s(tag, attrs = {}) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function decode(text) {
  const raw = atob(text || "");
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function fmt(n) {
  return Number(n).toLocaleString("en-US");
}

function legend(items) {
  const box = h("div", { class: "kvx-legend" });
  for (const it of items) {
    const sw = h("span", { class: "kvx-swatch" });
    sw.style.background = it.color;
    box.append(h("span", { class: "kvx-key" }, sw, it.label));
  }
  return box;
}

function widthOf(el, fallback) {
  const w = el.getBoundingClientRect().width;
  return w > 40 ? Math.floor(w) : fallback;
}

function render({ model, el }) {
  const meta = () => model.get("meta") || {};
  const root = h("div", { class: "kvx" });
  el.append(root);

  // ---- header and controls ---------------------------------------------------------------------------------
  const title = h("div", { class: "kvx-title" });
  const play = h("button", { class: "kvx-play", type: "button", title: "play / pause" }, "▶");
  const slider = h("input", { class: "kvx-slider", type: "range", step: "1", "aria-label": "step" });
  const stepLabel = h("span", { class: "kvx-steplabel" });
  const treeKinds = h("span", { class: "kvx-treekinds" });
  const readout = h("div", { class: "kvx-readout" });
  root.append(title, h("div", { class: "kvx-controls" }, play, slider, stepLabel, treeKinds), readout);

  // ---- the three panels ------------------------------------------------------------------------------------
  const mapTitle = h("div", { class: "kvx-ptitle" });
  const canvas = h("canvas", { class: "kvx-map" });
  const tip = h("div", { class: "kvx-tip" });
  const probe = h("pre", { class: "kvx-probe" });
  const mapLegend = h("div");
  const mapPanel = h("div", { class: "kvx-panel kvx-panel-map" }, mapTitle, canvas, mapLegend, tip, probe);

  const treeTitle = h("div", { class: "kvx-ptitle" });
  const treeSvg = s("svg", { class: "kvx-tree" });
  const treeNote = h("div", { class: "kvx-note" });
  const treeLegend = h("div");
  const treePanel = h("div", { class: "kvx-panel kvx-panel-tree" }, treeTitle, treeSvg, treeLegend, treeNote);

  const tlTitle = h("div", { class: "kvx-ptitle" }, "Memory over the run");
  const tlSvg = s("svg", { class: "kvx-timeline" });
  const tlLegend = h("div");
  const tlPanel = h("div", { class: "kvx-panel kvx-panel-timeline" }, tlTitle, tlSvg, tlLegend);
  root.append(h("div", { class: "kvx-row" }, mapPanel, treePanel), tlPanel);

  // ---- state ---------------------------------------------------------------------------------------------------
  let cursor = model.get("step"); // where the slider is (may be ahead of the data shown)
  let inflight = null; // the step asked of Python, until its step_data arrives
  let pending = null; // the latest step asked for while another was in flight
  let timer = null; // play
  let watchdog = null;
  let treeBoxes = null; // the drawn boxes of the tree (rects), reused while the layout is fixed
  let geometry = null; // the map's layout: cols, cell size

  function setup() {
    const m = meta();
    title.textContent = `${m.title || ""} — ${m.name || ""}`;
    slider.min = m.first;
    slider.max = m.last;
    slider.value = cursor;
    treeKinds.replaceChildren();
    const kinds = m.tree_kinds || [];
    if (kinds.length > 1) {
      for (const k of kinds) {
        const b = h("button", { class: "kvx-kind", type: "button", "data-kind": k.key }, k.label);
        b.addEventListener("click", () => {
          model.set("tree_kind", k.key);
          model.save_changes();
        });
        treeKinds.append(b);
      }
    }
    const blocks = model.get("blocks") || {};
    const unit = blocks.unit || "unit";
    mapTitle.textContent = blocks.binned
      ? `${fmt(blocks.units)} ${unit}s in ${fmt(blocks.cells)} cells at the step`
      : `${fmt(blocks.cells)} ${unit}s at the step`;
    mapLegend.replaceChildren(
      legend([...(m.states || []), { label: "bar: fill of reserved units (tokens / slots)", color: "#333" }]),
    );
  }

  // ---- asking Python for a step --------------------------------------------------------------------------------
  function ask(step) {
    step = Math.max(Number(slider.min), Math.min(Number(slider.max), Math.round(step)));
    cursor = step;
    slider.value = step;
    stepLabel.textContent = `step ${fmt(step)}`;
    drawCursor();
    if (inflight !== null) {
      pending = step;
      return;
    }
    const shown = (model.get("step_data") || {}).step;
    if (step === model.get("step") && shown === step) return;
    inflight = step;
    clearTimeout(watchdog);
    watchdog = setTimeout(() => done(), 8000); // never stay blocked on an answer that does not come
    model.set("step", step);
    model.save_changes();
  }

  function done() {
    inflight = null;
    clearTimeout(watchdog);
    if (pending !== null) {
      const next = pending;
      pending = null;
      if (next !== (model.get("step_data") || {}).step) ask(next);
    }
  }

  // ---- the block map -------------------------------------------------------------------------------------------
  function drawMap(data) {
    const m = meta();
    const blocks = model.get("blocks") || {};
    const n = blocks.cells || 0;
    const k = (m.states || []).length;
    const mix = decode(data.cells && data.cells.mix);
    const fill = decode(data.cells && data.cells.fill);
    const width = widthOf(mapPanel, 460) - 2;
    const cols = Math.max(1, Math.min(n, 64, Math.ceil(Math.sqrt(n * 3))));
    const rows = Math.max(1, Math.ceil(n / cols));
    const cs = Math.max(3, Math.min(28, Math.floor(width / cols)));
    geometry = { cols, cs, n };
    const dpr = window.devicePixelRatio || 1;
    canvas.width = cols * cs * dpr;
    canvas.height = rows * cs * dpr;
    canvas.style.width = `${cols * cs}px`;
    canvas.style.height = `${rows * cs}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cols * cs, rows * cs);
    const gap = cs >= 6 ? 1 : 0;
    const inner = cs - gap;
    const gauge = cs >= 8 ? Math.max(2, Math.floor(cs / 4)) : 0;
    for (let i = 0; i < n; i++) {
      const x = (i % cols) * cs;
      const y = Math.floor(i / cols) * cs;
      const f = fill[i];
      const bandW = f !== NO_FILL && gauge ? inner - gauge : inner;
      let total = 0;
      for (let j = 0; j < k; j++) total += mix[i * k + j];
      let top = 0;
      for (let j = 0; j < k; j++) {
        const share = mix[i * k + j];
        if (!share) continue;
        // Any state present gets at least a pixel: scattered allocations stay visible in binned cells.
        const hgt = Math.max(1, Math.round((inner * share) / (total || 255)));
        ctx.fillStyle = m.states[j].color;
        ctx.fillRect(x, y + top, bandW, Math.min(hgt, inner - top));
        top += hgt;
        if (top >= inner) break;
      }
      if (f !== NO_FILL && gauge) {
        ctx.fillStyle = "#ffffff";
        ctx.fillRect(x + inner - gauge, y, gauge, inner);
        const fh = Math.round((inner * f) / 254);
        ctx.fillStyle = "#333333";
        ctx.fillRect(x + inner - gauge, y + inner - fh, gauge, fh);
      }
    }
    canvas.dataset.step = String(data.step);
  }

  function cellAt(ev) {
    if (!geometry) return -1;
    const r = canvas.getBoundingClientRect();
    const col = Math.floor((ev.clientX - r.left) / geometry.cs);
    const row = Math.floor((ev.clientY - r.top) / geometry.cs);
    const i = row * geometry.cols + col;
    return col >= 0 && col < geometry.cols && i >= 0 && i < geometry.n ? i : -1;
  }

  function cellWords(i) {
    const m = meta();
    const blocks = model.get("blocks") || {};
    const data = model.get("step_data") || {};
    const k = (m.states || []).length;
    const mix = decode(data.cells && data.cells.mix);
    const fill = decode(data.cells && data.cells.fill);
    const a = blocks.edges[i];
    const b = blocks.edges[i + 1];
    const what = b - a > 1 ? `${blocks.unit}s ${fmt(a)}–${fmt(b - 1)}` : `${blocks.unit} ${fmt(a)}`;
    const parts = [];
    for (let j = 0; j < k; j++) {
      const share = mix[i * k + j];
      if (share) parts.push(`${m.states[j].key} ${Math.round((100 * share) / 255)}%`);
    }
    const f = fill[i] === NO_FILL ? "nothing reserved" : `fill ${Math.round((100 * fill[i]) / 254)}%`;
    return `${what}: ${parts.join(", ")}; ${f} (click for its holders)`;
  }

  canvas.addEventListener("mousemove", (ev) => {
    const i = cellAt(ev);
    tip.textContent = i >= 0 ? cellWords(i) : "";
  });
  canvas.addEventListener("mouseleave", () => {
    tip.textContent = "";
  });
  canvas.addEventListener("click", (ev) => {
    const i = cellAt(ev);
    if (i < 0) return;
    model.set("probe", i);
    model.save_changes();
  });

  // ---- the sharing tree ----------------------------------------------------------------------------------------
  function treeLayout() {
    const tree = model.get("tree") || {};
    const data = model.get("step_data") || {};
    const t = data.tree || {};
    return t.boxes || tree.boxes || null;
  }

  function buildTree() {
    const tree = model.get("tree") || {};
    treeTitle.textContent = tree.title || "Sharing";
    treeTitle.title = tree.caption || "";
    treeLegend.replaceChildren(legend(tree.legend || []));
    for (const b of treeKinds.querySelectorAll(".kvx-kind")) {
      b.classList.toggle("kvx-active", b.dataset.kind === tree.kind);
    }
    treeBoxes = null;
  }

  function drawTree(data) {
    const tree = model.get("tree") || {};
    const t = data.tree || {};
    const width = widthOf(treePanel, 460) - 2;
    const height = tree.kind ? 300 : 40;
    treeSvg.setAttribute("width", width);
    treeSvg.setAttribute("height", height);
    treeSvg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const notes = [tree.note, t.note].filter((x) => x);
    treeNote.textContent = notes.join("; ");
    if (!tree.kind || t.kind !== tree.kind) {
      treeSvg.replaceChildren();
      if (!tree.kind) {
        const msg = s("text", { x: 8, y: 24, class: "kvx-empty" });
        msg.textContent = "No sharing in this run";
        treeSvg.append(msg);
      }
      treeSvg.dataset.step = String(data.step);
      return;
    }
    const boxes = treeLayout();
    const states = t.states || [];
    const colors = (tree.legend || []).map((x) => x.color);
    const perStep = Boolean(t.boxes); // fork families are laid out at every step; the prefix tree once
    if (perStep || !treeBoxes || treeBoxes.width !== width) {
      treeSvg.replaceChildren();
      const rects = [];
      const levels = Math.max(1, boxes.levels);
      const colW = width / levels;
      for (let i = 0; i < boxes.level.length; i++) {
        const x = boxes.level[i] * colW;
        const y = boxes.y0[i] * height;
        const hgt = Math.max(0.5, (boxes.y1[i] - boxes.y0[i]) * height);
        const g = s("g", {});
        const rect = s("rect", { x, y, width: Math.max(1, colW - 1), height: hgt, class: "kvx-box" });
        const tt = s("title", {});
        tt.textContent = boxes.hover[i];
        rect.append(tt);
        g.append(rect);
        if (hgt >= 13 && colW >= 48) {
          const label = s("text", { x: x + 4, y: y + Math.min(hgt / 2, 20) + 4, class: "kvx-boxlabel" });
          const chars = Math.floor((colW - 8) / 6.2);
          const text = boxes.label[i];
          label.textContent = text.length > chars ? `${text.slice(0, Math.max(1, chars - 1))}…` : text;
          g.append(label);
        }
        treeSvg.append(g);
        rects.push(rect);
      }
      treeBoxes = { rects, width };
    }
    treeBoxes.rects.forEach((rect, i) => {
      rect.setAttribute("fill", colors[states[i]] || "#ffffff");
      rect.dataset.state = String(states[i]);
    });
    treeSvg.dataset.step = String(data.step);
  }

  // ---- the timeline --------------------------------------------------------------------------------------------
  const PAD = { l: 64, r: 10, t: 8, b: 26 };
  let tlScale = null;

  function drawTimeline() {
    const tl = model.get("timeline") || {};
    const m = meta();
    const width = widthOf(tlPanel, 920) - 2;
    const height = 190;
    tlSvg.setAttribute("width", width);
    tlSvg.setAttribute("height", height);
    tlSvg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    tlSvg.replaceChildren();
    const x0 = m.first;
    const x1 = Math.max(m.last, m.first + 1);
    const pw = width - PAD.l - PAD.r;
    const ph = height - PAD.t - PAD.b;
    const X = (v) => PAD.l + ((v - x0) / (x1 - x0)) * pw;
    const Y = (v) => PAD.t + (1 - v) * ph;
    tlScale = { X, x0, x1, pw };
    const xs = tl.x || [];
    const base = new Array(xs.length).fill(0);
    for (const band of tl.bands || []) {
      const top = band.y.map((v, i) => base[i] + v);
      let d = "";
      xs.forEach((x, i) => {
        d += `${i ? "L" : "M"}${X(x + (tl.width > 1 ? tl.width / 2 : 0)).toFixed(1)},${Y(top[i]).toFixed(1)}`;
      });
      for (let i = xs.length - 1; i >= 0; i--) {
        d += `L${X(xs[i] + (tl.width > 1 ? tl.width / 2 : 0)).toFixed(1)},${Y(base[i]).toFixed(1)}`;
      }
      const path = s("path", { d: `${d}Z`, fill: band.color, class: "kvx-band" });
      const tt = s("title", {});
      tt.textContent = band.label;
      path.append(tt);
      tlSvg.append(path);
      top.forEach((v, i) => {
        base[i] = v;
      });
    }
    for (const tick of tl.ticks || []) {
      tlSvg.append(s("line", { x1: PAD.l - 4, x2: PAD.l, y1: Y(tick.y), y2: Y(tick.y), class: "kvx-axis" }));
      const t = s("text", { x: PAD.l - 6, y: Y(tick.y) + 4, class: "kvx-tick", "text-anchor": "end" });
      t.textContent = tick.label;
      tlSvg.append(t);
    }
    for (let i = 0; i <= 5; i++) {
      const v = Math.round(x0 + ((x1 - x0) * i) / 5);
      const anchor = i === 0 ? "start" : i === 5 ? "end" : "middle";
      const t = s("text", { x: X(v), y: height - 8, class: "kvx-tick", "text-anchor": anchor });
      t.textContent = fmt(v);
      tlSvg.append(t);
    }
    tlSvg.append(s("rect", { x: PAD.l, y: PAD.t, width: pw, height: ph, class: "kvx-frame" }));
    const line = s("line", { y1: PAD.t, y2: PAD.t + ph, class: "kvx-cursor" });
    const label = s("text", { y: PAD.t + 12, class: "kvx-cursorlabel" });
    tlSvg.append(line, label);
    tlTitle.textContent = `Memory over the run, by step${tl.note ? ` (${tl.note})` : ""}`;
    tlLegend.replaceChildren(legend(tl.bands || []));
    drawCursor();
  }

  function drawCursor() {
    const line = tlSvg.querySelector(".kvx-cursor");
    const label = tlSvg.querySelector(".kvx-cursorlabel");
    if (!line || !tlScale) return;
    const x = tlScale.X(cursor);
    line.setAttribute("x1", x);
    line.setAttribute("x2", x);
    label.setAttribute("x", x + 4);
    label.textContent = `step ${fmt(cursor)}`;
    tlSvg.dataset.step = String(cursor);
  }

  function stepAtX(ev) {
    const r = tlSvg.getBoundingClientRect();
    const frac = (ev.clientX - r.left - PAD.l) / tlScale.pw;
    return tlScale.x0 + Math.max(0, Math.min(1, frac)) * (tlScale.x1 - tlScale.x0);
  }

  let dragging = false;
  tlSvg.addEventListener("pointerdown", (ev) => {
    if (!tlScale) return;
    dragging = true;
    stop();
    ask(stepAtX(ev));
  });
  tlSvg.addEventListener("pointermove", (ev) => {
    if (dragging) ask(stepAtX(ev));
  });
  const release = () => {
    dragging = false;
  };
  window.addEventListener("pointerup", release);

  // ---- the whole view at the data's step -----------------------------------------------------------------------
  function drawStep() {
    const data = model.get("step_data") || {};
    if (data.step === undefined) return;
    readout.textContent = data.readout || "";
    drawMap(data);
    drawTree(data);
    if (inflight === null && pending === null && !dragging && timer === null) {
      cursor = data.step;
      slider.value = cursor;
    }
    stepLabel.textContent = `step ${fmt(cursor)}`;
    drawCursor();
    root.dataset.step = String(data.step);
  }

  // ---- play ----------------------------------------------------------------------------------------------------
  function stop() {
    if (timer !== null) clearInterval(timer);
    timer = null;
    play.textContent = "▶";
  }

  play.addEventListener("click", () => {
    if (timer !== null) return stop();
    const m = meta();
    if (cursor >= m.last) ask(m.first);
    const stride = Math.max(1, Math.round((m.last - m.first) / 200));
    play.textContent = "❚❚";
    timer = setInterval(() => {
      if (inflight !== null) return; // wait for the step shown to arrive: playing never queues requests
      if (cursor >= meta().last) return stop();
      ask(Math.min(meta().last, cursor + stride));
    }, 120);
  });

  slider.addEventListener("input", () => {
    stop();
    ask(Number(slider.value));
  });
  slider.addEventListener("keydown", (ev) => {
    if (ev.key === " ") {
      ev.preventDefault();
      play.click();
    }
  });

  // ---- model events --------------------------------------------------------------------------------------------
  const onData = () => {
    drawStep();
    done();
  };
  const onStep = () => {
    const step = model.get("step");
    if (inflight === null && timer === null && !dragging) {
      cursor = step; // moved from Python
      slider.value = step;
      drawCursor();
    } else if (inflight !== null && step !== inflight) {
      done(); // Python snapped the step asked to a recorded one it already shows
    }
  };
  const onTree = () => {
    buildTree();
    drawStep();
  };
  const onProbe = () => {
    probe.textContent = model.get("probe_text") || "";
  };
  const onMeta = () => {
    setup();
    drawTimeline();
    drawStep();
  };
  model.on("change:step_data", onData);
  model.on("change:step", onStep);
  model.on("change:tree", onTree);
  model.on("change:probe_text", onProbe);
  model.on("change:meta", onMeta);
  model.on("change:timeline", drawTimeline);

  setup();
  buildTree();
  drawTimeline();
  drawStep();
  onProbe();

  let resize = null;
  if (typeof ResizeObserver !== "undefined") {
    let last = 0;
    resize = new ResizeObserver(() => {
      const w = widthOf(root, 0);
      if (Math.abs(w - last) < 8) return;
      last = w;
      treeBoxes = null;
      drawTimeline();
      drawStep();
    });
    resize.observe(root);
  }

  return () => {
    stop();
    clearTimeout(watchdog);
    window.removeEventListener("pointerup", release);
    if (resize) resize.disconnect();
    model.off("change:step_data", onData);
    model.off("change:step", onStep);
    model.off("change:tree", onTree);
    model.off("change:probe_text", onProbe);
    model.off("change:meta", onMeta);
    model.off("change:timeline", drawTimeline);
  };
}

export default { render };
