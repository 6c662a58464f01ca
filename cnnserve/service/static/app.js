// cnnserve web page: pick a model, upload an image, see its class scores, a class's dense
// score map over the image at one or more scales, the class's detections (boxes with labels),
// and what each layer of the network makes of the image. Plain JS, no build step, and no
// request leaves this origin.
//
// document.body.dataset.state tells tests (and styles) where the page is:
// "loading" -> "ready" (models listed) -> "working" (requests in flight) -> "done" | "error".
"use strict";

const $ = (id) => document.getElementById(id);

const els = {
  status: $("status"),
  error: $("error"),
  model: $("model"),
  modelInfo: $("model-info"),
  dropzone: $("dropzone"),
  file: $("file"),
  topK: $("top-k"),
  predictMeta: $("predict-meta"),
  predictions: $("predictions"),
  cls: $("class"),
  scales: $("scales"),
  scalePresets: $("scale-presets"),
  divisor: $("stride-divisor"),
  detectionsOn: $("detections-on"),
  threshold: $("threshold"),
  alpha: $("alpha"),
  alphaValue: $("alpha-value"),
  preview: $("preview"),
  previewCaption: $("preview-caption"),
  heatmap: $("heatmap"),
  heatmapCaption: $("heatmap-caption"),
  peakBox: $("peak-box"),
  boxes: $("boxes"),
  detections: $("detections"),
  detectionsBody: document.querySelector("#detections-table tbody"),
  downloadPng: $("download-png"),
  downloadJson: $("download-json"),
  summary: $("scoremap-summary"),
  legend: $("heatmap-legend"),
  legendLabel: $("heatmap-legend-label"),
  insideMeta: $("inside-meta"),
  layers: $("layers"),
};

// Largest display sizes (width, height) of the images: small images are scaled up by a whole
// factor. The heatmap, where the answers are, is the larger.
const PREVIEW_SIZE = [260, 260];
const HEATMAP_SIZE = [560, 460];

const state = {
  models: [],
  model: null, // the ModelSummary of the chosen model
  file: null, // the uploaded File
  classChosen: false, // false: the score map shows the class the service chooses
  shown: null, // {model, file, options, json}: the score map on screen, for the downloads
  predictedKey: null, // which (model, file, top_k) the predictions on screen belong to
  run: 0, // each analysis has a number; a newer one makes older ones stale
  controller: null, // aborts the requests of a stale analysis
  urls: { preview: null, heatmap: null },
  insideKey: null, // which (model, file) the layers on screen belong to
  layerUrls: [], // object URLs of the layers' grids
  observer: null, // loads each layer's grid when it scrolls into view
  insideController: null, // aborts the layers' requests when the image or model changes
};

// ----------------------------------------------------------------------------------------
// Talking to the service
// ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The service's error body {"error": {"code", "message"}} as an ApiError. */
async function errorOf(response) {
  let code = "http_error";
  let message = response.statusText || "the request failed";
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, code, message);
}

/** fetch() that throws an ApiError for a network failure or a status other than 2xx. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", `cannot reach the service (${err.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

function uploadBody(file) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  return form;
}

function modelPath(name, action) {
  return `v1/models/${encodeURIComponent(name)}${action ? `/${action}` : ""}`;
}

async function predict(model, file, topK, signal) {
  const query = new URLSearchParams({ top_k: String(topK) });
  const response = await api(`${modelPath(model.name, "predict")}?${query}`, {
    method: "POST",
    body: uploadBody(file),
    signal,
  });
  return response.json();
}

/**
 * The query of a /scoremap request. The page draws the colour bar and the boxes itself over
 * the PNG it shows; a downloaded PNG (``picture: "download"``) has the service draw both.
 */
function scoremapQuery(format, options, picture = "page") {
  const query = new URLSearchParams({
    format,
    stride_divisor: String(options.divisor),
    top_k: String(options.topK),
    scales: options.scales,
  });
  if (options.label !== null) query.set("class", options.label);
  if (format === "json") {
    query.set("arrays", "false"); // the aggregates, the peak and the detections: no cells
    if (options.detections) query.set("detections", "true");
  }
  if (format === "png") {
    const download = picture === "download";
    query.set("alpha", String(options.alpha));
    query.set("legend", String(download));
    if (download && options.detections) query.set("detections", "true");
  }
  if (options.detections) query.set("threshold", String(options.threshold));
  return query;
}

