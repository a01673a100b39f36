// One call on this device: local media, the key agreement, the connection to the SFU
// (rejoined by itself when it breaks or the call moves to another media node), the frame
// encryption worker, the in-call state of both parties, and the numbers the call screen shows.

import { ApiError } from "./api.js";
import { KeyAgreement } from "./e2ee.js";

const KEY_WAIT_MS = 15000;
const ICE_GATHER_MS = 5000;
// Rejoin (docs/web-client.md, "Calls that survive").
const STALL_MS = 2000; // nothing at all from the SFU this long (not even its RTCP): rejoin
const JOIN_TIMEOUT_MS = 8000; // a media node that has not answered the offer by then is given up
const LINK_CONNECT_MS = 10000; // a new peer connection not connected by then is given up
const HANDOVER_MS = 3000; // the old connection is kept at most this long for the new one's media
const BACKOFF_BASE_MS = 250;
const BACKOFF_MAX_MS = 5000;
const FINAL_STATES = new Set(["ended", "rejected", "declined", "cancelled", "missed", "busy"]);

// The call is over (signaling or the media node said so): stop rejoining.
class CallOver extends Error {}

// One peer connection to one media node, with its own SFU session and remote tracks.
class MediaLink {
  constructor(session, grant, iceServers) {
    this.session = session;
    this.grant = grant;
    this.nodeId = grant.node_id || null;
    this.mediaToken = grant.media_token;
    this.sessionUrl = null;
    this.remote = new MediaStream();
    this.closed = false;
    this.abort = new AbortController(); // closing the link cuts its join short
    const { scriptTransform, encodedStreams } = session.transforms;
    const pc = new RTCPeerConnection({
      iceServers, bundlePolicy: "max-bundle", encodedInsertableStreams: encodedStreams,
    });
    this.pc = pc;
    const local = session.local;
    const audioTrack = local.getAudioTracks()[0] || null;
    const videoTrack = local.getVideoTracks()[0] || null;
    // Always one audio and one video transceiver, in an audio call too (video then sends
    // nothing): turning the camera on later is a replaceTrack, not a renegotiation.
    const audio = pc.addTransceiver(audioTrack || "audio", { direction: "sendrecv", streams: [local] });
    const video = pc.addTransceiver(videoTrack || "video", { direction: "sendrecv", streams: [local] });
    this.audio = audio;
    this.video = video;
    // VP8 only: the clear header the worker leaves is VP8's, and the SFU forwards one codec.
    const caps = RTCRtpReceiver.getCapabilities("video");
    if (caps && video.setCodecPreferences) {
      const vp8 = caps.codecs.filter((c) => /^video\/(vp8|rtx)$/i.test(c.mimeType));
      if (vp8.length) video.setCodecPreferences(vp8);
    }
    // The same worker, so the same keys (and one IV counter) on every connection of the call.
    const worker = session.worker;
    this.transform = (end, operation, kind, slot = null) => {
      if (scriptTransform) {
        end.transform = new RTCRtpScriptTransform(worker, slot === null ? { operation, kind } : { operation, kind, slot });
      } else {
        const { readable, writable } = end.createEncodedStreams();
        worker.postMessage({ type: "streams", operation, kind, slot, readable, writable }, [readable, writable]);
      }
    };
    // (A group call tags each receiver with its slot: the own pair is slot 0.)
    const ownSlot = session.beginLink ? session.beginLink(this) : null;
    for (const [kind, transceiver] of [["audio", audio], ["video", video]]) {
      this.transform(transceiver.sender, "encrypt", kind);
      this.transform(transceiver.receiver, "decrypt", kind, ownSlot);
    }
    // A group call adds its receive slots and the SFU's data channel (web/js/group.js).
    if (session.setupLink) session.setupLink(this);
    pc.ontrack = (event) => {
      if (session.onLinkTrack && session.onLinkTrack(this, event)) return;
      this.remote.addTrack(event.track);
      session.changed();
    };
    const watch = () => session.onLinkState(this);
    pc.addEventListener("connectionstatechange", watch);
    pc.addEventListener("iceconnectionstatechange", watch);
  }

  // Offer to the media node; the answer comes back in the response.
  async join() {
    const pc = this.pc;
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    if (this.closed) throw new Error("link closed");
    const { answer, location } = await this.session.api.joinMedia(
      this.grant.media_url, this.mediaToken, pc.localDescription.sdp, JOIN_TIMEOUT_MS,
      this.abort.signal,
    );
    this.sessionUrl = location;
    if (this.closed) throw new Error("link closed");
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
  }

