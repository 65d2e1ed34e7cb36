// The leansd web page: a form that submits jobs to the native job API, a live view of the running job (its
// server-sent events), the queue, and a gallery of results.

import { ApiError, apiFetch, getBlob, getJSON, postJSON, readEvents, setKeyPrompt } from "./api.js";
import { MaskEditor } from "./mask.js";
import { pngTextChunks, settingsFromInfotext } from "./pnginfo.js";

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "running"]);
const GALLERY_LIMIT = 60; // images kept in the page; older ones are dropped (the server keeps a bounded history too)
const SETTINGS_STORAGE = "leansd.settings";
const FIELDS = ["prompt", "negative_prompt", "model", "sampler", "steps", "guidance_scale", "batch_size", "width", "height", "strength"];

const state = {
  models: [],
  samplers: [],
  lastSeed: null,
  lastSeedMine: false,
  shown: new Set(), // ids of jobs whose images are in the gallery
  watching: null, // {id, abort} of the job whose event stream is open
  current: null, // the job shown in the "Current job" panel
  jobs: [], // the latest GET /api/jobs
  mine: [], // ids of jobs this page submitted, oldest first
  pollTimer: null,
};
const editor = new MaskEditor($("init_canvas"), $("mask_canvas"));

// ---------------------------------------------------------------- small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function say(message) {
  $("status").textContent = message;
}

function showError(message, field = null) {
  $("form_error").textContent = message || "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  const target = field && fieldControl(field);
  if (target) {
    target.setAttribute("aria-invalid", "true");
    if (target.closest("details")) target.closest("details").open = true;
    target.focus();
  }
}

/** The form control for a request field the server named in an error, or null. */
function fieldControl(field) {
  const byApiName = { init_image: "init_file", mask: "mask_canvas", guidance: "guidance_scale", cfg_scale: "guidance_scale", n: "batch_size" };
  const id = byApiName[field] || field;
  return FIELDS.includes(id) || ["seed", "init_file", "mask_canvas"].includes(id) ? $(id) : null;
}

function seconds(value) {
  if (value === null || value === undefined) return null;
  return typeof value === "number" ? value : Date.parse(value) / 1000;
}

function duration(job) {
  const start = seconds(job.started);
  const end = seconds(job.finished);
  return start !== null && end !== null && Number.isFinite(end - start) ? ` in ${(end - start).toFixed(1)} s` : "";
}

function promptExcerpt(job) {
  const text = (job.request && job.request.prompt) || job.prompt || "";
  return text.length > 60 ? `${text.slice(0, 57)}...` : text || "(no prompt)";
}

// ---------------------------------------------------------------- models and the form

async function loadModels() {
  const data = await getJSON("/api/models");
  state.models = data.models || [];
  state.samplers = data.samplers || [];
  const model = $("model");
  model.replaceChildren(...state.models.map((m) => el("option", { value: m.name, selected: m.default }, m.name)));
  const sampler = $("sampler");
  sampler.replaceChildren(
    el("option", { value: "" }, "Default"),
    ...state.samplers.map((s) => el("option", { value: s.name }, s.name)),
  );
  const limits = data.limits || {};
  const max = { steps: limits.max_steps, batch_size: limits.max_batch, width: limits.max_width, height: limits.max_height };
  for (const [id, value] of Object.entries(max)) if (Number.isFinite(value)) $(id).max = value;
  applyModelDefaults();
  restoreSettings();
  updateSamplerDefault();
}

/** "Default (DDIM)": the sampler a job gets when none is chosen. */
function updateSamplerDefault() {
  const model = selectedModel();
  $("sampler").options[0].textContent = model && model.sampler ? `Default (${model.sampler})` : "Default";
}

function selectedModel() {
  return state.models.find((m) => m.name === $("model").value) || state.models[0] || null;
}

