// The dmcall web client: sign-in, DM inbox with the phone icon, DM settings, incoming
// calls on every tab, missed calls (live over SSE), call history, and the call screen.

import { Api, ApiError, devToken, loadConfig, tokenExpiry, tokenSubject } from "./api.js";
import { CallSession } from "./call.js";
import { GroupCallSession } from "./group.js";
import { CLOSE, SignalingSocket } from "./signaling.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "dmcall.token";
const CONVERSATIONS_KEY = "dmcall.conversations";
const PERMISSION_REFRESH_MS = 3000;
const TOKEN_MARGIN_MS = 60000; // a token is renewed this long before it expires
const FINAL_STATES = new Set(["ended", "rejected", "declined", "cancelled", "missed", "busy"]);

// What the caller may be told when the phone icon is hidden (never which rule it was).
const REASON_HINTS = {
  caller_not_premium: "Subscribe to call",
  no_prior_dm: "They need to message you first",
  callee_unavailable: "Not taking calls from you",
  self_call: "",
};
const END_TEXT = {
  declined: "Declined",
  cancelled: "Cancelled",
  missed: "No answer",
  busy: "Busy on another call",
  rejected: "Can't call",
  answered_elsewhere: "Answered on another device",
  ice_failed: "Connection failed",
  media_timeout: "Connection lost",
  user_hangup: "Call ended",
};

const state = {
  config: null,
  api: null,
  me: null,
  deviceId: null,
  socket: null,
  events: null,
  conversations: [],
  permissions: new Map(),
  groups: [], // [{group, members}] the token user is in (policy)
  groupPermissions: new Map(), // group -> {allowed, media, reason, would_ring}
  groupCalls: new Map(), // group -> the call going in it (null: none)
  ringing: new Map(), // call_id -> incoming call ringing this device
  shownIncoming: null,
  session: null,
  recentStates: new Map(), // call_id -> last call.state, for calls we have not met yet
  pendingSignals: new Map(), // call_id -> [call.signal] that came before the session
  notifications: new Map(),
  history: [],
  view: "inbox",
  timers: [],
};

// ------------------------------------------------------------------ helpers

const PALETTE = ["#1d9bf0", "#7856ff", "#f91880", "#00ba7c", "#ff7a00", "#ffd400", "#e0245e"];
function avatar(el, user) {
  el.textContent = (user || "?").slice(0, 1);
  let h = 0;
  for (const c of user || "") h = (h * 31 + c.charCodeAt(0)) >>> 0;
  el.style.background = PALETTE[h % PALETTE.length];
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k.startsWith("data-") || k === "title" || k === "type" || k === "aria-label") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children.flat()) if (child != null) node.append(child);
  return node;
}

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  const use = document.createElementNS("http://www.w3.org/2000/svg", "use");
  use.setAttribute("href", `#i-${name}`);
  svg.append(use);
  return svg;
}

let toastTimer = null;
function toast(text) {
  const box = $("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : d.toLocaleDateString();
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds || 0));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function deviceId() {
  // One device per tab: every open tab rings.
  let id = sessionStorage.getItem("dmcall.device");
  if (!id) {
    id = `web-${crypto.randomUUID().replace(/-/g, "").slice(0, 16)}`;
    sessionStorage.setItem("dmcall.device", id);
  }
  return id;
}

// ------------------------------------------------------------------ sign-in

function showSignIn(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  const list = $("demo-users");
  list.replaceChildren();
  if (state.config.dev_sign_in) {
    for (const user of state.config.demo_users) {
      const a = el("span", { class: "avatar small" });
      avatar(a, user);
      list.append(el("button", {
        "data-testid": `signin-${user}`,
        on: { click: () => signIn(() => devToken(user)) },
      }, a, user));
    }
  }
}

async function signIn(getToken) {
  try {
    const token = await getToken();
    if (!tokenSubject(token)) throw new Error("That token is not valid (or has expired)");
    localStorage.setItem(TOKEN_KEY, token);
    startApp(token);
  } catch (error) {
    $("signin-error").textContent = error.message;
  }
}

function signOut() {
  localStorage.removeItem(TOKEN_KEY);
  location.reload();
}

// ------------------------------------------------------------------ app

function startApp(token) {
  state.api = new Api(state.config, token);
  state.me = tokenSubject(token);
  state.deviceId = deviceId();
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = state.me;
  avatar($("me-avatar"), state.me);
  document.title = `dmcall · ${state.me}`;

  const saved = JSON.parse(localStorage.getItem(CONVERSATIONS_KEY) || "[]");
  state.conversations = [...new Set([...state.config.demo_users, ...saved])].filter((u) => u !== state.me);
  renderInbox();
  showView("inbox");

  connectSocket();
  connectNotifications();
  refreshPermissions();
  loadSettings();
  loadHistory();
  state.timers.push(setInterval(() => {
    if (state.view === "inbox" && document.visibilityState === "visible") refreshPermissions();
  }, PERMISSION_REFRESH_MS));
  state.timers.push(setInterval(renderCallClock, 1000));
}

function showView(view) {
  state.view = view;
  for (const name of ["inbox", "history", "settings"]) $(`view-${name}`).hidden = name !== view;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  if (view === "inbox") refreshPermissions();
  if (view === "history") { loadHistory(); markMissedRead(); }
  if (view === "settings") loadSettings();
}

