// The web playground (served by serving/api/ui.py): limits from /info, generation streamed from /generate_stream,
// per-token log-probabilities from /score. Plain browser JavaScript, no dependencies.
// Everything the server sends is shown as text (textContent), never parsed as HTML: the model can write <script>.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "gpt2-api-key"; // sessionStorage only: the key is gone when the tab closes
const MAX_SEED = (1n << 64n) - 1n;
const MAX_STOP_CHARS = 512;
const LOGPROB_FLOOR = -8; // the red end of the color scale
const state = { info: null, controller: null, scored: [] };

class AuthNeeded extends Error {}

// ---- API calls ------------------------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, { body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  const resp = await fetch(path, {
    method: body === undefined ? "GET" : "POST", headers, body, signal, cache: "no-store",
  });
  if (resp.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    askForKey(key ? "That key was refused: enter another." : "This server needs an API key.");
    throw new AuthNeeded("API key needed");
  }
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp;
}

// TGI bodies say {"error": "...", "error_type"}; OpenAI and /health say {"error": {"message"}}.
async function errorText(resp) {
  let text = await resp.text();
  try {
    const e = JSON.parse(text).error;
    text = typeof e === "string" ? e : (e && e.message) || text;
  } catch (_) { /* not JSON: show it as it came */ }
  return `${resp.status}: ${text}`;
}

// ---- API key --------------------------------------------------------------------------------------------------

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-view").hidden = false;
  document.querySelector("main").hidden = true;
  document.querySelector(".tabs").hidden = true;
  $("key-input").value = "";
  $("key-input").focus();
}

function useKey(ev) {
  ev.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  $("key-view").hidden = true;
  document.querySelector("main").hidden = false;
  document.querySelector(".tabs").hidden = false;
  loadInfo();
}

// ---- limits from /info ----------------------------------------------------------------------------------------

async function loadInfo() {
  try {
    const info = await (await api("/info")).json();
    state.info = info;
    applyLimits(info);
    if (info.state === "ready") {
      banner(null);
    } else {
      banner(`The model is ${info.state}${info.last_error ? ": " + info.last_error : ""}; retrying...`);
      setTimeout(loadInfo, 2000);
    }
  } catch (e) {
    if (e instanceof AuthNeeded) return;
    banner("Cannot read /info: " + e.message + "; retrying...");
    setTimeout(loadInfo, 3000);
  }
}

function applyLimits(info) {
  $("model").textContent = `${info.model_id} · ${info.model_dtype} · ${info.max_total_tokens} tokens`;
  const maxNew = $("max_new_tokens");
  maxNew.max = String(info.max_total_tokens - 1);
  if (Number(maxNew.value) > info.max_total_tokens - 1) maxNew.value = String(info.max_total_tokens - 1);
  $("limits").textContent = `(prompt + new tokens ≤ ${info.max_total_tokens})`;
  $("stop").dataset.max = String(info.max_stop_sequences);
  $("stop-limit").textContent = `(at most ${info.max_stop_sequences}, one per line, \\n = newline)`;
  const topN = $("top_n");
  topN.max = String(info.max_top_n_tokens);
  if (Number(topN.value) > info.max_top_n_tokens) topN.value = String(info.max_top_n_tokens);
}

function banner(text) {
  $("banner").textContent = text || "";
  $("banner").hidden = !text;
}

// ---- form values ----------------------------------------------------------------------------------------------

function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function stopStrings() {
  const unescape = (s) => s.replace(/\\(n|t|\\)/g, (_, c) => (c === "n" ? "\n" : c === "t" ? "\t" : "\\"));
  return $("stop").value.split("\n").map((s) => s.replace(/\r$/, "")).filter((s) => s !== "").map(unescape);
}

function validate(form) {
  const stop = $("stop");
  const stops = stopStrings();
  const maxStops = Number(stop.dataset.max || 4);
  stop.setCustomValidity(
    stops.length > maxStops ? `At most ${maxStops} stop strings` :
    stops.some((s) => s.length > MAX_STOP_CHARS) ? `A stop string has at most ${MAX_STOP_CHARS} characters` : "");
  const seed = $("seed");
  seed.setCustomValidity(/^\d*$/.test(seed.value) && (seed.value === "" || BigInt(seed.value) <= MAX_SEED)
    ? "" : `The seed is an integer in [0, ${MAX_SEED}]`);
  return form.reportValidity();
}

