// lmforge's chat page: talks to the same OpenAI-compatible API as any other client.
// Conversations live in this browser's localStorage; nothing is sent anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "lmforge.conversations.v1";
const PREFS = "lmforge.settings.v1";
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "repetition_penalty", "seed", "api_key"];

const state = {
  conversations: JSON.parse(localStorage.getItem(STORE) || "[]"),
  current: null,          // id of the open conversation
  models: [],             // language models from /v1/models
  collections: [],
  busy: null,             // {controller, message} while a reply streams
};

// ---- storage -----------------------------------------------------------------------------------
function save() {
  try { localStorage.setItem(STORE, JSON.stringify(state.conversations)); }
  catch (e) { state.conversations.splice(0, Math.ceil(state.conversations.length / 4)); } // full: drop the oldest
}
function conv() { return state.conversations.find((c) => c.id === state.current); }
function newConversation() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat",
              mode: currentMode(), messages: [], updated: Date.now() };
  state.conversations.unshift(c);
  state.current = c.id;
  save();
  return c;
}
function loadPrefs() {
  const p = JSON.parse(localStorage.getItem(PREFS) || "{}");
  for (const k of SETTINGS) if (p[k] !== undefined) $(k).value = p[k];
  $("show-probs").checked = !!p.show_probs;
}
function savePrefs() {
  const p = { show_probs: $("show-probs").checked };
  for (const k of SETTINGS) p[k] = $(k).value;
  localStorage.setItem(PREFS, JSON.stringify(p));
}

// ---- the API -----------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h.Authorization = "Bearer " + $("api_key").value;
  return h;
}
async function apiError(res) {
  try { const body = await res.json(); return body.error ? body.error.message : res.statusText; }
  catch (e) { return res.statusText || "request failed"; }
}
// POST and read the server-sent events, calling onData with each parsed object
async function streamPost(path, body, signal, onData) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw new Error(`${res.status}: ${await apiError(res)}`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onData(obj);
      }
    }
  }
}

async function loadModels() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) { setStatus("API key needed (Settings)", false); openSettings(true); return; }
    if (!res.ok) throw new Error(await apiError(res));
    const body = await res.json();
    state.models = body.data.filter((m) => m.kind !== "embedding");
    state.collections = body.collections || [];
    const sel = $("model");
    const keep = sel.value;
    sel.replaceChildren(...state.models.map((m) => {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.id + (m.kind === "completion" ? " (base)" : "");
      return o;
    }));
    if (keep && state.models.some((m) => m.id === keep)) sel.value = keep;
    showAttach();
    $("collection").replaceChildren(...state.collections.map((n) => {
      const o = document.createElement("option"); o.value = o.textContent = n; return o;
    }));
    $("mode-docs").disabled = state.collections.length === 0;
    $("mode-docs").title = state.collections.length ? "Answer from a collection, citing its sources"
      : "No collection is served (start the server with --collection NAME)";
    setStatus(`connected · ${state.models.length} model${state.models.length === 1 ? "" : "s"}`, true);
  } catch (e) { setStatus("server unreachable", false); }
}
function setStatus(text, ok) { const s = $("status"); s.textContent = text; s.className = "status " + (ok ? "ok" : "bad"); }

// ---- rendering ---------------------------------------------------------------------------------
function markdown(text, cite) {
  let src = text;
  if (cite) src = src.replace(/\[(\d{1,2})\]/g, '<a class="cite" data-n="$1">[$1]</a>');
  const html = DOMPurify.sanitize(marked.parse(src, { gfm: true, breaks: false }));
  const div = document.createElement("div");
  div.innerHTML = html;
  div.querySelectorAll("a:not(.cite)").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; });
  return div;
}
function highlight(el) { el.querySelectorAll("pre code").forEach((c) => hljs.highlightElement(c)); }

