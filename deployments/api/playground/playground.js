"use strict";
// klein playground: a small page over the service's BFL-compatible API (/v1/models, POST /v1/{model},
// the job's event stream, /v1/get_result). No dependencies; everything the page needs is in this file.

const KEY_STORAGE = "klein.apiKey";
const HISTORY_STORAGE = "klein.history";
const HISTORY_LIMIT = 50;
const MAX_SEED = Number.MAX_SAFE_INTEGER; // 2^53-1: the largest integer a JS number holds exactly
const STREAM_ATTEMPTS = 3; // reconnects without a single event before falling back to polling
const RECONNECT_DELAY_MS = 1000;
const POLL_INTERVAL_MS = 1000;
const POLL_ATTEMPTS = 30; // consecutive failed polls before giving up on a job
const REFERENCE_FIELDS = ["input_image", "input_image_2", "input_image_3", "input_image_4"];
const FORM_FIELDS = new Set(["prompt", "width", "height", "seed", "steps", "guidance", "output_format"]);
const SIZE_PRESETS = [
  [1024, 1024, ""], [1024, 768, "4:3"], [768, 1024, "3:4"], [1344, 768, "16:9"],
  [768, 1344, "9:16"], [512, 512, ""],
];
const STAGE_LABELS = { queued: "queued", embed: "encoding prompt", denoise: "denoising", finish: "decoding" };
const STATUS_TEXT = {
  400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict", 413: "Payload Too Large",
  415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
  500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
};

const $ = (id) => document.getElementById(id);

const state = {
  models: [],          // the /v1/models entries
  modelLoad: 0,        // counts /v1/models requests
  references: [],      // [{name, dataUrl}], in request order
  job: null,           // the job being followed: {id, model, request, lastEventId, ...}
  shown: null,         // the history entry shown in the output area
};

// ---------- small helpers ----------

function setState(name) {
  document.body.dataset.state = name;
}

function el(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function apiKey() {
  return $("api-key").value.trim();
}

// Every API call goes through here so the key header is never forgotten (and never sent when empty).
function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("x-key", key);
  return fetch(path, { ...options, headers, cache: "no-store" });
}

function formatNumber(value, digits = 4) {
  return Number.isFinite(value) ? String(+value.toFixed(digits)) : "?";
}

function readStored(key, fallback) {
  try {
    return JSON.parse(sessionStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

// ---------- errors ----------

function showError(message, lines = []) {
  const box = $("error");
  box.replaceChildren(el("p", {}, message));
  if (lines.length) {
    const list = el("ul");
    lines.forEach((line) => list.append(el("li", {}, line)));
    box.append(list);
  }
  box.hidden = false;
}

function fieldErrorElement(field) {
  return document.querySelector(`.field-error[data-field="${CSS.escape(field)}"]`);
}

function showFieldError(field, message) {
  const node = fieldErrorElement(field);
  if (!node) return false;
  node.textContent = node.textContent ? `${node.textContent} ${message}` : message;
  node.hidden = false;
  return true;
}

function clearFieldError(field) {
  const node = fieldErrorElement(field);
  if (node) { node.textContent = ""; node.hidden = true; }
}

function clearErrorBox() {
  $("error").replaceChildren();
  $("error").hidden = true;
}

function clearErrors() {
  clearErrorBox();
  document.querySelectorAll(".field-error").forEach((node) => { node.textContent = ""; node.hidden = true; });
}

// A 422 `loc` like ["body", "loras", 0, "path"] (or a service field name like "loras[0].path") as
// the form field that shows it: "loras.0", "input_image", "width"...; null when no field matches.
function fieldForLoc(loc) {
  const [name, index] = locPath(loc).split(".");
  if (/^input_image(_\d)?$/.test(name) || name === "references") return "input_image";
  if (name === "loras") return /^\d+$/.test(index) ? `loras.${index}` : "loras";
  return FORM_FIELDS.has(name) ? name : null;
}

function locPath(loc) {
  const parts = (Array.isArray(loc) ? loc : [loc]).map(String).filter((part) => part !== "body");
  return parts.join(".").replace(/\[(\d+)\]/g, ".$1");
}

async function readErrorBody(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text.trim() || response.statusText };
  }
}

// Shows a failed response: field errors next to their fields, everything in the error box.
async function showApiError(response, action) {
  const body = await readErrorBody(response);
  const detail = body.detail ?? body.error?.message ?? "";
  const status = `${response.status} ${response.statusText || STATUS_TEXT[response.status] || ""}`.trim();
  if (Array.isArray(detail)) {
    const lines = detail.map((item) => {
      const field = fieldForLoc(item.loc);
      if (field && !showFieldError(field, item.msg) && field.startsWith("loras.")) showFieldError("loras", item.msg);
      const path = locPath(item.loc);
      return path ? `${path}: ${item.msg}` : item.msg;
    });
    showError(`${action} was rejected (${status}):`, lines);
    return;
  }
  const retryAfter = response.headers.get("Retry-After");
  const retry = retryAfter ? ` (retry in ${retryAfter} s)` : "";
  showError(`${action} failed (${status}): ${typeof detail === "string" ? detail : JSON.stringify(detail)}${retry}`);
}

// ---------- models ----------

async function loadModels() {
  const load = ++state.modelLoad; // only the newest answer may change the page (keys are typed)
  $("model-note").textContent = "loading…";
  try {
    const response = await apiFetch("/v1/models");
    if (load !== state.modelLoad) return;
    if (!response.ok) {
      await showApiError(response, "Loading the models");
      return modelsUnavailable();
    }
    const body = await response.json();
    if (load !== state.modelLoad) return;
    state.models = body.data || [];
    fillModelSelect();
    $("model-note").textContent = state.models.length ? "" : "no models";
    if (!isBusy()) {
      clearErrorBox();
      setState("idle");
    }
  } catch (err) {
    if (load !== state.modelLoad) return;
    showError(`Could not load the models: ${err.message}`);
    modelsUnavailable();
  }
}

function modelsUnavailable() {
  state.models = [];
  fillModelSelect();
  $("model-note").textContent = "";
  if (!isBusy()) setState("error");
}

function fillModelSelect() {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((model) => el("option", { value: model.id }, model.id)));
  if (state.models.some((model) => model.id === previous)) select.value = previous;
  applyModel();
}