function applyModelDefaults() {
  const model = selectedModel();
  if (!model) return;
  if (model.width) $("width").value = model.width;
  if (model.height) $("height").value = model.height;
  if (model.steps) $("steps").value = model.steps;
  if (model.guidance_scale !== undefined && model.guidance_scale !== null) $("guidance_scale").value = model.guidance_scale;
  $("width").step = $("height").step = 8;
}

function saveSettings() {
  const settings = Object.fromEntries(FIELDS.map((id) => [id, $(id).value]));
  settings.seed = $("seed_random").checked ? null : $("seed").value;
  try {
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(settings));
  } catch {
    // storage full or disabled: settings are simply not remembered
  }
}

function restoreSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "null");
    if (saved) applySettings(saved, { quiet: true });
  } catch {
    // ignore unreadable saved settings
  }
}

function findModel(name) {
  const wanted = String(name).trim().toLowerCase();
  const names = (m) => [m.name, ...(m.aliases || [])].map((n) => String(n).toLowerCase());
  const current = selectedModel();
  return (
    state.models.find((m) => m.name.toLowerCase() === wanted) ||
    (current && names(current).includes(wanted) ? current : null) || // several folders may share a name
    state.models.find((m) => names(m).includes(wanted))
  );
}

function findSampler(name) {
  const wanted = String(name).trim().toLowerCase();
  return state.samplers.find((s) => s.name.toLowerCase() === wanted || (s.aliases || []).some((a) => String(a).toLowerCase() === wanted));
}

function setSeed(seed) {
  const fixed = seed !== null && seed !== undefined && seed !== "" && String(seed) !== "-1";
  $("seed_random").checked = !fixed;
  $("seed").disabled = !fixed;
  $("seed").value = fixed ? String(seed) : "";
}

/** Fill the form from settings (infotext, a gallery item, saved settings); returns notes on what could not be set. */
function applySettings(settings, { quiet = false } = {}) {
  const notes = [];
  if ("model" in settings && settings.model) {
    const model = findModel(settings.model);
    if (model) {
      if ($("model").value !== model.name) {
        $("model").value = model.name;
        updateSamplerDefault();
      }
    } else notes.push(`model "${settings.model}" is not served here`);
  }
  for (const id of ["prompt", "negative_prompt", "steps", "guidance_scale", "batch_size", "width", "height", "strength"]) {
    if (settings[id] !== undefined && settings[id] !== null && settings[id] !== "") $(id).value = settings[id];
  }
  if ("sampler" in settings) {
    const sampler = settings.sampler ? findSampler(settings.sampler) : null;
    if (sampler || !settings.sampler) $("sampler").value = sampler ? sampler.name : "";
    else notes.push(`sampler "${settings.sampler}" is not available`);
  }
  if ("seed" in settings) setSeed(settings.seed);
  $("strength_out").value = $("strength").value;
  if (!quiet) saveSettings();
  return notes;
}

function readForm() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = {
    model: $("model").value || undefined,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value || undefined,
    sampler: $("sampler").value || undefined,
    steps: number("steps"),
    guidance_scale: number("guidance_scale"),
    width: number("width"),
    height: number("height"),
    batch_size: number("batch_size"),
  };
  if (editor.loaded) {
    const width = body.width || editor.image.width;
    const height = body.height || editor.image.height;
    body.init_image = editor.imagePNG(width, height);
    body.strength = number("strength");
    if (editor.hasPaint()) body.mask = editor.maskPNG(width, height);
  }
  return body;
}

/** The request as JSON text; a fixed seed is written as its digits, which may exceed JavaScript's exact integers. */
function requestJSON(body) {
  const seed = $("seed_random").checked ? "" : $("seed").value.trim();
  const text = JSON.stringify(body);
  if (!/^\d+$/.test(seed)) return text;
  return `${text.slice(0, -1)}${text.length > 2 ? "," : ""}"seed":${seed}}`;
}