function probColor(p) {  // red (unlikely) through amber to green (likely), faint enough to read through
  const hue = Math.round(120 * Math.max(0, Math.min(1, p)));
  return `hsla(${hue}, 75%, 50%, 0.28)`;
}
function tokenView(tokens) {
  const div = document.createElement("div");
  div.className = "tokens";
  tokens.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok";
    s.textContent = t.t;
    s.style.background = probColor(Math.exp(t.lp));
    s.dataset.i = i;
    div.appendChild(s);
  });
  div.addEventListener("mousemove", (ev) => {
    const i = ev.target.dataset && ev.target.dataset.i;
    if (i === undefined) { hideTip(); return; }
    showTip(tokens[+i], ev.clientX, ev.clientY);
  });
  div.addEventListener("mouseleave", hideTip);
  return div;
}
function showTip(t, x, y) {
  const tip = $("tooltip");
  const rows = (t.top && t.top.length ? t.top : [[t.t, t.lp]]).map(([tok, lp]) => {
    const r = document.createElement("div");
    r.className = "row" + (tok === t.t ? " chosen" : "");
    const a = document.createElement("span"); a.textContent = JSON.stringify(tok);
    const b = document.createElement("span"); b.textContent = (100 * Math.exp(lp)).toFixed(1) + "%";
    r.append(a, b);
    return r;
  });
  tip.replaceChildren(...rows);
  tip.hidden = false;
  tip.style.left = Math.min(x + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (y + 16) + "px";
}
function hideTip() { $("tooltip").hidden = true; }

function sourcesView(msg) {
  const box = document.createElement("div");
  box.className = "sources";
  (msg.sources || []).forEach((s) => {
    const d = document.createElement("details");
    d.className = "source" + ((msg.cited || []).includes(s.n) ? " cited" : "");
    d.id = `src-${msg.id}-${s.n}`;
    const sum = document.createElement("summary");
    const n = document.createElement("span"); n.className = "n"; n.textContent = `[${s.n}]`;
    sum.append(n, document.createTextNode(` ${s.source}${s.heading ? " › " + s.heading : ""}`));
    const pre = document.createElement("pre"); pre.textContent = s.text;
    d.append(sum, pre);
    box.appendChild(d);
  });
  return box;
}

function bubbleFor(msg, streaming) {
  const b = document.createElement("div");
  b.className = "bubble" + (msg.error ? " error" : "");
  if (msg.role === "user") {
    if (msg.image) { const im = document.createElement("img"); im.src = msg.image; im.className = "thumb"; im.alt = "image"; b.appendChild(im); }
    b.appendChild(document.createTextNode(msg.content));
    return b;
  }
  if (msg.error && !msg.content) { b.textContent = msg.error; return b; }
  if ($("show-probs").checked && msg.tokens && msg.tokens.length) b.appendChild(tokenView(msg.tokens));
  else {
    b.appendChild(markdown(msg.content || "", msg.mode === "docs"));
    if (!streaming) highlight(b);
  }
  if (streaming) b.classList.add("cursor");
  b.addEventListener("click", (ev) => {
    const c = ev.target.closest && ev.target.closest(".cite");
    if (!c) return;
    const el = document.getElementById(`src-${msg.id}-${c.dataset.n}`);
    if (el) { el.open = true; el.scrollIntoView({ behavior: "smooth", block: "nearest" }); }
  });
  return b;
}

function render() {
  const c = conv();
  const box = $("messages");
  box.replaceChildren();
  renderSidebar();
  if (!c || c.messages.length === 0) {
    const e = document.createElement("div");
    e.className = "empty";
    e.innerHTML = currentMode() === "docs"
      ? "<h2>Ask your documents</h2><p>Answers cite the passages they come from.</p>"
      : "<h2>What can I help with?</h2><p>Replies stream from a model running on this machine.</p>";
    box.appendChild(e);
    return;
  }
  c.messages.forEach((m, i) => box.appendChild(messageView(c, m, i)));
  box.scrollTop = box.scrollHeight;
}

function messageView(c, m, i) {
  const wrap = document.createElement("div");
  wrap.className = "msg " + m.role;
  wrap.dataset.index = i;
  const streaming = state.busy && state.busy.message === m;
  wrap.appendChild(bubbleFor(m, streaming));
  if (m.role === "assistant" && m.sources && m.sources.length) wrap.appendChild(sourcesView(m));
  const meta = document.createElement("div");
  meta.className = "meta";
  if (!streaming) {
    if (m.role === "user") meta.appendChild(button("Edit", () => editMessage(c, i), "edit"));
    if (m.role === "assistant" && i === c.messages.length - 1) meta.appendChild(button("Regenerate", () => regenerate(c), "regenerate"));
    if (m.role === "assistant" && m.content) meta.appendChild(button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(m.content), "copy"));
    if (m.note) { const s = document.createElement("span"); s.textContent = m.note; meta.appendChild(s); }
  }
  wrap.appendChild(meta);
  return wrap;
}
function button(label, fn, cls) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.className = cls || ""; b.addEventListener("click", fn);
  return b;
}