// ------------------------------------------------------------------ inbox

function renderInbox() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((user) => {
    const a = el("span", { class: "avatar" });
    avatar(a, user);
    return el("li", { class: "conversation", "data-testid": `conv-${user}` },
      a,
      el("div", { class: "conv-main" },
        el("div", { class: "conv-name" }, user),
        el("div", { class: "conv-sub" }, `@${user}`)),
      el("div", { class: "call-actions", "data-testid": `call-actions-${user}` }));
  }));
  for (const user of state.conversations) renderCallActions(user);
}

function renderCallActions(user) {
  const box = document.querySelector(`[data-testid="call-actions-${user}"]`);
  if (!box) return;
  const permission = state.permissions.get(user);
  if (!permission) { box.replaceChildren(); return; }
  if (permission.allowed) {
    const buttons = (permission.media || ["audio", "video"]).map((media) => el("button", {
      class: "icon-btn",
      title: media === "video" ? `Video call ${user}` : `Audio call ${user}`,
      "aria-label": media === "video" ? `Video call ${user}` : `Audio call ${user}`,
      "data-testid": `call-${media}-${user}`,
      on: { click: () => placeCall(user, media) },
    }, icon(media === "video" ? "video" : "phone")));
    box.replaceChildren(el("div", { class: "call-icons" }, buttons));
  } else {
    const hint = REASON_HINTS[permission.reason] ?? "Calls unavailable";
    box.replaceChildren(el("span", { class: "call-hint", "data-testid": `call-hint-${user}` }, hint));
  }
}

async function refreshPermissions() {
  if (!state.api) return;
  refreshGroups();
  await Promise.all(state.conversations.map(async (user) => {
    try {
      state.permissions.set(user, await state.api.permission(user));
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return signOut();
      state.permissions.set(user, { allowed: false, reason: null });
    }
    renderCallActions(user);
  }));
}

// ------------------------------------------------------------------ group conversations

// The token user's groups (policy), each with its call icons (who would ring: policy's
// group permission) or, with a call going, "Join" (signaling's GET /v1/groups/{g}/call).
async function refreshGroups() {
  let groups;
  try {
    const body = await state.api.groups();
    groups = Array.isArray(body) ? body : (body && body.groups) || [];
  } catch {
    return; // keep what we have (policy away for a moment)
  }
  state.groups = groups.filter((g) => g && typeof g.group === "string");
  await Promise.all(state.groups.map(async ({ group }) => {
    const [permission, call] = await Promise.all([
      state.api.groupPermission(group).catch(() => ({ allowed: false, reason: null })),
      state.api.groupCall(group).catch(() => null),
    ]);
    state.groupPermissions.set(group, permission);
    state.groupCalls.set(group, call && !FINAL_STATES.has(call.state) ? call : null);
  }));
  renderGroups();
}

function renderGroups() {
  const list = $("groups");
  list.replaceChildren(...state.groups.map(({ group, members }) => {
    const a = el("span", { class: "avatar" });
    avatar(a, group);
    const others = (members || []).filter((m) => m !== state.me);
    return el("li", { class: "conversation group", "data-testid": `group-${group}` },
      a,
      el("div", { class: "conv-main" },
        el("div", { class: "conv-name" }, el("span", { class: "group-icon" }, icon("group")), group),
        el("div", { class: "conv-sub", "data-testid": `group-sub-${group}` },
          `${["you", ...others].join(", ")} · `, groupSubtitle(group))),
      el("div", { class: "call-actions", "data-testid": `group-actions-${group}` }, groupActions(group)));
  }));
}

function groupSubtitle(group) {
  const call = state.groupCalls.get(group);
  if (call) {
    const inCall = (call.participants || []).filter((p) => p.state === "joined").map((p) => p.user);
    return el("span", { class: "group-live", "data-testid": `group-live-${group}` },
      `Call going · ${inCall.join(", ") || "starting"}`);
  }
  const permission = state.groupPermissions.get(group);
  if (permission && permission.allowed) {
    const ring = permission.would_ring || [];
    return el("span", { "data-testid": `would-ring-${group}` },
      ring.length ? `Calling rings ${ring.join(", ")}` : "Calling rings nobody now (they can join)");
  }
  return "";
}

function groupActions(group) {
  const call = state.groupCalls.get(group);
  const mine = state.session && state.session.callId === (call && call.call_id);
  if (call && !mine) {
    return el("button", { class: "btn join-btn", "data-testid": `join-${group}`,
      on: { click: () => joinGroupCall(group, call) } }, "Join");
  }
  if (call) return null;
  const permission = state.groupPermissions.get(group);
  if (!permission) return null;
  if (!permission.allowed) {
    return el("span", { class: "call-hint", "data-testid": `group-hint-${group}` },
      REASON_HINTS[permission.reason] || "Calls unavailable");
  }
  return el("div", { class: "call-icons" }, (permission.media || ["audio", "video"]).map((media) => el("button", {
    class: "icon-btn",
    title: media === "video" ? `Video call ${group}` : `Audio call ${group}`,
    "aria-label": media === "video" ? `Video call ${group}` : `Audio call ${group}`,
    "data-testid": `group-call-${media}-${group}`,
    on: { click: () => placeGroupCall(group, media) },
  }, icon(media === "video" ? "video" : "phone"))));
}