async function scoremapJson(model, file, options, signal) {
  const query = scoremapQuery("json", options);
  const response = await api(`${modelPath(model.name, "scoremap")}?${query}`, {
    method: "POST",
    body: uploadBody(file),
    signal,
  });
  return response.json();
}

async function scoremapPng(model, file, options, signal, picture = "page") {
  const query = scoremapQuery("png", options, picture);
  const response = await api(`${modelPath(model.name, "scoremap")}?${query}`, {
    method: "POST",
    body: uploadBody(file),
    signal,
  });
  return {
    blob: await response.blob(),
    label: decodeURIComponent(response.headers.get("X-Cnnserve-Class") || ""),
    mapShape: response.headers.get("X-Cnnserve-Map-Shape"),
    scale: response.headers.get("X-Cnnserve-Scale"),
    timeMs: response.headers.get("X-Cnnserve-Time-Ms"),
  };
}

async function activationsJson(model, file, signal) {
  const response = await api(`${modelPath(model.name, "activations")}?format=json`, {
    method: "POST",
    body: uploadBody(file),
    signal,
  });
  return response.json();
}

async function activationsPng(model, file, layer, signal) {
  const query = new URLSearchParams({ format: "png", layer });
  const response = await api(`${modelPath(model.name, "activations")}?${query}`, {
    method: "POST",
    body: uploadBody(file),
    signal,
  });
  return response.blob();
}

// ----------------------------------------------------------------------------------------
// Small helpers
// ----------------------------------------------------------------------------------------

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") Object.assign(node.style, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function percent(p) {
  if (p > 0 && p < 0.0005) return "<0.1%";
  return `${(100 * p).toFixed(1)}%`;
}

function ms(value) {
  const number = Number(value);
  return Number.isFinite(number) ? `${number.toFixed(1)} ms` : "";
}

/** A [H, W] pair of the API as people read an image size: "W×H px". */
function px(pair) {
  return `${pair[1]}\u00d7${pair[0]} px`;
}

/** A map shape [rows, columns] of the API: "rows×columns cells". */
function cells(pair) {
  return `${pair[0]}\u00d7${pair[1]} ${pair[0] * pair[1] === 1 ? "cell" : "cells"}`;
}

function num(value) {
  return String(+Number(value).toFixed(2));
}

/** A scale factor as the service writes it: "0.25", "1". */
function factor(value) {
  return String(+Number(value).toPrecision(6));
}

function setStatus(text) {
  els.status.textContent = text;
}

function setState(name) {
  document.body.dataset.state = name;
}

function showError(err) {
  let text;
  if (err instanceof ApiError) {
    text = err.status ? `${err.status}: ${err.message}` : `Network error: ${err.message}`;
    els.error.dataset.code = err.code;
    els.error.dataset.status = String(err.status);
  } else {
    text = `Error: ${err && err.message ? err.message : err}`;
    els.error.dataset.code = "client_error";
    els.error.dataset.status = "";
  }
  els.error.textContent = text;
  els.error.hidden = false;
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
  delete els.error.dataset.code;
  delete els.error.dataset.status;
}

/**
 * Show blob in img through an object URL (null: show nothing). Resolves once the image has
 * loaded, rejects if the browser cannot decode it.
 */
function setUrl(which, img, blob) {
  if (state.urls[which]) URL.revokeObjectURL(state.urls[which]);
  state.urls[which] = blob ? URL.createObjectURL(blob) : null;
  if (!state.urls[which]) {
    img.removeAttribute("src");
    return Promise.resolve(img);
  }
  const done = new Promise((resolve, reject) => {
    const settle = (event) => {
      img.removeEventListener("load", settle);
      img.removeEventListener("error", settle);
      if (event.type === "load") resolve(img);
      else reject(new Error("the browser cannot show the image"));
    };
    img.addEventListener("load", settle);
    img.addEventListener("error", settle);
  });
  img.src = state.urls[which];
  return done;
}

/** Show a small image scaled up by a whole factor (pixelated), a large one scaled down. */
function sizeForDisplay(img, [width, height]) {
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  if (!w || !h) return;
  const fit = Math.min(width / w, height / h);
  const scale = fit >= 1 ? Math.floor(fit) : fit;
  img.style.width = `${Math.round(w * scale)}px`;
  // Whole-factor enlargements keep their pixels sharp; reduced photos are smoothed.
  img.style.imageRendering = scale >= 1 ? "pixelated" : "auto";
  img.dataset.scale = String(scale);
}