function currentModel() {
  return state.models.find((model) => model.id === $("model").value) || null;
}

// Shapes the form to what the chosen model accepts.
function applyModel() {
  const info = currentModel()?.klein;
  if (!info) return;
  applySizeLimits(info.size);
  applyCfg(info);
  fillFormats(info.output_formats || ["jpeg"]);
  applyReferenceLimit(info.max_references || 0);
  applyLoraLimits(info.lora);
}

function applyCfg(info) {
  const steps = $("steps");
  steps.min = 1;
  steps.max = info.steps?.max ?? 100;
  steps.placeholder = `default ${info.steps?.default ?? ""}`;
  $("steps-row").hidden = !info.cfg;
  const guidance = info.guidance;
  $("guidance-row").hidden = !(info.cfg && guidance);
  if (guidance) {
    $("guidance").min = guidance.min;
    $("guidance").max = guidance.max;
    $("guidance").placeholder = `default ${guidance.default}`;
  }
}

function fillFormats(formats) {
  const select = $("output-format");
  const previous = select.value;
  select.replaceChildren(...formats.map((format) => el("option", { value: format }, format)));
  select.value = formats.includes(previous) ? previous : formats.includes("jpeg") ? "jpeg" : formats[0];
}

// ---------- size ----------

function sizeProblems(limits, width, height) {
  const problems = [];
  for (const [field, value] of [["width", width], ["height", height]]) {
    if (!Number.isInteger(value)) problems.push({ field, message: "Enter a whole number." });
    else if (value < limits.min || value > limits.max) problems.push({ field, message: `Must be between ${limits.min} and ${limits.max}.` });
    else if (value % limits.multiple) problems.push({ field, message: `Must be a multiple of ${limits.multiple}.` });
  }
  // the API reports the pixel budget on width too
  if (!problems.length && width * height > limits.max_pixels) {
    const mp = formatNumber(limits.max_pixels / 1e6, 2);
    problems.push({ field: "width", message: `Width × height must be at most ${mp} MP (got ${width}×${height}).` });
  }
  return problems;
}

