// digitlab serve: draw a digit, send it to POST api/predict?explain=true, show what comes back.
// Plain JavaScript, no build step, no external assets.
"use strict";

(() => {
  const PREDICT_URL = "api/predict?explain=true";
  const MODEL_URL = "api/model";
  const SEND_EVERY_MS = 150;      // while drawing: at most one request per 150 ms, and one in flight
  const BRUSH = 22;               // px on the 280 px pad: about 2 MNIST pixels after scaling to 28
  const MAX_UPLOAD_BYTES = 5_000_000;
  const HEAT = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];  // inferno-like

  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const statusEl = $("status");
  const resultEl = $("result");
  const digitEl = $("digit");
  const confidenceEl = $("confidence");
  const preprocessedEl = $("preprocessed");
  const barsEl = $("bars");
  const insideEl = $("inside");
  const insideHelp = $("inside-help");
  const upload = $("upload");

  // ------------------------------------------------------------------------------------------------
  // State: what to send next, and which responses are still wanted
  // ------------------------------------------------------------------------------------------------
  let hasInk = false;         // never send an empty pad: the server would (rightly) answer 422
  let pendingFile = null;     // an uploaded file goes to the server as it is, not re-drawn
  let timer = null;
  let inFlight = false;
  let dirty = false;
  let generation = 0;         // bumped by Clear: answers to older requests are dropped

  // ------------------------------------------------------------------------------------------------
  // Drawing with pointer events (mouse, pen and touch alike)
  // ------------------------------------------------------------------------------------------------
  let activePointer = null;
  let last = null;

  function clearPad() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
  }

  function toPad(event) {
    const box = pad.getBoundingClientRect();
    return {
      x: (event.clientX - box.left) * (pad.width / box.width),
      y: (event.clientY - box.top) * (pad.height / box.height),
    };
  }

  function dot(p) {
    // a zero-length line draws nothing in some browsers: a tap needs a filled circle
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    ctx.arc(p.x, p.y, BRUSH / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function strokeTo(p) {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = BRUSH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(last.x, last.y);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    last = p;
  }

  pad.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    activePointer = event.pointerId;
    last = toPad(event);
    dot(last);
    hasInk = true;
    pendingFile = null;
    schedule();
  });

  pad.addEventListener("pointermove", (event) => {
    if (event.pointerId !== activePointer) return;
    const events = typeof event.getCoalescedEvents === "function" ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) strokeTo(toPad(e));
    schedule();
  });

  function endStroke(event) {
    if (event.pointerId !== activePointer) return;
    activePointer = null;
    schedule();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  $("clear").addEventListener("click", () => {
    generation += 1;
    clearPad();
    hasInk = false;
    pendingFile = null;
    dirty = false;
    resultEl.hidden = true;
    insideEl.replaceChildren();
    insideHelp.hidden = false;
    setStatus("Cleared. Draw a digit.");
  });

  // ------------------------------------------------------------------------------------------------
  // Upload: show the image on the pad, send the file itself
  // ------------------------------------------------------------------------------------------------
  upload.addEventListener("change", async () => {
    const file = upload.files && upload.files[0];
    upload.value = "";  // choosing the same file again fires "change" again
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus(`${file.name} is not an image (${file.type}).`, true);
      return;
    }
    if (file.size > MAX_UPLOAD_BYTES) {
      setStatus(`${file.name} is too large (${(file.size / 1e6).toFixed(1)} MB; the limit is 5 MB).`, true);
      return;
    }
    generation += 1;
    clearPad();
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      ctx.imageSmoothingEnabled = scale < 1;  // keep small images (28x28) crisp when enlarged
      ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      bitmap.close();
    } catch (err) {
      // The browser cannot show it; the server may still read it, and will say so if not.
    }
    hasInk = true;
    pendingFile = file;
    setStatus(`Reading ${file.name}\u2026`);
    schedule(0);
  });

  // ------------------------------------------------------------------------------------------------
  // Talking to the API
  // ------------------------------------------------------------------------------------------------
  function schedule(delay = SEND_EVERY_MS) {
    dirty = true;
    if (timer === null) timer = setTimeout(() => { timer = null; flush(); }, delay);
  }

  function padBlob() {
    return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
  }

  async function flush() {
    if (inFlight || !dirty) return;
    dirty = false;
    if (!hasInk) return;
    inFlight = true;
    const mine = generation;
    const file = pendingFile;
    try {
      const blob = file || await padBlob();
      const answer = await predict(blob, file ? file.name : "drawing.png");
      if (mine === generation) show(answer);
    } catch (err) {
      if (mine === generation) {
        resultEl.hidden = true;
        setStatus(err.message, true);
      }
    } finally {
      inFlight = false;
      if (dirty) schedule();
    }
  }

  async function predict(blob, name) {
    const form = new FormData();
    form.append("file", blob, name);
    let response;
    try {
      response = await fetch(PREDICT_URL, { method: "POST", body: form });
    } catch (err) {
      throw new Error("Cannot reach the digitlab server. Is it still running?");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const why = body && body.error ? body.error : `HTTP ${response.status}`;
      throw new Error(`The server could not read this image: ${why}`);
    }
    return body;
  }

  function setStatus(text, isError = false) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", isError);
  }

  // ------------------------------------------------------------------------------------------------
  // Showing a prediction
  // ------------------------------------------------------------------------------------------------
  const barItems = [];
  for (let d = 0; d < 10; d += 1) {
    const li = document.createElement("li");
    li.innerHTML = '<div class="bar-track"><div class="bar"></div></div>' +
      `<span class="bar-label">${d}</span><span class="bar-value">0%</span>`;
    barsEl.appendChild(li);
    barItems.push({ li, bar: li.querySelector(".bar"), value: li.querySelector(".bar-value") });
  }

  function percent(p) {
    return p >= 0.995 ? "100%" : p >= 0.1 ? `${(100 * p).toFixed(0)}%` : `${(100 * p).toFixed(1)}%`;
  }

  function show(answer) {
    digitEl.textContent = String(answer.digit);
    confidenceEl.textContent = `${(100 * answer.confidence).toFixed(1)}% confident`;
    preprocessedEl.src = `data:image/png;base64,${answer.preprocessed}`;
    answer.probabilities.forEach((p, d) => {
      const item = barItems[d];
      item.bar.style.height = `${(100 * p).toFixed(1)}%`;
      item.value.textContent = percent(p);
      item.li.classList.toggle("best", d === answer.digit);
      item.li.setAttribute("aria-label", `${d}: ${percent(p)}`);
    });
    resultEl.hidden = false;
    setStatus(`Prediction: ${answer.digit}, ${(100 * answer.confidence).toFixed(1)}% confident.`);
    if (answer.activations) showInside(answer.activations);
  }

  // ------------------------------------------------------------------------------------------------
  // Look inside: heat maps of hidden units / feature maps, and the output logits
  // ------------------------------------------------------------------------------------------------
  let insideKey = "";
  let insideViews = {};

  const DESCRIPTIONS = {
    hidden1: "First hidden layer: 512 units after ReLU, one square each. Bright = strongly active, black = off.",
    hidden2: "Second hidden layer: 512 units after ReLU. Fewer, more specific units light up here.",
    logits: "Output logits: one score per digit before softmax. The largest wins.",
  };

  function describe(name, value) {
    if (DESCRIPTIONS[name]) return DESCRIPTIONS[name];
    const h = value[0].length;
    const w = value[0][0].length;
    return `${name}: the first ${value.length} feature maps (${h}\u00d7${w}) after this conv block.`;
  }

  function heatColor(t) {
    const x = Math.min(1, Math.max(0, t)) * (HEAT.length - 1);
    const i = Math.min(HEAT.length - 2, Math.floor(x));
    const f = x - i;
    return HEAT[i].map((c, k) => Math.round(c + f * (HEAT[i + 1][k] - c)));
  }

  function paint(canvas, values, scale) {
    const image = canvas.getContext("2d").createImageData(canvas.width, canvas.height);
    for (let i = 0; i < canvas.width * canvas.height; i += 1) {
      const v = i < values.length ? values[i] / scale : 0;
      const [r, g, b] = heatColor(v);
      image.data.set([r, g, b, 255], 4 * i);
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  function layerShell(name) {
    const box = document.createElement("figure");
    box.className = "layer";
    box.style.margin = "0";
    const title = document.createElement("h3");
    title.textContent = name;
    box.appendChild(title);
    return box;
  }

  function buildInside(activations) {
    insideEl.replaceChildren();
    insideViews = {};
    for (const [name, value] of Object.entries(activations)) {
      const box = layerShell(name);
      if (name === "logits") {
        const list = document.createElement("ol");
        list.className = "logits";
        list.setAttribute("aria-label", "Output logits");
        const rows = value.map((_, d) => {
          const li = document.createElement("li");
          li.innerHTML = `<span>${d}</span><span class="logit-track"><span class="logit"></span></span>` +
            '<span class="logit-value"></span>';
          list.appendChild(li);
          return { fill: li.querySelector(".logit"), text: li.querySelector(".logit-value") };
        });
        box.appendChild(list);
        insideViews[name] = { kind: "logits", rows };
      } else if (typeof value[0] === "number") {
        // a vector of units (512 for the MLP) as a 2:1 grid: 32 x 16
        const cols = Math.ceil(Math.sqrt(value.length * 2));
        const canvas = document.createElement("canvas");
        canvas.width = cols;
        canvas.height = Math.ceil(value.length / cols);
        canvas.className = "heatmap units";
        canvas.setAttribute("role", "img");
        canvas.setAttribute("aria-label", `Heat map of the ${value.length} units of ${name}`);
        box.appendChild(canvas);
        insideViews[name] = { kind: "units", canvas };
      } else {
        // feature maps: [channels][H][W]
        const grid = document.createElement("div");
        grid.className = "maps";
        const canvases = value.map((map, c) => {
          const canvas = document.createElement("canvas");
          canvas.width = map[0].length;
          canvas.height = map.length;
          canvas.className = "heatmap";
          canvas.setAttribute("role", "img");
          canvas.setAttribute("aria-label", `${name} feature map ${c + 1}`);
          grid.appendChild(canvas);
          return canvas;
        });
        box.appendChild(grid);
        insideViews[name] = { kind: "maps", canvases };
      }
      const text = document.createElement("p");
      text.textContent = describe(name, value);
      box.appendChild(text);
      insideEl.appendChild(box);
    }
  }

  function showInside(activations) {
    const key = Object.keys(activations).join(",");
    if (key !== insideKey || !insideEl.firstChild) {
      buildInside(activations);
      insideKey = key;
    }
    insideHelp.hidden = true;
    for (const [name, value] of Object.entries(activations)) {
      const view = insideViews[name];
      if (view.kind === "logits") {
        const span = Math.max(1e-6, ...value.map(Math.abs));
        value.forEach((v, d) => {
          const width = (50 * Math.abs(v)) / span;
          view.rows[d].fill.style.width = `${width.toFixed(1)}%`;
          view.rows[d].fill.style.left = v >= 0 ? "50%" : `${(50 - width).toFixed(1)}%`;
          view.rows[d].fill.classList.toggle("neg", v < 0);
          view.rows[d].text.textContent = v.toFixed(2);
        });
      } else if (view.kind === "units") {
        paint(view.canvas, value, Math.max(1e-6, ...value));
      } else {
        const flat = value.map((map) => map.flat());
        const scale = Math.max(1e-6, ...flat.map((m) => Math.max(...m)));  // one scale for the whole layer
        flat.forEach((m, c) => paint(view.canvases[c], m, scale));
      }
    }
  }

  // ------------------------------------------------------------------------------------------------
  // Start
  // ------------------------------------------------------------------------------------------------
  async function loadModelInfo() {
    const info = $("model-info");
    try {
      const response = await fetch(MODEL_URL);
      const model = await response.json();
      const params = Number(model.parameters).toLocaleString("en-US");
      const accuracy = typeof model.accuracy === "number"
        ? `test accuracy ${(100 * model.accuracy).toFixed(2)}%` : "accuracy not recorded";
      const about = model.description ? ` \u2014 ${model.description}` : "";
      info.textContent = `Model: ${model.model}${about}. ${params} parameters, ${accuracy}.`;
    } catch (err) {
      info.textContent = "Model information unavailable.";
    }
  }

  clearPad();
  loadModelInfo();
})();
