// The paint studio: a canvas of class ids at the model's input size; each stroke sends the
// label map to POST /v1/synthesize and the photo beside it updates.
//
// The canvas holds ids, never colours: strokes set whole pixels (no anti-aliasing), the
// display is drawn from the ids through the palette, and the upload is a PNG of the ids.

import { decodeLabelImage, encodeLabelPng } from "./labelpng.js";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 120;
const HISTORY = 50;
const RECENT_STYLES = 6;

// Groups people think in, by whole words of a class name ("seat" is no sea); the first rule
// that matches wins, the rest is "other".
const GROUPS = [
  ["sky and weather", /\b(sky|cloud|fog|rain|snow|sun)s?\b/],
  ["water", /\b(water|sea|river|lake|waterfall|fountain|pool|swimming)s?\b/],
  ["plants", /\b(tree|grass|plant|flower|palm|bush|hedge|moss|leaves|straw)s?\b/],
  ["mountains and rock", /\b(mountain|hill|rock|stone|cliff|gravel)s?\b/],
  ["ground", /\b(floor|road|ground|earth|sand|field|path|sidewalk|dirt|runway|land|pavement|platform|playingfield|carpet|rug|mud)s?\b/],
  ["buildings and structures", /\b(building|wall|house|skyscraper|tower|bridge|fence|column|stair|step|ceiling|door|window|roof|railing|hovel|booth|tent|awning|pier|dam|arcade|bannister)s?\b/],
  ["people and animals", /\b(person|animal|bird|dog|cat|horse|cow|sheep)s?\b/],
  ["vehicles", /\b(car|bus|truck|van|boat|ship|airplane|bicycle|motorbike|train|minibike)s?\b/],
];

// Sample layouts: bands of classes found by name (a sample whose classes the model lacks is disabled).
const SAMPLES = {
  landscape: [["sky", 0.45], ["mountain", 0.2], ["grass", 0.35]],
  seaside: [["sky", 0.4], ["sea", 0.35], ["sand", 0.25]],
  forest: [["sky", 0.3], ["tree", 0.45], ["grass", 0.25]],
};

const state = {
  models: [],          // names from GET /v1/models (empty: one model, no picker)
  model: null,         // the current model's name, when several are served
  info: null,          // GET /v1/model
  width: 256, height: 256,
  ids: new Uint16Array(256 * 256),
  palette: [],         // [[r, g, b], ...] by id
  current: 1,
  tool: "brush",
  size: 12,
  square: false,
  undo: [], redo: [],
  style: null,         // {kind: "code", mu, label} | {kind: "seed", seed}
  recent: [],
  photo: null,         // the last photo's Blob
  inFlight: false, pending: false, seq: 0, shown: 0, timer: 0, retry: 0, outage: false,
  token: sessionStorage.getItem("spade-token") || "",
};