let pending = false;
function renderLast() {  // during streaming: redraw only the last message, once per frame
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const c = conv();
    const box = $("messages");
    const last = box.lastElementChild;
    if (!c || !last || !last.dataset.index) { render(); return; }
    const i = c.messages.length - 1;
    const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    last.replaceWith(messageView(c, c.messages[i], i));
    if (near) box.scrollTop = box.scrollHeight;
  });
}

function renderSidebar() {
  const nav = $("conversations");
  nav.replaceChildren(...state.conversations.map((c) => {
    const row = document.createElement("div");
    row.className = "conv" + (c.id === state.current ? " active" : "");
    if (c.mode === "docs") { const tag = document.createElement("b"); tag.className = "tag"; tag.textContent = "docs"; row.appendChild(tag); }
    const t = document.createElement("span");
    t.textContent = c.title;
    row.appendChild(t);
    row.appendChild(button("✕", (ev) => { ev.stopPropagation(); removeConversation(c.id); }, "del"));
    row.title = c.title;
    row.addEventListener("click", () => { if (!state.busy) { state.current = c.id; setMode(c.mode, false); render(); } });
    return row;
  }));
}
function removeConversation(id) {
  if (state.busy) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.conversations.length ? state.conversations[0].id : null;
  save();
  render();
}

// ---- generating --------------------------------------------------------------------------------
function currentMode() { return $("mode-docs").classList.contains("active") ? "docs" : "chat"; }
function setMode(mode, fresh = true) {
  $("mode-chat").classList.toggle("active", mode === "chat");
  $("mode-docs").classList.toggle("active", mode === "docs");
  $("mode-chat").setAttribute("aria-selected", mode === "chat");
  $("mode-docs").setAttribute("aria-selected", mode === "docs");
  $("collection-field").hidden = mode !== "docs";
  const c = conv();
  if (fresh && c && c.mode !== mode) {
    if (c.messages.length) newConversation(); else c.mode = mode;
    render();
  }
}

function sampling() {
  const num = (id) => (($(id).value === "") ? undefined : Number($(id).value));
  const out = { temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens") };
  if (num("repetition_penalty") && num("repetition_penalty") !== 1) out.repetition_penalty = num("repetition_penalty");
  if (num("seed") !== undefined) out.seed = num("seed");
  return out;
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  const c = conv() || newConversation();
  if (c.messages.length === 0) c.title = text.trim().slice(0, 48);
  c.mode = currentMode();
  const m = { role: "user", content: text };
  if (state.image) { m.image = state.image; setImage(null); }
  c.messages.push(m);
  await generate(c);
}

// An attached image goes to the server inline as a data: URI (it never fetches URLs), scaled
// in the browser so that its longer side is at most 256 pixels (the model reads 64x64).
function setImage(uri) {
  state.image = uri;
  const p = $("attach-preview");
  p.hidden = !uri;
  if (uri) p.src = uri; else p.removeAttribute("src");
}
function attachImage(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    const k = Math.min(1, 256 / Math.max(img.width, img.height));
    const cv = document.createElement("canvas");
    cv.width = Math.max(1, Math.round(img.width * k)); cv.height = Math.max(1, Math.round(img.height * k));
    cv.getContext("2d").drawImage(img, 0, 0, cv.width, cv.height);
    URL.revokeObjectURL(url);
    setImage(cv.toDataURL("image/png"));
  };
  img.onerror = () => { URL.revokeObjectURL(url); setStatus("that file is not an image", false); };
  img.src = url;
}