function applySizeLimits(limits) {
  const presets = SIZE_PRESETS.filter(([w, h]) => !sizeProblems(limits, w, h).length);
  if (!presets.some(([w, h]) => w === limits.default && h === limits.default)) {
    presets.unshift([limits.default, limits.default, "default"]);
  }
  const options = presets.map(([w, h, note]) => el("option", { value: `${w}x${h}` }, `${w}×${h}${note ? ` (${note})` : ""}`));
  $("size-preset").replaceChildren(...options, el("option", { value: "custom" }, "custom"));
  for (const id of ["width", "height"]) {
    Object.assign($(id), { min: limits.min, max: limits.max, step: limits.multiple });
  }
  // keep the size a person chose when it still fits (the models are reloaded on every key change)
  const [width, height] = [readNumber("width"), readNumber("height")];
  if (width !== null && height !== null && !sizeProblems(limits, width, height).length) setSize(width, height);
  else setSize(limits.default, limits.default);
}

function setSize(width, height) {
  $("width").value = width;
  $("height").value = height;
  syncPreset();
}

// Picks the preset matching the typed size, or "custom".
function syncPreset() {
  const value = `${$("width").value}x${$("height").value}`;
  const preset = $("size-preset");
  preset.value = [...preset.options].some((option) => option.value === value) ? value : "custom";
}

function onPresetChange() {
  const value = $("size-preset").value;
  if (value !== "custom") {
    const [width, height] = value.split("x").map(Number);
    $("width").value = width;
    $("height").value = height;
  }
  clearFieldError("width");
  clearFieldError("height");
}

function readNumber(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

// ---------- reference images ----------

function applyReferenceLimit(max) {
  $("references-section").hidden = max === 0;
  state.references = state.references.slice(0, max);
  renderReferences();
}

function maxReferences() {
  return currentModel()?.klein.max_references || 0;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addReferenceFiles(files) {
  clearFieldError("input_image");
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  if (images.length < files.length) showFieldError("input_image", "Only image files can be references.");
  for (const file of images) {
    if (state.references.length >= maxReferences()) {
      showFieldError("input_image", `At most ${maxReferences()} reference images.`);
      break;
    }
    try {
      state.references.push({ name: file.name, dataUrl: await readAsDataUrl(file) });
    } catch (err) {
      showFieldError("input_image", `Could not read ${file.name}: ${err.message}`);
    }
    renderReferences();
  }
  $("references").value = ""; // so choosing the same file again fires "change"
}

function renderReferences() {
  const items = state.references.map((ref, index) => {
    const item = el("figure", { class: "ref-item" });
    const remove = el("button", { type: "button", class: "icon-button", "aria-label": `remove ${ref.name}` }, "×");
    remove.addEventListener("click", () => {
      state.references.splice(index, 1);
      clearFieldError("input_image");
      renderReferences();
    });
    item.append(el("img", { src: ref.dataUrl, alt: ref.name, title: ref.name }), remove);
    return item;
  });
  $("ref-list").replaceChildren(...items);
  const max = maxReferences();
  $("references-hint").textContent = `(${state.references.length} of ${max})`;
  $("references").disabled = state.references.length >= max;
  $("drop-zone").classList.toggle("full", state.references.length >= max);
}

function setupDropZone() {
  const zone = $("drop-zone");
  // dropping a file anywhere else would navigate away from the page
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (event) => event.preventDefault());
  zone.addEventListener("dragover", () => zone.classList.add("dragging"));
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    zone.classList.remove("dragging");
    addReferenceFiles(event.dataTransfer.files);
  });
  $("references").addEventListener("change", (event) => addReferenceFiles(event.target.files));
}

// ---------- LoRA adapters ----------

function loraLimits() {
  return currentModel()?.klein.lora || null;
}

function applyLoraLimits(lora) {
  $("lora-section").hidden = !lora;
  const rows = [...$("lora-list").children];
  rows.slice(lora ? lora.max_loras : 0).forEach((row) => row.remove());
  for (const scale of $("lora-list").querySelectorAll(".lora-scale")) {
    scale.min = -(lora?.max_scale ?? 0);
    scale.max = lora?.max_scale ?? 0;
  }
  renumberLoras();
}

function addLoraRow() {
  const lora = loraLimits();
  if (!lora || $("lora-list").children.length >= lora.max_loras) return;
  const row = el("div", { class: "lora-row" });
  const path = el("input", { type: "text", class: "lora-path", placeholder: "adapter name or URL", "aria-label": "adapter path" });
  const scale = el("input", {
    type: "number", class: "lora-scale", step: "0.05", value: "1",
    min: -lora.max_scale, max: lora.max_scale, "aria-label": "adapter scale",
  });
  const remove = el("button", { type: "button", class: "icon-button", "aria-label": "remove adapter" }, "×");
  remove.addEventListener("click", () => { row.remove(); renumberLoras(); });
  row.append(path, scale, remove, el("p", { class: "field-error", hidden: "" }));
  $("lora-list").append(row);
  renumberLoras();
  path.focus();
}