// --- talking to the server ----------------------------------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "the server cannot be reached (it may be restarting); retrying");
  }
  if (response.status === 401) $("auth").hidden = false;
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (err) { /* not our JSON error body */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function withModel(form) {
  if (state.model !== null) form.set("model", state.model);
  return form;
}

function modelQuery() {
  return state.model !== null ? `?model=${encodeURIComponent(state.model)}` : "";
}

function say(text) { // errors: the next request that succeeds clears them
  $("message").textContent = text;
}

function note(text) { // what the page did on its own (a model switch, a file loaded): stays until the next note
  $("notice").textContent = text;
}

// --- model ------------------------------------------------------------------------------------

async function loadModels() {
  try {
    const listed = await (await api("/v1/models")).json();
    state.models = listed.models.map((m) => m.name);
  } catch (err) {
    state.models = []; // a server that serves one model
  }
  const picker = $("model");
  picker.replaceChildren(...state.models.map((name) => new Option(name, name)));
  $("model-picker").hidden = state.models.length < 2;
  state.model = state.models.length ? state.models[0] : null;
}

async function loadModel() {
  const info = await (await api(`/v1/model${modelQuery()}`)).json();
  const previous = state.info;
  state.info = info;
  state.palette = info.classes.map((c) => c.color);
  const { width, height } = info.input_size;
  if (previous === null) {
    state.width = width; state.height = height;
    state.ids = new Uint16Array(width * height);
    state.current = Math.min(1, info.classes.length - 1);
  } else {
    relabel(previous, info);
  }
  const canvas = $("canvas");
  canvas.width = state.width; canvas.height = state.height;
  canvas.style.aspectRatio = `${state.width} / ${state.height}`;
  $("photo").style.aspectRatio = `${state.width} / ${state.height}`;
  $("style").hidden = !info.style.encoder;
  state.style = null;
  buildPalette();
  buildSamples();
  render();
  const label = state.models.length > 1 ? info.name : info.checkpoint.split("#")[0].split("/").pop();
  $("status").textContent = `${label} · ${info.classes.length} classes · ${width}×${height}`;
}

/** Another model: same size or resized (nearest), classes mapped by name, the rest unlabeled. */
function relabel(before, after) {
  const byName = new Map(after.classes.map((c) => [c.name, c.id]));
  const map = before.classes.map((c) => (byName.has(c.name) ? byName.get(c.name) : 0));
  const { width, height } = after.input_size;
  const ids = new Uint16Array(width * height);
  let lost = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const old = state.ids[Math.floor((y * state.height) / height) * state.width + Math.floor((x * state.width) / width)];
      const id = old < map.length ? map[old] : 0;
      if (id === 0 && old !== 0) lost++;
      ids[y * width + x] = id;
    }
  }
  const resized = width !== state.width || height !== state.height;
  state.width = width; state.height = height; state.ids = ids;
  state.undo = []; state.redo = [];
  state.current = byName.get(before.classes[state.current]?.name) ?? Math.min(1, after.classes.length - 1);
  const notes = [];
  if (resized) notes.push(`the canvas was resized to the model's ${width}×${height}`);
  if (lost) notes.push(`${lost} pixels of classes this model lacks became ${after.classes[0].name}`);
  note(notes.length ? `Model changed: ${notes.join("; ")}.` : "");
}

// --- palette ------------------------------------------------------------------------------------

function groupOf(name) {
  for (const [group, rule] of GROUPS) if (rule.test(name)) return group;
  return "other";
}

function buildPalette() {
  const query = $("search").value.trim().toLowerCase();
  const groups = new Map([...GROUPS.map(([g]) => [g, []]), ["other", []]]);
  for (const c of state.info.classes) {
    if (query && !c.name.toLowerCase().includes(query)) continue;
    groups.get(groupOf(c.name)).push(c);
  }
  const nodes = [];
  for (const [group, classes] of groups) {
    if (!classes.length) continue;
    const heading = document.createElement("h3");
    heading.textContent = group;
    nodes.push(heading);
    for (const c of classes) {
      const b = document.createElement("button");
      b.dataset.id = c.id;
      b.setAttribute("aria-pressed", String(c.id === state.current));
      const sw = document.createElement("span");
      sw.className = "sw";
      sw.style.background = `rgb(${c.color.join(",")})`;
      b.append(sw, document.createTextNode(c.name));
      b.addEventListener("click", () => choose(c.id));
      nodes.push(b);
    }
  }
  $("palette").replaceChildren(...nodes);
  showCurrent();
}

function choose(id) {
  state.current = id;
  for (const b of $("palette").querySelectorAll("button")) b.setAttribute("aria-pressed", String(Number(b.dataset.id) === id));
  showCurrent();
}

function showCurrent() {
  const c = state.info.classes[state.current];
  $("current-swatch").style.background = `rgb(${c.color.join(",")})`;
  $("current-name").textContent = `${c.name} (${c.id})`;
}

function findClass(name) {
  const c = state.info.classes.find((k) => k.name === name || k.name.split(/[;,]/)[0] === name);
  return c ? c.id : null;
}

