// A group call on this device: the same call session as a 1:1 call (local media, the
// connection to the SFU rejoined by itself, the encryption worker), with
//
// - participants: who is joined, live from call.participant and the call object;
// - media (docs/media.md, "Group calls"): the own pair (one sendrecv audio + video
//   transceiver: what we send, and slot 0 of what we receive), then recvonly audio + video
//   pairs (slots 1, 2, ...) the SFU fills with the others, and the `room` data channel on
//   which the SFU says who is in which slot and who speaks -- a hint only: the key that
//   decrypts a slot's frames says whose they are;
// - E2EE with sender keys: our frames are encrypted with a key of our own, sent to each
//   other participant wrapped under the key that pair derived with ECDH (call.signal with
//   "to"); a new one on every join and leave. Per participant: the fingerprint of its
//   ECDH public key (docs/web-client.md, "Group calls").

import { CallSession } from "./call.js";
import { SenderKey, fingerprint, fromBase64, pairWrapKey, unwrapSenderKey } from "./e2ee.js";

// Receive slots in each offer (the own pair's slot 0 included): room for everyone else in
// the largest group call (GROUP_CALL_MAX_PARTICIPANTS - 1), so no re-offer is ever needed.
export const GROUP_SLOTS = 15;
// After a join, our new sender key is used this long after it was sent (the others have it
// by then); after a leave at once (the one who left must not read what follows).
const KEY_SWITCH_MS = 1000;
const DATA_CHANNEL = "room";
// Signaling's call.signal budget per user and call (SIGNALING_SIGNALS_PER_CALL_PER_S: 10 a
// second, twice that in a burst; beyond, frames are dropped): ours stays under it, so a
// big call's key exchange is paced, never lost.
const SIGNALS_PER_S = 9;
const SIGNALS_BURST = 18;

export class GroupCallSession extends CallSession {
  constructor({ api, socket, call, me, deviceId }) {
    super({ api, socket, call, role: call.caller === me ? "caller" : "callee", deviceId });
    this.group = call.group;
    this.me = me;
    this.peer = null;
    this.status = call.caller === me && call.state !== "accepted" && call.state !== "active" ? "Ringing…" : "Connecting…";
    this.participants = new Map(); // user -> state (invited, ringing, joined, left, ...)
    this.peers = new Map(); // user -> {publicKey, wrapKey, fingerprint, sentKeyId}
    this.peerStates = new Map(); // user -> {connection, audio, video} (call.peer)
    this.senderKey = null; // our newest sender key
    this.activeKeyId = null; // the one our frames are encrypted with now
    this.switchTimer = null;
    this.rotateTimer = null;
    this.rotations = 0;
    this.fingerprint = null;
    this.linkSeq = 0; // each connection's slots are tagged "<link>:<slot>" for the worker
    this.chain = Promise.resolve(); // call.signal handled one at a time, in order
    this.outbox = []; // call.signal frames waiting for the budget
    this.budget = { tokens: SIGNALS_BURST, at: Date.now() };
    this.outboxTimer = null;
    this.ready = new Promise((resolve) => { this.markReady = resolve; });
    this.updateParticipants(call.participants);
  }

  // ------------------------------------------------------------------ participants

  get joined() {
    return [...this.participants].filter(([user, s]) => s === "joined" && user !== this.me).map(([user]) => user);
  }

  // The call object's participants (call.state, GET): each change as a call.participant.
  updateParticipants(list) {
    if (!Array.isArray(list)) return;
    for (const p of list) if (p && typeof p.user === "string") this.onParticipant({ user: p.user, state: p.state });
  }

  // call.participant {user, state}: someone joined or left (or rang, declined, ...).
  onParticipant({ user, state }) {
    if (!user || !state || user === this.me) return;
    const before = this.participants.get(user);
    this.participants.set(user, state);
    if (before === state) return;
    if (state === "joined") {
      this.scheduleRotate("join");
    } else if (before === "joined") {
      // Gone: nothing of theirs is decrypted from now on, and our next key is not theirs.
      this.peers.delete(user);
      this.peerStates.delete(user);
      if (this.worker) this.worker.postMessage({ type: "forget", user });
      this.scheduleRotate("leave");
    }
    this.changed();
  }

  // ------------------------------------------------------------------ start