async function generate() {
  if (!$("prompt").value.trim()) {
    showError("Write a prompt first.", "prompt");
    return;
  }
  if (!$("seed_random").checked && !/^\d+$/.test($("seed").value.trim())) {
    showError("The seed must be a whole number 0 or more, or tick Random.", "seed");
    return;
  }
  showError("");
  saveSettings();
  const button = $("generate");
  button.disabled = true;
  try {
    const response = await apiFetch("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: requestJSON(readForm()),
    });
    const job = await response.json();
    state.mine.push(job.id);
    say(job.position ? `Queued at position ${job.position}` : "Queued");
    await refreshJobs();
  } catch (err) {
    if (err instanceof ApiError && err.status === 429) showError("The queue is full; try again when a job finishes.");
    else showError(err.message, err.field);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- jobs: queue, live view, cancel

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await getJSON("/api/jobs")).jobs || [];
  } catch (err) {
    say(`Cannot read the queue: ${err.message}`);
    return;
  }
  state.jobs = jobs;
  renderQueue(jobs);
  // oldest first, so the newest ends up at the top of the gallery
  for (const job of [...jobs].reverse()) {
    if (job.status === "done" && !state.shown.has(job.id)) await showResults(job);
  }
  // The panel's job finished without its stream saying so (a dropped connection): show its final state.
  const current = state.current && jobs.find((j) => j.id === state.current.id);
  if (current && ACTIVE.has(state.current.status) && !ACTIVE.has(current.status)) showProgress(current);
  const running = jobs.find((j) => j.status === "running");
  const mineQueued = jobs.filter((j) => j.status === "queued" && state.mine.includes(j.id)).pop();
  const follow = running || mineQueued;
  if (follow) watch(follow.id);
  updateCancel();
}

function renderQueue(jobs) {
  const active = jobs.filter((j) => ACTIVE.has(j.status)).reverse(); // oldest (next to run) first
  $("queue").replaceChildren(
    ...active.map((job) => {
      const where = job.status === "running" ? `running, step ${job.step || 0} of ${job.total || "?"}` : `queued, position ${job.position ?? "?"}`;
      return el(
        "li",
        { class: `job ${job.status}`, "data-job": job.id },
        el("span", { class: "job-prompt" }, promptExcerpt(job)),
        el("span", { class: "job-state" }, where),
        el("button", { type: "button", "aria-label": `Cancel job: ${promptExcerpt(job)}`, onclick: () => cancel(job.id) }, "Cancel"),
      );
    }),
  );
  $("queue_empty").hidden = active.length > 0;
}

function watch(id) {
  if (state.watching && state.watching.id === id) return;
  if (state.watching) state.watching.abort.abort();
  const abort = new AbortController();
  state.watching = { id, abort };
  readEvents(`/api/jobs/${id}/events`, (name, data) => onEvent(id, name, data), abort.signal)
    .catch((err) => say(`Lost the job's progress stream: ${err.message}`))
    .finally(() => {
      if (state.watching && state.watching.abort === abort) state.watching = null;
      schedulePoll(200);
    });
}

function onEvent(id, name, data) {
  if (name === "progress") {
    showProgress({ id, status: "running", step: data.step, total: data.total });
    if (data.preview) showPreview(data.preview);
    return;
  }
  if (name === "status" || name === "done" || name === "failed" || name === "cancelled") {
    const job = data && typeof data === "object" ? data : { id, status: name };
    showProgress(job);
    if (name === "done") {
      showResults(job);
      say(`Done${duration(job)}`);
    } else if (name === "failed") {
      say(`Failed: ${job.error || "unknown error"}`);
      if (state.mine.includes(id)) showError(job.error, job.field);
    } else if (name === "cancelled") {
      say("Cancelled");
    }
  }
}