function buildSamples() {
  const buttons = Object.entries(SAMPLES).map(([name, bands]) => {
    const b = document.createElement("button");
    b.textContent = name;
    const ids = bands.map(([cls]) => findClass(cls));
    b.disabled = ids.includes(null);
    if (b.disabled) b.title = "this model has no class named " + bands.filter((_, i) => ids[i] === null).map(([c]) => c).join(", ");
    b.addEventListener("click", () => {
      snapshot();
      let y0 = 0;
      bands.forEach(([, share], i) => {
        const y1 = i === bands.length - 1 ? state.height : Math.round(y0 + share * state.height);
        state.ids.fill(ids[i], y0 * state.width, y1 * state.width);
        y0 = y1;
      });
      render();
      schedule();
    });
    return b;
  });
  $("samples").replaceChildren(...buttons);
}

// --- drawing ------------------------------------------------------------------------------------

function render() {
  const image = new ImageData(state.width, state.height);
  const px = image.data;
  for (let i = 0; i < state.ids.length; i++) {
    const c = state.palette[state.ids[i]] || [0, 0, 0];
    px[4 * i] = c[0]; px[4 * i + 1] = c[1]; px[4 * i + 2] = c[2]; px[4 * i + 3] = 255;
  }
  $("canvas").getContext("2d").putImageData(image, 0, 0);
}

function snapshot() {
  state.undo.push(state.ids.slice());
  if (state.undo.length > HISTORY) state.undo.shift();
  state.redo = [];
}

function stamp(cx, cy, id) {
  const r = state.size / 2;
  const x0 = Math.floor(cx - r + 0.5), y0 = Math.floor(cy - r + 0.5);
  for (let y = y0; y < y0 + state.size; y++) {
    if (y < 0 || y >= state.height) continue;
    for (let x = x0; x < x0 + state.size; x++) {
      if (x < 0 || x >= state.width) continue;
      if (!state.square) {
        const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
        if (dx * dx + dy * dy > r * r) continue;
      }
      state.ids[y * state.width + x] = id;
    }
  }
}

function segment(a, b, id) {
  const steps = Math.max(1, Math.ceil(Math.hypot(b.x - a.x, b.y - a.y)));
  for (let i = 0; i <= steps; i++) stamp(a.x + ((b.x - a.x) * i) / steps, a.y + ((b.y - a.y) * i) / steps, id);
}

function fill(x, y, id) {
  const target = state.ids[y * state.width + x];
  if (target === id) return;
  const stack = [y * state.width + x];
  while (stack.length) {
    const i = stack.pop();
    if (state.ids[i] !== target) continue;
    state.ids[i] = id;
    const px = i % state.width;
    if (px > 0) stack.push(i - 1);
    if (px < state.width - 1) stack.push(i + 1);
    if (i >= state.width) stack.push(i - state.width);
    if (i < state.ids.length - state.width) stack.push(i + state.width);
  }
}

function at(event) {
  const rect = $("canvas").getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * state.width) / rect.width,
    y: ((event.clientY - rect.top) * state.height) / rect.height,
  };
}

let stroke = null; // {last, start, base} while a pointer is down

function pointerDown(event) {
  if (!state.info) return;
  event.preventDefault();
  $("canvas").setPointerCapture(event.pointerId);
  const p = at(event);
  const x = Math.min(state.width - 1, Math.max(0, Math.floor(p.x)));
  const y = Math.min(state.height - 1, Math.max(0, Math.floor(p.y)));
  if (state.tool === "picker") {
    choose(state.ids[y * state.width + x]);
    return;
  }
  snapshot();
  if (state.tool === "fill") {
    fill(x, y, state.current);
    render();
    schedule();
    return;
  }
  const id = state.tool === "eraser" ? 0 : state.current;
  stroke = { last: p, start: p, base: state.ids.slice(), id };
  if (state.tool !== "line") stamp(p.x, p.y, id);
  render();
}