// ----------------------------------------------------------------------------------------
// Model
// ----------------------------------------------------------------------------------------

/** <dt>/<dd> pairs of [term, value] rows, leaving out empty values. */
function factList(rows) {
  return rows
    .filter(([, value]) => value)
    .flatMap(([term, value]) => [
      el("dt", { textContent: term }),
      el("dd", { textContent: value }),
    ]);
}

function describeModel(model) {
  const [channels, height, width] = model.input_shape;
  const g = model.geometry || {};
  const names = model.classes.slice(0, 20).join(", ");
  const more = model.classes.length > 20 ? `, ... (${model.classes.length - 20} more)` : "";
  const rows = [
    ["Input", `${px([height, width])}, ${channels === 1 ? "grayscale" : `${channels} channels`}`],
    ["Classes", `${model.num_classes}: ${names}${more}`],
    [
      "Dense map",
      g.stride
        ? `a cell every ${g.stride} px, window ${px(g.window)}, receptive field ` +
          `${px(g.receptive_field)}${g.exact ? ", exact" : ", approximate (padding)"}`
        : "not available",
    ],
    ["Weights", model.dtype],
  ];
  els.modelInfo.replaceChildren(...factList(rows));
  // The training record is a nice extra: fetched on the side, never an error on screen.
  api(modelPath(model.name))
    .then((response) => response.json())
    .then((detail) => {
      const acc = detail && detail.training ? detail.training.test_acc : undefined;
      if (state.model !== model || typeof acc !== "number") return;
      els.modelInfo.append(
        el("dt", { textContent: "Test accuracy" }),
        el("dd", { textContent: percent(acc) }),
      );
    })
    .catch(() => {});
}

function fillClassSelect(model) {
  els.cls.replaceChildren(
    ...model.classes.map((label) => el("option", { value: label, textContent: label })),
  );
  els.cls.disabled = false;
}

function fillDivisorSelect(model) {
  const stride = (model.geometry && model.geometry.stride) || 1;
  const options = [];
  for (let d = 1; d <= stride; d += 1) {
    if (stride % d !== 0) continue;
    const step = stride / d;
    const text = `${d} (a cell every ${step} px${d > 1 ? `, ${d * d} passes` : ""})`;
    options.push(el("option", { value: String(d), textContent: text }));
  }
  els.divisor.replaceChildren(...options);
  els.divisor.disabled = options.length < 2;
}

/**
 * Suggested scales for the datalist of the scales field: the image as it is, halvings, and
 * factors that bring an object of a quarter of a 512-pixel photo to the model's window.
 */
function fillScalePresets(model) {
  const window = Math.max(...((model.geometry && model.geometry.window) || [1]));
  const presets = ["1", "1,0.5", "1,0.5,0.25", "0.5,0.25"];
  const around = window / 128; // a 128-pixel object seen at the window's size
  if (around < 1) {
    presets.push([0.8, 1, 1.2].map((f) => factor((around * f).toFixed(2))).join(","));
  }
  els.scalePresets.replaceChildren(...presets.map((value) => el("option", { value })));
  els.scales.disabled = false;
}

function chooseModel(name) {
  const model = state.models.find((m) => m.name === name) || state.models[0];
  state.model = model;
  state.classChosen = false;
  state.predictedKey = null;
  els.topK.max = String(model.num_classes);
  if (Number(els.topK.value) > model.num_classes) els.topK.value = String(model.num_classes);
  describeModel(model);
  fillClassSelect(model);
  fillDivisorSelect(model);
  fillScalePresets(model);
}

// ----------------------------------------------------------------------------------------
// Results
// ----------------------------------------------------------------------------------------

function rankingItem(p, index) {
  const li = el("li", { dataset: { label: p.label, probability: String(p.probability) } }, [
    el("span", { className: "label", textContent: p.label }),
    el("span", { className: "bar", ariaHidden: "true" }, [
      el("span", { style: { width: `${Math.max(0, Math.min(1, p.probability)) * 100}%` } }),
    ]),
    el("span", { className: "prob", textContent: percent(p.probability) }),
  ]);
  if (index === 0) li.classList.add("top1");
  return li;
}

