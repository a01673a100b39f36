// The device's WebSocket to signaling: call.incoming / call.state / call.signal in, and
// call.signal / ping / auth.refresh out. Reconnects with backoff; on every (re)connect the
// server sends a call.incoming for each call ringing for us now.
//
// Close codes (docs/signaling.md): 4401 token refused and 4409 this device connected
// again elsewhere: stop. 4429 the user has too many devices connected and this was the
// oldest: stop (reconnecting would close another of the user's devices, and so on).
// 4419 the token expired: reconnect at once with a fresh token from getToken(true).

export const CLOSE = {
  BAD_REQUEST: 4400,
  UNAUTHORIZED: 4401,
  REPLACED: 4409,
  TOKEN_EXPIRED: 4419,
  TOO_MANY_DEVICES: 4429,
};
const FINAL_CLOSES = new Set([CLOSE.BAD_REQUEST, CLOSE.UNAUTHORIZED, CLOSE.REPLACED, CLOSE.TOO_MANY_DEVICES]);

export class SignalingSocket extends EventTarget {
  // getToken(expired): the token to connect with now, a new one if ``expired`` (may return
  // a promise; null: give up).
  constructor(baseUrl, getToken, deviceId) {
    super();
    this.baseUrl = baseUrl.replace(/^http/, "ws");
    this.getToken = typeof getToken === "function" ? getToken : () => getToken;
    this.deviceId = deviceId;
    this.socket = null;
    this.closed = false;
    this.backoff = 500;
    this.pingTimer = null;
  }

  async connect(expired = false) {
    if (this.closed) return;
    let token;
    try {
      token = await this.getToken(expired);
    } catch {
      token = undefined;
    }
    if (token === null || this.closed) return;
    if (token === undefined) return this.retry(); // could not get one now: try again
    const url = `${this.baseUrl}/v1/ws?token=${encodeURIComponent(token)}&device_id=${encodeURIComponent(this.deviceId)}`;
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.backoff = 500;
      this.emit("open", {});
      this.pingTimer = setInterval(() => this.send({ type: "ping" }), 20000);
    };
    socket.onmessage = (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      if (message && typeof message.type === "string") this.emit(message.type, message);
    };
    socket.onclose = (event) => {
      clearInterval(this.pingTimer);
      this.emit("close", { code: event.code });
      if (this.closed || FINAL_CLOSES.has(event.code)) return;
      if (event.code === CLOSE.TOKEN_EXPIRED) {
        this.backoff = 500;
        this.connect(true);
        return;
      }
      this.retry();
    };
  }

  retry() {
    setTimeout(() => this.connect(), this.backoff);
    this.backoff = Math.min(this.backoff * 2, 10000);
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  on(type, handler) { this.addEventListener(type, (event) => handler(event.detail)); }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  // ``to``: the participant it is for (a group call's pairwise key exchange).
  signal(callId, payload, to = null) {
    return this.send(to ? { type: "call.signal", call_id: callId, to, payload } : { type: "call.signal", call_id: callId, payload });
  }

  // Hand the open socket a fresh token of the same user: it then lives until that one expires.
  refreshToken(token) { return this.send({ type: "auth.refresh", token }); }

  close() {
    this.closed = true;
    clearInterval(this.pingTimer);
    if (this.socket) this.socket.close();
  }
}
