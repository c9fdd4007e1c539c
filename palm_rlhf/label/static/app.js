// The ranking page of `palm-rlhf label`. Plain JS, no dependencies.
// Model output is untrusted: every piece of it is set with textContent, never as HTML.
"use strict";

const FLAGS = ["harmful", "off-topic", "broken"];
const LETTERS = "ABCDEFGHI";
const state = {
  labeler: localStorage.getItem("palm_rlhf_labeler") || "",
  task: null,      // {task_id, prompt, responses: [{id, text}], display_order}
  tiers: [],       // best first; each tier an array of response ids (indices into the task's responses)
  flags: {},       // response id -> Set of flag names
  touched: false,  // the labeler changed the initial order
  warned: false,   // the untouched-order warning was shown once
  shownAt: 0,
  busy: false,
  pending: null,   // {key, id}: a submit that may have reached the server; retried under its id
  refresh: 0,      // timer of the "more tasks are being sampled" check
  confirmDone: false,
};

const $ = (id) => document.getElementById(id);

function newId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // works on plain http too, unlike crypto.randomUUID
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function api(method, path, body) {
  // Retried on network errors only: every write carries a submission id, so a retry after a
  // lost reply is answered without writing twice.
  for (let attempt = 0; ; attempt++) {
    try {
      const response = await fetch(path, {
        method,
        headers: body ? { "Content-Type": "application/json" } : {},
        body: body ? JSON.stringify(body) : undefined,
        credentials: "same-origin",
      });
      const data = await response.json();
      if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), { http: true });
      return data;
    } catch (error) {
      if (error.http || attempt >= 4) throw error;
      await new Promise((resolve) => setTimeout(resolve, 300 * (attempt + 1)));
    }
  }
}

function show(id, visible) { $(id).hidden = !visible; }

function message(id, text) {
  $(id).textContent = text || "";
  show(id, Boolean(text));
}

function renderProgress(p) {
  if (!p) return;
  $("progress").textContent =
    `You: ${p.labeler_done} / ${p.labeler_total} tasks · everyone: ${p.overall_done} / ${p.overall_total}`;
}

// ------------------------------------------------------------------ ranking model

function tierOf(id) { return state.tiers.findIndex((tier) => tier.includes(id)); }

function removeId(id) {
  // In place: the tier arrays keep their identity, so a tier looked up before still is found.
  for (const tier of state.tiers) {
    const at = tier.indexOf(id);
    if (at >= 0) tier.splice(at, 1);
  }
  state.tiers = state.tiers.filter((tier) => tier.length);
}

function alone(id, tier) { return tier && tier.length === 1 && tier[0] === id; }

function moveToTier(id, index) {         // join tier `index` (a tie when it is not empty)
  const target = state.tiers[index];
  if (alone(id, target)) return;         // dropped back where it was
  removeId(id);
  const at = state.tiers.indexOf(target);
  if (at >= 0) state.tiers[at].push(id); else state.tiers.push([id]);
  changed(id);
}

function insertAsTier(id, index) {        // a tier of its own before position `index`
  const before = state.tiers[index];
  if (alone(id, before)) return;         // a tier of its own already, right there
  removeId(id);
  let at = before ? state.tiers.indexOf(before) : state.tiers.length;
  if (at < 0) at = state.tiers.length;
  state.tiers.splice(at, 0, [id]);
  changed(id);
}

function moveBy(id, step) {
  const index = tierOf(id);
  if (state.tiers[index].length > 1) {    // tied: step out of the tie, above or below it
    insertAsTier(id, step < 0 ? index : index + 1);
  } else {
    const other = index + step;
    if (other < 0 || other >= state.tiers.length) return;
    [state.tiers[index], state.tiers[other]] = [state.tiers[other], state.tiers[index]];
    changed(id);
  }
}

function changed(focusId) {
  state.touched = true;
  message("warning", "");
  render(focusId);
}

function rankingPayload() {
  return state.tiers.map((tier) => (tier.length === 1 ? tier[0] : tier.slice().sort((a, b) => a - b)));
}

// ------------------------------------------------------------------ rendering

function label(id) { return LETTERS[state.task.display_order.indexOf(id)]; }