function renderPredictions(result) {
  els.predictions.replaceChildren(...result.predictions.map(rankingItem));
  const parts = [`${px(result.image_size)} image`];
  if (result.resized_to) parts.push(`resized to ${px(result.resized_to)}`);
  if (result.converted) parts.push(result.converted);
  parts.push(ms(result.time_ms));
  els.predictMeta.textContent = parts.filter(Boolean).join(" \u00b7 ");
}

function clearResults() {
  els.predictions.replaceChildren();
  els.predictMeta.textContent = "";
  clearMap();
}

/** Remove the score map, its boxes and detections; the downloads have nothing to give. */
function clearMap() {
  els.summary.replaceChildren();
  els.heatmap.hidden = true;
  els.peakBox.hidden = true;
  els.boxes.replaceChildren();
  els.detections.hidden = true;
  els.detectionsBody.replaceChildren();
  els.legend.hidden = true;
  els.heatmapCaption.textContent = "Heatmap";
  setUrl("heatmap", els.heatmap, null);
  state.shown = null;
  els.downloadPng.disabled = true;
  els.downloadJson.disabled = true;
}

function rankingTable(title, rows) {
  return el("div", { className: "ranking-block" }, [
    el("h3", { textContent: title }),
    el("ol", { className: "ranking compact" }, rows.map(rankingItem)),
  ]);
}

function cellStride(stride) {
  if (!stride) return "";
  const [down, across] = stride.map(num);
  return down === across ? `${down} px` : `${down} px down, ${across} px across`;
}

/** What the windows cover, in the pixels of the image the network saw (resized at a scale). */
function covered(g) {
  if (!g.covered || !g.image_size) return "";
  const [ch, cw] = g.covered;
  const seen = g.resized_size || g.image_size;
  const [h, w] = seen;
  const scaled = g.scale !== undefined && Number(g.scale) !== 1;
  const image = scaled
    ? `the image resized to ${px(seen)} (scale ${factor(g.scale)})`
    : `the ${px(seen)} image`;
  if (ch === h && cw === w) return `the whole of ${image}`;
  return `${px(g.covered)} of ${image} (the right and bottom margins are in no window)`;
}

function renderSummary(result) {
  const g = result.geometry || {};
  const cls = result.class;
  const scales = (result.scales || [1]).map(factor);
  const facts = [
    [
      "Scales",
      scales.length > 1
        ? `${scales.join(", ")} (the map shown is at ${factor(result.scale)}, where ` +
          `\u201c${cls ? cls.label : "the class"}\u201d is most likely)`
        : scales[0],
    ],
    ["Map", `${cells(result.map_shape)} (rows\u00d7columns)`],
    ["Cell stride", cellStride(g.cell_stride)],
    ["Covered", covered(g)],
    ["Channels", result.converted ? `${result.converted} for the network` : ""],
    ["Time", ms(result.time_ms)],
  ];
  if (cls && cls.peak) {
    const p = cls.peak;
    const [x0, y0, x1, y1] = p.box.map(num);
    facts.push([
      `Peak of \u201c${cls.label}\u201d`,
      `${percent(p.probability)} at row ${p.row}, column ${p.col} ` +
        `(x ${x0}\u2013${x1}, y ${y0}\u2013${y1})`,
    ]);
  }
  const agg = result.aggregate || {};
  els.summary.replaceChildren(
    el("dl", { className: "facts" }, factList(facts)),
    el("div", { className: "rankings" }, [
      rankingTable("Top classes by max over cells", agg.top_k_by_max || []),
      rankingTable("Top classes by mean over cells", agg.top_k_by_mean || []),
    ]),
  );
}

/** left/top/width/height in % of the image for a box [x0, y0, x1, y1] of its pixels. */
function boxStyle(box, width, height) {
  const [x0, y0, x1, y1] = box;
  return {
    left: `${(100 * x0) / width}%`,
    top: `${(100 * y0) / height}%`,
    width: `${(100 * (x1 - x0)) / width}%`,
    height: `${(100 * (y1 - y0)) / height}%`,
  };
}

function detectionText(d) {
  return `${d.class} ${d.score.toFixed(2)}`;
}