async function generate(c) {
  const msg = { id: Date.now().toString(36), role: "assistant", content: "", tokens: [], mode: c.mode };
  c.messages.push(msg);
  c.updated = Date.now();
  const controller = new AbortController();
  state.busy = { controller, message: msg };
  $("send").hidden = true; $("stop").hidden = false;
  render();
  const t0 = performance.now();
  let usage = null;
  try {
    if (c.mode === "docs") {
      const question = c.messages[c.messages.length - 2].content;
      await streamPost("/v1/rag/ask", { question, model: $("model").value, collection: $("collection").value,
                                        max_tokens: Math.min(sampling().max_tokens || 200, 400), stream: true },
        controller.signal, (obj) => {
          if (obj.delta) msg.content += obj.delta;
          if (obj.sources) { msg.sources = obj.sources; msg.cited = obj.citations; msg.content = obj.answer; }
          renderLast();
        });
    } else {
      const history = c.messages.slice(0, -1).filter((m) => !m.error || m.content)
        .map((m) => ({ role: m.role, content: m.image
          ? [{ type: "image_url", image_url: { url: m.image } }, { type: "text", text: m.content }] : m.content }));
      const system = $("system").value.trim();
      if (system) history.unshift({ role: "system", content: system });
      await streamPost("/v1/chat/completions", { model: $("model").value, messages: history, stream: true,
                                                 logprobs: true, top_logprobs: 5, stream_options: { include_usage: true },
                                                 ...sampling() },
        controller.signal, (obj) => {
          if (obj.usage) usage = obj.usage;
          const ch = obj.choices && obj.choices[0];
          if (!ch) return;
          if (ch.delta && ch.delta.content) msg.content += ch.delta.content;
          if (ch.logprobs && ch.logprobs.content) {
            for (const t of ch.logprobs.content) {
              msg.tokens.push({ t: t.token, lp: t.logprob, top: (t.top_logprobs || []).map((a) => [a.token, a.logprob]) });
            }
          }
          if (ch.finish_reason === "length") msg.note = "stopped at the token limit";
          renderLast();
        });
    }
    const secs = (performance.now() - t0) / 1000;
    if (usage) msg.note = (msg.note ? msg.note + " · " : "") +
      `${usage.completion_tokens} tokens · ${(usage.completion_tokens / secs).toFixed(1)} tok/s`;
  } catch (e) {
    if (e.name === "AbortError") msg.note = "stopped";
    else msg.error = e.message;
  } finally {
    state.busy = null;
    $("send").hidden = false; $("stop").hidden = true;
    save();
    render();
    $("input").focus();
  }
}

function stop() { if (state.busy) state.busy.controller.abort(); }

async function regenerate(c) {
  if (state.busy) return;
  if (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  await generate(c);
}

function editMessage(c, i) {
  if (state.busy) return;
  const wrap = $("messages").querySelector(`.msg[data-index="${i}"]`);
  const box = document.createElement("div");
  box.className = "edit-box";
  const ta = document.createElement("textarea");
  ta.value = c.messages[i].content;
  ta.rows = Math.min(10, ta.value.split("\n").length + 1);
  const row = document.createElement("div");
  row.append(button("Cancel", () => render()), button("Send", async () => {
    c.messages = c.messages.slice(0, i);
    c.messages.push({ role: "user", content: ta.value });
    await generate(c);
  }, "primary"));
  box.append(ta, row);
  wrap.replaceChildren(box);
  ta.focus();
}

// ---- wiring ------------------------------------------------------------------------------------
function openSettings(open) {
  $("settings").hidden = !open;
  $("settings-btn").setAttribute("aria-expanded", open);
}
function autosize() { const t = $("input"); t.style.height = "auto"; t.style.height = Math.min(t.scrollHeight, 220) + "px"; }

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  $("input").value = "";
  autosize();
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("input").addEventListener("input", autosize);
$("stop").addEventListener("click", stop);
function showAttach() {
  const m = (state.models || []).find((x) => x.id === $("model").value);
  $("attach").hidden = !(m && m.vision);
  if ($("attach").hidden) setImage(null);
}
$("model").addEventListener("change", showAttach);
$("image-file").addEventListener("change", (ev) => { attachImage(ev.target.files[0]); ev.target.value = ""; });
$("attach-preview").addEventListener("click", () => setImage(null));
$("new-chat").addEventListener("click", () => { if (!state.busy) { newConversation(); render(); $("input").focus(); } });
$("mode-chat").addEventListener("click", () => setMode("chat"));
$("mode-docs").addEventListener("click", () => setMode("docs"));
$("settings-btn").addEventListener("click", () => openSettings($("settings").hidden));
$("show-probs").addEventListener("change", () => { savePrefs(); render(); });
for (const k of SETTINGS) $(k).addEventListener("change", () => { savePrefs(); if (k === "api_key") loadModels(); });

marked.setOptions({ gfm: true });
loadPrefs();
state.current = state.conversations.length ? state.conversations[0].id : null;
if (conv()) setMode(conv().mode, false);
render();
loadModels();
setInterval(() => fetch("/health").then((r) => r.ok || setStatus("server unreachable", false))
  .catch(() => setStatus("server unreachable", false)), 15000);
$("input").focus();