// Row errors are addressed as loras.<index>, so indices must follow the rows' order.
function renumberLoras() {
  const rows = [...$("lora-list").children];
  rows.forEach((row, index) => { row.querySelector(".field-error").dataset.field = `loras.${index}`; });
  const max = loraLimits()?.max_loras ?? 0;
  $("add-lora").disabled = rows.length >= max;
  $("lora-hint").textContent = `(${rows.length} of ${max})`;
}

function readLoras() {
  return [...$("lora-list").children].map((row) => ({
    path: row.querySelector(".lora-path").value.trim(),
    scale: Number(row.querySelector(".lora-scale").value.trim() || NaN), // empty is no number, not 0
  }));
}

// ---------- the request ----------

function validateForm(info) {
  const problems = [];
  if (!$("prompt").value.trim()) problems.push({ field: "prompt", message: "Enter a prompt." });
  problems.push(...sizeProblems(info.size, readNumber("width"), readNumber("height")));
  if (!$("seed-random").checked) {
    const seed = $("seed").value.trim();
    if (!/^\d+$/.test(seed) || !Number.isSafeInteger(Number(seed))) {
      problems.push({ field: "seed", message: `Enter a whole number from 0 to ${MAX_SEED}.` });
    }
  }
  if (info.cfg) {
    const steps = readNumber("steps");
    const maxSteps = info.steps?.max ?? 100;
    if (steps !== null && !(Number.isInteger(steps) && steps >= 1 && steps <= maxSteps)) {
      problems.push({ field: "steps", message: `Must be a whole number from 1 to ${maxSteps}.` });
    }
    const guidance = readNumber("guidance");
    const bounds = info.guidance;
    if (bounds && guidance !== null && !(guidance >= bounds.min && guidance <= bounds.max)) {
      problems.push({ field: "guidance", message: `Must be between ${bounds.min} and ${bounds.max}.` });
    }
  }
  const maxScale = info.lora?.max_scale ?? 0;
  readLoras().forEach((lora, index) => {
    if (!lora.path) problems.push({ field: `loras.${index}`, message: "Enter the adapter's name or URL." });
    else if (!(Math.abs(lora.scale) <= maxScale)) {
      problems.push({ field: `loras.${index}`, message: `Scale must be between ${-maxScale} and ${maxScale}.` });
    }
  });
  return problems;
}

function buildRequest(info) {
  const body = {
    prompt: $("prompt").value,
    width: readNumber("width"),
    height: readNumber("height"),
    output_format: $("output-format").value,
    preview: true,
  };
  if (!$("seed-random").checked) body.seed = Number($("seed").value.trim());
  if (info.cfg && readNumber("steps") !== null) body.steps = readNumber("steps");
  if (info.cfg && info.guidance && readNumber("guidance") !== null) body.guidance = readNumber("guidance");
  state.references.forEach((ref, index) => { body[REFERENCE_FIELDS[index]] = ref.dataUrl; });
  const loras = readLoras();
  if (loras.length) body.loras = loras;
  return body;
}

// The request as curl shows it: no preview, images shortened (the seed is filled in at the end).
function curlRequest(body) {
  const shown = { ...body };
  delete shown.preview;
  for (const field of REFERENCE_FIELDS) if (field in shown) shown[field] = "<base64 image>";
  return shown;
}