  connected(timeoutMs) {
    const pc = this.pc;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => done(new Error("media connection timed out")), timeoutMs);
      const check = () => {
        if (pc.connectionState === "connected") done(null);
        else if (pc.connectionState === "failed" || pc.connectionState === "closed" || this.closed) {
          done(new Error(`media connection ${pc.connectionState}`));
        }
      };
      const done = (error) => {
        clearTimeout(timer);
        pc.removeEventListener("connectionstatechange", check);
        this.abort.signal.removeEventListener("abort", check);
        if (error) reject(error); else resolve();
      };
      pc.addEventListener("connectionstatechange", check);
      this.abort.signal.addEventListener("abort", check);
      check();
    });
  }

  async packetsReceived() {
    let packets = 0;
    (await this.pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp") packets += r.packetsReceived || 0;
    });
    return packets;
  }

  // Make-before-break: until the new connection carries the other party's media (or
  // ``timeoutMs`` passed), the old one stays on screen.
  async firstMedia(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) {
      if (await this.packetsReceived() > 0) return;
      await sleep(100);
    }
  }

  async setVideoTrack(track) {
    if (!this.closed) await this.video.sender.replaceTrack(track);
  }

  // Leave the node (with the user's token: the media token may have expired by now).
  close(userToken) {
    if (this.closed) return;
    this.closed = true;
    this.abort.abort();
    if (this.sessionUrl) this.session.api.leaveMedia(this.sessionUrl, userToken);
    this.pc.close();
    for (const track of this.remote.getTracks()) track.stop();
  }
}

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
    this.link = null; // the peer connection in use
    this.candidate = null; // a new one being joined (make-before-break)
    this.grant = null; // the latest media grant: media_url, media_token, node_id, ice_servers
    this.worker = null;
    this.transforms = null;
    this.keys = null;
    this.safetyCode = null;
    this.peerKey = null;
    this.peerKeyWaiters = [];
    this.sentKey = false;
    this.connectedAt = null;
    this.quality = null;
    this.ended = false;
    this.statsTimer = null;
    this.lastStats = null;
    this.cameraStartsOff = false;
    // Rejoin.
    this.joining = false;
    this.joinAgain = false;
    this.pendingGrant = false;
    this.wake = null;
    this.reconnecting = false;
    this.rejoins = 0; // completed rejoins (for the curious and the tests)
    this.inboundBytes = 0;
    this.inboundAt = 0;
    // What the other party said of itself (call.peer).
    this.peerState = { connection: "connected", audio: "on", video: call.media === "video" ? "on" : "off" };
  }

  changed() { this.dispatchEvent(new Event("change")); }

  get pc() { return this.link ? this.link.pc : null; }
  get nodeId() { return this.link ? this.link.nodeId : null; }
  get session() { return this.link ? this.link.sessionUrl : null; }
  get mediaToken() { return this.link ? this.link.mediaToken : null; }

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
    try {
      this.grant = grant;
      this.status = "Securing…";
      this.changed();
      await this.prepareKeys();
      await this.startLocalMedia();
      if (!(await this.secure())) return;
      this.status = "Connecting…";
      this.changed();
      this.statsTimer = setInterval(() => this.pollStats(), 1000);
      // The grant of the hand-off (or a newer one from call.media) first.
      this.pendingGrant = true;
      await this.joinLoop("start");
    } catch (error) {
      if (!this.ended) this.fail(error.message || String(error));
    }
  }

  // The call's keys, agreed with the other party, and its encryption worker started with
  // them; false if the call ended meanwhile.
  async secure() {
    this.sendKey();
    await this.waitPeerKey();
    if (this.ended) return false;
    this.keys = await this.agreement.derive(this.peerKey, this.callId, this.role);
    this.safetyCode = this.keys.safetyCode;
    this.startWorker();
    return true;
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

  // The call's encryption worker: one per call, whatever the connections (the keys belong
  // to the call, not to the transport).
  startWorker() {
    // RTCRtpScriptTransform where there is one (Chromium, Safari, Firefox); Chromium's older
    // createEncodedStreams otherwise. Without either, no call: never media in the clear.
    const scriptTransform = typeof RTCRtpScriptTransform !== "undefined" && !useEncodedStreams();
    const encodedStreams = !scriptTransform && "createEncodedStreams" in RTCRtpSender.prototype;
    if (!scriptTransform && !encodedStreams) {
      throw new Error("This browser cannot encrypt calls end to end");
    }
    this.transforms = { scriptTransform, encodedStreams };
    this.transformApi = scriptTransform ? "RTCRtpScriptTransform" : "createEncodedStreams";
    const worker = new Worker("/web/js/e2ee-worker.js", { name: `e2ee-${this.callId}` });
    this.worker = worker;
    this.installKeys(worker);
  }

  installKeys(worker) {
    worker.postMessage({ type: "keys", sendKey: this.keys.sendKey, receiveKey: this.keys.receiveKey });
  }

  // ------------------------------------------------------------------ rejoin

  // Asks for a new connection to the SFU: the current one broke (``reason``), or the call
  // moved (``grant`` from call.media). One join loop at a time; a new grant wakes it.
  rejoin(reason, grant = null) {
    if (this.ended) return;
    if (grant) {
      this.grant = grant;
      this.pendingGrant = true;
    }
    if (!this.keys || !this.worker) return; // not connected yet: start() uses the newest grant
    if (this.joining) {
      if (grant) {
        this.joinAgain = true;
        // An attempt still going to another node is dropped for the new grant at once.
        const candidate = this.candidate;
        if (candidate && candidate.nodeId !== grant.node_id) candidate.close(this.api.token);
        if (this.wake) this.wake();
      }
      return;
    }
    console.info(`dmcall: rejoin (${reason})`);
    this.joinLoop(reason).catch((error) => { if (!this.ended) this.fail(error.message || String(error)); });
  }

  async joinLoop(reason) {
    this.joining = true;
    // A deploy (node_draining) keeps the old node forwarding: nothing for the user to see.
    if (this.link && reason !== "node_draining") {
      this.reconnecting = true;
      this.status = "Reconnecting…";
      this.changed();
    }
    let failures = 0;
    try {
      while (!this.ended) {
        this.joinAgain = false;
        let link = null;
        try {
          let grant = this.grant;
          if (this.pendingGrant) this.pendingGrant = false;
          else grant = await this.freshGrant();
          link = new MediaLink(this, grant, await this.iceServers(grant));
          this.candidate = link;
          await link.join();
          await link.connected(LINK_CONNECT_MS);
          if (this.link) await link.firstMedia(HANDOVER_MS);
          if (this.ended) return;
          if (link.closed) throw new Error("dropped for a newer grant");
          this.promote(link);
          link = null;
          if (!this.joinAgain) return;
        } catch (error) {
          if (link) link.close(this.api.token);
          if (this.ended) return;
          if (error instanceof CallOver) return;
          if (error instanceof ApiError && (error.status === 409 || error.status === 404)) {
            await this.checkOver(); // throws CallOver if the call has ended
          }
          failures += 1;
          // A media node that refused (401/403 token, 503 draining or full, 409) or did not
          // answer: ask signaling for a fresh grant on a live node next time.
          console.info(`dmcall: join attempt ${failures} failed: ${error.message || error}`);
          if (!this.pendingGrant) await this.backoff(failures); // a new grant: at once
        } finally {
          if (this.candidate && this.candidate.closed) this.candidate = null;
        }
      }
    } catch (error) {
      if (!(error instanceof CallOver)) throw error;
    } finally {
      this.joining = false;
      this.candidate = null;
    }
  }

  // POST /v1/calls/{id}/media: a grant on a live node (signaling moves the call if its node
  // is gone). Signaling unreachable: the grant we have (its node may be fine).
  async freshGrant() {
    try {
      const grant = await this.api.media(this.callId);
      if (!this.pendingGrant) this.grant = grant; // a call.media meanwhile is newer
    } catch (error) {
      if (error instanceof ApiError && (error.status === 409 || error.status === 404 || error.status === 403)) {
        await this.checkOver();
      }
    }
    this.pendingGrant = false;
    return this.grant;
  }

  // Ends the session if signaling says the call is over (the "over" event carries the call).
  async checkOver() {
    let call;
    try {
      call = await this.api.getCall(this.callId);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) call = { call_id: this.callId, state: "ended" };
      else return;
    }
    if (call && FINAL_STATES.has(call.state)) {
      this.dispatchEvent(new CustomEvent("over", { detail: call }));
      if (!this.ended) this.finish("Call ended");
      throw new CallOver("call over");
    }
  }

  // Exponential backoff with full jitter; a call.media grant cuts it short.
  backoff(failures) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (failures - 1));
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    return new Promise((resolve) => {
      const timer = setTimeout(done, delay);
      function done() { clearTimeout(timer); resolve(); }
      this.wake = () => { this.wake = null; done(); };
    });
  }

  // The new connection carries media: it becomes the call's, the old one is closed.
  promote(link) {
    const old = this.link;
    this.link = link;
    this.candidate = null;
    this.remote = link.remote;
    this.inboundBytes = 0;
    this.inboundAt = Date.now();
    this.lastStats = null;
    if (old) {
      this.rejoins += 1;
      old.close(this.api.token);
    }
    if (!this.connectedAt) this.connectedAt = Date.now();
    this.reconnecting = false;
    this.status = "";
    this.sendMediaState();
    this.changed();
  }

  // A state change of one of our peer connections.
  onLinkState(link) {
    if (link !== this.link || this.ended) return;
    const { iceConnectionState, connectionState } = link.pc;
    if (connectionState === "failed" || iceConnectionState === "failed") this.rejoin("ice_failed");
    else if (iceConnectionState === "disconnected") this.rejoin("ice_disconnected");
  }

  // call.media: the call moved to another node (or this party should rejoin there).
  onMedia(message) {
    const { media_url, media_token, node_id, ice_servers, reason } = message;
    if (typeof media_url !== "string" || typeof media_token !== "string") return;
    const grant = { media_url, media_token, node_id, ice_servers };
    // Already there (our own rejoin got a grant on that node first): nothing to do.
    const target = this.candidate || this.link;
    if (target && node_id && target.nodeId === node_id && !(target === this.link && this.reconnecting)) {
      this.grant = grant;
      return;
    }
    this.rejoin(reason || "call.media", grant);
  }

  // ------------------------------------------------------------------ in-call state

  // call.peer: the other party's connection, microphone and camera.
  onPeer(message) {
    if (message.user && message.user !== this.peer) return;
    for (const field of ["connection", "audio", "video"]) {
      if (typeof message[field] === "string") this.peerState[field] = message[field];
    }
    // The other party turned its camera on in an audio call: the call is a video call now
    // (our camera stays off until we turn it on).
    if (message.video === "on" && this.media === "audio") {
      this.media = "video";
      this.sendMediaState(); // camera off here: the other side shows that, not a black picture
    }
    this.changed();
  }

  // The call became a video call (call.state after an upgrade).
  onUpgraded(media) {
    if (media === "video" && this.media === "audio") {
      this.media = "video";
      this.changed();
    }
  }

  mediaState() {
    return { audio: this.muted ? "muted" : "on", video: this.cameraOff ? "off" : "on" };
  }

  sendMediaState() {
    if (this.ended || !this.local || !this.keys) return; // only once in the call
    this.socket.send({ type: "call.media_state", call_id: this.callId, ...this.mediaState() });
  }

  // ------------------------------------------------------------------ stats

  async pollStats() {
    const link = this.link;
    if (!link) return;
    let report;
    try {
      report = await link.pc.getStats();
    } catch {
      report = new Map(); // closed under us: counts as nothing received
    }
    const s = { framesDecoded: 0, framesEncoded: 0, packetsReceived: 0, packetsLost: 0, rtt: null, bytesReceived: 0 };
    let transportBytes = 0;
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
      } else if (r.type === "transport") {
        transportBytes += r.bytesReceived || 0;
      }
    });
    if (link !== this.link || this.ended) return;
    this.watchInbound(transportBytes);
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

  // Everything the SFU sends counts (its RTCP too, so the other party going quiet is not
  // our connection breaking): nothing for STALL_MS and the connection is dead.
  watchInbound(bytes) {
    const now = Date.now();
    if (bytes > this.inboundBytes) {
      this.inboundBytes = bytes;
      this.inboundAt = now;
    } else if (now - this.inboundAt > STALL_MS) {
      this.inboundAt = now; // once per stall
      this.rejoin("no_media");
    }
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

  // ------------------------------------------------------------------ controls

  setMuted(muted) {
    for (const track of this.local ? this.local.getAudioTracks() : []) track.enabled = !muted;
    this.sendMediaState();
    this.changed();
  }
  get muted() { return !!this.local && this.local.getAudioTracks().every((t) => !t.enabled); }

  // Camera off / on; on in an audio call (no camera yet) opens the camera and makes the
  // call a video call: signaling upgrades it when call.media_state says video "on".
  async setCameraOff(off) {
    if (!this.local) return;
    if (!off && !this.local.getVideoTracks().length) {
      const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
      const track = stream.getVideoTracks()[0];
      if (this.ended) { track.stop(); return; }
      this.local.addTrack(track);
      this.media = "video";
      for (const link of [this.link, this.candidate]) if (link) await link.setVideoTrack(track);
    }
    for (const track of this.local.getVideoTracks()) track.enabled = !off;
    this.sendMediaState();
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
    if (this.wake) this.wake();
    for (const link of [this.link, this.candidate]) {
      if (!link || link.closed) continue;
      link.closed = true;
      if (link.sessionUrl) this.api.leaveMedia(link.sessionUrl, link.mediaToken);
      link.pc.close();
    }
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

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

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
