// The search page: plain DOM, no framework. Text from the server is inserted with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
let health = null;

function setBusy(busy) {
  $("search-btn").disabled = busy;
  $("upload-btn").disabled = busy;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function fetchJSON(url, options) {
  const resp = await fetch(url, options);
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    throw new Error((body && body.error) || `request failed (${resp.status})`);
  }
  return body;
}

function card(hit) {
  const el = document.createElement("article");
  el.className = `card ${hit.target === "captions" ? "caption" : "image"}`;
  el.dataset.id = hit.id;
  if (hit.image_url) {
    const box = document.createElement("a");
    box.className = "thumb";
    box.href = hit.image_url;
    box.target = "_blank";
    box.rel = "noopener";  // the index's JPEG thumbnail, opened on its own: no handle back to this page
    const img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = hit.text || hit.image_id;
    img.loading = "lazy";
    img.addEventListener("load", () => { if (img.naturalWidth < 128) img.classList.add("small"); });
    box.appendChild(img);
    el.appendChild(box);
  }
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `score ${hit.score.toFixed(3)}`;
  meta.append(rank, score);
  body.appendChild(meta);
  if (hit.text) {
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = hit.target === "captions" ? `\u201c${hit.text}\u201d` : hit.text;
    body.appendChild(text);
  }
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = hit.target === "captions" ? `caption of image ${hit.image_id}` : `image ${hit.id}`;
  body.appendChild(id);
  el.appendChild(body);
  return el;
}

function render(hits, summary) {
  const grid = $("results");
  grid.replaceChildren(...hits.map(card));
  $("status").textContent = summary;
}

async function searchText(query, k) {
  showError("");
  setBusy(true);
  try {
    const params = new URLSearchParams({ q: query, k: String(k) });
    const res = await fetchJSON(`/search?${params}`);
    render(res.results, `${res.results.length} images for \u201c${res.query}\u201d (${res.took_ms} ms)`);
    history.replaceState(null, "", `/?${params}`);
  } catch (err) {
    render([], "");
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

async function searchImage(file, target, k) {
  showError("");
  setBusy(true);
  try {
    const form = new FormData();
    form.append("file", file);
    form.append("target", target);
    form.append("k", String(k));
    const res = await fetchJSON("/search/image", { method: "POST", body: form });
    const hits = res.results[target] || [];
    const what = target === "captions" ? "captions" : "similar images";
    render(hits, `${hits.length} ${what} for ${file.name} (${res.took_ms} ms)`);
  } catch (err) {
    render([], "");
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

async function init() {
  try {
    health = await fetchJSON("/health");
    const h = health;
    $("facts").textContent = `${h.images} images \u00b7 ${h.captions} captions \u00b7 ${h.kind} index \u00b7 ` +
      `${h.similarity} similarity \u00b7 ${h.dim}-d`;
    $("q").maxLength = h.limits.max_query_chars;
    for (const opt of [...$("k").options]) {
      if (Number(opt.value) > h.limits.max_k) opt.remove();
    }
    if (!h.has_captions) $("target").value = "images";
    if (!h.has_captions) $("target").querySelector('option[value="captions"]').disabled = true;
    if (!h.can_embed_images) $("image-form").hidden = true;
  } catch (err) {
    $("facts").textContent = "";
    showError(`cannot reach the search server: ${err.message}`);
  }

  $("text-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("q").value.trim();
    if (q) searchText(q, $("k").value);
  });
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    $("file-label").textContent = f ? f.name : "Choose an image\u2026";
    const preview = $("preview");
    if (f) { preview.src = URL.createObjectURL(f); preview.hidden = false; } else { preview.hidden = true; }
  });
  $("image-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = $("file").files[0];
    if (!f) { showError("choose an image first"); return; }
    if (health && f.size > health.limits.max_upload_bytes) {
      showError(`the image is larger than the limit of ${health.limits.max_upload_bytes} bytes`);
      return;
    }
    searchImage(f, $("target").value, $("k").value);
  });

  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    $("q").value = params.get("q");
    if (params.get("k")) $("k").value = params.get("k");
    searchText(params.get("q"), $("k").value);
  }
}

document.addEventListener("DOMContentLoaded", init);