$("new-dm").addEventListener("submit", (event) => {
  event.preventDefault();
  const user = $("new-dm-user").value.trim();
  if (!user || user === state.me) return;
  if (!state.conversations.includes(user)) {
    state.conversations.unshift(user);
    const saved = JSON.parse(localStorage.getItem(CONVERSATIONS_KEY) || "[]");
    localStorage.setItem(CONVERSATIONS_KEY, JSON.stringify([user, ...saved.filter((u) => u !== user)]));
  }
  $("new-dm-user").value = "";
  renderInbox();
  refreshPermissions();
});

// ------------------------------------------------------------------ settings

async function loadSettings() {
  try {
    renderSettings(await state.api.getSettings());
  } catch (error) {
    $("settings-status").textContent = `Could not load settings: ${error.message}`;
  }
}

function renderSettings(settings) {
  $("set-enabled").checked = settings.enabled;
  $("set-address-book").checked = settings.allow_from.address_book;
  $("set-following").checked = settings.allow_from.following;
  $("set-verified").checked = settings.allow_from.verified;
  $("allow-from").disabled = !settings.enabled;
}

async function saveSettings() {
  const settings = {
    enabled: $("set-enabled").checked,
    allow_from: {
      address_book: $("set-address-book").checked,
      following: $("set-following").checked,
      verified: $("set-verified").checked,
    },
  };
  $("allow-from").disabled = !settings.enabled;
  $("settings-status").textContent = "Saving…";
  try {
    renderSettings(await state.api.putSettings(settings) || settings);
    $("settings-status").textContent = "Saved";
  } catch (error) {
    $("settings-status").textContent = `Not saved: ${error.message}`;
  }
}
for (const id of ["set-enabled", "set-address-book", "set-following", "set-verified"]) {
  $(id).addEventListener("change", saveSettings);
}
$("settings-form").addEventListener("submit", (event) => event.preventDefault());

// ------------------------------------------------------------------ history

async function loadHistory() {
  try {
    const page = await state.api.history(50);
    state.history = page.calls || [];
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return signOut();
  }
  renderHistory();
}

let historyTimer = null;
function loadHistorySoon() {
  clearTimeout(historyTimer);
  historyTimer = setTimeout(loadHistory, 300);
}

function describe(call) {
  if (call.missed) return "Missed";
  if (call.state === "ended" && call.answered_at) return duration(call.duration_s);
  return END_TEXT[call.end_reason] || END_TEXT[call.state] || call.state;
}

function renderHistory() {
  const list = $("history-list");
  if (!state.history.length) {
    list.replaceChildren(el("li", { class: "empty" }, "No calls yet"));
    return;
  }
  list.replaceChildren(...state.history.map((call) => {
    if (call.group) return groupHistoryItem(call);
    const peer = call.direction === "outgoing" ? call.callee : call.caller;
    const a = el("span", { class: "avatar" });
    avatar(a, peer);
    const dir = call.missed ? "missed" : call.direction === "outgoing" ? "out" : "in";
    return el("li", {
      class: `history-item${call.missed ? " missed" : ""}`,
      "data-testid": "history-item", "data-call-id": call.call_id, "data-peer": peer,
      "data-state": call.state,
    },
      a,
      el("div", { class: "conv-main" },
        el("div", { class: "conv-name" }, peer),
        el("div", { class: "conv-sub" },
          el("span", { class: "dir" }, icon(dir)), ` ${call.direction === "outgoing" ? "Outgoing" : "Incoming"} ${call.media} · `,
          el("span", { "data-testid": "history-outcome" }, describe(call)), ` · ${when(call.created_at)}`)),
      el("div", { class: "history-actions" },
        el("button", { class: "icon-btn", title: "Call back", "data-testid": "history-call-back",
          on: { click: () => placeCall(peer, call.media) } }, icon(call.media === "video" ? "video" : "phone")),
        // policy never let a rejected call reach the callee, so there is nothing to report
        call.end_reason === "rejected_by_policy" ? null :
          el("button", { class: "icon-btn plain", title: `Report ${peer}`, "data-testid": "history-report",
            on: { click: () => report(call.call_id, peer) } }, icon("flag")),
        el("button", { class: "icon-btn plain", title: `Block ${peer}`, "data-testid": "history-block",
          on: { click: () => block(peer) } }, icon("block"))));
  }));
}

function groupHistoryItem(call) {
  const a = el("span", { class: "avatar" });
  avatar(a, call.group);
  const dir = call.missed ? "missed" : call.direction === "outgoing" ? "out" : "in";
  return el("li", {
    class: `history-item${call.missed ? " missed" : ""}`,
    "data-testid": "history-item", "data-call-id": call.call_id, "data-group": call.group,
    "data-state": call.state,
  },
    a,
    el("div", { class: "conv-main" },
      el("div", { class: "conv-name" }, call.group),
      el("div", { class: "conv-sub" },
        el("span", { class: "dir" }, icon(dir)),
        ` Group ${call.media} · ${call.direction === "outgoing" ? "you started" : `from ${call.caller}`} · `,
        el("span", { "data-testid": "history-outcome" }, describe(call)), ` · ${when(call.created_at)}`)),
    el("div", { class: "history-actions" },
      el("button", { class: "icon-btn", title: "Call the group", "data-testid": "history-call-back",
        on: { click: () => placeGroupCall(call.group, call.media) } }, icon(call.media === "video" ? "video" : "phone"))));
}

