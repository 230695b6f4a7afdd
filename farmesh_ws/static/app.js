// Browser chat page for the farmesh_ws WebSocket protocol v1 (protocol.md).
// Server text is only ever inserted with textContent / text nodes; money stays a string.

import { authMessage, authenticated, initSignIn, refused } from "./signin.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("conn-status"), model: $("session-model"), position: $("session-position"),
  maxLength: $("session-max-length"), price: $("session-price"),
  promptPrice: $("session-prompt-price"), error: $("error"), errorCode: $("error-code"),
  errorMessage: $("error-message"), errorRetry: $("error-retry"), disconnect: $("disconnect"),
  disconnectText: $("disconnect-text"), reconnect: $("reconnect"), log: $("log"),
  form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  samplingSource: $("sampling-source"), samplingReset: $("sampling-reset"),
  maxNewTokens: $("max-new-tokens"),
};

// Sampling controls, pre-filled with the model's recommended settings (`generation` in
// /models) and sent as the session's default in `open` and with every turn, so an edit
// applies from the next turn on. Without a recommendation they show the protocol's defaults
// (greedy decoding).
const SAMPLING_DEFAULTS = { temperature: 0, top_p: 1, top_k: 0, repetition_penalty: 1 };
const samplingInputs = {
  temperature: $("temperature"), top_p: $("top-p"), top_k: $("top-k"),
  repetition_penalty: $("repetition-penalty"),
};

const SIGN_IN_HINT = "this gateway requires sign-in: paste an API key or session token, "
  + "or sign in with a wallet";

const state = {
  ws: null, open: false, model: null, running: null, seq: 0,
  authPending: false, // the connection's first message was `auth`; `open` follows its answer
  authRefusal: null, // why the gateway refused this connection's credential
  resume: null, // {session_id, token, lastSeq}: what a new connection needs to resume (§2.2)
  resumeDeadline: 0, // until when (ms, performance.now) a dropped connection is retried
  resumeDelay: 0, // the next retry's delay (ms), doubling
  dropped: null, // the close event that started the resume attempts
  movesOn: false, // the server let the session go (going_away, session_elsewhere): resume it

  turns: new Map(), // request_id -> turn view
  numBlocks: new Map(), // model_id -> num_blocks (from /models)
  generation: new Map(), // model_id -> recommended sampling (from /models)
  firstModel: null, // the first model /models lists
  samplingFrom: null, // the model whose recommendation fills the controls
  samplingEdited: false,
};

// Build an element; string children become text nodes (never parsed as HTML).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "style") {
      for (const [prop, v] of Object.entries(value)) node.style.setProperty(prop, v);
    }
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function setStatus(kind, text) {
  ui.status.dataset.state = kind;
  ui.status.textContent = text;
}

function updateButtons() {
  ui.send.disabled = !state.open || state.running !== null;
  ui.stop.disabled = state.running === null || Boolean(state.turns.get(state.running)?.stopping);
}

function showError(code, message, retryAfter) {
  ui.errorCode.textContent = code;
  ui.errorMessage.textContent = message;
  const known = typeof retryAfter === "number";
  ui.errorRetry.textContent = known ? `retry in ${retryAfter} s` : "";
  ui.errorRetry.hidden = !known;
  ui.error.hidden = false;
}

function scrollDown() {
  ui.log.lastElementChild?.scrollIntoView({ block: "end" });
}

async function loadModels() {
  try {
    const reply = await fetch("/models", { cache: "no-store" });
    const body = await reply.json();
    for (const model of body.models ?? []) {
      state.numBlocks.set(model.model_id, model.num_blocks);
      state.generation.set(model.model_id, model.generation ?? {});
      state.firstModel ??= model.model_id;
    }
  } catch {
    // The contribution view falls back to the highest end_block it sees; the sampling
    // controls keep the protocol's defaults.
  }
  if (!state.samplingEdited) fillSampling(state.model ?? state.firstModel);
}

function fillSampling(modelId) {
  const recommended = state.generation.get(modelId) ?? {};
  for (const [name, input] of Object.entries(samplingInputs)) {
    const value = recommended[name];
    input.value = String(typeof value === "number" ? value : SAMPLING_DEFAULTS[name]);
    if (!input.checkValidity()) input.step = "any"; // e.g. 0.125 against step 0.01
  }
  state.samplingFrom = modelId;
  state.samplingEdited = false;
  showSamplingSource();
}