function curlCommand(model, request) {
  const json = JSON.stringify(request).replace(/'/g, "'\\''"); // inside single quotes for the shell
  return `curl -X POST '${location.origin}/v1/${model}' -H "x-key: $KLEIN_API_KEY" ` +
    `-H 'content-type: application/json' -d '${json}'`;
}

async function onSubmit(event) {
  event.preventDefault();
  if (isBusy()) return;
  clearErrors();
  const model = currentModel();
  if (!model) {
    showError("No model is loaded: check the API key.");
    setState("error");
    return;
  }
  const problems = validateForm(model.klein);
  if (problems.length) {
    problems.forEach((problem) => showFieldError(problem.field, problem.message));
    setState("error");
    return;
  }
  const body = buildRequest(model.klein);
  stopFollowing();
  setState("submitting");
  setStatus("submitting…");
  $("submit").disabled = true;
  try {
    const response = await apiFetch(`/v1/${encodeURIComponent(model.id)}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      await showApiError(response, "The request");
      return endWithError("rejected");
    }
    const answer = await response.json();
    resetOutput(body.width, body.height);
    startJob({ ...answer, model: model.id, request: curlRequest(body) });
  } catch (err) {
    showError(`Could not send the request: ${err.message}`);
    endWithError("not sent");
  }
}

function isBusy() {
  return ["submitting", "running"].includes(document.body.dataset.state);
}

function endWithError(statusText) {
  setStatus(statusText);
  $("submit").disabled = false;
  $("cancel").disabled = true;
  setState("error");
}

// ---------- following a job ----------

function startJob(job) {
  state.job = { ...job, lastEventId: null, events: 0, finished: false, controller: new AbortController() };
  setState("running");
  setStatus("queued");
  $("cancel").disabled = false;
  // in the one-column layout the output sits below the form: bring it into view
  if (window.matchMedia("(max-width: 800px)").matches) $("output-frame").scrollIntoView({ block: "center" });
  followJob(state.job);
}

function stopFollowing() {
  state.job?.controller.abort();
  state.job = null;
}

// Reads the event stream, reconnecting with Last-Event-ID; polls get_result when streaming fails.
async function followJob(job) {
  const signal = job.controller.signal;
  let fruitless = 0;
  while (!job.finished && !signal.aborted && fruitless < STREAM_ATTEMPTS) {
    const before = job.events;
    try {
      await readEventStream(job);
    } catch (err) {
      if (signal.aborted) return;
      if (err.fatal) return failJob(err.message);
      if (err.noStream) break;
    }
    if (job.finished || signal.aborted) return;
    fruitless = job.events > before ? 0 : fruitless + 1;
    await sleep(RECONNECT_DELAY_MS, signal);
  }
  if (!job.finished && !signal.aborted) await pollJob(job);
}

async function readEventStream(job) {
  const headers = { Accept: "text/event-stream" };
  if (job.lastEventId !== null) headers["Last-Event-ID"] = job.lastEventId;
  const response = await apiFetch(`/v1/jobs/${encodeURIComponent(job.id)}/events`, { headers, signal: job.controller.signal });
  if (response.status === 401) {
    const body = await readErrorBody(response);
    throw Object.assign(new Error(`401 Unauthorized: ${body.detail}`), { fatal: true });
  }
  if (!response.ok || !response.body) {
    // no stream for this job or this server: get_result still answers
    throw Object.assign(new Error(`events: ${response.status}`), { noStream: true });
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const push = sseParser((event) => onStreamEvent(job, event));
  while (!job.finished) {
    const { value, done } = await reader.read();
    if (done) return;
    push(decoder.decode(value, { stream: true }));
  }
  reader.cancel().catch(() => {});
}

// Server-Sent Events: blocks end with a blank line; lines are "field: value"; ":" starts a comment.
function sseParser(onEvent) {
  let buffer = "";
  return function push(text) {
    // normalize line ends, keeping a trailing "\r" whose "\n" may be in the next chunk
    buffer = (buffer + text).replace(/\r\n|\r(?!$)/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      onEvent(parseSseBlock(block));
    }
  };
}

function parseSseBlock(block) {
  const event = { id: null, type: "message", data: [] };
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") event.id = value;
    else if (field === "event") event.type = value;
    else if (field === "data") event.data.push(value);
  }
  return { ...event, data: event.data.length ? event.data.join("\n") : null };
}

function onStreamEvent(job, event) {
  if (job !== state.job || job.finished) return;
  if (event.id !== null) job.lastEventId = event.id;
  if (event.data === null) return; // a keep-alive or an id-only block
  job.events += 1;
  let data;
  try {
    data = JSON.parse(event.data);
  } catch {
    return;
  }
  if (event.type === "status") showStage(data);
  else if (event.type === "progress") showProgress(data);
  else if (event.type === "preview") showPreview(data);
  else if (event.type === "result") finishJob(job, data);
}

async function pollJob(job) {
  const signal = job.controller.signal;
  let failures = 0;
  while (!job.finished && !signal.aborted) {
    await sleep(POLL_INTERVAL_MS, signal);
    if (signal.aborted) return;
    try {
      const response = await apiFetch(`/v1/get_result?id=${encodeURIComponent(job.id)}`, { signal });
      if (!response.ok) throw new Error(`get_result: ${response.status} ${(await readErrorBody(response)).detail}`);
      const body = await response.json();
      failures = 0;
      if (body.status !== "Pending") finishJob(job, body);
    } catch (err) {
      if (signal.aborted) return;
      failures += 1;
      if (failures >= POLL_ATTEMPTS) return failJob(`Lost track of job ${job.id}: ${err.message}`);
    }
  }
}

function failJob(message) {
  stopFollowing();
  showError(message);
  endWithError("failed");
}

async function cancelJob() {
  const job = state.job;
  if (!job || job.finished) return;
  $("cancel").disabled = true;
  try {
    const response = await apiFetch(`/v1/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
    if (response.status === 202) setStatus("cancelling…");
    else if (response.status !== 409) { // 409: it finished meanwhile; its result is on the way
      await showApiError(response, "Cancelling");
      $("cancel").disabled = job.finished;
    }
  } catch (err) {
    showError(`Could not cancel: ${err.message}`);
    $("cancel").disabled = job.finished;
  }
}

// ---------- the output area ----------

function setStatus(text) {
  $("status").textContent = text;
}

function showStage(data) {
  const label = STAGE_LABELS[data.stage] || data.stage || data.status;
  setStatus(data.attempt > 1 ? `${label} (attempt ${data.attempt})` : label);
}

function showProgress(data) {
  if (data.stage) setStatus(STAGE_LABELS[data.stage] || data.stage);
  if (Number.isFinite(data.progress)) $("progress").value = data.progress;
  if (data.steps) $("step-text").textContent = `step ${data.step} of ${data.steps}`;
}

function showPreview(data) {
  const preview = $("preview-image");
  preview.src = data.image;
  preview.hidden = false;
  $("result-image").hidden = true;
  $("output-frame").classList.remove("empty");
}

function resetOutput(width, height) {
  $("progress").value = 0;
  $("step-text").textContent = "";
  $("preview-image").hidden = true;
  $("preview-image").removeAttribute("src");
  $("result-image").hidden = true;
  $("result-image").removeAttribute("src");
  $("image-note").hidden = true;
  $("output-frame").classList.add("empty");
  $("output-frame").style.aspectRatio = `${width} / ${height}`;
  $("result-meta").textContent = "";
  $("download").hidden = true;
  $("copy-curl").hidden = true;
  $("curl").hidden = true;
  state.shown = null;
  markShownInHistory();
}

function finishJob(job, result) {
  job.finished = true;
  job.controller.abort(); // closes the stream
  state.job = null;
  $("submit").disabled = false;
  $("cancel").disabled = true;
  $("progress").value = 1;
  $("step-text").textContent = "";
  setStatus(result.status);
  if (result.status === "Ready" && result.result) {
    const entry = historyEntry(job, result);
    addToHistory(entry);
    showEntry(entry);
    setState("done");
    return;
  }
  $("preview-image").hidden = true;
  $("output-frame").classList.add("empty");
  const reason = result.details?.error;
  showError(reason ? `${result.status}: ${reason}` : `The job ended: ${result.status}.`);
  setState("error");
}

function historyEntry(job, answer) {
  const result = answer.result;
  return {
    id: answer.id,
    model: job.model,
    prompt: result.prompt,
    seed: result.seed,
    width: result.width,
    height: result.height,
    format: result.output_format,
    duration: result.duration,
    cost: answer.cost ?? job.cost,
    sample: result.sample,
    time: Date.now(),
    request: { ...job.request, seed: result.seed },
  };
}

function showEntry(entry) {
  state.shown = entry;
  const image = $("result-image");
  $("image-note").hidden = true;
  $("preview-image").hidden = true;
  $("output-frame").classList.remove("empty");
  $("output-frame").style.aspectRatio = `${entry.width} / ${entry.height}`;
  image.alt = entry.prompt;
  image.src = entry.sample;
  image.hidden = false;
  const parts = [`seed ${entry.seed}`, `${entry.width}x${entry.height}`];
  if (Number.isFinite(entry.duration)) parts.push(`${formatNumber(entry.duration, 2)} s`);
  if (Number.isFinite(entry.cost)) parts.push(`cost ${formatNumber(entry.cost, 6)}`);
  $("result-meta").textContent = parts.join(" · ");
  const download = $("download");
  download.href = entry.sample;
  download.download = `klein-${entry.id}.${entry.format}`;
  download.hidden = false;
  $("copy-curl").hidden = false;
  $("copy-curl").textContent = "Copy curl";
  $("curl").hidden = true;
  markShownInHistory();
}

// Signed sample URLs expire; say so instead of showing a broken image.
function onResultImageError() {
  if (!$("result-image").getAttribute("src")) return;
  $("result-image").hidden = true;
  $("image-note").textContent = "link expired";
  $("image-note").hidden = false;
}

async function onCopyCurl() {
  const entry = state.shown;
  if (!entry) return;
  const command = curlCommand(entry.model, entry.request);
  $("curl").textContent = command;
  $("curl").hidden = false;
  const copied = await copyText(command);
  $("copy-curl").textContent = copied ? "Copied" : "Copy by hand below";
  setTimeout(() => { $("copy-curl").textContent = "Copy curl"; }, 2000);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // denied (no permission or focus): try the old way
    }
  }
  const area = el("textarea", { readonly: "", class: "offscreen" });
  area.value = text;
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  area.remove();
  return copied;
}