function report(callId, user) {
  const dialog = $("report-dialog");
  $("report-user").textContent = user;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    const reason = dialog.returnValue;
    if (!reason || reason === "cancel") return;
    try {
      await state.api.report(callId, user, reason);
      toast(`Reported ${user}. They can no longer call you.`);
      refreshPermissions();
    } catch (error) {
      toast(`Could not report: ${error.message}`);
    }
  };
  dialog.showModal();
}

async function block(user) {
  try {
    await state.api.block(user);
    toast(`Blocked ${user}: they can no longer call you`);
    if (state.session && state.session.peer === user) state.session.hangup();
    refreshPermissions();
  } catch (error) {
    toast(`Could not block: ${error.message}`);
  }
}

// ------------------------------------------------------------------ missed calls (SSE)

function loadNotifications() {
  state.api.listNotifications().then((items) => {
    for (const item of Array.isArray(items) ? items : items.notifications || []) onNotification(item, false);
  }).catch(() => {});
}

function connectNotifications(lastEventId) {
  if (!lastEventId) loadNotifications();
  // EventSource reconnects by itself, resuming after the last id it saw (Last-Event-ID).
  const events = new EventSource(state.api.streamUrl(lastEventId));
  state.events = events;
  // Some of what we missed while away is no longer kept: read the inbox again.
  events.addEventListener("resync", loadNotifications);
  // The stream ends when its token expires: open a new one with a fresh token, resuming
  // after the last id seen (a new EventSource does not send Last-Event-ID by itself).
  events.addEventListener("token_expired", async (event) => {
    events.close();
    const token = await freshToken(true).catch(() => null);
    if (!token) return; // signed out: the sign-in screen says what to do
    state.api.token = token;
    connectNotifications(event.lastEventId || lastEventId);
  });
  // An EventSource refused outright (429 too many streams, 401 a token gone stale while
  // offline) closes for good: open a new one later, with backoff and a fresh token.
  events.addEventListener("error", () => {
    if (events.readyState !== EventSource.CLOSED || state.events !== events) return;
    const wait = Math.min(60_000, 5_000 * 2 ** (state.streamRetries || 0)) * (0.5 + Math.random());
    state.streamRetries = (state.streamRetries || 0) + 1;
    setTimeout(async () => {
      if (state.events !== events) return; // signed out, or another stream took over
      const token = await freshToken().catch(() => null);
      if (!token) return;
      connectNotifications(lastEventId);
    }, wait);
  });
  events.addEventListener("open", () => { state.streamRetries = 0; });
  const handle = (event) => {
    try { onNotification(JSON.parse(event.data), true); } catch { /* keep-alive or junk */ }
  };
  for (const name of ["message", "notification", "missed_call", "incoming_call", "ring_stopped"]) {
    events.addEventListener(name, handle);
  }
}

function onNotification(item, live) {
  if (!item || !item.kind) return;
  if (item.kind === "ring_stopped") { stopRinging(item.call_id); return; }
  if (item.kind !== "missed_call" || !item.id) return;
  const known = state.notifications.has(item.id);
  state.notifications.set(item.id, { ...state.notifications.get(item.id), ...item });
  stopRinging(item.call_id);
  if (live && !known && !item.read) toast(`Missed ${item.media || ""} call from ${item.from}`);
  renderMissed();
  if (live) loadHistorySoon();
}

function renderMissed() {
  const missed = [...state.notifications.values()].filter((n) => n.kind === "missed_call")
    .sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
  const unread = missed.filter((n) => !n.read).length;
  $("missed-badge").textContent = String(unread);
  $("missed-badge").hidden = unread === 0;
  const list = $("missed-list");
  if (!missed.length) {
    list.replaceChildren(el("li", { class: "empty" }, "No missed calls"));
    return;
  }
  list.replaceChildren(...missed.map((n) => {
    const a = el("span", { class: "avatar" });
    avatar(a, n.from);
    return el("li", { class: "missed-item", "data-testid": "missed-item", "data-call-id": n.call_id },
      a,
      el("div", { class: "conv-main" },
        el("div", { class: "conv-name" }, n.from),
        el("div", { class: "conv-sub" }, el("span", { class: "dir" }, icon("missed")),
          ` Missed ${n.media || ""} call · ${when(n.created_at)}`)));
  }));
}

function markMissedRead() {
  for (const n of state.notifications.values()) {
    if (n.kind === "missed_call" && !n.read) {
      n.read = true;
      state.api.markRead(n.id).catch(() => {});
    }
  }
  renderMissed();
}

// ------------------------------------------------------------------ signaling socket

