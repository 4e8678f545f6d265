// wsi-mil viewer: slide list, OpenSeadragon deep zoom, heatmap overlay, patch scores.
// Hand-written, no framework. Everything it loads comes from this server.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const Point = OpenSeadragon.Point;
  const state = {
    slides: [],
    info: null, // /api/slides/<id>
    viewer: null,
    slideItem: null, // TiledImage of the slide (null when the file is missing)
    overlayItem: null, // TiledImage of the score overlay
    score: "attention",
    tissue: null, // list of rings, each a list of [x, y] level-0 points
    hover: null, // patch under the mouse
    pinned: null, // patch clicked or chosen in the top-k list
    top: [],
    pending: null, // level-0 point waiting for a patch lookup
    inFlight: false,
  };

  const fmt = (v, digits = 3) =>
    v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
  const sci = (v) => (v === null || v === undefined ? "–" : Number(v).toExponential(3));
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const api = (path) => `/api/slides/${encodeURIComponent(state.info.slide_id)}${path}`;

  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  function message(text) {
    $("message").textContent = text || "";
    $("message").hidden = !text;
  }

  // ---------------------------------------------------------------- slide list
  // Where a prediction comes from; in-sample ones are not honest estimates.
  const SOURCE_MARKS = { "out-of-fold": "°", "in-sample": "*" };
  const SOURCE_NOTES = {
    "out-of-fold": "out-of-fold (cross-validation)",
    "in-sample": "in-sample: the model was trained on this slide",
  };
  function predictedProb(s) {
    if (!s.prediction || !(s.prediction in s.probs)) return null;
    return s.probs[s.prediction];
  }

  function renderSlides() {
    const body = $("slides").querySelector("tbody");
    body.innerHTML = "";
    for (const s of state.slides) {
      const tr = document.createElement("tr");
      tr.dataset.slide = s.slide_id;
      const usable = s.has_slide || s.has_heatmap;
      if (!usable) tr.classList.add("disabled");
      if (s.label && s.prediction && s.label !== s.prediction) tr.classList.add("wrong");
      const mark = SOURCE_MARKS[s.prediction_source] || "";
      tr.innerHTML =
        `<td>${esc(s.slide_id)}</td><td>${esc(s.label ?? "–")}</td>` +
        `<td class="pred">${esc(s.prediction ?? "–")}${mark}</td><td class="num">${fmt(predictedProb(s), 2)}</td>`;
      const probs = Object.entries(s.probs).map(([k, v]) => `P(${k}) = ${fmt(v)}`);
      const source = s.prediction_source ? `prediction: ${s.prediction_source}` : "";
      tr.title = [s.n_patches != null ? `${s.n_patches} patches` : "", source, ...probs].filter(Boolean).join("\n");
      if (usable) tr.addEventListener("click", () => openSlide(s.slide_id));
      body.appendChild(tr);
    }
    const sources = new Set(state.slides.map((s) => s.prediction_source));
    $("sources").textContent = Object.entries(SOURCE_NOTES)
      .filter(([k]) => sources.has(k))
      .map(([k, note]) => `${SOURCE_MARKS[k]} ${note}`)
      .join("  ");
  }

  // ---------------------------------------------------------------- viewer
  function makeViewer() {
    const v = OpenSeadragon({
      element: $("viewer"),
      prefixUrl: "/static/openseadragon/images/",
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      maxZoomPixelRatio: 2,
      gestureSettingsMouse: { clickToZoom: false },
      timeout: 60000,
      // The 2D canvas drawer: exact colours (no WebGL resampling) and fast without a GPU.
      drawer: "canvas",
    });
    const canvas = document.createElement("canvas");
    canvas.id = "annotations";
    Object.assign(canvas.style, { position: "absolute", left: 0, top: 0, pointerEvents: "none" });
    v.canvas.appendChild(canvas);
    state.canvas = canvas;
    v.addHandler("update-viewport", draw);
    v.addHandler("resize", draw);
    v.addHandler("canvas-click", (e) => {
      if (e.quick) lookup(e.position, true);
    });
    new OpenSeadragon.MouseTracker({
      element: v.canvas,
      moveHandler: (e) => lookup(e.position, false),
      leaveHandler: () => {
        state.hover = null;
        showPatch();
        draw();
      },
    });
    return v;
  }

  // The image the coordinates refer to: the slide, or the overlay alone without a slide file.
  const refItem = () => state.slideItem || state.overlayItem;

  function imageToElement(x, y) {
    return refItem().imageToViewerElementCoordinates(new Point(x, y));
  }

  function overlaySource(key) {
    return `/overlay/${encodeURIComponent(state.info.slide_id)}/${encodeURIComponent(key)}.dzi`;
  }

  function overlayOpacity() {
    return $("overlay-on").checked ? Number($("opacity").value) : 0;
  }

  async function openSlide(id) {
    message("");
    let info;
    try {
      info = await getJSON(`/api/slides/${encodeURIComponent(id)}`);
    } catch (err) {
      message(String(err));
      return;
    }
    state.info = info;
    state.hover = state.pinned = null;
    state.tissue = null;
    state.slideItem = state.overlayItem = null;
    history.replaceState(null, "", `#slide=${encodeURIComponent(id)}`);
    for (const tr of $("slides").querySelectorAll("tbody tr")) {
      tr.classList.toggle("active", tr.dataset.slide === id);
    }
    $("slide-title").textContent = id;
    const meta = [];
    if (info.dimensions) meta.push(`${info.dimensions[0]} × ${info.dimensions[1]} px`);
    if (info.mpp) meta.push(`${fmt(info.mpp, 3)} µm/px`);
    if (info.n_patches != null) meta.push(`${info.n_patches} patches`);
    if (info.label) meta.push(`label ${info.label}`);
    if (info.prediction) meta.push(`predicted ${info.prediction}`);
    $("slide-meta").textContent = meta.join(" · ");

    const hasHeatmap = Boolean(info.has_heatmap && info.scores);
    $("controls").hidden = !hasHeatmap;
    $("patch-panel").hidden = !hasHeatmap;
    $("top-panel").hidden = !hasHeatmap;
    if (hasHeatmap) {
      const select = $("score");
      select.innerHTML = info.scores.map((s) => `<option value="${esc(s.key)}">${esc(s.label)}</option>`).join("");
      if (!info.scores.some((s) => s.key === state.score)) state.score = info.scores[0].key;
      select.value = state.score;
      $("legend-bar").style.background = `linear-gradient(to right, ${info.legend.join(", ")})`;
      updateLegend();
    }
    $("tissue-on").disabled = !info.has_tissue;

    const sources = [];
    if (info.dzi) sources.push({ tileSource: info.dzi });
    if (hasHeatmap) sources.push({ tileSource: overlaySource(state.score), opacity: overlayOpacity() });
    if (!sources.length) {
      message(`${id}: neither the slide file nor a heatmap was found`);
      return;
    }
    if (!info.dzi) message(info.slide_error || `${id}: slide file not found; showing the heatmap only`);
    state.viewer.addOnceHandler("open", () => {
      const n = state.viewer.world.getItemCount();
      state.slideItem = info.dzi ? state.viewer.world.getItemAt(0) : null;
      state.overlayItem = hasHeatmap ? state.viewer.world.getItemAt(n - 1) : null;
      draw();
    });
    state.viewer.open(sources);
    if (hasHeatmap) loadTop();
    if (info.has_tissue && $("tissue-on").checked) loadTissue();
    showPatch();
  }

  function updateLegend() {
    const s = state.info.scores.find((x) => x.key === state.score);
    $("legend-label").textContent = `${s ? s.label : state.score} · ${state.info.colormap}`;
    $("top-score").textContent = s ? `by ${s.label}` : "";
  }

  function setScore(key) {
    state.score = key;
    updateLegend();
    const v = state.viewer;
    if (state.overlayItem) v.world.removeItem(state.overlayItem);
    const ref = state.slideItem;
    v.addTiledImage({
      tileSource: overlaySource(key),
      opacity: overlayOpacity(),
      x: ref ? ref.getBounds().x : 0,
      y: ref ? ref.getBounds().y : 0,
      width: ref ? ref.getBounds().width : 1,
      success: (e) => {
        state.overlayItem = e.item;
        draw();
      },
      error: (e) => message(`overlay: ${e.message}`),
    });
    state.overlayItem = null;
    loadTop();
  }

  // ---------------------------------------------------------------- patches
  function lookup(position, pin) {
    if (!state.info || !state.info.has_heatmap || !refItem()) return;
    const p = refItem().viewerElementToImageCoordinates(position);
    state.pending = { x: p.x, y: p.y, pin };
    if (!state.inFlight) fetchPending();
  }

  async function fetchPending() {
    const want = state.pending;
    if (!want) return;
    state.pending = null;
    state.inFlight = true;
    try {
      const r = await getJSON(api(`/patch?x=${want.x.toFixed(1)}&y=${want.y.toFixed(1)}`));
      if (want.pin) {
        state.pinned = r.patch;
        markTop();
      } else state.hover = r.patch;
      showPatch();
      draw();
    } catch (err) {
      message(String(err));
    } finally {
      state.inFlight = false;
      if (state.pending) fetchPending();
    }
  }

  function showPatch() {
    const p = state.hover || state.pinned;
    const el = $("patch");
    if (!p) {
      el.className = "muted";
      el.textContent = "hover or click a patch";
      return;
    }
    el.className = "";
    const rows = [
      ["patch", `#${p.index}${p === state.pinned ? " (pinned)" : ""}`],
      ["level-0 x, y", `${p.x}, ${p.y} (${p.size} px)`],
      ["attention", sci(p.attention)],
      ["attention (norm.)", fmt(p.attention_norm)],
      ...Object.entries(p.probs).map(([k, v]) => [`P(${esc(k)})`, fmt(v)]),
    ];
    el.innerHTML =
      `<table data-index="${p.index}">` +
      rows.map(([k, v]) => `<tr><td>${k}</td><td class="num">${v}</td></tr>`).join("") +
      "</table>";
  }

  function scoreOf(p) {
    if (state.score === "attention") return p.attention_norm;
    const k = Number(state.score.slice(4));
    return p.probs[state.info.classes[k]];
  }

  async function loadTop() {
    const key = state.score;
    let r;
    try {
      r = await getJSON(api(`/top?score=${encodeURIComponent(key)}&k=10`));
    } catch (err) {
      message(String(err));
      return;
    }
    if (key !== state.score) return;
    state.top = r.patches;
    const ol = $("top");
    ol.innerHTML = "";
    r.patches.forEach((p, i) => {
      const li = document.createElement("li");
      li.dataset.index = p.index;
      li.textContent = `${fmt(scoreOf(p))} · patch #${p.index} (${p.x}, ${p.y})`;
      li.addEventListener("click", () => jumpTo(i));
      ol.appendChild(li);
    });
    markTop();
  }

  function markTop() {
    for (const li of $("top").children) {
      li.classList.toggle("active", state.pinned != null && Number(li.dataset.index) === state.pinned.index);
    }
  }

  function jumpTo(i) {
    const p = state.top[i];
    if (!p || !refItem()) return;
    const m = p.size * 1.5; // some context around the patch
    const rect = refItem().imageToViewportRectangle(p.x - m, p.y - m, p.size + 2 * m, p.size + 2 * m);
    state.viewer.viewport.fitBounds(rect);
    state.pinned = p;
    state.hover = null;
    markTop();
    showPatch();
    draw();
  }

  // ---------------------------------------------------------------- tissue contours
  async function loadTissue() {
    if (state.tissue || !state.info.has_tissue) {
      draw();
      return;
    }
    const id = state.info.slide_id;
    try {
      const gj = await getJSON(api("/tissue"));
      if (!state.info || state.info.slide_id !== id) return;
      const rings = [];
      const addPolygon = (poly) => poly.forEach((ring) => rings.push(ring));
      const walk = (g) => {
        if (!g) return;
        if (g.type === "Polygon") addPolygon(g.coordinates);
        else if (g.type === "MultiPolygon") g.coordinates.forEach(addPolygon);
        else if (g.type === "GeometryCollection") g.geometries.forEach(walk);
      };
      (gj.features || []).forEach((f) => walk(f.geometry));
      state.tissue = rings;
      draw();
    } catch (err) {
      message(String(err));
    }
  }

  // ---------------------------------------------------------------- drawing
  function draw() {
    const canvas = state.canvas;
    const el = state.viewer.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = el.clientWidth;
    const h = el.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
      canvas.style.width = `${w}px`;
      canvas.style.height = `${h}px`;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!state.info || !refItem()) return;
    if ($("tissue-on").checked && state.tissue) {
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#00a000";
      ctx.beginPath();
      for (const ring of state.tissue) {
        ring.forEach(([x, y], i) => {
          const q = imageToElement(x, y);
          if (i === 0) ctx.moveTo(q.x, q.y);
          else ctx.lineTo(q.x, q.y);
        });
        ctx.closePath();
      }
      ctx.stroke();
    }
    const box = (p, colour, width) => {
      const a = imageToElement(p.x, p.y);
      const b = imageToElement(p.x + p.size, p.y + p.size);
      ctx.lineWidth = width;
      ctx.strokeStyle = colour;
      ctx.strokeRect(a.x, a.y, b.x - a.x, b.y - a.y);
    };
    if (state.pinned) box(state.pinned, "#000", 3);
    if (state.hover) box(state.hover, "#fff", 2);
  }

  // ---------------------------------------------------------------- start
  async function start() {
    state.viewer = makeViewer();
    $("score").addEventListener("change", (e) => setScore(e.target.value));
    $("opacity").addEventListener("input", () => {
      $("opacity-value").textContent = fmt($("opacity").value, 2);
      if (state.overlayItem) state.overlayItem.setOpacity(overlayOpacity());
    });
    $("overlay-on").addEventListener("change", () => {
      if (state.overlayItem) state.overlayItem.setOpacity(overlayOpacity());
    });
    $("tissue-on").addEventListener("change", () => ($("tissue-on").checked ? loadTissue() : draw()));
    try {
      const r = await getJSON("/api/slides");
      state.slides = r.slides;
      $("run").textContent = r.run ? `${r.out} · heatmaps of run ${r.run}` : `${r.out} · no heatmaps`;
      renderSlides();
    } catch (err) {
      message(String(err));
      return;
    }
    const m = /slide=([^&]+)/.exec(location.hash);
    if (m) openSlide(decodeURIComponent(m[1]));
  }

  // For tests and scripts: the state, and where a level-0 point is on the page.
  window.wsiMil = {
    state,
    openSlide,
    jumpTo,
    pageXY(x, y) {
      const q = imageToElement(x, y);
      const r = state.viewer.canvas.getBoundingClientRect();
      return { x: r.left + q.x, y: r.top + q.y };
    },
    loaded() {
      const items = [state.slideItem, state.overlayItem].filter(Boolean);
      return items.length > 0 && items.every((it) => it.getFullyLoaded());
    },
    // Tiles loaded and the viewport at rest (no zoom or pan animation running).
    idle() {
      const vp = state.viewer.viewport;
      const c0 = vp.getCenter(true);
      const c1 = vp.getCenter(false);
      const still = Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9 && c0.distanceTo(c1) < 1e-9;
      return this.loaded() && still && !state.inFlight;
    },
  };

  start();
})();