// ---------- history ----------

function loadHistory() {
  const entries = readStored(HISTORY_STORAGE, []);
  return Array.isArray(entries) ? entries : [];
}

function addToHistory(entry) {
  const entries = [entry, ...loadHistory().filter((old) => old.id !== entry.id)].slice(0, HISTORY_LIMIT);
  try {
    sessionStorage.setItem(HISTORY_STORAGE, JSON.stringify(entries));
  } catch {
    // storage full or disabled: the list still shows this page's results until reload
  }
  renderHistory(entries);
}

function renderHistory(entries = loadHistory()) {
  const items = entries.map((entry) => {
    const item = el("button", { type: "button", class: "history-item", "data-id": entry.id, title: entry.prompt });
    const thumb = el("img", { src: entry.sample, alt: "", loading: "lazy" });
    thumb.addEventListener("error", () => item.classList.add("expired"));
    const time = new Date(entry.time).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    item.append(
      thumb,
      el("span", { class: "expired-note" }, "link expired"),
      el("span", { class: "history-prompt" }, entry.prompt),
      el("span", { class: "history-meta" }, `${entry.width}x${entry.height} · seed ${entry.seed} · ${time}`),
    );
    item.addEventListener("click", () => showEntry(entry));
    return item;
  });
  $("history").replaceChildren(...items);
  $("history-empty").hidden = entries.length > 0;
  markShownInHistory();
}