function showProgress(job) {
  const same = state.current && state.current.id === job.id;
  // A job only moves forward (queued, running, then finished): a reply that left the server before the job
  // finished (a cancel's, a poll's) may arrive after the stream's final event and must not undo it.
  if (same && !ACTIVE.has(state.current.status) && ACTIVE.has(job.status)) return;
  state.current = same ? { ...state.current, ...job } : { ...job };
  const { status, step = 0, total = 0 } = state.current;
  const progress = $("progress");
  progress.max = Math.max(1, total || 1);
  progress.value = status === "done" ? progress.max : Math.min(step || 0, progress.max);
  const words = {
    queued: `Queued${state.current.position ? `, position ${state.current.position}` : ""}`,
    running: total ? `Step ${step} of ${total}` : "Starting",
    done: `Done${duration(state.current)}`,
    failed: `Failed: ${state.current.error || "unknown error"}`,
    cancelled: "Cancelled",
  };
  $("progress_text").textContent = `${words[status] || status} · ${promptExcerpt(state.current)}`;
  $("progress_text").dataset.status = status;
  $("progress_text").dataset.job = state.current.id;
  updateCancel();
}

function showPreview(src) {
  const img = $("preview");
  img.src = src;
  img.hidden = false;
  $("preview_empty").hidden = true;
}

function cancellable() {
  if (state.current && ACTIVE.has(state.current.status)) return state.current.id;
  const queued = state.jobs.filter((j) => j.status === "queued" && state.mine.includes(j.id));
  return queued.length ? queued[0].id : null;
}

function updateCancel() {
  $("cancel").disabled = cancellable() === null;
}

async function cancel(id = cancellable()) {
  if (!id) return;
  try {
    const job = await postJSON(`/api/jobs/${id}/cancel`, {});
    if (state.current && state.current.id === id) showProgress(job);
    say(`Cancelled: ${promptExcerpt(job)}`);
  } catch (err) {
    say(`Could not cancel: ${err.message}`);
  }
  await refreshJobs();
}

function schedulePoll(delay) {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(async () => {
    if (!document.hidden) await refreshJobs();
    schedulePoll(state.jobs.some((j) => ACTIVE.has(j.status)) ? 1000 : 4000);
  }, delay);
}

// ---------------------------------------------------------------- gallery

async function showResults(summary) {
  if (state.shown.has(summary.id)) return;
  state.shown.add(summary.id);
  let job = summary;
  try {
    if (!Array.isArray(job.images) || !job.request) job = await getJSON(`/api/jobs/${summary.id}`);
  } catch (err) {
    state.shown.delete(summary.id);
    say(`Cannot read job results: ${err.message}`);
    return;
  }
  const items = [];
  for (const [index, image] of (job.images || []).entries()) {
    try {
      items.push(await galleryItem(job, image, index));
    } catch (err) {
      say(`Cannot load an image: ${err.message}`);
    }
  }
  $("gallery").prepend(...items);
  if (items.length && state.current && state.current.id === job.id) showPreview(items[0].dataset.url);
  const first = (job.images || [])[0];
  // "Reuse last": the newest image of this page's own jobs, else the newest in the gallery.
  const mine = state.mine.includes(job.id);
  const seed = first && first.seed !== undefined ? first.seed : job.request && job.request.seed;
  if ((mine || !state.lastSeedMine) && seed !== undefined && seed !== null) {
    state.lastSeed = seed;
    state.lastSeedMine = mine;
    $("seed_reuse").disabled = false;
  }
  trimGallery();
}

