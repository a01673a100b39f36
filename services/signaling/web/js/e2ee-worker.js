// The frame transform of one call (RTCRtpScriptTransform runs it off the main thread).
//
// Sent frame:  [clear header][AES-GCM ciphertext + 16-byte tag][12-byte IV][1 byte: header length]
//
// The clear header is what the receiving browser's depacketizer must read before the frame
// is decrypted: VP8's frame tag (3 bytes; 10 on a key frame, with the size) and Opus's
// TOC byte (1). It is authenticated as AES-GCM additional data, so it cannot be altered
// either. Everything else -- the picture and the sound -- is ciphertext for anyone
// between the two browsers, the SFU included. A frame is never sent in the clear: until
// the keys are agreed, frames are dropped.
//
// Group calls (a "group" message first): every participant encrypts with its own sender
// key, and each frame says which key, so a receiver picks it by the sender -- never by what
// the SFU says is in a slot:
//
// Group frame: [clear header][AES-GCM ciphertext + 16-byte tag][12-byte IV][4-byte key id][1 byte: header length]
//
// The key id is authenticated too (additional data: clear header + key id).

let sendKey = null;
let receiveKey = null;
const ivPrefix = crypto.getRandomValues(new Uint8Array(4));
let counter = 0n;
const stats = { encrypted: 0, decrypted: 0, decryptFailed: 0, droppedNoKey: 0 };
const transformers = [];
// The first video key frame received: as it came over the wire (through the SFU) and
// after decryption, so a test can show the SFU only ever saw ciphertext.
let probe = null;

const TRAILER = 13;
const TAG = 16;

// Group calls.
let group = false;
const GROUP_TRAILER = 17;
let sendKeyId = 0;
const receiveKeys = new Map(); // key id -> {user, key}
const KEYS_KEPT = 3; // per sender: its newest keys (frames in flight under the one before)
const slotSenders = new Map(); // "kind:slot" -> the user whose key decrypted its last frame
const slotFrames = new Map(); // "kind:slot" -> frames decrypted

function clearBytes(kind, frame, data) {
  if (kind === "video") return frame.type === "key" ? 10 : 3;
  return 1;
}

function nextIv() {
  const iv = new Uint8Array(12);
  iv.set(ivPrefix, 0);
  new DataView(iv.buffer).setBigUint64(4, counter);
  counter += 1n;
  return iv;
}

async function encryptFrame(kind, frame, controller) {
  if (group) return encryptGroupFrame(kind, frame, controller);
  const data = new Uint8Array(frame.data);
  if (data.length === 0) { controller.enqueue(frame); return; }
  if (!sendKey) { stats.droppedNoKey++; return; }
  const clear = Math.min(clearBytes(kind, frame, data), data.length);
  const out = await sealFrame(data, clear, sendKey, data.subarray(0, clear), nextIv());
  frame.data = out.buffer;
  stats.encrypted++;
  controller.enqueue(frame);
}

async function decryptFrame(kind, frame, controller, slot) {
  if (group) return decryptGroupFrame(kind, frame, controller, slot);
  const data = new Uint8Array(frame.data);
  if (data.length === 0) { controller.enqueue(frame); return; }
  if (!receiveKey) { stats.droppedNoKey++; return; }
  const clear = data[data.length - 1];
  if (data.length < clear + TAG + TRAILER) { stats.decryptFailed++; return; }
  const iv = data.subarray(data.length - TRAILER, data.length - 1);
  const out = await openFrame(data, clear, receiveKey, data.subarray(0, clear), iv, data.length - TRAILER);
  if (!out) { stats.decryptFailed++; return; }
  if (kind === "video" && frame.type === "key" && probe === null) {
    probe = { wire: data.slice().buffer, plain: out.slice().buffer };
  }
  frame.data = out.buffer;
  stats.decrypted++;
  controller.enqueue(frame);
}

async function encryptGroupFrame(kind, frame, controller) {
  const data = new Uint8Array(frame.data);
  if (data.length === 0) { controller.enqueue(frame); return; }
  if (!sendKey) { stats.droppedNoKey++; return; }
  const clear = Math.min(clearBytes(kind, frame, data), data.length);
  const idBytes = new Uint8Array(4);
  new DataView(idBytes.buffer).setUint32(0, sendKeyId);
  const additionalData = concat(data.subarray(0, clear), idBytes);
  const out = await sealFrame(data, clear, sendKey, additionalData, nextIv(), idBytes);
  frame.data = out.buffer;
  stats.encrypted++;
  controller.enqueue(frame);
}

