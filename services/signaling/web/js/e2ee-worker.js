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
  const data = new Uint8Array(frame.data);
  if (data.length === 0) { controller.enqueue(frame); return; }
  if (!sendKey) { stats.droppedNoKey++; return; }
  const clear = Math.min(clearBytes(kind, frame, data), data.length);
  const iv = nextIv();
  const sealed = new Uint8Array(await crypto.subtle.encrypt(
    { name: "AES-GCM", iv, additionalData: data.subarray(0, clear) }, sendKey, data.subarray(clear),
  ));
  const out = new Uint8Array(clear + sealed.length + TRAILER);
  out.set(data.subarray(0, clear), 0);
  out.set(sealed, clear);
  out.set(iv, clear + sealed.length);
  out[out.length - 1] = clear;
  frame.data = out.buffer;
  stats.encrypted++;
  controller.enqueue(frame);
}

async function decryptFrame(kind, frame, controller) {
  const data = new Uint8Array(frame.data);
  if (data.length === 0) { controller.enqueue(frame); return; }
  if (!receiveKey) { stats.droppedNoKey++; return; }
  const clear = data[data.length - 1];
  if (data.length < clear + TAG + TRAILER) { stats.decryptFailed++; return; }
  const iv = data.subarray(data.length - TRAILER, data.length - 1);
  let plain;
  try {
    plain = new Uint8Array(await crypto.subtle.decrypt(
      { name: "AES-GCM", iv, additionalData: data.subarray(0, clear) },
      receiveKey, data.subarray(clear, data.length - TRAILER),
    ));
  } catch {
    stats.decryptFailed++;
    return;
  }
  const out = new Uint8Array(clear + plain.length);
  out.set(data.subarray(0, clear), 0);
  out.set(plain, clear);
  if (kind === "video" && frame.type === "key" && probe === null) {
    probe = { wire: data.slice().buffer, plain: out.slice().buffer };
  }
  frame.data = out.buffer;
  stats.decrypted++;
  controller.enqueue(frame);
}

function pipe(operation, kind, readable, writable) {
  const step = operation === "encrypt" ? encryptFrame : decryptFrame;
  readable
    .pipeThrough(new TransformStream({ transform: (frame, controller) => step(kind, frame, controller) }))
    .pipeTo(writable)
    .catch(() => {});
}

// RTCRtpScriptTransform: the browser hands us each sender's and receiver's streams.
self.onrtctransform = (event) => {
  const transformer = event.transformer;
  const { operation, kind } = transformer.options;
  transformers.push({ transformer, operation, kind });
  pipe(operation, kind, transformer.readable, transformer.writable);
};

self.onmessage = (event) => {
  const message = event.data;
  if (message.type === "keys") {
    sendKey = message.sendKey;
    receiveKey = message.receiveKey;
    // Frames before the keys were dropped: ask for fresh key frames both ways.
    for (const { transformer, operation, kind } of transformers) {
      if (kind !== "video") continue;
      try {
        if (operation === "encrypt" && transformer.generateKeyFrame) transformer.generateKeyFrame().catch(() => {});
        if (operation === "decrypt" && transformer.sendKeyFrameRequest) transformer.sendKeyFrameRequest().catch(() => {});
      } catch { /* not supported: the decoder asks by itself */ }
    }
  } else if (message.type === "streams") {
    // createEncodedStreams (older Chromium): the page transfers the streams to us.
    pipe(message.operation, message.kind, message.readable, message.writable);
  } else if (message.type === "stats") {
    self.postMessage({ type: "stats", id: message.id, stats: { ...stats }, probe });
  }
};
