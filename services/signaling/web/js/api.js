// HTTP clients for the four services. Tokens are bearer tokens (never cookies).

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

export async function loadConfig() {
  const response = await fetch("/config.json", { cache: "no-store" });
  const config = await response.json();
  // Query parameters override, e.g. ?policy=http://host:8002 (handy behind odd proxies).
  const params = new URLSearchParams(location.search);
  for (const name of ["policy", "notifications"]) {
    if (params.get(name)) config[`${name}_url`] = params.get(name).replace(/\/$/, "");
  }
  // Empty: the same origin (one ingress routing every service by path prefix).
  for (const name of ["policy", "notifications"]) {
    if (!config[`${name}_url`]) config[`${name}_url`] = location.origin;
  }
  config.signaling_url = location.origin;
  return config;
}

export function tokenSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    if (typeof claims.sub !== "string") return null;
    if (claims.exp && claims.exp * 1000 < Date.now()) return null;
    return claims.sub;
  } catch {
    return null;
  }
}

// When the token expires (ms since the epoch), or null if it does not say.
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

export async function devToken(user) {
  const response = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body);
  return body.token;
}

export class Api {
  constructor(config, token) {
    this.config = config;
    this.token = token;
  }

  async request(base, path, { method = "GET", json, body, headers = {} } = {}) {
    const init = { method, headers: { Authorization: `Bearer ${this.token}`, ...headers } };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (body !== undefined) {
      init.body = body;
    }
    const response = await fetch(base + path, init);
    const text = await response.text();
    let parsed = null;
    try { parsed = text ? JSON.parse(text) : null; } catch { parsed = { message: text }; }
    if (!response.ok) throw new ApiError(response.status, parsed);
    return parsed;
  }

  signaling(path, options) { return this.request(this.config.signaling_url, path, options); }
  policy(path, options) { return this.request(this.config.policy_url, path, options); }
  notifications(path, options) { return this.request(this.config.notifications_url, path, options); }

  // signaling
  placeCall(callee, media, deviceId) {
    return this.signaling("/v1/calls", {
      method: "POST", json: { callee, media, device_id: deviceId },
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
  }
  getCall(callId) { return this.signaling(`/v1/calls/${callId}`); }
  // Group calls: start one in a group conversation, join one going, find the one going (404: none).
  placeGroupCall(group, media, deviceId) {
    return this.signaling("/v1/calls", {
      method: "POST", json: { group, media, device_id: deviceId },
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
  }
  join(callId, deviceId) {
    return this.signaling(`/v1/calls/${callId}/join`, { method: "POST", json: { device_id: deviceId } });
  }
  groupCall(group) { return this.signaling(`/v1/groups/${encodeURIComponent(group)}/call`); }
  accept(callId, deviceId) {
    return this.signaling(`/v1/calls/${callId}/accept`, { method: "POST", json: { device_id: deviceId } });
  }
  decline(callId) { return this.signaling(`/v1/calls/${callId}/decline`, { method: "POST", json: {} }); }
  // A fresh media grant for an answered call, on a live node (the call moved if its node is gone).
  media(callId) { return this.signaling(`/v1/calls/${callId}/media`, { method: "POST", json: {} }); }
  hangup(callId) { return this.signaling(`/v1/calls/${callId}/hangup`, { method: "POST", json: {} }); }
  history(limit = 50) { return this.signaling(`/v1/calls?limit=${limit}`); }
  ringState() { return this.signaling("/v1/ring-state"); }
  iceServers() { return this.signaling("/v1/ice-servers"); }

  // policy
  permission(callee) { return this.policy(`/v1/permissions/${encodeURIComponent(callee)}`); }
  groups() { return this.policy("/v1/groups"); }
  groupPermission(group) { return this.policy(`/v1/permissions/groups/${encodeURIComponent(group)}`); }
  getSettings() { return this.policy("/v1/settings"); }
  putSettings(settings) { return this.policy("/v1/settings", { method: "PUT", json: settings }); }
  report(callId, reportedUser, reason) {
    return this.policy("/v1/reports", {
      method: "POST", json: { call_id: callId, reported_user: reportedUser, reason },
    });
  }
  block(user) { return this.policy(`/v1/blocks/${encodeURIComponent(user)}`, { method: "PUT" }); }
  unblock(user) { return this.policy(`/v1/blocks/${encodeURIComponent(user)}`, { method: "DELETE" }); }

  // notifications
  listNotifications() { return this.notifications("/v1/notifications"); }
  markRead(id) { return this.notifications(`/v1/notifications/${id}/read`, { method: "POST" }); }
  streamUrl(lastEventId) {
    const params = new URLSearchParams({ token: this.token });
    if (lastEventId) params.set("last_event_id", lastEventId);
    return `${this.config.notifications_url}/v1/notifications/stream?${params}`;
  }

  // media (SFU): the SDP offer goes to the media node with the media token
  // (a node that does not answer within ``timeoutMs`` is given up: the caller tries another
  // grant; ``signal`` aborts it sooner)
  async joinMedia(mediaUrl, mediaToken, offerSdp, timeoutMs = 8000, signal = null) {
    const timeout = AbortSignal.timeout(timeoutMs);
    const response = await fetch(mediaUrl, {
      method: "POST",
      headers: { Authorization: `Bearer ${mediaToken}`, "Content-Type": "application/sdp" },
      body: offerSdp,
      signal: signal ? AbortSignal.any([timeout, signal]) : timeout,
    });
    const text = await response.text();
    if (!response.ok) {
      let parsed = null;
      try { parsed = JSON.parse(text); } catch { parsed = { message: text }; }
      throw new ApiError(response.status, parsed);
    }
    const location = response.headers.get("Location");
    return { answer: text, location: location ? new URL(location, mediaUrl).href : null };
  }
  leaveMedia(sessionUrl, mediaToken) {
    return fetch(sessionUrl, { method: "DELETE", headers: { Authorization: `Bearer ${mediaToken}` } })
      .catch(() => {});
  }
}