function generateBody() {
  const params = { max_new_tokens: numberOf("max_new_tokens"), details: true, stop: stopStrings() };
  params.do_sample = $("do_sample").checked;
  if (params.do_sample) {
    for (const id of ["temperature", "top_k", "top_p"]) {
      const v = numberOf(id);
      if (v !== null) params[id] = v;
    }
  }
  const penalty = numberOf("repetition_penalty");
  if (penalty !== null && penalty !== 1) params.repetition_penalty = penalty;
  const seed = $("seed").value;
  // Seeds go up to 2^64 - 1, past what a JavaScript number holds exactly: the digits are spliced into the JSON.
  // User text cannot match the marker: JSON.stringify escapes its quotes.
  if (seed !== "") params.seed = "@SEED@";
  const body = JSON.stringify({ inputs: $("prompt").value, parameters: params });
  return seed === "" ? body : body.replace('"seed":"@SEED@"', '"seed":' + BigInt(seed).toString());
}

// ---- generation -----------------------------------------------------------------------------------------------

async function generate(ev) {
  ev.preventDefault();
  if (state.controller || !validate($("gen-form"))) return;
  const body = generateBody();
  const controller = new AbortController();
  state.controller = controller;
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  $("out-prompt").textContent = $("prompt").value;
  $("out-text").replaceChildren();
  $("output").classList.add("running");
  status("gen-status", "generating...");
  const run = { t0: performance.now(), first: null, last: null, tokens: 0, finish: "...", seed: null };
  showStats(run);
  try {
    const resp = await api("/generate_stream", { body, signal: controller.signal });
    await readEvents(resp, (event, raw) => {
      if (event.error) throw new Error(`${event.error_type || "error"}: ${event.error}`);
      const now = performance.now();
      if (run.first === null) run.first = now;
      run.last = now;
      run.tokens += 1;
      appendToken(event.token);
      if (event.details) {
        run.finish = event.details.finish_reason;
        run.tokens = event.details.generated_tokens;
        // The seed as sent (up to 2^64 - 1): a JavaScript number would round it.
        const seed = raw.match(/"seed":(\d+)/);
        run.seed = seed ? seed[1] : event.details.seed;
      }
      showStats(run);
    });
    status("gen-status", "");
  } catch (e) {
    if (controller.signal.aborted) {
      run.finish = "stopped";
      status("gen-status", "");
    } else {
      run.finish = "error";
      status("gen-status", e instanceof AuthNeeded ? "" : e.message, true);
    }
  } finally {
    if (run.finish === "...") run.finish = "incomplete";
    showStats(run);
    state.controller = null;
    $("generate").disabled = false;
    $("stop-button").disabled = true;
    $("output").classList.remove("running");
  }
}

// Server-sent events: `data:{json}` lines, events separated by a blank line; onEvent(parsed, the raw line).
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) onEvent(JSON.parse(line.slice(5)), line);
        }
      }
    }
  } finally {
    // However reading ends, the connection closes: a request we stopped following is aborted server-side.
    reader.cancel().catch(() => {});
  }
}

function appendToken(token) {
  if (!token.text) return; // held back (a possible stop string, a partial character) or special
  const out = $("output");
  const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
  const span = document.createElement("span");
  span.textContent = token.text;
  if (token.logprob !== null && token.logprob !== undefined) span.title = `logprob ${token.logprob.toFixed(3)}`;
  $("out-text").append(span);
  if (atBottom) out.scrollTop = out.scrollHeight;
}

function stopGeneration() {
  // Closing the stream is what aborts the request on the server: it frees the slot within one step.
  if (state.controller) state.controller.abort();
}

function showStats(run) {
  $("stat-finish").textContent = run.finish;
  $("stat-tokens").textContent = String(run.tokens);
  $("stat-ttft").textContent = run.first === null ? "-" : seconds(run.first - run.t0);
  // Decode speed: tokens after the first over the time since the first.
  $("stat-rate").textContent = run.tokens > 1 && run.last > run.first
    ? ((run.tokens - 1) / ((run.last - run.first) / 1000)).toFixed(1) : "-";
  $("stat-seed").textContent = run.seed === null || run.seed === undefined ? "-" : String(run.seed);
}

function seconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function status(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

// ---- scoring --------------------------------------------------------------------------------------------------

async function score(ev) {
  ev.preventDefault();
  if (!validate($("score-form"))) return;
  const body = JSON.stringify({
    texts: [$("score-text").value], add_bos: $("add_bos").checked, top_n: numberOf("top_n") || 0,
  });
  $("score-button").disabled = true;
  status("score-status", "scoring...");
  try {
    const result = (await (await api("/score", { body })).json()).results[0];
    renderScore(result);
    status("score-status", "");
  } catch (e) {
    status("score-status", e instanceof AuthNeeded ? "" : e.message, true);
  } finally {
    $("score-button").disabled = false;
  }
}

function renderScore(result) {
  hideTip();
  state.scored = result.tokens;
  const frag = document.createDocumentFragment();
  result.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.dataset.index = String(i);
    // A newline token shows as ↵ before the line break: its color stays visible.
    span.textContent = t.text.replace(/\n/g, "↵\n");
    if (t.logprob === null) span.classList.add("unscored");
    else span.style.backgroundColor = logprobColor(t.logprob);
    frag.append(span);
  });
  $("score-out").replaceChildren(frag);
  const fmt = (x, digits) => (x === null || x === undefined ? "-" : x.toFixed(digits));
  $("stat-ppl").textContent = result.perplexity === null ? (result.num_scored ? "overflow" : "-")
    : fmt(result.perplexity, 2);
  $("stat-scored").textContent = `${result.num_scored} of ${result.num_tokens}`;
  $("stat-mean").textContent = fmt(result.mean_logprob, 3);
  $("stat-total").textContent = fmt(result.total_logprob, 2);
}