function markShownInHistory() {
  for (const item of $("history").children) {
    item.classList.toggle("selected", item.dataset.id === state.shown?.id);
  }
}

// ---------- start ----------

function setupKeyInput() {
  const input = $("api-key");
  input.value = sessionStorage.getItem(KEY_STORAGE) || "";
  let timer = null;
  input.addEventListener("input", () => {
    sessionStorage.setItem(KEY_STORAGE, input.value.trim());
    clearTimeout(timer);
    timer = setTimeout(loadModels, 400); // wait for the paste or typing to settle
  });
}

function setupSeed() {
  const sync = () => { $("seed").disabled = $("seed-random").checked; };
  $("seed-random").addEventListener("change", () => {
    sync();
    clearFieldError("seed");
    if (!$("seed-random").checked) $("seed").focus();
  });
  sync();
}

function start() {
  setState("idle");
  setupKeyInput();
  setupSeed();
  setupDropZone();
  $("model").addEventListener("change", applyModel);
  $("size-preset").addEventListener("change", onPresetChange);
  for (const id of ["width", "height"]) $(id).addEventListener("input", syncPreset);
  // a field's message goes once it is edited; the form is checked again on submit (checking on
  // "change" would move the Generate button under the pointer between mousedown and click)
  document.querySelector("main").addEventListener("input", (event) => {
    const container = event.target.closest(".field, .lora-row");
    container?.querySelectorAll(".field-error").forEach((node) => clearFieldError(node.dataset.field));
  });
  $("add-lora").addEventListener("click", addLoraRow);
  $("generate-form").addEventListener("submit", onSubmit);
  $("cancel").addEventListener("click", cancelJob);
  $("copy-curl").addEventListener("click", onCopyCurl);
  $("result-image").addEventListener("error", onResultImageError);
  $("result-image").addEventListener("load", () => { $("image-note").hidden = true; });
  renderHistory();
  loadModels();
}

document.addEventListener("DOMContentLoaded", start);
