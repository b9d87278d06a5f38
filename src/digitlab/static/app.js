// digitlab serve: draw a digit, send it to POST api/predict?explain=true, show what comes back.
// Plain JavaScript, no build step, no external assets.
"use strict";

(() => {
  const PREDICT_URL = "api/predict?explain=true";
  const MODEL_URL = "api/model";
  const SEND_EVERY_MS = 150;      // while drawing: at most one request per 150 ms, and one in flight
  const BRUSH = 22;               // px on the 280 px pad for a full-size digit: about 2 MNIST pixels
  const MIN_BRUSH = 7;
  const PEN_SHARE = 0.12;         // MNIST strokes are ~12% of the digit's size: the pen follows the drawing's size
  const SMALL_DRAWING = 0.4;      // a drawing under 40% of the pad gets the "draw bigger" hint
  const MAX_UPLOAD_BYTES = 5_000_000;
  const HEAT = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];  // inferno-like
  const TOWARDS = [255, 140, 26];  // orange: pushed towards the answer
  const AGAINST = [51, 140, 255];  // blue: pushed towards the runner-up

  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const statusEl = $("status");
  const resultEl = $("result");
  const digitEl = $("digit");
  const confidenceEl = $("confidence");
  const calibrationEl = $("calibration");
  const preprocessedEl = $("preprocessed");
  const barsEl = $("bars");
  const whyEl = $("why");
  const whyMap = $("why-map");
  const whyText = $("why-text");
  const insideEl = $("inside");
  const insideHelp = $("inside-help");
  const sizeHint = $("size-hint");
  const upload = $("upload");

  // What /api/model says about the confidences (filled in at start)
  const model = { calibrated: false, rejectBelow: null };

  // ------------------------------------------------------------------------------------------------
  // State: what to send next, and which responses are still wanted
  // ------------------------------------------------------------------------------------------------
  let hasInk = false;         // never send an empty pad: the server would (rightly) answer 422
  let pendingFile = null;     // an uploaded file goes to the server as it is, not re-drawn
  let showingUpload = false;  // the pad shows an uploaded picture: a new stroke starts a new drawing
  let timer = null;
  let inFlight = false;
  let dirty = false;
  let generation = 0;         // bumped by Clear, an upload and a new drawing: older answers are dropped

  // ------------------------------------------------------------------------------------------------
  // Drawing with pointer events (mouse, pen and touch alike). Strokes are kept as points and redrawn,
  // so the pen width can follow the drawing's size: a small digit drawn in a corner is scaled up ~5x
  // to MNIST's 20x20 box, and a full-width pen would become fat blobs.
  // ------------------------------------------------------------------------------------------------
  let strokes = [];
  let activePointer = null;

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

  function drawingSize() {
    const points = strokes.flat();
    const xs = points.map((p) => p.x);
    const ys = points.map((p) => p.y);
    return Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys));
  }

  function penWidth() {
    return Math.min(BRUSH, Math.max(MIN_BRUSH, PEN_SHARE * drawingSize()));
  }

  function render() {
    clearPad();
    const width = penWidth();
    ctx.fillStyle = "#fff";
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = width;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    for (const stroke of strokes) {
      ctx.beginPath();
      if (stroke.length === 1) {  // a tap: a zero-length line draws nothing in some browsers
        ctx.arc(stroke[0].x, stroke[0].y, width / 2, 0, 2 * Math.PI);
        ctx.fill();
        continue;
      }
      ctx.moveTo(stroke[0].x, stroke[0].y);
      for (const p of stroke.slice(1)) ctx.lineTo(p.x, p.y);
      ctx.stroke();
    }
  }

  pad.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    activePointer = event.pointerId;
    if (showingUpload) {
      // A stroke after an upload starts a new drawing: never paint over the photo and send the blend.
      showingUpload = false;
      pendingFile = null;
      strokes = [];
      generation += 1;
    }
    strokes.push([toPad(event)]);
    render();
    hasInk = true;
    schedule();
  });

  pad.addEventListener("pointermove", (event) => {
    if (event.pointerId !== activePointer) return;
    const events = typeof event.getCoalescedEvents === "function" ? event.getCoalescedEvents() : [];
    const stroke = strokes[strokes.length - 1];
    for (const e of events.length ? events : [event]) stroke.push(toPad(e));
    render();
    schedule();
  });

  function endStroke(event) {
    if (event.pointerId !== activePointer) return;
    activePointer = null;
    sizeHint.hidden = drawingSize() >= SMALL_DRAWING * pad.width;
    schedule();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  $("clear").addEventListener("click", () => {
    generation += 1;
    strokes = [];
    clearPad();
    hasInk = false;
    pendingFile = null;
    showingUpload = false;
    dirty = false;
    sizeHint.hidden = true;
    clearAnswer();
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
      clearAnswer();
      setStatus(`${file.name} is not an image (${file.type}).`, true);
      return;
    }
    if (file.size > MAX_UPLOAD_BYTES) {
      clearAnswer();
      setStatus(`${file.name} is too large (${(file.size / 1e6).toFixed(1)} MB; the limit is 5 MB).`, true);
      return;
    }
    generation += 1;
    strokes = [];
    sizeHint.hidden = true;
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
    showingUpload = true;
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
      if (mine === generation) await show(answer, file ? file.name : "your drawing");
    } catch (err) {
      if (mine === generation) {
        clearAnswer();  // nothing of the previous answer may stay under the error
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

  function setStatus(text, isError = false, spoken = "") {
    // The visible line says where the answer came from; the digit itself is big on the page already,
    // so it is only spoken (visually hidden) for screen readers.
    statusEl.textContent = text;
    if (spoken) {
      const span = document.createElement("span");
      span.className = "visually-hidden";
      span.textContent = ` ${spoken}`;
      statusEl.appendChild(span);
    }
    statusEl.classList.toggle("error", isError);
  }

  // ------------------------------------------------------------------------------------------------
  // Showing a prediction, and clearing it
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

  function clearAnswer() {
    resultEl.hidden = true;
    digitEl.textContent = "";
    confidenceEl.textContent = "";
    preprocessedEl.removeAttribute("src");
    barItems.forEach((item) => {
      item.bar.style.height = "0%";
      item.value.textContent = "";
      item.li.classList.remove("best");
      item.li.removeAttribute("aria-label");
    });
    whyEl.hidden = true;
    whyText.textContent = "";
    whyMap.getContext("2d", { willReadFrequently: true }).clearRect(0, 0, 28, 28);
    insideEl.replaceChildren();
    insideKey = "";
    insideHelp.hidden = false;
  }

  async function show(answer, source) {
    const sure = !answer.rejected;
    digitEl.textContent = sure ? String(answer.digit) : "?";
    digitEl.classList.toggle("unsure", !sure);
    const pct = `${(100 * answer.confidence).toFixed(1)}%`;
    confidenceEl.textContent = sure ? `${pct} confident`
      : `not sure: best guess ${answer.digit} at ${pct}, below the ${percent(model.rejectBelow)} threshold`;
    preprocessedEl.src = `data:image/png;base64,${answer.preprocessed}`;
    answer.probabilities.forEach((p, d) => {
      const item = barItems[d];
      item.bar.style.height = `${(100 * p).toFixed(1)}%`;
      item.value.textContent = percent(p);
      item.li.classList.toggle("best", d === answer.digit);
      item.li.setAttribute("aria-label", `${d}: ${percent(p)}`);
    });
    resultEl.hidden = false;
    const spoken = sure ? `Prediction: ${answer.digit}, ${pct} confident.`
      : `Not sure. Best guess ${answer.digit}, ${pct}.`;
    setStatus(`Read from ${source}.`, false, spoken);
    if (answer.saliency) await showWhy(answer);
    if (answer.activations) showInside(answer.activations, answer.templates);
  }

  // ------------------------------------------------------------------------------------------------
  // Why this digit: the saliency map over the 28x28 image the model saw
  // ------------------------------------------------------------------------------------------------
  async function showWhy(answer) {
    const c = whyMap.getContext("2d", { willReadFrequently: true });
    c.fillStyle = "#000";
    c.fillRect(0, 0, 28, 28);
    try {
      const img = new Image();
      img.src = `data:image/png;base64,${answer.preprocessed}`;
      await img.decode();
      c.drawImage(img, 0, 0);
    } catch (err) {
      // a newer answer replaced this one while it decoded: the map alone, on black, is still right
    }
    const image = c.getImageData(0, 0, 28, 28);
    const flat = answer.saliency.flat();
    const span = Math.max(1e-9, ...flat.map(Math.abs));
    flat.forEach((v, i) => {
      const gray = image.data[4 * i] * 0.45;  // the digit, dimmed
      const s = Math.pow(Math.min(1, Math.abs(v) / span), 0.7);
      const colour = v >= 0 ? TOWARDS : AGAINST;
      for (let k = 0; k < 3; k += 1) image.data[4 * i + k] = Math.round(gray * (1 - s) + colour[k] * s);
      image.data[4 * i + 3] = 255;
    });
    c.putImageData(image, 0, 0);
    const d = answer.digit;
    const r = answer.runner_up;
    whyText.innerHTML = "";
    whyText.append(`Why: it looked most like a ${d}, and next like a ${r}, because of these strokes: `);
    const towards = document.createElement("span");
    towards.className = "towards";
    towards.textContent = `orange pushed towards ${d}`;
    const against = document.createElement("span");
    against.className = "against";
    against.textContent = `blue towards ${r}`;
    whyText.append(towards, ", ", against, ".");
    whyEl.hidden = false;
  }

  // ------------------------------------------------------------------------------------------------
  // Look inside: what each layer computes, in plain words
  // ------------------------------------------------------------------------------------------------
  let insideKey = "";
  let insideViews = {};

  const ORDINAL = ["first", "second", "third", "fourth", "fifth"];

  function layerTitle(name, value) {
    // (title, one sentence of explanation) for a layer, from its name and shape
    if (name === "logits") {
      return [`output scores (logits): ${value.length} numbers`,
        "One score per digit before softmax; the highest wins. Softmax turns them into the probabilities " +
        "above: each step of 1 between two scores is a factor of about 2.7 between their probabilities."];
    }
    const hidden = /^hidden(\d+)$/.exec(name);
    if (hidden) {
      const nth = ORDINAL[Number(hidden[1]) - 1] || `hidden layer ${hidden[1]}:`;
      return [`${nth} hidden layer: ${value.length} units`,
        "Each square is one unit after ReLU, black when off, bright when strongly on. These units combine " +
        "the first layer's answers; only a few fire for any one digit."];
    }
    const conv = /^conv(\d+)$/.exec(name);
    if (conv) {
      const i = Number(conv[1]);
      const size = `${value[0].length}\u00d7${value[0][0].length}`;
      const title = `${ORDINAL[i - 1] || `block ${i}`} conv block: ${value.length} of its feature maps, ${size}`;
      if (i === 1) {
        return [title, "Each map is one learned 3\u00d73 filter slid over the image: bright where its pattern " +
          "(an edge in one direction, a stroke end) is found. You can still see the digit in them."];
      }
      return [title, "Later maps are coarse: each of their pixels looks at a wide patch of the digit, and " +
        "they signal parts of digits (a loop, a crossing, a corner) rather than single strokes. The " +
        "network keeps only each map's strongest value for its answer."];
    }
    return [name, ""];
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

  function paintSigned(canvas, values) {
    // weights: orange positive (ink here excites the unit), blue negative (ink here inhibits it)
    const span = Math.max(1e-9, ...values.map(Math.abs));
    const image = canvas.getContext("2d").createImageData(canvas.width, canvas.height);
    values.forEach((v, i) => {
      const s = Math.min(1, Math.abs(v) / span);
      const colour = v >= 0 ? TOWARDS : AGAINST;
      image.data.set([0, 1, 2].map((k) => Math.round(colour[k] * s)).concat(255), 4 * i);
    });
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  function canvasFor(width, height, className, label) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.className = className;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", label);
    return canvas;
  }

  function layerShell(title, sentence) {
    const box = document.createElement("figure");
    box.className = "layer";
    const heading = document.createElement("h3");
    heading.textContent = title;
    const text = document.createElement("p");
    text.textContent = sentence;
    box.append(heading, text);
    return box;
  }

  function buildTemplates(count) {
    const box = layerShell(`first hidden layer: 512 units`,
      `Each unit weighs all 784 pixels. Here are the ${count} units most active for this digit, most ` +
      "active first, each as its 784 weights drawn 28\u00d728: orange where ink excites the unit, blue " +
      "where ink inhibits it. The number is how strongly it fired.");
    box.classList.add("wide");
    const grid = document.createElement("div");
    grid.className = "templates";
    const cells = [];
    for (let k = 0; k < count; k += 1) {
      const cell = document.createElement("figure");
      const canvas = canvasFor(28, 28, "template", "Input weights of a first-layer unit");
      const caption = document.createElement("figcaption");
      cell.append(canvas, caption);
      grid.appendChild(cell);
      cells.push({ canvas, caption });
    }
    box.appendChild(grid);
    insideEl.appendChild(box);
    insideViews.templates = { kind: "templates", cells };
  }

  function buildInside(activations, templates) {
    insideEl.replaceChildren();
    insideViews = {};
    if (templates) buildTemplates(templates.length);
    for (const [name, value] of Object.entries(activations)) {
      if (name === "hidden1" && templates) continue;  // shown as templates instead
      const [title, sentence] = layerTitle(name, value);
      const box = layerShell(title, sentence);
      let view;
      if (name === "logits") {
        const list = document.createElement("ol");
        list.className = "logits";
        list.setAttribute("aria-label", "Output scores");
        const rows = value.map((_, d) => {
          const li = document.createElement("li");
          li.innerHTML = `<span>${d}</span><span class="logit-track"><span class="logit"></span></span>` +
            '<span class="logit-value"></span>';
          list.appendChild(li);
          return { fill: li.querySelector(".logit"), text: li.querySelector(".logit-value") };
        });
        box.insertBefore(list, box.lastChild);
        view = { kind: "logits", rows };
      } else if (typeof value[0] === "number") {
        // a vector of units (512 for the MLP) as a 2:1 grid: 32 x 16
        const cols = Math.ceil(Math.sqrt(value.length * 2));
        const canvas = canvasFor(cols, Math.ceil(value.length / cols), "heatmap units",
          `Heat map of the ${value.length} units of ${title}`);
        box.insertBefore(canvas, box.lastChild);
        view = { kind: "units", canvas };
      } else {
        // feature maps: [channels][H][W]; the first block large enough to see the digit in
        const grid = document.createElement("div");
        grid.className = name === "conv1" ? "maps first" : "maps";
        const canvases = value.map((map, c) => {
          const canvas = canvasFor(map[0].length, map.length, "heatmap", `${title}: map ${c + 1}`);
          grid.appendChild(canvas);
          return canvas;
        });
        box.insertBefore(grid, box.lastChild);
        view = { kind: "maps", canvases };
      }
      insideViews[name] = view;
      insideEl.appendChild(box);
    }
  }

  function showInside(activations, templates) {
    const key = Object.keys(activations).join(",") + (templates ? `,t${templates.length}` : "");
    if (key !== insideKey || !insideEl.firstChild) {
      buildInside(activations, templates);
      insideKey = key;
    }
    insideHelp.hidden = true;
    if (templates) {
      templates.forEach((t, k) => {
        const cell = insideViews.templates.cells[k];
        paintSigned(cell.canvas, t.weights.flat());
        cell.caption.textContent = `unit ${t.unit} \u00b7 ${t.activation.toFixed(1)}`;
      });
    }
    for (const [name, value] of Object.entries(activations)) {
      const view = insideViews[name];
      if (!view) continue;
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
      const m = await response.json();
      const params = Number(m.parameters).toLocaleString("en-US");
      const accuracy = typeof m.accuracy === "number"
        ? `test accuracy ${(100 * m.accuracy).toFixed(2)}%` : "accuracy not recorded";
      // the description may carry its own rounded count ("(24 k parameters)"): the exact one follows
      const description = (m.description || "").replace(/\s*\([^)]*parameters\)/, "");
      const about = description ? ` \u2014 ${description}` : "";
      info.textContent = `Model: ${m.model}${about}. ${params} parameters, ${accuracy}.`;
      model.calibrated = Boolean(m.calibrated);
      model.rejectBelow = typeof m.reject_below === "number" ? m.reject_below : null;
      calibrationEl.textContent = model.calibrated
        ? "Confidence is calibrated: of all answers given at 90%, about 90% are right."
        : "Confidence is the network's raw softmax output, not calibrated: it is often too sure.";
    } catch (err) {
      info.textContent = "Model information unavailable.";
    }
  }

  clearPad();
  loadModelInfo();
})();
