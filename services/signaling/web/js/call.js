// One call on this device: local media, the key agreement, the connection to the SFU,
// the frame encryption worker, and the numbers the call screen shows.

import { KeyAgreement } from "./e2ee.js";

const KEY_WAIT_MS = 15000;
const ICE_GATHER_MS = 5000;

export class CallSession extends EventTarget {
  constructor({ api, socket, call, role, deviceId }) {
    super();
    this.api = api;
    this.socket = socket;
    this.call = call;
    this.callId = call.call_id;
    this.role = role; // "caller" | "callee"
    this.peer = role === "caller" ? call.callee : call.caller;
    this.media = call.media;
    this.deviceId = deviceId;
    this.status = role === "caller" ? "Calling…" : "Connecting…";
    this.local = null;
    this.remote = new MediaStream();
    this.pc = null;
    this.worker = null;
    this.keys = null;
    this.safetyCode = null;
    this.peerKey = null;
    this.peerKeyWaiters = [];
    this.sentKey = false;
    this.connectedAt = null;
    this.quality = null;
    this.ended = false;
    this.session = null;
    this.mediaToken = null;
    this.statsTimer = null;
    this.lastStats = null;
    this.cameraStartsOff = false;
  }

  changed() { this.dispatchEvent(new Event("change")); }

  // One getUserMedia per call, however many times it is asked for.
  startLocalMedia() {
    if (!this.localPromise) {
      const promise = navigator.mediaDevices.getUserMedia({
        audio: true,
        video: this.media === "video" ? { width: 640, height: 480 } : false,
      }).then((stream) => {
        if (this.ended || this.localPromise !== promise) {
          for (const track of stream.getTracks()) track.stop();
          if (this.ended) throw new Error("call already over");
          return this.startLocalMedia(); // asked for the other kind meanwhile (adoptMedia)
        }
        if (this.cameraStartsOff) for (const track of stream.getVideoTracks()) track.enabled = false;
        this.local = stream;
        this.changed();
        return stream;
      });
      this.localPromise = promise;
    }
    return this.localPromise;
  }

  // Glare: the call that survived may be audio where we placed a video call, or the other
  // way round. The call is what the surviving call is: no camera in an audio call; and
  // whoever asked for an audio call joins a video call with the camera off (one tap on).
  adoptMedia(media) {
    if (!media || media === this.media) return;
    this.cameraStartsOff = this.media === "audio" && media === "video";
    this.media = media;
    this.localPromise = null; // one still pending stops its tracks when it resolves
    if (this.local) for (const track of this.local.getTracks()) track.stop();
    this.local = null;
    this.changed();
  }

  // One key pair per call (a second one would not match the public key already sent).
  prepareKeys() {
    if (!this.agreementPromise) {
      this.agreementPromise = KeyAgreement.create().then((agreement) => { this.agreement = agreement; });
    }
    return this.agreementPromise;
  }

  sendKey(ack = false) {
    this.sentKey = this.socket.signal(this.callId, {
      kind: "e2ee-key", v: 1, alg: "ECDH-P256", public_key: this.agreement.publicKey, ack,
    }) || this.sentKey;
  }

  // A call.signal from the other party for this call.
  async onSignal(message) {
    const payload = message.payload || {};
    if (payload.kind !== "e2ee-key" || typeof payload.public_key !== "string") return;
    if (this.peerKey && this.peerKey !== payload.public_key) {
      // A second, different key mid-call would be someone else: refuse to switch.
      this.fail("The other side's encryption key changed; call ended for safety");
      return;
    }
    const first = this.peerKey === null;
    this.peerKey = payload.public_key;
    // The peer may have sent its key before we were listening; answer once so both have both.
    if (first && !payload.ack && this.agreement) this.sendKey(true);
    for (const resolve of this.peerKeyWaiters.splice(0)) resolve();
  }