function card(response) {
  const el = document.createElement("div");
  el.className = "card";
  el.tabIndex = 0;
  el.dataset.id = String(response.id);
  el.setAttribute("aria-label", `Response ${label(response.id)}`);
  const head = document.createElement("div");
  head.className = "card-head";
  const handle = document.createElement("span");
  handle.className = "handle";
  handle.textContent = `⠿ ${label(response.id)}`;
  handle.title = "drag to rank";
  handle.addEventListener("pointerdown", (event) => startDrag(event, el, response.id));
  head.append(handle);
  const flags = document.createElement("span");
  flags.className = "flags";
  for (const name of FLAGS) {
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = state.flags[response.id].has(name);
    box.dataset.flag = name;
    box.addEventListener("change", () => {
      if (box.checked) state.flags[response.id].add(name); else state.flags[response.id].delete(name);
    });
    const tag = document.createElement("label");
    tag.append(box, document.createTextNode(` ${name}`));
    flags.append(tag);
  }
  head.append(flags);
  const text = document.createElement("pre");
  text.className = "response-text";
  text.textContent = response.text;   // untrusted: text, never HTML
  el.append(head, text);
  if (response.text.split("\n").length > 14 || response.text.length > 900) {
    text.classList.add("clamp");
    const expand = document.createElement("button");
    expand.type = "button";
    expand.className = "expand";
    expand.textContent = "show all";
    expand.addEventListener("click", () => {
      const clamped = text.classList.toggle("clamp");
      expand.textContent = clamped ? "show all" : "show less";
    });
    el.append(expand);
  }
  el.addEventListener("keydown", (event) => onCardKey(event, response.id));
  return el;
}

function gap(index) {
  const el = document.createElement("li");
  el.className = "gap";
  el.dataset.gap = String(index);
  el.setAttribute("aria-hidden", "true");
  return el;
}

function render(focusId) {
  const list = $("ranks");
  list.replaceChildren();
  const byId = new Map(state.task.responses.map((r) => [r.id, r]));
  state.tiers.forEach((tier, index) => {
    list.append(gap(index));
    const row = document.createElement("li");
    row.className = "rank";
    row.dataset.rank = String(index);
    const name = document.createElement("div");
    name.className = "rank-label" + (tier.length > 1 ? " tie" : "");
    name.textContent = `Rank ${index + 1}`;
    const cards = document.createElement("div");
    cards.className = "cards";
    for (const id of tier) cards.append(card(byId.get(id)));
    row.append(name, cards);
    list.append(row);
  });
  list.append(gap(state.tiers.length));
  if (focusId !== undefined) {
    const el = list.querySelector(`.card[data-id="${focusId}"]`);
    if (el) el.focus();
  }
}

// ------------------------------------------------------------------ drag and drop (mouse and touch)

function dropTarget(x, y) {
  const el = document.elementFromPoint(x, y);
  return el ? el.closest(".rank, .gap") : null;
}

function startDrag(event, el, id) {
  event.preventDefault();
  const startX = event.clientX, startY = event.clientY;
  let dragging = false, target = null;
  // Listening on window, not the handle: the dragged card ignores the pointer (so that
  // elementFromPoint sees what is under it), and touch moves may leave the handle.
  const move = (e) => {
    if (!dragging && Math.hypot(e.clientX - startX, e.clientY - startY) < 4) return;
    dragging = true;
    el.classList.add("dragging");
    el.style.transform = `translate(${e.clientX - startX}px, ${e.clientY - startY}px)`;
    const next = dropTarget(e.clientX, e.clientY);
    if (next !== target) {
      if (target) target.classList.remove("target");
      target = next;
      if (target) target.classList.add("target");
    }
  };
  const end = () => {
    window.removeEventListener("pointermove", move);
    window.removeEventListener("pointerup", end);
    window.removeEventListener("pointercancel", end);
    el.classList.remove("dragging");
    el.style.transform = "";
    if (!dragging || !target) return;
    if (target.dataset.gap !== undefined) insertAsTier(id, Number(target.dataset.gap));
    else moveToTier(id, Number(target.dataset.rank));
  };
  window.addEventListener("pointermove", move);
  window.addEventListener("pointerup", end);
  window.addEventListener("pointercancel", end);
}

// ------------------------------------------------------------------ keyboard

function onCardKey(event, id) {
  if (event.target.tagName === "INPUT" || event.target.tagName === "BUTTON") return;
  if (/^[1-9]$/.test(event.key)) {
    const rank = Number(event.key) - 1;
    removeId(id);
    state.tiers.splice(Math.min(rank, state.tiers.length), 0, [id]);
    changed(id);
  } else if (event.key === "ArrowUp") moveBy(id, -1);
  else if (event.key === "ArrowDown") moveBy(id, 1);
  else if (event.key === "t" || event.key === "T") {
    const index = tierOf(id);
    if (index > 0) moveToTier(id, index - 1);
  } else return;
  event.preventDefault();
}

