// The page of python -m fer_jax.serve: a photo, or the webcam's frames, sent to POST
// /v1/predict; the faces it returns drawn as boxes and labels, with the seven probabilities
// as bars. The webcam sends one frame at a time, the next when the answer to the last is
// back, so the frame rate follows what the server keeps up with. No external code.
"use strict";

const COLOURS = ["#1f6feb", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131"];
const FRAME_WIDTH = 480; // webcam frames are sent at most this wide (JPEG)
const MIN_FRAME_MS = 100; // at most 10 frames a second, however fast the server is
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const status = $("status");

function setState(state, message) {
  status.dataset.state = state;
  status.textContent = message;
}

// ------------------------------------------------------------------ the server

// POST an image; resolves to {status, body} (body: the JSON answer) or rejects when the
// server cannot be reached.
async function predict(body, crops, contentType) {
  const init = { method: "POST", body };
  if (contentType) init.headers = { "Content-Type": contentType };
  const response = await fetch(`/v1/predict?crops=${crops}`, init);
  let answer;
  try {
    answer = await response.json();
  } catch (e) {
    answer = { detail: `HTTP ${response.status} ${response.statusText}` };
  }
  const retry = Number(response.headers.get("Retry-After")) || 1;
  return { status: response.status, body: answer, retry };
}

async function checkHealth() {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    if (!response.ok) throw new Error(health.detail || `HTTP ${response.status}`);
    setState(
      "ready",
      `Ready (model: ${health.model || "loaded"}). Drop a photo, or start the webcam.`,
    );
  } catch (e) {
    setState("error", `Server error: the model is not available (${e.message}).`);
  }
}

// ------------------------------------------------------------------ drawing

// Boxes and labels over `ctx`, face boxes scaled by `scale` from image pixels.
function drawFaces(ctx, faces, scale) {
  const size = Math.max(13, Math.round(ctx.canvas.width / 45));
  ctx.font = `600 ${size}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  faces.forEach((face, k) => {
    const [x, y, w, h] = face.box.map((v) => v * scale);
    const colour = COLOURS[k % COLOURS.length];
    ctx.lineWidth = Math.max(2, size / 6);
    ctx.strokeStyle = colour;
    ctx.strokeRect(x, y, w, h);
    const text = `${face.label} ${Math.round(100 * face.probabilities[face.label])}%`;
    const width = ctx.measureText(text).width + 8;
    const top = y - size - 6 >= 0 ? y - size - 6 : y + h;
    ctx.fillStyle = colour;
    ctx.fillRect(x, top, width, size + 6);
    ctx.fillStyle = "white";
    ctx.fillText(text, x + 4, top + 3);
  });
}

// One card per face: its label, box and seven bars, in `list`.
function listFaces(list, faces) {
  list.replaceChildren(
    ...faces.map((face, k) => {
      const item = document.createElement("li");
      item.className = "face";
      const title = document.createElement("h2");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = COLOURS[k % COLOURS.length];
      const label = document.createElement("strong");
      label.className = "label";
      label.textContent = face.label;
      const box = document.createElement("span");
      box.className = "box";
      box.textContent = `face ${k + 1}, box ${face.box.join(", ")}`;
      title.append(swatch, label, box);
      item.append(title);
      for (const [name, p] of Object.entries(face.probabilities)) {
        item.append(barRow(name, p, name === face.label));
      }
      return item;
    }),
  );
}

function barRow(name, p, top) {
  const row = document.createElement("div");
  row.className = top ? "bar-row top" : "bar-row";
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${(100 * p).toFixed(1)}%`;
  bar.append(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = `${(100 * p).toFixed(1)}%`;
  row.append(label, bar, value);
  return row;
}

// ------------------------------------------------------------------ a photo

const canvas = $("photo-canvas");
const facesList = $("faces");

async function showPhoto(file) {
  if (!file) return;
  setState("loading", `Analysing ${file.name}…`);
  facesList.replaceChildren();
  const form = new FormData();
  form.append("file", file, file.name);
  let answer;
  try {
    answer = await predict(form, $("crops").value);
  } catch (e) {
    setState("error", "Server error: the server cannot be reached. Is it still running?");
    return;
  }
  const image = await loadImage(file);
  const scale = image ? Math.min(1, 720 / image.naturalWidth) : 1;
  if (image) {
    canvas.width = Math.round(image.naturalWidth * scale);
    canvas.height = Math.round(image.naturalHeight * scale);
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
  } else {
    canvas.width = canvas.height = 0;
  }
  const { status: code, body } = answer;
  if (code === 200) {
    drawFaces(canvas.getContext("2d"), body.faces, scale);
    listFaces(facesList, body.faces);
    const n = body.faces.length;
    const labels = body.faces.map((f) => f.label).join(", ");
    setState("ok", `${file.name}: ${n} face${n === 1 ? "" : "s"}: ${labels}.`);
  } else if (code === 422) {
    setState("noface", `No face found in ${file.name}: ${body.detail}`);
  } else if (code === 503) {
    setState("busy", `The server is busy: ${body.detail}`);
  } else {
    setState("error", `Server error (${code}): ${body.detail}`);
  }
}

// The photo as an <img> (EXIF orientation applied, as the server applies it), or null.
function loadImage(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => {
      URL.revokeObjectURL(url);
      resolve(image);
    };
    image.onerror = () => {
      URL.revokeObjectURL(url);
      resolve(null);
    };
    image.src = url;
  });
}