function pointerMove(event) {
  if (!stroke) return;
  const p = at(event);
  if (state.tool === "line") {
    state.ids.set(stroke.base);
    segment(stroke.start, p, stroke.id);
  } else {
    segment(stroke.last, p, stroke.id);
  }
  stroke.last = p;
  render();
}

function pointerUp(event) {
  if (!stroke) return;
  pointerMove(event);
  stroke = null;
  schedule();
}

function setTool(tool) {
  state.tool = tool;
  for (const b of document.querySelectorAll("[data-tool]")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
}

function setSize(size) {
  state.size = Math.max(1, Math.min(64, size));
  $("size").value = state.size;
  $("size-value").textContent = state.size;
}

function undo() {
  if (!state.undo.length) return;
  state.redo.push(state.ids.slice());
  state.ids = state.undo.pop();
  render();
  schedule();
}

function redo() {
  if (!state.redo.length) return;
  state.undo.push(state.ids.slice());
  state.ids = state.redo.pop();
  render();
  schedule();
}

// --- synthesis ------------------------------------------------------------------------------------

/** After a stroke: wait a moment for the next one, keep one request in flight, newest wins. */
function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(synthesize, DEBOUNCE_MS);
}

async function synthesize() {
  if (state.inFlight) { state.pending = true; return; }
  state.inFlight = true;
  state.pending = false;
  const seq = ++state.seq;
  const started = performance.now();
  try {
    const form = withModel(new FormData());
    form.set("labels", await encodeLabelPng(state.ids, state.width, state.height), "labels.png");
    if (state.style?.kind === "code") form.set("style_code", JSON.stringify(state.style.mu));
    else if (state.info.style.encoder) form.set("seed", String(state.style?.seed ?? 0));
    form.set("format", "png");
    const response = await api("/v1/synthesize", { method: "POST", body: form });
    const blob = await response.blob();
    if (seq > state.shown) { // an older answer never replaces a newer one
      state.shown = seq;
      state.photo = blob;
      const img = $("photo");
      const old = img.src;
      img.src = URL.createObjectURL(blob);
      if (old.startsWith("blob:")) URL.revokeObjectURL(old);
      const ms = Math.round(performance.now() - started);
      $("latency").textContent = `updated in ${ms} ms (batch of ${response.headers.get("X-Batch-Size") || 1})`;
      img.dataset.latencyMs = String(ms);
      img.dataset.seq = String(seq);
    }
    state.retry = 0;
    say("");
    if (state.outage) await reconnected();
  } catch (err) {
    say(err.message);
    if (RESTARTING.includes(err.status)) { // down, still starting or busy: try again, a little later each time
      state.outage = state.outage || err.status !== 503;
      state.retry = Math.min(state.retry + 1, 4);
      setTimeout(schedule, 500 * 2 ** state.retry);
    }
  } finally {
    state.inFlight = false;
    if (state.pending) synthesize();
  }
}

// No answer (0), Serve's proxy before the app is routed again (404: the app's own routes
// never answer 404), a gateway in between (502, 504), or a full queue (503).
const RESTARTING = [0, 404, 502, 503, 504];

/** Back after an outage: the server may have come back with another model. */
async function reconnected() {
  state.outage = false;
  try {
    const info = await (await api(`/v1/model${modelQuery()}`)).json();
    if (info.checkpoint !== state.info.checkpoint) { await loadModel(); schedule(); }
  } catch (err) {
    say(err.message);
  }
}

// --- style ------------------------------------------------------------------------------------

async function uploadStyle(file) {
  const form = withModel(new FormData());
  form.set("style", file, file.name);
  try {
    const code = await (await api("/v1/encode", { method: "POST", body: form })).json();
    remember({ kind: "code", mu: code.mu, thumb: URL.createObjectURL(file), label: file.name });
  } catch (err) {
    say(err.message);
  }
}