  waitPeerKey() {
    if (this.peerKey) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.peerKeyWaiters.push(resolve);
      setTimeout(() => reject(new Error("no encryption key from the other side")), KEY_WAIT_MS);
    });
  }

  // Both sides, once the call is accepted: agree keys, then connect to the SFU.
  async start(grant) {
    const { media_url: mediaUrl, media_token: mediaToken } = grant;
    try {
      this.status = "Securing…";
      this.changed();
      await this.prepareKeys();
      await this.startLocalMedia();
      this.sendKey();
      await this.waitPeerKey();
      if (this.ended) return;
      this.keys = await this.agreement.derive(this.peerKey, this.callId, this.role);
      this.safetyCode = this.keys.safetyCode;
      this.status = "Connecting…";
      this.changed();
      await this.connect(mediaUrl, mediaToken, await this.iceServers(grant));
    } catch (error) {
      if (!this.ended) this.fail(error.message || String(error));
    }
  }

  // The hand-off carries this party's ICE servers (TURN credentials minted at accept); a
  // signaling that does not send them (an older one, mid-upgrade) is asked directly.
  // None configured, or none to be had: host candidates only, as the SFU is the only peer.
  async iceServers(grant) {
    if (Array.isArray(grant.ice_servers)) return grant.ice_servers;
    try {
      const body = await this.api.iceServers();
      return Array.isArray(body && body.ice_servers) ? body.ice_servers : [];
    } catch {
      return [];
    }
  }

  async connect(mediaUrl, mediaToken, iceServers = []) {
    this.mediaToken = mediaToken;
    const worker = new Worker("/web/js/e2ee-worker.js", { name: `e2ee-${this.callId}` });
    this.worker = worker;
    worker.postMessage({ type: "keys", sendKey: this.keys.sendKey, receiveKey: this.keys.receiveKey });

    // RTCRtpScriptTransform where there is one (Chromium, Safari, Firefox); Chromium's older
    // createEncodedStreams otherwise. Without either, no call: never media in the clear.
    const scriptTransform = typeof RTCRtpScriptTransform !== "undefined" && !useEncodedStreams();
    const encodedStreams = !scriptTransform && "createEncodedStreams" in RTCRtpSender.prototype;
    if (!scriptTransform && !encodedStreams) {
      throw new Error("This browser cannot encrypt calls end to end");
    }
    const pc = new RTCPeerConnection({
      iceServers, bundlePolicy: "max-bundle", encodedInsertableStreams: encodedStreams,
    });
    this.pc = pc;
    const audioTrack = this.local.getAudioTracks()[0] || null;
    const videoTrack = this.local.getVideoTracks()[0] || null;
    const audio = pc.addTransceiver(audioTrack || "audio", { direction: "sendrecv", streams: [this.local] });
    const video = pc.addTransceiver(videoTrack || "video", { direction: "sendrecv", streams: [this.local] });
    // VP8 only: the clear header the worker leaves is VP8's, and the SFU forwards one codec.
    const caps = RTCRtpReceiver.getCapabilities("video");
    if (caps && video.setCodecPreferences) {
      const vp8 = caps.codecs.filter((c) => /^video\/(vp8|rtx)$/i.test(c.mimeType));
      if (vp8.length) video.setCodecPreferences(vp8);
    }
    for (const [kind, transceiver] of [["audio", audio], ["video", video]]) {
      for (const [operation, end] of [["encrypt", transceiver.sender], ["decrypt", transceiver.receiver]]) {
        if (scriptTransform) {
          end.transform = new RTCRtpScriptTransform(worker, { operation, kind });
        } else {
          const { readable, writable } = end.createEncodedStreams();
          worker.postMessage({ type: "streams", operation, kind, readable, writable }, [readable, writable]);
        }
      }
    }
    this.transformApi = scriptTransform ? "RTCRtpScriptTransform" : "createEncodedStreams";
    pc.ontrack = (event) => {
      this.remote.addTrack(event.track);
      this.changed();
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected" && !this.connectedAt) {
        this.connectedAt = Date.now();
        this.status = "";
        this.changed();
      } else if (pc.connectionState === "failed") {
        this.fail("Connection failed");
      }
    };

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    const { answer, location } = await this.api.joinMedia(mediaUrl, mediaToken, pc.localDescription.sdp);
    this.session = location;
    if (this.ended) return;
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    this.statsTimer = setInterval(() => this.pollStats(), 1000);
  }

  async pollStats() {
    if (!this.pc) return;
    const report = await this.pc.getStats();
    const s = { framesDecoded: 0, framesEncoded: 0, packetsReceived: 0, packetsLost: 0, rtt: null, bytesReceived: 0 };
    report.forEach((r) => {
      if (r.type === "inbound-rtp") {
        s.packetsReceived += r.packetsReceived || 0;
        s.packetsLost += Math.max(0, r.packetsLost || 0);
        s.bytesReceived += r.bytesReceived || 0;
        if (r.kind === "video") s.framesDecoded += r.framesDecoded || 0;
      } else if (r.type === "outbound-rtp" && r.kind === "video") {
        s.framesEncoded += r.framesEncoded || 0;
      } else if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime !== undefined) {
        s.rtt = r.currentRoundTripTime;
      }
    });
    const prev = this.lastStats;
    this.lastStats = s;
    if (!prev) return;
    const received = s.packetsReceived - prev.packetsReceived;
    const lost = s.packetsLost - prev.packetsLost;
    const loss = received + lost > 0 ? lost / (received + lost) : 0;
    let quality;
    if (received === 0) quality = "poor";
    else if (loss < 0.02 && (s.rtt === null || s.rtt < 0.3)) quality = "good";
    else if (loss < 0.08 && (s.rtt === null || s.rtt < 0.6)) quality = "fair";
    else quality = "poor";
    this.quality = quality;
    this.changed();
  }

  // What the encryption worker counted; with the first received key frame as it came
  // through the SFU ("wire") and after decryption ("plain").
  e2eeStats() {
    if (!this.worker) return Promise.resolve(null);
    const id = Math.random();
    return new Promise((resolve) => {
      const listener = (event) => {
        if (event.data.type === "stats" && event.data.id === id) {
          this.worker.removeEventListener("message", listener);
          resolve(event.data);
        }
      };
      this.worker.addEventListener("message", listener);
      this.worker.postMessage({ type: "stats", id });
    });
  }

  setMuted(muted) {
    for (const track of this.local ? this.local.getAudioTracks() : []) track.enabled = !muted;
    this.changed();
  }
  get muted() { return !!this.local && this.local.getAudioTracks().every((t) => !t.enabled); }

  setCameraOff(off) {
    for (const track of this.local ? this.local.getVideoTracks() : []) track.enabled = !off;
    this.changed();
  }
  get cameraOff() { return !!this.local && this.local.getVideoTracks().every((t) => !t.enabled); }

  async hangup() {
    if (this.ended) return;
    this.finish("Call ended");
    try { await this.api.hangup(this.callId); } catch { /* already final */ }
  }

  fail(reason) {
    if (this.ended) return;
    this.finish(reason);
    this.api.hangup(this.callId).catch(() => {});
  }

  // Local teardown; `reason` is shown to the person.
  finish(reason) {
    if (this.ended) return;
    this.ended = true;
    this.endReason = reason;
    clearInterval(this.statsTimer);
    if (this.session) this.api.leaveMedia(this.session, this.mediaToken);
    if (this.pc) this.pc.close();
    if (this.worker) this.worker.terminate();
    if (this.local) for (const track of this.local.getTracks()) track.stop();
    for (const track of this.remote.getTracks()) track.stop();
    this.dispatchEvent(new Event("end"));
  }
}

// ?e2ee=encoded-streams tries the older API where both exist.
function useEncodedStreams() {
  return new URLSearchParams(location.search).get("e2ee") === "encoded-streams";
}

function iceGatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHER_MS);
  });
}