  // start() (CallSession's): our sender key, and our public key to everyone in the call.
  async secure() {
    if (this.ended) return false;
    this.fingerprint = await fingerprint(this.callId, this.me, this.agreement.publicRaw);
    this.keys = { group: true }; // in the call (sendMediaState, rejoin check this)
    this.startWorker();
    try {
      const call = await this.api.getCall(this.callId);
      this.updateParticipants(call.participants);
    } catch { /* call.participant and call.state keep us up to date anyway */ }
    await this.rotate("start");
    // Each answers with theirs and its sender key.
    for (const user of this.joined) this.sendPublicKey(user, false);
    this.markReady();
    return true;
  }

  installKeys(worker) {
    worker.addEventListener("message", (event) => this.onWorkerMessage(event.data));
    worker.postMessage({ type: "group" });
  }

  // The worker says whose key decrypted a slot's frames (the slot's sender, whatever the SFU says).
  onWorkerMessage(message) {
    if (message.type !== "slot-sender" || typeof message.slot !== "string") return;
    const [seq, index] = message.slot.split(":").map(Number);
    const link = [this.link, this.candidate].find((l) => l && l.seq === seq);
    if (!link || !link.slots[index]) return;
    const slot = link.slots[index];
    // Video says it when there is video; audio for a participant without a camera.
    if (message.kind === "video" || !slot.sender) slot.sender = message.user;
    if (message.kind === "video") slot.videoSender = message.user;
    this.changed();
  }

  // ------------------------------------------------------------------ keys

  sendPublicKey(user, ack, senderKey = null) {
    const payload = { kind: "e2ee-key", v: 1, alg: "ECDH-P256", public_key: this.agreement.publicKey, ack };
    if (senderKey) payload.sender_key = senderKey;
    this.sendSignal(payload, user);
    this.sentKey = true;
  }

  // call.signal to one participant, within signaling's budget (queued, in order, beyond it).
  sendSignal(payload, to) {
    this.outbox.push({ payload, to });
    this.drainOutbox();
  }

  drainOutbox() {
    if (this.outboxTimer) return;
    const now = Date.now();
    const budget = this.budget;
    budget.tokens = Math.min(SIGNALS_BURST, budget.tokens + ((now - budget.at) / 1000) * SIGNALS_PER_S);
    budget.at = now;
    while (this.outbox.length && budget.tokens >= 1 && !this.ended) {
      const { payload, to } = this.outbox[0];
      if (!this.socket.signal(this.callId, payload, to)) break; // socket down: try again soon
      this.outbox.shift();
      budget.tokens -= 1;
    }
    if (this.outbox.length && !this.ended) {
      const wait = Math.max(50, ((1 - budget.tokens) / SIGNALS_PER_S) * 1000);
      this.outboxTimer = setTimeout(() => { this.outboxTimer = null; this.drainOutbox(); }, wait);
    }
  }

  // call.signal from another participant (from: signaling says who).
  onSignal(message) {
    this.chain = this.chain.then(() => this.ready).then(() => this.handleSignal(message)).catch((error) => {
      console.info(`dmcall: group key message from ${message.from} refused: ${error.message || error}`);
    });
    return this.chain;
  }

  async handleSignal(message) {
    if (this.ended) return;
    const from = message.from;
    const payload = message.payload || {};
    if (typeof from !== "string" || from === this.me) return;
    if (payload.kind === "e2ee-key" && typeof payload.public_key === "string") {
      await this.onPeerPublicKey(from, payload.public_key, !!payload.ack);
      if (payload.sender_key) await this.onSenderKey(from, payload.sender_key);
    } else if (payload.kind === "e2ee-sender-key") {
      await this.onSenderKey(from, payload);
    }
  }

  async onPeerPublicKey(user, publicKey, ack) {
    let peer = this.peers.get(user);
    if (peer && peer.publicKey !== publicKey) {
      // A new key: that participant is in the call on a new session (it rejoined from
      // another page). Its fingerprint changes on every screen; its old keys are dropped.
      this.worker.postMessage({ type: "forget", user });
      peer = null;
    }
    if (!peer) {
      const raw = fromBase64(publicKey);
      peer = {
        publicKey,
        wrapKey: await pairWrapKey(this.agreement, publicKey, this.callId),
        fingerprint: await fingerprint(this.callId, user, raw),
        sentKeyId: null,
      };
      this.peers.set(user, peer);
      // Signaling relays call.signal between joined participants only.
      if (this.participants.get(user) !== "joined") this.onParticipant({ user, state: "joined" });
      this.changed();
    }
    const key = this.senderKey;
    const ours = key && key.recipients.has(user) && peer.sentKeyId !== key.keyId;
    if (!ack) {
      // Theirs first: ours back, with our sender key when it was made for them.
      this.sendPublicKey(user, true, ours ? await key.wrapFor(peer.wrapKey, this.callId, this.me, user) : null);
      if (ours) peer.sentKeyId = key.keyId;
    } else if (ours) {
      await this.shareKey(user);
    }
    if (key && !key.recipients.has(user)) this.scheduleRotate("join");
  }