// A token good for a while yet: the one we have, a newer one another tab stored, or (with
// development sign-in) a new one; null when the user must sign in again. ``force``: a server
// (the socket's close code, the stream's token_expired) said ours expired.
async function freshToken(force = false) {
  const token = state.api.token;
  const expiry = tokenExpiry(token);
  if (!force && (!expiry || expiry - Date.now() > TOKEN_MARGIN_MS)) return token;
  const stored = localStorage.getItem(TOKEN_KEY);
  const storedExpiry = stored ? tokenExpiry(stored) : null;
  if (stored && stored !== token && tokenSubject(stored) === state.me
      && storedExpiry && storedExpiry - Date.now() > TOKEN_MARGIN_MS) {
    state.api.token = stored;
    scheduleTokenRefresh();
    return stored;
  }
  if (!state.config.dev_sign_in) {
    signOut();
    return null;
  }
  const next = await devToken(state.me);
  state.api.token = next;
  localStorage.setItem(TOKEN_KEY, next);
  scheduleTokenRefresh();
  return next;
}

// Before the token runs out, the open socket is handed a new one (no reconnect mid-call).
let tokenTimer = null;
function scheduleTokenRefresh() {
  clearTimeout(tokenTimer);
  const expiry = tokenExpiry(state.api.token);
  if (!expiry || !state.config.dev_sign_in) return;
  const wait = Math.min(Math.max(expiry - Date.now() - TOKEN_MARGIN_MS, 1000), 2 ** 31 - 1);
  tokenTimer = setTimeout(async () => {
    try {
      const token = await freshToken(true);
      if (token && state.socket) state.socket.refreshToken(token);
    } catch {
      scheduleTokenRefresh(); // try again later; at worst the socket reconnects on 4419
    }
  }, wait);
}

function connectSocket() {
  const socket = new SignalingSocket(state.config.signaling_url, freshToken, state.deviceId);
  state.socket = socket;
  socket.on("open", () => {
    $("conn").classList.add("up");
    // Signaling may have missed a change while we were away: say again how we are, and
    // ask where the call's media is now (a call.media sent while we were away is lost;
    // onMedia does nothing when it is still where we are).
    if (state.session) {
      const session = state.session;
      session.sendMediaState();
      state.api.media(session.callId)
        .then((grant) => { if (state.session === session) session.onMedia({ ...grant, reason: "resync" }); })
        .catch(() => {});
    }
    // The server sends call.incoming for what rings now; drop what stopped while we were
    // away, and (once more a moment later) show what rings and did not reach this socket:
    // a ring fanned out while the socket was still being attached.
    const resync = () => state.api.ringState().then(({ calls }) => {
      const live = new Set((calls || []).map((c) => c.call_id));
      for (const id of [...state.ringing.keys()]) if (!live.has(id)) stopRinging(id);
      for (const call of calls || []) {
        if (call.direction === "incoming" && !state.ringing.has(call.call_id)) onIncoming(call);
      }
    }).catch(() => {});
    resync();
    setTimeout(resync, 1500);
  });
  socket.on("close", ({ code }) => {
    $("conn").classList.remove("up");
    if (code === CLOSE.UNAUTHORIZED) signOut();
    if (code === CLOSE.TOO_MANY_DEVICES) toast("Disconnected: you are signed in on too many devices. Reload to use this one.");
  });
  socket.on("call.incoming", onIncoming);
  socket.on("call.state", onCallState);
  socket.on("call.signal", onCallSignal);
  socket.on("call.media", (message) => inCall(message, (session) => session.onMedia(message)));
  socket.on("call.peer", (message) => inCall(message, (session) => session.onPeer(message)));
  socket.on("call.participant", (message) => {
    inCall(message, (session) => session.onParticipant && session.onParticipant(message));
    if (state.view === "inbox") refreshGroups();
  });
  socket.connect();
  scheduleTokenRefresh();
}

// A message about the call on this device's call screen (others are not this tab's).
function inCall(message, handle) {
  const session = state.session;
  if (session && !session.ended && session.callId === message.call_id) handle(session);
}

function onIncoming(call) {
  // A group call rings every rung invitee (its callee is null, or that invitee).
  const forMe = call.group ? call.caller !== state.me : call.callee === state.me;
  if (!forMe || call.state !== "ringing") return;
  if (state.session && state.session.callId === call.call_id) return;
  state.ringing.set(call.call_id, call);
  showIncoming();
}

function onCallState(message) {
  const session = state.session;
  if (session && session.callId === message.call_id) {
    sessionState(session, message);
  } else {
    state.recentStates.set(message.call_id, message);
    setTimeout(() => state.recentStates.delete(message.call_id), 30000);
  }
  // SSE's ring_stopped may have dismissed the ringing already; still say why.
  if (message.answered_elsewhere && !(session && session.callId === message.call_id)) {
    toast("Answered on another device");
  }
  // A group call goes on ringing others; it stops ringing here when this member is not.
  if (message.state !== "ringing" || !ringsMe(message)) stopRinging(message.call_id);
  if (message.group && state.view === "inbox") refreshGroups();
  if (FINAL_STATES.has(message.state) || message.state === "accepted") loadHistorySoon();
}

function onCallSignal(message) {
  const session = state.session;
  if (session && session.callId === message.call_id) {
    session.onSignal(message);
  } else {
    const list = state.pendingSignals.get(message.call_id) || [];
    list.push(message);
    state.pendingSignals.set(message.call_id, list);
    setTimeout(() => state.pendingSignals.delete(message.call_id), 60000);
  }
}