/** The detections as labelled boxes over the heatmap, and as a table below it. */
function renderDetections(result, width, height) {
  const found = result.detections;
  els.boxes.replaceChildren();
  els.detectionsBody.replaceChildren();
  if (!found) {
    els.detections.hidden = true;
    return;
  }
  const boxes = found.map((d, rank) => {
    const box = el(
      "div",
      {
        className: "det-box",
        title: `${d.class}: ${percent(d.score)} at scale ${factor(d.scale)}`,
        style: boxStyle(d.box, width, height),
        dataset: { rank: String(rank + 1), box: JSON.stringify(d.box), score: String(d.score) },
      },
      [el("span", { className: "det-label", textContent: detectionText(d) })],
    );
    if (rank === 0) box.classList.add("best");
    return box;
  });
  els.boxes.replaceChildren(...boxes);
  const rows = found.map((d, rank) =>
    el(
      "tr",
      {
        dataset: {
          class: d.class,
          score: String(d.score),
          box: JSON.stringify(d.box),
          scale: String(d.scale),
        },
      },
      [
        el("td", { textContent: String(rank + 1) }),
        el("td", { textContent: d.class }),
        el("td", { textContent: percent(d.score) }),
        el("td", { textContent: d.box.map((v) => Math.round(v)).join(", ") }),
        el("td", { textContent: factor(d.scale) }),
      ],
    ),
  );
  if (!rows.length) {
    const none = `none at probability \u2265 ${num(result.threshold)}`;
    rows.push(el("tr", {}, [el("td", { colSpan: 5, textContent: none })]));
  }
  els.detectionsBody.replaceChildren(...rows);
  els.detections.hidden = false;
}

function placePeakBox(result, width, height) {
  const peak = result.class && result.class.peak;
  if (!peak || !width || !height || result.detections) {
    els.peakBox.hidden = true; // with detections on, their boxes say where the class is
    return;
  }
  Object.assign(els.peakBox.style, boxStyle(peak.box, width, height));
  els.peakBox.title = `Peak of class ${result.class.label}: ${percent(peak.probability)}`;
  els.peakBox.hidden = false;
}

// ----------------------------------------------------------------------------------------
// Inside the network: one figure per layer, its grid fetched when it scrolls into view
// ----------------------------------------------------------------------------------------

/** A base64 little-endian float32 array of the API as a Float32Array. */
function floats(encoded) {
  const bytes = Uint8Array.from(atob(encoded.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i += 1) out[i] = view.getFloat32(4 * i, true);
  return out;
}

function clearInside() {
  if (state.insideController) state.insideController.abort();
  state.insideController = null;
  if (state.observer) state.observer.disconnect();
  state.observer = null;
  for (const url of state.layerUrls) URL.revokeObjectURL(url);
  state.layerUrls = [];
  state.insideKey = null;
  els.layers.replaceChildren();
  els.layers.dataset.state = "empty";
}

function layerCaption(layer) {
  const shape = `(${layer.shape.join(", ")})`;
  const where = layer.index === null ? "input" : `${layer.layer} \u00b7 ${layer.name}`;
  const low = Math.min(...floats(layer.stats.min));
  const high = Math.max(...floats(layer.stats.max));
  const zeros = floats(layer.stats.zero_fraction);
  const share = zeros.reduce((a, b) => a + b, 0) / zeros.length;
  const parts = [`${where} ${shape}`, `values ${num(low)} to ${num(high)}`];
  if (share > 0) parts.push(`${percent(share)} zeros`);
  return parts.join(" \u00b7 ");
}

async function showLayer(figure, model, file, signal) {
  const img = figure.querySelector("img");
  figure.dataset.state = "loading";
  try {
    const blob = await activationsPng(model, file, figure.dataset.layer, signal);
    const url = URL.createObjectURL(blob);
    state.layerUrls.push(url);
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("the browser cannot show the grid"));
      img.src = url;
    });
    img.hidden = false;
    figure.dataset.state = "loaded";
  } catch (err) {
    if (err.name === "AbortError") return;
    figure.dataset.state = "error";
    figure.querySelector("figcaption").textContent += ` \u00b7 not shown: ${err.message}`;
  }
}

/**
 * The layers of the image, once per (model, file): their captions from the JSON answer, and
 * an observer that fetches each layer's grid when its figure comes near the screen. These
 * requests have their own AbortController: changing the class or the stride divisor keeps
 * them; a new image or model aborts them.
 */
