// The moon-rl search page: a text box and a photo drop zone -> POST /search -> a grid of product images.
// Plain JS, no build step. When every result image has loaded, <body data-state="rendered"
// data-images-loaded="N"> says so (the browser test waits for it); a failed image or request sets "error".
"use strict";

const $ = (id) => document.getElementById(id);
const page = { image: null, health: null, objectUrls: [] };

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message || "";
}

function apiHeaders() {
  const key = $("key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...apiHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

// --------------------------------------------------------------------------------------------- the query
function chooseImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setState("error", `${file.name} is not an image`);
    return;
  }
  page.image = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").textContent = file.name;
  $("clear-image").hidden = false;
  search();
}

function clearImage() {
  page.image = null;
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("drop-text").textContent = "drop a photo here, or click to choose one";
  $("clear-image").hidden = true;
  $("file").value = "";
}

async function search(productId) {
  const text = $("q").value.trim();
  if (!productId && !text && !page.image) {
    setState("idle", "type a query or drop a photo");
    return;
  }
  if (!productId && location.hash) {
    history.replaceState(null, "", location.pathname + location.search);  // so "more like this" works again
  }
  const form = new FormData();
  if (productId) {
    form.append("product_id", productId);
  } else {
    if (text) form.append("text", text);
    if (page.image) form.append("image", page.image, page.image.name || "query.png");
    form.append("mode", $("mode").value);
  }
  form.append("k", $("k").value);
  const what = productId ? `more like ${productId}` : [text && `"${text}"`, page.image && "the photo"].filter(Boolean).join(" + ");
  setState("loading", `searching ${what}…`);
  const started = performance.now();
  try {
    const body = await (await api("/search", { method: "POST", body: form })).json();
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    showChain(body.chain);
    const loaded = await showResults(body.results);
    setState("rendered", `${body.results.length} products for ${what} (${body.mode} mode, ${seconds}s)`);
    document.body.dataset.imagesLoaded = String(loaded);
  } catch (error) {
    setState("error", error.message);
  }
}

// --------------------------------------------------------------------------------------------- the results
function showChain(chain) {
  $("chain").hidden = !chain;
  $("chain-text").textContent = chain || "";
}

function loadImage(img, url) {
  // Resolves once the browser has decoded the picture; an image with no pixels counts as a failure.
  return new Promise((resolve, reject) => {
    img.addEventListener("load", () => (img.naturalWidth > 0 ? resolve() : reject(new Error(`empty image ${url}`))));
    img.addEventListener("error", () => reject(new Error(`image ${url} did not load`)));
    if (!$("key").value.trim()) {
      img.src = url;
      return;
    }
    // An <img> cannot send the API key header: fetch the bytes with it and show them from a blob URL.
    api(url).then((r) => r.blob()).then((blob) => {
      const objectUrl = URL.createObjectURL(blob);
      page.objectUrls.push(objectUrl);
      img.src = objectUrl;
    }, reject);
  });
}

function card(hit, pending) {
  const item = document.createElement("article");
  item.className = "card";
  item.dataset.id = hit.id;
  if (hit.image_url) {
    const img = document.createElement("img");
    img.alt = hit.title || hit.id;
    img.loading = "eager";
    pending.push(loadImage(img, hit.image_url));
    item.append(img);
  } else {
    const none = document.createElement("div");
    none.className = "noimage";
    none.textContent = "no image";
    item.append(none);
  }
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = hit.title || "(not in the catalogue)";
  const meta = document.createElement("div");
  meta.className = "meta";
  const id = document.createElement("span");
  id.textContent = `#${hit.rank} ${hit.id}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  meta.append(id, score);
  const more = document.createElement("a");
  more.className = "more";
  more.href = `#more=${encodeURIComponent(hit.id)}`;
  more.textContent = "more like this";
  item.append(title, meta, more);
  return item;
}

async function showResults(results) {
  page.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  page.objectUrls = [];
  delete document.body.dataset.imagesLoaded;
  const pending = [];
  $("results").replaceChildren(...results.map((hit) => card(hit, pending)));
  await Promise.all(pending);
  return pending.length;
}

// --------------------------------------------------------------------------------------------- wiring
function runFromLocation() {
  const more = new URLSearchParams(location.hash.slice(1)).get("more");
  if (more) {
    // The form shows what is being searched: a product, not the last text or photo.
    clearImage();
    $("q").value = "";
    search(more);
    return;
  }
  const q = new URLSearchParams(location.search).get("q");
  if (q) {
    $("q").value = q;
    search();
  }
}

async function start() {
  try {
    page.health = await (await fetch("/health")).json();
    const h = page.health;
    $("info").textContent = `${h.products} products · dim ${h.dim} · index built in ${h.mode} mode`;
    $("mode").value = h.mode;
    $("key-label").hidden = !h.auth;
    $("key").value = sessionStorage.getItem("moon-rl-key") || "";
  } catch (error) {
    setState("error", `the service does not answer: ${error.message}`);
    return;
  }
  $("query").addEventListener("submit", (event) => { event.preventDefault(); search(); });
  $("file").addEventListener("change", () => chooseImage($("file").files[0]));
  $("clear-image").addEventListener("click", () => { clearImage(); search(); });
  $("key").addEventListener("change", () => sessionStorage.setItem("moon-rl-key", $("key").value.trim()));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseImage(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
  window.addEventListener("hashchange", runFromLocation);
  document.body.dataset.ready = "true";
  runFromLocation();
}

start();