async function galleryItem(job, image, index) {
  const blob = await getBlob(image.url);
  const url = URL.createObjectURL(blob); // the server's bytes, `parameters` chunk included
  const request = job.request || {};
  const seed = image.seed ?? request.seed;
  const infotext = image.infotext || "";
  const settings = infotext ? settingsFromInfotext(infotext) : { ...request, seed };
  const size = settings.width && settings.height ? `${settings.width}x${settings.height}` : "";
  const summary = [`seed ${seed}`, settings.steps && `${settings.steps} steps`, settings.sampler, settings.guidance_scale !== undefined && `CFG ${settings.guidance_scale}`, size]
    .filter(Boolean)
    .join(" · ");
  const name = `leansd-${job.id.slice(0, 8)}-${index}-${seed}.png`;
  const img = el("img", { src: url, alt: `Result: ${promptExcerpt(job)} (seed ${seed})`, loading: "lazy" });
  img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth <= 128), { once: true });
  return el(
    "li",
    { class: "result", "data-job": job.id, "data-url": url },
    el(
      "figure",
      {},
      img,
      el(
        "figcaption",
        {},
        el("p", { class: "result-prompt" }, promptExcerpt(job)),
        el("p", { class: "result-summary" }, summary),
        infotext ? el("details", {}, el("summary", {}, "Parameters"), el("pre", {}, infotext)) : null,
        el(
          "div",
          { class: "result-actions" },
          el("a", { href: url, download: name, class: "button", "aria-label": `Download PNG, seed ${seed}` }, "Download PNG"),
          el("button", { type: "button", onclick: () => useSettings(settings, seed) }, "Use settings"),
          el("button", { type: "button", onclick: () => setSeed(seed) }, "Use seed"),
          el("button", { type: "button", onclick: () => useAsInit(blob) }, "Use as init image"),
        ),
      ),
    ),
  );
}

function trimGallery() {
  const items = $("gallery").children;
  while (items.length > GALLERY_LIMIT) {
    const last = items[items.length - 1];
    URL.revokeObjectURL(last.dataset.url);
    last.remove();
  }
  $("gallery_empty").hidden = items.length > 0;
}

function useSettings(settings, seed) {
  const notes = applySettings({ ...settings, seed });
  say(notes.length ? `Settings loaded; ${notes.join("; ")}` : "Settings loaded");
  $("prompt").focus();
}

async function useAsInit(blob) {
  $("img2img").open = true;
  await loadInit(blob);
  $("init_file").focus();
}

// ---------------------------------------------------------------- init image, mask, dropped PNGs

async function loadInit(blob) {
  try {
    const { width, height } = await editor.load(blob);
    const fit = fitSize(width, height);
    $("width").value = fit.width;
    $("height").value = fit.height;
    document.querySelector("#init_drop .stack").hidden = false;
    document.querySelector("#init_drop .empty").hidden = true;
    $("init_remove").disabled = false;
  } catch {
    showError("That file is not an image this browser can read.", "init_file");
  }
}

/** An image's size scaled to about the model's default area, in multiples of 8 and within the limits. */
function fitSize(width, height) {
  const model = selectedModel() || {};
  const area = (model.width || 512) * (model.height || 512);
  const scale = Math.sqrt(area / (width * height));
  const round = (v, max) => Math.max(8, Math.min(Number(max) || 2048, Math.round((v * scale) / 8) * 8));
  return { width: round(width, $("width").max), height: round(height, $("height").max) };
}

function unloadInit() {
  editor.unload();
  $("init_file").value = "";
  document.querySelector("#init_drop .stack").hidden = true;
  document.querySelector("#init_drop .empty").hidden = false;
  $("init_remove").disabled = true;
  applyModelDefaults();
}

async function fileAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** The infotext of an image file: its PNG `parameters` chunk, else whatever the server's png-info finds. */
async function infotextOf(file) {
  const chunks = await pngTextChunks(await file.arrayBuffer());
  if (chunks && chunks.parameters) return chunks.parameters;
  try {
    const info = await postJSON("/sdapi/v1/png-info", { image: await fileAsDataURL(file) });
    return (info && info.info) || "";
  } catch {
    return "";
  }
}

async function loadParameters(file) {
  const infotext = await infotextOf(file);
  if (!infotext.trim()) {
    say(`${file.name || "That file"} carries no generation parameters`);
    return;
  }
  const notes = applySettings(settingsFromInfotext(infotext));
  say(`Loaded parameters from ${file.name || "the image"}${notes.length ? `; ${notes.join("; ")}` : ""}`);
  $("prompt").focus();
}