function showSamplingSource() {
  const known = Object.keys(state.generation.get(state.samplingFrom) ?? {}).length > 0;
  ui.samplingSource.textContent = state.samplingEdited ? "(edited)"
    : known ? `(recommended for ${state.samplingFrom})` : "(protocol defaults)";
}

// The controls' valid values as protocol v1 sampling fields (protocol.md §3.2).
function currentSampling() {
  const sampling = {};
  const inputs = { ...samplingInputs, max_new_tokens: ui.maxNewTokens };
  for (const [name, input] of Object.entries(inputs)) {
    if (input.value !== "" && input.checkValidity()) sampling[name] = Number(input.value);
  }
  return sampling;
}

function openSession() {
  state.ws.send(JSON.stringify({ type: "open", sampling: currentSampling() }));
}

// After the credential, if any: resume the dropped session, or open a new one.
function startSession() {
  const point = state.resume;
  if (point === null) {
    openSession();
    return;
  }
  state.ws.send(JSON.stringify({ type: "resume", session_id: point.session_id,
    resume_token: point.token, last_seq: point.lastSeq }));
}

// The socket dropped with the session open, or the server let the session go to another gateway
// (protocol.md §2.2, §2.3): reconnect and resume it, with backoff from 100 ms doubling to 2 s,
// for up to 30 s; the running turn keeps streaming.
const RESUME_WITHIN_MS = 30_000;
function resumeLater() {
  const now = performance.now();
  if (state.resumeDelay === 0) {
    state.resumeDeadline = now + RESUME_WITHIN_MS;
    state.resumeDelay = 100;
  }
  if (now + state.resumeDelay > state.resumeDeadline) return false;
  setStatus("connecting", "reconnecting…");
  setTimeout(connect, state.resumeDelay);
  state.resumeDelay = Math.min(2 * state.resumeDelay, 2000);
  return true;
}

// A new connection presents the stored credential first (protocol.md §2.1), then opens its
// chat session; without one it opens at once, as anonymous.
function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  state.ws = ws;
  state.authRefusal = null;
  setStatus("connecting", "connecting…");
  ws.addEventListener("open", () => {
    if (state.ws !== ws) return; // replaced before it opened
    const auth = authMessage();
    state.authPending = auth !== null;
    if (auth) ws.send(JSON.stringify(auth));
    else startSession();
  });
  ws.addEventListener("message", (event) => {
    if (state.ws !== ws) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      showError("invalid_frame", "the server sent a frame that is not JSON");
      return;
    }
    if (typeof message.seq === "number" && state.resume) state.resume.lastSeq = message.seq;
    handlers[message.type]?.(message); // unknown types are ignored (protocol.md §10)
  });
  ws.addEventListener("close", (event) => {
    if (state.ws !== ws) return;
    state.open = false;
    const resumable = event.code === 1006 || state.movesOn; // dropped, or let go: not closed
    state.movesOn = false;
    if (resumable && state.resume !== null) {
      state.dropped ??= { code: event.code, reason: event.reason };
      if (resumeLater()) {
        updateButtons();
        return;
      }
    }
    const closed = state.dropped ?? event;
    state.resume = null;
    state.dropped = null;
    leaveConnection();
    const reason = closed.reason ? `: ${closed.reason}` : "";
    ui.disconnectText.textContent = `Disconnected (code ${closed.code}${reason}).`;
    ui.disconnect.hidden = false;
    ui.reconnect.disabled = false;
    setStatus("closed", "disconnected");
    updateButtons();
  });
}

// The page stops using the current connection: its running turn, if any, is interrupted.
function leaveConnection() {
  state.open = false;
  const turn = state.turns.get(state.running);
  if (turn) finishTurn(turn, "interrupted", "interrupted");
  state.running = null;
}

