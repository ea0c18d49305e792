// vlmlab web page: talks to the OpenAI-compatible API of `vlmlab serve` (no framework, no external URL).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

const ui = {
  model: $("model"), kind: $("kind"), error: $("error"),
  imagePanel: $("image-panel"), imageHint: $("image-hint"), dropzone: $("dropzone"), stage: $("stage"),
  preview: $("preview"), overlay: $("overlay"), file: $("file"), clearImage: $("clear-image"), imageName: $("image-name"),
  chatPanel: $("chat-panel"), history: $("history"), current: $("current"), currentQuestion: $("current-question"),
  answer: $("answer"), stats: $("stats"), question: $("question"), maxTokens: $("max-tokens"),
  temperature: $("temperature"), ask: $("ask"), stop: $("stop"), newChat: $("new-chat"),
  classifyPanel: $("classify-panel"), labels: $("labels"), classify: $("classify"), probs: $("probs"),
};

const state = {
  models: [],        // entries of GET /v1/models
  image: null,       // data URI of the current image, or null
  messages: [],      // the conversation re-sent each turn (OpenAI chat format)
  controller: null,  // AbortController of the request in flight
};

function setState(s) { document.body.dataset.state = s; }
function currentKind() {
  const m = state.models.find((x) => x.id === ui.model.value);
  return m ? m.kind : "";
}
function isGenerative() { return currentKind() !== "dual-encoder"; }

// ---- errors ----------------------------------------------------------------------------------

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
  setState("error");
}
function clearError() { ui.error.hidden = true; ui.error.textContent = ""; }

/** The server's message from a non-2xx response ({"error": {"message": ...}}), else the status line. */
async function responseError(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    const e = body.error ?? body.detail;
    if (typeof e === "string") return e;
    if (e && e.message) return e.message;
    if (Array.isArray(e)) return e.map((d) => d.msg ?? JSON.stringify(d)).join("; ");
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

// ---- models ----------------------------------------------------------------------------------

async function loadModels() {
  try {
    const resp = await fetch("/v1/models");
    if (!resp.ok) throw new Error(await responseError(resp));
    state.models = (await resp.json()).data;
  } catch (e) {
    showError(`Could not list the models: ${e.message}`);
    return;
  }
  ui.model.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  ui.model.disabled = false;
  adaptToModel();
  setState("idle");
}

/** Show the panels the model's kind supports. */
function adaptToModel() {
  const kind = currentKind();
  ui.kind.textContent = kind;
  ui.imagePanel.hidden = kind === "language-model";
  ui.imageHint.textContent = kind === "dual-encoder" ? "(required)" : "(optional)";
  ui.chatPanel.hidden = !isGenerative();
  ui.classifyPanel.hidden = isGenerative();
  newChat();
  clearError();
  if (document.body.dataset.state !== "loading") setState("idle");
}

// ---- image input -----------------------------------------------------------------------------

function loadFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result, file.name || "pasted image");
  reader.onerror = () => showError(`Could not read ${file.name}: ${reader.error}`);
  reader.readAsDataURL(file);
}

/** A new image starts a new conversation: boxes refer to the first image of the chat. */
function setImage(dataUri, name) {
  state.image = dataUri;
  ui.imageName.textContent = name || "";
  ui.stage.hidden = !dataUri;
  clearOverlay();
  if (dataUri) ui.preview.src = dataUri; else ui.preview.removeAttribute("src");
  newChat();
  ui.probs.replaceChildren();
  clearError();
}

ui.preview.addEventListener("load", () => {
  ui.overlay.setAttribute("viewBox", `0 0 ${ui.preview.naturalWidth} ${ui.preview.naturalHeight}`);
});
ui.preview.addEventListener("error", () => {
  if (state.image) ui.imageName.textContent += " (the browser cannot display it)";
});
ui.file.addEventListener("change", () => { loadFile(ui.file.files[0]); });
ui.clearImage.addEventListener("click", () => { ui.file.value = ""; setImage(null, ""); });
ui.dropzone.addEventListener("dragover", (e) => { e.preventDefault(); ui.dropzone.classList.add("over"); });
ui.dropzone.addEventListener("dragleave", () => ui.dropzone.classList.remove("over"));
ui.dropzone.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.dropzone.classList.remove("over");
  loadFile(e.dataTransfer.files[0]);
});
ui.dropzone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); ui.file.click(); } });
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData?.items ?? [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item && !ui.imagePanel.hidden) { e.preventDefault(); loadFile(item.getAsFile()); }
});

// ---- overlay (boxes and points in pixels of the original image) ----------------------------

function clearOverlay() { ui.overlay.replaceChildren(); }

function drawOverlay(boxes, points) {
  clearOverlay();
  const size = Math.max(ui.preview.naturalWidth, ui.preview.naturalHeight, 1);
  for (const [x0, y0, x1, y1] of boxes) {
    const r = document.createElementNS(SVG_NS, "rect");
    r.setAttribute("class", "box");
    r.setAttribute("x", Math.min(x0, x1)); r.setAttribute("y", Math.min(y0, y1));
    r.setAttribute("width", Math.abs(x1 - x0)); r.setAttribute("height", Math.abs(y1 - y0));
    ui.overlay.append(r);
  }
  for (const [x, y] of points) {
    const c = document.createElementNS(SVG_NS, "circle");
    c.setAttribute("class", "point");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", Math.max(2, size / 60));
    ui.overlay.append(c);
  }
}