async function renderInside(model, file) {
  const key = JSON.stringify([model.name, file.name, file.size, file.lastModified]);
  if (state.insideKey === key) return;
  clearInside();
  const controller = new AbortController();
  state.insideController = controller;
  const signal = controller.signal;
  els.layers.dataset.state = "loading";
  const body = await activationsJson(model, file, signal);
  const figures = body.layers.map((layer) =>
    el("figure", { className: "layer", dataset: { layer: layer.layer, state: "waiting" } }, [
      el("figcaption", { textContent: layerCaption(layer) }),
      el("div", { className: "frame" }, [
        el("img", { alt: `Activations of layer ${layer.layer} (${layer.name})`, hidden: true }),
      ]),
    ]),
  );
  els.layers.replaceChildren(...figures);
  const resized = body.resized_to ? `, resized to ${px(body.resized_to)} as for predictions` : "";
  els.insideMeta.textContent =
    `The input and its ${body.layers.length - 1} layers, on the ${px(body.image_size)} image${resized}. ` +
    "Each channel is a tile scaled to its own range (black to white); vectors and the " +
    "class scores are bars. Grids load as they scroll into view.";
  state.observer = new IntersectionObserver(
    (entries, observer) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        observer.unobserve(entry.target);
        showLayer(entry.target, model, file, signal);
      }
    },
    { rootMargin: "100px" },
  );
  for (const figure of figures) state.observer.observe(figure);
  state.insideKey = key;
  els.layers.dataset.state = "ready";
}

// ----------------------------------------------------------------------------------------
// One analysis: predictions (when they are not on screen yet), then the score map
// ----------------------------------------------------------------------------------------

function topK() {
  const max = state.model ? state.model.num_classes : 5;
  const k = Math.round(Number(els.topK.value));
  return Number.isFinite(k) ? Math.max(1, Math.min(max, k)) : 5;
}

function scalesText() {
  const text = els.scales.value.replace(/\s+/g, "");
  return text || "1";
}

function threshold() {
  const value = Number(els.threshold.value);
  return Number.isFinite(value) ? Math.max(0, Math.min(1, value)) : 0.5;
}

function alpha() {
  const value = Number(els.alpha.value);
  return Number.isFinite(value) ? Math.max(0, Math.min(1, value)) : 0.5;
}

async function analyze() {
  const model = state.model;
  const file = state.file;
  if (!model || !file) return;
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const run = ++state.run;
  const stale = () => run !== state.run;
  const signal = controller.signal;

  setState("working");
  setStatus("Working...");
  clearError();
  const k = topK();
  const key = JSON.stringify([model.name, file.name, file.size, file.lastModified, k]);
  try {
    if (state.predictedKey !== key) {
      clearResults();
      const prediction = await predict(model, file, k, signal);
      if (stale()) return;
      renderPredictions(prediction);
      state.predictedKey = key;
    }
    await renderInside(model, file);
    if (stale()) return;

    const options = {
      divisor: Number(els.divisor.value) || 1,
      alpha: alpha(),
      topK: k,
      label: state.classChosen ? els.cls.value : null,
      scales: scalesText(),
      detections: els.detectionsOn.checked,
      threshold: threshold(),
    };
    // Unless a class was chosen, the service chooses it (for a detector: never its
    // background class); the PNG then asks for that same class.
    const summary = await scoremapJson(model, file, options, signal);
    if (stale()) return;
    const label = summary.class.label;
    els.cls.value = label;
    renderSummary(summary);

    const png = await scoremapPng(model, file, { ...options, label }, signal);
    if (stale()) return;
    const shownHeatmap = setUrl("heatmap", els.heatmap, png.blob);
    els.heatmap.hidden = false;
    await shownHeatmap;
    if (stale()) return;
    sizeForDisplay(els.heatmap, HEATMAP_SIZE);
    const [height, width] = summary.geometry.image_size;
    placePeakBox(summary, width, height);
    renderDetections(summary, width, height);
    const scale = factor(png.scale || summary.scale || 1);
    els.heatmap.alt = `Heatmap of class ${label} at scale ${scale} over the image`;
    els.heatmapCaption.textContent =
      `Heatmap of class \u201c${label}\u201d at scale ${scale}, ${cells(summary.map_shape)}` +
      (state.classChosen ? "" : " (the service\u2019s default class)");
    els.legendLabel.textContent = `Class \u201c${label}\u201d, scale ${scale}: probability`;
    els.legend.hidden = false;
    state.shown = { model, file, options: { ...options, label }, json: summary };
    els.downloadPng.disabled = false;
    els.downloadJson.disabled = false;

    setStatus(`Done: ${model.name} on ${file.name || "the image"}`);
    setState("done");
  } catch (err) {
    if (stale() || err.name === "AbortError") return;
    clearMap(); // nothing on screen that belongs to other settings
    showError(err);
    if (!els.predictions.children.length) {
      els.predictMeta.textContent = "No result: see the error above.";
    }
    setStatus("Failed: see the error above");
    setState("error");
  }
}