const handlers = {
  authenticated(m) {
    authenticated(m);
    if (state.authPending) {
      state.authPending = false;
      startSession();
    }
  },
  going_away() {
    state.movesOn = true; // it lets its sessions go as it stops: resume on the next gateway
  },
  resumed() {
    state.open = true;
    state.resumeDelay = 0;
    state.dropped = null;
    setStatus("open", "connected");
    updateButtons();
  },
  opened(m) {
    state.open = true;
    state.resume = m.resume_token
      ? { session_id: m.session_id, token: m.resume_token, lastSeq: m.seq ?? 0 } : null;
    state.model = m.model;
    ui.model.textContent = m.model;
    // /models may list another model first; its turns then carry this one's settings.
    if (!state.samplingEdited && state.samplingFrom !== m.model) fillSampling(m.model);
    ui.maxLength.textContent = String(m.max_length);
    ui.position.textContent = "0";
    ui.price.textContent = m.price_per_token_far;
    ui.promptPrice.textContent = m.price_per_prompt_token_far;
    setStatus("open", "connected");
    updateButtons();
    ui.input.focus();
  },
  token(m) {
    const turn = state.turns.get(m.request_id);
    if (!turn) return;
    const now = performance.now();
    turn.firstAt ??= now;
    turn.reply.append(m.token);
    turn.tokens = m.tokens_generated;
    const seconds = (now - turn.firstAt) / 1000;
    const rate = seconds > 0 ? `${((m.tokens_generated - 1) / seconds).toFixed(1)} tok/s · ` : "";
    turn.live.textContent = `${m.tokens_generated} tokens · ${rate}${m.cost_far} $FAR so far`;
    scrollDown();
  },
  done(m) {
    const turn = state.turns.get(m.request_id);
    if (!turn) return;
    ui.position.textContent = String(m.position);
    const outcome = m.finish_reason === "stop" ? "done" : m.finish_reason;
    finishTurn(turn, outcome, outcome);
    showUsage(turn, m);
  },
  contribution(m) {
    const turn = state.turns.get(m.request_id);
    if (turn) showContribution(turn, m);
    scrollDown();
  },
  error(m) {
    if (!m.request_id && m.code === "session_elsewhere") {
      // Another gateway still holds the session and lets it go soon: try again.
      state.movesOn = true;
      state.ws?.close(1000);
      return;
    }
    if (!m.request_id && (m.code === "resume_denied" || m.code === "session_expired")) {
      // The session could not be resumed: it is gone; a new one starts on Reconnect.
      state.resume = null;
      state.resumeDelay = 0;
      leaveConnection();
      showError(m.code, m.message);
      state.ws?.close(1000);
      return;
    }
    if (!m.request_id && state.authPending) {
      // The credential was refused; go on anonymously where the gateway allows it.
      state.authPending = false;
      state.authRefusal = m.message;
      if (m.code === "unauthorized") refused();
      showError(m.code, m.message, m.retry_after_s);
      openSession();
      return;
    }
    if (!m.request_id && m.code === "unauthorized" && !state.open) {
      setStatus("auth", "sign-in required");
      showError(m.code, [state.authRefusal, SIGN_IN_HINT].filter(Boolean).join("; "));
      return;
    }
    const turn = state.turns.get(m.request_id);
    // A late cancel of a request that already ended is harmless.
    if (m.code === "unknown_request" && turn && turn.view.dataset.state !== "streaming") return;
    showError(m.code, m.message, m.retry_after_s);
    // The server has released the request when it sends its error; a done may still follow.
    if (turn && m.request_id === state.running) finishTurn(turn, "error", `error: ${m.code}`);
  },
};

function finishTurn(turn, stateName, label) {
  turn.view.dataset.state = stateName;
  turn.badge.textContent = label;
  turn.live.textContent = "";
  if (state.running === turn.id) state.running = null;
  updateButtons();
}

function startTurn(text) {
  const id = `r${++state.seq}`;
  const reply = el("p", { class: "text reply", "data-testid": "reply", "aria-live": "polite" });
  const badge = el("span", { class: "badge", "data-testid": "turn-status" }, "streaming…");
  const live = el("div", { class: "meta live", "data-testid": "live" });
  const view = el("li", { class: "turn", "data-testid": "turn", "data-request-id": id,
    "data-state": "streaming" },
    el("div", { class: "msg user" }, el("span", { class: "who" }, "You"),
      el("p", { class: "text", "data-testid": "prompt" }, text)),
    el("div", { class: "msg assistant" },
      el("div", { class: "who" }, "Assistant ", badge), reply, live));
  const turn = { id, view, reply, badge, live, sentAt: performance.now(), firstAt: null };
  state.turns.set(id, turn);
  state.running = id;
  ui.log.append(view);
  scrollDown();
  state.ws.send(JSON.stringify({ type: "turn", request_id: id, text, ...currentSampling() }));
  updateButtons();
}