// A group call's call object: does it still ring this member?
function ringsMe(call) {
  if (!call.group || !Array.isArray(call.participants)) return true;
  const me = call.participants.find((p) => p.user === state.me);
  return !me || me.state === "ringing" || me.state === "invited";
}

function groupSessionState(session, message) {
  session.updateParticipants(message.participants);
  if (message.state === "accepted" && message.media_url && !session.started) {
    // The starter's media: the first other member joined.
    session.started = true;
    session.start(message);
  } else if (message.state === "ringing" && !session.started) {
    session.status = "Ringing…";
    session.changed();
  } else if ((message.state === "accepted" || message.state === "active") && session.started) {
    session.onUpgraded(message.media);
  } else if (FINAL_STATES.has(message.state)) {
    session.finish(END_TEXT[message.end_reason] || END_TEXT[message.state] || "Call ended");
  }
}

function sessionState(session, message) {
  if (session.group) return groupSessionState(session, message);
  if (message.state === "ringing" && session.role === "caller") {
    session.status = "Ringing…";
    session.changed();
  } else if (message.state === "accepted" && message.media_url && !session.started) {
    // The caller's media; or, after glare, this device answering the surviving call
    // (which may be of the other kind than the one this device placed).
    session.started = true;
    session.role = message.caller === state.me ? "caller" : "callee";
    session.adoptMedia(message.media);
    session.start(message);
  } else if ((message.state === "accepted" || message.state === "active") && session.started) {
    session.onUpgraded(message.media); // an audio call whose camera was turned on is video now
  } else if (message.state === "cancelled" && message.replaced_by) {
    // Glare: we called them while they called us; the other call survives and goes on
    // in this same call screen (its accepted state, with our media, follows).
    session.callId = message.replaced_by;
    session.status = "Connecting…";
    session.changed();
    for (const signal of state.pendingSignals.get(message.replaced_by) || []) session.onSignal(signal);
    state.pendingSignals.delete(message.replaced_by);
    const early = state.recentStates.get(message.replaced_by);
    if (early) sessionState(session, early);
  } else if (FINAL_STATES.has(message.state)) {
    let text = END_TEXT[message.end_reason] || END_TEXT[message.state] || "Call ended";
    if (message.state === "rejected") text = REASON_HINTS[message.reject_reason] || END_TEXT.rejected;
    session.finish(text);
  }
}

// ------------------------------------------------------------------ incoming call screen

function showIncoming() {
  const next = [...state.ringing.values()].at(-1) || null;
  state.shownIncoming = next;
  $("incoming").hidden = !next;
  if (!next) return;
  avatar($("incoming-avatar"), next.group || next.caller);
  $("incoming-from").textContent = next.group ? `${next.caller} · ${next.group}` : next.caller;
  $("incoming-kind").textContent = next.group
    ? `Group ${next.media === "video" ? "video" : "audio"} call…`
    : next.media === "video" ? "Incoming video call…" : "Incoming audio call…";
  $("incoming-accept-icon").setAttribute("href", next.media === "video" ? "#i-video" : "#i-phone");
}

function stopRinging(callId) {
  if (!callId || !state.ringing.has(callId)) return;
  state.ringing.delete(callId);
  showIncoming();
}

$("incoming-decline").addEventListener("click", async () => {
  const call = state.shownIncoming;
  if (!call) return;
  stopRinging(call.call_id);
  try { await state.api.decline(call.call_id); } catch { /* already over */ }
});

$("incoming-accept").addEventListener("click", async () => {
  const call = state.shownIncoming;
  if (!call || state.session) return;
  stopRinging(call.call_id);
  const session = call.group ? openGroupSession(call) : openSession(call, "callee");
  await startSession(session, () => state.api.accept(call.call_id, state.deviceId), (error) => (
    error instanceof ApiError && error.status === 409
      ? END_TEXT[error.body.end_reason] || END_TEXT[error.body.state] || "The call is over"
      : `Could not answer: ${error.message}`
  ));
});

// Answering or joining: the keys first, then the server's grant starts the media; what
// went wrong, as ``failure`` words it, ends the session.
async function startSession(session, grantOf, failure) {
  session.started = true;
  try {
    await session.prepareKeys();
    session.start(await grantOf());
  } catch (error) {
    session.finish(failure(error));
  }
}

// ------------------------------------------------------------------ placing a call

async function placeCall(user, media) {
  if (state.session) return toast("You are already in a call");
  let call;
  try {
    call = await state.api.placeCall(user, media, state.deviceId);
  } catch (error) {
    return toast(couldNotCall(error));
  }
  whileRinging(openSession(call, "caller"));
}

function couldNotCall(error) {
  return error instanceof ApiError && error.status === 429
    ? `Too many calls; try again in ${error.body.retry_after_s || "a few"} s`
    : `Could not call: ${error.message}`;
}

// A call just placed: keys and camera get ready while it rings (and a state that came
// before the answer to the request is applied).
function whileRinging(session) {
  session.prepareKeys().catch(() => {});
  session.startLocalMedia().catch((error) => session.fail(`Camera or microphone: ${error.message}`));
  const early = state.recentStates.get(session.callId);
  if (early) sessionState(session, early);
}