  async onSenderKey(user, message) {
    const peer = this.peers.get(user);
    if (!peer) return; // not before its public key (they send it first)
    const { keyId, key } = await unwrapSenderKey(peer.wrapKey, this.callId, user, this.me, message);
    this.worker.postMessage({ type: "receive-key", user, keyId, key });
  }

  // Our newest sender key to one participant it was made for.
  async shareKey(user) {
    const key = this.senderKey;
    const peer = this.peers.get(user);
    if (!key || !peer || !key.recipients.has(user) || peer.sentKeyId === key.keyId) return;
    peer.sentKeyId = key.keyId;
    const wrapped = await key.wrapFor(peer.wrapKey, this.callId, this.me, user);
    if (this.senderKey !== key || this.ended) return;
    this.sendSignal({ kind: "e2ee-sender-key", v: 1, ...wrapped }, user);
  }

  // Joins and leaves that come together make one new key.
  scheduleRotate(reason) {
    if (!this.worker || this.ended) return; // start() makes the first key for who is joined then
    if (this.rotateTimer) {
      if (reason === "leave") this.rotateReason = "leave";
      return;
    }
    this.rotateReason = reason;
    this.rotateTimer = setTimeout(() => {
      this.rotateTimer = null;
      this.chain = this.chain.then(() => this.rotate(this.rotateReason)).catch(() => {});
    }, 0);
  }

  // A new sender key for the participants joined now: sent to each, then used (at once
  // after a leave or at the start; KEY_SWITCH_MS later after a join, so those already in
  // the call have it by then). The old one's bytes are forgotten when it is replaced.
  async rotate(reason) {
    if (this.ended) return;
    const key = await SenderKey.create(this.joined);
    const previous = this.senderKey;
    this.senderKey = key;
    this.rotations += 1;
    await Promise.all([...key.recipients].map((user) => this.shareKey(user)));
    clearTimeout(this.switchTimer);
    const use = () => {
      if (this.senderKey !== key || this.ended) return;
      this.worker.postMessage({ type: "send-key", keyId: key.keyId, key: key.key });
      this.activeKeyId = key.keyId;
      if (previous) previous.forget();
      this.changed();
    };
    if (reason === "join" && previous) this.switchTimer = setTimeout(use, KEY_SWITCH_MS);
    else use();
  }

  // ------------------------------------------------------------------ media

  // Each connection's frames are tagged "<link>:<slot>" for the worker; the own pair's
  // receivers are slot 0.
  beginLink(link) {
    link.seq = ++this.linkSeq;
    return `${link.seq}:0`;
  }

  // Each connection: slot 0 is the own pair; recvonly pairs for slots 1.., the data channel.
  setupLink(link) {
    const pc = link.pc;
    link.activeSpeaker = null;
    // hinted: the user the SFU says is here; sender: whose key decrypts what comes here
    const slotOf = (slot, audio, video) => ({ slot, audio, video, stream: new MediaStream(), hinted: null, sender: null });
    link.slots = [slotOf(0, link.audio, link.video)];
    for (let slot = 1; slot < GROUP_SLOTS; slot++) {
      const audio = pc.addTransceiver("audio", { direction: "recvonly" });
      const video = pc.addTransceiver("video", { direction: "recvonly" });
      link.transform(audio.receiver, "decrypt", "audio", `${link.seq}:${slot}`);
      link.transform(video.receiver, "decrypt", "video", `${link.seq}:${slot}`);
      link.slots.push(slotOf(slot, audio, video));
    }
    const caps = RTCRtpReceiver.getCapabilities("video");
    const vp8 = caps ? caps.codecs.filter((c) => /^video\/(vp8|rtx)$/i.test(c.mimeType)) : [];
    if (vp8.length) for (const { video } of link.slots.slice(1)) if (video.setCodecPreferences) video.setCodecPreferences(vp8);
    link.channel = pc.createDataChannel(DATA_CHANNEL);
    link.channel.onmessage = (event) => this.onSfuMessage(link, event.data);
  }