// ---- chat ------------------------------------------------------------------------------------

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  ui.history.replaceChildren();
  ui.current.hidden = true;
  ui.currentQuestion.textContent = "";
  ui.answer.textContent = "";
  ui.stats.textContent = "";
  clearOverlay();
}

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  li.textContent = text;
  return li;
}

/** Parse an SSE stream: calls onEvent(json) for each `data:` line until `[DONE]`. */
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value ?? new Uint8Array(), { stream: !done });
      const lines = buffer.split(/\r?\n/);
      buffer = done ? "" : lines.pop();  // keep the partial last line for the next read
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        if (data) onEvent(JSON.parse(data));
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function ask() {
  const text = ui.question.value.trim();
  if (!text || state.controller) return;
  clearError();
  // The previous turn moves into the history.
  if (!ui.current.hidden) {
    ui.history.append(bubble("user", ui.currentQuestion.textContent), bubble("assistant", ui.answer.textContent));
  }
  const messages = state.messages;  // "New chat" during the request replaces state.messages
  const first = messages.length === 0;
  const withImage = first && state.image && currentKind() !== "language-model";
  const content = withImage
    ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }]
    : text;
  messages.push({ role: "user", content });
  ui.currentQuestion.textContent = text;
  ui.answer.textContent = "";
  ui.stats.textContent = "";
  ui.current.hidden = false;
  ui.question.value = "";
  if (first) clearOverlay();

  const body = {
    model: ui.model.value,
    messages,
    stream: true,
    stream_options: { include_usage: true },  // a last chunk with the token counts
    max_tokens: parseInt(ui.maxTokens.value, 10) || 128,
    temperature: parseFloat(ui.temperature.value) || 0,
  };
  state.controller = new AbortController();
  setBusy(true);
  setState("streaming");
  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null, answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await responseError(resp));
    await readSSE(resp, (event) => {
      if (event.error) throw new Error(event.error.message ?? JSON.stringify(event.error));
      if (event.usage) usage = event.usage;
      const choice = (event.choices ?? [])[0];
      if (!choice) return;
      const delta = choice.delta ?? {};
      if (delta.content) {
        tFirst ??= performance.now();
        chunks += 1;
        answer += delta.content;
        ui.answer.textContent = answer;
      }
      if (delta.boxes || delta.points) drawOverlay(delta.boxes ?? [], delta.points ?? []);
    });
    messages.push({ role: "assistant", content: answer });
    showStats(t0, tFirst, chunks, usage);
    setState("done");
  } catch (e) {
    if (e.name === "AbortError") {
      if (answer) messages.push({ role: "assistant", content: answer });
      else messages.pop();
      if (messages === state.messages) { ui.stats.textContent = "stopped"; setState("done"); }
    } else {
      messages.pop();  // the failed question is not part of the conversation: give it back for a retry
      if (messages === state.messages) { ui.current.hidden = true; ui.question.value ||= text; }
      showError(e instanceof TypeError ? `Network error: ${e.message}` : e.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function showStats(t0, tFirst, chunks, usage) {
  const t1 = performance.now();
  const tokens = usage?.completion_tokens ?? chunks;
  const gen = tFirst ? (t1 - tFirst) / 1000 : 0;
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  else parts.push(`${chunks} chunks`);
  if (tFirst) parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  if (gen > 0 && tokens > 1) parts.push(`${(tokens / gen).toFixed(1)} tokens/s`);
  parts.push(`${((t1 - t0) / 1000).toFixed(2)} s total`);
  ui.stats.textContent = parts.join(" · ");
}

function setBusy(busy) {
  ui.ask.disabled = busy; ui.classify.disabled = busy; ui.model.disabled = busy;
  ui.stop.disabled = !busy;
}

ui.ask.addEventListener("click", ask);
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.newChat.addEventListener("click", () => { newChat(); clearError(); setState("idle"); ui.question.focus(); });
ui.question.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); ask(); }
});

// ---- zero-shot classification -----------------------------------------------------------------

async function classify() {
  const labels = ui.labels.value.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
  clearError();
  if (!state.image) return showError("Choose an image first.");
  if (labels.length < 2) return showError("Give at least two labels, separated by commas or new lines.");
  state.controller = new AbortController();
  setBusy(true);
  setState("streaming");
  ui.probs.replaceChildren();
  try {
    const resp = await fetch("/v1/classify", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: ui.model.value, image: state.image, labels }),
      signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await responseError(resp));
    const result = await resp.json();
    const rows = result.labels.map((label, i) => ({ label, p: result.probabilities[i] }));
    rows.sort((a, b) => b.p - a.p);
    ui.probs.replaceChildren(...rows.map(probRow));
    setState("done");
  } catch (e) {
    if (e.name === "AbortError") setState("done");
    else showError(e instanceof TypeError ? `Network error: ${e.message}` : e.message);
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function probRow({ label, p }) {
  const li = document.createElement("li");
  li.className = "prob";
  li.dataset.label = label;
  li.dataset.p = String(p);
  const name = document.createElement("span");
  name.className = "prob-label";
  name.textContent = label;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${(100 * p).toFixed(1)}%`;
  bar.append(fill);
  const value = document.createElement("span");
  value.className = "prob-value";
  value.textContent = `${(100 * p).toFixed(1)}%`;
  li.append(name, bar, value);
  return li;
}

ui.classify.addEventListener("click", classify);
ui.model.addEventListener("change", adaptToModel);

loadModels();