document.addEventListener("keydown", (event) => {
  const tag = event.target.tagName;
  if (event.key === "Enter" && !state.busy && !$("task").hidden && tag !== "BUTTON" && tag !== "INPUT") {
    event.preventDefault();
    submit(false);
  }
});

// ------------------------------------------------------------------ the task cycle

function showTask(data) {
  clearTimeout(state.refresh);
  state.pending = null;
  state.confirmDone = false;
  renderProgress(data.progress);
  message("error", "");
  message("warning", "");
  state.task = data.task;
  if (!state.task) {
    show("task", false);
    show("finished", true);
    const sampling = data.progress && data.progress.sampling;
    $("finished-text").textContent = sampling
      ? "More tasks are being sampled; this page checks again every few seconds."
      : "No tasks are left for you. Thank you!";
    if (sampling) state.refresh = setTimeout(loadNext, 3000);
    return;
  }
  show("finished", false);
  show("task", true);
  $("prompt").textContent = state.task.prompt;  // untrusted text
  state.tiers = state.task.display_order.map((id) => [id]);
  state.flags = Object.fromEntries(state.task.display_order.map((id) => [id, new Set()]));
  state.touched = false;
  state.warned = false;
  state.shownAt = performance.now();
  render();
  const first = $("ranks").querySelector(".card");
  if (first) first.focus();
}

async function loadNext() {
  clearTimeout(state.refresh);
  try {
    showTask(await api("GET", `/api/next?labeler=${encodeURIComponent(state.labeler)}`));
  } catch (error) {
    message("error", `Could not load a task: ${error.message}`);
  }
}

async function submit(notRankable) {
  if (!state.task || state.busy) return;
  if (!notRankable && !state.touched && !state.warned) {
    state.warned = true;
    message("warning", "You have not changed the order. Submit again to send it as it is, or rank the responses first.");
    return;
  }
  state.busy = true;
  const ranking = notRankable ? [] : rankingPayload();
  const flags = state.task.responses.map((_, i) => Array.from(state.flags[i]).sort());
  // The same answer keeps its submission id until it is saved: if an attempt reached the
  // server but its reply was lost, clicking again is a retry, not a second ranking.
  const key = JSON.stringify([state.task.task_id, ranking, notRankable, flags]);
  if (!state.pending || state.pending.key !== key) state.pending = { key, id: newId() };
  const body = {
    submission_id: state.pending.id,
    task_id: state.task.task_id,
    labeler: state.labeler,
    ranking,
    not_rankable: notRankable,
    flags,
    duration_s: (performance.now() - state.shownAt) / 1000,
  };
  try {
    await api("POST", "/api/submit", body);
    await loadNext();
  } catch (error) {
    message("error", `Not saved: ${error.message}`);
  } finally {
    state.busy = false;
  }
}

async function post(path, body) {
  try {
    return await api("POST", path, body);
  } catch (error) {
    message("error", error.message);
    return null;
  }
}

async function undo() {
  if (await post("/api/undo", { labeler: state.labeler, submission_id: newId() })) await loadNext();
}

async function skip() {
  if (state.task && (await post("/api/skip", { labeler: state.labeler, task_id: state.task.task_id }))) await loadNext();
}

async function done() {
  if (!state.confirmDone) {  // it ends the session for every labeler, so ask twice
    state.confirmDone = true;
    const text = "This ends labeling for everyone on this server. Press 'Done labeling' again to confirm.";
    if (state.task) message("warning", text); else $("finished-text").textContent = text;
    return;
  }
  const progress = await post("/api/done", {});
  if (progress) {
    show("task", false);
    show("finished", true);
    $("finished-text").textContent = "Labeling is marked done; you can close this page.";
  }
}

function askName() {
  show("task", false);
  show("who", false);
  show("name-form", true);
  $("name-input").value = state.labeler;
  $("name-input").focus();
}

function saveName() {
  const name = $("name-input").value.trim();
  if (!name) return;
  state.labeler = name;
  localStorage.setItem("palm_rlhf_labeler", name);
  show("name-form", false);
  $("who-name").textContent = name;
  show("who", true);
  loadNext();
}

$("name-save").addEventListener("click", saveName);
$("name-input").addEventListener("keydown", (event) => { if (event.key === "Enter") saveName(); });
$("change-name").addEventListener("click", askName);
$("submit").addEventListener("click", () => submit(false));
$("not-rankable").addEventListener("click", () => submit(true));
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
$("undo-finished").addEventListener("click", undo);
$("done").addEventListener("click", done);
$("done-finished").addEventListener("click", done);

if (state.labeler) {
  $("who-name").textContent = state.labeler;
  show("who", true);
  loadNext();
} else {
  askName();
}