  onLinkTrack(link, event) {
    const slot = (link.slots || []).find((s) => s.audio === event.transceiver || s.video === event.transceiver);
    if (!slot) return false;
    slot.stream.addTrack(event.track);
    this.changed();
    return true;
  }

  // What the SFU says on the `room` data channel (docs/media.md): `slots` (the full state:
  // which user is in which slot, by the mids of our offer) and `speaker`. Only hints: a
  // slot's frames are shown as whoever's key decrypts them.
  onSfuMessage(link, data) {
    let message;
    try { message = JSON.parse(data); } catch { return; }
    if (!message || typeof message !== "object") return;
    if (message.type === "slots" && Array.isArray(message.slots)) {
      for (const slot of link.slots) slot.hinted = null;
      for (const entry of message.slots) {
        const slot = this.slotOf(link, entry);
        if (slot !== null && typeof entry.user === "string") link.slots[slot].hinted = entry.user;
      }
      this.changed();
    } else if (message.type === "speaker") {
      link.activeSpeaker = typeof message.user === "string" ? message.user : null;
      this.changed();
    }
  }

  // A slot named by the mid of its audio or video transceiver (else by its index).
  slotOf(link, entry) {
    for (const mid of [entry.video_mid, entry.audio_mid]) {
      if (mid === undefined || mid === null) continue;
      const found = link.slots.find((s) => s.audio.mid === String(mid) || s.video.mid === String(mid));
      if (found) return found.slot;
    }
    if (Number.isInteger(entry.slot) && entry.slot >= 0 && entry.slot < link.slots.length) return entry.slot;
    return null;
  }

  get activeSpeaker() { return this.link ? this.link.activeSpeaker : null; }

  // The slot showing ``user``: the one whose frames ``user``'s key decrypts, else the one the
  // SFU says (before the first frame).
  slotFor(user) {
    const link = this.link;
    if (!link || !link.slots) return null;
    return link.slots.find((s) => s.sender === user)
      || link.slots.find((s) => s.hinted === user && !s.sender) || null;
  }

  // For the call screen: one tile per other joined participant.
  tiles() {
    return this.joined.map((user) => {
      const slot = this.slotFor(user);
      const peer = this.peers.get(user);
      const said = this.peerStates.get(user) || {};
      return {
        user,
        stream: slot ? slot.stream : null,
        slot: slot ? slot.slot : null,
        verified: !!slot && slot.sender === user,
        fingerprint: peer ? peer.fingerprint : null,
        audio: said.audio || "on",
        video: said.video || (this.media === "video" ? "on" : "off"),
        connection: said.connection || "connected",
        speaking: this.activeSpeaker === user,
      };
    });
  }

  // Our newest sender key's bytes, base64 (a test shows they never leave the page in clear).
  senderKeyBase64() {
    const key = this.senderKey;
    return key ? btoa(String.fromCharCode(...key.raw)) : null;
  }

  // framesDecoded of each participant's video (for the tests and the curious).
  async remoteVideoFrames() {
    const out = {};
    for (const user of this.joined) {
      const slot = this.slotFor(user);
      if (!slot) { out[user] = 0; continue; }
      let frames = 0;
      try {
        (await slot.video.receiver.getStats()).forEach((r) => {
          if (r.type === "inbound-rtp") frames += r.framesDecoded || 0;
        });
      } catch { /* closed under us */ }
      out[user] = frames;
    }
    return out;
  }

  // ------------------------------------------------------------------ in-call state

  onPeer(message) {
    if (typeof message.user !== "string" || message.user === this.me) return;
    const said = this.peerStates.get(message.user) || {};
    for (const field of ["connection", "audio", "video"]) {
      if (typeof message[field] === "string") said[field] = message[field];
    }
    this.peerStates.set(message.user, said);
    if (message.video === "on" && this.media === "audio") {
      this.media = "video";
      this.sendMediaState();
    }
    this.changed();
  }

  finish(reason) {
    if (this.ended) return;
    clearTimeout(this.switchTimer);
    clearTimeout(this.rotateTimer);
    clearTimeout(this.outboxTimer);
    if (this.senderKey) this.senderKey.forget();
    for (const link of [this.link, this.candidate]) if (link && link.slots) {
      for (const { stream } of link.slots) for (const track of stream.getTracks()) track.stop();
    }
    super.finish(reason);
  }
}

