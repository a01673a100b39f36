// The device's WebSocket to signaling: call.incoming / call.state / call.signal in, and
// call.signal / ping out. Reconnects with backoff; on every (re)connect the server sends
// a call.incoming for each call ringing for us now.

export class SignalingSocket extends EventTarget {
  constructor(baseUrl, token, deviceId) {
    super();
    this.url = `${baseUrl.replace(/^http/, "ws")}/v1/ws?token=${encodeURIComponent(token)}&device_id=${encodeURIComponent(deviceId)}`;
    this.socket = null;
    this.closed = false;
    this.backoff = 500;
    this.pingTimer = null;
  }

  connect() {
    if (this.closed) return;
    const socket = new WebSocket(this.url);
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
      // 4401: our token is refused; 4409: this device connected again elsewhere.
      if (this.closed || event.code === 4401 || event.code === 4409) return;
      setTimeout(() => this.connect(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, 10000);
    };
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

  signal(callId, payload) { return this.send({ type: "call.signal", call_id: callId, payload }); }

  close() {
    this.closed = true;
    clearInterval(this.pingTimer);
    if (this.socket) this.socket.close();
  }
}
