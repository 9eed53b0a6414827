"use strict";
// The status page's script: token, buttons, refresh, test box. Plain browser JavaScript, no library.
(() => {
  const TOKEN_KEY = "edgeloader-token";
  const REFRESH_MS = 3000;
  const $ = (id) => document.getElementById(id);
  const state = $("state"), message = $("message"), tokenInput = $("token"), tokenState = $("token-state");

  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
  const withToken = (headers = {}) => (token() ? { ...headers, Authorization: "Bearer " + token() } : headers);

  function say(text, isError = false) {
    message.textContent = text;
    message.className = isError ? "error" : "";
  }

  function showTokenState(refused = false) {
    if (refused) tokenState.textContent = token() ? "token refused" : "token needed";
    else tokenState.textContent = token() ? "token set for this tab" : "";
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error) return body.error.message;
    } catch (_) { /* not JSON */ }
    return "HTTP " + resp.status;
  }

  let lastState = state.innerHTML;
  async function refresh() {
    try {
      const resp = await fetch("/?part=state", { headers: withToken(), cache: "no-store" });
      if (resp.ok || resp.status === 401) {
        const html = await resp.text();
        if (html !== lastState) { state.innerHTML = html; lastState = html; }
        showTokenState(resp.status === 401);
      }
    } catch (_) {
      tokenState.textContent = "the device does not answer";
    }
  }

  async function post(url, button, done) {
    if (button) button.disabled = true;
    say("Working…");
    try {
      const resp = await fetch(url, { method: "POST", headers: withToken() });
      if (resp.ok) {
        const body = await resp.json();
        const active = body.active || {};
        say(done + ": " + active.name + " " + active.version + " is active.");
      } else {
        if (resp.status === 401) { showTokenState(true); tokenInput.focus(); }
        say(await errorText(resp), true);
      }
    } catch (err) {
      say("The device did not answer: " + err, true);
    } finally {
      if (button) button.disabled = false;
      await refresh();
    }
  }

  document.addEventListener("click", (ev) => {
    const target = ev.target;
    if (!(target instanceof HTMLButtonElement)) return;
    if (target.classList.contains("activate")) {
      const name = encodeURIComponent(target.dataset.name), version = encodeURIComponent(target.dataset.version);
      post(`/models/${name}/${version}/activate`, target, "Activated");
    } else if (target.id === "rollback") {
      post("/models/rollback", target, "Rolled back");
    }
  });

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = tokenInput.value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
    tokenInput.value = "";
    showTokenState();
    refresh();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    refresh();
  });

  // -- the test box -------------------------------------------------------------------------------
  const drop = $("drop"), input = $("image"), figure = $("figure"), img = $("annotated"), found = $("found");
  let shownUrl = null;

  function describe(det) {
    const b = det.box;
    return `${det.label} ${det.score.toFixed(2)} at (${Math.round(b.xmin)}, ${Math.round(b.ymin)})–` +
      `(${Math.round(b.xmax)}, ${Math.round(b.ymax)})`;
  }

  async function send(file) {
    if (!file) return;
    figure.dataset.state = "busy";
    say("Sending " + file.name + "…");
    const options = { method: "POST", body: file, headers: withToken({ "Content-Type": file.type || "application/octet-stream" }) };
    try {
      const [picture, detections] = await Promise.all([fetch("/annotate", options), fetch("/detect", options)]);
      if (!picture.ok) { figure.dataset.state = "error"; say(await errorText(picture), true); return; }
      const blob = await picture.blob();
      const body = detections.ok ? await detections.json() : null;
      if (shownUrl) URL.revokeObjectURL(shownUrl);
      shownUrl = URL.createObjectURL(blob);
      img.onload = () => { figure.dataset.state = "done"; };
      img.src = shownUrl;
      figure.hidden = false;
      const list = body ? body.detections : [];
      found.textContent = "";
      const head = document.createElement("div");
      head.textContent = body
        ? `${list.length} found by ${body.model.name} ${body.model.version} in ${Object.values(body.timing_ms || {}).reduce((a, b) => a + b, 0).toFixed(1)} ms`
        : picture.headers.get("X-Detections") + " found";
      found.appendChild(head);
      const ul = document.createElement("ul");
      for (const det of list) {
        const li = document.createElement("li");
        li.textContent = describe(det);
        ul.appendChild(li);
      }
      found.appendChild(ul);
      say("");
    } catch (err) {
      figure.dataset.state = "error";
      say("The device did not answer: " + err, true);
    }
  }

  input.addEventListener("change", () => send(input.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (ev) => send(ev.dataTransfer.files[0]));
  // A file dropped beside the box must not make the browser leave the page to show it.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());

  showTokenState();
  if (document.body.dataset.tokenNeeded === "true" && token()) refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
})();