function showUsage(turn, done) {
  const u = done.usage;
  const item = (label, value, testid) =>
    el("span", { class: "stat" }, `${label} `, el("b", { "data-testid": testid }, value));
  const ttft = done.time_to_first_token_ms ?? (turn.firstAt && turn.firstAt - turn.sentAt);
  const seconds = done.duration_ms / 1000;
  const speed = [];
  if (u.completion_tokens > 0 && seconds > 0) {
    speed.push(`${(u.completion_tokens / seconds).toFixed(1)} tok/s`);
  }
  if (ttft) speed.push(`first token ${Math.round(ttft)} ms`);
  const pageTtft = turn.firstAt ? `${Math.round(turn.firstAt - turn.sentAt)} ms` : "—";
  turn.usage = el("div", { class: "meta usage", "data-testid": "usage" },
    item("prompt", String(u.prompt_tokens), "prompt-tokens"),
    item("cached", String(u.cached_tokens), "cached-tokens"),
    item("completion", String(u.completion_tokens), "completion-tokens"),
    el("span", { class: "stat" }, "cost ", el("b", { "data-testid": "cost" }, u.cost_far), " $FAR"),
    el("span", { class: "stat", "data-testid": "speed",
      title: `first token as seen by this page: ${pageTtft}` }, speed.join(" · ") || "—"));
  turn.view.querySelector(".assistant").append(turn.usage);
}

function showContribution(turn, report) {
  const maxEnd = Math.max(1, ...report.nodes.map((n) => n.end_block));
  const blocks = state.numBlocks.get(state.model) ?? maxEnd;
  const pct = (block) => `${(100 * block) / blocks}%`;
  const rows = report.nodes.map((node, index) => {
    const label = node.name ?? "node";
    const span = `${node.start_block}–${node.end_block}`;
    return el("div", { class: "node", "data-testid": "node" },
      el("div", { class: "node-label", title: node.peer_id }, label,
        el("span", { class: "muted" }, ` …${node.peer_id.slice(-6)}`)),
      el("div", { class: "track", role: "img", style: { "--blocks": String(blocks) },
        "aria-label": `${label} computed blocks ${span} of ${blocks}` },
        el("div", { class: `span c${index % 3}`, "data-testid": "node-bar", "data-start": node.start_block,
          "data-end": node.end_block, style: { left: pct(node.start_block),
            width: pct(node.end_block - node.start_block) } }, span)),
      el("div", { class: "node-stats" }, `${node.tokens} tokens · `,
        el("b", { "data-testid": "node-share" }, node.share_far), " $FAR"));
  });
  const scale = el("div", { class: "node scale", "aria-hidden": "true" }, el("div"),
    el("div", { class: "ticks" }, el("span", {}, "block 0"), el("span", {}, String(blocks))),
    el("div"));
  turn.view.querySelector(".assistant").append(
    el("section", { class: "contrib", "data-testid": "contribution", "aria-label": "Contribution" },
      el("div", { class: "contrib-head" }, "Contribution · ",
        el("b", {}, report.cost_far), " $FAR over ", String(report.nodes.length), " nodes"),
      ...rows, scale));
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text || !state.open || state.running !== null) return;
  ui.input.value = "";
  ui.error.hidden = true;
  startTurn(text);
});

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  const turn = state.turns.get(state.running);
  if (!turn || !state.open) return;
  turn.stopping = true;
  turn.badge.textContent = "stopping…";
  state.ws.send(JSON.stringify({ type: "cancel", request_id: turn.id }));
  updateButtons();
});

// A new connection and chat session: after a disconnect, or to present a new credential.
async function reconnect() {
  state.resume = null;
  state.resumeDelay = 0;
  ui.reconnect.disabled = true;
  ui.disconnect.hidden = true;
  ui.error.hidden = true;
  if (ui.log.lastElementChild) {
    ui.log.append(el("li", { class: "separator", "data-testid": "separator" }, "new session"));
  }
  await loadModels();
  connect();
}

ui.reconnect.addEventListener("click", reconnect);

initSignIn({
  restart() {
    const old = state.ws;
    state.ws = null; // its close event is no longer the page's business
    leaveConnection();
    updateButtons();
    old?.close(1000);
    reconnect();
  },
  showError,
});

for (const input of [...Object.values(samplingInputs), ui.maxNewTokens]) {
  input.addEventListener("input", () => {
    state.samplingEdited = true;
    showSamplingSource();
  });
}

ui.samplingReset.addEventListener("click", () => fillSampling(state.model ?? state.firstModel));

ui.error.querySelector("#error-dismiss").addEventListener("click", () => {
  ui.error.hidden = true;
});

await loadModels();
connect();
