// clipforge search page: vanilla JS against the JSON API (POST /search, GET /items/{id}).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { maxK: 100, contextLength: 77, auth: false };
const TOKEN_KEY = "clipforge-token";

// A server started with --auth-token-file wants "Authorization: Bearer <token>" on every call but
// /health (and this page). The token is asked for once and kept in sessionStorage (this tab only).
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders(headers = {}) {
  const t = token();
  return t ? { ...headers, Authorization: `Bearer ${t}` } : headers;
}

function askToken(message) {
  $("token-form").hidden = false;
  if (message) setStatus(message, true);
  $("token").focus();
}

// <img src> cannot carry a header: with a token, thumbnails are fetched and shown as blob URLs.
async function setImage(img, url) {
  if (!state.auth) { img.src = url; return; }
  try {
    const resp = await fetch(url, { headers: authHeaders() });
    if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
  } catch (e) { /* the card keeps its text */ }
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function showQuery(label, thumbUrl) {
  $("query-box").hidden = false;
  $("query-label").textContent = label;
  const img = $("query-thumb");
  if (thumbUrl) { img.src = thumbUrl; img.hidden = false; } else { img.hidden = true; img.removeAttribute("src"); }
}

function k() { return Math.min(parseInt($("k").value, 10) || 10, state.maxK); }

async function callSearch(body, isForm) {
  const opts = { method: "POST", body: isForm ? body : JSON.stringify(body),
                 headers: authHeaders(isForm ? {} : { "Content-Type": "application/json" }) };
  setStatus("searching…");
  document.body.classList.add("busy");
  try {
    const resp = await fetch("/search", opts);
    let data = null;
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (resp.status === 401) {
      state.auth = true;
      askToken(token() ? "Error: the server refused this token; enter the right one." : "This server needs its access token.");
      return;
    }
    if (!resp.ok) {
      const msg = data && data.detail ? data.detail : `HTTP ${resp.status}`;
      setStatus(`Error: ${msg}`, true);
      return;
    }
    render(data);
  } catch (e) {
    setStatus(`Network error: ${e.message}`, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

function render(data) {
  const grid = $("results");
  grid.replaceChildren();
  for (const r of data.results) {
    const card = document.createElement(r.image_url ? "button" : "div");
    card.className = "card";
    card.dataset.id = r.id;
    if (r.image_url) {
      card.type = "button";
      card.title = `Search by this image (id ${r.id})`;
      const img = document.createElement("img");
      img.loading = "lazy";
      setImage(img, r.image_url);
      img.alt = r.caption || r.key || `item ${r.id}`;
      card.append(img);
      card.addEventListener("click", () => searchByItem(r));
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = r.key || `#${r.id}`;
    meta.append(score, key);
    card.append(meta);
    if (r.caption) {
      const cap = document.createElement("p");
      cap.className = "caption";
      cap.textContent = r.caption;
      card.append(cap);
    }
    grid.append(card);
  }
  const n = data.results.length;
  const q = data.query || {};
  const cut = q.truncated_from_tokens ? ` (query cut to its first ${state.contextLength} of ${q.truncated_from_tokens} tokens)` : "";
  setStatus((n ? `${n} result${n === 1 ? "" : "s"} in ${data.took_ms.toFixed(0)} ms` : "No results.") + cut);
}

function searchText(text) {
  text = text.trim();
  if (!text) { setStatus("Type a query first.", true); return; }
  showQuery(`“${text}”`, null);
  callSearch({ text, k: k() }, false);
}

function searchByItem(r) {
  $("query").value = "";
  showQuery(r.caption ? `${r.key}: ${r.caption}` : (r.key || `item ${r.id}`), r.image_url);
  window.scrollTo({ top: 0, behavior: "smooth" });
  callSearch({ item_id: r.id, k: k() }, false);
}

function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", String(k()));
  $("query").value = "";
  showQuery(file.name, URL.createObjectURL(file));
  callSearch(form, true);
}

$("text-form").addEventListener("submit", (ev) => { ev.preventDefault(); searchText($("query").value); });
$("image-input").addEventListener("change", (ev) => { searchImage(ev.target.files[0]); ev.target.value = ""; });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); searchImage(ev.dataTransfer.files[0]); });

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("token").value = "";
  $("token-form").hidden = true;
  setStatus("Token set for this tab.");
});

fetch("/health").then((r) => r.json()).then((h) => {
  state.maxK = h.max_k || 100;
  state.auth = !!h.auth;
  if (state.auth && !token()) askToken();
  const recall = h.index.recall_at_10 == null ? "" : `, recall@10 ${h.index.recall_at_10.toFixed(3)}`;
  $("info").textContent = `${h.items.toLocaleString()} ${h.kind === "text" ? "texts" : "images"} · model ${h.model || "?"} · ${h.index.factory} index${recall}`;
}).catch(() => { $("info").textContent = "service unreachable"; });