async function decryptGroupFrame(kind, frame, controller, slot) {
  const data = new Uint8Array(frame.data);
  if (data.length === 0) { controller.enqueue(frame); return; }
  const clear = data[data.length - 1];
  if (data.length < clear + TAG + GROUP_TRAILER) { stats.decryptFailed++; return; }
  const idBytes = data.subarray(data.length - 5, data.length - 1);
  const entry = receiveKeys.get(new DataView(idBytes.buffer, idBytes.byteOffset, 4).getUint32(0));
  if (!entry) { stats.droppedNoKey++; return; }
  const iv = data.subarray(data.length - GROUP_TRAILER, data.length - 5);
  const additionalData = concat(data.subarray(0, clear), idBytes);
  const out = await openFrame(data, clear, entry.key, additionalData, iv, data.length - GROUP_TRAILER);
  if (!out) { stats.decryptFailed++; return; }
  if (kind === "video" && frame.type === "key" && probe === null) {
    probe = { wire: data.slice().buffer, plain: out.slice().buffer, user: entry.user };
  }
  const where = `${kind}:${slot}`;
  if (slotSenders.get(where) !== entry.user) {
    slotSenders.set(where, entry.user);
    self.postMessage({ type: "slot-sender", kind, slot, user: entry.user });
  }
  slotFrames.set(where, (slotFrames.get(where) || 0) + 1);
  frame.data = out.buffer;
  stats.decrypted++;
  controller.enqueue(frame);
}

// The frame as sent: its clear header, the rest sealed with ``key`` (the header, and in a
// group call the key id, authenticated as ``additionalData``), the IV, the key id, if any,
// and the header's length.
async function sealFrame(data, clear, key, additionalData, iv, keyId = new Uint8Array(0)) {
  const sealed = await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData }, key, data.subarray(clear));
  return concat(data.subarray(0, clear), new Uint8Array(sealed), iv, keyId, Uint8Array.of(clear));
}

// The frame as received, opened: its clear header, then what lies sealed up to ``sealedEnd``
// decrypted; null if it does not authenticate (a wrong key, a frame altered on the way).
async function openFrame(data, clear, key, additionalData, iv, sealedEnd) {
  let plain;
  try {
    plain = await crypto.subtle.decrypt({ name: "AES-GCM", iv, additionalData }, key, data.subarray(clear, sealedEnd));
  } catch {
    return null;
  }
  return concat(data.subarray(0, clear), new Uint8Array(plain));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((length, part) => length + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

// A new key to decrypt with: ask the senders for key frames (those before were dropped).
function requestKeyFrames() {
  for (const { transformer, operation, kind } of transformers) {
    if (kind !== "video" || operation !== "decrypt") continue;
    try {
      if (transformer.sendKeyFrameRequest) transformer.sendKeyFrameRequest().catch(() => {});
    } catch { /* not supported: the decoder asks by itself */ }
  }
}

function generateKeyFrames() {
  for (const { transformer, operation, kind } of transformers) {
    if (kind !== "video" || operation !== "encrypt") continue;
    try {
      if (transformer.generateKeyFrame) transformer.generateKeyFrame().catch(() => {});
    } catch { /* not supported */ }
  }
}

function pipe(operation, kind, readable, writable, slot = null) {
  const step = operation === "encrypt" ? encryptFrame : decryptFrame;
  readable
    .pipeThrough(new TransformStream({ transform: (frame, controller) => step(kind, frame, controller, slot) }))
    .pipeTo(writable)
    .catch(() => {});
}

// RTCRtpScriptTransform: the browser hands us each sender's and receiver's streams.
self.onrtctransform = (event) => {
  const transformer = event.transformer;
  const { operation, kind, slot } = transformer.options;
  transformers.push({ transformer, operation, kind });
  pipe(operation, kind, transformer.readable, transformer.writable, slot ?? null);
};

self.onmessage = (event) => {
  const message = event.data;
  if (message.type === "keys") {
    sendKey = message.sendKey;
    receiveKey = message.receiveKey;
    // Frames before the keys were dropped: ask for fresh key frames both ways.
    generateKeyFrames();
    requestKeyFrames();
  } else if (message.type === "streams") {
    // createEncodedStreams (older Chromium): the page transfers the streams to us.
    pipe(message.operation, message.kind, message.readable, message.writable, message.slot ?? null);
  } else if (message.type === "group") {
    group = true;
  } else if (message.type === "send-key") {
    // Group: from now on our frames go out under this key (the page switches when the
    // participants it was made for have it); a key frame first, so they can start at once.
    sendKey = message.key;
    sendKeyId = message.keyId;
    generateKeyFrames();
  } else if (message.type === "receive-key") {
    const owner = receiveKeys.get(message.keyId);
    if (owner && owner.user !== message.user) return; // a key id is one sender's
    receiveKeys.set(message.keyId, { user: message.user, key: message.key });
    const mine = [...receiveKeys].filter(([, e]) => e.user === message.user);
    for (const [id] of mine.slice(0, Math.max(0, mine.length - KEYS_KEPT))) receiveKeys.delete(id);
    requestKeyFrames();
  } else if (message.type === "forget") {
    // Group: that participant left; nothing of theirs is decrypted any more.
    for (const [id, e] of [...receiveKeys]) if (e.user === message.user) receiveKeys.delete(id);
  } else if (message.type === "stats") {
    const slots = {};
    for (const [where, user] of slotSenders) slots[where] = { user, frames: slotFrames.get(where) || 0 };
    self.postMessage({
      type: "stats", id: message.id, stats: { ...stats }, probe,
      ...(group ? { slots, send_key_id: sendKeyId, receive_key_ids: [...receiveKeys.keys()] } : {}),
    });
  }
};