async function placeGroupCall(group, media) {
  if (state.session) return toast("You are already in a call");
  let call;
  try {
    call = await state.api.placeGroupCall(group, media, state.deviceId);
  } catch (error) {
    if (error instanceof ApiError && error.status === 409 && error.body.call_id) {
      // A call is going in this group already: join that one.
      return joinGroupCall(group, { call_id: error.body.call_id });
    }
    return toast(couldNotCall(error));
  }
  whileRinging(openGroupSession({
    call_id: call.call_id, state: call.state, group, media, caller: state.me, callee: null,
    participants: [{ user: state.me, state: "joined" }],
  }));
}

// "Join" on a group conversation with a call going (any current member, while it lasts).
async function joinGroupCall(group, known) {
  if (state.session) return toast("You are already in a call");
  let call = known;
  try {
    if (!call || !call.participants) call = await state.api.getCall(known.call_id).catch(() => state.api.groupCall(group));
  } catch {
    return toast("That call is over");
  }
  const session = openGroupSession({ ...call, group });
  await startSession(session, () => state.api.join(call.call_id, state.deviceId), (error) => (
    error instanceof ApiError && (error.status === 409 || error.status === 404)
      ? END_TEXT[error.body.end_reason] || (error.body.error === "call_full" ? "The call is full" : "The call is over")
      : `Could not join: ${error.message}`
  ));
  refreshGroups();
}

function openGroupSession(call) {
  const session = new GroupCallSession({ api: state.api, socket: state.socket, call, me: state.me, deviceId: state.deviceId });
  return adopt(session, "group-call", renderGroupCall, () => {
    $("group-grid").replaceChildren();
    refreshGroups();
  });
}

function openSession(call, role) {
  const session = new CallSession({ api: state.api, socket: state.socket, call, role, deviceId: state.deviceId });
  return adopt(session, "call", renderCall, () => {
    $("remote-video").srcObject = null;
    $("remote-audio").srcObject = null;
    $("local-video").srcObject = null;
  });
}

// The new current session: the signals that came before it, its screen shown and rendered
// on every change, and when it ends, hidden and emptied (``clear``).
function adopt(session, screen, render, clear) {
  state.session = session;
  for (const message of state.pendingSignals.get(session.callId) || []) session.onSignal(message);
  state.pendingSignals.delete(session.callId);
  session.addEventListener("change", () => render(session));
  // A rejoin found the call over (its call.state may never have reached this socket).
  session.addEventListener("over", (event) => sessionState(session, event.detail));
  session.addEventListener("end", () => {
    if (state.session === session) state.session = null;
    $(screen).hidden = true;
    clear();
    toast(session.endReason);
    loadHistorySoon();
  });
  $(screen).hidden = false;
  render(session);
  return session;
}

// ------------------------------------------------------------------ call screen

function renderCall(session) {
  if (state.session !== session) return;
  $("call-peer").textContent = session.peer;
  avatar($("call-avatar"), session.peer);
  const video = session.media === "video";
  const peer = session.peerState;
  const peerCameraOff = video && peer.video === "off";
  $("audio-only").hidden = video && !peerCameraOff;
  $("remote-video").hidden = !video;
  $("local-video").hidden = !video || !session.local || !session.local.getVideoTracks().length;
  if ($("local-video").srcObject !== session.local) $("local-video").srcObject = session.local;
  // One element plays the other party (the video element its sound too); after a rejoin
  // the stream is the new connection's.
  const [remoteEl, otherEl] = video ? [$("remote-video"), $("remote-audio")] : [$("remote-audio"), $("remote-video")];
  if (otherEl.srcObject) otherEl.srcObject = null;
  if (remoteEl.srcObject !== session.remote && session.remote.getTracks().length) remoteEl.srcObject = session.remote;
  $("call").dataset.media = session.media;
  $("call-status").textContent = session.status;
  $("call").classList.toggle("reconnecting", session.reconnecting);
  $("peer-status").textContent = peer.connection === "reconnecting" ? `${session.peer} is reconnecting…` : "";
  $("peer-muted").hidden = peer.audio !== "muted";
  $("peer-camera-off").hidden = !peerCameraOff;
  $("e2ee").hidden = !session.safetyCode;
  $("safety-code").textContent = session.safetyCode || "";
  renderControls(session, "call-quality", "btn-mute", "btn-camera");
}

// What both call screens show alike: the connection's quality, the mute and camera
// buttons, the clock.
function renderControls(session, quality, mute, camera) {
  $(quality).textContent = session.quality ? `${session.quality[0].toUpperCase()}${session.quality.slice(1)} connection` : "";
  $(quality).className = `quality ${session.quality || ""}`;
  $(mute).classList.toggle("off", session.muted);
  $(mute).querySelector("use").setAttribute("href", session.muted ? "#i-mic-off" : "#i-mic");
  $(mute).title = session.muted ? "Unmute" : "Mute";
  $(camera).classList.toggle("off", session.cameraOff);
  $(camera).querySelector("use").setAttribute("href", session.cameraOff ? "#i-video-off" : "#i-video");
  $(camera).title = session.cameraOff ? "Camera on" : "Camera off";
  renderCallClock();
}