function firstImage(dataTransfer) {
  return [...(dataTransfer?.files || [])].find((f) => f.type.startsWith("image/") || /\.(png|jpe?g|webp)$/i.test(f.name)) || null;
}

function bindDrops() {
  let depth = 0;
  const overlay = $("drop_overlay");
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    overlay.hidden = Boolean(e.target.closest && e.target.closest("#init_drop")); // there it sets the init image
  });
  document.addEventListener("drop", (e) => {
    depth = 0;
    overlay.hidden = true;
    const file = firstImage(e.dataTransfer);
    if (!file) return;
    e.preventDefault();
    loadParameters(file);
  });
  $("init_drop").addEventListener("dragover", (e) => e.preventDefault());
  $("init_drop").addEventListener("drop", (e) => {
    const file = firstImage(e.dataTransfer);
    if (!file) return;
    e.preventDefault();
    e.stopPropagation();
    depth = 0;
    overlay.hidden = true;
    loadInit(file);
  });
}

// ---------------------------------------------------------------- API key dialog

function askForKey(refused) {
  const dialog = $("key_dialog");
  const input = $("key_input");
  dialog.querySelector("p").textContent = refused
    ? "The server refused the stored API key. Enter the right one; it is kept in this browser's local storage."
    : "This server needs an API key. It is kept in this browser's local storage.";
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "ok" && input.value.trim() ? input.value.trim() : null),
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

// ---------------------------------------------------------------- wiring

function bind() {
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("form").addEventListener("change", (e) => {
    if (e.target.id !== "init_file" && e.target.id !== "png_file") saveSettings();
  });
  $("cancel").addEventListener("click", () => cancel());
  $("model").addEventListener("change", () => {
    updateSamplerDefault();
    if (!editor.loaded) applyModelDefaults();
  });
  $("seed_random").addEventListener("change", () => {
    $("seed").disabled = $("seed_random").checked;
    if (!$("seed_random").checked) $("seed").focus();
  });
  $("seed_reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) setSeed(state.lastSeed);
    saveSettings();
  });
  $("strength").addEventListener("input", () => ($("strength_out").value = $("strength").value));
  $("brush").addEventListener("input", () => {
    $("brush_out").value = $("brush").value;
    editor.brush = Number($("brush").value);
  });
  $("mask_clear").addEventListener("click", () => editor.clear());
  $("mask_invert").addEventListener("click", () => editor.invert());
  $("init_remove").addEventListener("click", unloadInit);
  $("init_remove").disabled = true;
  $("init_file").addEventListener("change", () => {
    const file = $("init_file").files[0];
    if (file) loadInit(file);
  });
  $("png_file").addEventListener("change", () => {
    const file = $("png_file").files[0];
    if (file) loadParameters(file);
    $("png_file").value = "";
  });
  editor.onchange = () => {
    const painted = editor.loaded && editor.painted;
    $("mask_help").textContent = !editor.loaded
      ? "Paint on the image to mark what to repaint (inpainting); leave it unpainted for image to image."
      : painted
        ? "Inpainting: the painted area is repainted, the rest kept."
        : "Image to image: paint on the image to repaint only part of it.";
  };
  document.addEventListener("keydown", (e) => {
    if (document.querySelector("dialog[open]")) return; // the key dialog handles its own keys
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("form").requestSubmit();
    } else if (e.key === "Escape") {
      if (cancellable() !== null) {
        e.preventDefault();
        cancel();
      }
    }
  });
  bindDrops();
  setKeyPrompt(askForKey);
}

async function main() {
  bind();
  try {
    await loadModels();
  } catch (err) {
    say(`Cannot reach the server: ${err.message}`);
  }
  await refreshJobs();
  trimGallery();
  schedulePoll(1000);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedulePoll(0);
  });
  document.body.dataset.ready = "true";
}

main();