const drop = $("drop");
$("file").addEventListener("change", (event) => showPhoto(event.target.files[0]));
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  showPhoto(event.dataTransfer.files[0]);
});

// ------------------------------------------------------------------ the webcam

const video = $("video");
const overlay = $("overlay");
const liveList = $("live-faces");
const cameraButton = $("camera");
const frame = document.createElement("canvas");
let stream = null;
let running = false;

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setState(
      "refused",
      "Camera unavailable: browsers allow it only on https or on this machine " +
        "(http://127.0.0.1 or http://localhost).",
    );
    return;
  }
  setState("loading", "Starting the camera…");
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false,
    });
  } catch (e) {
    setState("refused", cameraMessage(e));
    return;
  }
  video.srcObject = stream;
  await video.play();
  running = true;
  cameraButton.textContent = "Stop the camera";
  cameraButton.classList.add("stop");
  setState("loading", "Camera on: analysing the first frame…");
  analyse();
}

function cameraMessage(error) {
  if (error.name === "NotAllowedError" || error.name === "SecurityError") {
    return "Camera refused: allow this page to use the camera (the camera icon in the " +
      "address bar), then press Start again.";
  }
  if (error.name === "NotFoundError" || error.name === "OverconstrainedError") {
    return "No camera found on this computer.";
  }
  if (error.name === "NotReadableError") {
    return "The camera is in use by another program.";
  }
  return `The camera cannot start: ${error.message || error.name}.`;
}

function stopCamera() {
  running = false;
  if (stream) stream.getTracks().forEach((track) => track.stop());
  stream = null;
  video.srcObject = null;
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  liveList.replaceChildren();
  $("rate").textContent = "";
  cameraButton.textContent = "Start the camera";
  cameraButton.classList.remove("stop");
  setState("ready", "Camera stopped.");
}

// The current video frame as a JPEG at most FRAME_WIDTH wide; its scale to the video.
async function grabFrame() {
  const scale = Math.min(1, FRAME_WIDTH / video.videoWidth);
  frame.width = Math.round(video.videoWidth * scale);
  frame.height = Math.round(video.videoHeight * scale);
  frame.getContext("2d").drawImage(video, 0, 0, frame.width, frame.height);
  const blob = await new Promise((resolve) => frame.toBlob(resolve, "image/jpeg", 0.85));
  return { blob, scale };
}

// One frame at a time: the next is sent when the answer to the last is back.
async function analyse() {
  let perFrame = null;
  let frames = 0;
  while (running) {
    const started = performance.now();
    if (!video.videoWidth || document.hidden) {
      await sleep(document.hidden ? 500 : 50); // no frames sent while the tab is hidden
      continue;
    }
    const { blob, scale } = await grabFrame();
    let answer;
    try {
      answer = await predict(blob, 1, "image/jpeg");
    } catch (e) {
      if (!running) break;
      setState("error", "Server error: the server cannot be reached. Retrying…");
      await sleep(2000);
      continue;
    }
    if (!running) break;
    showLive(answer, scale);
    if (answer.status === 503) await sleep(1000 * answer.retry);
    const spent = performance.now() - started;
    await sleep(Math.max(0, MIN_FRAME_MS - spent));
    const interval = performance.now() - started;
    perFrame = perFrame === null ? interval : 0.8 * perFrame + 0.2 * interval;
    frames += 1;
    overlay.dataset.frames = String(frames);
    $("rate").textContent = `${(1000 / perFrame).toFixed(1)} frames/s analysed ` +
      `(${Math.round(spent)} ms for the last)`;
  }
}

function showLive(answer, scale) {
  overlay.width = video.videoWidth;
  overlay.height = video.videoHeight;
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  const { status: code, body } = answer;
  if (code === 200) {
    drawFaces(ctx, body.faces, 1 / scale);
    listFaces(liveList, body.faces);
    const labels = body.faces.map((f) => f.label).join(", ");
    setState("ok", `Live: ${labels}.`);
  } else if (code === 422) {
    liveList.replaceChildren();
    setState("noface", "No face in view: face the camera, in good light.");
  } else if (code === 503) {
    setState("busy", `The server is busy: ${body.detail}`);
  } else {
    setState("error", `Server error (${code}): ${body.detail}`);
  }
}

cameraButton.addEventListener("click", () => (running ? stopCamera() : startCamera()));

// ------------------------------------------------------------------ tabs

function showTab(name) {
  for (const tab of ["photo", "webcam"]) {
    $(`tab-${tab}`).setAttribute("aria-pressed", String(tab === name));
    $(`${tab}-panel`).hidden = tab !== name;
  }
  if (name === "photo" && running) stopCamera();
}

$("tab-photo").addEventListener("click", () => showTab("photo"));
$("tab-webcam").addEventListener("click", () => showTab("webcam"));

checkHealth();