function renderCallClock() {
  const session = state.session;
  const text = session && session.connectedAt ? duration((Date.now() - session.connectedAt) / 1000) : "";
  $(session && session.group ? "group-call-timer" : "call-timer").textContent = text;
}

for (const [hangup, mute, camera] of [["btn-hangup", "btn-mute", "btn-camera"], ["group-leave", "group-mute", "group-camera"]]) {
  $(hangup).addEventListener("click", () => state.session && state.session.hangup());
  $(mute).addEventListener("click", () => state.session && state.session.setMuted(!state.session.muted));
  $(camera).addEventListener("click", () => {
    const session = state.session;
    if (!session) return;
    session.setCameraOff(!session.cameraOff).catch((error) => toast(`Camera: ${error.message}`));
  });
}
$("btn-report").addEventListener("click", () => state.session && report(state.session.callId, state.session.peer));
$("btn-block").addEventListener("click", () => state.session && block(state.session.peer));

// ------------------------------------------------------------------ group call screen

// One tile per participant, us first; kept across renders (a video element keeps playing).
function renderGroupCall(session) {
  if (state.session !== session) return;
  $("group-call-name").textContent = session.group;
  $("group-call-status").textContent = session.status;
  $("group-call").classList.toggle("reconnecting", session.reconnecting);
  $("group-e2ee").hidden = !session.fingerprint;
  const grid = $("group-grid");
  const video = session.media === "video";
  const self = {
    user: state.me, self: true, stream: session.local, fingerprint: session.fingerprint,
    audio: session.muted ? "muted" : "on", video: session.cameraOff || !video ? "off" : "on",
    connection: "connected", speaking: session.activeSpeaker === state.me, verified: true,
  };
  const tiles = [self, ...session.tiles()];
  const keep = new Set(tiles.map((t) => t.user));
  for (const tile of [...grid.children]) if (!keep.has(tile.dataset.user)) tile.remove();
  tiles.forEach((t, i) => {
    const tile = groupTile(grid, t, video);
    if (grid.children[i] !== tile) grid.insertBefore(tile, grid.children[i] || null);
  });
  renderControls(session, "group-call-quality", "group-mute", "group-camera");
}

function groupTile(grid, t, video) {
  let tile = [...grid.children].find((c) => c.dataset.user === t.user);
  if (!tile) {
    const a = el("span", { class: "avatar large tile-avatar" });
    avatar(a, t.user);
    const media = el("video", { autoplay: true, playsInline: true, muted: !!t.self, "data-testid": `tile-video-${t.user}` });
    tile = el("div", { class: `tile${t.self ? " self" : ""}`, "data-testid": `tile-${t.user}`, "data-user": t.user },
      a, media,
      el("div", { class: "tile-bar" },
        el("span", { class: "tile-name" }, t.self ? `${t.user} (you)` : t.user),
        el("span", { class: "peer-muted", "data-testid": `tile-muted-${t.user}`, hidden: true }, icon("mic-off"), "Muted"),
        el("span", { class: "tile-state", "data-testid": `tile-state-${t.user}` }),
        el("span", { class: "tile-fp", title: "Key fingerprint" }, icon("lock"),
          el("code", { class: "tile-fingerprint", "data-testid": `fingerprint-${t.user}` }))));
  }
  const media = tile.querySelector("video");
  if (t.stream && media.srcObject !== t.stream) media.srcObject = t.stream;
  if (!t.stream && media.srcObject) media.srcObject = null;
  const showVideo = video && t.video === "on" && !!t.stream;
  media.hidden = !showVideo; // hidden, it still plays the participant's sound
  tile.classList.toggle("has-video", showVideo);
  tile.classList.toggle("speaking", !!t.speaking);
  tile.dataset.verified = String(!!t.verified);
  tile.dataset.audio = t.audio;
  tile.dataset.video = t.video;
  tile.querySelector(".peer-muted").hidden = t.audio !== "muted";
  const status = t.connection === "reconnecting" ? "Reconnecting…"
    : video && t.video === "off" ? "Camera off" : !t.stream && !t.self ? "Connecting…" : "";
  tile.querySelector(".tile-state").textContent = status;
  tile.querySelector(".tile-fingerprint").textContent = t.fingerprint || "";
  return tile;
}

// ------------------------------------------------------------------ boot

for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
$("signout").addEventListener("click", signOut);
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn(async () => $("token-input").value.trim());
});
window.addEventListener("beforeunload", () => {
  if (state.session && !state.session.ended) state.session.hangup();
});
window.addEventListener("focus", () => state.api && state.view === "inbox" && refreshPermissions());

// For tests and the curious: the live state of this tab.
window.dmcall = {
  get me() { return state.me; },
  get deviceId() { return state.deviceId; },
  get session() { return state.session; },
  get ringing() { return [...state.ringing.keys()]; },
};

async function boot() {
  state.config = await loadConfig();
  const token = localStorage.getItem(TOKEN_KEY);
  if (token && tokenSubject(token)) startApp(token);
  else showSignIn();
}

boot().catch((error) => {
  document.body.textContent = `dmcall could not start: ${error.message}`;
});