// ----------------------------------------------------------------------------------------
// Downloads: the JSON answer on screen, and the service's PNG with its colour bar and boxes
// ----------------------------------------------------------------------------------------

function downloadName(shown, extension) {
  const stem = (shown.file.name || "image").replace(/\.[^.]*$/, "") || "image";
  return `${stem}_${shown.model.name}_${shown.options.label}.${extension}`;
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function downloadJson() {
  const shown = state.shown;
  if (!shown) return;
  const text = `${JSON.stringify(shown.json, null, 2)}\n`;
  saveBlob(new Blob([text], { type: "application/json" }), downloadName(shown, "json"));
}

async function downloadPng() {
  const shown = state.shown;
  if (!shown) return;
  els.downloadPng.disabled = true;
  try {
    const png = await scoremapPng(shown.model, shown.file, shown.options, undefined, "download");
    saveBlob(png.blob, downloadName(shown, "png"));
  } catch (err) {
    showError(err);
  } finally {
    els.downloadPng.disabled = state.shown === null;
  }
}

function showPreview(file) {
  els.preview.hidden = true;
  els.previewCaption.textContent = file.name ? `Your image: ${file.name}` : "Your image";
  setUrl("preview", els.preview, file)
    .then(() => {
      if (state.file !== file) return; // another upload came since
      sizeForDisplay(els.preview, PREVIEW_SIZE);
      els.preview.hidden = false;
      const { naturalWidth: w, naturalHeight: h } = els.preview;
      els.previewCaption.textContent = `Your image: ${file.name || "upload"} (${w}\u00d7${h} px)`;
    })
    .catch(() => {
      if (state.file !== file) return;
      els.previewCaption.textContent = "Your image: the browser cannot show this file";
    });
}

function useFile(file) {
  if (!file) return;
  clearInside();
  state.file = file;
  state.classChosen = false;
  state.predictedKey = null;
  showPreview(file);
  analyze();
}

// ----------------------------------------------------------------------------------------
// Wiring
// ----------------------------------------------------------------------------------------

function wire() {
  els.model.addEventListener("change", () => {
    chooseModel(els.model.value);
    clearResults();
    clearInside();
    analyze();
  });
  els.file.addEventListener("change", () => useFile(els.file.files[0]));
  els.topK.addEventListener("change", () => analyze());
  els.cls.addEventListener("change", () => {
    state.classChosen = true;
    analyze();
  });
  els.divisor.addEventListener("change", () => analyze());
  els.scales.addEventListener("change", () => analyze());
  els.detectionsOn.addEventListener("change", () => analyze());
  els.threshold.addEventListener("change", () => analyze());
  els.downloadPng.addEventListener("click", () => downloadPng());
  els.downloadJson.addEventListener("click", () => downloadJson());
  els.alpha.addEventListener("input", () => {
    els.alphaValue.textContent = percent(alpha()).replace(".0%", "%");
  });
  els.alpha.addEventListener("change", () => analyze());

  const zone = els.dropzone;
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length || els.file.disabled) return;
    try {
      els.file.files = files; // shows the file's name beside the button
    } catch {
      // older browsers: the name is in the caption anyway
    }
    useFile(files[0]);
  });
}

async function init() {
  wire();
  try {
    const response = await api("v1/models");
    const body = await response.json();
    state.models = body.models || [];
    if (!state.models.length) throw new Error("the service has no models");
    els.model.replaceChildren(
      ...state.models.map((m) => el("option", { value: m.name, textContent: m.name })),
    );
    els.model.disabled = false;
    chooseModel(state.models[0].name);
    els.file.disabled = false;
    setStatus("Ready");
    setState("ready");
  } catch (err) {
    showError(err);
    setStatus("Failed to load the models");
    setState("error");
  }
}

init();