function randomStyle() {
  remember({ kind: "seed", seed: Math.floor(Math.random() * 2 ** 31), label: "" });
}

function remember(style) {
  state.recent.unshift(style);
  state.recent = state.recent.slice(0, RECENT_STYLES);
  useStyle(style);
}

function useStyle(style) {
  state.style = style;
  const buttons = state.recent.map((s) => {
    const b = document.createElement("button");
    b.title = s.kind === "seed" ? `seed ${s.seed}` : s.label;
    b.setAttribute("aria-pressed", String(s === style));
    if (s.thumb) { const img = new Image(); img.src = s.thumb; img.alt = s.label; b.append(img); }
    else { const t = document.createElement("span"); t.textContent = `#${s.seed % 10000}`; b.append(t); }
    b.addEventListener("click", () => useStyle(s));
    return b;
  });
  $("recent-styles").replaceChildren(...buttons);
  schedule();
}

// --- files ------------------------------------------------------------------------------------

async function loadLabels(file) {
  try {
    const map = await decodeLabelImage(file, state.palette);
    if (map.width !== state.width || map.height !== state.height) {
      throw new Error(`${file.name} is ${map.width}×${map.height}; this model draws ${state.width}×${state.height}`);
    }
    snapshot();
    state.ids = map.ids;
    render();
    note(`Loaded ${file.name} (${map.kind === "ids" ? "class ids" : "palette colours"}).`);
    schedule();
  } catch (err) {
    say(err.message);
  }
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// --- wiring ------------------------------------------------------------------------------------

function keys(event) {
  if (event.target instanceof HTMLInputElement && event.target.type !== "range" && event.target.type !== "checkbox") return;
  const k = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && k === "z") { event.preventDefault(); event.shiftKey ? redo() : undo(); return; }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const tools = { b: "brush", l: "line", f: "fill", e: "eraser", i: "picker" };
  if (tools[k]) setTool(tools[k]);
  else if (event.key === "[") setSize(state.size - 1);
  else if (event.key === "]") setSize(state.size + 1);
}

async function start() {
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", pointerDown);
  canvas.addEventListener("pointermove", pointerMove);
  canvas.addEventListener("pointerup", pointerUp);
  canvas.addEventListener("pointercancel", pointerUp);
  for (const b of document.querySelectorAll("[data-tool]")) b.addEventListener("click", () => setTool(b.dataset.tool));
  $("size").addEventListener("input", (e) => setSize(Number(e.target.value)));
  $("square").addEventListener("change", (e) => { state.square = e.target.checked; });
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", () => { snapshot(); state.ids.fill(0); render(); schedule(); });
  $("search").addEventListener("input", buildPalette);
  $("load").addEventListener("change", (e) => { if (e.target.files[0]) loadLabels(e.target.files[0]); e.target.value = ""; });
  $("save-labels").addEventListener("click", async () => download(await encodeLabelPng(state.ids, state.width, state.height), "labels.png"));
  $("save-photo").addEventListener("click", () => { if (state.photo) download(state.photo, "photo.png"); });
  $("style-file").addEventListener("change", (e) => { if (e.target.files[0]) uploadStyle(e.target.files[0]); e.target.value = ""; });
  $("random-style").addEventListener("click", randomStyle);
  $("token").value = state.token;
  $("token").addEventListener("change", (e) => {
    state.token = e.target.value;
    sessionStorage.setItem("spade-token", state.token);
    connect();
  });
  $("model").addEventListener("change", async (e) => {
    state.model = e.target.value;
    try { await loadModel(); schedule(); } catch (err) { say(err.message); }
  });
  document.addEventListener("keydown", keys);
  await connect();
}

async function connect() {
  try {
    await loadModels();
    await loadModel();
    schedule();
  } catch (err) {
    say(err.message);
    $("status").textContent = "not connected";
    setTimeout(connect, 2000); // the page keeps trying while the server (re)starts
  }
}

start();