// Red (logprob <= LOGPROB_FLOOR) through yellow to green (logprob 0), light enough for dark text.
function logprobColor(logprob) {
  const x = Math.min(1, Math.max(0, 1 - logprob / LOGPROB_FLOOR));
  return `hsl(${Math.round(120 * x)} 75% 78%)`;
}

// The tooltip: the token, its logprob and probability, and the top alternatives at its position.
function showTip(span) {
  const t = state.scored[Number(span.dataset.index)];
  if (!t) return;
  const tip = $("tip");
  const rows = [];
  const head = document.createElement("div");
  head.className = "tip-head";
  const code = document.createElement("code");
  code.textContent = JSON.stringify(t.text);
  head.append(code, document.createTextNode(t.logprob === null
    ? "  no logprob (first token; tick the box to score it)"
    : `  logprob ${t.logprob.toFixed(3)} · p ${percent(t.logprob)}`));
  rows.push(head);
  if (t.top && t.top.length) {
    const table = document.createElement("table");
    for (const alt of t.top) {
      const tr = document.createElement("tr");
      if (alt.id === t.id) tr.className = "chosen";
      for (const text of [JSON.stringify(alt.text), alt.logprob.toFixed(3), percent(alt.logprob)]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      table.append(tr);
    }
    rows.push(table);
  }
  tip.replaceChildren(...rows);
  tip.hidden = false;
  // Below the token, kept inside the viewport (above it when there is no room below).
  const r = span.getBoundingClientRect();
  const w = tip.offsetWidth;
  const h = tip.offsetHeight;
  const left = Math.max(4, Math.min(r.left, document.documentElement.clientWidth - w - 4));
  const top = r.bottom + 6 + h > window.innerHeight && r.top - 6 - h > 0 ? r.top - 6 - h : r.bottom + 6;
  tip.style.left = `${left + window.scrollX}px`;
  tip.style.top = `${top + window.scrollY}px`;
}

function hideTip() {
  $("tip").hidden = true;
}

function percent(logprob) {
  const p = Math.exp(logprob) * 100;
  return p >= 10 ? `${p.toFixed(0)}%` : p >= 0.1 ? `${p.toFixed(1)}%` : `${p.toExponential(0)}%`;
}

// ---- views ----------------------------------------------------------------------------------------------------

function showView(name) {
  for (const view of ["generate", "score"]) {
    $(`view-${view}`).hidden = view !== name;
    $(`tab-${view}`).setAttribute("aria-selected", String(view === name));
  }
  hideTip();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function init() {
  $("tab-generate").addEventListener("click", () => showView("generate"));
  $("tab-score").addEventListener("click", () => showView("score"));
  $("gen-form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", stopGeneration);
  $("score-form").addEventListener("submit", score);
  $("key-form").addEventListener("submit", useKey);
  $("key-button").addEventListener("click", () => askForKey("Enter the API key to use from now on."));
  // Ctrl+Enter (Cmd+Enter) in a text box submits its form.
  for (const id of ["prompt", "score-text"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $(id).form.requestSubmit();
    });
  }
  $("do_sample").addEventListener("change", () => {
    for (const id of ["temperature", "top_k", "top_p"]) $(id).disabled = !$("do_sample").checked;
  });
  const out = $("score-out");
  out.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
  out.addEventListener("mouseleave", hideTip);
  // Touch screens have no hover: a tap shows the tooltip, a tap elsewhere hides it.
  document.addEventListener("click", (e) => {
    if (e.target.classList && e.target.classList.contains("tok") && out.contains(e.target)) showTip(e.target);
    else if (!$("tip").contains(e.target)) hideTip();
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTip(); });
  showView(location.hash === "#score" ? "score" : "generate");
  // On a phone the parameters start folded, so that the output is in view.
  if (window.matchMedia("(max-width: 600px)").matches) $("params").open = false;
  if (document.documentElement.dataset.auth === "bearer") {
    $("key-button").hidden = false;
    if (!apiKey()) {
      askForKey("This server needs an API key.");
      return;
    }
  }
  loadInfo();
}

init();
